"""Discovery and trust across 10 real daemons (separate processes) on loopback."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.dht import kad
from shoal.dht.records import dht_value_key, server_key, sign_record
from shoal.state.records import SignedUpdate, sign_update
from shoal.state.sync import topic_of
from shoal.transport.host import HostConfig, open_host
from tests.conftest import LOOPBACK
from tests.daemons import Daemon, wait_for

pytestmark = pytest.mark.slow

REFRESH = 3.0
BLOCKS = 8


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Daemon]]:
    """Ten daemons, shared by the tests of this module: the first is everyone's bootstrap."""
    tmp_path = tmp_path_factory.mktemp("dht")
    made: list[Daemon] = []
    try:
        args = ("--dht-refresh", str(REFRESH), "--swarm", "lab")
        made.append(Daemon(tmp_path / "n0", args).start())
        for i in range(1, 10):
            made.append(Daemon(tmp_path / f"n{i}", ("--bootstrap", made[0].addr, *args)).start())
        for daemon in made:
            wait_for(
                lambda d=daemon: d.status()["dht"]["routing_table"] >= 5,
                60,
                "routing table",
                daemon,
            )
        yield made
    finally:
        for daemon in made:
            daemon.kill()


def post(daemon: Daemon, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{daemon.api}{path}", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return dict(response.json())


def view(daemon: Daemon, model: str = "tiny") -> dict[str, Any]:
    response = httpx.get(
        f"{daemon.api}/v1/dht/servers", params={"model": model, "blocks": BLOCKS}, timeout=30
    )
    return dict(response.json())


def test_ten_daemons_find_every_block_and_lose_a_killed_server(swarm: list[Daemon]) -> None:
    s1, s2, s3 = swarm[1], swarm[4], swarm[7]
    post(s1, "/v1/dht/announce", {"model": "tiny", "start": 0, "end": 4})
    post(s2, "/v1/dht/announce", {"model": "tiny", "start": 4, "end": 8})
    post(s3, "/v1/dht/announce", {"model": "tiny", "start": 2, "end": 6})
    blob = hashlib.sha256(b"tiny/model.safetensors").hexdigest()
    post(s3, "/v1/dht/announce", {"blob": blob})
    announced = time.monotonic()

    def servers_of(block: int, alive: tuple[Daemon, ...]) -> list[str]:
        spans = {s1.peer_id: (0, 4), s2.peer_id: (4, 8), s3.peer_id: (2, 6)}
        return sorted(
            d.peer_id for d in alive if spans[d.peer_id][0] <= block < spans[d.peer_id][1]
        )

    expected = [servers_of(b, (s1, s2, s3)) for b in range(BLOCKS)]

    def holders(daemon: Daemon) -> dict[str, Any]:
        return dict(httpx.get(f"{daemon.api}/v1/dht/blob/{blob}", timeout=30).json()["holders"])

    def sees_everything(daemon: Daemon) -> bool:
        return view(daemon)["blocks"] == expected and list(holders(daemon)) == [s3.peer_id]

    # The bound: every node, looking once 1 s after the announcements (all at
    # once), finds every server and the blob holder.
    time.sleep(max(0.0, announced + 1.0 - time.monotonic()))
    with ThreadPoolExecutor(len(swarm)) as pool:
        started = time.monotonic()
        found = list(pool.map(sees_everything, swarm))
        took = time.monotonic() - started
    print(f"1 s after the announcements, found everything: {found} (10 lookups: {took:.2f}s)")
    assert all(found), [d.peer_id for d, ok in zip(swarm, found, strict=True) if not ok]
    for daemon in swarm:
        assert holders(daemon)[s3.peer_id]["spans"] == {"tiny": [2, 6]}

    # kill -9 a server: once its last record has expired (at most 2 x refresh after it
    # was signed), no node lists it, though the DHT still holds its provider records.
    last = view(swarm[0])["servers"][s2.peer_id]
    assert last["expires"] - last["seq"] / 1000 == pytest.approx(2 * REFRESH, abs=0.01)
    s2.kill()
    # Its last record was signed before the kill, so it expires within 2 x refresh of it.
    time.sleep(2 * REFRESH + 0.1)
    survivors = [d for d in swarm if d is not s2]
    for daemon in survivors:
        assert all(s2.peer_id not in block for block in view(daemon)["blocks"])
    remaining = [servers_of(b, (s1, s3)) for b in range(BLOCKS)]
    for daemon in survivors:
        wait_for(lambda d=daemon: view(d)["blocks"] == remaining, 30, "view without s2", daemon)


def test_forged_records_and_updates_are_rejected_by_every_daemon(swarm: list[Daemon]) -> None:
    victim = swarm[3]
    swarm = [d for d in swarm if d.process is not None and d.process.poll() is None]
    post(victim, "/v1/dht/announce", {"model": "other", "start": 0, "end": 2})
    genuine = [[victim.peer_id], [victim.peer_id]] + [[]] * (BLOCKS - 2)
    for daemon in swarm:
        wait_for(lambda d=daemon: view(d, "other")["blocks"] == genuine, 30, "victim found", daemon)

    def rejected(daemon: Daemon) -> int:
        return int(httpx.get(f"{daemon.api}/v1/swarm", timeout=10).json()["rejected_updates"])

    before = [rejected(d) for d in swarm]

    async def attack() -> None:
        mallory = create_new_key_pair()
        async with open_host(HostConfig(key_pair=mallory, listen=(LOOPBACK,))) as host:
            for daemon in swarm:
                await host.connect(daemon.addr)
            # A DHT record in the victim's name, signed by mallory, to every daemon.
            mine = sign_record(
                mallory, swarm="lab", seq=2**40, expires=time.time() + 600, spans={"other": (0, 8)}
            )
            forged = mine.__class__(**{**mine.__dict__, "peer_id": victim.peer_id})
            key = dht_value_key(server_key("lab", victim.peer_id)).encode()
            for daemon in swarm:
                peer = host.libp2p.get_peerstore().peer_ids()
                target = next(p for p in peer if str(p) == daemon.peer_id)
                for raw in (forged.encode(), b"\xc1 garbage"):
                    with pytest.raises(kad.RequestFailed):
                        await kad.put_value(host.libp2p, target, key, raw)
            # A state update in the victim's name (roster entry), and a malformed one,
            # gossiped to the whole swarm.
            await trio.sleep(1.0)  # let gossipsub graft mallory into the mesh
            real = sign_update(mallory, "lab", 10**6, "delta", b"\x00\x00")
            spoofed = SignedUpdate(
                "lab", victim.peer_id, 10**6, "delta", real.update, real.signature
            )
            await host.pubsub.publish(topic_of("lab"), spoofed.encode())
            await host.pubsub.publish(topic_of("lab"), b"\x92\x01")
            await trio.sleep(2.0)

    trio.run(attack)
    for daemon, was in zip(swarm, before, strict=True):
        wait_for(lambda d=daemon, w=was: rejected(d) >= w + 2, 20, "updates rejected", daemon)
        found = view(daemon, "other")
        assert found["blocks"] == genuine
        assert found["servers"][victim.peer_id]["spans"]["other"] == [0, 2]
        assert daemon.process is not None and daemon.process.poll() is None
