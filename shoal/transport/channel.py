"""Channels: many calls over one long-lived libp2p stream per peer and protocol.

shoal RPC (:mod:`shoal.transport.rpc`) opens a stream per call, and py-libp2p spends
2.4-2.9 ms opening one (a yamux stream plus a multistream-select negotiation: three round
trips; docs/benchmarks.md), where a message on an open stream costs 0.7-0.9 ms. Request
paths that run many small calls (DHT lookups, activations between pipeline stages) use
a channel instead: one stream per (peer, protocol), kept open and shared by concurrent
calls, each call tagged with an id.

Frames (:mod:`shoal.transport.framing`):

- caller: ``{"t": "req", "i": id, "b": body}`` plus a raw payload;
- server: ``{"t": "ok", "i": id, "b": body}`` plus a payload, or
  ``{"t": "err", "i": id, "c": code, "m": message}``.

The server runs the calls of one stream concurrently (at most ``max_concurrent`` per
protocol; beyond it a call is answered ``busy`` at once) and answers in completion
order. A handler failure is that call's ``err``; a frame that breaks the framing (too
large, undecodable, not a request) is logged and closes the stream, and the peer's next
call opens a new one. Size limits are checked by the frame decoder before allocation.

Idle streams: the caller closes a stream with no call for ``idle_close`` seconds; the
server closes one that sent nothing for ``idle_timeout`` (longer), so that a stream is
almost always closed by the side that knows it is idle. A call that fails because a
reused stream turned out to be dead is retried once on a new stream when the protocol
says its calls are ``idempotent``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

if TYPE_CHECKING:
    from shoal.transport.bulk import Bulk, BulkStream

from shoal.transport.errors import (
    FrameError,
    FrameTooLarge,
    RemoteError,
    RpcError,
)
from shoal.transport.framing import Frame
from shoal.transport.rpc import FramedStream, Message, UnaryHandler, frame_message, open_failure

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ChannelProtocol:
    """One channel protocol: its id, limits and timeouts."""

    name: str
    major: int = 1
    max_request: int = 1 << 20
    max_response: int = 1 << 20
    #: Upper bound on one call, from the caller's send to its reply.
    timeout: float = 30.0
    #: Calls served at once over all streams of this protocol (bounds the memory pinned).
    max_concurrent: int = 256
    #: Carry the calls on a bulk stream (shoal.transport.bulk) where the peer can be
    #: reached that way: per-message latency-bound traffic (tensor-parallel all-reduces).
    bulk: bool = False
    #: A caller closes a stream unused this long; a server one silent ``idle_timeout``.
    idle_close: float = 20.0
    idle_timeout: float = 60.0
    #: Calls may be sent twice (a lookup, not a write with effects).
    idempotent: bool = False

    @property
    def id(self) -> TProtocol:
        return TProtocol(f"/shoal/{self.name}/{self.major}")


class _Pending:
    """One call waiting for its reply."""

    __slots__ = ("done", "error", "frame")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.frame: Frame | None = None
        self.error: RemoteError | None = None


class _Link:
    """The caller's side of one stream: a reader task routes replies to waiting calls."""

    def __init__(self, framed: FramedStream, proto: ChannelProtocol) -> None:
        self.framed = framed
        self.proto = proto
        self.peer = framed.peer
        self.pending: dict[int, _Pending] = {}
        self.ids = itertools.count(1)
        self.write_lock = trio.Lock()
        self.closed = False
        self.calls = 0
        self.last_used = trio.current_time()

    async def read_replies(self) -> None:
        reason = "stream closed by the peer"
        try:
            while True:
                frame = await self.framed.receive()
                if frame is None:
                    break
                call_id = frame.header.get("i")
                waiting = self.pending.pop(call_id, None) if isinstance(call_id, int) else None
                if waiting is None:
                    if frame.type == "err":  # the server gave up on the whole stream
                        reason = f"{frame.header.get('c')}: {frame.header.get('m')}"
                        break
                    continue  # the reply to a call that timed out here
                waiting.frame = frame
                waiting.done.set()
        except (FrameError, FrameTooLarge) as exc:
            reason = f"bad reply frame: {exc}"
            log.warning("bad frame from %s on %s: %s", self.peer, self.proto.id, exc)
        except Exception as exc:  # reset, connection lost
            reason = f"stream broke: {exc!r}"
        finally:
            self.fail_all(reason)
            await self.framed.reset()

    def fail_all(self, reason: str) -> None:
        self.closed = True
        for waiting in self.pending.values():
            waiting.error = RemoteError(
                str(self.peer), "stream_broken", f"{self.proto.id}: {reason}"
            )
            waiting.done.set()
        self.pending.clear()

    async def call(self, request: Message) -> Message:
        call_id = next(self.ids)
        waiting = _Pending()
        self.pending[call_id] = waiting
        self.calls += 1
        try:
            async with self.write_lock:
                if self.closed:
                    raise RemoteError(str(self.peer), "stream_broken", "stream already closed")
                sent = False
                try:
                    await self.framed.send(
                        {"t": "req", "i": call_id, "b": dict(request.body)}, request.payload
                    )
                    sent = True
                finally:
                    if not sent:  # a frame cut short (cancelled) breaks the stream's framing
                        self.fail_all("a request was cut short")
                        await self.framed.reset()
            await waiting.done.wait()
        except RemoteError:
            raise
        except Exception as exc:
            self.fail_all(f"send failed: {exc!r}")
            raise RemoteError(str(self.peer), "stream_broken", f"{self.proto.id}: {exc!r}") from exc
        finally:
            self.pending.pop(call_id, None)
            self.last_used = trio.current_time()
        if waiting.error is not None:
            raise waiting.error
        assert waiting.frame is not None
        frame = waiting.frame
        if frame.type == "err":
            raise RemoteError(
                str(self.peer), str(frame.header.get("c")), str(frame.header.get("m"))
            )
        if frame.type != "ok":
            raise RemoteError(str(self.peer), "bad_frame", f"expected 'ok', got {frame.type!r}")
        return frame_message(frame)


class Channels:
    """Serves and calls channel protocols on one libp2p host. Reader and idle-closing
    tasks run in ``nursery`` (the host's)."""

    def __init__(self, host: IHost, nursery: trio.Nursery) -> None:
        self.host = host
        self._nursery = nursery
        self._links: dict[tuple[str, TProtocol], _Link] = {}
        self._opening: dict[tuple[str, TProtocol], trio.Lock] = {}
        self._sweeping = False
        #: Streams opened by this side, per protocol id (for tests and status).
        self.opened: dict[str, int] = {}
        #: The host's bulk streams, for protocols with ``bulk`` (set by open_host).
        self.bulk: Bulk | None = None

    # ---- serving ---------------------------------------------------------------------

    def serve(self, proto: ChannelProtocol, handler: UnaryHandler) -> None:
        slots = trio.Semaphore(proto.max_concurrent)

        async def on_stream(stream: INetStream | BulkStream) -> None:
            framed = FramedStream(stream, max_payload=proto.max_request)
            peer = framed.peer
            write_lock = trio.Lock()

            async def reply(
                header: Mapping[str, Any], payload: bytes | bytearray | memoryview = b""
            ) -> None:
                async with write_lock:
                    await framed.send(header, payload)

            async def serve_one(call_id: int, request: Message) -> None:
                try:
                    with trio.fail_after(proto.timeout):
                        answer = await handler(peer, request)
                    if len(answer.payload) > proto.max_response:
                        raise RpcError(
                            "too_large", f"reply of {len(answer.payload)} bytes is over the limit"
                        )
                    await reply({"t": "ok", "i": call_id, "b": dict(answer.body)}, answer.payload)
                except RpcError as exc:
                    await _try(reply, {"t": "err", "i": call_id, "c": exc.code, "m": exc.message})
                except trio.TooSlowError:
                    log.warning("call from %s on %s timed out", peer, proto.id)
                    message = f"call took over {proto.timeout}s"
                    await _try(reply, {"t": "err", "i": call_id, "c": "timeout", "m": message})
                except Exception:
                    log.exception("handler for %s failed on a call from %s", proto.id, peer)
                    message = "the handler failed; see the node's log"
                    await _try(reply, {"t": "err", "i": call_id, "c": "internal", "m": message})
                finally:
                    slots.release()

            async def read_calls(calls: trio.Nursery) -> None:
                while True:
                    with trio.move_on_after(proto.idle_timeout):
                        frame = await framed.receive()
                        if frame is None:
                            return
                        call_id = frame.header.get("i")
                        if frame.type != "req" or not isinstance(call_id, int):
                            raise FrameError(
                                f"expected a 'req' frame with an id, got {frame.type!r}"
                            )
                        try:
                            slots.acquire_nowait()
                        except trio.WouldBlock:
                            message = f"{proto.id} is serving its maximum of calls; retry later"
                            await reply({"t": "err", "i": call_id, "c": "busy", "m": message})
                            continue
                        calls.start_soon(serve_one, call_id, frame_message(frame))
                        continue
                    log.debug("closing an idle %s stream from %s", proto.id, peer)
                    return

            async def read_calls_or_fail(calls: trio.Nursery) -> None:
                # Errors are handled here, not around the nursery, which would wrap them
                # in an exception group.
                try:
                    await read_calls(calls)
                except (FrameTooLarge, FrameError) as exc:
                    log.warning(
                        "bad frame from %s on %s: %s; closing the stream", peer, proto.id, exc
                    )
                    code = "too_large" if isinstance(exc, FrameTooLarge) else "bad_frame"
                    await _try(reply, {"t": "err", "i": None, "c": code, "m": str(exc)[:1000]})
                except Exception as exc:  # reset, connection lost: the caller sees it there
                    log.debug("%s stream from %s broke: %r", proto.id, peer, exc)

            try:
                async with trio.open_nursery() as calls:
                    await read_calls_or_fail(calls)
            finally:
                await framed.aclose()

        self.host.set_stream_handler(proto.id, on_stream)
        if proto.bulk and self.bulk is not None:
            self.bulk.serve(proto.id, on_stream)

    # ---- calling ---------------------------------------------------------------------

    async def call(self, peer: ID, proto: ChannelProtocol, request: Message) -> Message:
        """One request, one reply, on the shared stream to ``peer``; raises
        :class:`RemoteError` (code ``timeout`` after ``proto.timeout``)."""
        if len(request.payload) > proto.max_request:
            raise RpcError(
                "too_large",
                f"request of {len(request.payload)} bytes exceeds {proto.id}'s limit "
                f"of {proto.max_request}",
            )
        with trio.move_on_after(proto.timeout):
            link, fresh = await self._link(peer, proto)
            try:
                return await link.call(request)
            except RemoteError as exc:
                if exc.code != "stream_broken" or fresh or not proto.idempotent:
                    raise
            link, _ = await self._link(peer, proto)
            return await link.call(request)
        raise RemoteError(str(peer), "timeout", f"{proto.id}: no reply within {proto.timeout}s")

    async def _link(self, peer: ID, proto: ChannelProtocol) -> tuple[_Link, bool]:
        key = (str(peer), proto.id)
        link = self._links.get(key)
        if link is not None and not link.closed:
            return link, False
        lock = self._opening.setdefault(key, trio.Lock())
        async with lock:
            link = self._links.get(key)
            if link is not None and not link.closed:
                return link, False
            try:
                stream = await self._open(peer, proto)
            except Exception as exc:
                raise open_failure(peer, proto.id, exc) from exc
            link = _Link(FramedStream(stream, max_payload=proto.max_response), proto)
            self._links[key] = link
            self.opened[proto.id] = self.opened.get(proto.id, 0) + 1
            self._nursery.start_soon(link.read_replies)
            if not self._sweeping:
                self._sweeping = True
                self._nursery.start_soon(self._close_idle)
            return link, True

    async def _open(self, peer: ID, proto: ChannelProtocol) -> INetStream | BulkStream:
        if proto.bulk and self.bulk is not None:
            return await self.bulk.open_or_libp2p(peer, proto.id)
        return await self.host.new_stream(peer, [proto.id])

    async def _close_idle(self) -> None:
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            for key, link in list(self._links.items()):
                if link.closed:
                    del self._links[key]
                elif not link.pending and now - link.last_used >= link.proto.idle_close:
                    del self._links[key]
                    link.closed = True
                    await link.framed.aclose()

    def carrier(self, peer: ID, proto: ChannelProtocol) -> str | None:
        """What carries the open stream to ``peer`` for ``proto``: "bulk", "libp2p", or
        None when none is open."""
        from shoal.transport.bulk import BulkStream  # (bulk.py imports this module)

        link = self._links.get((str(peer), proto.id))
        if link is None or link.closed:
            return None
        return "bulk" if isinstance(link.framed.stream, BulkStream) else "libp2p"

    def streams(self) -> int:
        """Open outgoing channel streams."""
        return sum(1 for link in self._links.values() if not link.closed)


async def _try(send: Any, header: Mapping[str, Any]) -> None:
    try:
        with trio.move_on_after(2):
            await send(header)
    except Exception:
        log.debug("could not send %s", header.get("c"), exc_info=True)
