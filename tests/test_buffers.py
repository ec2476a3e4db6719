"""The receive-buffer pool: a buffer is handed out again only once nothing else refers to
it (a tensor or a memoryview made from it counts); small sizes are not pooled; the pool
keeps at most ``max_bytes``."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from shoal.transport.buffers import BufferPool, _Entry
from shoal.transport.framing import FrameDecoder, encode_frame

MIB = 1 << 20


def test_a_buffer_comes_back_once_released_and_never_while_in_use() -> None:
    pool = BufferPool(min_size=MIB)
    a = pool.take(2 * MIB)
    address = id(a)
    del a
    b = pool.take(2 * MIB)
    assert id(b) == address and pool.reused == 1  # released: handed out again
    held = torch.frombuffer(b, dtype=torch.float32)  # a tensor over it keeps it in use
    del b
    c = pool.take(2 * MIB)
    assert id(c) != address and pool.reused == 1
    c[:4] = b"\1\2\3\4"
    assert held[:1].numpy().view(np.uint8).tolist() == [0, 0, 0, 0]  # not the same bytes
    view = memoryview(c)[10:20]  # a slice of a view keeps it too
    del c, held
    d = pool.take(2 * MIB)  # the first buffer is free again, the second is not
    assert id(d) == address and pool.reused == 2
    del view


def test_small_buffers_are_not_pooled_and_the_pool_is_bounded() -> None:
    pool = BufferPool(min_size=MIB, max_bytes=3 * MIB)
    small = pool.take(1000)
    assert len(small) == 1000 and pool.pooled_bytes == 0
    kept = [pool.take(MIB) for _ in range(5)]  # all in use: only 3 MiB of them pooled
    assert all(len(b) == MIB for b in kept) and pool.pooled_bytes == 3 * MIB
    del kept
    other = pool.take(2 * MIB)  # a new size pushes out free buffers of the old one
    assert len(other) == 2 * MIB and pool.pooled_bytes <= 3 * MIB


def test_the_frame_decoder_reads_payloads_into_pooled_buffers_in_place() -> None:
    pool = BufferPool(min_size=1024)
    decoder = FrameDecoder(max_payload=MIB, allocate=pool.take)
    payload = bytes(range(256)) * 16  # 4096 bytes
    frame = encode_frame({"t": "x"}, payload)
    header_len = len(frame) - len(payload)
    decoder.feed(frame[: header_len + 100])
    assert decoder.next_frame() is None
    space = decoder.payload_space()
    assert space is not None and len(space) == len(payload) - 100
    space[:] = payload[100:]  # as a transport's read_into does
    del space
    decoder.filled(len(payload) - 100)
    assert decoder.payload_space() is None
    got = decoder.next_frame()
    assert got is not None and bytes(got.payload) == payload and got.header["t"] == "x"
    assert isinstance(got.payload, bytearray) and pool.pooled_bytes == len(payload)


def test_free_buffers_idle_too_long_are_trimmed_and_busy_ones_kept() -> None:
    pool = BufferPool(min_size=MIB, max_idle=30.0)
    busy = pool.take(MIB)
    idle = pool.take(2 * MIB)
    del idle
    assert pool.pooled_bytes == 3 * MIB
    pool.trim(now=time.monotonic() + 10)  # not idle for long enough yet
    assert pool.pooled_bytes == 3 * MIB
    pool.trim(now=time.monotonic() + 31)  # the free one goes, the one in use stays
    assert pool.pooled_bytes == MIB
    assert pool.take(MIB) is not busy  # still in use: never handed out twice
    del busy


def test_threads_never_hold_the_same_buffer_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The all-reduce's worker threads take buffers beside the trio thread: the check
    "free" and the handing out are one step under a lock. The check is slowed down here
    (it sleeps after looking), so that without the lock two threads would both find a
    buffer free and take it."""
    looked = _Entry.free

    def slow_free(entry: _Entry) -> bool:
        free = bool(looked.fget(entry))  # type: ignore[attr-defined]
        time.sleep(0.0002)
        return free

    monkeypatch.setattr(_Entry, "free", property(slow_free))
    pool = BufferPool(min_size=MIB, max_bytes=64 * MIB)
    held: dict[int, int] = {}
    clashes: list[int] = []
    guard = threading.Lock()

    def work(me: int) -> None:
        for _ in range(50):
            buffer = pool.take(MIB)
            with guard:
                if id(buffer) in held:
                    clashes.append(id(buffer))
                held[id(buffer)] = me
            buffer[0] = me
            time.sleep(0.001)  # in use for a while
            with guard:
                held.pop(id(buffer), None)
            del buffer

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clashes == []
    assert pool.reused > 0 and pool.pooled_bytes <= 6 * MIB  # reused, at most one per thread
