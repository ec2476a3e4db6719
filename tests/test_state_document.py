"""The swarm state: signed per-author documents, convergence, forgery and bad input."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.state.document import SwarmState
from shoal.state.errors import RejectedUpdate
from shoal.state.records import SignedUpdate, decode, sign_update

KEYS = [create_new_key_pair() for _ in range(3)]


def fresh(i: int, compact_every: int = 64) -> SwarmState:
    return SwarmState("lab", KEYS[i], compact_every=compact_every)


def test_updates_round_trip_the_wire() -> None:
    state = fresh(0)
    [update] = state.write("peer", "addrs", ["/ip4/1.2.3.4/tcp/4001"])
    again = decode(update.encode())
    assert again == update
    again.verify("lab")


def test_forged_update_is_rejected_and_changes_nothing() -> None:
    victim, forger, honest = fresh(0), fresh(1), fresh(2)
    [genuine] = victim.write("peer", "load", 0.25)
    honest.receive(genuine)
    before = honest.digest()
    # The forger signs an update that claims the victim as author.
    forged = sign_update(KEYS[1], "lab", 2, "delta", genuine.update)
    forged = SignedUpdate("lab", victim.me, 2, "delta", forged.update, forged.signature)
    with pytest.raises(RejectedUpdate, match="bad signature") as info:
        honest.receive(forged, sender=forger.me)
    assert info.value.sender == forger.me
    # A real signature on tampered bytes fails the same way.
    tampered = SignedUpdate(
        "lab", victim.me, 2, "delta", b"\x00" + genuine.update, genuine.signature
    )
    with pytest.raises(RejectedUpdate, match="bad signature"):
        honest.receive(tampered)
    assert honest.digest() == before
    assert honest.section("peer") == {victim.me: {"load": 0.25}}


def test_another_swarms_update_is_rejected() -> None:
    other = SwarmState("elsewhere", KEYS[0])
    [update] = other.write("peer", "x", 1)
    with pytest.raises(RejectedUpdate, match="swarm"):
        fresh(1).receive(update)


def test_malformed_crdt_bytes_are_rejected_and_later_updates_still_apply() -> None:
    author, reader = fresh(0), fresh(1)
    garbage = sign_update(KEYS[0], "lab", 1, "delta", b"\xff\xff\xff\xff garbage")
    with pytest.raises(RejectedUpdate, match="malformed"):
        reader.receive(garbage)
    assert reader.vector() == {}
    [good] = author.write("peer", "x", "y")
    assert reader.receive(good) == [good]
    assert reader.section("peer") == {author.me: {"x": "y"}}


@pytest.mark.parametrize(
    "wire",
    [
        {"a": "x"},
        {"w": "lab", "a": "x", "q": 0, "k": "delta", "u": b"", "g": b"\0" * 64},
        {"w": "lab", "a": "x", "q": 1, "k": "drop-table", "u": b"", "g": b"\0" * 64},
        {"w": "lab", "a": "x", "q": 1, "k": "delta", "u": "text", "g": b"\0" * 64},
        {"w": "lab", "a": "x", "q": 1, "k": "delta", "u": b"", "g": b"short"},
        {"w": "lab", "a": "x", "q": 1, "k": "delta", "u": b"\0" * (1 << 20), "g": b"\0" * 64},
    ],
)
def test_malformed_records_are_typed_errors(wire: dict) -> None:
    import msgpack

    with pytest.raises(RejectedUpdate):
        decode(msgpack.packb(wire, use_bin_type=True))


def test_writes_and_deletes_and_compaction() -> None:
    author, reader = fresh(0, compact_every=3), fresh(1)
    sent = []
    for i in range(7):
        sent += author.write("models", f"m{i % 2}", {"rev": i})
    sent += author.write("models", "m0", None)
    kinds = [u.kind for u in sent]
    assert kinds.count("snapshot") >= 2
    assert author.authors[author.me].log[0].kind == "snapshot"
    # A reader that joins late gets the snapshot and what follows, not the whole history.
    catch_up = author.missing({})
    assert catch_up[0].kind == "snapshot"
    assert len(catch_up) < len(sent)
    for update in catch_up:
        reader.receive(update)
    assert reader.section("models") == {author.me: {"m1": {"rev": 5.0}}}
    assert reader.digest() == author.digest()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 5))
def test_any_delivery_order_with_duplicates_converges(seed: int, compact_every: int) -> None:
    rng = random.Random(seed)
    authors = [fresh(i, compact_every) for i in range(3)]
    updates = []
    for step in range(15):
        author = rng.choice(authors)
        key = rng.choice(["a", "b", "c"])
        updates += author.write(
            rng.choice(["peer", "runs"]), key, None if rng.random() < 0.2 else step
        )
    replicas = [fresh(i) for i in range(3)]
    for replica in replicas:
        deliveries = updates + rng.sample(updates, len(updates) // 2)
        rng.shuffle(deliveries)
        for update in deliveries:
            replica.receive(update)
    truth = fresh(0)
    for author in authors:
        for update in author.all_updates():
            truth.receive(update)
    assert {r.digest() for r in replicas} == {truth.digest()}
    writers = [a for a in authors if a.authors[a.me].seq]
    assert set(replicas[0].vector()) == {a.me for a in writers}
    for author in writers:
        assert replicas[0].authors[author.me].content() == author.authors[author.me].content()


def test_anti_entropy_brings_a_lagging_replica_up_to_date() -> None:
    a, b = fresh(0), fresh(1)
    for i in range(5):
        for update in a.write("peer", "n", i):
            b.receive(update)
    lagging = fresh(2)
    lagging.receive(a.missing({})[0])
    for update in b.missing(lagging.vector()):
        lagging.receive(update)
    assert lagging.digest() == b.digest() == a.digest()
    assert a.missing(lagging.vector()) == []
