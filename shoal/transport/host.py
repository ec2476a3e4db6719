"""Open a py-libp2p host the way shoal needs it: TCP + Noise + Yamux, workarounds applied.

``open_host(config)`` is an async context manager that owns the host. Workarounds from
design/libp2p-notes.md applied here:

1. the fixed 250 ms wait after every dial (``_HAPPY_EYEBALLS_DELAY``) is set to 0;
2. the host is closed explicitly on every exit path, shielded from cancellation and
   bounded in time, with connections closed in parallel (py-libp2p closes them one at a
   time at 0.1-0.2 s each);
3. libp2p's loggers are routed into ours and quietened;
4. only Noise and Yamux are offered (py-libp2p's defaults also offer plaintext and secio);
5. its built-in AutoConnector is off and its 60 s negative dial cache is cleared before
   each explicit dial: shoal.transport.peering decides when to (re)dial, with backoff;
6. yamux frames are capped at Noise's largest plaintext, so a full frame is one Noise
   message instead of two (bug 10; +28-40 % bulk throughput, docs/benchmarks.md);
7. gossipsub runs with its spam limit off and a 1 s heartbeat (bugs 6, 7), and lives
   inside the host: connections are closed while pubsub still runs, because py-libp2p's
   pubsub handlers run in the connections' tasks and fail ("nursery is closed") when a
   message arrives after the pubsub service stopped;
8. a dial cancelled mid-upgrade closes its TCP socket (py-libp2p leaked it);
9. yamux credits a stream's window in batches (``PY_YAMUX_RELEASE_ON_READ=0``, go-yamux's
   rule) instead of one WINDOW_UPDATE frame per read: gossipsub reads a varint a byte at a
   time, so every received message cost the sender's side several frames (idle daemons
   used 10 % of a core each, 6.5 % with this; bulk throughput unchanged,
   docs/benchmarks.md);
10. a connection on which opening a stream timed out in protocol negotiation 3 times in
    a row is closed (peering dials the peer again): py-libp2p can leave a connection
    whose far side no longer accepts streams, and then every stream opened on it waits
    10 s and fails;
11. gossipsub speaks v1.1 only: py-libp2p's v1.2 sends an IDONTWANT control message, as an
    RPC of its own, to every mesh peer for every message received, whatever its size
    (go-libp2p only above 1 KiB): in a 32-node swarm, 64 % of the RPCs a node received;
12. the signed peer record that py-libp2p's gossipsub attaches to every RPC is verified
    once per peer and record, not at every RPC (an Ed25519 check each), and the record a
    host sends is rebuilt at most once a second, not per RPC (it listed the host's
    addresses each time): together 15-20 % of a busy node's time;
13. gossipsub's inbound streams are read through a buffer: py-libp2p reads each RPC's
    varint length a byte at a time, and each of those reads went through yamux's locks.
14. an explicit dial of a full address dials that address: py-libp2p dials at most one
    address per transport class, the first it stored, so a peer's stale address (a
    restart on a new port, remembered in the peer book) shadowed the one the user gave,
    and every dial failed.

The host also carries shoal's two call paths: ``rpc`` (a stream per call) and
``channels`` (calls multiplexed on one long-lived stream per peer and protocol).
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum

import libp2p.network.swarm as _libp2p_swarm
import libp2p.pubsub.gossipsub as _libp2p_gossipsub
import libp2p.pubsub.pubsub as _libp2p_pubsub
import libp2p.stream_muxer.yamux.yamux as _libp2p_yamux
import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork
from libp2p.connection_types import ConnectionType
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.host.exceptions import StreamFailure
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.protocol_muxer.exceptions import MultiselectClientError
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH as _NOISE_MAX_PLAINTEXT
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from shoal.transport.bulk import Bulk
from shoal.transport.channel import Channels
from shoal.transport.circuit import dial_circuit, is_circuit_addr
from shoal.transport.errors import DialError
from shoal.transport.logs import route_libp2p_logs
from shoal.transport.notifee import ConnectionNotifee
from shoal.transport.rpc import Rpc

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/4001"
CLOSE_TIMEOUT = 3.0

# Workaround 1: py-libp2p waits 250 ms after the last address of every dial, even when
# the dial already succeeded (libp2p-notes.md, bug 2). Process-wide by nature.
_libp2p_swarm._HAPPY_EYEBALLS_DELAY = 0.0

# Workaround 6: a full yamux frame (65536 B) is 17 B over Noise's largest plaintext
# (65519 B), so each went out as two Noise messages (libp2p-notes.md, bug 10). yamux reads
# the constant at every write; smaller frames are always valid for the peer.
_libp2p_yamux.MAX_MESSAGE_SIZE = _NOISE_MAX_PLAINTEXT

# Workaround 8: a dial cancelled while its connection is being upgraded or registered
# (a lookup's timeout, a host closing) leaks the TCP socket: py-libp2p's cleanup awaits
# ``close()`` in the cancelled scope, the await raises Cancelled before the socket is
# closed, and nothing else holds the connection. Close the raw connection shielded.
_upgrade_outbound = _libp2p_swarm.Swarm.upgrade_outbound_raw_conn


async def _upgrade_outbound_closing_on_failure(  # type: ignore[no-untyped-def]
    self, raw_conn, peer_id, pre_scope=None
):
    try:
        return await _upgrade_outbound(self, raw_conn, peer_id, pre_scope)
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await raw_conn.close()
            except Exception:
                log.debug("closing a failed dial's connection failed", exc_info=True)
        raise


_libp2p_swarm.Swarm.upgrade_outbound_raw_conn = _upgrade_outbound_closing_on_failure

# Workaround 10: close connections on which stream negotiation keeps timing out.
# Only after STUCK_AFTER timeouts in a row with no stream opened in between: an
# overloaded peer also times out now and then, and closing its connections at the first
# timeout fed a loop (redials, gossipsub replaying its recent messages to the "new"
# peer, more load, more timeouts) that kept a 32-node swarm saturated.
_new_stream = BasicHost.new_stream
STUCK_AFTER = 3
_timeouts: dict[tuple[int, ID], int] = {}


async def _new_stream_dropping_stuck_connections(  # type: ignore[no-untyped-def]
    self, peer_id, protocol_ids
):
    key = (id(self), peer_id)
    try:
        stream = await _new_stream(self, peer_id, protocol_ids)
    except StreamFailure as exc:
        if isinstance(exc.__cause__, MultiselectClientError) and "timed out" in str(exc.__cause__):
            _timeouts[key] = _timeouts.get(key, 0) + 1
            if _timeouts[key] >= STUCK_AFTER:
                del _timeouts[key]
                conns = list(self.get_network().get_connections(peer_id))
                log.info(
                    "stream negotiation with %s timed out %d times in a row: closing %d "
                    "connection(s)",
                    peer_id,
                    STUCK_AFTER,
                    len(conns),
                )
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    for conn in conns:
                        await _close_quietly(conn)
        raise
    _timeouts.pop(key, None)
    return stream


BasicHost.new_stream = _new_stream_dropping_stuck_connections

# gossipsub's mesh: each node receives every message about ``GOSSIP_DEGREE`` times. shoal's
# only topic is the swarm state, which anti-entropy pulls repair, so a sparse mesh is
# enough; at go-libp2p's D=6 an idle 32-node swarm in 4 processes kept both cores of a
# 2-core machine busy moving heartbeats (docs/state.md).
GOSSIP_DEGREE = 3
GOSSIP_DEGREE_LOW = 2
GOSSIP_DEGREE_HIGH = 6

# Workaround 12: verify a peer's signed record once, and build our own once a second.
_consume_signed_record = _libp2p_pubsub.maybe_consume_signed_record
_record_to_send = _libp2p_pubsub.env_to_send_in_RPC
_records_seen: weakref.WeakKeyDictionary[object, dict[ID, bytes]] = weakref.WeakKeyDictionary()
_records_sent: weakref.WeakKeyDictionary[object, tuple[float, tuple[bytes, bool]]] = (
    weakref.WeakKeyDictionary()
)
RECORD_REBUILD_EVERY = 1.0
MAX_RECORDS_SEEN = 4096


def _consume_signed_record_once(msg, host, peer_id) -> bool:  # type: ignore[no-untyped-def]
    if not msg.HasField("senderRecord"):
        return True
    seen = _records_seen.setdefault(host, {})
    if seen.get(peer_id) == msg.senderRecord:
        return True
    ok: bool = _consume_signed_record(msg, host, peer_id)
    if ok:
        if len(seen) >= MAX_RECORDS_SEEN:
            seen.clear()
        seen[peer_id] = msg.senderRecord
    return ok


def _record_to_send_cached(host) -> tuple[bytes, bool]:  # type: ignore[no-untyped-def]
    now = time.monotonic()
    cached = _records_sent.get(host)
    if cached is not None and now - cached[0] < RECORD_REBUILD_EVERY:
        return cached[1]
    record: tuple[bytes, bool] = _record_to_send(host)
    _records_sent[host] = (now, record)
    return record


for _module in (_libp2p_pubsub, _libp2p_gossipsub):
    _module.maybe_consume_signed_record = _consume_signed_record_once
    _module.env_to_send_in_RPC = _record_to_send_cached


# Workaround 13: buffer gossipsub's inbound reads.
PUBSUB_READ_AHEAD = 64 * 1024


class _BufferedReads:
    """A stream whose reads are served from a read-ahead buffer; all else is the stream's."""

    def __init__(self, stream: INetStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)

    async def read(self, n: int | None = None) -> bytes:
        if not self._buffer:
            chunk = await self._stream.read(PUBSUB_READ_AHEAD)
            if not chunk:
                return b""
            self._buffer += chunk
        if n is None or n < 0 or n > len(self._buffer):
            n = len(self._buffer)
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out


_pubsub_stream_handler = Pubsub.stream_handler


async def _pubsub_stream_handler_buffered(self, stream) -> None:  # type: ignore[no-untyped-def]
    await _pubsub_stream_handler(self, _BufferedReads(stream))


Pubsub.stream_handler = _pubsub_stream_handler_buffered

# Workaround 9: py-libp2p's yamux sends a WINDOW_UPDATE after every read by default
# (``RELEASE_ON_READ``); it reads this variable at each read. An operator's own setting wins.
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")


class Reachability(StrEnum):
    """Whether other peers can open a fresh connection to this node."""

    UNKNOWN = "unknown"
    PUBLIC = "public"
    PRIVATE = "private"


@dataclass(frozen=True, kw_only=True)
class HostConfig:
    """What a host listens on and who it is.

    key_pair: the node's Ed25519 identity (see identity.py).
    listen: multiaddrs to listen on; ``/ip4/127.0.0.1/tcp/0`` picks a free port.
    announce: addresses to advertise instead of the listen addresses (e.g. a public IP
        behind a port forward); empty means advertise what we listen on.
    psk: a private swarm's pre-shared key as 64 hex digits (libp2p pnet), or None.
    dial_timeout: seconds one dial may take before it counts as failed.
    bulk: run bulk streams (shoal.transport.bulk: a second TCP port, for tensors); off,
        every protocol uses libp2p streams.
    """

    key_pair: KeyPair
    listen: Sequence[str] = (DEFAULT_LISTEN,)
    announce: Sequence[str] = ()
    psk: str | None = None
    dial_timeout: float = 5.0
    bulk: bool = True


@dataclass(frozen=True, slots=True)
class PeerLink:
    """One connected peer as seen from this node."""

    peer_id: str
    addrs: tuple[str, ...]
    relayed: bool


@dataclass
class Host:
    """A running libp2p host plus shoal's RPC endpoint on it."""

    libp2p: IHost
    config: HostConfig
    rpc: Rpc
    channels: Channels
    pubsub: Pubsub
    reachability: Reachability = Reachability.UNKNOWN
    # Addresses through relays that this node advertises while it is not reachable.
    relayed_addrs: list[str] = field(default_factory=list)
    # Peers refused in both directions (bans, operator-cut links, partition tests).
    refused: set[ID] = field(default_factory=set)
    # Bulk streams beside the libp2p connections (tensors; shoal.transport.bulk).
    bulk: Bulk | None = None

    def __post_init__(self) -> None:
        self.libp2p.get_network().register_notifee(_RefuseNotifee(self))

    @property
    def peer_id(self) -> ID:
        return self.libp2p.get_id()

    def listen_addrs(self) -> list[str]:
        """Full multiaddrs (with /p2p/<id>) this host listens on."""
        return [_with_peer_id(a, self.peer_id) for a in self.libp2p.get_addrs()]

    def advertised_addrs(self) -> list[str]:
        """The addresses other peers should use to reach this node."""
        if self.config.announce:
            addrs = [
                _with_peer_id(multiaddr.Multiaddr(a), self.peer_id) for a in self.config.announce
            ]
        else:
            addrs = expand_wildcards(self.listen_addrs())
        return addrs + list(self.relayed_addrs)

    async def connect(self, addr: str) -> ID:
        """Dial a full multiaddr (ending in /p2p/<id>) and return the peer's id."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            raise DialError(addr, f"not a valid multiaddr with /p2p/<peer id>: {exc}") from exc
        if info.peer_id == self.peer_id:
            raise DialError(addr, "that is this node's own address")
        if info.peer_id in self.refused:
            raise DialError(addr, "this node refuses that peer")
        if is_circuit_addr(addr):
            return await self._connect_via_relay(addr, info.peer_id)
        # Our callers pace their retries; py-libp2p's negative cache would otherwise refuse
        # every dial to a peer for 60 s after one failure, e.g. a bootstrap node restarting.
        self.libp2p.get_network().unblock_peer(info.peer_id)
        if not self.is_connected(info.peer_id):  # workaround 14
            self.libp2p.get_peerstore().clear_addrs(info.peer_id)
        try:
            with trio.fail_after(self.config.dial_timeout):
                await self.libp2p.connect(info)
        except trio.TooSlowError as exc:
            raise DialError(addr, f"no answer within {self.config.dial_timeout}s") from exc
        except Exception as exc:
            raise DialError(addr, str(exc) or type(exc).__name__) from exc
        return info.peer_id

    async def _connect_via_relay(self, addr: str, peer: ID) -> ID:
        # py-libp2p's swarm skips /p2p-circuit addresses when dialing (see circuit.py).
        if self.is_connected(peer):
            return peer
        try:
            with trio.fail_after(self.config.dial_timeout):
                return await dial_circuit(self.libp2p, addr)
        except trio.TooSlowError as exc:
            raise DialError(
                addr, f"no relayed connection within {self.config.dial_timeout}s"
            ) from exc

    async def refuse(self, peers: set[ID]) -> None:
        """Cut every connection to ``peers`` and refuse new ones, both ways, until admitted."""
        self.refused |= peers
        for peer in peers:
            if self.is_connected(peer):
                await self.libp2p.disconnect(peer)

    def admit(self, peers: set[ID]) -> None:
        self.refused -= peers

    def is_connected(self, peer: ID) -> bool:
        return bool(self.libp2p.get_network().connections.get(peer))

    def connected_peers(self) -> set[str]:
        """Ids of the peers with a connection (cheap: for loops that poll it)."""
        return {str(p) for p, conns in self.libp2p.get_network().connections.items() if conns}

    def links(self) -> list[PeerLink]:
        """Connected peers; a peer counts as direct when any connection to it is direct."""
        out = []
        for peer, conns in self.libp2p.get_network().connections.items():
            if not conns:
                continue
            relayed = all(_is_relayed(c) for c in conns)
            addrs = tuple(str(a) for c in conns for a in _conn_addrs(c))
            out.append(PeerLink(str(peer), addrs, relayed))
        return sorted(out, key=lambda link: link.peer_id)


class _RefuseNotifee(ConnectionNotifee):
    """Closes a new connection from a refused peer as soon as it is established."""

    def __init__(self, host: Host) -> None:
        self.host = host

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        if peer in self.host.refused:
            log.info("refusing connection from %s", peer)
            await conn.close()


def _is_relayed(conn: object) -> bool:
    kind = getattr(conn, "get_connection_type", lambda: ConnectionType.DIRECT)()
    if kind == ConnectionType.RELAYED:
        return True
    return any("p2p-circuit" in str(a) for a in _conn_addrs(conn))


def _conn_addrs(conn: object) -> list[multiaddr.Multiaddr]:
    try:
        return list(conn.get_transport_addresses())  # type: ignore[attr-defined]
    except Exception:
        return []


def advertised_multiaddrs(host: Host) -> list[multiaddr.Multiaddr]:
    """:meth:`Host.advertised_addrs` as multiaddrs (for records that carry them)."""
    return [multiaddr.Multiaddr(a) for a in host.advertised_addrs()]


def _with_peer_id(addr: multiaddr.Multiaddr, peer: ID) -> str:
    text = str(addr)
    if "/p2p/" in text:
        return text
    return f"{text}/p2p/{peer}"


def expand_wildcards(addrs: Sequence[str]) -> list[str]:
    """Replace 0.0.0.0 in listen addresses with this machine's interface addresses."""
    out: list[str] = []
    for addr in addrs:
        if "/ip4/0.0.0.0/" not in addr:
            out.append(addr)
            continue
        for ip in local_ipv4_addresses():
            out.append(addr.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/"))
    return out


def local_ipv4_addresses() -> list[str]:
    """This machine's IPv4 addresses, non-loopback first, loopback last."""
    import ifaddr

    ips = [
        str(ip.ip)
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if isinstance(ip.ip, str)
    ]
    return sorted(set(ips), key=lambda ip: (ip.startswith("127."), ip))


def build_libp2p_host(config: HostConfig) -> IHost:
    key_pair = config.key_pair
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_ID: noise},
        muxer_opt={TProtocol(YAMUX_ID): Yamux},
        psk=config.psk,
        connection_config=ConnectionConfig(dial_timeout=config.dial_timeout),
        enable_mDNS=False,
        enable_upnp=False,
    )
    # py-libp2p 0.8.1's AutoConnector dials up to 200 peers from the peerstore whenever
    # there are fewer than 100 connections, with its own cooldowns and INFO logging.
    # shoal.transport.peering owns connection upkeep (with backoff it can test), so the
    # built-in one is switched off.
    host.get_network().auto_connector.maybe_connect = _no_auto_connect
    return host


async def _no_auto_connect() -> None:
    return None


@asynccontextmanager
async def open_host(config: HostConfig) -> AsyncIterator[Host]:
    """Start a host listening on ``config.listen``; closed on every exit path."""
    route_libp2p_logs()
    libp2p_host = build_libp2p_host(config)
    listen = [multiaddr.Multiaddr(a) for a in config.listen]
    router = GossipSub(
        [PROTOCOL_ID_V11],  # workaround 11
        degree=GOSSIP_DEGREE,
        degree_low=GOSSIP_DEGREE_LOW,
        degree_high=GOSSIP_DEGREE_HIGH,
        heartbeat_interval=1,
        spam_protection_enabled=False,
    )
    pubsub = Pubsub(libp2p_host, router)
    async with libp2p_host.run(listen):
        try:
            async with (
                background_trio_service(pubsub),
                background_trio_service(router),
                trio.open_nursery() as channel_tasks,
            ):
                await pubsub.wait_until_ready()
                host = Host(
                    libp2p=libp2p_host,
                    config=config,
                    rpc=Rpc(libp2p_host),
                    channels=Channels(libp2p_host, channel_tasks),
                    pubsub=pubsub,
                )
                if config.bulk:
                    host.bulk = Bulk(host)
                    await channel_tasks.start(host.bulk.run)
                    host.channels.bulk = host.bulk
                log.info("listening on %s", ", ".join(host.listen_addrs()))
                try:
                    yield host
                finally:
                    await close_host(libp2p_host)  # while pubsub still runs (workaround 7)
                    channel_tasks.cancel_scope.cancel()
        finally:
            await close_host(libp2p_host)  # idempotent; covers a failed pubsub start


async def close_host(libp2p_host: IHost) -> None:
    """Close connections in parallel, then the host; shielded and bounded (workaround 2)."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT) as scope:
        network = libp2p_host.get_network()
        conns = [c for cs in list(network.connections.values()) for c in cs]
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(_close_quietly, conn)
        await libp2p_host.close()
    if scope.cancelled_caught:
        log.warning("closing the libp2p host took over %ss; gave up waiting", CLOSE_TIMEOUT)


async def _close_quietly(conn: object) -> None:
    try:
        await conn.close()  # type: ignore[attr-defined]
    except Exception:
        log.debug("closing a connection failed", exc_info=True)
