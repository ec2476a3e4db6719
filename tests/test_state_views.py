"""Typed views over the state: bad field types are skipped, coverage is computed."""

from __future__ import annotations

from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.state.document import SwarmState
from shoal.state.views import coverage, models, roster


def test_roster_models_and_coverage() -> None:
    keys = [create_new_key_pair() for _ in range(3)]
    states = [SwarmState("lab", k) for k in keys]
    view = SwarmState("lab", create_new_key_pair())
    writes = [
        (0, "peer", "spans", {"tiny": [0, 4]}),
        (0, "peer", "free_cache_tokens", 4096),
        (1, "peer", "spans", {"tiny": [4, 8], "other": ["x", 2]}),
        (1, "peer", "load", "very high"),  # wrong type: ignored, not fatal
        (2, "peer", "spans", {"tiny": [2, 6]}),
        (
            0,
            "models",
            "tiny",
            {"num_blocks": 8, "config": {"hidden_size": 64}, "tokenizer": "byte"},
        ),
        (1, "models", "tiny", {"num_blocks": 99}),  # a later, different registration
        (2, "models", "broken", {"num_blocks": "eight"}),
    ]
    for i, section, key, value in writes:
        for update in states[i].write(section, key, value):
            view.receive(update)
    ids = [s.me for s in states]
    online = {ids[0], ids[1]}  # peer 2 is silent
    entries = {e.peer_id: e for e in roster(view, online)}
    assert entries[ids[0]].spans == {"tiny": (0, 4)}
    assert entries[ids[0]].free_cache_tokens == 4096
    assert entries[ids[1]].spans == {"tiny": (4, 8)}
    assert entries[ids[1]].load == 0.0
    assert [entries[i].online for i in ids] == [True, True, False]
    registry = models(view)
    assert list(registry) == ["tiny"]
    winner = min(ids[0], ids[1])
    assert registry["tiny"].author == winner
    assert registry["tiny"].num_blocks == (8 if winner == ids[0] else 99)
    tiny = registry["tiny"]
    blocks = coverage(tiny, list(entries.values()))
    assert len(blocks) == tiny.num_blocks
    assert [len(b) for b in blocks[:8]] == [1, 1, 1, 1, 1, 1, 1, 1]  # peer 2 is offline
    assert blocks[0] == [ids[0]] and blocks[5] == [ids[1]]
