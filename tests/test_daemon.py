"""Real daemons as separate processes on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from shoal.node.cli import app
from tests.daemons import Daemon, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    made: list[Daemon] = []
    yield made
    for daemon in made:
        daemon.kill()


def test_three_daemons_join_and_carry_64_mib(tmp_path: Path, daemons: list[Daemon]) -> None:
    a = Daemon(tmp_path / "a").start()
    daemons.append(a)
    b = Daemon(tmp_path / "b", ("--bootstrap", a.addr)).start()
    c = Daemon(tmp_path / "c", ("--bootstrap", a.addr)).start()
    daemons += [b, c]
    everyone = {a.peer_id, b.peer_id, c.peer_id}
    for daemon in (a, b, c):
        others = everyone - {daemon.peer_id}
        wait_for(
            lambda d=daemon, o=others: o <= d.peers(),
            20,
            f"{daemon.data_dir.name} sees both",
            daemon,
        )
        links = daemon.status()["peers"]
        assert all(not link["relayed"] for link in links)
    # b and c joined only through a: they found each other by peer exchange.
    size, seed = 64 << 20, 1234
    expected = hashlib.sha256(random.Random(seed).randbytes(size)).hexdigest()
    result = b.ping(c.peer_id, size, seed)
    assert result["bytes"] == size
    assert result["sent_sha256"] == result["remote_sha256"] == result["echoed_sha256"] == expected
    assert (result["intact"], result["via"]) == (True, "libp2p")
    # The path tensors take: a bulk stream beside the libp2p connection.
    result = b.ping(c.peer_id, size, seed, bulk=True)
    assert result["sent_sha256"] == result["remote_sha256"] == result["echoed_sha256"] == expected
    assert (result["intact"], result["via"]) == (True, "bulk")
    shown = CliRunner().invoke(
        app, ["ping", c.peer_id, "--bulk", "--bytes", "4096", "--api", b.api]
    )
    assert shown.exit_code == 0, shown.output
    assert f"4096 bytes to {c.peer_id} over bulk" in shown.output and "intact" in shown.output


def test_identity_persists_and_sigterm_exits_cleanly(tmp_path: Path, daemons: list[Daemon]) -> None:
    node = Daemon(tmp_path / "n").start()
    daemons.append(node)
    first = node.peer_id
    code, seconds = node.terminate()
    assert code == 0
    assert seconds < 5.0
    assert not (tmp_path / "n" / "node.json").exists()
    node.start()
    assert node.peer_id == first
    shown = subprocess.run(
        [sys.executable, "-m", "shoal.node.cli", "id", "--data-dir", str(tmp_path / "n")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert f"peer id: {first}" in shown.stdout
    assert node.addr in shown.stdout.replace("\n", "")
    code, seconds = node.terminate()
    assert (code, seconds < 5.0) == (0, True)


def test_node_survives_garbage_on_its_port(tmp_path: Path, daemons: list[Daemon]) -> None:
    a = Daemon(tmp_path / "a").start()
    b = Daemon(tmp_path / "b", ("--bootstrap", a.addr)).start()
    daemons += [a, b]
    wait_for(lambda: a.peer_id in b.peers(), 20, "b joins a", b)
    port = int(a.addr.split("/tcp/")[1].split("/")[0])
    for junk in (b"\x00" * 10, b"GET / HTTP/1.1\r\n\r\n", random.Random(7).randbytes(100_000)):
        # The node may hang up on us first: that is fine.
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
            contextlib.suppress(OSError),
        ):
            sock.sendall(junk)
    result = b.ping(a.peer_id, 4096, 99)
    assert result["intact"] is True
    assert a.status()["peer_id"] == a.peer_id


def test_peers_stay_connected_when_bootstrap_goes_and_rejoin_it(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    with (
        socket.socket() as s
    ):  # a fixed port so that the restarted bootstrap is at the same address
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    a = Daemon(tmp_path / "a", listen=f"/ip4/127.0.0.1/tcp/{port}").start()
    b = Daemon(tmp_path / "b", ("--bootstrap", a.addr)).start()
    c = Daemon(tmp_path / "c", ("--bootstrap", a.addr)).start()
    daemons += [a, b, c]
    wait_for(lambda: c.peer_id in b.peers(), 20, "b finds c", b)
    a.kill()
    wait_for(lambda: a.peer_id not in b.peers(), 20, "b notices a is gone", b)
    assert c.peer_id in b.peers()
    a.start()
    wait_for(lambda: {b.peer_id, c.peer_id} <= a.peers(), 40, "a is rejoined", a)


def test_private_swarm_admits_only_key_holders(tmp_path: Path, daemons: list[Daemon]) -> None:
    key = tmp_path / "swarm.key"
    subprocess.run(
        [sys.executable, "-m", "shoal.node.cli", "keygen", str(key)], check=True, timeout=60
    )
    a = Daemon(tmp_path / "a", ("--swarm-key", str(key))).start()
    daemons.append(a)
    outsider = Daemon(tmp_path / "outsider", ("--bootstrap", a.addr)).start()
    member = Daemon(tmp_path / "member", ("--bootstrap", a.addr, "--swarm-key", str(key))).start()
    daemons += [outsider, member]
    wait_for(lambda: a.peer_id in member.peers(), 20, "member joins", member)
    assert member.ping(a.peer_id, 1 << 20, 5)["intact"] is True
    # By now the outsider has tried to join several times (backoff starts at 0.5 s).
    wait_for(
        lambda: "bootstrap" in outsider.log() and "failed" in outsider.log(),
        20,
        "outsider tried",
        outsider,
    )
    assert outsider.peers() == set()
    assert outsider.peer_id not in a.peers()


def test_swarm_view_converges_and_survives_restart(tmp_path: Path, daemons: list[Daemon]) -> None:
    fast = ("--offline-after", "3")
    a = Daemon(tmp_path / "a", fast).start()
    daemons.append(a)
    b = Daemon(tmp_path / "b", ("--bootstrap", a.addr, *fast)).start()
    c = Daemon(tmp_path / "c", ("--bootstrap", a.addr, *fast)).start()
    daemons += [b, c]
    everyone = {a.peer_id, b.peer_id, c.peer_id}

    def swarm(daemon: Daemon) -> dict:
        return dict(httpx.get(f"{daemon.api}/v1/swarm", timeout=10).json())

    def online(daemon: Daemon) -> set[str]:
        return {p["peer_id"] for p in swarm(daemon)["peers"] if p["online"]}

    for daemon in (a, b, c):
        wait_for(lambda d=daemon: online(d) == everyone, 20, "all online", daemon)
        peers = {p["peer_id"]: p for p in swarm(daemon)["peers"]}
        assert peers[b.peer_id]["addrs"] == b.status()["addrs"]
        assert peers[c.peer_id]["version"] == "0.1.0"
    # A silent peer is marked offline within the bound (3 s here) plus a heartbeat.
    c.kill()
    wait_for(lambda: c.peer_id not in online(a), 3 + 5 + 2, "c marked offline", a)
    # A restarted node shows its last state before it reconnects to anyone.
    b.terminate()
    b.args = ("--offline-after", "3")  # no bootstrap: it must not reconnect first
    (tmp_path / "b" / "peers.json").unlink()
    b.start()
    known = {p["peer_id"] for p in swarm(b)["peers"]}
    assert known == everyone
    assert b.peers() == set()


def test_dht_routes_reject_bad_input_and_announce(tmp_path: Path, daemons: list[Daemon]) -> None:
    node = Daemon(tmp_path / "a").start()
    daemons.append(node)

    def announce(body: dict) -> httpx.Response:
        return httpx.post(f"{node.api}/v1/dht/announce", json=body, timeout=10)

    for body, message in (
        ({"model": "m", "start": 3, "end": 1}, "block span [3, 1) is empty or negative"),
        ({"model": "m", "start": "0", "end": 1}, "start and end must be integers"),
        ({"blob": "XYZ"}, "'XYZ' is not a lowercase hex sha256"),
        ({}, 'expected {"model"'),
    ):
        response = announce(body)
        assert response.status_code == 400
        assert response.json()["error"]["message"].startswith(message)
    assert httpx.get(f"{node.api}/v1/dht/blob/XYZ", timeout=10).status_code == 400
    blob = hashlib.sha256(b"w").hexdigest()
    assert announce({"model": "m", "start": 0, "end": 2}).json()["spans"] == {"m": [0, 2]}
    assert announce({"blob": blob}).json()["blobs"] == [blob]
    holders = wait_for(
        lambda: httpx.get(f"{node.api}/v1/dht/blob/{blob}", timeout=10).json()["holders"],
        10,
        "blob published",
        node,
    )
    assert list(holders) == [node.peer_id]
    assert holders[node.peer_id]["spans"] == {"m": [0, 2]}
