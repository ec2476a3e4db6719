"""DiLoCo against all-reducing gradients every step: held-out loss against bytes sent.

    nice -n 19 python scripts/bench/diloco.py [--model shoal-tiny|small] [--steps 300]
        [--inner-steps 50] [--batch 4] [--seq 128] [--warmup-steps 0] [--decay-steps N]
        [--threads 1] [--json PATH] [--per-step-from PATH] [--diloco-steps N]

Three peers in one process, each with its own third of the training part of the corpus
(``shoal.training.data.shard``) and its own seeded batches, train the same model from
the same random initialisation for the same number of inner steps on the same batches,
two ways:

- **per step** (data parallel): at every step each peer computes its gradient on the
  shared weights, the three gradients are averaged, and one AdamW step (clipped like the
  inner optimizer) updates the shared weights;
- **DiLoCo** (:class:`shoal.training.diloco.DilocoPeer`): H local AdamW steps per peer,
  then the pseudo-gradients are averaged and every peer applies the outer Nesterov step.

Every average is computed by shoal's sans-io all-reduce (:class:`AllReduce`, fp32 by
default) among the three peers on the in-memory network (``shoal.collectives.memnet``),
which also counts the bytes each peer sends (frame headers, control messages, the
owner's replica to its backup and the all-gather included); the average used for the
step is the all-reduce's result, identical on all three peers. Both ways use the
same inner learning rate at every step: constant, or with ``--warmup-steps`` and
``--decay-steps`` the schedule of :meth:`DilocoConfig.inner_lr_at` (a linear warm-up,
then a cosine decay to 10 %), indexed by the run's inner step (per step: step - 1;
DiLoCo: round x H + i). The held-out loss (the corpus tail) is measured at every round
boundary for both: the table is cumulative bytes and loss at matching step counts, then
the ratios at per step's last step. ``--diloco-steps N`` runs DiLoCo on to step N (its
first ``--steps`` steps are the same as without it) and reports where its loss-against-
bytes curve first comes within 5 % of per step's final loss, and with how many fewer bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from shoal.collectives import AllReduce, Member, make_view
from shoal.collectives.memnet import MemoryNetwork
from shoal.pipeline.config import ModelConfig
from shoal.pipeline.model import DecoderSpan, Span
from shoal.training.data import Batches, byte_tokens, held_out_loss, shard, split_held_out
from shoal.training.diloco import DilocoConfig, DilocoPeer
from shoal.training.flat import flatten

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
PEERS = ("p0", "p1", "p2")

#: shoal-tiny's architecture (shoal/models/shoal-tiny/config.json; 4.79 M parameters)
SHOAL_TINY = ModelConfig.from_hf(
    json.loads((ROOT / "shoal" / "models" / "shoal-tiny" / "config.json").read_text())
)
#: shoal-tiny shrunk to tests/training_peer.py's TINY: 2 blocks, dim 64 (90,560 parameters)
SMALL = replace(
    SHOAL_TINY,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)
MODELS = {"shoal-tiny": SHOAL_TINY, "small": SMALL}


def make_model(config: ModelConfig, seed: int) -> DecoderSpan:
    """GPT-2 style init (normal 0.02, residual projections scaled by depth), as
    scripts/train_tiny.py trains shoal-tiny; the same weights for the same seed."""
    model = DecoderSpan(config, Span.full(config))
    model.tie_weights()
    gen = torch.Generator().manual_seed(seed)
    residual = 0.02 / math.sqrt(2 * config.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2:
                continue  # norms keep their ones
            std = residual if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


# ---- the averages, through shoal's all-reduce -------------------------------------------


def all_reduce(
    tensors: dict[str, torch.Tensor], tag: str, *, codec: str = "fp32"
) -> tuple[torch.Tensor, dict[str, int]]:
    """Average ``tensors`` (peer -> flat fp32) with the sans-io all-reduce on the
    in-memory network; returns the result (the same bytes on every peer: checked) and
    the bytes each peer sent."""
    shape = next(iter(tensors.values())).shape
    view = make_view(tag, [Member(p) for p in tensors], shape, codec=codec)
    ops = {p: AllReduce(view, p) for p in tensors}
    net = MemoryNetwork(ops)
    for peer, tensor in tensors.items():
        net.call(peer, lambda op=ops[peer], t=tensor: op.contribute(t))
    stats = net.run()
    results = [op.result for op in ops.values()]
    if any(r is None for r in results) or len({r.digest for r in results if r}) != 1:
        raise RuntimeError(f"{tag}: the all-reduce did not complete identically on every peer")
    assert results[0] is not None
    return results[0].tensor, {p: stats.bytes_sent[p] for p in tensors}


# ---- the two ways -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Setup:
    """One comparison: model, data, steps, and the (shared) inner optimizer."""

    model: ModelConfig
    steps: int = 300
    inner_steps: int = 50
    batch: int = 4
    seq: int = 128
    inner_lr: float = 1e-3
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    codec: str = "fp32"
    seed: int = 0
    eval_windows: int = 32
    eval_every: int = 0  # 0: every round (inner_steps)
    warmup_steps: int = 0
    decay_steps: int | None = None  # None: no decay (constant after the warm-up)

    def diloco(self) -> DilocoConfig:
        return DilocoConfig(
            inner_steps=self.inner_steps,
            inner_lr=self.inner_lr,
            outer_lr=self.outer_lr,
            outer_momentum=self.outer_momentum,
            warmup_steps=self.warmup_steps,
            decay_steps=self.decay_steps,
        )

    def schedule(self) -> str:
        """The inner learning rate's schedule, in words (for the report's header)."""
        if not self.warmup_steps and self.decay_steps is None:
            return "constant"
        parts = [f"{self.warmup_steps}-step linear warm-up"] if self.warmup_steps else []
        if self.decay_steps is not None:
            parts.append(f"cosine decay to 10 % at step {self.decay_steps}")
        return ", ".join(parts)


@dataclass(slots=True)
class Curve:
    """Held-out loss and cumulative bytes (all peers together) at step counts."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)
    seconds: float = 0.0


def _corpus() -> tuple[torch.Tensor, torch.Tensor]:
    return split_held_out(byte_tokens(CORPUS.read_bytes()))


def _batches(train: torch.Tensor, setup: Setup) -> list[Batches]:
    return [
        Batches(shard(train, i, len(PEERS)), batch=setup.batch, seq=setup.seq, seed=1000 + i)
        for i in range(len(PEERS))
    ]


def _loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    inputs, targets = batch
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def run_per_step(setup: Setup, train: torch.Tensor, held: torch.Tensor) -> Curve:
    """Data parallel: the three gradients averaged by the all-reduce at every step."""
    model = make_model(setup.model, setup.seed)
    cfg = setup.diloco()
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.inner_weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.inner_lr,
        betas=cfg.inner_betas,
    )
    batches = _batches(train, setup)
    every = setup.eval_every or setup.inner_steps
    curve, sent, started = Curve(), 0, time.monotonic()
    for step in range(1, setup.steps + 1):
        grads = {}
        for peer, next_batch in zip(PEERS, batches, strict=True):
            model.zero_grad(set_to_none=True)
            _loss(model, next_batch()).backward()
            grads[peer] = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
        average, by_peer = all_reduce(grads, f"dp/{step:07d}", codec=setup.codec)
        sent += sum(by_peer.values())
        offset = 0
        for p in params:
            p.grad = average[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        for group in opt.param_groups:  # as DiLoCo's inner step round x H + i
            group["lr"] = cfg.inner_lr_at(step - 1)
        opt.step()
        if step % every == 0 or step == setup.steps:
            curve.steps.append(step)
            curve.bytes.append(sent)
            curve.loss.append(
                held_out_loss(model, held, seq=setup.seq, max_windows=setup.eval_windows)
            )
    curve.seconds = time.monotonic() - started
    return curve


def run_diloco(setup: Setup, train: torch.Tensor, held: torch.Tensor) -> Curve:
    """DiLoCo: H inner steps per peer, the pseudo-gradients averaged by the all-reduce."""
    cfg = setup.diloco()
    peers = [
        DilocoPeer(make_model(setup.model, setup.seed), b, cfg, run_id="bench", loss_fn=_loss)
        for b in _batches(train, setup)
    ]
    every = setup.eval_every or setup.inner_steps
    curve, sent, step, started = Curve(), 0, 0, time.monotonic()
    while step < setup.steps:
        h = min(setup.inner_steps, setup.steps - step)
        for p in peers:
            p.config = replace(cfg, inner_steps=h)
        pgs = {name: p.inner_phase() for name, p in zip(PEERS, peers, strict=True)}
        average, by_peer = all_reduce(pgs, f"diloco/{step:07d}", codec=setup.codec)
        sent += sum(by_peer.values())
        hashes = {p.outer_phase(average, PEERS).state_hash for p in peers}
        assert len(hashes) == 1, "the peers' global states differ"
        step += h
        if step % every == 0 or step == setup.steps:
            curve.steps.append(step)
            curve.bytes.append(sent)
            curve.loss.append(
                held_out_loss(peers[0].model, held, seq=setup.seq, max_windows=setup.eval_windows)
            )
    curve.seconds = time.monotonic() - started
    return curve


@dataclass(frozen=True, slots=True)
class Comparison:
    setup: Setup
    params: int
    initial_loss: float
    per_step: Curve
    diloco: Curve

    @property
    def _same_step(self) -> int:
        """Index of DiLoCo's evaluation at per-step's last step (DiLoCo may run longer)."""
        return self.diloco.steps.index(self.per_step.steps[-1])

    @property
    def loss_ratio(self) -> float:
        """DiLoCo's held-out loss over per-step's at per-step's last step (1.05 = 5 % worse)."""
        return self.diloco.loss[self._same_step] / self.per_step.loss[-1]

    @property
    def bytes_ratio(self) -> float:
        """Bytes sent by per-step over bytes sent by DiLoCo, at per-step's last step."""
        return self.per_step.bytes[-1] / self.diloco.bytes[self._same_step]

    def diloco_reach(self, tolerance: float = 0.05) -> tuple[int, int] | None:
        """(step, bytes) of DiLoCo's first evaluation within ``tolerance`` of per-step's
        final loss: the point of the loss-against-bytes curve the issue asks about."""
        target = (1 + tolerance) * self.per_step.loss[-1]
        for step, sent, value in zip(
            self.diloco.steps, self.diloco.bytes, self.diloco.loss, strict=True
        ):
            if value <= target:
                return step, sent
        return None

    def per_step_bytes_to_reach(self, loss: float) -> int | None:
        """Bytes per-step had sent at the first evaluation where its loss was <= ``loss``."""
        for sent, value in zip(self.per_step.bytes, self.per_step.loss, strict=True):
            if value <= loss:
                return sent
        return None


def compare(
    setup: Setup, *, per_step: Curve | None = None, diloco_steps: int | None = None
) -> Comparison:
    """Both runs; ``per_step``: reuse that per-step curve (it does not depend on the outer
    settings) and run DiLoCo only; ``diloco_steps``: run DiLoCo longer than per-step (its
    first ``setup.steps`` steps are the same either way)."""
    train, held = _corpus()
    model = make_model(setup.model, setup.seed)
    initial = held_out_loss(model, held, seq=setup.seq, max_windows=setup.eval_windows)
    params = flatten(model).numel()
    if per_step is None:
        per_step = run_per_step(setup, train, held)
    longer = replace(setup, steps=max(setup.steps, diloco_steps or 0))
    return Comparison(setup, params, initial, per_step, run_diloco(longer, train, held))


def _reuse(path: str, setup: Setup, model: str) -> Curve:
    """The per-step curve of an earlier ``--json`` report with the same inner setup
    (everything but the outer lr and momentum, the learning-rate schedule included; a
    report from before the schedule existed ran with a constant learning rate)."""
    report = json.loads(Path(path).read_text())
    outer = ("outer_lr", "outer_momentum")
    ours = {k: v for k, v in asdict(setup).items() if k != "model" and k not in outer}
    theirs = {"warmup_steps": 0, "decay_steps": None} | {
        k: v for k, v in report["setup"].items() if k not in outer
    }
    if report["model"] != model or theirs != ours:
        raise SystemExit(f"{path} was run with another model or inner setup: {theirs}")
    return Curve(**report["per_step"])


# ---- report -----------------------------------------------------------------------------


def table(result: Comparison) -> str:
    mib = 1 << 20
    lines = [
        "| step | per-step MiB sent | per-step loss | DiLoCo MiB sent | DiLoCo loss | DiLoCo / per-step loss |",
        "|---|---|---|---|---|---|",
    ]
    d, p = result.diloco, result.per_step
    for step in sorted(set(p.steps) | set(d.steps)):
        i = p.steps.index(step) if step in p.steps else None
        j = d.steps.index(step) if step in d.steps else None
        pl = f"{p.loss[i]:.4f}" if i is not None else ""
        pb = f"{p.bytes[i] / mib:.1f}" if i is not None else ""
        dl = f"{d.loss[j]:.4f}" if j is not None else ""
        db = f"{d.bytes[j] / mib:.1f}" if j is not None else ""
        ratio = f"{d.loss[j] / p.loss[i]:.3f}" if i is not None and j is not None else ""
        lines.append(f"| {step} | {pb} | {pl} | {db} | {dl} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="shoal-tiny")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument(
        "--diloco-steps",
        type=int,
        default=0,
        help="run DiLoCo this many steps (more than --steps): where its loss-against-bytes "
        "curve comes within 5 %% of per-step's final loss",
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--inner-lr", type=float, default=1e-3)
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--outer-momentum", type=float, default=0.9)
    parser.add_argument(
        "--warmup-steps", type=int, default=0, help="linear warm-up of the inner lr (both ways)"
    )
    parser.add_argument(
        "--decay-steps",
        type=int,
        default=None,
        help="cosine decay of the inner lr to 10 %% at this step (both ways); -1: --steps",
    )
    parser.add_argument("--codec", choices=["fp32", "fp16", "int8"], default="fp32")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="")
    parser.add_argument(
        "--per-step-from", default="", help="reuse the per-step run of an earlier --json report"
    )
    args = parser.parse_args()
    decay = args.steps if args.decay_steps == -1 else args.decay_steps
    scheduled = args.warmup_steps > 0 or decay is not None
    if scheduled and args.steps % args.inner_steps:
        # DilocoPeer indexes the schedule by round x H, which a shorter last round breaks
        parser.error("a learning-rate schedule needs --steps to be a multiple of --inner-steps")
    torch.set_num_threads(args.threads)
    setup = Setup(
        model=MODELS[args.model],
        steps=args.steps,
        inner_steps=args.inner_steps,
        batch=args.batch,
        seq=args.seq,
        inner_lr=args.inner_lr,
        outer_lr=args.outer_lr,
        outer_momentum=args.outer_momentum,
        codec=args.codec,
        seed=args.seed,
        eval_windows=args.eval_windows,
        eval_every=args.eval_every,
        warmup_steps=args.warmup_steps,
        decay_steps=decay,
    )
    reused = _reuse(args.per_step_from, setup, args.model) if args.per_step_from else None
    result = compare(setup, per_step=reused, diloco_steps=args.diloco_steps)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"\n{args.model} ({result.params:,} parameters), 3 peers, {args.steps} inner steps of "
        f"{args.batch}x{args.seq} bytes per peer, H={args.inner_steps}, inner AdamW lr "
        f"{args.inner_lr} ({setup.schedule()}), outer Nesterov lr {args.outer_lr} momentum "
        f"{args.outer_momentum}, codec {args.codec}; {os.cpu_count()} CPUs, {args.threads} thread(s), "
        f"Python {platform.python_version()}, torch {torch.__version__}, {stamp}\n"
        f"held-out loss at init {result.initial_loss:.4f} nats/byte "
        f"({args.eval_windows} windows of {args.seq} bytes); per-step {result.per_step.seconds:.0f} s, "
        f"DiLoCo {result.diloco.seconds:.0f} s\n"
    )
    print(table(result))
    same = result.diloco.bytes[result._same_step]
    reach = result.per_step_bytes_to_reach(result.diloco.loss[result._same_step])
    print(
        f"\nat {args.steps} steps, loss DiLoCo / per-step: {result.loss_ratio:.4f} "
        f"({'within' if result.loss_ratio <= 1.05 else 'NOT within'} 5 %); "
        f"bytes per-step / DiLoCo: {result.bytes_ratio:.1f}x "
        f"({same / (1 << 20):.1f} MiB against "
        f"{result.per_step.bytes[-1] / (1 << 20):.1f} MiB, all peers)"
    )
    if reach is not None:
        print(
            f"per-step first reached that DiLoCo loss after {reach / (1 << 20):.1f} MiB "
            f"({reach / same:.1f}x DiLoCo's bytes)"
        )
    within = result.diloco_reach()
    if within is None:
        print(
            f"DiLoCo never came within 5 % of per-step's final loss in {result.diloco.steps[-1]} steps"
        )
    else:
        step, sent = within
        print(
            f"loss against bytes: DiLoCo first came within 5 % of per-step's final loss "
            f"({result.per_step.loss[-1]:.4f}) at step {step}, after {sent / (1 << 20):.1f} MiB: "
            f"{result.per_step.bytes[-1] / sent:.1f}x fewer bytes than per-step's "
            f"{result.per_step.bytes[-1] / (1 << 20):.1f} MiB"
        )
    if args.json:
        report = {
            "setup": {k: v for k, v in asdict(setup).items() if k != "model"},
            "model": args.model,
            "params": result.params,
            "initial_loss": result.initial_loss,
            "per_step": asdict(result.per_step),
            "diloco": asdict(result.diloco),
            "loss_ratio": result.loss_ratio,
            "bytes_ratio": result.bytes_ratio,
            "diloco_reach": result.diloco_reach(),
        }
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
