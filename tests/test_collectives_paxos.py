"""The commit of the digest vector, message by message: CHOSEN only after a majority of
the view's members stored the RCOMMIT; an acceptor that promised a higher epoch refuses a
lower one and reports what it accepted (the Paxos rules the end-to-end oracles rely on)."""

from __future__ import annotations

from test_collectives_support import contributions, group

from shoal.collectives import AllReduce, Decision, Send, wire


def _kinds(sends: list[Send]) -> list[tuple[str, str]]:
    return [(s.to, str(wire.header_of("?", s.data)["t"])) for s in sends]


def _msg(view, kind: str, fields: dict) -> bytes:  # type: ignore[no-untyped-def]
    return wire.encode(kind, view.tag, view.vh, fields)


def _coordinator_at_commit():  # type: ignore[no-untyped-def]
    view = group(5, (5, 20))
    xs = contributions(view)
    k = view.coordinator(0)
    ops = {p: AllReduce(view, p) for p in view.peers}
    sends = {p: ops[p].contribute(xs[p]) for p in view.peers}
    out: list[Send] = []
    for p in view.peers:
        for s in sends[p]:
            if s.to == k:
                out += ops[k].receive(p, s.data)
    for s in out:  # REPL to the backup, its ack back
        if wire.header_of("?", s.data)["t"] == "REPL":
            for ack in ops[s.to].receive(k, s.data):
                out += ops[k].receive(s.to, ack.data)
    commit: list[Send] = []
    for c in range(view.n_chunks):
        owner = view.owner(c, view.peers)
        if owner != k:
            done = {"c": c, "e": 0, "m": 0, "h": bytes([c]) * 16}
            commit += ops[k].receive(owner, _msg(view, "CHUNK_DONE", done))
    return view, k, ops, commit


def test_chosen_needs_a_majority_of_the_view() -> None:
    view, k, ops, commit = _coordinator_at_commit()
    others = [p for p in view.peers if p != k]
    assert sorted(_kinds(commit)) == sorted((p, "RCOMMIT") for p in others)
    # the coordinator stored it itself: 1 of 5; one more ack makes 2, still no majority
    assert ops[k].receive(others[0], _msg(view, "RC_ACK", {"e": 0})) == []
    assert ops[k].chosen is None
    out = ops[k].receive(others[1], _msg(view, "RC_ACK", {"e": 0}))
    chosen = [(to, kind) for to, kind in _kinds(out) if kind == "CHOSEN"]
    assert sorted(chosen) == sorted((p, "CHOSEN") for p in others)
    assert ops[k].chosen is not None and ops[k].chosen.contributors == view.peers
    # acks of another epoch never count
    _, k2, ops2, _ = _coordinator_at_commit()
    others2 = [p for p in view.peers if p != k2]
    for p in others2:
        assert ops2[k2].receive(p, _msg(view, "RC_ACK", {"e": 1})) == []
    assert ops2[k2].chosen is None


def test_acceptor_promises_refuses_lower_epochs_and_reports_its_value() -> None:
    view = group(5, (5, 20))
    member = next(p for p in view.peers if p not in (view.coordinator(0), view.coordinator(1)))
    op = AllReduce(view, member)
    value = Decision((0, 0), view.peers, tuple(bytes([c]) * 16 for c in range(view.n_chunks)))
    out = op.receive(view.coordinator(0), _msg(view, "RCOMMIT", {"e": 0, "val": value.to_wire()}))
    assert _kinds(out) == [(view.coordinator(0), "RC_ACK")]
    # takeover at epoch 1: the member promises and reports the accepted value and epoch
    out = op.receive(view.coordinator(1), _msg(view, "RECOVER", {"e": 1}))
    assert _kinds(out) == [(view.coordinator(1), "RSTATE")]
    state = wire.decode("?", out[0].data, max_bytes=1 << 20).fields
    assert state["ae"] == 0 and Decision.from_wire(state["acc"]) == value
    # epoch 0 is now refused, with a NACK naming the promise
    other = Decision((0, 1), view.peers[:4], value.digests)
    out = op.receive(view.coordinator(0), _msg(view, "RCOMMIT", {"e": 0, "val": other.to_wire()}))
    assert _kinds(out) == [(view.coordinator(0), "NACK")]
    assert wire.decode("?", out[0].data, max_bytes=1 << 20).fields["e"] == 1
    # an RCOMMIT from a peer that is not that epoch's coordinator is refused outright
    impostor = next(p for p in view.peers if p not in (view.coordinator(2), member))
    assert op.receive(impostor, _msg(view, "RCOMMIT", {"e": 2, "val": other.to_wire()})) == []
    assert len(op.rejections) == 1


def test_new_coordinator_reproposes_the_highest_epoch_value() -> None:
    view = group(5, (5, 20))
    c1 = view.coordinator(1)
    op = AllReduce(view, c1)
    op.contribute(contributions(view)[c1])
    recover = op.peer_failed(view.coordinator(0))  # c1 is next in the ranking
    dead = view.coordinator(0)
    assert sorted(_kinds(recover)) == sorted(
        (p, "RECOVER") for p in view.peers if p not in (c1, dead)
    )
    old = Decision((0, 2), view.peers[1:], tuple(bytes([7]) * 16 for _ in range(view.n_chunks)))
    older = Decision((0, 1), view.peers, tuple(bytes([9]) * 16 for _ in range(view.n_chunks)))
    voters = [p for p in view.peers if p not in (c1, view.coordinator(0))]
    states = [(1, old), (0, older)]
    out: list[Send] = []
    for voter, (ae, acc) in zip(voters, states, strict=False):
        fields = {
            "e": 1,
            "ae": ae,
            "acc": acc.to_wire(),
            "ve": 0,
            "vn": 2,
            "s": list(view.peers),
            "sus": [],
        }
        out += op.receive(voter, _msg(view, "RSTATE", fields))
    # its own state + 2 = a majority of 5: it proposes the epoch-1 value unchanged
    proposals = [wire.decode("?", s.data, max_bytes=1 << 20) for s in out]
    assert proposals and all(m.type == "RCOMMIT" and m.fields["e"] == 1 for m in proposals)
    assert {Decision.from_wire(m.fields["val"]) for m in proposals} == {old}
