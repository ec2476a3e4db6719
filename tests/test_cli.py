"""The ``shoal`` command line: what a user types and what they read back."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest
import trio
from typer.testing import CliRunner

from shoal.node.cli import app
from shoal.node.errors import NodeError, _leaves, run_trio
from shoal.transport.identity import IDENTITY_FILE
from shoal.transport.swarmkey import read_swarm_key
from tests.daemons import Daemon

runner = CliRunner()


def test_keygen_writes_a_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    result = runner.invoke(app, ["keygen", str(path)])
    assert result.exit_code == 0, result.output
    assert len(read_swarm_key(path)) == 64
    key = path.read_text()
    result = runner.invoke(app, ["keygen", str(path)])
    assert result.exit_code == 1
    assert "refusing to overwrite" in result.output
    assert path.read_text() == key


def test_id_is_stable_and_lists_bootstrap_addresses(tmp_path: Path) -> None:
    args = ["id", "--data-dir", str(tmp_path)]
    first = runner.invoke(app, args)
    second = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.output == second.output
    peer_id = first.output.split("peer id: ")[1].split()[0]
    assert f"/tcp/4001/p2p/{peer_id}" in first.output.replace("\n", "")


def test_corrupt_identity_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / IDENTITY_FILE).write_bytes(b"junk")
    os.chmod(tmp_path / IDENTITY_FILE, 0o600)
    result = runner.invoke(app, ["node", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "not a valid libp2p private key" in result.output
    assert "delete it to make a new identity" in result.output.replace("\n", " ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bootstrap", "/ip4/1.2.3.4/tcp/4001"], "has no /p2p/"),
        (["--api", "nowhere"], "expected HOST:PORT"),
        (["--config", "/nonexistent.toml"], "cannot read config file"),
    ],
)
def test_bad_options_are_clear_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["node", "--data-dir", str(tmp_path), *args])
    assert result.exit_code == 2
    assert message in result.output


def test_status_against_a_running_daemon(tmp_path: Path) -> None:
    node = Daemon(tmp_path / "n").start()
    try:
        health = httpx.get(f"{node.api}/v1/health", timeout=10).json()
        assert health["ok"] is True
        result = runner.invoke(app, ["status", "--api", node.api, "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert data["peer_id"] == node.peer_id
        assert data["peers"] == []
        assert data["addrs"] == node.info["addrs"]
        table = runner.invoke(app, ["status", "--api", node.api])
        assert node.peer_id in table.output
        assert "0 connected peer(s)" in table.output
        bad = httpx.post(f"{node.api}/v1/ping", content=b"{not json", timeout=10)
        assert (bad.status_code, bad.json()["error"]["code"]) == (400, "bad_json")
        body = {"peer": node.peer_id, "bulk": "yes"}
        bad = httpx.post(f"{node.api}/v1/ping", json=body, timeout=10)
        assert (bad.status_code, bad.json()["error"]["code"]) == (400, "bad_request")
        assert "bulk must be true or false" in bad.json()["error"]["message"]
    finally:
        node.kill()


def test_status_without_a_daemon_says_what_to_do() -> None:
    result = runner.invoke(app, ["status", "--api", "127.0.0.1:1"])
    assert result.exit_code == 1
    assert "is `shoal node` running?" in result.output


async def _interrupted_in_a_nursery() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep_forever)
        raise KeyboardInterrupt


async def _failed_in_a_nursery(*errors: Exception) -> None:
    async def fail(error: Exception) -> None:
        raise error

    async with trio.open_nursery() as nursery:
        for error in errors:
            nursery.start_soon(fail, error)


def test_run_trio_raises_ctrl_c_and_a_lone_error_from_a_nursery_as_themselves() -> None:
    # trio.run alone raises both inside an exception group: the commands' `except
    # KeyboardInterrupt` missed a Ctrl-C during the demo's generation, which exited 1
    with pytest.raises(BaseExceptionGroup):
        trio.run(_interrupted_in_a_nursery)
    with pytest.raises(KeyboardInterrupt):
        run_trio(_interrupted_in_a_nursery)
    with pytest.raises(NodeError, match=r"^port taken$"):
        run_trio(_failed_in_a_nursery, NodeError("port taken"))
    with pytest.raises(ExceptionGroup) as two:  # two errors: the user needs both
        run_trio(_failed_in_a_nursery, NodeError("a"), NodeError("b"))
    errors, rest = two.value.split(NodeError)
    assert rest is None and errors is not None
    assert sorted(str(e) for e in _leaves(errors)) == ["a", "b"]
    with pytest.raises(ExceptionGroup):  # a bug is not dressed up as a user error
        run_trio(_failed_in_a_nursery, ValueError("bug"))


def test_ctrl_c_cancels_the_run_and_is_raised_once_after_its_cleanup() -> None:
    steps: list[str] = []

    async def serve() -> None:
        try:
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
            await trio.sleep_forever()
        finally:
            steps.append("cleaned up")  # reached as a cancellation, not mid-statement

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a shell's background job
    with pytest.raises(KeyboardInterrupt):
        run_trio(serve)
    assert steps == ["cleaned up"]
    assert signal.getsignal(signal.SIGINT) is before
