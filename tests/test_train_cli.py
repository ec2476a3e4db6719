"""``shoal train --local``: rounds with a checkpoint every round, a resumed run that
continues the round count and ends bit-identical to an uninterrupted one, and errors that
say what to do."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from libp2p.crypto.ed25519 import create_new_key_pair
from safetensors import safe_open
from training_peer import CORPUS, TINY, write_checkpoint
from typer.testing import CliRunner

from shoal.node.cli import app
from shoal.node.train import TrainOptions, build_peer
from shoal.state.document import SwarmState
from shoal.state.store import load_state, state_path
from shoal.training.runlog import hashes_at

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny"))


def _train(tiny: Path, data_dir: Path, *extra: str) -> str:
    args = ["train", "--local", "--run", "cli-run", "--model", str(tiny), "--data", str(CORPUS)]
    args += ["--inner-steps", "6", "--batch", "4", "--seq", "32", "--data-dir", str(data_dir)]
    result = runner.invoke(app, [*args, *extra])
    assert result.exit_code == 0, result.output
    return result.output


def _checkpoint(data_dir: Path, run: str = "cli-run") -> dict[str, str]:
    path = data_dir / "train" / run / "checkpoint.safetensors"
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def _loss(output: str) -> float:
    match = re.search(r"held-out loss ([0-9.]+)", output)
    assert match, output
    return float(match.group(1))


def test_local_training_checkpoints_and_resumes_where_it_stopped(
    tiny_dir: Path, tmp_path: Path
) -> None:
    first = _train(tiny_dir, tmp_path / "a", "--rounds", "2")
    assert "rounds 0 -> 2" in first
    after_two = _checkpoint(tmp_path / "a")
    assert after_two["round"] == "2" and after_two["run_id"] == "cli-run"
    assert f"state hash {after_two['state_hash']}" in first

    resumed = _train(tiny_dir, tmp_path / "a", "--rounds", "4")
    assert "resuming run cli-run at round 2" in resumed and "rounds 2 -> 4" in resumed
    after_four = _checkpoint(tmp_path / "a")
    assert after_four["round"] == "4" and after_four["state_hash"] != after_two["state_hash"]

    # the inner AdamW state and the data position are checkpointed too, so the resumed
    # run is bit-identical to one that never stopped
    straight = _train(tiny_dir, tmp_path / "b", "--rounds", "4")
    assert "rounds 0 -> 4" in straight
    assert _checkpoint(tmp_path / "b")["state_hash"] == after_four["state_hash"]
    assert _loss(resumed) == _loss(straight) < _loss(first)

    # nothing left to do: says so, and changes nothing
    again = _train(tiny_dir, tmp_path / "a", "--rounds", "4")
    assert "already at round 4" in again
    assert _checkpoint(tmp_path / "a")["state_hash"] == after_four["state_hash"]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--local", "--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/x"], 2, "drop --bootstrap"),
        (["--local", "--shard", "3", "--shards", "3"], 2, "must be in 0..2"),
        (["--local", "--codec", "fp8"], 2, "use one of"),
        (["--local", "--seq", "4096"], 1, "pass a smaller --seq"),
        (["--local", "--outer-momentum", "1"], 2, "--outer-momentum in [0, 1)"),
        (["--local", "--decay"], 2, "--decay needs --rounds"),
        (["--local", "--quorum", "0"], 2, "--quorum must be >= 1"),
    ],
)
def test_bad_options_say_what_to_do(
    tiny_dir: Path, tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    base = ["train", "--run", "r", "--model", str(tiny_dir), "--data", str(CORPUS)]
    result = runner.invoke(app, [*base, *args, "--data-dir", str(tmp_path)])
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split())


def test_scratch_starts_every_peer_from_the_same_random_weights(tiny_dir: Path) -> None:
    def start(**changes: object) -> torch.Tensor:
        fields: dict[str, object] = {"run": "r", "data": CORPUS, "model": str(tiny_dir)}
        options = TrainOptions(**(fields | changes))  # type: ignore[arg-type]
        peer, _ = build_peer(options)
        return peer.state.params

    trained = start()
    scratch = start(scratch=True)
    assert torch.equal(scratch, start(scratch=True, shard=1, shards=3))  # another peer
    assert not torch.equal(scratch, trained)
    assert not torch.equal(scratch, start(scratch=True, run="another run"))
    drawn = scratch[scratch != 1.0]  # norm weights stay at one
    assert drawn.numel() > 0.9 * scratch.numel()
    assert 0.01 < drawn.std().item() < 0.021  # N(0, 0.02); residual projections smaller


def test_missing_data_and_a_checkpoint_of_another_model(tiny_dir: Path, tmp_path: Path) -> None:
    base = ["train", "--local", "--run", "cli-run", "--data-dir", str(tmp_path)]
    result = runner.invoke(app, [*base, "--model", str(tiny_dir), "--data", str(tmp_path / "no")])
    assert result.exit_code == 1 and "cannot read --data" in result.output
    _train(tiny_dir, tmp_path, "--rounds", "1")
    other = write_checkpoint(tmp_path / "other", dataclasses.replace(TINY, intermediate_size=96))
    result = runner.invoke(
        app, [*base, "--model", str(other), "--data", str(CORPUS), "--rounds", "2"]
    )
    assert result.exit_code == 1
    assert "written for another model" in " ".join(result.output.split())


@pytest.mark.slow
@pytest.mark.timeout(900)  # ~35 s idle; minutes when the machine is loaded by other work
def test_two_processes_train_together_and_a_wrong_run_is_refused(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """`shoal train` in swarm mode: a founder (waits for 2 peers) and a joiner through the
    address it printed end with the same state hash; joining another run name fails fast."""
    base = [sys.executable, "-m", "shoal.node.cli", "train", "--model", str(tiny_dir)]
    base += ["--data", str(CORPUS), "--inner-steps", "5", "--rounds", "3", "--batch", "4"]
    base += ["--seq", "32", "--shards", "2", "--listen", "/ip4/127.0.0.1/tcp/0"]
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> subprocess.Popen[bytes]:
        argv = ["nice", "-n", "19", *base, *args, "--data-dir", str(tmp_path / name)]
        with (
            (tmp_path / f"{name}.out").open("wb") as out,
            (tmp_path / f"{name}.err").open("wb") as errors,
        ):
            proc = subprocess.Popen(argv, stdout=out, stderr=errors)
        procs.append(proc)
        return proc

    try:
        founder = start("a", "--run", "cli-swarm", "--shard", "0", "--min-peers", "2")
        deadline = time.monotonic() + 300
        while not (match := re.search(r"--bootstrap (\S+)", (tmp_path / "a.err").read_text())):
            assert founder.poll() is None, (tmp_path / "a.err").read_text()
            assert time.monotonic() < deadline, "the founder printed no address"
            time.sleep(0.2)
        addr = match.group(1)
        wrong = start("w", "--run", "other", "--shard", "1", "--bootstrap", addr)
        assert wrong.wait(300) == 1
        assert "no peer asked trains run 'other'" in " ".join(
            (tmp_path / "w.err").read_text().split()
        )
        joiner = start("b", "--run", "cli-swarm", "--shard", "1", "--bootstrap", addr)
        assert joiner.wait(400) == 0, (tmp_path / "b.err").read_text()[-3000:]
        assert founder.wait(120) == 0, (tmp_path / "a.err").read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    outs = {n: (tmp_path / f"{n}.out").read_text() for n in ("a", "b")}
    hashes = {n: re.search(r"state hash (\w+)", out).group(1) for n, out in outs.items()}  # type: ignore[union-attr]
    assert hashes["a"] == hashes["b"]
    assert all("rounds 0 -> 3" in out for out in outs.values())
    for name in ("a", "b"):
        meta = _checkpoint(tmp_path / name, "cli-swarm")
        assert meta["round"] == "3" and meta["state_hash"] == hashes["a"]
    # the run log in the founder's saved swarm state: its own record of every round, and
    # whatever of the joiner's reached it by gossip, with the same hashes
    state = SwarmState("main", create_new_key_pair())
    assert load_state(state, state_path(tmp_path / "a", "main")) > 0
    for r in (1, 2, 3):
        reported = hashes_at(state, "cli-swarm", r)
        assert len(reported) >= 1 and len(set(reported.values())) == 1, (r, reported)
    assert set(hashes_at(state, "cli-swarm", 3).values()) == {hashes["a"]}
