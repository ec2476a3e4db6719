"""NAT traversal for a node: dial-back reachability, relay reservations, hole punching.

:class:`NatService` runs beside a :class:`~shoal.transport.host.Host` for its lifetime::

    async with open_host(config) as host:
        await nursery.start(NatService(host, relay_hop=public_node).run)

What it does, and what it relies on from py-libp2p 0.8.1 (design/libp2p-notes.md, Q3):

- **Reachability** comes from our own dial-back check (dialback.py), not py-libp2p's
  AutoNAT: a directly connected peer opens a *brand-new* connection to us and runs the
  Noise handshake expecting our peer id. Results set ``host.reachability``.
- **Relay (hop) service** with ``relay_hop=True``: py-libp2p's ``CircuitV2Protocol``.
  Every node runs its STOP side, so it can accept relayed connections.
- **Reservations**: while PRIVATE, the node keeps slots on up to ``relays_wanted``
  relays (peers whose identify lists the HOP protocol, or connected peers that accept a
  reservation) and publishes ``<relay>/p2p-circuit/p2p/<self>`` in ``host.relayed_addrs``.
- **Hole punching**: py-libp2p's ``DCUtRProtocol(dial_timeout=2)``, driven from here
  only from the inbound end of a relayed connection (as the spec says), never from both
  ends at once. When the punch fails, the relayed connection stays and carries traffic.

Policies (when to check, whom to ask, which relays, retries) live in nat_logic.py.
Importing this module fixes a socket leak in py-libp2p's hole-punch dial and quietens the
relay's logs (both process-wide, see below); docs/nat.md lists every py-libp2p quirk met.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import libp2p.transport.tcp.tcp as _libp2p_tcp
import trio
from libp2p.abc import INetConn, INetwork
from libp2p.peer.id import ID
from libp2p.rcmgr import Direction
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.tools.anyio_service import background_trio_service
from libp2p.transport.exceptions import OpenConnectionError
from multiaddr import Multiaddr

from shoal.transport.backoff import Backoff
from shoal.transport.circuit import HOP_PROTOCOL, conn_is_relayed, reserve
from shoal.transport.dialback import DialbackServer, call_dialback
from shoal.transport.errors import DialError, RelayError, RemoteError
from shoal.transport.host import ConnectionNotifee, Host, Reachability
from shoal.transport.nat_logic import (
    CheckSchedule,
    PunchBook,
    PunchOutcome,
    ReachabilityTracker,
    RelayBook,
    Slot,
    choose_dialback_peer,
    initiates_punch,
)

if TYPE_CHECKING:
    # trio-typing's stale stubs (pulled in by libp2p) shadow trio's own types.
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)


async def _open_tcp_stream_from(host: str, port: int, source: tuple[str, int]) -> trio.SocketStream:
    """py-libp2p's hole-punch dial (TCP from our listen port), closing its socket on
    every failure. The original closes it only on OSError, so each punch dial that DCUtR
    cancels once another dial has won leaks a socket to the garbage collector."""
    if (":" in source[0]) != (":" in host):
        raise OpenConnectionError(f"source/destination IP family mismatch: {source} vs {host}")
    sock = trio.socket.socket(trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET)
    try:
        _libp2p_tcp._set_reuse_flags(sock)
        try:
            await sock.bind(source)
        except OSError:
            # As the original: no shared listen port here (e.g. macOS), so no punching,
            # but the direct dial still works from an ephemeral port.
            sock.close()
            return await trio.open_tcp_stream(host, port)
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise  # an OSError becomes py-libp2p's OpenConnectionError one level up
    return trio.SocketStream(sock)


_libp2p_tcp._open_tcp_stream_from = _open_tcp_stream_from


@dataclass(frozen=True, kw_only=True)
class NatConfig:
    """Timings and limits of NAT traversal; the defaults suit a WAN swarm.

    dialback_timeout: seconds one fresh dial + handshake may take on the asked peer.
    check_interval: seconds between reachability checks once the answer is known.
    check_min_gap: at least this long between two checks.
    confirmations: ask a new peer for a second opinion until this many peers vouch.
    result_ttl: seconds a dial-back result counts.
    ask_cooldown: do not ask the same peer again within this many seconds.
    relays_wanted: reservations a PRIVATE node keeps.
    reservation_refresh_margin: refresh a reservation this long before it expires.
    punch_dial_timeout: DCUtR's per-dial timeout (py-libp2p's 10 s default wastes 10 s
        per punch on SYNs the NAT drops; libp2p-notes.md bug 5).
    punch_timeout: upper bound on one whole hole-punch attempt.
    punch_quick_retries / punch_quick_delay: the first failures in a row are retried
        this soon (a punch can fail on timing alone).
    punch_retry / punch_retry_cap: backoff after the quick retries failed too.
    relay_*: limits of the hop service when this node relays for others.
    tick: how often state is re-examined when no connection event wakes us.
    """

    dialback_timeout: float = 3.0
    check_interval: float = 600.0
    check_min_gap: float = 10.0
    confirmations: int = 2
    result_ttl: float = 1800.0
    ask_cooldown: float = 300.0
    relays_wanted: int = 2
    reservation_refresh_margin: float = 300.0
    punch_dial_timeout: int = 2
    punch_timeout: float = 60.0
    punch_quick_retries: int = 2
    punch_quick_delay: float = 3.0
    punch_retry: float = 60.0
    punch_retry_cap: float = 1800.0
    relay_max_reservations: int = 128
    relay_max_circuits_per_peer: int = 16
    relay_circuit_duration: int = 3600
    relay_circuit_bytes: int = 1 << 30
    tick: float = 1.0


class NatService:
    """Keeps ``host.reachability`` and ``host.relayed_addrs`` true, and punches holes."""

    def __init__(self, host: Host, *, relay_hop: bool, config: NatConfig | None = None) -> None:
        self.host = host
        self.relay_hop = relay_hop
        self.config = cfg = config or NatConfig()
        self._tracker = ReachabilityTracker(ttl=cfg.result_ttl)
        self._schedule = CheckSchedule(
            interval=cfg.check_interval,
            min_gap=cfg.check_min_gap,
            confirmations=cfg.confirmations,
            retry=Backoff(base=2.0, cap=120.0),
        )
        self._asked: dict[str, float] = {}  # peer -> when it last gave a conclusive answer
        self._ask_backoff: Backoff[str] = Backoff(base=5.0, cap=600.0)
        self._dialback = DialbackServer(
            host, dial_seconds=cfg.dialback_timeout, min_interval=cfg.check_min_gap / 2
        )
        self._relays = RelayBook(
            want=cfg.relays_wanted,
            refresh_margin=cfg.reservation_refresh_margin,
            backoff=Backoff(base=2.0, cap=300.0),
        )
        self._relay_addrs: dict[str, tuple[str, ...]] = {}  # relays we held a slot on
        self._punches = PunchBook(
            backoff=Backoff(base=cfg.punch_retry, cap=cfg.punch_retry_cap),
            quick_retries=cfg.punch_quick_retries,
            quick_delay=cfg.punch_quick_delay,
        )
        self._wake_check, self._wake_relays, self._wake_punch = _Wakeup(), _Wakeup(), _Wakeup()

    # ---- what others may read -------------------------------------------------------

    def punches(self) -> dict[str, PunchOutcome]:
        """Hole punches this node initiated, by peer id."""
        return self._punches.outcomes()

    def reservations(self) -> list[Slot]:
        return self._relays.slots(trio.current_time())

    def addresses_settled(self) -> bool:
        """Whether the addresses this node advertises are what they will be for now: its
        reachability is known and, when private, it holds a relayed address or no
        connected peer offers to relay (so none is coming)."""
        reachability = self.host.reachability
        if reachability is Reachability.UNKNOWN:
            return False
        if reachability is Reachability.PUBLIC or self.host.relayed_addrs:
            return True
        store = self.host.libp2p.get_peerstore()
        return not any(HOP_PROTOCOL in _protocols(store, p) for p in self._direct_peers())

    # ---- lifecycle ------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        libp2p = self.host.libp2p
        limits = RelayLimits(
            duration=cfg.relay_circuit_duration,
            data=cfg.relay_circuit_bytes,
            max_circuit_conns=cfg.relay_max_circuits_per_peer,
            max_reservations=cfg.relay_max_reservations,
        )
        relay = CircuitV2Protocol(libp2p, limits=limits, allow_hop=self.relay_hop)
        dcutr = _DCUtR(libp2p, dial_timeout=cfg.punch_dial_timeout)
        events = _ConnectionEvents(self._on_connections_changed)
        self._dialback.serve()
        libp2p.get_network().register_notifee(events)
        try:
            async with (
                background_trio_service(relay),
                background_trio_service(dcutr),
                trio.open_nursery() as nursery,
            ):
                nursery.start_soon(self._check_loop)
                nursery.start_soon(self._relay_loop)
                nursery.start_soon(self._punch_loop, dcutr, nursery)
                log.info("NAT traversal started%s", " (relaying for others)" * self.relay_hop)
                task_status.started()
        finally:
            libp2p.get_network().remove_notifee(events)

    def _on_connections_changed(self) -> None:
        self._wake_check.set()
        self._wake_relays.set()
        self._wake_punch.set()

    # ---- reachability: asking ---------------------------------------------------------

    async def _check_loop(self) -> None:
        seen: set[str] = set()
        while True:
            now = trio.current_time()
            peers = {str(p) for p in self._direct_peers()}
            if peers - seen:
                self._schedule.on_peer_connected(
                    now, confirmations=self._tracker.confirmations(now)
                )
            seen = peers
            if self._schedule.due(now):
                await self._check_once(sorted(peers), now)
            self._set_reachability(self._tracker.status(trio.current_time()))
            next_at = self._schedule.next_at
            with trio.move_on_after(60.0 if next_at is None else next_at - trio.current_time()):
                await self._wake_check.wait()

    async def _check_once(self, peers: list[str], now: float) -> None:
        candidates = [p for p in peers if self._ask_backoff.ready(p, now)]
        peer = choose_dialback_peer(candidates, self._asked, now, cooldown=self.config.ask_cooldown)
        if peer is None:
            if peers:
                self._schedule.on_checked(now, conclusive=False)
            else:
                self._schedule.on_no_peer()
            return
        try:
            with trio.fail_after(self.config.dialback_timeout + 5):
                answer = await call_dialback(
                    self.host, ID.from_base58(peer), dial_seconds=self.config.dialback_timeout
                )
        except trio.TooSlowError:
            answer = None
            log.info("reachability check with %s gave no answer in time", peer)
        except RemoteError as exc:
            answer = None
            log.info("reachability check with %s gave no answer: %s", peer, exc)
        if answer is None:
            self._ask_backoff.failed(peer, trio.current_time())
            self._schedule.on_checked(trio.current_time(), conclusive=False)
            return
        done = trio.current_time()
        self._asked[peer] = done
        self._ask_backoff.succeeded(peer)
        self._tracker.record(peer, reachable=answer.reachable, ip=answer.ip, now=done)
        self._schedule.on_checked(done, conclusive=True)
        log.info(
            "dial-back from %s: %s (%.1fs)",
            peer,
            f"reached us at {answer.ip}" if answer.reachable else "could not reach us",
            done - now,
        )

    def _set_reachability(self, status: Reachability) -> None:
        if status is self.host.reachability:
            return
        log.info("reachability: %s -> %s", self.host.reachability.value, status.value)
        self.host.reachability = status
        if status is Reachability.PRIVATE and self.relay_hop:
            log.warning(
                "this node relays for others but other peers cannot reach it; "
                "check the port forward / firewall of %s",
                ", ".join(self.host.listen_addrs()),
            )
        self._wake_relays.set()

    # ---- relays -----------------------------------------------------------------------

    async def _relay_loop(self) -> None:
        while True:
            now = trio.current_time()
            if self.host.reachability is Reachability.PRIVATE:
                for slot in self._relays.slots(now):
                    if not self.host.is_connected(ID.from_base58(slot.relay)):
                        log.info("lost the connection to relay %s", slot.relay)
                        self._relays.lost(slot.relay)
                for relay in self._relays.to_reserve(self._relay_candidates(), now):
                    await self._reserve_on(relay)
            else:
                self._relays.clear()
            now = trio.current_time()
            self.host.relayed_addrs = self._relays.relayed_addrs(str(self.host.peer_id), now)
            short = len(self._relays.slots(now)) < self._relays.want
            wake = self._relays.next_wake(now)
            if self.host.reachability is Reachability.PRIVATE and short:
                # Identify may reveal a relay among the connected peers at any moment.
                delay = self.config.tick
            else:
                delay = 60.0 if wake is None else min(60.0, wake - now)
            with trio.move_on_after(delay):
                await self._wake_relays.wait()

    def _relay_candidates(self) -> list[str]:
        """Known relays first (connected ones before others), then untested direct peers."""
        store = self.host.libp2p.get_peerstore()
        connected, untested = [], []
        for peer in self._direct_peers():
            protocols = _protocols(store, peer)
            if HOP_PROTOCOL in protocols:
                connected.append(str(peer))
            elif not protocols:  # identify has not run yet: trying costs one stream
                untested.append(str(peer))
        remembered = [r for r in self._relay_addrs if r not in connected]
        return connected + remembered + untested

    async def _reserve_on(self, relay: str) -> None:
        relay_id = ID.from_base58(relay)
        started = trio.current_time()
        try:
            if not self.host.is_connected(relay_id):
                await self._reconnect(relay)
            reservation = await reserve(self.host.libp2p, relay_id)
        except (DialError, RelayError) as exc:
            log.info("no reservation on %s: %s", relay, exc)
            self._relays.failed(relay, trio.current_time())
            return
        addrs = reservation.relay_addrs or tuple(self._dialed_addrs(relay_id))
        if not addrs:
            log.info("relay %s gave us a slot but no address to publish", relay)
            self._relays.failed(relay, trio.current_time())
            return
        self._relays.reserved(relay, expires_at=reservation.expires_at, addrs=addrs)
        self._relay_addrs[relay] = addrs
        log.info(
            "reserved a slot on relay %s in %.0f ms (expires in %.0f s)",
            relay,
            (trio.current_time() - started) * 1000,
            reservation.expires_at - trio.current_time(),
        )

    async def _reconnect(self, relay: str) -> None:
        errors = []
        for addr in self._relay_addrs.get(relay, ()):
            try:
                await self.host.connect(addr)
                return
            except DialError as exc:
                errors.append(exc.reason)
        raise DialError(relay, "; ".join(errors) or "no known address")

    def _dialed_addrs(self, peer: ID) -> Iterator[str]:
        """Addresses we dialed ``peer`` at (an outbound socket's remote end is its listener)."""
        for conn in self.host.libp2p.get_network().connections.get(peer, []):
            if conn_is_relayed(conn) or getattr(conn, "direction", None) != Direction.OUTBOUND:
                continue
            remote = conn.muxed_conn.get_remote_address()
            if remote:
                family = "ip6" if ":" in remote[0] else "ip4"
                yield f"/{family}/{remote[0]}/tcp/{remote[1]}/p2p/{peer}"

    # ---- hole punching ----------------------------------------------------------------

    async def _punch_loop(self, dcutr: DCUtRProtocol, nursery: trio.Nursery) -> None:
        self_id = str(self.host.peer_id)
        while True:
            now = trio.current_time()
            connections = self.host.libp2p.get_network().connections
            for peer, conns in list(connections.items()):
                relayed = [c for c in conns if conn_is_relayed(c)]
                if not relayed or len(relayed) < len(conns):
                    continue  # not connected, or already direct
                directions = {getattr(c, "direction", None) for c in relayed}
                initiate = initiates_punch(
                    self_id,
                    str(peer),
                    inbound=Direction.INBOUND in directions,
                    outbound=Direction.OUTBOUND in directions,
                )
                if initiate and self._punches.should_start(str(peer), now):
                    self._punches.started(str(peer), now)
                    nursery.start_soon(self._punch, dcutr, peer)
            for peer in self._punches.outcomes():
                if not connections.get(ID.from_base58(peer)):
                    self._punches.forget(peer)
            with trio.move_on_after(2 * self.config.tick):
                await self._wake_punch.wait()

    async def _punch(self, dcutr: DCUtRProtocol, peer: ID) -> None:
        direct = False
        started = trio.current_time()
        try:
            with trio.move_on_after(self.config.punch_timeout):
                direct = await dcutr.initiate_hole_punch(peer)
        except Exception:
            log.exception("hole punch to %s failed unexpectedly", peer)
        finally:
            self._punches.finished(str(peer), direct=direct, now=trio.current_time())
        log.info(
            "hole punch to %s: %s after %.1fs",
            peer,
            "direct connection" if direct else "failed, staying on the relay",
            trio.current_time() - started,
        )

    # ---- helpers ----------------------------------------------------------------------

    def _direct_peers(self) -> list[ID]:
        return [
            peer
            for peer, conns in self.host.libp2p.get_network().connections.items()
            if any(not conn_is_relayed(c) for c in conns)
        ]


def _protocols(store: object, peer: ID) -> list[str]:
    try:
        return list(store.get_protocols(peer))  # type: ignore[attr-defined]
    except Exception:  # PeerStoreError: nothing known about the peer yet
        return []


class _DCUtR(DCUtRProtocol):
    """DCUtR without py-libp2p's auto-drive loop: NatService decides who initiates."""

    async def _auto_drive_loop(self) -> None:
        # py-libp2p starts a punch from *both* ends of every relayed connection every
        # 2 s. Two concurrent sessions dial the same 4-tuple from the same listen ports
        # and can fail each other (EADDRNOTAVAIL, libp2p-notes.md bug 5).
        await trio.sleep_forever()

    async def _dial_peer(
        self,
        peer_id: ID,
        addr: Multiaddr,
        source: tuple[str, int] | None = None,
        as_responder: bool = False,
    ) -> None:
        # A punch round cancels its dials as soon as the swarm lists a direct connection,
        # and the swarm lists it *before* running its "connected" notifees (pubsub's
        # among them). A dial cancelled there makes the swarm close the connection it
        # just made, at both ends, though the punch had worked: under load this lost
        # the punch (or its relayed connection) in CI. Shielded, each dial runs to its
        # own end, which its ``dial_timeout`` still bounds.
        with trio.CancelScope(shield=True):
            await super()._dial_peer(peer_id, addr, source, as_responder)

    async def initiate_hole_punch(self, peer_id: ID) -> bool:
        # NatService owns the retry policy. py-libp2p's own budget (3 attempts per peer
        # until it disconnects) would end punching to a peer for good after the third
        # failure, though NATs change and the backoff retries for as long as it stays.
        self._hole_punch_attempts.pop(peer_id, None)
        return await super().initiate_hole_punch(peer_id)


class _Wakeup:
    """A resettable event: a loop sleeps on it until something changed (or it times out)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


class _ConnectionEvents(ConnectionNotifee):
    """Swarm notifee that only pokes the service; swarm awaits notifees inline."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._on_change()

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._on_change()


class _RelayCloseNoise(logging.Filter):
    """Drops the relay's ERRORs about a HOP or circuit stream that simply ended.

    ``CircuitV2Protocol`` keeps reading a HOP stream after answering it and logs the
    clean end of every reservation and circuit as an ERROR with an empty or "stream is
    reset" reason (libp2p-notes.md, bug 17).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.endswith(": ") or message.endswith("stream is reset"))


logging.getLogger("libp2p.relay.circuit_v2.protocol").addFilter(_RelayCloseNoise())
