"""The decisions behind NAT traversal, as plain state machines that take the clock.

Nothing here awaits or touches a socket: :mod:`shoal.transport.nat` feeds these classes
events (a dial-back result, a reservation, a finished hole punch) with ``now`` and asks
them what to do next. Peers are keyed by their base58 id string.

- :class:`MinInterval`: a per-key rate limit (retry delays: ``backoff.Backoff``).
- :func:`plan_dialback`: which ``(ip, port)`` a peer may dial back for a requester.
- :class:`ReachabilityTracker`: dial-back results in, PUBLIC/PRIVATE/UNKNOWN out.
- :class:`CheckSchedule`: when to run the next dial-back check.
- :func:`choose_dialback_peer`: whom to ask.
- :class:`RelayBook`: which relays to reserve on, when to refresh, our relayed addresses.
- :func:`initiates_punch`, :class:`PunchBook`: who punches, and when to (re)try.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from shoal.transport.backoff import Backoff
from shoal.transport.host import Reachability

K = TypeVar("K", bound=Hashable)


class MinInterval(Generic[K]):
    """Allows one event per key every ``interval`` seconds (a per-peer rate limit)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[K, float] = {}

    def allow(self, key: K, now: float) -> bool:
        # Forget keys whose interval has passed so the table stays as small as the
        # number of peers active within one interval.
        for stale in [k for k, t in self._last.items() if now - t >= self.interval]:
            del self._last[stale]
        if key in self._last:
            return False
        self._last[key] = now
        return True


# ---- dial-back: what the asked peer dials ---------------------------------------------


def parse_tcp_addr(addr: str) -> tuple[str, int] | None:
    """``(ip, port)`` of ``/ip4|ip6/<ip>/tcp/<port>[/p2p/<id>]``; None for anything else."""
    parts = addr.split("/")
    if len(parts) not in (5, 7) or parts[0] or parts[1] not in ("ip4", "ip6"):
        return None
    if parts[3] != "tcp" or (len(parts) == 7 and parts[5] != "p2p"):
        return None
    try:
        ip = ipaddress.ip_address(parts[2])
        port = int(parts[4])
    except ValueError:
        return None
    if (ip.version == 4) != (parts[1] == "ip4") or not 0 < port < 65536:
        return None
    return str(ip), port


def plan_dialback(
    requested: Sequence[str], observed_ips: Collection[str], *, limit: int
) -> list[tuple[str, int]]:
    """The endpoints to dial for a requester we see at ``observed_ips``.

    Only ever the requester's observed IP: a requested address with another IP is
    replaced by the observed IP with the requested port (what a port forward or a
    port-preserving NAT would expose). Dialing arbitrary IPs on request would make every
    node a free traffic reflector, and a private address would say nothing about
    reachability from the outside anyway.
    """
    observed = [str(ipaddress.ip_address(ip)) for ip in observed_ips]
    out: list[tuple[str, int]] = []
    for addr in requested:
        parsed = parse_tcp_addr(addr)
        if parsed is None:
            continue
        ip, port = parsed
        version = ipaddress.ip_address(ip).version
        targets = (
            [ip]
            if ip in observed
            else [o for o in observed if ipaddress.ip_address(o).version == version]
        )
        for target in targets:
            if (target, port) not in out:
                out.append((target, port))
    return out[:limit]


def is_local_ip(ip: str) -> bool:
    """True for addresses that only mean something inside one site (RFC 1918, loopback...)."""
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return parsed.is_private or parsed.is_loopback or parsed.is_link_local


# ---- reachability ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DialbackResult:
    """One peer's answer: could it open a fresh connection to us, and at which IP."""

    reachable: bool
    # The IP the peer dialed successfully (None when it failed); tells a LAN-only success
    # apart from one across the internet.
    ip: str | None
    at: float


class ReachabilityTracker:
    """Turns the latest dial-back result of each peer into a Reachability.

    A success at a non-local IP is proof: PUBLIC, whatever others say (a failure may be
    the asked peer's own outbound firewall). Otherwise any failure means PRIVATE: being
    reachable from the same LAN does not make us reachable from the swarm. Successes
    that were all inside a LAN (a home cluster, or loopback tests) still mean PUBLIC when
    nobody failed. Results expire after ``ttl`` seconds.
    """

    def __init__(self, *, ttl: float) -> None:
        self.ttl = ttl
        self._latest: dict[str, DialbackResult] = {}

    def record(self, peer: str, *, reachable: bool, ip: str | None, now: float) -> None:
        self._latest[peer] = DialbackResult(reachable, ip if reachable else None, now)

    def live(self, now: float) -> list[DialbackResult]:
        for peer in [p for p, r in self._latest.items() if now - r.at >= self.ttl]:
            del self._latest[peer]
        return list(self._latest.values())

    def confirmations(self, now: float) -> int:
        """How many distinct peers currently vouch for the status."""
        return len(self.live(now))

    def status(self, now: float) -> Reachability:
        results = self.live(now)
        if any(r.reachable and r.ip is not None and not is_local_ip(r.ip) for r in results):
            return Reachability.PUBLIC
        if any(not r.reachable for r in results):
            return Reachability.PRIVATE
        if results:
            return Reachability.PUBLIC
        return Reachability.UNKNOWN


class CheckSchedule:
    """When to run the next dial-back check.

    The first check runs as soon as a peer is connected. After a conclusive answer the
    next one is ``interval`` later, unless a new peer connects while fewer than
    ``confirmations`` peers vouch for the status: then a second opinion is sought, but
    never within ``min_gap`` of the last check. A check that got no answer (no peer, a
    refusal, a timeout) is retried with backoff.
    """

    def __init__(
        self,
        *,
        interval: float,
        min_gap: float,
        confirmations: int,
        retry: Backoff[str],
    ) -> None:
        self.interval = interval
        self.min_gap = min_gap
        self.confirmations = confirmations
        self._retry = retry
        self.next_at: float | None = None  # None: wait for a peer to connect
        self._last_check = float("-inf")

    def due(self, now: float) -> bool:
        return self.next_at is not None and now >= self.next_at

    def on_peer_connected(self, now: float, *, confirmations: int) -> None:
        if confirmations >= self.confirmations:
            return
        soonest = max(now, self._last_check + self.min_gap)
        self.next_at = soonest if self.next_at is None else min(self.next_at, soonest)

    def on_checked(self, now: float, *, conclusive: bool) -> None:
        self._last_check = now
        if conclusive:
            self._retry.succeeded("check")
            self.next_at = now + self.interval
        else:
            self.next_at = now + self._retry.failed("check", now)

    def on_no_peer(self) -> None:
        self.next_at = None


def choose_dialback_peer(
    candidates: Sequence[str], last_asked: Mapping[str, float], now: float, *, cooldown: float
) -> str | None:
    """The candidate asked longest ago (never asked first), skipping recent ones."""
    eligible = [p for p in candidates if now - last_asked.get(p, float("-inf")) >= cooldown]
    if not eligible:
        return None
    return min(eligible, key=lambda p: (last_asked.get(p, float("-inf")), p))


# ---- relays ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Slot:
    """A live reservation: reachable through ``relay`` at ``addrs`` until ``expires_at``."""

    relay: str
    expires_at: float
    addrs: tuple[str, ...]


class RelayBook:
    """Which relays to hold reservations on, and what that makes our relayed addresses.

    Keeps up to ``want`` reservations, refreshes each ``refresh_margin`` seconds before
    it expires, and backs off from relays that refused or could not be reached.
    """

    def __init__(self, *, want: int, refresh_margin: float, backoff: Backoff[str]) -> None:
        self.want = want
        self.refresh_margin = refresh_margin
        self._backoff = backoff
        self._slots: dict[str, Slot] = {}

    def to_reserve(self, candidates: Sequence[str], now: float) -> list[str]:
        """Relays to (re)reserve on now, expiring ones first; candidates in preference order."""
        self._drop_expired(now)
        refresh = [
            s.relay
            for s in self._slots.values()
            if s.expires_at - now <= self.refresh_margin and self._backoff.ready(s.relay, now)
        ]
        fresh = [
            c
            for c in dict.fromkeys(candidates)
            if c not in self._slots and self._backoff.ready(c, now)
        ]
        return refresh + fresh[: max(0, self.want - len(self._slots))]

    def reserved(self, relay: str, *, expires_at: float, addrs: Sequence[str]) -> None:
        self._backoff.succeeded(relay)
        self._slots[relay] = Slot(relay, expires_at, tuple(addrs))

    def failed(self, relay: str, now: float) -> None:
        self._backoff.failed(relay, now)

    def lost(self, relay: str) -> None:
        """The connection to ``relay`` is gone, and a reservation dies with it."""
        self._slots.pop(relay, None)

    def clear(self) -> None:
        self._slots.clear()

    def slots(self, now: float) -> list[Slot]:
        self._drop_expired(now)
        return sorted(self._slots.values(), key=lambda s: s.relay)

    def relayed_addrs(self, self_id: str, now: float) -> list[str]:
        return [f"{a}/p2p-circuit/p2p/{self_id}" for s in self.slots(now) for a in s.addrs]

    def next_wake(self, now: float) -> float | None:
        """The next time something here becomes due (a refresh or a backoff ending)."""
        times = [s.expires_at - self.refresh_margin for s in self._slots.values()]
        retry = self._backoff.next_retry(now)
        later = [t for t in times if t > now] + ([retry] if retry is not None else [])
        return min(later) if later else None

    def _drop_expired(self, now: float) -> None:
        for relay in [r for r, s in self._slots.items() if s.expires_at <= now]:
            del self._slots[relay]


# ---- hole punching --------------------------------------------------------------------


def initiates_punch(self_id: str, peer_id: str, *, inbound: bool, outbound: bool) -> bool:
    """Whether this end starts the hole punch over its relayed connections to ``peer_id``.

    The DCUtR spec has the end that *received* the relayed connection initiate, so that
    exactly one session runs (two concurrent sessions dial the same 4-tuples and can
    spoil each other). When both ends dialed each other through relays, both received
    one: then the lower peer id initiates.
    """
    if not inbound:
        return False
    return not outbound or self_id < peer_id


class PunchState(StrEnum):
    RUNNING = "running"
    DIRECT = "direct"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class PunchOutcome:
    state: PunchState
    attempts: int
    started_at: float
    # Seconds the last finished attempt took; None while the first one runs.
    took: float | None = None


class PunchBook:
    """One hole punch at a time per peer; after a failure, retry soon, then with backoff.

    A punch through two cone NATs can fail on timing alone (a relay hiccup during the
    exchange, a connection that breaks while both ends upgrade it), so the first
    ``quick_retries`` failures in a row are retried after ``quick_delay`` seconds, as
    go-libp2p retries a failed punch at once. After that the backoff rules: NATs change
    (a router reboot, a new mapping policy), so a failed peer is not written off, but
    punching a symmetric NAT every few seconds would only load the relay.
    """

    def __init__(
        self, *, backoff: Backoff[str], quick_retries: int = 0, quick_delay: float = 0.0
    ) -> None:
        self._backoff = backoff
        self._quick_retries = quick_retries
        self._quick_delay = quick_delay
        self._outcomes: dict[str, PunchOutcome] = {}
        self._failed_in_row: dict[str, int] = {}
        self._quick_at: dict[str, float] = {}  # a quick retry is due then

    def should_start(self, peer: str, now: float) -> bool:
        outcome = self._outcomes.get(peer)
        if outcome is not None and outcome.state is PunchState.RUNNING:
            return False
        quick_at = self._quick_at.get(peer)
        return now >= quick_at if quick_at is not None else self._backoff.ready(peer, now)

    def started(self, peer: str, now: float) -> None:
        previous = self._outcomes.get(peer)
        attempts = (previous.attempts if previous else 0) + 1
        took = previous.took if previous else None
        self._outcomes[peer] = PunchOutcome(PunchState.RUNNING, attempts, now, took)

    def finished(self, peer: str, *, direct: bool, now: float) -> None:
        outcome = self._outcomes[peer]
        self._quick_at.pop(peer, None)
        if direct:
            self._failed_in_row.pop(peer, None)
            self._backoff.succeeded(peer)
        else:
            failed = self._failed_in_row[peer] = self._failed_in_row.get(peer, 0) + 1
            if failed <= self._quick_retries:
                self._quick_at[peer] = now + self._quick_delay
            else:
                self._backoff.failed(peer, now)
        state = PunchState.DIRECT if direct else PunchState.FAILED
        self._outcomes[peer] = PunchOutcome(
            state, outcome.attempts, outcome.started_at, now - outcome.started_at
        )

    def forget(self, peer: str) -> None:
        """The peer is gone: a later relayed connection starts afresh."""
        if peer in self._outcomes and self._outcomes[peer].state is not PunchState.RUNNING:
            del self._outcomes[peer]
            self._failed_in_row.pop(peer, None)
            self._quick_at.pop(peer, None)
            self._backoff.succeeded(peer)

    def outcomes(self) -> dict[str, PunchOutcome]:
        return dict(self._outcomes)
