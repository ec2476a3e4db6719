"""State sync between real libp2p hosts on loopback: gossip, anti-entropy, trust, restart."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.state.document import SwarmState
from shoal.state.records import SignedUpdate, sign_update
from shoal.state.store import load_state, state_path
from shoal.state.sync import StateSync, SyncConfig, topic_of
from shoal.transport.host import Host, HostConfig, open_host
from tests.conftest import LOOPBACK

FAST = SyncConfig(pull_interval=0.5, heartbeat_interval=0.5, offline_after=3.0, save_interval=0.2)
# Heartbeats are writes too: digests only settle in a quiet swarm.
QUIET = SyncConfig(pull_interval=0.5, heartbeat_interval=3600, offline_after=3.0, save_interval=0.2)


@asynccontextmanager
async def open_member(
    key=None, data_dir: Path | None = None, config: SyncConfig = FAST
) -> AsyncIterator[tuple[Host, StateSync]]:
    key = key or create_new_key_pair()
    async with open_host(HostConfig(key_pair=key, listen=(LOOPBACK,))) as host:
        state = SwarmState("lab", key)
        path = state_path(data_dir, "lab") if data_dir else None
        if path is not None:
            load_state(state, path)
        sync = StateSync(host, state, path, config)
        async with trio.open_nursery() as nursery:
            await nursery.start(sync.run)
            yield host, sync
            nursery.cancel_scope.cancel()


async def wait_until(predicate, within: float) -> None:
    """Poll state that other tasks and peers change; there is no event to wait on."""
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.05)


async def test_writes_converge_and_forgeries_are_rejected_everywhere() -> None:
    async with AsyncExitStack() as stack:
        members = [await stack.enter_async_context(open_member(config=QUIET)) for _ in range(4)]
        hub = members[0][0]
        for host, _ in members[1:]:
            await host.connect(hub.listen_addrs()[0])
        syncs = [s for _, s in members]
        syncs[1].write("models", f"{syncs[1].state.me}/tiny", {"blocks": 8})
        syncs[3].write("peer", "spans", {"tiny": [0, 4]})
        await wait_until(
            lambda: (
                len({s.state.digest() for s in syncs}) == 1
                and all(
                    len(s.state.section("models")) == 1 and len(s.state.section("peer")) == 4
                    for s in syncs
                )
            ),
            10,
        )
        for sync in syncs:
            assert sync.state.section("models") == {
                syncs[1].state.me: {f"{syncs[1].state.me}/tiny": {"blocks": 8.0}}
            }
            assert sync.state.section("peer")[syncs[3].state.me]["spans"] == {"tiny": [0.0, 4.0]}
        # Member 2 forges an update in member 1's name and gossips it to everyone.
        victim = syncs[1].state.authors[syncs[1].state.me]
        own = sign_update(syncs[2].state.key_pair, "lab", victim.seq + 1, "delta", b"\x00\x00")
        forged = SignedUpdate(
            "lab", syncs[1].state.me, victim.seq + 1, "delta", own.update, own.signature
        )
        before = [s.rejected for s in syncs]
        await members[2][0].pubsub.publish(topic_of("lab"), forged.encode())
        await wait_until(
            lambda: all(
                s.rejected > b for s, b in zip(syncs, before, strict=True) if s is not syncs[2]
            ),
            10,
        )
        for sync in syncs:
            assert sync.state.authors[syncs[1].state.me].seq == victim.seq
        # Garbage on the topic: logged and counted, nobody crashes, writes keep flowing.
        await members[2][0].pubsub.publish(topic_of("lab"), b"\xc1not msgpack")
        syncs[0].write("peer", "note", "still alive")
        await wait_until(
            lambda: all(
                s.state.section("peer").get(syncs[0].state.me, {}).get("note") == "still alive"
                for s in syncs
            ),
            10,
        )


async def test_failure_detector_marks_a_silent_peer_offline() -> None:
    async with open_member() as (hub, hub_sync):
        async with open_member() as (host, sync):
            await host.connect(hub.listen_addrs()[0])
            await wait_until(
                lambda: hub_sync.liveness.is_online(sync.state.me, trio.current_time()), 10
            )
        start = trio.current_time()
        await wait_until(
            lambda: not hub_sync.liveness.is_online(sync.state.me, trio.current_time()), 10
        )
        assert trio.current_time() - start <= FAST.offline_after + 1.0


async def test_restart_has_its_state_at_once_then_catches_up(tmp_path: Path) -> None:
    key = create_new_key_pair()
    async with open_member(config=QUIET) as (hub, hub_sync):
        async with open_member(key, tmp_path, QUIET) as (host, sync):
            await host.connect(hub.listen_addrs()[0])
            sync.write("peer", "spans", {"tiny": [2, 6]})
            hub_sync.write("peer", "role", "hub")
            await wait_until(lambda: hub_sync.state.digest() == sync.state.digest(), 10)
        saved = SwarmState("lab", key)
        load_state(saved, state_path(tmp_path, "lab"))
        assert saved.section("peer")[saved.me]["spans"] == {"tiny": [2.0, 6.0]}
        assert saved.section("peer")[hub_sync.state.me]["role"] == "hub"
        hub_sync.write("peer", "role", "hub-2")  # written while the node is down
        async with open_member(key, tmp_path, QUIET) as (host, sync):
            # Before connecting to anyone, the state is already there.
            assert sync.state.section("peer")[sync.state.me]["spans"] == {"tiny": [2.0, 6.0]}
            await host.connect(hub.listen_addrs()[0])
            await wait_until(
                lambda: sync.state.section("peer")[hub_sync.state.me].get("role") == "hub-2", 10
            )


async def test_partition_heals_with_every_write_kept() -> None:
    async with AsyncExitStack() as stack:
        members = [await stack.enter_async_context(open_member(config=QUIET)) for _ in range(6)]
        hosts = [h for h, _ in members]
        syncs = [s for _, s in members]
        for i, host in enumerate(hosts):
            for other in hosts[i + 1 :]:
                await host.connect(other.listen_addrs()[0])
        for i, sync in enumerate(syncs):
            sync.write("runs", "before", i)
        with trio.fail_after(15):
            await wait_until(lambda: len({s.state.digest() for s in syncs}) == 1, 15)
        left, right = hosts[:3], hosts[3:]
        for side, other in ((left, right), (right, left)):
            for host in side:
                await host.refuse({h.peer_id for h in other})
        assert all(not a.is_connected(b.peer_id) for a in left for b in right)
        # Both sides write, several times, including the same key on each side.
        for round_ in range(3):
            for i, sync in enumerate(syncs):
                sync.write("runs", f"split-{round_}", f"{i}:{round_}")
        for side in (syncs[:3], syncs[3:]):
            with trio.fail_after(15):
                await wait_until(lambda side=side: len({s.state.digest() for s in side}) == 1, 15)
        assert syncs[0].state.digest() != syncs[3].state.digest()
        for side, other in ((left, right), (right, left)):
            for host in side:
                host.admit({h.peer_id for h in other})
        await hosts[0].connect(hosts[3].listen_addrs()[0])  # one link is enough to heal
        with trio.fail_after(20):
            await wait_until(lambda: len({s.state.digest() for s in syncs}) == 1, 20)
        for sync in syncs:
            runs = sync.state.section("runs")
            assert {author: (v["before"], v["split-2"]) for author, v in runs.items()} == {
                s.state.me: (float(i), f"{i}:2") for i, s in enumerate(syncs)
            }
