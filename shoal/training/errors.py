"""Errors of decentralized training: divergent or unusable state, failed state sync."""

from __future__ import annotations

from shoal.errors import Error


class TrainingError(Error):
    """Base class of training errors."""


class LayoutMismatch(TrainingError):
    """A flat state does not fit this model (names, shapes or element count differ)."""


class BadAverage(TrainingError):
    """The averaged pseudo-gradient is unusable (shape, dtype or non-finite values)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"averaged pseudo-gradient refused: {reason}")
        self.reason = reason


class CorruptPart(TrainingError):
    """Part ``index`` of a state download from ``peer`` failed its sha256 (or its size)."""

    def __init__(self, peer: str, index: int, reason: str) -> None:
        super().__init__(f"state part {index} from {peer} refused: {reason}")
        self.peer = peer
        self.index = index
        self.reason = reason


class SyncFailed(TrainingError):
    """A state download cannot complete: part ``index`` has no peer left to ask."""

    def __init__(self, index: int, tried: tuple[str, ...]) -> None:
        super().__init__(
            f"state part {index} could not be fetched: every peer failed or sent bad bytes "
            f"(tried {', '.join(tried) or 'nobody'})"
        )
        self.index = index
        self.tried = tried


class StateHashMismatch(TrainingError):
    """An assembled or imported state does not hash to the value it was announced with."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"state hash {actual[:16]}… differs from the announced {expected[:16]}…")
        self.expected = expected
        self.actual = actual


class NoConsensus(TrainingError):
    """No state hash is held by a strict majority of a round's members."""
