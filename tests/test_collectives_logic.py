"""The sans-io all-reduce on the in-memory network: exact values, identical bytes on every
survivor, a kill at every position of the message flow, partitions, determinism."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_collectives_support import (
    check_safety,
    contributions,
    exact_average,
    group,
    reference,
    run,
    sha,
)

from shoal.collectives import AllReduce, wire
from shoal.collectives.errors import (
    ChunkUnavailable,
    CollectiveError,
    NoQuorum,
    OperationFailed,
)
from shoal.collectives.memnet import Fault, MemoryNetwork


def test_results_go_into_out_even_the_contribution_itself_as_gloo_in_place() -> None:
    view = group(4, (7, 33))
    xs = contributions(view, seed=3)
    ref = reference(view, xs, view.peers)
    ins = {p: x.clone() for p, x in xs.items()}  # the contributions, overwritten
    outs = {p: (ins[p] if i % 2 else torch.empty(view.shape)) for i, p in enumerate(view.peers)}
    ops = {p: AllReduce(view, p, out=outs[p]) for p in view.peers}
    net = MemoryNetwork(ops)
    for p in view.peers:
        net.call(p, lambda p=p: ops[p].contribute(ins[p]))  # type: ignore[misc]
    net.run()
    for p, op in ops.items():
        assert op.result is not None and op.result.tensor.data_ptr() == outs[p].data_ptr()
        assert torch.equal(outs[p], ref) and op.result.digest == sha(ref)
    for bad in (torch.empty(7, 32), torch.empty(7, 33, dtype=torch.float64), torch.empty(33, 7).T):
        with pytest.raises(CollectiveError, match="out must be"):
            AllReduce(view, view.peers[0], out=bad)


def test_chunks_held_for_others_go_once_every_live_member_is_done() -> None:
    view = group(4, (7, 33))
    xs = contributions(view, seed=5)
    ops, net, stats = run(view, xs)
    assert stats.delivered["DONE"] == 4 * 3
    assert all(op.result is not None and op.held == 0 for op in ops.values())
    # a FETCH that comes after that is answered NOHAVE (the fetcher tries the next holder)
    p0, p1 = view.peers[:2]
    fetch = wire.encode("FETCH", view.tag, view.vh, {"c": 0, "h": ops[p0].result.chunk_digests[0]})  # type: ignore[union-attr]
    (reply,) = ops[p0].receive(p1, fetch)
    assert wire.header_of(p0, reply.data)["t"] == "NOHAVE"
    # the owner of chunk 0 dies when first asked for it: the others fetch it from the
    # backup, which must still hold it (nobody says DONE before it holds the result)
    owner = view.owner(0, view.peers)
    ops, net, stats = run(view, xs, [Fault(owner, 0, "before", kind="CHUNK")])  # type: ignore[arg-type]
    assert owner not in net.alive and stats.delivered["NOHAVE"] == 0
    assert all(ops[p].result is not None and ops[p].held == 0 for p in net.alive)
    # a member that never says DONE (dead after its result) holds the others' chunks
    # only until it is known to have failed
    silent = view.peers[3]
    ops, net, _ = run(view, xs, [Fault(silent, 0, "before", kind="DONE")])
    assert all(ops[p].result is not None for p in view.peers)
    assert all(ops[p].held == 0 for p in net.alive)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_fp32_result_is_the_exact_reference_on_every_peer(n: int) -> None:
    view = group(n, (7, 33))
    xs = contributions(view, seed=n)
    ops, _, stats = run(view, xs)
    ref = reference(view, xs, view.peers)
    assert torch.allclose(ref.double(), exact_average(view, xs, view.peers), atol=1e-6)
    for op in ops.values():
        assert op.error is None and op.result is not None
        assert op.result.contributors == view.peers
        assert torch.equal(op.result.tensor, ref)
        assert op.result.digest == sha(ref)
        assert op.rejections == []
    assert stats.deadline_rounds == 0


def test_weighted_average_uses_declared_weights() -> None:
    view = group(3, (100,), weights=[1.0, 3.0, 0.5])
    xs = {p: torch.full((100,), float(i + 1)) for i, p in enumerate(view.peers)}
    ops, _, _ = run(view, xs)
    expected = (1.0 * 1 + 3.0 * 2 + 0.5 * 3) / 4.5
    for op in ops.values():
        assert op.result is not None
        assert torch.allclose(op.result.tensor, torch.full((100,), expected))
        assert torch.equal(op.result.tensor, reference(view, xs, view.peers))


def _kinds_sent(view, xs) -> dict[str, list[str]]:  # type: ignore[no-untyped-def]
    """The types of the messages each peer sends, in order, in a fault-free run."""
    ops = {p: AllReduce(view, p) for p in view.peers}
    kinds: dict[str, list[str]] = {p: [] for p in view.peers}

    class Recording(MemoryNetwork):
        def post(self, src, sends):  # type: ignore[no-untyped-def]
            sends = list(sends)
            kinds[src] += [str(wire.header_of(src, s.data)["t"]) for s in sends]
            super().post(src, sends)

    net = Recording(ops)
    for p in view.peers:
        net.call(p, lambda p=p: ops[p].contribute(xs[p]))  # type: ignore[misc]
    stats = net.run()
    assert sum(map(len, kinds.values())) == sum(stats.sent.values())
    return kinds


def _flow(n: int) -> list[tuple[str, int]]:
    """(peer, index) of every message each peer sends in a fault-free run."""
    view = group(n)
    kinds = _kinds_sent(view, contributions(view))
    return [(p, i) for p in view.peers for i in range(len(kinds[p]))]


FLOW4 = _flow(4)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize(("victim", "index"), FLOW4)
def test_kill_at_every_message_survivors_complete_identically(
    victim: str, index: int, when: str
) -> None:
    view = group(4)
    xs = contributions(view, seed=index)
    ops, net, stats = run(view, xs, [Fault(victim, index, when)])  # type: ignore[arg-type]
    assert net.alive == set(view.peers) - {victim}
    survivors = sorted(net.alive)
    contributors = check_safety(view, xs, ops, net.alive)
    # one failure among four (quorum 3, one backup per chunk): every survivor completes
    assert all(ops[p].result is not None for p in survivors), {p: ops[p].error for p in survivors}
    assert contributors is not None
    sent_before_kill = stats.fired[0][1]
    owners = {view.owner(c, view.peers) for c in range(view.n_chunks)}
    if sent_before_kill[victim, "DATA"] < len(owners - {victim}):
        # the victim died before its contribution reached every owner: the average is
        # over the survivors exactly
        assert contributors == tuple(survivors)
        assert torch.equal(ops[survivors[0]].result.tensor, reference(view, xs, survivors))  # type: ignore[union-attr]
    else:
        # its contribution was delivered: a commit proposed before the coordinator heard
        # of the failure includes it (design 6.5), a later one does not
        assert contributors in (tuple(survivors), view.peers)
    if sum(n for (p, kind), n in sent_before_kill.items() if kind == "RCOMMIT") > 0:
        assert contributors == view.peers
    assert stats.steps < 400


def test_coordinator_killed_after_first_rcommit_new_coordinator_keeps_the_value() -> None:
    view = group(4)
    xs = contributions(view)
    coordinator = view.coordinator(0)
    ops, net, _ = run(view, xs, [Fault(coordinator, 0, "after", kind="RCOMMIT")])
    contributors = check_safety(view, xs, ops, net.alive)
    # the one member that accepted the RCOMMIT is in every majority of the 3 survivors,
    # so the new coordinator re-proposes it unchanged: the dead coordinator stays in S
    assert contributors == view.peers
    assert all(ops[p].result is not None for p in net.alive)


def test_coordinator_killed_before_commit_survivors_average_without_it() -> None:
    view = group(5)
    xs = contributions(view)
    coordinator = view.coordinator(0)
    ops, net, _ = run(view, xs, [Fault(coordinator, 0, "before", kind="RCOMMIT")])
    survivors = tuple(sorted(net.alive))
    assert check_safety(view, xs, ops, net.alive) == survivors
    assert all(ops[p].result is not None for p in survivors)


def test_owner_and_backup_dead_after_commit_is_typed_abort_or_identical_result() -> None:
    view = group(4)
    xs = contributions(view)
    # chunk 0: owner peer00, backup peer01; both die once they served nothing
    faults = [
        Fault("peer00", 0, "before", kind="CHUNK"),
        Fault("peer01", 0, "before", kind="CHUNK"),
    ]
    ops, net, _ = run(view, xs, faults)
    check_safety(view, xs, ops, net.alive)
    errors = [ops[p].error for p in net.alive if ops[p].error is not None]
    assert errors and all(isinstance(e, ChunkUnavailable) for e in errors)


@pytest.mark.parametrize("index", range(0, 12))
def test_partition_majority_side_completes_minority_side_fails(index: int) -> None:
    view = group(5)
    xs = contributions(view, seed=index)
    coordinator = view.coordinator(0)
    majority = frozenset([coordinator, *[p for p in view.peers if p != coordinator][:2]])
    minority = frozenset(view.peers) - majority
    fault = Fault(coordinator, index, "before", action="partition", groups=(majority, minority))
    ops, net, _ = run(view, xs, [fault])
    contributors = check_safety(view, xs, ops, net.alive)
    for p in minority:
        assert ops[p].result is not None or isinstance(ops[p].error, NoQuorum | ChunkUnavailable)
    first_rcommit = _kinds_sent(view, xs)[coordinator].index("RCOMMIT")
    if index <= first_rcommit - 1 or contributors == tuple(sorted(majority)):
        # cut before the coordinator proposed anything: the majority side averages over
        # itself, and completes
        assert contributors == tuple(sorted(majority))
        assert all(ops[p].result is not None for p in majority)
    else:
        # the commit may pin chunks whose owner and backup are both on the minority side
        # (two failures > one backup): a typed abort, never another value
        for p in majority:
            assert ops[p].result is not None or isinstance(ops[p].error, ChunkUnavailable)


def test_even_split_partition_nobody_completes() -> None:
    view = group(4)
    xs = contributions(view)
    coordinator = view.coordinator(0)
    half = frozenset([coordinator, next(p for p in view.peers if p != coordinator)])
    fault = Fault(
        coordinator, 0, "before", action="partition", groups=(half, frozenset(view.peers) - half)
    )
    ops, _, _ = run(view, xs, [fault])
    for op in ops.values():
        assert op.result is None and isinstance(op.error, NoQuorum)


def test_silent_member_is_dropped_after_deadlines() -> None:
    view = group(4)
    xs = contributions(view)
    silent = "peer02"
    ops, _, stats = run(view, xs, silent=[silent])
    others = [p for p in view.peers if p != silent]
    for p in others:
        assert ops[p].result is not None
        assert ops[p].result.contributors == tuple(others)  # type: ignore[union-attr]
        assert torch.equal(ops[p].result.tensor, reference(view, xs, others))  # type: ignore[union-attr]
    assert 1 <= stats.deadline_rounds <= 6
    assert isinstance(ops[silent].error, OperationFailed) or ops[silent].result is not None


@pytest.mark.parametrize("seed", range(5))
def test_seeded_scheduler_is_deterministic_and_safe(seed: int) -> None:
    view = group(5)
    xs = contributions(view, seed=seed)
    faults = [Fault("peer03", 2, "after")]
    outcomes = []
    for _ in range(2):
        ops, net, stats = run(view, xs, faults, seed=seed)
        check_safety(view, xs, ops, net.alive)
        outcomes.append(
            (
                stats.steps,
                dict(stats.delivered),
                {p: (op.result and op.result.digest, repr(op.error)) for p, op in ops.items()},
            )
        )
    assert outcomes[0] == outcomes[1]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(3, 6),
    codec=st.sampled_from(["fp32", "fp16", "int8"]),
    kills=st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 25), st.sampled_from(["before", "after"])),
        max_size=2,
    ),
    seed=st.one_of(st.none(), st.integers(0, 2**16)),
    bandwidths=st.lists(st.floats(0.0, 8.0), min_size=6, max_size=6),
)
def test_any_fault_schedule_never_yields_different_results(
    n: int, codec: str, kills: list[tuple[int, int, str]], seed: int | None, bandwidths: list[float]
) -> None:
    bw = bandwidths[:n]
    if not any(b > 0 for b in bw):
        bw[0] = 1.0
    view = group(n, (5, 41), codec=codec, bandwidths=bw)
    xs = contributions(view, seed=n)
    faults = [Fault(view.peers[k % n], i, w) for k, i, w in kills]  # type: ignore[arg-type]
    ops, net, stats = run(view, xs, faults, seed=seed)
    contributors = check_safety(view, xs, ops, net.alive)
    dead = set(view.peers) - net.alive
    if len(dead) <= 1 and sum(b > 0 for b in bw) >= 2:
        # at most one failure, and every chunk has a backup: everyone alive completes
        # (with one owner-capable member, its death is a typed abort, checked above)
        assert all(ops[p].result is not None for p in net.alive), {
            p: ops[p].error for p in net.alive
        }
        assert contributors is not None and set(net.alive) <= set(contributors)
    assert stats.steps < 60 * n * n
