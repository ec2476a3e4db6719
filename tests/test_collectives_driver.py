"""The all-reduce among real peer processes on loopback (shoal.collectives.driver).

Each peer is a separate process (tests/collectives_peer.py) with its own libp2p host; the
test builds the same view from the peer ids the processes publish and checks the bytes
they wrote against references computed here: exact for fp32, the documented quantized
reduction (and the stated bound) for int8, identical sha256 everywhere. Faults are
deterministic: a victim SIGKILLs itself just before writing a given frame (its second
reduce-scatter DATA, or its first all-gather CHUNK); bad inputs come from members that
send crafted contributions and from a process outside the group.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from test_collectives_support import exact_average, reference

from shoal.collectives import Member, View, make_view
from shoal.collectives.codec import error_bound

pytestmark = pytest.mark.slow

PEER = Path(__file__).with_name("collectives_peer.py")
NAMES = ["p0", "p1", "p2", "p3"]
SEED = 11
# odd on purpose: chunks of unequal length and a partial last int8 block
SIZE = (1 << 18) + 37
WAIT = 120.0


def contribution(position: int, size: int = SIZE) -> torch.Tensor:
    """What the process at ``position`` contributes (the same formula as the peer)."""
    return torch.randn(size, generator=torch.Generator().manual_seed(SEED * 1000 + position))


@dataclass
class Group:
    root: Path
    names: list[str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(
        self,
        members: Sequence[str],
        ops: list[dict[str, Any]],
        extra: dict[str, dict[str, Any]] | None = None,
        size: int = SIZE,
    ) -> None:
        for name in self.names:
            cfg = {
                "dir": str(self.root),
                "name": name,
                "peers": self.names,
                "members": list(members),
                "ops": ops,
                "size": size,
                "seed": SEED,
                "deadline": 5.0,
                "timeout": 90.0,
                **(extra or {}).get(name, {}),
            }
            path = self.root / f"{name}.cfg.json"
            path.write_text(json.dumps(cfg))
            with (self.root / f"{name}.log").open("wb") as log:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, str(PEER), str(path)], stdout=log, stderr=subprocess.STDOUT
                )

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-4000:]

    def outputs(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Wait (bounded) for the summaries of ``names``."""
        deadline = time.monotonic() + WAIT
        out: dict[str, dict[str, Any]] = {}
        while len(out) < len(names):
            for name in names:
                path = self.root / f"{name}.out.json"
                if name not in out and path.exists():
                    out[name] = json.loads(path.read_text())
                proc = self.procs[name]
                if name not in out and proc.poll() is not None:
                    raise AssertionError(f"{name} exited {proc.returncode}:\n{self.log(name)}")
            if time.monotonic() > deadline:
                missing = [n for n in names if n not in out]
                logs = "\n".join(f"--- {n}\n{self.log(n)}" for n in missing)
                raise AssertionError(f"no outcome from {missing} within {WAIT}s\n{logs}")
            time.sleep(0.1)
        return out

    def finals(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Tell every peer to exit and collect what each recorded until then."""
        (self.root / "exit").write_text("")
        for name in names:
            assert self.procs[name].wait(30) == 0, self.log(name)
        return {n: json.loads((self.root / f"{n}.final.json").read_text()) for n in names}

    def result(self, name: str, tag: str, size: int = SIZE) -> torch.Tensor:
        data = (self.root / f"{name}.{tag.replace('/', '_')}.bin").read_bytes()
        return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(size)

    def view(
        self, out: dict[str, dict[str, Any]], members: Sequence[str], tag: str, codec: str
    ) -> View:
        ids = {n: o["ids"][n] for o in out.values() for n in members}
        return make_view(tag, [Member(ids[m]) for m in members], (SIZE,), codec=codec)

    def close(self) -> None:
        (self.root / "exit").write_text("")
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Group]:
    g = Group(tmp_path, list(NAMES))
    try:
        yield g
    finally:
        g.close()


def by_id(
    view: View, out: dict[str, dict[str, Any]], xs: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    ids = next(iter(out.values()))["ids"]
    return {ids[n]: x for n, x in xs.items()}


def sha_hex(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def check_outcome(
    group: Group,
    out: dict[str, dict[str, Any]],
    tag: str,
    codec: str,
    contributors: Sequence[str],
    members: Sequence[str] = NAMES,
) -> torch.Tensor:
    """Every peer in ``out`` completed ``tag`` over ``contributors`` with identical bytes,
    equal to the documented reduction; returns the result."""
    view = group.view(out, members, tag, codec)
    xs = by_id(view, out, {n: contribution(NAMES.index(n)) for n in members})
    ids = next(iter(out.values()))["ids"]
    ref = reference(view, xs, [ids[c] for c in contributors]).reshape(SIZE)
    for name, o in out.items():
        record = o["ops"][tag]
        assert "error" not in record, (name, record)
        assert record["contributors"] == sorted(contributors), (name, record)
        assert record["sha256"] == sha_hex(ref), name
        assert torch.equal(group.result(name, tag), ref), name
    return ref


def test_four_processes_fp32_int8_star_in_flight_together(group: Group) -> None:
    ops = [
        {"tag": "run/0/fp32", "codec": "fp32"},
        {"tag": "run/0/int8", "codec": "int8"},
        {"tag": "run/0/star", "codec": "fp32", "star": True},
    ]
    group.start(NAMES, ops)
    out = group.outputs(NAMES)
    # fp32: the exact reference (fp32 sum in peer-id order, divided by the weights)
    fp32 = check_outcome(group, out, "run/0/fp32", "fp32", NAMES)
    xs = [contribution(i) for i in range(4)]
    assert torch.allclose(fp32.double(), sum(x.double() for x in xs) / 4, atol=1e-6)
    # int8: the owner's dequantized value everywhere, within the stated bound
    int8 = check_outcome(group, out, "run/0/int8", "int8", NAMES)
    view = group.view(out, NAMES, "run/0/int8", "int8")
    exact = exact_average(view, by_id(view, out, dict(zip(NAMES, xs, strict=True))), view.peers)
    bound = error_bound(xs, "int8", view.block).double()
    err = (int8.double() - exact.reshape(-1)).abs()
    assert bool((err <= bound).all()) and float(err.max()) > 0
    # star: the same reduction through the leader
    star = check_outcome(group, out, "run/0/star", "fp32", NAMES)
    assert torch.equal(star, fp32)
    finals = group.finals(NAMES)
    assert all(f["rejections"] == [] for f in finals.values())


@pytest.mark.parametrize(
    ("phase", "kill", "contributors"),
    [
        # dies after its first reduce-scatter DATA reached one owner: left out of S
        ("reduce-scatter", {"type": "DATA", "index": 1}, ["p0", "p1", "p2"]),
        # dies when first asked for its chunk, after the commit: its data stays in S and
        # its chunk comes from the backup
        ("all-gather", {"type": "CHUNK", "index": 0}, NAMES),
    ],
)
def test_kill_9_one_peer(
    group: Group, phase: str, kill: dict[str, Any], contributors: list[str]
) -> None:
    ops = [{"tag": f"run/1/{phase}", "codec": "fp32"}]
    group.start(NAMES, ops, {"p3": {"kill": kill}})
    survivors = ["p0", "p1", "p2"]
    started = time.monotonic()
    out = group.outputs(survivors)
    assert group.procs["p3"].wait(10) == -signal.SIGKILL
    check_outcome(group, out, f"run/1/{phase}", "fp32", contributors)
    assert time.monotonic() - started < 60
    assert not (group.root / "p3.out.json").exists()


def test_bad_inputs_from_real_peers_are_refused_and_the_round_goes_on(
    tmp_path: Path,
) -> None:
    group = Group(tmp_path, [*NAMES, "outsider"])
    try:
        ops = [{"tag": "run/2/grads", "codec": "fp32"}]
        group.start(
            NAMES,
            ops,
            {
                "p0": {"wait_for": "outsider"},
                "p1": {"wait_for": "outsider", "bad": "nan"},
                "p2": {"wait_for": "outsider", "bad": "shape"},
                "p3": {"wait_for": "outsider"},
                "outsider": {"outsider": True},
            },
        )
        out = group.outputs(NAMES)
        # the bad members still receive the result, averaged over the good ones
        check_outcome(group, out, "run/2/grads", "fp32", ["p0", "p3"])
        finals = group.finals([*NAMES, "outsider"])
        seen = {name: {tuple(r) for r in finals[name]["rejections"]} for name in NAMES}
        for name in ("p0", "p3"):
            assert ("BadContribution", "p2", "shape") in seen[name], (name, seen)
            assert ("NotAMember", "outsider", None) in seen[name], (name, seen)
        # NaN is found when an owner sums the contributions: by the first owner that
        # holds them all (p1 itself may be that one); once the coordinator drops p1, the
        # others sum without it
        assert any(("BadContribution", "p1", "nonfinite") in seen[n] for n in seen), seen
    finally:
        group.close()
