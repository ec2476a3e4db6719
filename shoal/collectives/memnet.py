"""An in-memory network for the sans-io collectives, with a declared fault plan.

Deterministic: with ``seed=None`` messages are delivered in global FIFO order; with a
seed, a seeded scheduler picks which (sender, receiver) link delivers next, while every
link stays FIFO (as a stream does). A :class:`Fault` fires immediately before or after a
given message a peer sends (its n-th, optionally counting only one message type) and kills
that peer, partitions the network, or corrupts that message. A failure detector is
modelled by a "peer failed" event delivered to each survivor (after the messages already
in flight on that link), and across a partition to both sides. When nothing is in flight
and some peer is unfinished, every unfinished peer gets a ``deadline()``; rounds of steps
and deadlines are bounded, so a run either finishes or raises :class:`Stuck`.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from shoal.collectives import wire
from shoal.collectives.allreduce import Send
from shoal.collectives.errors import CollectiveError, Rejected


class Endpoint(Protocol):
    @property
    def finished(self) -> bool: ...

    def receive(self, sender: str, data: bytes) -> list[Send]: ...

    def peer_failed(self, peer: str) -> list[Send]: ...

    def deadline(self) -> list[Send]: ...


class Stuck(CollectiveError):
    """The simulation exceeded its step or deadline budget: something hangs."""


@dataclass(frozen=True, slots=True)
class Fault:
    """Fires on ``peer``'s ``index``-th sent message (0-based; only messages of type
    ``kind`` are counted when it is given), ``before`` it is sent (it is lost) or
    ``after`` it is sent. ``action``: ``kill`` the peer, ``partition`` the network into
    ``groups`` (peers in no group form one more group), or ``corrupt`` the message with
    ``corrupt`` (``before`` only)."""

    peer: str
    index: int
    when: Literal["before", "after"] = "before"
    action: Literal["kill", "partition", "corrupt"] = "kill"
    kind: str | None = None
    groups: tuple[frozenset[str], ...] = ()
    corrupt: Callable[[bytes], bytes] | None = None


@dataclass(slots=True)
class Stats:
    steps: int = 0
    deadline_rounds: int = 0
    delivered: Counter[str] = field(default_factory=Counter)  # by message type
    bytes_sent: Counter[str] = field(default_factory=Counter)  # by sender
    sent: Counter[str] = field(default_factory=Counter)  # by message type
    sent_by: Counter[tuple[str, str]] = field(default_factory=Counter)  # by (sender, type)
    # each fired fault with what had been sent by (sender, type) when it fired
    fired: list[tuple[Fault, Counter[tuple[str, str]]]] = field(default_factory=list)


_Item = tuple[int, str, bytes | str]  # (seq, "msg" | "fail", data | failed peer)


class MemoryNetwork:
    def __init__(
        self,
        endpoints: Mapping[str, Endpoint],
        faults: Sequence[Fault] = (),
        *,
        seed: int | None = None,
        max_steps: int = 200_000,
        max_deadline_rounds: int = 64,
    ) -> None:
        self.endpoints = dict(endpoints)
        self.alive = set(self.endpoints)
        self.stats = Stats()
        self._faults = list(faults)
        self._rng = random.Random(seed) if seed is not None else None
        self._links: dict[tuple[str, str], deque[_Item]] = {}
        self._seq = 0
        self._counts: Counter[tuple[str, str | None]] = Counter()
        self._group: dict[str, int] = {}
        self.max_steps = max_steps
        self.max_deadline_rounds = max_deadline_rounds

    # ------------------------------------------------------------------ inputs

    def call(self, peer: str, action: Callable[[], list[Send]]) -> None:
        """Run a local event on ``peer`` (e.g. ``contribute``) and send what it emits."""
        if peer in self.alive:
            self.post(peer, action())

    def post(self, src: str, sends: Iterable[Send]) -> None:
        for send in sends:
            if src not in self.alive:
                return  # died while sending the batch
            data = send.data
            kind = _kind(data)
            fired = self._due(src, kind)
            for fault in fired:
                if fault.when == "before":
                    if fault.action == "corrupt":
                        assert fault.corrupt is not None
                        data = fault.corrupt(data)
                    else:
                        self._fire(fault)
            if src in self.alive:
                self.stats.sent[kind or "?"] += 1
                self.stats.sent_by[src, kind or "?"] += 1
                self._enqueue(src, send.to, "msg", data)
            for fault in fired:
                if fault.when == "after":
                    self._fire(fault)

    def inject(self, src: str, dst: str, data: bytes) -> None:
        """A raw message from anyone (an outsider, a forged frame), outside the fault plan."""
        self._enqueue(src, dst, "msg", data)

    def kill(self, peer: str) -> None:
        self._fire(Fault(peer, -1))

    # ------------------------------------------------------------------ running

    def run(self, *, deadlines: bool = True) -> Stats:
        """Deliver until nothing is in flight; then, with ``deadlines``, give unfinished
        peers deadlines until every live peer has finished."""
        while True:
            while self._step():
                if self.stats.steps > self.max_steps:
                    raise Stuck(f"more than {self.max_steps} deliveries")
            if not deadlines:
                return self.stats
            unfinished = sorted(p for p in self.alive if not self.endpoints[p].finished)
            if not unfinished:
                return self.stats
            self.stats.deadline_rounds += 1
            if self.stats.deadline_rounds > self.max_deadline_rounds:
                raise Stuck(f"{unfinished} unfinished after {self.max_deadline_rounds} deadlines")
            for peer in unfinished:
                self.call(peer, self.endpoints[peer].deadline)

    def _step(self) -> bool:
        ready = [k for k, q in self._links.items() if q]
        if not ready:
            return False
        if self._rng is None:
            link = min(ready, key=lambda k: self._links[k][0][0])
        else:
            link = self._rng.choice(ready)
        src, dst = link
        _, what, payload = self._links[link].popleft()
        self.stats.steps += 1
        if dst not in self.alive:
            return True
        endpoint = self.endpoints[dst]
        if what == "fail":
            assert isinstance(payload, str)
            self.post(dst, endpoint.peer_failed(payload))
        elif self._connected(src, dst):
            assert isinstance(payload, bytes)
            self.stats.delivered[_kind(payload) or "?"] += 1
            self.post(dst, endpoint.receive(src, payload))
        return True

    # ------------------------------------------------------------------ faults

    def _due(self, src: str, kind: str | None) -> list[Fault]:
        due = []
        for key in ((src, None), (src, kind)) if kind else ((src, None),):
            n = self._counts[key]
            self._counts[key] += 1
            due += [f for f in self._faults if f.peer == src and f.index == n and f.kind == key[1]]
        return due

    def _fire(self, fault: Fault) -> None:
        self.stats.fired.append((fault, Counter(self.stats.sent_by)))
        if fault.action == "kill":
            peer = fault.peer
            if peer not in self.alive:
                return
            self.alive.discard(peer)
            for other in sorted(self.alive):
                self._enqueue(peer, other, "fail", peer)
        elif fault.action == "partition":
            self._group = {p: i for i, g in enumerate(fault.groups) for p in g}
            live = sorted(self.alive)
            for a in live:
                for b in live:
                    if a != b and not self._connected(a, b):
                        self._enqueue(b, a, "fail", b)

    def _connected(self, a: str, b: str) -> bool:
        if not self._group:
            return True
        outside = len(self._group)
        return self._group.get(a, outside) == self._group.get(b, outside)

    def _enqueue(self, src: str, dst: str, what: str, payload: bytes | str) -> None:
        self._seq += 1
        if what == "msg":
            assert isinstance(payload, bytes)
            self.stats.bytes_sent[src] += len(payload)
        self._links.setdefault((src, dst), deque()).append((self._seq, what, payload))


def _kind(data: bytes) -> str | None:
    try:
        return str(wire.header_of("?", data)["t"])
    except Rejected:
        return None
