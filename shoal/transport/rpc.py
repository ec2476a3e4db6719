"""Typed RPC over libp2p streams: request/response and server-streaming.

Each call opens a fresh stream on protocol ``/shoal/<name>/<major>`` and exchanges frames
(:mod:`shoal.transport.framing`):

- the caller sends one ``call`` frame: ``{"t": "call", "b": body}`` plus a raw payload;
- a unary handler answers with one ``ok`` frame; a streaming handler with any number of
  ``item`` frames and then ``end``;
- any failure is an ``err`` frame ``{"t": "err", "c": code, "m": message}`` and is raised
  on the caller as :class:`RemoteError(peer, code, message) <RemoteError>`.

Size limits are per protocol and are checked by the decoder before allocation on both
sides. A handler raises :class:`RpcError` to answer with a chosen code; any other
exception becomes ``internal`` (logged here, never leaked as a traceback). A bad frame
from a peer gets an ``err`` reply and a log line, and only that stream is closed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID

from shoal.transport.errors import FrameError, FrameTooLarge, RemoteError, RpcError
from shoal.transport.framing import DEFAULT_MAX_HEADER, Frame, FrameDecoder, encode_header

log = logging.getLogger(__name__)

# Payloads are written in slices this large: big enough to amortise per-write overhead in
# yamux/noise, small enough not to hold a second copy of a huge tensor.
WRITE_CHUNK = 1 << 20
READ_CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Protocol:
    """One RPC protocol: its id and its limits."""

    name: str
    major: int = 1
    max_request: int = 1 << 20
    max_response: int = 1 << 20
    # Upper bound on one whole call, including the handler's work.
    timeout: float = 30.0
    # Calls served at once; a call beyond it is refused with ``busy`` before its request
    # is read, so the request limit times this bounds the memory a protocol can pin.
    max_concurrent: int = 64

    @property
    def id(self) -> TProtocol:
        return TProtocol(f"/shoal/{self.name}/{self.major}")


@dataclass(frozen=True, slots=True)
class Message:
    """A request or reply: a msgpack-able body and a raw byte payload."""

    body: Mapping[str, Any] = field(default_factory=dict)
    payload: bytes | bytearray | memoryview = b""


UnaryHandler = Callable[[ID, Message], Awaitable[Message]]
StreamHandler = Callable[[ID, Message], AsyncIterator[Message]]


class FramedStream:
    """A libp2p stream read and written as frames (the I/O shell around FrameDecoder)."""

    def __init__(self, stream: INetStream, *, max_payload: int) -> None:
        self.stream = stream
        self.decoder = FrameDecoder(max_header=DEFAULT_MAX_HEADER, max_payload=max_payload)

    @property
    def peer(self) -> ID:
        return self.stream.muxed_conn.peer_id

    async def receive(self) -> Frame | None:
        """The next frame, or ``None`` at a clean end of stream between frames."""
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            try:
                data = await self.stream.read(max(READ_CHUNK, self.decoder.wanted()))
            except EOFError:
                data = b""
            if not data:
                self.decoder.feed_eof()
                return None
            self.decoder.feed(data)

    async def send(
        self, header: Mapping[str, Any], payload: bytes | bytearray | memoryview = b""
    ) -> None:
        prefix = encode_header(header, len(payload))
        if len(payload) <= WRITE_CHUNK:
            await self.stream.write(prefix + bytes(payload))
            return
        await self.stream.write(prefix)
        view = memoryview(payload)
        for start in range(0, len(view), WRITE_CHUNK):
            await self.stream.write(bytes(view[start : start + WRITE_CHUNK]))

    async def send_error(self, code: str, message: str) -> None:
        await self.send({"t": "err", "c": code, "m": message[:1000]})

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.stream.close()
            except Exception:  # the peer may already be gone; nothing left to do
                log.debug("closing stream to %s failed", self.peer, exc_info=True)

    async def reset(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self.stream.reset()
            except Exception:
                log.debug("resetting stream to %s failed", self.peer, exc_info=True)


def frame_message(frame: Frame) -> Message:
    """The message a ``call``/``ok``/``item`` frame carries."""
    body = frame.header.get("b", {})
    if not isinstance(body, dict):
        raise FrameError("message body must be a map")
    return Message(body, frame.payload)


class Rpc:
    """Serves and calls shoal RPC protocols on one libp2p host."""

    def __init__(self, host: IHost) -> None:
        self.host = host

    # ---- serving ---------------------------------------------------------------------

    def serve(self, proto: Protocol, handler: UnaryHandler) -> None:
        async def respond(framed: FramedStream, request: Message) -> None:
            reply = await handler(framed.peer, request)
            await self._send_reply(framed, proto, "ok", reply)

        self._register(proto, respond)

    def serve_stream(self, proto: Protocol, handler: StreamHandler) -> None:
        async def respond(framed: FramedStream, request: Message) -> None:
            async for item in handler(framed.peer, request):
                await self._send_reply(framed, proto, "item", item)
            await framed.send({"t": "end"})

        self._register(proto, respond)

    async def _send_reply(
        self, framed: FramedStream, proto: Protocol, kind: str, reply: Message
    ) -> None:
        if len(reply.payload) > proto.max_response:
            raise RpcError("too_large", f"reply of {len(reply.payload)} bytes is over the limit")
        await framed.send({"t": kind, "b": dict(reply.body)}, reply.payload)

    def _register(
        self, proto: Protocol, respond: Callable[[FramedStream, Message], Awaitable[None]]
    ) -> None:
        slots = trio.Semaphore(proto.max_concurrent)

        async def on_stream(stream: INetStream) -> None:
            framed = FramedStream(stream, max_payload=proto.max_request)
            peer = framed.peer
            try:
                slots.acquire_nowait()
            except trio.WouldBlock:
                log.info(
                    "refused a call from %s on %s: %d calls in progress",
                    peer,
                    proto.id,
                    proto.max_concurrent,
                )
                await self._try_error(
                    framed, "busy", f"{proto.id} is serving its maximum of calls; retry later"
                )
                await framed.aclose()
                return
            try:
                with trio.fail_after(proto.timeout):
                    frame = await framed.receive()
                    if frame is None:
                        return
                    if frame.type != "call":
                        raise FrameError(f"expected a 'call' frame, got {frame.type!r}")
                    await respond(framed, frame_message(frame))
            except FrameTooLarge as exc:
                log.warning("rejected frame from %s on %s: %s", peer, proto.id, exc)
                await self._try_error(framed, "too_large", str(exc))
            except FrameError as exc:
                log.warning("bad frame from %s on %s: %s", peer, proto.id, exc)
                await self._try_error(framed, "bad_frame", str(exc))
            except RpcError as exc:
                await self._try_error(framed, exc.code, exc.message)
            except trio.TooSlowError:
                log.warning("call from %s on %s timed out after %ss", peer, proto.id, proto.timeout)
                await self._try_error(framed, "timeout", f"call took over {proto.timeout}s")
            except StreamError as exc:
                log.info("stream from %s on %s broke: %r", peer, proto.id, exc)
            except Exception:
                log.exception("handler for %s failed on a call from %s", proto.id, peer)
                await self._try_error(framed, "internal", "the handler failed; see the node's log")
            finally:
                slots.release()
                await framed.aclose()

        self.host.set_stream_handler(proto.id, on_stream)

    @staticmethod
    async def _try_error(framed: FramedStream, code: str, message: str) -> None:
        try:
            with trio.move_on_after(2):
                await framed.send_error(code, message)
        except Exception:
            log.debug("could not send error %s to %s", code, framed.peer, exc_info=True)

    # ---- calling ---------------------------------------------------------------------

    async def call(self, peer: ID, proto: Protocol, request: Message) -> Message:
        """One request, one reply; raises :class:`RemoteError` for a remote failure."""
        async with self._open(peer, proto, request) as framed:
            frame = await self._receive_reply(framed, peer, proto)
            if frame.type != "ok":
                raise RemoteError(str(peer), "bad_frame", f"expected 'ok', got {frame.type!r}")
            return frame_message(frame)

    @asynccontextmanager
    async def open_stream_call(
        self, peer: ID, proto: Protocol, request: Message
    ) -> AsyncIterator[AsyncIterator[Message]]:
        """A server-streaming call: ``async with ... as replies: async for m in replies``."""
        async with self._open(peer, proto, request) as framed:

            async def replies() -> AsyncIterator[Message]:
                while True:
                    frame = await self._receive_reply(framed, peer, proto)
                    if frame.type == "end":
                        return
                    if frame.type != "item":
                        raise RemoteError(str(peer), "bad_frame", f"unexpected {frame.type!r}")
                    yield frame_message(frame)

            yield replies()

    @asynccontextmanager
    async def _open(
        self, peer: ID, proto: Protocol, request: Message
    ) -> AsyncIterator[FramedStream]:
        if len(request.payload) > proto.max_request:
            raise RpcError(
                "too_large",
                f"request of {len(request.payload)} bytes exceeds {proto.id}'s limit "
                f"of {proto.max_request}",
            )
        try:
            stream = await self.host.new_stream(peer, [proto.id])
        except Exception as exc:
            raise open_failure(peer, proto.id, exc) from exc
        framed = FramedStream(stream, max_payload=proto.max_response)
        ok = False
        try:
            try:
                await framed.send({"t": "call", "b": dict(request.body)}, request.payload)
            except StreamError:
                # The server may have refused the call part-way (too large, bad frame) and
                # said why before resetting: surface its reason rather than the reset.
                with trio.move_on_after(1):
                    await self._receive_reply(framed, peer, proto)
                raise
            yield framed
            ok = True
        except StreamError as exc:
            raise RemoteError(str(peer), "stream_broken", f"{proto.id}: {exc!r}") from exc
        finally:
            if ok:
                await framed.aclose()
            else:
                await framed.reset()

    @staticmethod
    async def _receive_reply(framed: FramedStream, peer: ID, proto: Protocol) -> Frame:
        try:
            frame = await framed.receive()
        except FrameTooLarge as exc:
            raise RemoteError(str(peer), "too_large", str(exc)) from exc
        except FrameError as exc:
            raise RemoteError(str(peer), "bad_frame", str(exc)) from exc
        if frame is None:
            raise RemoteError(str(peer), "closed", f"{proto.id}: stream closed before a reply")
        if frame.type == "err":
            raise RemoteError(str(peer), str(frame.header.get("c")), str(frame.header.get("m")))
        return frame


def open_failure(peer: ID, proto_id: str, exc: Exception) -> RemoteError:
    """The typed error for a stream that could not be opened."""
    text = f"{exc!r} {exc.__cause__!r}"
    if "ProtocolNotSupported" in text or "protocol not supported" in text.lower():
        return RemoteError(
            str(peer),
            "unsupported_protocol",
            f"the peer does not speak {proto_id}; it may run an incompatible shoal version",
        )
    return RemoteError(str(peer), "unreachable", f"cannot open {proto_id}: {exc}")
