"""Exponential backoff per key, with optional jitter; the clock is passed in."""

from __future__ import annotations

import random
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class Backoff(Generic[K]):
    """Delay after the n-th failure in a row: ``base * factor**(n-1)``, at most ``cap``,
    then spread by +-``jitter`` (a fraction) so that many nodes retrying one target do
    not arrive together."""

    base: float
    cap: float
    factor: float = 2.0
    jitter: float = 0.0
    rng: random.Random = field(default_factory=random.Random, repr=False)
    _failures: dict[K, int] = field(default_factory=dict)
    _retry_at: dict[K, float] = field(default_factory=dict)

    def ready(self, key: K, now: float) -> bool:
        return now >= self._retry_at.get(key, float("-inf"))

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def retry_at(self, key: K) -> float | None:
        return self._retry_at.get(key)

    def failed(self, key: K, now: float) -> float:
        """Record a failure; returns the delay before ``key`` is ready again."""
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        delay = min(self.cap, self.base * self.factor ** (failures - 1))
        if self.jitter:
            delay *= 1 + self.jitter * (2 * self.rng.random() - 1)
        self._retry_at[key] = now + delay
        return delay

    def succeeded(self, key: K) -> None:
        self._failures.pop(key, None)
        self._retry_at.pop(key, None)

    def next_retry(self, now: float) -> float | None:
        """The earliest time after ``now`` at which some key becomes ready."""
        later = [t for t in self._retry_at.values() if t > now]
        return min(later) if later else None
