"""Bulk byte streams beside libp2p, for tensors.

py-libp2p moves bytes through Noise and yamux in Python: about half of an all-reduce's
busy time went there (docs/collectives.md, "Where the time goes"). A bulk stream is a
plain TCP connection between the same two peers, opened on request over their libp2p
connection and sealed in large AEAD frames (AES-128-GCM where both peers' CPUs have AES
instructions, ChaCha20-Poly1305 otherwise), where the cipher and the socket do their work
in C.

Opening, ``opener`` to ``acceptor``:

1. the opener calls ``/shoal/bulk/1`` over libp2p (an authenticated, encrypted channel,
   behind the swarm's pre-shared key when there is one) naming a protocol the acceptor
   serves in bulk, and the ciphers it takes in its order of preference;
2. the acceptor answers a port, a single-use 16-byte token, a fresh 32-byte key and the
   cipher (AES-GCM only when both prefer it: it is 3-4x faster than ChaCha20-Poly1305
   with AES instructions, and several times slower without; AES-128 where both take it,
   1.4x AES-256's speed, else AES-256), and remembers the token for
   ``TOKEN_TTL`` seconds;
3. the opener connects to that port at the IP its libp2p connection reaches, and sends
   the token; the acceptor hands the stream to the protocol's handler. Where that port
   cannot be reached (the peer is behind a NAT, the libp2p connection was hole-punched),
   the opener asks again naming a port of its own and both ends dial each other at once
   from fresh ports (a TCP simultaneous open); the token goes first as before.

Only the two peers know the key, so a frame that decrypts came from the other one. Frames
are a 4-byte big-endian length, then the sealed bytes (at most ``FRAME`` plaintext bytes
each); the length is the associated data; the nonce is a direction byte and a counter, so
a replayed, reordered or dropped frame fails to decrypt (:class:`BulkError`).

A bulk stream exists only while its libp2p connection does: when the last libp2p
connection to the peer closes (a departure, a ban, a partition made by refusing the
peer), its bulk streams are closed too. Peers that cannot reach each other's bulk port
either way (a relayed connection, a symmetric NAT) keep using libp2p streams:
:meth:`Bulk.open` raises :class:`BulkUnavailable` and the caller falls back.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from libp2p.abc import INetConn, INetStream, INetwork
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from shoal.transport.backoff import Backoff
from shoal.transport.channel import ChannelProtocol
from shoal.transport.circuit import conn_is_relayed
from shoal.transport.errors import BulkError, BulkUnavailable, RemoteError, RpcError
from shoal.transport.notifee import ConnectionNotifee
from shoal.transport.rpc import Message

if TYPE_CHECKING:
    # trio-typing's stale stubs (pulled in by libp2p) shadow trio's own types.
    from trio_typing import TaskStatus

    from shoal.transport.host import Host

log = logging.getLogger(__name__)

PROTOCOL = ChannelProtocol(name="bulk", max_request=1 << 10, max_response=1 << 10, timeout=10.0)
FRAME = 1 << 20  # plaintext bytes per sealed frame
TAG = 16  # the AEAD's tag bytes (GCM and Poly1305 alike)
TOKEN_TTL = 10.0
MAX_PENDING = 64  # tokens handed out and not used yet, per node
MAX_PENDING_PER_PEER = 8
MAX_UNAUTHENTICATED = 64  # connections still to send their token
CONNECT_TIMEOUT = 1.0  # (lost once to a NATed peer's bulk port, then it is punched)
PUNCH_TIMEOUT = 5.0  # a simultaneous open: a dropped SYN is sent again after 1 s, then 3 s
PUNCH_RETRY = 0.05  # after a reset (no NAT between: the other end was not listening yet)
UNREACHABLE_RETRY = 60.0  # first wait before a peer whose bulk port was unreachable is retried
_LENGTH = struct.Struct(">I")

BulkHandler = Callable[["BulkStream"], Awaitable[None]]
AES128, AES, CHACHA = "aes-128-gcm", "aes-256-gcm", "chacha20-poly1305"
#: each cipher from the 32-byte key the acceptor hands out (AES-128 takes its first half)
CIPHERS: dict[str, Callable[[bytes], AESGCM | ChaCha20Poly1305]] = {
    AES128: lambda key: AESGCM(key[:16]),
    AES: AESGCM,
    CHACHA: ChaCha20Poly1305,
}


def cpu_has_aes(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has AES instructions (x86 ``aes`` flag, ARMv8 ``aes`` feature), from
    /proc/cpuinfo; False where that cannot be read (ChaCha20 is the safe choice then)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read(1 << 16)
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features") and "aes" in value.split():
            return True
    return False


def preferred_ciphers() -> list[str]:
    return [AES128, AES, CHACHA] if cpu_has_aes() else [CHACHA]


def choose_cipher(offered: object, mine: list[str]) -> str:
    """The acceptor's choice: AES-GCM when both sides put an AES-GCM first (AES-128 when
    both take it: an opener from before it offers AES-256 only), else ChaCha20 (also for
    an opener that offers nothing: it predates the choice)."""
    aes = (AES128, AES)
    if (
        isinstance(offered, list)
        and offered[:1]
        and offered[0] in aes
        and mine[:1]
        and mine[0] in aes
    ):
        for cipher in aes:
            if cipher in offered and cipher in mine:
                return cipher
    return CHACHA


class BulkStream:
    """One direction-sealed TCP stream to ``peer`` (``read``/``write``/``close``/``reset``,
    as a libp2p stream offers)."""

    def __init__(
        self,
        sock: trio.SocketStream,
        key: bytes,
        peer: ID,
        *,
        opener: bool,
        cipher: str = CHACHA,
        on_close: Callable[[BulkStream], None] = lambda stream: None,
    ) -> None:
        self.sock = sock
        self.peer = peer
        self.cipher = cipher
        self._aead = CIPHERS[cipher](key)
        self._send_dir, self._recv_dir = (0, 1) if opener else (1, 0)
        self._sent = 0
        self._received = 0
        self._pending: bytes | bytearray = b""
        self._send_lock = trio.Lock()
        self.muxed_conn = _PeerOf(peer)  # what users of a libp2p stream read of it
        # one sealed frame each way, reused (length prefix, ciphertext, tag), grown to the
        # largest frame seen: a stream of small messages does not hold 2 MiB
        self._wbuf = bytearray()
        self._rbuf = bytearray()
        self._on_close = on_close

    def _nonce(self, direction: int, counter: int) -> bytes:
        return bytes([direction, 0, 0, 0]) + counter.to_bytes(8, "big")

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        await self.write_parts((data,))

    async def write_parts(self, parts: Iterable[bytes | bytearray | memoryview]) -> None:
        """Write ``parts`` in turn, each sealed on its own (a frame's header, then its
        payload: the payload is encrypted from where it lies, and the reader can decrypt
        it straight into its own buffer, :meth:`read_into`)."""
        async with self._send_lock:
            for part in parts:
                view = memoryview(part).cast("B")
                for start in range(0, len(view), FRAME):
                    piece = view[start : start + FRAME]
                    self._wbuf = _grow(self._wbuf, _LENGTH.size + len(piece) + TAG)
                    out = memoryview(self._wbuf)[: _LENGTH.size + len(piece) + TAG]
                    _LENGTH.pack_into(out, 0, len(piece) + TAG)
                    nonce = self._nonce(self._send_dir, self._sent)
                    self._aead.encrypt_into(nonce, piece, out[: _LENGTH.size], out[_LENGTH.size :])
                    self._sent += 1
                    await self._send_all(out)
                await trio.lowlevel.checkpoint()  # (the writes above may not have yielded)

    async def read(self, max_bytes: int = FRAME) -> bytes | bytearray:
        """Up to ``max_bytes`` plaintext bytes; empty at the end of the stream."""
        if not self._pending:
            size = await self._next_frame()
            if size is None:
                return b""
            self._pending = bytearray(size)
            self._open(self._pending)
        if len(self._pending) <= max_bytes:
            out, self._pending = self._pending, b""
            return out
        out, self._pending = self._pending[:max_bytes], self._pending[max_bytes:]
        return out

    async def read_into(self, buffer: memoryview) -> int:
        """Read up to ``len(buffer)`` plaintext bytes into ``buffer``; a frame that fits is
        decrypted there directly (no copy). 0 at the end of the stream."""
        if not self._pending:
            size = await self._next_frame()
            if size is None:
                return 0
            if size <= len(buffer):
                self._open(buffer[:size])
                return size
            self._pending = bytearray(size)
            self._open(self._pending)
        count = min(len(buffer), len(self._pending))
        buffer[:count] = memoryview(self._pending)[:count]
        self._pending = self._pending[count:]
        return count

    async def _next_frame(self) -> int | None:
        """Read the next sealed frame into the read buffer: its plaintext size, None at a
        clean end of stream."""
        self._rbuf = _grow(self._rbuf, _LENGTH.size)
        head = memoryview(self._rbuf)[: _LENGTH.size]
        if not await self._fill(head, eof_ok=True):
            return None
        (size,) = _LENGTH.unpack(head)
        if not TAG < size <= FRAME + TAG:  # checked before anything is allocated
            raise BulkError(f"bulk frame of {size} bytes from {self.peer} (limit {FRAME + TAG})")
        self._rbuf = _grow(self._rbuf, _LENGTH.size + size)
        await self._fill(memoryview(self._rbuf)[_LENGTH.size : _LENGTH.size + size], eof_ok=False)
        await trio.lowlevel.checkpoint()  # (the reads above may not have yielded)
        return size - TAG

    def _open(self, out: bytearray | memoryview) -> None:
        """Authenticate and decrypt the frame in the read buffer into ``out`` (its size)."""
        head = memoryview(self._rbuf)[: _LENGTH.size]
        sealed = memoryview(self._rbuf)[_LENGTH.size : _LENGTH.size + len(out) + TAG]
        nonce = self._nonce(self._recv_dir, self._received)
        try:
            self._aead.decrypt_into(nonce, sealed, head, out)
        except InvalidTag:
            raise BulkError(f"a bulk frame from {self.peer} failed authentication") from None
        self._received += 1

    async def _fill(self, view: memoryview, *, eof_ok: bool) -> bool:
        """Fill ``view`` from the socket; False at a clean end of stream before any byte.

        Reads straight from the descriptor while it has data, and waits with trio only
        when it has none: trio's own ``recv_into`` yields to the scheduler after every
        call, which cost a 1 MiB frame dozens of scheduler rounds."""
        got = 0
        while got < len(view):
            fd = self._fd()
            try:
                count = os.readv(fd, [view[got:]])
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            if not count:
                if eof_ok and got == 0:
                    return False
                raise BulkError(f"bulk stream from {self.peer} ended inside a frame")
            got += count
        return True

    async def _send_all(self, data: memoryview) -> None:
        """``sock.send_all`` without a scheduler round per partial send (see :meth:`_fill`)."""
        sent = 0
        while sent < len(data):
            fd = self._fd()
            try:
                sent += os.write(fd, data[sent:])
            except BlockingIOError:
                await trio.lowlevel.wait_writable(fd)

    def _fd(self) -> int:
        """The socket's descriptor; checked on every use, so a stream closed meanwhile
        raises instead of touching a descriptor number the OS may have handed out again."""
        fd = self.sock.socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the bulk stream was closed")
        return fd

    async def close(self) -> None:
        self._on_close(self)
        await self.sock.aclose()

    async def reset(self) -> None:
        await self.close()


def _grow(buffer: bytearray, size: int) -> bytearray:
    """``buffer``, or a copy of it grown to the next power of two (at most one sealed
    frame) when it holds fewer than ``size`` bytes."""
    if len(buffer) >= size:
        return buffer
    grown = bytearray(min(1 << (size - 1).bit_length(), _LENGTH.size + FRAME + TAG))
    grown[: len(buffer)] = buffer
    return grown


@dataclass(frozen=True)
class _PeerOf:
    peer_id: ID


@dataclass
class _Pending:
    peer: ID
    protocol: str
    key: bytes
    cipher: str
    expires: float


@dataclass(frozen=True)
class _Grant:
    """What an acceptor answers an opener: where to connect, the token, key and cipher,
    and the port it dials back from when asked to punch."""

    port: int
    token: bytes
    key: bytes
    cipher: str
    punch: int | None


class Bulk:
    """Bulk streams of one host: its listener, the handlers it serves, the streams open."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.port = 0
        self._handlers: dict[str, BulkHandler] = {}
        self._pending: dict[bytes, _Pending] = {}
        self._streams: dict[ID, set[BulkStream]] = {}
        # Peers whose bulk port neither a connect nor a punch reached: not tried again
        # until the backoff allows (a punch can fail on timing alone) or they reconnect.
        self._unreachable: Backoff[ID] = Backoff(base=UNREACHABLE_RETRY, cap=30 * 60.0)
        self._punched: set[ID] = set()  # reached by punching: skip the listener
        self._nursery: trio.Nursery | None = None  # the acceptor's dial-backs
        self._punching: dict[ID, int] = {}  # dial-backs running, per peer
        self._unauthenticated = 0
        #: The ciphers this host takes, in its order of preference.
        self.ciphers = preferred_ciphers()
        #: Streams opened by this side, per protocol (for tests and status).
        self.opened: dict[str, int] = {}

    def serve(self, protocol: str, handler: BulkHandler) -> None:
        self._handlers[protocol] = handler

    def unserve(self, protocol: str) -> None:
        self._handlers.pop(protocol, None)

    async def open(self, peer: ID, protocol: str) -> BulkStream:
        """A bulk stream to ``peer`` for ``protocol``; :class:`BulkUnavailable` when the
        peer cannot be reached that way (the caller uses a libp2p stream instead).

        The opener connects to the peer's bulk port; when that is unreachable (the peer
        is behind a NAT: the libp2p connection was hole-punched), both ends dial each
        other at once from fresh ports instead (a TCP simultaneous open, as DCUtR does
        for libp2p), and the next streams to the peer go that way at once."""
        if not self._unreachable.ready(peer, trio.current_time()):
            raise BulkUnavailable(f"{peer}'s bulk port was unreachable before")
        ip = self._direct_ip(peer)
        if ip is None:
            raise BulkUnavailable(f"no direct IPv4 TCP connection to {peer}")
        if peer not in self._punched:
            grant = await self._request(peer, protocol)
            try:
                with trio.fail_after(CONNECT_TIMEOUT):
                    sock = await trio.open_tcp_stream(ip, grant.port)
            except (OSError, trio.TooSlowError) as exc:
                why = str(exc) or f"no answer in {CONNECT_TIMEOUT} s"
                log.info("%s's bulk port %s:%d: %s; punching", peer, ip, grant.port, why)
            else:
                return await self._opened(sock, peer, protocol, grant)
        local = await _bound_socket(self._listen_ip())
        try:
            grant = await self._request(peer, protocol, punch=local.getsockname()[1])
            if grant.punch is None:  # an acceptor from before punching
                self._unreachable.failed(peer, trio.current_time())
                raise BulkUnavailable(f"{peer}'s bulk port is unreachable and it does not punch")
            sock = await _simultaneous_open(
                local, (ip, grant.punch), trio.current_time() + PUNCH_TIMEOUT
            )
        except (OSError, trio.TooSlowError) as exc:
            local.close()
            self._unreachable.failed(peer, trio.current_time())
            raise BulkUnavailable(f"no bulk stream to {peer}, punched or not: {exc}") from exc
        except BaseException:
            local.close()
            raise
        self._punched.add(peer)
        self._unreachable.succeeded(peer)
        return await self._opened(sock, peer, protocol, grant)

    async def _request(self, peer: ID, protocol: str, *, punch: int | None = None) -> _Grant:
        """Ask ``peer`` for a bulk stream (a token and key), checking what it answers."""
        body: dict[str, object] = {"t": "open", "proto": protocol, "ciphers": self.ciphers}
        if punch is not None:
            body["punch"] = punch
        try:
            reply = await self.host.channels.call(peer, PROTOCOL, Message(body))
        except RemoteError as exc:
            raise BulkUnavailable(f"{peer} opened no bulk stream: {exc}") from exc
        port, token, key = (reply.body.get(k) for k in ("port", "token", "key"))
        cipher = reply.body.get("cipher", CHACHA)
        their_punch = reply.body.get("punch")
        if cipher not in CIPHERS or cipher not in self.ciphers:
            raise BulkUnavailable(f"{peer} answered a cipher not offered: {str(cipher)[:40]!r}")
        if not _is_port(port):
            raise BulkUnavailable(f"{peer} answered a bad bulk port {port!r}")
        if not (isinstance(token, bytes) and len(token) == 16):
            raise BulkUnavailable(f"{peer} answered a bad bulk token")
        if not (isinstance(key, bytes) and len(key) == 32):
            raise BulkUnavailable(f"{peer} answered a bad bulk key")
        if their_punch is not None and not _is_port(their_punch):
            raise BulkUnavailable(f"{peer} answered a bad punch port {their_punch!r}")
        return _Grant(port, token, key, str(cipher), their_punch)

    async def _opened(
        self, sock: trio.SocketStream, peer: ID, protocol: str, grant: _Grant
    ) -> BulkStream:
        try:
            await sock.send_all(grant.token)
        except (OSError, trio.BrokenResourceError) as exc:
            await sock.aclose()
            raise BulkUnavailable(f"{peer}'s bulk port closed on its token: {exc}") from exc
        except BaseException:
            sock.socket.close()
            raise
        self.opened[protocol] = self.opened.get(protocol, 0) + 1
        return self._stream(sock, grant.key, peer, opener=True, cipher=grant.cipher)

    async def open_or_libp2p(self, peer: ID, protocol: str) -> BulkStream | INetStream:
        """A bulk stream to ``peer`` where it can be had, else a libp2p stream (the
        fallback every user of bulk streams takes)."""
        try:
            return await self.open(peer, protocol)
        except BulkUnavailable as exc:
            log.info("%s to %s over libp2p: %s", protocol, peer, exc)
        return await self.host.libp2p.new_stream(peer, [TProtocol(protocol)])

    def _direct_ip(self, peer: ID) -> str | None:
        """The IPv4 address of a direct libp2p connection to ``peer`` (the bulk listener
        and punch sockets are IPv4)."""
        for conn in self.host.libp2p.get_network().connections.get(peer, ()):
            if conn_is_relayed(conn):
                continue
            remote = conn.muxed_conn.get_remote_address()
            if remote and ":" not in str(remote[0]):
                return str(remote[0])
        return None

    def _stream(
        self, sock: trio.SocketStream, key: bytes, peer: ID, *, opener: bool, cipher: str
    ) -> BulkStream:
        """A stream tracked (for :meth:`_close_peer`) until it closes."""

        def untrack(stream: BulkStream) -> None:
            self._streams.get(peer, set()).discard(stream)

        stream = BulkStream(sock, key, peer, opener=opener, cipher=cipher, on_close=untrack)
        self._streams.setdefault(peer, set()).add(stream)
        return stream

    async def _close_peer(self, peer: ID) -> None:
        for stream in self._streams.pop(peer, set()):
            with trio.CancelScope(shield=True):
                try:
                    await stream.close()
                except Exception:  # (called from a libp2p notifee: never raise there)
                    log.debug("closing a bulk stream to %s failed", peer, exc_info=True)

    # ---- the acceptor ----------------------------------------------------------------

    async def _on_open(self, peer: ID, request: Message) -> Message:
        protocol = request.body.get("proto")
        if not isinstance(protocol, str) or protocol not in self._handlers:
            raise RpcError("unsupported_protocol", f"no bulk handler for {str(protocol)[:80]!r}")
        punch = request.body.get("punch")
        if punch is not None and not _is_port(punch):
            raise RpcError("bad_request", f"bad punch port {str(punch)[:20]!r}")
        now = time.monotonic()
        for token in [t for t, p in self._pending.items() if p.expires < now]:
            del self._pending[token]
        mine = sum(1 for p in self._pending.values() if p.peer == peer)
        if len(self._pending) >= MAX_PENDING or mine >= MAX_PENDING_PER_PEER:
            raise RpcError("busy", "too many bulk streams being opened; use libp2p")
        token, key = os.urandom(16), os.urandom(32)
        cipher = choose_cipher(request.body.get("ciphers"), self.ciphers)
        reply = {"port": self.port, "token": token, "key": key, "cipher": cipher}
        if punch is not None:
            ip = self._direct_ip(peer)
            if ip is None or self._nursery is None:
                raise RpcError("unavailable", "no direct connection to punch through")
            mine = self._punching.get(peer, 0)
            if sum(self._punching.values()) >= MAX_PENDING or mine >= MAX_PENDING_PER_PEER:
                raise RpcError("busy", "too many bulk punches running; use libp2p")
            # Dialing back only ever goes to the IP the opener's own connection comes from.
            dialer = await _bound_socket(self._listen_ip(), reuse_port=True)
            port = dialer.getsockname()[1]
            try:
                listener = await _bound_socket(self._listen_ip(), port, listen=True)
            except BaseException:
                dialer.close()
                raise
            reply["punch"] = port
            self._punching[peer] = mine + 1
            deadline = trio.current_time() + PUNCH_TIMEOUT
            self._nursery.start_soon(
                self._punch_back, dialer, listener, (ip, punch), deadline, peer
            )
        self._pending[token] = _Pending(peer, protocol, key, cipher, now + TOKEN_TTL)
        return Message(reply)

    async def _punch_back(
        self,
        dialer: trio.socket.SocketType,
        listener: trio.socket.SocketType,
        remote: tuple[str, int],
        deadline: float,
        peer: ID,
    ) -> None:
        """The acceptor's half of a punch: dial the opener from the punch port and, on the
        same port, take its dial if it arrives first (where nothing filters, as on a LAN,
        its SYN meets the listener instead of a reset). The stream then goes as one that
        arrived at the bulk listener: its token first."""
        won: list[trio.SocketStream] = []
        try:
            async with trio.open_nursery() as race:

                async def dial() -> None:
                    try:
                        won.append(await _simultaneous_open(dialer, remote, deadline))
                    except trio.TooSlowError:
                        pass
                    except OSError:
                        # Resets to the end, or the 4-tuple taken: the listener's
                        # accepted connection (the race's other half) is the stream.
                        await trio.sleep_until(deadline)
                    race.cancel_scope.cancel()

                async def accept() -> None:
                    while True:
                        try:
                            sock, address = await listener.accept()
                        except OSError as exc:  # (out of descriptors): the dial goes on
                            log.info("bulk punch port of %s: %s", peer, exc)
                            return
                        if tuple(address[:2]) == remote:
                            won.append(trio.SocketStream(sock))
                            race.cancel_scope.cancel()
                            return
                        sock.close()  # someone else found the port

                race.start_soon(dial)
                race.start_soon(accept)
                race.cancel_scope.deadline = deadline
        finally:
            listener.close()  # (the dialer is _simultaneous_open's: the stream's, or closed)
            self._punching[peer] -= 1
            if not self._punching[peer]:
                del self._punching[peer]
        if not won:
            log.info("bulk punch from %s at %s:%d: no connection", peer, *remote)
            return
        for extra in won[1:]:
            await extra.aclose()
        await self._on_connection(won[0])

    async def _on_connection(self, sock: trio.SocketStream) -> None:
        if self._unauthenticated >= MAX_UNAUTHENTICATED:
            log.info(
                "bulk connection refused: %d others still owe their token", MAX_UNAUTHENTICATED
            )
            await sock.aclose()
            return
        self._unauthenticated += 1
        try:
            with trio.fail_after(TOKEN_TTL):
                token = bytearray()
                while len(token) < 16:
                    chunk = await sock.receive_some(16 - len(token))
                    if not chunk:
                        raise BulkError("closed before its token")
                    token += chunk
        except (BulkError, trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
            log.info("bulk connection without a token: %s", exc)
            await sock.aclose()
            return
        finally:
            self._unauthenticated -= 1
        pending = self._pending.pop(bytes(token), None)
        now = time.monotonic()
        if pending is None or pending.expires < now or pending.peer in self.host.refused:
            log.info("bulk connection with an unknown or expired token: closed")
            await sock.aclose()
            return
        if not self.host.is_connected(pending.peer):  # gone since: nothing would close it
            log.info("bulk connection from %s, no longer connected: closed", pending.peer)
            await sock.aclose()
            return
        handler = self._handlers.get(pending.protocol)
        stream = self._stream(sock, pending.key, pending.peer, opener=False, cipher=pending.cipher)
        try:
            if handler is not None:
                await handler(stream)
        except Exception:  # a handler's bug ends its stream, never the listener (the host)
            log.exception("bulk handler for %s from %s failed", pending.protocol, pending.peer)
        finally:
            with trio.CancelScope(shield=True):
                await stream.close()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen (on the IP of the host's first IPv4 listen address, any port) and serve
        until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host=self._listen_ip())
        self.port = listeners[0].socket.getsockname()[1]
        notifee = _Closer(self)
        self.host.libp2p.get_network().register_notifee(notifee)
        self.host.channels.serve(PROTOCOL, self._on_open)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.serve_listeners(self._on_connection, listeners)
        finally:
            self._nursery = None
            notifee.active = False
            for peer in list(self._streams):
                await self._close_peer(peer)

    def _listen_ip(self) -> str:
        for addr in self.host.listen_addrs():
            parts = addr.split("/")
            if len(parts) > 2 and parts[1] == "ip4":
                return parts[2]
        return "127.0.0.1"


class _Closer(ConnectionNotifee):
    """Closes a peer's bulk streams when its last libp2p connection closes."""

    def __init__(self, bulk: Bulk) -> None:
        self.bulk = bulk
        self.active = True

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        if self.active and not network.connections.get(peer):
            await self.bulk._close_peer(peer)

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        if not conn_is_relayed(conn):  # a new direct path: try the listener again
            self.bulk._unreachable.succeeded(conn.muxed_conn.peer_id)
            self.bulk._punched.discard(conn.muxed_conn.peer_id)


def _is_port(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


async def _bound_socket(
    ip: str, port: int = 0, *, reuse_port: bool = False, listen: bool = False
) -> trio.socket.SocketType:
    """A TCP socket bound to ``ip:port`` (port 0: a fresh one), to dial from;
    ``reuse_port``: one that may share its port with a listener; ``listen``: that
    listener (it shares the port too)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        # Rebinding the port after a refused attempt (nothing lingers: never connected).
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        if reuse_port or listen:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
        await sock.bind((ip, port))
        if listen:
            sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


async def _simultaneous_open(
    sock: trio.socket.SocketType, remote: tuple[str, int], deadline: float
) -> trio.SocketStream:
    """Connect ``sock`` to ``remote``, which dials us back at the same time.

    Through NATs each end's SYN opens its own NAT's mapping and the other's SYN passes
    it (a SYN dropped before that is sent again by the kernel). Without a NAT between
    them, a SYN that arrives before the other end dials is answered with a reset: try
    again, from the same port, until ``deadline`` (trio's clock). Consumes ``sock``.
    """
    ip, port = sock.getsockname()[:2]
    reuse_port = bool(sock.getsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT))
    try:
        while True:
            try:
                with trio.fail_at(deadline):
                    await sock.connect(remote)
                return trio.SocketStream(sock)
            except (ConnectionRefusedError, ConnectionResetError):
                sock.close()
                if trio.current_time() + PUNCH_RETRY >= deadline:
                    raise
                await trio.sleep(PUNCH_RETRY)
                sock = await _bound_socket(ip, port, reuse_port=reuse_port)
    except BaseException:
        sock.close()
        raise


__all__ = ["FRAME", "PROTOCOL", "Bulk", "BulkError", "BulkStream", "BulkUnavailable"]
