"""``/shoal/dialback/1``: can other peers open a *fresh* connection to us?

The asker sends its advertised addresses; the asked peer dials them on brand-new
transport connections and runs the security handshake expecting the asker's peer id,
then answers ``{"reachable": bool, "ip": the IP it reached or None}``.

This is what py-libp2p's AutoNAT gets wrong: its "dial-back" is ``host.connect``, which
returns the connection the asker already holds, so a firewalled host comes out PUBLIC
(design/libp2p-notes.md, bug 1). Two rules keep the check honest and harmless:

- the asked peer dials only the IP it sees the asker at (nat_logic.plan_dialback), so
  it cannot be used to aim traffic at third parties, and reports which IP it reached;
- it asks over a direct connection only: through a relay it cannot see the asker's IP.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.security.pnet.protector import new_protected_conn

from shoal.transport.circuit import conn_is_relayed, is_circuit_addr
from shoal.transport.errors import RemoteError, RpcError
from shoal.transport.host import Host
from shoal.transport.nat_logic import MinInterval, plan_dialback
from shoal.transport.rpc import Message, Protocol

log = logging.getLogger(__name__)

DIALBACK = Protocol(name="dialback", max_request=4096, max_response=1024, timeout=15.0)
MAX_ADDRS = 16  # per request; more is a malformed or hostile request
MAX_TARGETS = 4  # endpoints actually dialed per request


@dataclass(frozen=True, slots=True)
class DialbackAnswer:
    reachable: bool
    ip: str | None  # the IP the peer reached us at (None when it could not)


async def call_dialback(host: Host, peer: ID, *, dial_seconds: float) -> DialbackAnswer:
    """Ask ``peer`` to dial us on a fresh connection. Raises RemoteError; the caller
    bounds the time (the peer may spend ``dial_seconds`` on dropped SYNs)."""
    addrs = [a.rsplit("/p2p/", 1)[0] for a in host.advertised_addrs()]
    addrs = [a for a in dict.fromkeys(addrs) if not is_circuit_addr(a)][:MAX_ADDRS]
    _EXPECTED_NOISE.expect(peer, seconds=dial_seconds + 10)
    reply = await host.rpc.call(peer, DIALBACK, Message({"addrs": addrs}))
    reachable, ip = reply.body.get("reachable"), reply.body.get("ip")
    if not isinstance(reachable, bool) or not (ip is None or isinstance(ip, str)):
        raise RemoteError(str(peer), "bad_reply", f"malformed dial-back reply {reply.body!r}")
    return DialbackAnswer(reachable, ip if reachable else None)


class DialbackServer:
    """Answers dial-back requests: at most one per peer per ``min_interval`` seconds,
    ``concurrency`` at a time, each endpoint given ``dial_seconds``."""

    def __init__(
        self, host: Host, *, dial_seconds: float, min_interval: float, concurrency: int = 4
    ) -> None:
        self.host = host
        self.dial_seconds = dial_seconds
        self._rate: MinInterval[str] = MinInterval(min_interval)
        self._slots = trio.CapacityLimiter(concurrency)

    def serve(self) -> None:
        self.host.rpc.serve(DIALBACK, self.rpc_dialback)

    async def rpc_dialback(self, peer: ID, request: Message) -> Message:
        addrs = request.body.get("addrs")
        if (
            not isinstance(addrs, list)
            or len(addrs) > MAX_ADDRS
            or not all(isinstance(a, str) and len(a) <= 256 for a in addrs)
        ):
            raise RpcError("bad_request", f"addrs must be a list of at most {MAX_ADDRS} multiaddrs")
        if not self._rate.allow(str(peer), trio.current_time()):
            raise RpcError("rate_limited", "one dial-back per peer every few seconds")
        observed = self.observed_ips(peer)
        if not observed:
            raise RpcError("relayed", "we only reach you through a relay; ask a direct peer")
        targets = plan_dialback(addrs, observed, limit=MAX_TARGETS)
        async with self._slots:
            ip = await self._first_handshake(peer, targets)
        return Message({"reachable": ip is not None, "ip": ip})

    def observed_ips(self, peer: ID) -> list[str]:
        """The IPs of our direct connections to ``peer``, as the sockets see them."""
        ips = []
        for conn in self.host.libp2p.get_network().connections.get(peer, []):
            if conn_is_relayed(conn):
                continue
            # The socket's own remote address: SwarmConn.get_transport_addresses falls
            # back to the peerstore, i.e. to addresses the peer itself claimed.
            remote = conn.muxed_conn.get_remote_address()
            if remote and remote[0] not in ips:
                ips.append(remote[0])
        return ips

    async def _first_handshake(self, peer: ID, targets: list[tuple[str, int]]) -> str | None:
        reached: list[str] = []

        async def attempt(ip: str, port: int, scope: trio.CancelScope) -> None:
            family = "ip6" if ":" in ip else "ip4"
            addr = multiaddr.Multiaddr(f"/{family}/{ip}/tcp/{port}")
            # A NAT or firewall drops the SYN silently: only a deadline ends the wait.
            with trio.move_on_after(self.dial_seconds):
                if await fresh_handshake(self.host.libp2p, addr, peer):
                    reached.append(ip)
                    scope.cancel()

        async with trio.open_nursery() as nursery:
            for ip, port in targets:
                nursery.start_soon(attempt, ip, port, nursery.cancel_scope)
        return reached[0] if reached else None


async def fresh_handshake(host: IHost, addr: multiaddr.Multiaddr, peer: ID) -> bool:
    """Open a brand-new connection to ``addr`` and complete the security handshake with
    ``peer`` (Noise checks the peer id); the connection is closed, never registered.

    Uses the swarm's transport and upgrader the way ``Swarm._dial_addr_single_attempt``
    does, pnet included. The caller bounds the time: a dropped SYN just waits.
    """
    network = host.get_network()
    transport = network.transport_manager.transport_for_dialing(addr)
    if transport is None:
        return False
    conn = None
    try:
        raw = conn = await transport.dial(addr)
        psk = getattr(network, "psk", None)
        protected = new_protected_conn(raw, psk) if psk else raw
        conn = await network.upgrader.upgrade_security(protected, True, peer)
        return bool(conn.get_remote_peer() == peer)
    except Exception:  # refused, unreachable, wrong peer id: all mean "not reachable here"
        log.debug("dial-back to %s at %s failed", peer, addr, exc_info=True)
        return False
    finally:
        if conn is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await conn.close()
                except Exception:
                    log.debug("closing the dial-back connection failed", exc_info=True)


class _ExpectedNoise(logging.Filter):
    """Drops the swarm's ERROR about a handshake-only connection from a peer we asked.

    The asked peer closes its dial-back connection right after the security handshake,
    so our swarm's inbound upgrade fails at muxer negotiation and logs
    ``fail to upgrade mux for peer <id>`` at ERROR: for a peer we just asked, that is the
    expected end of the check, not a fault.
    """

    def __init__(self) -> None:
        super().__init__()
        self._until: dict[str, float] = {}

    def expect(self, peer: ID, *, seconds: float) -> None:
        now = time.monotonic()
        self._until = {p: t for p, t in self._until.items() if t > now}
        self._until[str(peer)] = now + seconds

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("fail to upgrade mux for peer") or not record.args:
            return True
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        return time.monotonic() > self._until.get(str(args[0]), 0.0)


_EXPECTED_NOISE = _ExpectedNoise()
logging.getLogger("libp2p.network.swarm").addFilter(_EXPECTED_NOISE)
