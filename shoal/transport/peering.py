"""Bootstrap and peer exchange: join the swarm and stay in it.

A node dials its bootstrap addresses with retry and exponential backoff, asks every
connected peer for the peers it knows (``/shoal/peers/1``), and dials those until it has
``target_peers`` connections. Bootstrap addresses are retried forever (backoff capped), and
every peer learned is remembered, so the node stays in the swarm when the bootstrap node
goes away and rejoins when it comes back. The peer table is plain data (clock passed in)
so it is tested without a network; :class:`Peering` is the I/O shell around it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from libp2p.peer.id import ID

from shoal.transport.backoff import Backoff
from shoal.transport.errors import DialError, RemoteError
from shoal.transport.host import Host
from shoal.transport.rpc import Message, Protocol

if TYPE_CHECKING:
    # trio-typing's stale stubs (pulled in by libp2p) shadow trio's own types.
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

PEERS = Protocol(name="peers", max_request=1024, max_response=256 * 1024, timeout=10.0)
MAX_ADDRS_PER_PEER = 8
MAX_PEERS_PER_REPLY = 64


def dial_backoff() -> Backoff[str]:
    """0.5 s doubling to 30 s, +-20 %: retries of one target by many nodes spread out."""
    return Backoff(base=0.5, cap=30.0, jitter=0.2)


@dataclass
class KnownPeer:
    addrs: list[str]


class PeerTable:
    """Peers this node knows how to reach, with a dial backoff each."""

    def __init__(self, self_id: str, *, max_peers: int = 1024) -> None:
        self.self_id = self_id
        self.max_peers = max_peers
        self.peers: dict[str, KnownPeer] = {}
        self.backoff = dial_backoff()

    def learn(self, peer_id: str, addrs: Iterable[str]) -> bool:
        """Remember addresses for a peer; True when the peer is new."""
        if peer_id == self.self_id:
            return False
        clean = [a for a in addrs if _usable(a, peer_id)][:MAX_ADDRS_PER_PEER]
        if not clean:
            return False
        known = self.peers.get(peer_id)
        if known is None:
            if len(self.peers) >= self.max_peers:
                return False
            self.peers[peer_id] = KnownPeer(clean)
            return True
        known.addrs = list(dict.fromkeys(clean + known.addrs))[:MAX_ADDRS_PER_PEER]
        return False

    def dial_candidates(self, now: float, connected: set[str], limit: int) -> list[str]:
        """Peers to dial now: not connected, backoff elapsed, fewest failures first."""
        ready = [pid for pid in self.peers if pid not in connected and self.backoff.ready(pid, now)]
        ready.sort(key=self.backoff.failures)
        return ready[: max(0, limit)]

    def to_json(self) -> dict[str, list[str]]:
        return {pid: known.addrs for pid, known in self.peers.items()}

    def load_json(self, data: Mapping[str, Any]) -> None:
        for pid, addrs in data.items():
            if isinstance(pid, str) and isinstance(addrs, list):
                self.learn(pid, [a for a in addrs if isinstance(a, str)])


def _usable(addr: str, peer_id: str) -> bool:
    return addr.startswith("/") and addr.endswith(f"/p2p/{peer_id}") and "/0.0.0.0/" not in addr


def parse_peer_list(body: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """Validate a ``/shoal/peers/1`` reply: a list of {"id": str, "addrs": [str]}."""
    entries = body.get("peers")
    if not isinstance(entries, list):
        raise RemoteError("?", "bad_reply", "peers reply has no list 'peers'")
    out = []
    for entry in entries[:MAX_PEERS_PER_REPLY]:
        if not isinstance(entry, dict):
            continue
        pid, addrs = entry.get("id"), entry.get("addrs")
        if isinstance(pid, str) and isinstance(addrs, list):
            out.append((pid, [a for a in addrs[:MAX_ADDRS_PER_PEER] if isinstance(a, str)]))
    return out


@dataclass(frozen=True, kw_only=True)
class PeeringConfig:
    """bootstrap: full multiaddrs to join through; target_peers: connections to keep;
    exchange_interval: seconds between peer exchanges (each with one connected peer, plus
    one with every new connection at once); tick: seconds
    between upkeep rounds."""

    bootstrap: tuple[str, ...] = ()
    target_peers: int = 16
    exchange_interval: float = 10.0
    tick: float = 0.5


class Peering:
    """Keeps a host connected to the swarm."""

    def __init__(self, host: Host, config: PeeringConfig, table: PeerTable | None = None) -> None:
        self.host = host
        self.config = config
        self.table = table or PeerTable(str(host.peer_id))
        self._bootstrap_backoff = dial_backoff()
        self._dialing: set[str] = set()
        self._last_exchange: dict[str, float] = {}
        self._last_round = -1e9

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.host.rpc.serve(PEERS, self._rpc_peers)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                self._upkeep(nursery, trio.current_time())
                await trio.sleep(self.config.tick)

    def connected(self) -> set[str]:
        return self.host.connected_peers()

    def _upkeep(self, nursery: trio.Nursery, now: float) -> None:
        connected = self.connected()
        for addr in self.config.bootstrap:
            if (
                _peer_of(addr) not in connected
                and addr not in self._dialing
                and self._bootstrap_backoff.ready(addr, now)
            ):
                nursery.start_soon(self._dial, addr)
        room = self.config.target_peers - len(connected) - len(self._dialing)
        for pid in self.table.dial_candidates(now, connected | self._dialing, room):
            known = self.table.peers[pid]
            nursery.start_soon(self._dial_known, pid, known)
        # Peer exchange: with every new connection at once, then with one peer (the one
        # asked least recently) every ``exchange_interval``.
        for gone in set(self._last_exchange) - connected:
            del self._last_exchange[gone]
        due = [pid for pid in connected if pid not in self._last_exchange]
        if not due and connected and now - self._last_round >= self.config.exchange_interval:
            due = [min(connected, key=lambda pid: self._last_exchange[pid])]
            self._last_round = now
        for pid in due:
            self._last_exchange[pid] = now
            nursery.start_soon(self._exchange, ID.from_base58(pid))

    async def _dial(self, addr: str) -> None:
        self._dialing.add(addr)
        try:
            peer = await self.host.connect(addr)
        except DialError as exc:
            delay = self._bootstrap_backoff.failed(addr, trio.current_time())
            log.info("bootstrap %s failed (%s); retrying in %.1fs", addr, exc.reason, delay)
        else:
            self._bootstrap_backoff.succeeded(addr)
            self.table.learn(str(peer), [addr])
            log.info("joined through %s", addr)
        finally:
            self._dialing.discard(addr)

    async def _dial_known(self, pid: str, known: KnownPeer) -> None:
        self._dialing.add(pid)
        try:
            for addr in known.addrs:
                try:
                    await self.host.connect(addr)
                except DialError:
                    continue
                self.table.backoff.succeeded(pid)
                return
            self.table.backoff.failed(pid, trio.current_time())
        finally:
            self._dialing.discard(pid)

    async def _exchange(self, peer: ID) -> None:
        try:
            reply = await self.host.rpc.call(
                peer, PEERS, Message({"addrs": self.host.advertised_addrs()})
            )
            entries = parse_peer_list(reply.body)
        except RemoteError as exc:
            log.debug("peer exchange with %s failed: %s", peer, exc)
            return
        for pid, addrs in entries:
            if self.table.learn(pid, addrs):
                log.debug("learned peer %s from %s", pid, peer)

    async def _rpc_peers(self, peer: ID, request: Message) -> Message:
        # The caller tells us how to reach it: its own word beats identify's listen addrs.
        addrs = request.body.get("addrs")
        if isinstance(addrs, list):
            self.table.learn(
                str(peer), [a for a in addrs[:MAX_ADDRS_PER_PEER] if isinstance(a, str)]
            )
        entries = [{"id": str(self.host.peer_id), "addrs": self.host.advertised_addrs()}]
        for link in self.host.links():
            known = self.table.peers.get(link.peer_id)
            if known and link.peer_id != str(peer):
                entries.append({"id": link.peer_id, "addrs": known.addrs})
        return Message({"peers": entries[:MAX_PEERS_PER_REPLY]})


def _peer_of(addr: str) -> str:
    return addr.rsplit("/p2p/", 1)[-1]
