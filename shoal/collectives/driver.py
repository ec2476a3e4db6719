"""The trio/libp2p I/O shell that runs the sans-io collectives among real peers.

:class:`CollectivesDriver` owns one :class:`~shoal.collectives.mux.Collectives` (the
operations of this peer, by tag) and the streams that carry their messages:

- **Streams.** One long-lived libp2p stream per peer and direction on
  ``/shoal/allreduce/1``: this peer writes every message for peer P on the stream it
  opened to P (a writer task drains P's outbox in order), and reads P's messages on the
  stream P opened to it. A message is one frame (:mod:`shoal.transport.framing`), written
  with one ``write`` call (yamux slices it; no extra copy of the payload here) and read
  with :class:`FrameDecoder`, whose payload limit is the largest ``max_message_bytes`` of
  the operations in flight (or ``max_early_frame`` while none is): sizes are checked
  before anything is allocated.
- **Events.** Every call into the machines (``start``, ``contribute``, ``receive``,
  ``peer_failed``, ``deadline``) runs under one lock, in arrival order per stream; frames
  of at least ``thread_threshold`` bytes and contributions (decode, reduce, encode,
  hashes) run on a worker thread (``trio.to_thread.run_sync``), so reading and writing
  other streams go on meanwhile. A reader waiting for the lock stops reading its stream,
  which is the backpressure (yamux windows) that bounds memory.
- **Failure detection.** A stream reset, EOF, closed connection, a failed write or open,
  or a frame that breaks the framing becomes ``peer_failed(peer)``. Deadlines: while an
  operation is unfinished and neither a message for it nor any byte from anyone arrived
  for ``deadline`` seconds, its ``deadline()`` is called (the machine escalates: direct
  waits first, then owners and coordinator, then :class:`Stalled`); ``timeout`` bounds
  the whole operation.
- **Retention.** A finished operation keeps serving ``FETCH`` for peers still gathering
  for ``retain`` seconds, then is forgotten when the next operation starts.

Use::

    async with open_collectives(host) as driver:
        result = await driver.all_reduce(view, tensor)    # raises OperationFailed

Peer ids are the libp2p ids as strings (``str(host.peer_id)``); the view's members must
be reachable through the host's peerstore (connected, or with known addresses).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import trio
from libp2p.abc import INetConn, INetStream, INetwork
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from shoal.collectives.allreduce import AllReduce, AllReduceResult, Send
from shoal.collectives.codec import check_contribution
from shoal.collectives.errors import (
    CollectiveError,
    MalformedMessage,
    MessageTooLarge,
    Stalled,
)
from shoal.collectives.mux import Collectives, Operation
from shoal.collectives.star import StarAllReduce
from shoal.collectives.view import View
from shoal.kernels import native
from shoal.transport.buffers import BufferPool
from shoal.transport.bulk import Bulk, BulkStream
from shoal.transport.errors import FrameError, FrameTooLarge
from shoal.transport.framing import DEFAULT_MAX_HEADER, FrameDecoder
from shoal.transport.host import ConnectionNotifee, Host

if TYPE_CHECKING:
    # trio-typing's stale stubs (pulled in by libp2p) shadow trio's own types.
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

PROTOCOL = TProtocol("/shoal/allreduce/1")
READ_SIZE = 1 << 20
# control messages after which a machine may re-reduce a chunk (AMEND) or assemble the
# whole result (CHOSEN, the last REPL_ACK/CHUNK_DONE on small groups)
_HEAVY = frozenset({"AMEND", "CHOSEN", "RCOMMIT", "REPL_ACK", "SRESULT"})

#: Called with (destination, the frame's length prefix and header) just before a frame is
#: written (instrumentation and fault-injection tests; it must not block).
SendHook = Callable[[str, bytes], None]


@dataclass(frozen=True, kw_only=True)
class DriverConfig:
    """Timing and size limits of the driver.

    deadline: seconds without a message for an operation (and without any byte from any
        peer) before its ``deadline()`` event; each one lets the machine suspect whoever
        it waits on.
    timeout: upper bound on one operation, from start to outcome.
    retain: seconds a finished operation keeps answering FETCH for slower peers.
    thread_threshold: frames at least this large are handled on a worker thread.
    max_early_frame: frame limit while no operation is running (messages for an operation
        this peer has not started yet are buffered by the mux, within its own limits).
    open_timeout: seconds to open a stream to a peer before it counts as failed.
    bulk: carry frames over bulk streams (:mod:`shoal.transport.bulk`: TCP sealed with
        AES-GCM or ChaCha20-Poly1305 beside the libp2p connection) where the peer is
        reachable that way; libp2p streams otherwise.
    """

    deadline: float = 10.0
    timeout: float = 600.0
    retain: float = 60.0
    thread_threshold: int = 256 * 1024
    max_early_frame: int = 64 << 20
    open_timeout: float = 10.0
    bulk: bool = True


@dataclass(slots=True)
class _Running:
    op: Operation
    done: trio.Event = field(default_factory=trio.Event)
    last_message: float = 0.0
    finished_at: float | None = None


class _Outbox:
    """Frames for one peer, written in order by one writer task."""

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.send, self.receive = trio.open_memory_channel[Send](math.inf)
        self.dead = False
        self.bytes_queued = 0
        self.written = trio.Event()  # set while nothing is queued (or the peer is gone)

    def mark_dead(self) -> None:
        self.dead = True
        self.written.set()


class CollectivesDriver:
    """Runs collective operations over a :class:`Host`. Start :meth:`run` in a nursery
    (or use :func:`open_collectives`), then call :meth:`all_reduce`."""

    def __init__(
        self,
        host: Host,
        config: DriverConfig | None = None,
        *,
        before_send: SendHook | None = None,
    ) -> None:
        self.host = host
        self.config = config or DriverConfig()
        self.me = str(host.peer_id)
        self.mux = Collectives(self.me)
        self.before_send = before_send
        self.bytes_sent = 0
        self.bytes_received = 0
        self._lock = trio.Lock()
        self._running: dict[str, _Running] = {}
        self._outboxes: dict[str, _Outbox] = {}
        self._failed: set[str] = set()
        self._last_byte = 0.0
        self._nursery: trio.Nursery | None = None
        self._bulk: Bulk | None = None
        self._buffers = BufferPool()  # payloads, reused once the machines let go of them
        #: Streams opened to peers, by kind ("bulk", "libp2p"): for tests and status.
        self.opened: dict[str, int] = {}

    # ------------------------------------------------------------------ service

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the protocol until cancelled; closes the streams this peer opened."""
        network = self.host.libp2p.get_network()
        notifee = _DisconnectNotifee(self)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.config.bulk and self.host.bulk is not None:
                    self._bulk = self.host.bulk
                    self._bulk.serve(PROTOCOL, self._on_stream)
                self.host.libp2p.set_stream_handler(PROTOCOL, self._on_stream)
                network.register_notifee(notifee)
                task_status.started()
                # build (or load) the native chunk kernels now, not in a first operation
                await trio.to_thread.run_sync(native.chunk_kernels)
                while True:  # receive buffers idle for a while go back to the OS
                    await trio.sleep(5.0)
                    self._buffers.trim()
        finally:
            self._nursery = None
            if self._bulk is not None:
                self._bulk.unserve(PROTOCOL)
                self._bulk = None
            self.host.libp2p.remove_stream_handler(PROTOCOL)
            notifee.active = False

    async def all_reduce(
        self,
        view: View,
        tensor: torch.Tensor | None,
        *,
        star: bool = False,
        leader: str | None = None,
        out: torch.Tensor | None = None,
    ) -> AllReduceResult:
        """Run one operation of ``view`` with this peer's contribution (``None``: take
        part without one). Returns the result every completing peer holds (in ``out``
        when given: see :class:`AllReduce`); raises the operation's
        :class:`OperationFailed`, or :class:`BadContribution` at once for a bad local
        tensor (nothing is sent then)."""
        if star and out is not None:
            raise CollectiveError("a star all-reduce returns a new tensor (no out=)")
        op: AllReduce | StarAllReduce = (
            StarAllReduce(view, self.me, leader=leader)
            if star
            else AllReduce(view, self.me, out=out, alloc=self._buffers.take)
        )
        if tensor is None:
            if isinstance(op, StarAllReduce):
                raise CollectiveError("a star all-reduce member must contribute")
            return await self.run_operation(op, op.abstain)
        if isinstance(op, StarAllReduce):
            check_contribution(self.me, tensor, view.shape, view.codec)  # raises before anything
            return await self.run_operation(op, lambda: op.contribute(tensor))
        await trio.to_thread.run_sync(op.prepare, tensor)  # checks and encodes; raises first
        return await self.run_operation(op, op.contribute)

    async def run_operation(
        self, op: Operation, begin: Callable[[], list[Send]]
    ) -> AllReduceResult:
        """Register ``op`` (replaying what arrived early for it), call ``begin`` on a worker
        thread (normally its ``contribute``), and drive it to its outcome."""
        tag = op.view.tag
        async with self._lock:
            self._prune()
            if tag in self._running:
                raise CollectiveError(f"operation {tag!r} is already running here")
            running = _Running(op, last_message=trio.current_time())
            self._running[tag] = running
            sends = self.mux.start(tag, op)
            sends += await trio.to_thread.run_sync(begin)
            self._dispatch(sends)
        await self._wait(tag, running)
        if op.result is None:
            assert op.error is not None
            raise op.error
        return op.result

    def send_nowait(self, sends: list[Send]) -> None:
        """Queue frames built outside a machine (tools, and tests that craft bad ones)."""
        self._dispatch(sends)

    async def drain(self, seconds: float = 5.0) -> None:
        """Wait (at most ``seconds``) until every queued frame to a live peer is written:
        a peer that leaves right after its last operation still delivers its final
        messages (a star leader's result, the coordinator's CHOSEN)."""
        with trio.move_on_after(seconds):
            for box in list(self._outboxes.values()):
                await box.written.wait()

    def operation(self, tag: str) -> Operation | None:
        """The operation ``tag`` (running or retained), for its rejections and outcome."""
        running = self._running.get(tag)
        return running.op if running else None

    async def _wait(self, tag: str, running: _Running) -> None:
        cfg = self.config
        with trio.move_on_after(cfg.timeout) as overall:
            while not running.op.finished:
                with trio.move_on_after(cfg.deadline):
                    await running.done.wait()
                    return
                now = trio.current_time()
                quiet = now - max(running.last_message, self._last_byte)
                if quiet >= cfg.deadline:
                    running.last_message = now
                    log.info("%s: deadline on %r after %.1fs of silence", self.me, tag, quiet)
                    await self._event(running.op.deadline, thread=True)
        if overall.cancelled_caught and not running.op.finished:
            async with self._lock:
                running.op.error = Stalled(tag, f"no outcome within {cfg.timeout}s")
                self._finish_check()

    def _prune(self) -> None:
        now = trio.current_time()
        for tag, running in list(self._running.items()):
            t = running.finished_at
            if t is not None and now - t >= self.config.retain:
                del self._running[tag]
                self.mux.forget(tag)

    # ------------------------------------------------------------------ events

    async def _event(self, action: Callable[[], list[Send]], *, thread: bool = False) -> None:
        """Run one machine event under the lock (on a worker thread when asked), then
        hand its messages to the outboxes and wake finished operations."""
        async with self._lock:
            if thread:
                sends = await trio.to_thread.run_sync(action)
            else:
                sends = action()
            self._dispatch(sends)

    def _dispatch(self, sends: list[Send]) -> None:
        for send in sends:
            box = self._outboxes.get(send.to)
            if box is None:
                box = self._outboxes[send.to] = _Outbox(send.to)
                if self._nursery is None:
                    raise CollectiveError("the collectives driver is not running")
                self._nursery.start_soon(self._write_loop, box)
            if not box.dead:
                box.bytes_queued += send.nbytes
                if box.written.is_set():
                    box.written = trio.Event()
                box.send.send_nowait(send)
        self._finish_check()

    def _finish_check(self) -> None:
        now = trio.current_time()
        for running in self._running.values():
            if running.op.finished and not running.done.is_set():
                running.finished_at = now
                running.done.set()

    async def _readmit(self, peer: str) -> None:
        """A failed peer connected again (restarted with its identity): later operations
        may count on it; a fresh outbox opens a new stream to it."""
        if peer not in self._failed:
            return
        async with self._lock:
            self._failed.discard(peer)
            self.mux.readmit(peer)
            box = self._outboxes.get(peer)
            if box is not None and box.dead:
                del self._outboxes[peer]
        log.info("%s: peer %s is back; later operations count on it", self.me, peer)

    async def _peer_failed(self, peer: str, why: str) -> None:
        if peer in self._failed or peer == self.me:
            return
        self._failed.add(peer)
        box = self._outboxes.get(peer)
        if box is not None:
            box.mark_dead()
        log.info("%s: peer %s failed: %s", self.me, peer, why)
        await self._event(lambda: self.mux.peer_failed(peer), thread=True)

    # ------------------------------------------------------------------ writing

    async def _open(self, peer: str) -> INetStream | BulkStream:
        """A bulk stream to ``peer`` where it can be had, else a libp2p stream."""
        peer_id = ID.from_base58(peer)
        stream: INetStream | BulkStream
        if self._bulk is not None:
            stream = await self._bulk.open_or_libp2p(peer_id, PROTOCOL)
        else:
            stream = await self.host.libp2p.new_stream(peer_id, [PROTOCOL])
        kind = "bulk" if isinstance(stream, BulkStream) else "libp2p"
        self.opened[kind] = self.opened.get(kind, 0) + 1
        return stream

    async def _write_loop(self, box: _Outbox) -> None:
        stream: INetStream | BulkStream | None = None
        try:
            with trio.fail_after(self.config.open_timeout):
                stream = await self._open(box.peer)
            async for send in box.receive:
                if box.dead:
                    continue
                if self.before_send is not None:
                    self.before_send(box.peer, send.head)
                if isinstance(stream, BulkStream):
                    await stream.write_parts((send.head, send.payload))
                else:
                    await stream.write(send.head)
                    if send.payload:
                        await stream.write(send.payload)
                box.bytes_queued -= send.nbytes
                self.bytes_sent += send.nbytes
                if not box.bytes_queued:
                    box.written.set()
        except (Exception, trio.TooSlowError) as exc:
            box.mark_dead()
            await self._peer_failed(box.peer, f"write failed: {exc!r}")
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    try:
                        await stream.close()
                    except Exception:
                        log.debug("closing the stream to %s failed", box.peer, exc_info=True)

    # ------------------------------------------------------------------ reading

    def _frame_limit(self) -> int:
        limits = [r.op.max_message_bytes for r in self._running.values()]
        return max([self.config.max_early_frame, *limits])

    async def _on_stream(self, stream: INetStream | BulkStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        decoder = FrameDecoder(
            max_header=DEFAULT_MAX_HEADER,
            max_payload=self._frame_limit(),
            allocate=self._buffers.take,
        )
        why = "stream ended"
        try:
            while True:
                decoder.max_payload = self._frame_limit()
                frame = decoder.next_frame()
                if frame is None:
                    if not await self._read_some(stream, decoder):
                        decoder.feed_eof()
                        break
                    continue
                tag = frame.header.get("o")
                running = self._running.get(tag) if isinstance(tag, str) else None
                if running is not None:
                    running.last_message = trio.current_time()
                # big payloads and messages that may reduce or assemble chunks go to a thread
                heavy = len(frame.payload) >= self.config.thread_threshold or frame.type in _HEAVY
                await self._event(
                    lambda f=frame: self.mux.receive_frame(peer, f.header, f.payload),  # type: ignore[misc]
                    thread=heavy,
                )
        except FrameTooLarge as exc:
            why = f"frame over the limit: {exc}"
            self.mux.rejections.append(MessageTooLarge(peer, exc.size, exc.limit))
        except FrameError as exc:
            why = f"bad frame: {exc}"
            self.mux.rejections.append(MalformedMessage(peer, str(exc)))
        except Exception as exc:  # reset, connection lost
            why = f"stream broke: {exc!r}"
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await stream.reset()
                except Exception:
                    log.debug("resetting the stream from %s failed", peer, exc_info=True)
        await self._peer_failed(peer, why)

    async def _read_some(self, stream: INetStream | BulkStream, decoder: FrameDecoder) -> bool:
        """Read what the frame in progress needs: a bulk stream decrypts a payload straight
        into the decoder's buffer; other reads are fed to it. False at the end of stream."""
        space = decoder.payload_space()
        if space is not None and isinstance(stream, BulkStream):
            count = await stream.read_into(space)
            if count:
                decoder.filled(count)
        else:
            try:
                data = await stream.read(max(READ_SIZE, decoder.wanted()))
            except EOFError:
                data = b""
            count = len(data)
            if count:
                decoder.feed(data)
        if count:
            self.bytes_received += count
            self._last_byte = trio.current_time()
        return count > 0


class _DisconnectNotifee(ConnectionNotifee):
    """Reports a peer whose last connection closed, and one that connected again."""

    def __init__(self, driver: CollectivesDriver) -> None:
        self.driver = driver
        self.active = True

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        if self.active:
            await self.driver._readmit(str(conn.muxed_conn.peer_id))

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        if self.active and not network.connections.get(peer):
            await self.driver._peer_failed(str(peer), "connection closed")


@asynccontextmanager
async def open_collectives(
    host: Host, config: DriverConfig | None = None, *, before_send: SendHook | None = None
) -> AsyncIterator[CollectivesDriver]:
    """A running :class:`CollectivesDriver` on ``host``; stopped (its streams closed) on exit."""
    driver = CollectivesDriver(host, config, before_send=before_send)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        try:
            yield driver
            await driver.drain()
        finally:
            nursery.cancel_scope.cancel()


__all__ = ["PROTOCOL", "CollectivesDriver", "DriverConfig", "open_collectives"]
