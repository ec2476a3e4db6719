"""Run bookkeeping as plain data, and the per-round state-hash comparison.

Each peer writes its view of a run to its own document in the swarm state (section
``runs``, key = run id): the latest round, its members, its state hash, and the hashes of
the last :data:`KEEP_ROUNDS` rounds. Readers merge every author's entry: at a given round,
the hash a strict majority of the round's members report is the run's state; a member
that reports another one has diverged and resyncs from the majority.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shoal.state.document import SwarmState
from shoal.state.records import SignedUpdate
from shoal.training.errors import NoConsensus

SECTION = "runs"
KEEP_ROUNDS = 16


@dataclass(frozen=True, kw_only=True)
class RoundRecord:
    """One round as one peer saw it (after its outer step)."""

    run_id: str
    round: int
    members: tuple[str, ...]
    state_hash: str
    loss: float = math.nan
    bytes_sent: int = 0

    def to_data(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "round": self.round,
            "members": list(self.members),
            "state_hash": self.state_hash,
            "loss": None if math.isnan(self.loss) else round(self.loss, 6),
            "bytes_sent": self.bytes_sent,
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> RoundRecord:
        loss = data.get("loss")
        return cls(
            run_id=str(data["run_id"]),
            round=int(data["round"]),
            members=tuple(str(m) for m in data["members"]),
            state_hash=str(data["state_hash"]),
            loss=math.nan if loss is None else float(loss),
            bytes_sent=int(data.get("bytes_sent", 0)),
        )


def run_entry(record: RoundRecord, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """This peer's ``runs[run_id]`` value after ``record``: the record plus recent hashes."""
    hashes = dict((previous or {}).get("hashes", {}))
    hashes[str(record.round)] = record.state_hash
    recent = sorted(hashes, key=int)[-KEEP_ROUNDS:]
    return {**record.to_data(), "hashes": {r: hashes[r] for r in recent}}


def publish(state: SwarmState, record: RoundRecord) -> list[SignedUpdate]:
    """Write ``record`` to this node's own document; returns the signed updates to gossip."""
    own = state.section(SECTION).get(state.me, {})
    return state.write(SECTION, record.run_id, run_entry(record, own.get(record.run_id)))


def hashes_at(state: SwarmState, run_id: str, round_: int) -> dict[str, str]:
    """``{author: state hash}`` of every author that reported ``round_`` of ``run_id``."""
    out = {}
    for author, runs in state.section(SECTION).items():
        entry = runs.get(run_id)
        if isinstance(entry, Mapping):
            h = entry.get("hashes", {}).get(str(round_))
            if isinstance(h, str):
                out[author] = h
    return out


def consensus(hashes: Mapping[str, str], members: int | None = None) -> tuple[str, set[str]]:
    """The hash a strict majority holds, and the peers that hold another one.

    ``members`` is the round's member count (default: the reporters); a majority is
    counted against it, so silent members count against every hash.
    """
    total = len(hashes) if members is None else members
    if not hashes:
        raise NoConsensus("nobody reported a state hash")
    winner, count = Counter(hashes.values()).most_common(1)[0]
    if 2 * count <= total:
        raise NoConsensus(f"the most common state hash is held by {count} of {total} members")
    return winner, {peer for peer, h in hashes.items() if h != winner}


__all__ = [
    "KEEP_ROUNDS",
    "SECTION",
    "RoundRecord",
    "consensus",
    "hashes_at",
    "publish",
    "run_entry",
]
