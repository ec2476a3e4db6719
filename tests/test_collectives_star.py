"""Star all-reduce (one round trip through a leader) and several operations in flight on
one peer (routed by tag), on the in-memory network."""

from __future__ import annotations

import pytest
import torch
from test_collectives_support import check_safety, contributions, group, reference

from shoal.collectives import AllReduce, Collectives, StarAllReduce
from shoal.collectives.errors import BadContribution, CollectiveError, LeaderFailed
from shoal.collectives.memnet import Fault, MemoryNetwork
from shoal.collectives.view import View


def _star(view: View, xs: dict[str, torch.Tensor], faults=(), leader=None):  # type: ignore[no-untyped-def]
    ops = {p: StarAllReduce(view, p, leader=leader) for p in view.peers}
    net = MemoryNetwork(ops, faults)
    for p in view.peers:
        net.call(p, lambda p=p: ops[p].contribute(xs[p]))  # type: ignore[misc]
    stats = net.run()
    return ops, net, stats


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8"])
def test_star_equals_reference_on_every_peer_in_one_round_trip(codec: str) -> None:
    view = group(5, (3, 70), codec=codec)
    xs = contributions(view, seed=3)
    ops, net, stats = _star(view, xs)
    assert check_safety(view, xs, ops, net.alive) == view.peers
    assert all(op.result is not None for op in ops.values())
    assert dict(stats.delivered) == {"SDATA": 4, "SRESULT": 4}


def test_star_member_dead_before_sending_is_left_out() -> None:
    view = group(4)
    xs = contributions(view)
    leader = view.coordinator(0)
    victim = next(p for p in view.peers if p != leader)
    ops, net, _ = _star(view, xs, [Fault(victim, 0, "before")])
    survivors = tuple(sorted(net.alive))
    assert check_safety(view, xs, ops, net.alive) == survivors
    assert all(ops[p].result is not None for p in survivors)


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_star_leader_dead_mid_broadcast_nobody_holds_another_value(index: int) -> None:
    view = group(5)
    xs = contributions(view)
    leader = view.coordinator(0)
    ops, net, _ = _star(view, xs, [Fault(leader, index, "before", kind="SRESULT")])
    check_safety(view, xs, ops, net.alive)
    completed = [p for p in net.alive if ops[p].result is not None]
    assert len(completed) == index
    assert all(isinstance(ops[p].error, LeaderFailed) for p in net.alive if p not in completed)


def test_star_bad_contribution_is_refused() -> None:
    view = group(4)
    xs = contributions(view)
    leader = view.coordinator(0)
    bad = next(p for p in view.peers if p != leader)
    from test_collectives_support import rewrite

    fault = Fault(
        bad, 0, "before", action="corrupt", corrupt=lambda d: rewrite(d, x={"shape": [1]})
    )
    ops, net, _ = _star(view, xs, [fault])
    others = tuple(p for p in view.peers if p != bad)
    assert check_safety(view, xs, ops, net.alive) == others
    assert [type(e) for e in ops[leader].rejections] == [BadContribution]
    assert ops[bad].result is not None  # the refused member still learns the result


def test_several_operations_in_flight_with_distinct_tags() -> None:
    """Three operations at once on every peer (two butterflies with different codecs and
    a star), started in a different order on each peer so messages arrive for tags not
    started yet; one peer dies in the middle."""
    names = [f"peer{i:02d}" for i in range(4)]
    views = {
        "step/7/frag0": group(4, (40, 30), tag="step/7/frag0"),
        "step/7/frag1": group(4, (500,), tag="step/7/frag1", codec="int8"),
        "step/7/loss": group(4, (1,), tag="step/7/loss"),
    }
    xs = {tag: contributions(v, seed=i) for i, (tag, v) in enumerate(views.items())}
    peers = {p: Collectives(p) for p in names}
    ops: dict[str, dict[str, AllReduce | StarAllReduce]] = {tag: {} for tag in views}
    net = MemoryNetwork(peers, [Fault("peer03", 9, "after")], seed=11)
    for k, p in enumerate(names):
        order = list(views)[k % 3 :] + list(views)[: k % 3]
        for tag in order:
            view = views[tag]
            op = StarAllReduce(view, p) if tag.endswith("loss") else AllReduce(view, p)
            ops[tag][p] = op
            net.call(p, lambda p=p, tag=tag, op=op: peers[p].start(tag, op))  # type: ignore[misc]
            net.call(p, lambda op=op, tag=tag, p=p: op.contribute(xs[tag][p]))  # type: ignore[misc]
        if k == 1:  # the other half starts late: messages for their tags are held early
            net.run(deadlines=False)
            assert peers["peer02"].held > 0 and peers["peer03"].held > 0
    net.run()
    assert "peer03" not in net.alive
    for tag, view in views.items():
        contributors = check_safety(view, xs[tag], ops[tag], net.alive)
        assert contributors is not None
        for p in net.alive:
            result = ops[tag][p].result
            assert result is not None, (tag, p, ops[tag][p].error)
            assert result.tag == tag
            assert torch.equal(result.tensor, reference(view, xs[tag], contributors))
    assert all(not c.rejections for c in peers.values())


def test_mux_refuses_early_messages_beyond_its_buffer() -> None:
    view = group(2, (10,))
    a, b = Collectives("peer00", max_early_messages=1), Collectives("peer01")
    op = AllReduce(view, "peer01")
    b.start(view.tag, op)
    sends = op.contribute(torch.zeros(10))
    sends += AllReduce(group(2, (10,), tag="other"), "peer01").contribute(torch.zeros(10))
    for s in sends:
        a.receive("peer01", s.data)
    assert len(a.rejections) == len(sends) - 1
    with pytest.raises(CollectiveError):
        a.start(view.tag, op)  # belongs to peer01


def test_mux_forget_drops_an_operation_and_ignores_its_late_messages() -> None:
    view = group(2, (4, 8), tag="run/9/old")
    a, b = view.peers
    xs = contributions(view)
    ops = {p: AllReduce(view, p) for p in view.peers}
    muxes = {p: Collectives(p) for p in view.peers}
    net = MemoryNetwork(muxes)
    for p in view.peers:
        net.call(p, lambda p=p: muxes[p].start(view.tag, ops[p]) + ops[p].contribute(xs[p]))  # type: ignore[misc]
    net.run()
    assert ops[a].result is not None and ops[b].result is not None
    late = AllReduce(view, a).contribute(xs[a])  # frames of the forgotten operation
    assert late
    muxes[b].forget(view.tag)
    assert view.tag not in muxes[b].ops
    assert [muxes[b].receive(a, s.data) for s in late] == [[] for _ in late]
    assert muxes[b].held == 0  # ignored, not held as early messages
    with pytest.raises(CollectiveError):
        muxes[b].start(view.tag, AllReduce(view, b))  # a tag runs once
