"""Churn in a DiLoCo run among real processes on loopback (``tests/training_peer.py``,
``"mode": "run"``): a peer (the coordinator, or another member) is ``kill -9``'d in the
middle of round 3 and a new peer (or the killed one, restarted with its identity) joins
before round 5; the run goes on, the joiner's synced state and every later round's
hash equal the others', and the held-out loss stays within 5% of the run without churn."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from training_peer import held_out, make_peer, stop_processes

# ~40 s on an idle 2-core machine; 4 min was seen with the box loaded 3x over by other
# work, which is over the suite's default 300 s timeout
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

WORKER = Path(__file__).with_name("training_peer.py")
ORIGINALS = ["c0", "c1", "c2"]
ROUNDS, INNER_STEPS, SEED = 8, 10, 7
KILL_ROUND, HOLD_ROUND = 3, 5
WAIT = 400.0


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _start(root: Path, name: str, cfg: dict[str, Any]) -> subprocess.Popen[bytes]:
    path = root / f"{name}.cfg.json"
    path.write_text(json.dumps({"mode": "run", "dir": str(root), "name": name} | cfg))
    with (root / f"{name}.log").open("wb") as log:
        return subprocess.Popen(
            ["nice", "-n", "19", sys.executable, str(WORKER), str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait(root: Path, procs: dict[str, subprocess.Popen[bytes]], what: str, check: Any) -> Any:
    deadline = time.monotonic() + WAIT
    while True:
        value = check()
        if value:
            return value
        for name, proc in procs.items():
            if proc.poll() not in (None, -9) and not (root / f"{name}.final.json").exists():
                log = (root / f"{name}.log").read_text(errors="replace")[-5000:]
                raise AssertionError(f"{name} exited {proc.returncode} waiting for {what}:\n{log}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _rounds(root: Path, name: str) -> list[dict[str, Any]]:
    out = _read(root / f"{name}.out.json")
    return list(out["rounds"]) if out else []


def _baseline_loss() -> tuple[float, float]:
    """The same run without churn, in this process: 3 peers all along (initial, final)."""
    torch.set_num_threads(1)
    peers = [make_peer(i, 3, inner_steps=INNER_STEPS, seed=SEED) for i in range(3)]
    initial = held_out(peers[0].model)
    for _ in range(ROUNDS):
        pgs = [p.inner_phase() for p in peers]
        avg = (pgs[0] + pgs[1] + pgs[2]) / torch.tensor(3.0)
        for p in peers:
            p.outer_phase(avg, ["a", "b", "c"])
    return initial, held_out(peers[0].model)


def _key_seed(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


@pytest.mark.parametrize("kill", ["coordinator", "member", "restart"])
def test_kill_9_mid_round_and_a_joiner_mid_run(tmp_path: Path, kill: str) -> None:
    """``coordinator``: the lowest id dies right after deciding round 3's members (it may
    not have answered everyone: the survivors retry with attempt 1). ``member``: the
    highest id dies as its round-3 all-reduce begins (the survivors' all-reduce drops it).
    ``restart``: as ``member``, and the joiner is the killed peer restarted with its
    identity (the survivors readmit a peer they saw fail)."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    common = {"rounds": ROUNDS, "inner_steps": INNER_STEPS, "seed": SEED, "shards": 3}
    try:
        for i, name in enumerate(ORIGINALS):
            cfg = common | {
                "key_seed": _key_seed(name),
                "shard": i,
                "min_members": 3,
                "kill_round": KILL_ROUND,
                "kill": "member" if kill == "restart" else kill,
                "hold_round": HOLD_ROUND,
                "bootstrap": None if i == 0 else "c0",
            }
            procs[name] = _start(tmp_path, name, cfg)
        # the coordinator (lowest id) kills itself at its first frame of round 3's all-reduce
        victim = _wait(
            tmp_path,
            procs,
            "the victim",
            lambda: next((n for n, p in procs.items() if p.poll() == -9), None),
        )
        survivors = [n for n in ORIGINALS if n != victim]
        _wait(
            tmp_path,
            procs,
            "round 4 on the survivors",
            lambda: all(len(_rounds(tmp_path, n)) >= HOLD_ROUND - 1 for n in survivors),
        )
        # the survivors now wait before round 5; a joiner takes the victim's shard
        joiner = {"shard": ORIGINALS.index(victim), "bootstrap": survivors[1]}
        if kill == "restart":
            joiner["key_seed"] = _key_seed(victim)
        else:
            joiner["batch_seed"] = 999
        procs["j"] = _start(tmp_path, "j", common | joiner)

        def joined() -> bool:
            out = _read(tmp_path / "j.out.json")
            return bool(out and any(e["detail"] == "joined" for e in out["events"]))

        _wait(tmp_path, procs, "the joiner to register", joined)
        (tmp_path / "release").write_text("")
        finals = _wait(
            tmp_path,
            procs,
            "the end of the run",
            lambda: (
                all((tmp_path / f"{n}.final.json").exists() for n in [*survivors, "j"])
                and {n: _read(tmp_path / f"{n}.final.json") for n in [*survivors, "j"]}
            ),
        )
    finally:
        (tmp_path / "exit").write_text("")
        stop_processes(procs.values())
    outs = {n: _read(tmp_path / f"{n}.out.json") for n in [*survivors, "j"]}
    ids = {n: outs[n]["peer_id"] for n in outs}  # type: ignore[index]
    victim_id = _read(tmp_path / f"{victim}.addr.json")["peer_id"]  # type: ignore[index]
    assert procs[victim].returncode == -9
    assert (ids["j"] == victim_id) == (kill == "restart")
    if kill == "coordinator":
        assert victim_id < min(ids[n] for n in survivors)
    else:
        assert victim_id > max(ids[n] for n in survivors)
    originals = sorted([victim_id, *(ids[n] for n in survivors)])
    after_kill = sorted(ids[n] for n in survivors)
    with_joiner = sorted([*after_kill, ids["j"]])
    by_round: dict[int, list[dict[str, Any]]] = {}
    for name in outs:
        for rec in outs[name]["rounds"]:  # type: ignore[index]
            by_round.setdefault(rec["round"], []).append(rec)
    for r in range(1, ROUNDS + 1):
        records = by_round[r]
        assert len({rec["state_hash"] for rec in records}) == 1, (r, records)
        members = {tuple(rec["members"]) for rec in records}
        if r < KILL_ROUND:
            assert members == {tuple(originals)} and len(records) == 2, r
        elif r < HOLD_ROUND:
            assert members == {tuple(after_kill)} and len(records) == 2, r
        else:
            assert members == {tuple(with_joiner)} and len(records) == 3, r
    assert len({by_round[r][0]["state_hash"] for r in by_round}) == ROUNDS
    # the joiner downloaded round 4 from both survivors, and it is the survivors' state
    (sync,) = outs["j"]["syncs"]  # type: ignore[index]
    assert sync["round"] == HOLD_ROUND - 1
    assert sync["state_hash"] == by_round[HOLD_ROUND - 1][0]["state_hash"]
    assert set(sync["parts_from"]) == set(after_kill) and sync["refused"] == []
    assert sum(sync["parts_from"].values()) == 12  # 90,560 params x 8 B in 64 KiB parts
    assert len({outs[n]["state_hash"] for n in outs}) == 1  # type: ignore[index]
    losses = {finals[n]["held_out"] for n in finals}
    assert len(losses) == 1  # same state, same model: the same loss
    (loss,) = losses
    initial, baseline = _baseline_loss()
    assert baseline < initial - 1.0  # the run really trained
    assert abs(loss - baseline) / baseline < 0.05, (loss, baseline)
    print(f"held-out loss: initial {initial:.4f}, no churn {baseline:.4f}, churn {loss:.4f}")
