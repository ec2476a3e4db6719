"""The tensor-parallel group runtime without a network: ring schedule, topology rule,
roster rendezvous, the plan's wire form, and whole group steps (star and ring) over an
in-memory network of three members, plus the handler's answers to bad frames."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from shoal.kernels import codecs
from shoal.pipeline.loading import load_span, open_checkpoint
from shoal.pipeline.tensor_parallel import SplitError, plan_split, shard_weights
from shoal.pipeline.tp_group import (
    GroupJoin,
    GroupPlan,
    LinkCost,
    TensorGroup,
    choose_topology,
    group_candidates,
    ring_all_reduce_reference,
    ring_seconds,
    ring_steps,
    star_seconds,
)
from shoal.transport.errors import RemoteError, RpcError
from shoal.transport.rpc import Message

TINY = "shoal-tiny"


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_the_ring_schedule_sums_every_chunk_identically_everywhere(n: int) -> None:
    torch.manual_seed(n)
    parts = [torch.randn(3, 7) for _ in range(n)]
    results = ring_all_reduce_reference(parts)
    for result in results:
        assert torch.equal(result, results[0])  # bit-identical on every member
    torch.testing.assert_close(results[0], sum(parts[1:], parts[0]))
    for rank in range(n):  # each step sends what the previous step received (or owns)
        steps = ring_steps(rank, n)
        assert len(steps) == 2 * (n - 1)
        assert [add for _, _, add in steps] == [True] * (n - 1) + [False] * (n - 1)


def test_star_below_the_crossover_ring_above_it() -> None:
    lan = LinkCost(rtt=0.5e-3, seconds_per_byte=1 / 100e6)  # 0.5 ms, 100 MB/s
    decode = 4096 * 4  # one token of a 4096-wide model in fp32
    assert choose_topology(3, decode, lan) == "star"
    assert choose_topology(8, decode, lan) == "star"
    prefill = 2048 * decode
    assert choose_topology(3, prefill, lan) == "ring"
    assert ring_seconds(3, prefill, lan) < star_seconds(3, prefill, lan)
    assert choose_topology(2, prefill, lan) == "star"  # two members: the ring saves nothing
    assert choose_topology(3, decode, lan, forced="ring") == "ring"
    far = LinkCost(rtt=20e-3, seconds_per_byte=1 / 100e6)  # the rtt moves the crossover up
    assert choose_topology(3, 64 * decode, lan) == "ring"
    assert choose_topology(3, 64 * decode, far) == "star"


def test_group_candidates_match_group_model_span_and_liveness() -> None:
    entry = {"group": "g", "model": "m", "start": 0, "end": 8, "weight": 2.0, "addrs": ["/a"]}
    peers: Mapping[str, Mapping[str, Any]] = {
        "p1": {"tp": entry},
        "p2": {"tp": entry | {"weight": 1}},
        "p3": {"tp": entry | {"group": "other"}},
        "p4": {"tp": entry | {"end": 4}},
        "p5": {"tp": entry},  # offline
        "p6": {"tp": entry | {"weight": -1.0}},
        "p7": {"tp": "garbage"},
        "p8": {},
    }
    online = {"p1", "p2", "p3", "p4", "p6", "p7", "p8"}
    found = group_candidates(peers, online, group="g", model="m", start=0, end=8)
    assert found == {"p1": (2.0, ["/a"]), "p2": (1.0, ["/a"])}


def peer_ids(n: int) -> list[str]:
    return sorted(str(ID.from_pubkey(create_new_key_pair().public_key)) for _ in range(n))


def test_the_plan_survives_the_wire_and_malformed_plans_are_refused() -> None:
    config = open_checkpoint(TINY).config
    members = peer_ids(3)
    split = plan_split(config, dict.fromkeys(members, 1.0))
    plan = GroupPlan(
        group="g", model=TINY, start=0, end=8, split=split,
        addrs={m: [f"/ip4/127.0.0.1/tcp/{i}"] for i, m in enumerate(members)},
        cost=LinkCost(rtt=1e-3, seconds_per_byte=1e-8), topology="auto",
    )  # fmt: skip
    assert GroupPlan.from_wire(plan.to_wire()) == plan
    for bad in ({"members": "x"}, {"shards": [[0, 1]]}, {"cost": [1]}, {"topology": "mesh"}):
        with pytest.raises(SplitError):
            GroupPlan.from_wire(plan.to_wire() | bad)


class MemoryNet:
    """Members' handlers by peer id; a call runs the callee's handler in the caller's task
    (the channel's error mapping included)."""

    def __init__(self) -> None:
        self.groups: dict[str, TensorGroup] = {}
        self.dead: set[str] = set()


class MemoryChannels:
    def __init__(self, me: str, net: MemoryNet) -> None:
        self.me, self.net = me, net

    async def call(self, peer: ID, proto: object, request: Message) -> Message:
        target = str(peer)
        if target in self.net.dead:
            raise RemoteError(target, "stream_broken", "connection lost")
        await trio.lowlevel.checkpoint()
        payload = bytes(request.payload)  # what crosses a network: a copy
        try:
            return await self.net.groups[target].handle(ID.from_base58(self.me), Message(
                dict(request.body), payload
            ))  # fmt: skip
        except RpcError as exc:
            raise RemoteError(target, exc.code, exc.message) from None


class MemoryHost:
    def __init__(self, me: str, net: MemoryNet) -> None:
        self.peer_id = ID.from_base58(me)
        self.channels = MemoryChannels(me, net)


def memory_group(topology: str, weights: tuple[float, ...]) -> tuple[list[TensorGroup], Any]:
    checkpoint = open_checkpoint(TINY)
    full = load_span(checkpoint)
    members = peer_ids(len(weights))
    split = plan_split(checkpoint.config, dict(zip(members, weights, strict=True)))
    plan = GroupPlan(
        group="g", model=TINY, start=0, end=8, split=split, addrs={},
        cost=LinkCost(rtt=1e-3, seconds_per_byte=1e-8), topology=topology,
    )  # fmt: skip
    net = MemoryNet()
    for member in members:
        host = MemoryHost(member, net)
        net.groups[member] = TensorGroup(host, plan, shard_weights(full, split.shard_of(member)))  # type: ignore[arg-type]
    return [net.groups[m] for m in members], (full, net)


@pytest.mark.parametrize("topology", ["star", "ring"])
async def test_group_steps_over_a_memory_network_equal_the_full_blocks(topology: str) -> None:
    groups, (full, _) = memory_group(topology, (1.0, 2.0, 1.0))
    leader = groups[0]
    cache, reference_cache = leader.weights.new_cache(), full.new_cache()
    prompt = torch.tensor([[72, 101, 108, 108, 111]])
    position, tokens, want = 0, [], []
    step = prompt
    with torch.inference_mode():
        for _ in range(6):
            hidden = full.embed(step)
            got = await leader.leader_step(hidden, cache, position, 0, 8)
            expected = full.blocks_forward(hidden, reference_cache)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
            tokens.append(int(full.head(got[:, -1:])[0, -1].argmax()))
            want.append(int(full.head(expected[:, -1:])[0, -1].argmax()))
            position += step.shape[1]
            step = torch.tensor([[tokens[-1]]])
    assert tokens == want
    assert [g.steps for g in groups] == [6, 6, 6]
    assert leader.topologies_used[topology] == 6 * 8 * 2
    assert leader.broken is None


async def test_a_dead_member_breaks_the_group_with_a_typed_error() -> None:
    groups, (full, net) = memory_group("star", (1.0, 1.0, 1.0))
    leader = groups[0]
    broken: list[str] = []
    leader.on_broken(broken.append)
    net.dead.add(groups[2].me)
    with torch.inference_mode():
        hidden = full.embed(torch.tensor([[1, 2, 3]]))
        with trio.fail_after(30), pytest.raises(Exception, match="failed a step") as caught:
            await leader.leader_step(hidden, leader.weights.new_cache(), 0, 0, 8)
    assert "is broken" in str(caught.value) and groups[2].me in broken[0]
    with pytest.raises(Exception, match="is broken"):  # later steps fail at once
        await leader.leader_step(hidden, leader.weights.new_cache(), 0, 0, 8)


async def test_bad_frames_get_typed_errors_and_the_group_keeps_working() -> None:
    groups, (full, _) = memory_group("star", (1.0, 1.0))
    leader, member = groups
    sender = ID.from_base58(leader.me)
    good, payload = codecs.encode(torch.zeros(1, 2, 256))
    step = {"op": "step", "seq": 1, "session": 1, "position": 0, "start": 0, "end": 8}
    cases: list[tuple[dict[str, Any], bytes, str]] = [
        (step | {"hidden": good | {"shape": [1, 2, 255]}}, payload, "bad_request"),
        (step | {"hidden": good | {"shape": [1, 10**9, 256]}}, payload, "bad_request"),
        (step | {"hidden": good | {"dtype": "int64"}}, payload, "bad_request"),
        (step | {"hidden": good}, payload[:-4], "bad_request"),
        (step | {"hidden": good, "end": 9}, payload, "bad_request"),
        (step | {"hidden": good, "position": -1}, payload, "bad_request"),
        (step | {"hidden": good, "position": 3}, payload, "session_unknown"),
        ({"op": "ring", "seq": 1, "index": 0, "step": 2, "chunk": good}, payload, "bad_request"),
        ({"op": "reduce", "seq": 1, "index": 0, "part": good}, payload, "bad_request"),
        ({"op": "nope"}, b"", "bad_request"),
    ]
    for body, data, code in cases:
        with pytest.raises(RpcError) as caught:
            await member.handle(sender, Message(body, data))
        assert caught.value.code == code, body
    stranger = ID.from_base58(peer_ids(1)[0])
    with pytest.raises(RpcError) as caught:
        await member.handle(stranger, Message(step | {"hidden": good}, payload))
    assert caught.value.code == "not_member"
    assert member.broken is None and leader.broken is None
    with torch.inference_mode():
        hidden = full.embed(torch.tensor([[5, 6]]))
        got = await leader.leader_step(hidden, leader.weights.new_cache(), 0, 0, 8)
        torch.testing.assert_close(got, full.blocks_forward(hidden), atol=2e-5, rtol=1e-5)


async def test_a_member_joins_only_its_leaders_plan_for_its_own_group() -> None:
    checkpoint = open_checkpoint(TINY)
    full = load_span(checkpoint)
    members = peer_ids(2)
    split = plan_split(checkpoint.config, dict.fromkeys(members, 1.0))
    plan = GroupPlan(
        group="g", model=TINY, start=0, end=8, split=split, addrs={},
        cost=LinkCost(rtt=1e-3, seconds_per_byte=1e-8), topology="auto",
    )  # fmt: skip
    host = MemoryHost(members[1], MemoryNet())
    host.is_connected = lambda peer: True  # type: ignore[attr-defined]
    loaded: list[int] = []

    def load(shard: Any) -> Any:
        loaded.append(shard.rank)
        return shard_weights(full, shard)

    join = GroupJoin(host, group="g", model=TINY, start=0, end=8, load=load)  # type: ignore[arg-type]
    leader, stranger = ID.from_base58(members[0]), ID.from_base58(peer_ids(1)[0])
    refused = [
        (stranger, plan.to_wire()),  # not from its leader
        (leader, plan.to_wire() | {"group": "other"}),
        (leader, plan.to_wire() | {"end": 4}),
        (leader, plan.to_wire() | {"members": "garbage"}),
    ]
    for sender, body in refused:
        with pytest.raises(RpcError) as caught:
            await join.handle(sender, Message(body))
        assert caught.value.code == "bad_request"
    with pytest.raises(RpcError) as caught:  # no group yet: steps are refused
        await join.handle(leader, Message({"op": "step"}))
    assert caught.value.code == "not_formed"
    assert loaded == []
    assert (await join.handle(leader, Message(plan.to_wire()))).body == {"ok": True}
    assert loaded == [1] and join.group is not None and join.group.rank == 1
    with pytest.raises(RpcError) as caught:
        await join.handle(leader, Message(plan.to_wire()))
    assert caught.value.code == "already_formed"
    echo = await join.handle(stranger, Message({"op": "echo"}, b"ping"))
    assert bytes(echo.payload) == b"ping"
