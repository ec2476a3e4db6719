"""A pool of large receive buffers, handed out again once nothing else refers to them.

Receiving a tensor means a fresh buffer of its size, and a fresh buffer means page faults
on its first write: in a VM, filling a new 16 MiB ``bytearray`` that is kept alive costs
about 6 ms, three times the cost of decrypting into it (docs/benchmarks.md, "All-reduce").
Rounds of an all-reduce receive buffers of the same sizes again and again, so the pool
keeps the buffers it handed out and hands one out again when its only remaining reference
is the pool's own: a tensor made from a buffer (``torch.frombuffer``,
``numpy.frombuffer``) or any memoryview of it holds a reference to it, so a buffer in use
is never handed out twice. Buffers below ``min_size`` are not pooled (malloc serves them
from memory it has touched already).
"""

from __future__ import annotations

import sys
from collections import OrderedDict

MIN_SIZE = 1 << 20
MAX_BYTES = 512 << 20
# references to a pooled buffer that is free: the pool's list, and getrefcount's argument
_FREE_REFS = 2


class BufferPool:
    """Buffers of at least ``min_size`` bytes, reused; ``max_bytes`` bounds what the pool
    keeps (free buffers of the least recently asked sizes are dropped first)."""

    def __init__(self, *, min_size: int = MIN_SIZE, max_bytes: int = MAX_BYTES) -> None:
        self.min_size = min_size
        self.max_bytes = max_bytes
        self._by_size: OrderedDict[int, list[bytearray]] = OrderedDict()
        self.pooled_bytes = 0
        self.reused = 0  # buffers handed out again (for tests and status)

    def take(self, size: int) -> bytearray:
        """A buffer of exactly ``size`` bytes (its contents are not cleared)."""
        if size < self.min_size:
            return bytearray(size)
        buffers = self._by_size.setdefault(size, [])
        self._by_size.move_to_end(size)
        for i in range(len(buffers)):
            if sys.getrefcount(buffers[i]) == _FREE_REFS:
                self.reused += 1
                return buffers[i]
        buffer = bytearray(size)
        self._make_room(size)
        if self.pooled_bytes + size <= self.max_bytes:
            self._by_size.setdefault(size, []).append(buffer)
            self.pooled_bytes += size
        return buffer

    def _make_room(self, size: int) -> None:
        """Drop free buffers, least recently asked sizes first, until ``size`` fits."""
        for other in list(self._by_size):
            if self.pooled_bytes + size <= self.max_bytes:
                return
            buffers = self._by_size[other]
            kept = [b for b in buffers if sys.getrefcount(b) > _FREE_REFS + 1]
            self.pooled_bytes -= sum(len(b) for b in buffers) - sum(len(b) for b in kept)
            if kept:
                self._by_size[other] = kept
            else:
                del self._by_size[other]


__all__ = ["BufferPool"]
