"""Routing and placement, as pure functions of what the swarm reports (no I/O, no clock).

- :func:`plan_route`: the chain of servers that covers blocks ``0..L`` with the lowest
  estimated latency (a shortest path over block boundaries, as Petals' ``min_latency``).
- :func:`missing_blocks`: the blocks no server covers (what a :class:`NoRoute` names).
- :class:`Bans`: servers that failed, banned for a while with exponential backoff.
- :func:`choose_span`: where a new server should sit (Petals' rule: the window of blocks
  whose served throughput is weakest).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from shoal.pipeline.protocol import Hop

#: Used for a server whose round trip was not measured, or whose throughput is unknown.
DEFAULT_RTT = 0.005
DEFAULT_BLOCK_SECONDS = 0.01
#: Added to a server that reports no room for the session (Petals uses the same 10 s):
#: such a server is used only when nothing else covers its blocks.
NO_ROOM_PENALTY = 10.0


@dataclass(frozen=True, kw_only=True)
class ServerInfo:
    """A server of one model as the client sees it: its span and its live report.

    throughput: decode steps per second over its whole span (0: unknown).
    rtt: the client's measured round trip to it in seconds (None: unknown).
    """

    peer: str
    start: int
    end: int
    addrs: tuple[str, ...] = ()
    throughput: float = 0.0
    rtt: float | None = None
    free_cache_tokens: int = 0
    sessions: int = 0
    max_sessions: int = 1

    def block_seconds(self) -> float:
        if self.throughput <= 0:
            return DEFAULT_BLOCK_SECONDS
        return 1.0 / (self.throughput * (self.end - self.start))

    def has_room(self, tokens: int) -> bool:
        return self.free_cache_tokens >= tokens and self.sessions < self.max_sessions


def hop_cost(server: ServerInfo, blocks: int, need_tokens: int) -> float:
    """Estimated seconds one token spends on ``server`` running ``blocks`` of its blocks."""
    rtt = DEFAULT_RTT if server.rtt is None else server.rtt
    penalty = 0.0 if server.has_room(need_tokens) else NO_ROOM_PENALTY
    return rtt + blocks * server.block_seconds() + penalty


def plan_route(
    servers: Sequence[ServerInfo], num_blocks: int, *, need_tokens: int = 0
) -> list[Hop] | None:
    """The cheapest chain covering blocks ``0..num_blocks`` (None when some block has no
    server). A server may run any sub-range of its span. Ties go to fewer hops, then to
    the smaller peer id, so every client with the same view picks the same chain."""
    if num_blocks <= 0:
        raise ValueError("a model has at least one block")
    # Dijkstra over boundaries 0..num_blocks; the state's cost is (seconds, hops, peers).
    best: dict[int, tuple[float, int, tuple[str, ...]]] = {0: (0.0, 0, ())}
    back: dict[int, tuple[int, ServerInfo]] = {}
    queue: list[tuple[float, int, tuple[str, ...], int]] = [(0.0, 0, (), 0)]
    done: set[int] = set()
    while queue:
        cost, hops, peers, here = heapq.heappop(queue)
        if here in done:
            continue
        done.add(here)
        if here == num_blocks:
            break
        for server in servers:
            if not server.start <= here < min(server.end, num_blocks):
                continue
            for there in range(here + 1, min(server.end, num_blocks) + 1):
                key = (
                    cost + hop_cost(server, there - here, need_tokens),
                    hops + 1,
                    (*peers, server.peer),
                )
                if there not in best or key < best[there]:
                    best[there] = key
                    back[there] = (here, server)
                    heapq.heappush(queue, (*key, there))
    if num_blocks not in done:
        return None
    route: list[Hop] = []
    at = num_blocks
    while at > 0:
        start, server = back[at]
        route.append(Hop(server.peer, start, at, server.addrs))
        at = start
    return route[::-1]


def route_cost(route: Sequence[Hop], servers: Sequence[ServerInfo], need_tokens: int = 0) -> float:
    by_peer = {s.peer: s for s in servers}
    return sum(hop_cost(by_peer[h.peer], h.end - h.start, need_tokens) for h in route)


def missing_blocks(servers: Sequence[ServerInfo], num_blocks: int) -> list[int]:
    covered = [False] * num_blocks
    for server in servers:
        for block in range(max(server.start, 0), min(server.end, num_blocks)):
            covered[block] = True
    return [block for block, ok in enumerate(covered) if not ok]


@dataclass
class Bans:
    """Peers that failed: banned ``base`` seconds, doubling per repeated failure up to
    ``cap`` (Petals: 15 s, x2). ``now`` is any monotonic clock, passed in."""

    base: float = 15.0
    cap: float = 300.0
    _until: dict[str, float] = field(default_factory=dict)
    _strikes: dict[str, int] = field(default_factory=dict)

    def ban(self, peer: str, now: float) -> float:
        strikes = self._strikes.get(peer, 0)
        seconds = min(self.base * 2**strikes, self.cap)
        self._strikes[peer] = strikes + 1
        self._until[peer] = now + seconds
        return seconds

    def banned(self, peer: str, now: float) -> bool:
        return self._until.get(peer, -math.inf) > now

    def active(self, now: float) -> list[str]:
        return sorted(p for p, until in self._until.items() if until > now)

    def forgive(self, peer: str) -> None:
        """A banned peer served well again: its next failure starts from ``base``."""
        self._strikes.pop(peer, None)


def choose_span(throughput: Sequence[float], length: int) -> int:
    """The first block of the ``length``-block window a new server should take.

    ``throughput[i]`` is the swarm's total throughput on block ``i`` (0 for an uncovered
    block). Petals' rule: take the window whose throughputs, sorted ascending, are
    smallest in lexicographic order (it fills the weakest part of the swarm first); ties
    go to the lowest start.
    """
    blocks = len(throughput)
    if not 1 <= length <= blocks:
        raise ValueError(f"a span of {length} blocks does not fit a model of {blocks}")
    return min(range(blocks - length + 1), key=lambda s: (sorted(throughput[s : s + length]), s))
