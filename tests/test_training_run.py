"""TrainingRun among three real hosts in one process (loopback): a peer whose state
diverged by one ulp is named by the coordinator, resyncs from the majority in one
download and is back in the run two rounds later; the run's records and the serving side's typed errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
import torch
import trio
from conftest import loopback_host
from training_peer import make_peer

from shoal.collectives.driver import DriverConfig, open_collectives
from shoal.training.diloco import DilocoPeer, OuterState
from shoal.training.run import ROUND_PROTOCOL, RunConfig, RunEvent, TrainingRun
from shoal.training.runlog import RoundRecord
from shoal.transport.errors import RemoteError
from shoal.transport.rpc import Message

RUN = "run-inproc"
ROUNDS, DIVERGE_AFTER = 6, 2


def _diverge_after(peer: DilocoPeer, round_: int) -> None:
    """After round ``round_``'s outer step, one parameter of ``peer`` moves by one ulp."""
    outer = peer.outer_phase

    def outer_phase(average: torch.Tensor, members: Any, **kw: Any) -> RoundRecord:
        record = outer(average, members, **kw)
        if record.round == round_:
            state = peer.state
            params = state.params.clone()
            params[0] = torch.nextafter(params[0], torch.tensor(float("inf")))
            peer.adopt(OuterState(state.layout, params, state.momentum, state.round))
            record = dataclasses.replace(record, state_hash=peer.state.state_hash())
        return record

    peer.outer_phase = outer_phase  # type: ignore[method-assign]


@pytest.mark.trio
@pytest.mark.parametrize("codec", ["fp32", "int8"])
async def test_a_diverged_peer_resyncs_from_the_majority_and_rejoins(codec: str) -> None:
    torch.set_num_threads(1)
    records: dict[int, list[RoundRecord]] = {0: [], 1: [], 2: []}

    def collect(i: int) -> Callable[[RunEvent], None]:
        def on_event(event: RunEvent) -> None:
            if event.kind == "round" and event.record is not None:
                records[i].append(event.record)

        return on_event

    config = RunConfig(
        run_id=RUN, rounds=ROUNDS, codec=codec, min_members=3, part_bytes=64 << 10, linger=1.0
    )
    async with AsyncExitStack() as stack:
        hosts = [await stack.enter_async_context(loopback_host()) for _ in range(3)]
        drivers = [
            await stack.enter_async_context(
                open_collectives(h, DriverConfig(deadline=10.0, timeout=120.0))
            )
            for h in hosts
        ]
        peers = [make_peer(i, 3, inner_steps=20, seed=11, run_id=RUN) for i in range(3)]
        _diverge_after(peers[2], DIVERGE_AFTER)
        runs = [
            TrainingRun(h, d, p, config, events=collect(i))
            for i, (h, d, p) in enumerate(zip(hosts, drivers, peers, strict=True))
        ]
        for host in hosts[1:]:
            await host.connect(hosts[0].listen_addrs()[0])
        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(runs[0].run, ())
                for run in runs[1:]:
                    nursery.start_soon(run.run, [runs[0].me])
    ids = sorted(run.me for run in runs)
    honest = [records[0], records[1]]
    for r in range(1, ROUNDS + 1):
        hashes = {recs[r - 1].state_hash for recs in honest}
        assert len(hashes) == 1, r
        assert [rec.round for rec in honest[0]] == list(range(1, ROUNDS + 1))
    by_round = {rec.round: rec for rec in records[2]}
    # rounds 1-2 with everyone; the diverged peer reported another hash for round 2
    assert by_round[1].state_hash == honest[0][0].state_hash
    assert by_round[2].state_hash != honest[0][1].state_hash
    assert honest[0][0].members == tuple(ids) and honest[0][1].members == tuple(ids)
    # round 3 went on without it; it downloaded the majority's state and came back
    assert runs[2].me not in honest[0][2].members and len(honest[0][2].members) == 2
    # it registered for a round ahead, so one download sufficed: the majority's state of
    # round 3 (of round 4 if round 4 was decided before it could register)
    assert len(runs[2].syncs) == 1, runs[2].syncs
    sync = runs[2].syncs[0]
    assert sync.round > DIVERGE_AFTER and sync.state_hash == honest[0][sync.round - 1].state_hash
    assert set(sync.parts_from) <= {runs[0].me, runs[1].me} and not sync.refused
    assert sum(sync.parts_from.values()) == 12
    back = min((r for r in by_round if r > DIVERGE_AFTER), default=ROUNDS + 1)
    assert back == sync.round + 1 <= ROUNDS
    for r in range(back, ROUNDS + 1):
        assert by_round[r].state_hash == honest[0][r - 1].state_hash
        assert honest[0][r - 1].members == tuple(ids)
    assert runs[0].peer.state.state_hash() == runs[2].peer.state.state_hash()


@pytest.mark.trio
async def test_round_protocol_refuses_bad_requests() -> None:
    async with (
        loopback_host() as a,
        loopback_host() as b,
        open_collectives(a) as driver,
    ):
        peer = make_peer(0, 1, inner_steps=1, seed=1, run_id=RUN)
        run = TrainingRun(a, driver, peer, RunConfig(run_id=RUN, rounds=1, linger=60))
        async with trio.open_nursery() as nursery:
            await nursery.start(run.run, ())  # founds the run, 1 round alone, then serves
            cases: list[tuple[dict[str, Any], str]] = [
                ({"t": "hello", "run": "other"}, "unknown_run"),
                ({"t": "hello"}, "bad_request"),
                ({"t": "ready", "run": RUN, "round": -1, "attempt": 0, "hash": "x"}, "bad_request"),
                (
                    {"t": "ready", "run": RUN, "round": 5, "attempt": "0", "hash": "x"},
                    "bad_request",
                ),
                ({"t": "ready", "run": RUN, "round": 5, "attempt": 0, "hash": 7}, "bad_request"),
                ({"t": "join", "run": RUN, "round": 0}, "late"),
                ({"t": "join", "run": RUN, "round": 9}, "not_ready"),
                ({"t": "vote", "run": RUN, "round": 1}, "bad_request"),
            ]
            await b.connect(a.listen_addrs()[0])
            for body, code in cases:
                with pytest.raises(RemoteError) as info:
                    await b.channels.call(a.peer_id, ROUND_PROTOCOL, Message(body))
                assert info.value.code == code, body
            reply = await b.channels.call(
                a.peer_id, ROUND_PROTOCOL, Message({"t": "hello", "run": RUN})
            )
            assert reply.body["members"] == [run.me] and reply.body["round"] >= 0
            nursery.cancel_scope.cancel()


@pytest.mark.trio
async def test_waiting_ready_requests_do_not_wake_each_other_forever() -> None:
    """Two READYs for a round this coordinator has not reached wait for its decision;
    each notifies once. (They used to notify on every wake-up and so woke each other
    in a busy loop that starved the host: round 1 of a 3-peer test took minutes.)"""
    async with (
        loopback_host() as a,
        loopback_host() as b,
        loopback_host() as c,
        open_collectives(a) as driver,
    ):
        peer = make_peer(0, 1, inner_steps=1, seed=1, run_id=RUN)
        run = TrainingRun(a, driver, peer, RunConfig(run_id=RUN, rounds=1, linger=60))
        notified = 0
        notify = run._notify

        def counting() -> None:
            nonlocal notified
            notified += 1
            notify()

        async with trio.open_nursery() as nursery:
            await nursery.start(run.run, ())
            with trio.fail_after(30):
                while peer.state.round < 1:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            run._notify = counting  # type: ignore[method-assign]
            body = {"t": "ready", "run": RUN, "round": 2, "attempt": 0, "hash": "ab" * 32}
            for caller in (b, c):
                await caller.connect(a.listen_addrs()[0])
            with trio.move_on_after(1.5):
                async with trio.open_nursery() as callers:
                    for caller in (b, c):
                        callers.start_soon(
                            caller.channels.call, a.peer_id, ROUND_PROTOCOL, Message(body)
                        )
            assert notified == 2
            assert set(run._barriers[(2, 0)].reports) == {str(b.peer_id), str(c.peer_id)}
            nursery.cancel_scope.cancel()


@pytest.mark.trio
@pytest.mark.parametrize("quorum", [1, 2])
async def test_a_peer_left_alone_goes_on_or_waits_for_its_quorum(quorum: int) -> None:
    """Two peers train round 1 together; then one leaves (its run ends, its host closes).
    With quorum 1 the other finishes rounds 2 and 3 alone; with quorum 2 it waits, past
    its READY timeout, and decides nothing on its own."""
    torch.set_num_threads(1)
    rounds: dict[int, list[int]] = {0: [], 1: []}

    def collect(i: int) -> Callable[[RunEvent], None]:
        def on_event(event: RunEvent) -> None:
            if event.kind == "round" and event.record is not None:
                rounds[i].append(event.record.round)

        return on_event

    config = RunConfig(
        run_id=RUN, rounds=3, min_members=2, quorum=quorum, ready_timeout=1.0,
        part_bytes=64 << 10, linger=0.5,
    )  # fmt: skip
    driver_config = DriverConfig(deadline=10.0, timeout=120.0)
    peers = [make_peer(i, 2, inner_steps=10, seed=11, run_id=RUN) for i in range(2)]
    async with loopback_host() as host, open_collectives(host, driver_config) as driver:
        stays = TrainingRun(host, driver, peers[0], config, events=collect(0))
        stopped = trio.Event()

        async def leave_after_round_1() -> None:
            async with (
                loopback_host() as other,
                open_collectives(other, driver_config) as other_driver,
            ):
                leaves = dataclasses.replace(config, rounds=1)
                run = TrainingRun(other, other_driver, peers[1], leaves, events=collect(1))
                await other.connect(host.listen_addrs()[0])
                await run.run([stays.me])
            stopped.set()  # its run ended and its host closed: the connection is gone

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stays.run, ())
                nursery.start_soon(leave_after_round_1)
                if quorum == 2:
                    await stopped.wait()
                    await trio.sleep(5.0)  # five READY timeouts
                    nursery.cancel_scope.cancel()
    assert rounds[1] == [1]
    assert rounds[0] == ([1, 2, 3] if quorum == 1 else [1])
    assert stays.peer.state.round == (3 if quorum == 1 else 1)
