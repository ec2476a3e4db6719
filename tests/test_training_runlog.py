"""Run bookkeeping in the swarm state: each peer's round records merge on every replica,
the majority hash is found per round, and a diverged peer is named."""

from __future__ import annotations

import math

from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.state.document import SwarmState
from shoal.training.runlog import (
    KEEP_ROUNDS,
    RoundRecord,
    consensus,
    hashes_at,
    publish,
    run_entry,
)

KEYS = [create_new_key_pair() for _ in range(3)]


def test_round_record_roundtrips_as_plain_data() -> None:
    record = RoundRecord(
        run_id="r", round=4, members=("a", "b"), state_hash="ab" * 32, loss=2.5, bytes_sent=10
    )
    assert RoundRecord.from_data(record.to_data()) == record
    no_loss = RoundRecord(run_id="r", round=1, members=(), state_hash="00")
    data = no_loss.to_data()
    assert data["loss"] is None and math.isnan(RoundRecord.from_data(data).loss)


def test_run_entry_keeps_the_last_rounds_hashes() -> None:
    entry = None
    for r in range(1, KEEP_ROUNDS + 5):
        entry = run_entry(
            RoundRecord(run_id="r", round=r, members=("a",), state_hash=f"h{r}"), entry
        )
    assert entry is not None
    assert sorted(entry["hashes"], key=int) == [str(r) for r in range(5, KEEP_ROUNDS + 5)]
    assert entry["round"] == KEEP_ROUNDS + 4 and entry["state_hash"] == f"h{KEEP_ROUNDS + 4}"


def test_round_hashes_merge_across_replicas_and_name_the_diverged_peer() -> None:
    states = [SwarmState("swarm", k) for k in KEYS]
    members = tuple(sorted(s.me for s in states))
    updates = []
    for r in (1, 2):
        for i, s in enumerate(states):
            h = "bad" if (r == 2 and i == 2) else f"good-{r}"
            updates += publish(
                s, RoundRecord(run_id="run-1", round=r, members=members, state_hash=h)
            )
    for s in states:
        for u in updates:
            s.receive(u)
    assert len({s.digest() for s in states}) == 1
    reader = states[0]
    at1 = hashes_at(reader, "run-1", 1)
    assert at1 == {s.me: "good-1" for s in states}
    assert consensus(at1, len(members)) == ("good-1", set())
    at2 = hashes_at(reader, "run-1", 2)
    assert consensus(at2, len(members)) == ("good-2", {states[2].me})
    assert hashes_at(reader, "run-1", 3) == {} and hashes_at(reader, "other", 1) == {}
