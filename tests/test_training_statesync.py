"""The state-sync protocol over real libp2p hosts on loopback (one process): a joiner
downloads the state from several peers, a peer serving corrupted parts is skipped, and
malformed or oversized requests get typed errors while the server keeps serving."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import torch
from conftest import loopback_host
from training_peer import tiny_model

from shoal.training.diloco import OuterState
from shoal.training.errors import NoConsensus
from shoal.training.membership import Barrier, coordinator, majority_hash
from shoal.training.statesync import (
    STATE_PROTOCOL,
    Export,
    StateServer,
    agreed_manifest,
    call_manifest,
    call_part,
    fetch_state,
)
from shoal.transport.errors import RemoteError
from shoal.transport.host import Host
from shoal.transport.rpc import Message

RUN = "run-sync"
PART = 16 << 10  # 90,560 params x 8 B = 724,480 B -> 45 parts


def _state(round_: int = 3) -> OuterState:
    model = tiny_model(1)
    state = OuterState.initial(model)
    g = torch.Generator().manual_seed(2)
    momentum = torch.randn(state.layout.numel, generator=g)
    return OuterState(state.layout, state.params.clone(), momentum, round_)


@asynccontextmanager
async def _swarm(n: int) -> AsyncIterator[list[Host]]:
    async with AsyncExitStack() as stack:
        hosts = [await stack.enter_async_context(loopback_host()) for _ in range(n)]
        for host in hosts[1:]:
            await hosts[0].connect(host.listen_addrs()[0])
        yield hosts


@pytest.mark.trio
async def test_parts_from_several_peers_and_a_corrupting_peer_is_skipped() -> None:
    state = _state()
    async with _swarm(4) as (joiner, a, b, c):
        servers = []
        for host in (a, b, c):
            server = StateServer(RUN, part_bytes=PART)
            server.publish(state, [str(a.peer_id), str(b.peer_id), str(c.peer_id)])
            server.serve(host.channels)
            servers.append(server)
        good = servers[2].latest()
        assert good is not None
        # c serves the right manifest, but every part with one bit flipped
        bad_parts = tuple(bytes([p[0] ^ 1]) + p[1:] for p in good.parts)
        servers[2].publish_export(dataclasses.replace(good, parts=bad_parts))
        peers = [str(h.peer_id) for h in (a, b, c)]
        manifest, holders, members = await agreed_manifest(joiner.channels, peers, RUN)
        assert manifest.state_hash == state.state_hash() and manifest.round == 3
        assert sorted(holders) == sorted(peers) and set(members) == set(peers)
        assert len(manifest.part_hashes) == 45
        synced, fetch = await fetch_state(
            joiner.channels, manifest, peers, state.layout, per_peer=1
        )
    assert synced.state_hash() == state.state_hash() and synced.round == 3
    assert torch.equal(synced.momentum, state.momentum)
    sources = {fetch.tried[i][-1] for i in fetch.parts}
    assert sources == set(peers[:2])  # both honest peers served parts; c none
    assert [(r.peer, r.reason) for r in fetch.rejections] == [(peers[2], "sha256 mismatch")]
    assert servers[2].served_parts == 1  # asked once, then never again
    assert servers[0].served_parts + servers[1].served_parts == 45


@pytest.mark.trio
async def test_a_peer_that_dies_mid_download_is_replaced() -> None:
    state = _state()
    async with _swarm(3) as (joiner, a, b):
        peers = [str(a.peer_id), str(b.peer_id)]
        for host in (a, b):
            server = StateServer(RUN, part_bytes=PART)
            server.publish(state, peers)
            server.serve(host.channels)
        manifest, _, _ = await agreed_manifest(joiner.channels, peers, RUN)
        await b.libp2p.close()  # b is gone before the download
        synced, fetch = await fetch_state(joiner.channels, manifest, peers, state.layout)
    assert synced.state_hash() == state.state_hash()
    assert {fetch.tried[i][-1] for i in fetch.parts} == {peers[0]}
    assert peers[1] in fetch.failed_peers


@pytest.mark.trio
async def test_bad_requests_get_typed_errors_and_the_server_keeps_serving() -> None:
    state = _state()
    async with _swarm(2) as (caller, server_host):
        server = StateServer(RUN, part_bytes=PART)
        server.publish(state, [str(server_host.peer_id)])
        server.publish(_state(4), [str(server_host.peer_id)])
        server.publish(_state(5), [str(server_host.peer_id)])  # round 3 is dropped
        server.serve(server_host.channels)
        peer = server_host.peer_id
        cases: list[tuple[dict[str, Any], str]] = [
            ({"t": "part", "run": RUN, "round": "4", "index": 0}, "bad_request"),
            ({"t": "part", "run": RUN, "round": 4, "index": 45}, "bad_request"),
            ({"t": "part", "run": RUN, "round": 4, "index": -1}, "bad_request"),
            ({"t": "part", "run": RUN, "round": 4, "index": True}, "bad_request"),
            ({"t": "part", "run": RUN, "round": 3, "index": 0}, "gone"),
            ({"t": "part", "run": "other", "round": 4, "index": 0}, "unknown_run"),
            ({"t": "delete", "run": RUN}, "bad_request"),
            ({"run": RUN}, "bad_request"),
        ]
        for body, code in cases:
            with pytest.raises(RemoteError) as info:
                await caller.channels.call(peer, STATE_PROTOCOL, Message(body))
            assert info.value.code == code, body
        # a request over the 4 KiB limit: refused by the frame decoder before allocation
        big = dataclasses.replace(STATE_PROTOCOL, max_request=1 << 20)
        with pytest.raises(RemoteError) as info:
            await caller.channels.call(peer, big, Message({"t": "manifest"}, b"x" * 100_000))
        assert info.value.code in ("too_large", "stream_broken")
        # ... and the server goes on serving
        manifest, members = await call_manifest(caller.channels, str(peer), RUN)
        assert manifest.round == 5 and members == (str(peer),)
        part = await call_part(caller.channels, str(peer), RUN, 4, 44)
        assert len(part) == 724_480 - 44 * PART
        assert server.served_parts == 1


@pytest.mark.trio
async def test_a_manifest_without_a_majority_is_refused() -> None:
    async with _swarm(3) as (joiner, a, b):
        for host, round_ in ((a, 3), (b, 4)):
            server = StateServer(RUN, part_bytes=PART)
            members = [str(a.peer_id), str(b.peer_id)]
            server.publish_export(_export(_state(round_), members))
            server.serve(host.channels)
        with pytest.raises(NoConsensus):
            await agreed_manifest(joiner.channels, [str(a.peer_id), str(b.peer_id)], RUN)


def _export(state: OuterState, members: list[str]) -> Export:
    server = StateServer(RUN, part_bytes=PART)
    return server.publish(state, members)


def test_membership_rules() -> None:
    assert coordinator(["c", "a", "b"], ["b", "c"]) == "b"
    assert coordinator(["a"], []) is None
    assert majority_hash({"p1": "x", "p2": "y", "p3": "y"}) == "y"
    assert majority_hash({"p2": "x", "p1": "y"}) == "y"  # a tie goes to the lowest peer id
    barrier = Barrier(4, 0, min_members=2)
    barrier.expect(["a", "b", "c"])
    barrier.report("a", "h")
    assert not barrier.complete(["a", "b", "c"])
    assert barrier.waiting_for(["a", "b"]) == {"b"}  # c is dead: not waited for
    barrier.report("b", "h")
    barrier.report("j", "h")  # a joiner
    barrier.report("d", "other")
    assert barrier.complete(["a", "b"])
    decision = barrier.decide()
    assert decision.members == ("a", "b", "j") and decision.diverged == {"d"}
    assert decision.state_hash == "h" and (decision.round, decision.attempt) == (4, 0)
