"""DiLoCo among 3 peer processes over real libp2p hosts on loopback, the pseudo-gradients
averaged by the collectives driver: every peer ends every round with the same state
hash, equal to an in-process replay of the same run."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from training_peer import make_peer

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("training_peer.py")
NAMES = ["t0", "t1", "t2"]
ROUNDS, INNER_STEPS, SEED = 3, 4, 5
WAIT = 150.0


def _outputs(root: Path, procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + WAIT
    out: dict[str, dict[str, Any]] = {}
    while len(out) < len(NAMES):
        for name in NAMES:
            path = root / f"{name}.out.json"
            if name not in out and path.exists():
                out[name] = json.loads(path.read_text())
            elif name not in out and procs[name].poll() is not None:
                log = (root / f"{name}.log").read_text(errors="replace")[-4000:]
                raise AssertionError(f"{name} exited {procs[name].returncode}:\n{log}")
        assert time.monotonic() < deadline, f"no outcome within {WAIT}s"
        time.sleep(0.1)
    return out


def test_three_processes_stay_bit_identical_and_match_an_in_process_replay(
    tmp_path: Path,
) -> None:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in NAMES:
            cfg = {
                "dir": str(tmp_path),
                "name": name,
                "peers": NAMES,
                "rounds": ROUNDS,
                "inner_steps": INNER_STEPS,
                "seed": SEED,
            }
            path = tmp_path / f"{name}.cfg.json"
            path.write_text(json.dumps(cfg))
            with (tmp_path / f"{name}.log").open("wb") as log:
                procs[name] = subprocess.Popen(
                    ["nice", "-n", "19", sys.executable, str(WORKER), str(path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        out = _outputs(tmp_path, procs)
    finally:
        (tmp_path / "exit").write_text("")
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    ids = sorted(o["peer_id"] for o in out.values())
    for r in range(ROUNDS):
        records = [out[n]["rounds"][r] for n in NAMES]
        assert {rec["round"] for rec in records} == {r + 1}
        assert {tuple(rec["members"]) for rec in records} == {tuple(ids)}
        assert len({rec["state_hash"] for rec in records}) == 1, records
        assert all(rec["bytes_sent"] > 0 for rec in records)
    assert len({out[n]["state_hash"] for n in NAMES}) == 1
    assert len({out["t0"]["rounds"][r]["state_hash"] for r in range(ROUNDS)}) == ROUNDS

    # Replay in this process: same seeds and shards, one thread; the fp32 all-reduce sums
    # in peer-id order and divides by the member count, so the hashes must be equal.
    torch.set_num_threads(1)
    peers = {
        out[n]["peer_id"]: make_peer(i, 3, inner_steps=INNER_STEPS, seed=SEED)
        for i, n in enumerate(NAMES)
    }
    for r in range(ROUNDS):
        pgs = {pid: p.inner_phase() for pid, p in peers.items()}
        acc = torch.zeros_like(next(iter(pgs.values())))
        for pid in ids:
            acc = acc + pgs[pid]
        avg = acc / torch.tensor(3.0)
        hashes = {p.outer_phase(avg, ids).state_hash for p in peers.values()}
        assert hashes == {out["t0"]["rounds"][r]["state_hash"]}, f"round {r + 1}"
