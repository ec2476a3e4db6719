"""Failure detection from heartbeats, on the local clock (clocks of peers may be skewed).

Pure: ``now`` is always passed in. A peer is online when we received something it signed
within ``timeout`` seconds; a silent peer is marked offline at most ``timeout`` after the
last thing we heard from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FailureDetector:
    timeout: float = 30.0
    last_seen: dict[str, float] = field(default_factory=dict)

    def heard_from(self, peer: str, now: float) -> None:
        self.last_seen[peer] = max(now, self.last_seen.get(peer, now))

    def is_online(self, peer: str, now: float) -> bool:
        seen = self.last_seen.get(peer)
        return seen is not None and now - seen <= self.timeout

    def online(self, now: float) -> set[str]:
        return {peer for peer in self.last_seen if self.is_online(peer, now)}

    def silent_for(self, peer: str, now: float) -> float | None:
        seen = self.last_seen.get(peer)
        return None if seen is None else now - seen
