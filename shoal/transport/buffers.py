"""A pool of large receive buffers, handed out again once nothing else refers to them.

Receiving a tensor means a fresh buffer of its size, and a fresh buffer means page faults
on its first write: in a VM, filling a new 16 MiB ``bytearray`` that is kept alive costs
about 6 ms, three times the cost of decrypting into it (docs/benchmarks.md, "All-reduce").
Rounds of an all-reduce receive buffers of the same sizes again and again, so the pool
keeps the buffers it handed out and hands one out again when its only remaining reference
is the pool's own: a tensor made from a buffer (``torch.frombuffer``,
``numpy.frombuffer``) or any memoryview of it holds a reference to it, so a buffer in use
is never handed out twice. Buffers below ``min_size`` are not pooled (malloc serves them
from memory it has touched already). A free buffer not handed out for ``max_idle``
seconds is dropped by :meth:`BufferPool.trim` (the collectives driver calls it every few
seconds), so a node between training rounds minutes apart does not sit on them. Buffers
to send come from it too (encoded contributions, reduced chunks: the all-reduce's
machines ask on worker threads): it takes a lock.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MIN_SIZE = 1 << 20
MAX_BYTES = 512 << 20
MAX_IDLE = 30.0
# references to a pooled buffer that is free: its entry's, and getrefcount's argument
_FREE_REFS = 2


@dataclass(slots=True)
class _Entry:
    buffer: bytearray
    handed: float  # when it was last handed out (time.monotonic())

    @property
    def free(self) -> bool:
        return sys.getrefcount(self.buffer) == _FREE_REFS


class BufferPool:
    """Buffers of at least ``min_size`` bytes, reused; ``max_bytes`` bounds what the pool
    keeps (free buffers of the least recently asked sizes are dropped first)."""

    def __init__(
        self, *, min_size: int = MIN_SIZE, max_bytes: int = MAX_BYTES, max_idle: float = MAX_IDLE
    ) -> None:
        self.min_size = min_size
        self.max_bytes = max_bytes
        self.max_idle = max_idle
        self._by_size: OrderedDict[int, list[_Entry]] = OrderedDict()
        self.pooled_bytes = 0
        self.reused = 0  # buffers handed out again (for tests and status)
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        """A buffer of exactly ``size`` bytes (its contents are not cleared); from any
        thread."""
        if size < self.min_size:
            return bytearray(size)
        with self._lock:
            return self._take(size)

    def _take(self, size: int) -> bytearray:
        entries = self._by_size.setdefault(size, [])
        self._by_size.move_to_end(size)
        for entry in entries:
            if entry.free:
                self.reused += 1
                entry.handed = time.monotonic()
                return entry.buffer
        buffer = bytearray(size)
        self._make_room(size)
        if self.pooled_bytes + size <= self.max_bytes:
            self._by_size.setdefault(size, []).append(_Entry(buffer, time.monotonic()))
            self.pooled_bytes += size
        return buffer

    def trim(self, now: float | None = None) -> None:
        """Drop the free buffers not handed out for ``max_idle`` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._drop(lambda entry: now - entry.handed >= self.max_idle)

    def _make_room(self, size: int) -> None:
        """Drop free buffers, least recently asked sizes first, until ``size`` fits."""
        for other in list(self._by_size):
            if self.pooled_bytes + size <= self.max_bytes:
                return
            self._drop(lambda entry: True, sizes=[other])

    def _drop(self, drop: Callable[[_Entry], bool], sizes: list[int] | None = None) -> None:
        """Drop the free buffers (of ``sizes``, or all) that ``drop`` names."""
        for size in list(self._by_size) if sizes is None else sizes:
            kept = [e for e in self._by_size[size] if not (e.free and drop(e))]
            self.pooled_bytes -= size * (len(self._by_size[size]) - len(kept))
            if kept:
                self._by_size[size] = kept
            else:
                del self._by_size[size]


__all__ = ["BufferPool"]
