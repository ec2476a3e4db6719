"""Shared helpers of the collectives tests (no tests here): build a group, run it on the in-memory
network, and compute reference reductions independently of shoal.collectives."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import msgpack
import torch

from shoal.collectives import AllReduce, Member, View, make_view
from shoal.collectives.errors import OperationFailed
from shoal.collectives.memnet import Fault, MemoryNetwork, Stats
from shoal.kernels import codecs
from shoal.transport.framing import PREFIX_SIZE, encode_frame

KERNEL = {
    "fp32": ("raw", torch.float32),
    "fp16": ("raw", torch.float16),
    "int8": ("int8_block", torch.float32),
}


def peers(n: int) -> list[str]:
    return [f"peer{i:02d}" for i in range(n)]


def group(
    n: int,
    shape: Sequence[int] = (12, 50),
    *,
    codec: str = "fp32",
    tag: str = "run/0/grads",
    weights: Sequence[float] | None = None,
    bandwidths: Sequence[float] | None = None,
) -> View:
    names = peers(n)
    members = [
        Member(
            p,
            weight=weights[i] if weights else 1.0,
            bandwidth=bandwidths[i] if bandwidths else 1.0 + i,
        )
        for i, p in enumerate(names)
    ]
    return make_view(tag, members, shape, codec=codec)


def contributions(view: View, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(view.shape, generator=g) * scale for p in view.peers}


def run(
    view: View,
    xs: dict[str, torch.Tensor],
    faults: Sequence[Fault] = (),
    *,
    seed: int | None = None,
    silent: Sequence[str] = (),
) -> tuple[dict[str, AllReduce], MemoryNetwork, Stats]:
    ops = {p: AllReduce(view, p) for p in view.peers}
    net = MemoryNetwork(ops, faults, seed=seed)
    for p in view.peers:
        if p not in silent:
            net.call(p, lambda p=p: ops[p].contribute(xs[p]))  # type: ignore[misc]
    stats = net.run()
    return ops, net, stats


def roundtrip(t: torch.Tensor, codec: str, block: int = 64) -> torch.Tensor:
    kind, dtype = KERNEL[codec]
    header, payload = codecs.encode(t.reshape(-1), codec=kind, dtype=dtype, block=block)
    return codecs.decode(header, payload).float()


def reference(view: View, xs: dict[str, torch.Tensor], contributors: Sequence[str]) -> torch.Tensor:
    """The documented reduction, written out here: contributions through the codec, sum of
    w*x in sorted peer order in fp32, divide by the fp32 sum of weights, result through
    the codec."""
    acc = torch.zeros(view.numel, dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float32)
    for p in sorted(contributors):
        w = view.members[view.peers.index(p)].weight
        acc = acc + roundtrip(xs[p], view.codec, view.block) * w
        total = total + w
    return roundtrip(acc / total, view.codec, view.block).reshape(view.shape)


def exact_average(
    view: View, xs: dict[str, torch.Tensor], contributors: Sequence[str]
) -> torch.Tensor:
    ws = {p: view.members[view.peers.index(p)].weight for p in contributors}
    num = sum(xs[p].double() * ws[p] for p in contributors)
    assert isinstance(num, torch.Tensor)
    return num / sum(ws.values())


def sha(t: torch.Tensor) -> bytes:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).digest()


def check_safety(
    view: View, xs: dict[str, torch.Tensor], ops: dict[str, Any], alive: set[str]
) -> tuple[str, ...] | None:
    """The oracles that hold under every fault plan: every live peer finished (completed or
    a typed failure), completed peers hold identical bytes equal to the reference over the
    committed contributor set S. Returns S (None if nobody completed)."""
    for p in alive:
        op = ops[p]
        assert op.finished, f"{p} is neither complete nor failed"
        assert op.result is not None or isinstance(op.error, OperationFailed)
    done = [op.result for op in ops.values() if op.result is not None]
    if not done:
        return None
    contributors = done[0].contributors
    assert all(r.contributors == contributors for r in done)
    assert len({r.digest for r in done}) == 1
    assert all(sha(r.tensor) == r.digest for r in done)
    ref = reference(view, xs, contributors)
    for r in done:
        assert torch.equal(r.tensor, ref)
    return contributors


def rewrite(data: bytes, **changes: Any) -> bytes:
    """Re-encode a frame with some header fields changed (and optionally a new payload)."""
    hlen = int.from_bytes(data[:PREFIX_SIZE], "big")
    header = msgpack.unpackb(data[PREFIX_SIZE : PREFIX_SIZE + hlen], raw=False)
    payload = data[PREFIX_SIZE + hlen :]
    payload = changes.pop("payload", payload)
    x = changes.pop("x", None)
    if x:
        header["x"] = {**header["x"], **x}
    header.update(changes)
    header.pop("n", None)
    return encode_frame(header, payload)
