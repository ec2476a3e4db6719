"""Who takes part in a round: the coordinator's barrier, as plain state (sans-io).

Round ``r`` (the all-reduce that takes the state from round ``r-1`` to ``r``) has an
agreed member list, decided by one peer, the **coordinator**: the lowest peer id among
the *candidates* that are alive. The candidates of attempt 0 are the members of round
``r-1`` (the contributors its all-reduce committed, so every peer that completed it has
the same list); those of attempt ``a+1`` are the members decided for attempt ``a``.
Joiners are never coordinators.

Every member, after its inner phase, reports READY (its state hash at ``r-1``) to the
coordinator. The coordinator's :class:`Barrier` waits until every candidate it still
sees alive and every registered joiner has reported (or a deadline passes), then
decides: the hash held by most reporters is the state (``consensus`` of the run log:
a strict majority; a tie goes to the hash the lowest peer id holds), its holders are the
round's members, and reporters holding another hash have **diverged** and must resync.
The decision is sent to every reporter, so all members build the same all-reduce view.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Decision:
    """The member list of one attempt of one round."""

    round: int
    attempt: int
    members: tuple[str, ...]
    state_hash: str
    diverged: frozenset[str] = frozenset()


def coordinator(candidates: Iterable[str], alive: Iterable[str]) -> str | None:
    """The lowest peer id among the candidates still alive (None: nobody is)."""
    live = set(alive)
    found = [p for p in candidates if p in live]
    return min(found) if found else None


def majority_hash(reports: Mapping[str, str]) -> str:
    """The hash most reporters hold; a tie goes to the hash of the lowest peer id among
    the tied ones (every coordinator breaks it the same way)."""
    if not reports:
        raise ValueError("no reports")
    counts = Counter(reports.values())
    best = max(counts.values())
    tied = {h for h, n in counts.items() if n == best}
    return min((p, h) for p, h in reports.items() if h in tied)[1]


@dataclass(slots=True)
class Barrier:
    """The coordinator's view of one (round, attempt): whom it waits for, who reported."""

    round: int
    attempt: int
    expected: set[str] = field(default_factory=set)
    reports: dict[str, str] = field(default_factory=dict)
    min_members: int = 1

    def expect(self, peers: Iterable[str]) -> None:
        self.expected |= set(peers)

    def report(self, peer: str, state_hash: str) -> None:
        self.reports[peer] = state_hash

    def waiting_for(self, alive: Iterable[str]) -> set[str]:
        """Expected peers that are alive and have not reported yet."""
        return (self.expected & set(alive)) - set(self.reports)

    def complete(self, alive: Iterable[str]) -> bool:
        return not self.waiting_for(alive) and len(self.reports) >= self.min_members

    def decide(self) -> Decision:
        winner = majority_hash(self.reports)
        members = tuple(sorted(p for p, h in self.reports.items() if h == winner))
        diverged = frozenset(p for p, h in self.reports.items() if h != winner)
        return Decision(self.round, self.attempt, members, winner, diverged)


__all__ = ["Barrier", "Decision", "coordinator", "majority_hash"]
