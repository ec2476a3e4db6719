"""Sans-io framing for shoal's stream protocols.

One frame on the wire::

    u32 big-endian header length | msgpack header (a map) | payload (header["n"] bytes)

The header is a small msgpack map with a type field ``"t"``; bulk bytes (tensors,
weight files) travel as the raw payload after it, never inside msgpack. The decoder is
fed bytes and hands back whole frames; it holds no sockets and never awaits, so it is
tested without a network (h11's shape). Every declared size is checked against the
limits before a single byte is allocated for it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from shoal.transport.errors import FrameError, FrameTooLarge

_PREFIX = struct.Struct(">I")
PREFIX_SIZE = _PREFIX.size

DEFAULT_MAX_HEADER = 64 * 1024
DEFAULT_MAX_PAYLOAD = 1 << 20


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame: its msgpack header and its raw payload."""

    header: Mapping[str, Any]
    payload: bytes | bytearray | memoryview = field(default=b"")

    @property
    def type(self) -> str:
        return str(self.header["t"])


def encode_header(header: Mapping[str, Any], payload_len: int) -> bytes:
    """The length prefix and msgpack header of a frame whose payload is ``payload_len``."""
    body = dict(header)
    if payload_len:
        body["n"] = payload_len
    else:
        body.pop("n", None)
    packed = msgpack.packb(body, use_bin_type=True)
    return _PREFIX.pack(len(packed)) + packed


def encode_frame(header: Mapping[str, Any], payload: bytes | bytearray | memoryview = b"") -> bytes:
    """A whole frame as one bytes object (for small frames; big payloads go separately)."""
    return encode_header(header, len(payload)) + bytes(payload)


class FrameDecoder:
    """Turns a byte stream into frames, validating sizes before allocating.

    Feed bytes with :meth:`feed`, then call :meth:`next_frame` until it returns ``None``
    (it needs more data). Call :meth:`feed_eof` at end of stream: it raises
    :class:`FrameError` when the stream stopped in the middle of a frame.
    """

    def __init__(
        self,
        *,
        max_header: int = DEFAULT_MAX_HEADER,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        allocate: Callable[[int], bytearray] = bytearray,
    ) -> None:
        """``allocate``: where payload buffers come from, called with a size that passed
        the limit (e.g. :meth:`shoal.transport.buffers.BufferPool.take`)."""
        self.max_header = max_header
        self.max_payload = max_payload
        self._allocate = allocate
        self._buf = bytearray()
        self._header: dict[str, Any] | None = None
        self._payload: bytearray | None = None
        self._filled = 0
        self._eof = False

    @property
    def mid_frame(self) -> bool:
        return bool(self._buf) or self._header is not None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise FrameError("data after end of stream")
        data = memoryview(data).cast("B")  # (slices below copy nothing)
        if self._payload is not None:
            # Copy straight into the preallocated payload, keep only the overflow.
            take = min(len(data), len(self._payload) - self._filled)
            self._payload[self._filled : self._filled + take] = data[:take]
            self._filled += take
            data = data[take:]
        if data:
            self._buf += data

    def payload_space(self) -> memoryview | None:
        """The unfilled part of the payload in progress, for a transport that reads into
        it directly (then :meth:`filled`); None while no payload is in progress."""
        if self._payload is None or self._filled == len(self._payload):
            return None
        return memoryview(self._payload)[self._filled :]

    def filled(self, count: int) -> None:
        """``count`` bytes were written into :meth:`payload_space`."""
        assert self._payload is not None and self._filled + count <= len(self._payload)
        self._filled += count

    def feed_eof(self) -> None:
        self._eof = True
        if self.mid_frame:
            raise FrameError("stream ended in the middle of a frame (truncated)")

    def wanted(self) -> int:
        """How many more bytes the frame in progress needs at least (a read-size hint)."""
        if self._payload is not None:
            return len(self._payload) - self._filled
        if len(self._buf) < PREFIX_SIZE:
            return PREFIX_SIZE - len(self._buf)
        (hlen,) = _PREFIX.unpack_from(self._buf)
        return max(1, PREFIX_SIZE + hlen - len(self._buf))

    def next_frame(self) -> Frame | None:
        if self._header is None:
            header = self._take_header()
            if header is None:
                return None
            size = _payload_size(header)
            if size > self.max_payload:
                raise FrameTooLarge("payload", size, self.max_payload)
            if size == 0:
                return Frame(header)
            self._header = header
            self._payload = self._allocate(size)
            take = min(size, len(self._buf))
            with memoryview(self._buf) as buffered:  # (released before the del below)
                self._payload[:take] = buffered[:take]
            self._filled = take
            del self._buf[:take]
        assert self._payload is not None
        if self._filled < len(self._payload):
            return None
        frame = Frame(self._header, self._payload)
        self._header, self._payload, self._filled = None, None, 0
        return frame

    def _take_header(self) -> dict[str, Any] | None:
        if len(self._buf) < PREFIX_SIZE:
            return None
        (hlen,) = _PREFIX.unpack_from(self._buf)
        if hlen > self.max_header:
            raise FrameTooLarge("header", hlen, self.max_header)
        if len(self._buf) < PREFIX_SIZE + hlen:
            return None
        raw = bytes(self._buf[PREFIX_SIZE : PREFIX_SIZE + hlen])
        del self._buf[: PREFIX_SIZE + hlen]
        return decode_header(raw)


def decode_header(raw: bytes) -> dict[str, Any]:
    """Parse and validate one msgpack header."""
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises a zoo of types for bad input
        raise FrameError(f"header is not valid msgpack: {exc}") from exc
    if not isinstance(header, dict):
        raise FrameError(f"header must be a map, got {type(header).__name__}")
    kind = header.get("t")
    if not isinstance(kind, str) or not kind:
        raise FrameError("header has no type field 't'")
    return header


def _payload_size(header: Mapping[str, Any]) -> int:
    size = header.get("n", 0)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FrameError(f"payload size must be a non-negative integer, got {size!r}")
    return size
