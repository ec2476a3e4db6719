"""The DiLoCo round engine: H local AdamW steps, an averaged pseudo-gradient, and a
deterministic outer Nesterov step.

One round on every peer::

    pg = peer.inner_phase()                 # H AdamW steps from the global params; global - local
    avg = average(pg)                       # all-reduce (identical bytes on every peer)
    record = peer.outer_phase(avg, members) # outer Nesterov step on CPU in fp32

or ``peer.run_round(average, members)`` with a synchronous ``average``. The inner phase is
free to be nondeterministic (threads, GPU kernels, each peer its own data): only the
averaged pseudo-gradient enters the global state, and the all-reduce hands every peer the
same bytes of it. The outer step is then a function of (params, momentum, average) made
of elementwise IEEE operations only, each rounded on its own (no fused multiply-add, no
reductions), so every peer computes bit-identical new params and momentum on any CPU.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from shoal.training.errors import BadAverage, LayoutMismatch
from shoal.training.flat import Layout, flatten, load_flat
from shoal.training.runlog import RoundRecord

#: One training batch: (input token ids ``[B, T]``, target token ids ``[B, T]``).
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class DilocoConfig:
    """Hyperparameters of a DiLoCo run (every peer of a run must use the same outer ones).

    inner_steps: H, local AdamW steps per round.
    inner_lr, inner_betas, inner_weight_decay, grad_clip: the local AdamW (weight decay
        on tensors of 2+ dimensions only; ``grad_clip`` None: no clipping).
    outer_lr, outer_momentum: the outer Nesterov SGD (the DiLoCo paper's 0.7 and 0.9).
    warmup_steps, decay_steps: the inner learning rate's schedule over the run's inner
        steps (round x H + step, the same on every peer): a linear warm-up, then, with
        ``decay_steps``, a cosine decay to 10 % at that step; constant without either.
    """

    inner_steps: int = 50
    inner_lr: float = 1e-3
    inner_betas: tuple[float, float] = (0.9, 0.95)
    inner_weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    warmup_steps: int = 0
    decay_steps: int | None = None

    def inner_lr_at(self, step: int) -> float:
        """The inner learning rate at inner step ``step`` of the run (0-based)."""
        if step < self.warmup_steps:
            return self.inner_lr * (step + 1) / self.warmup_steps
        if self.decay_steps is None:
            return self.inner_lr
        span = max(1, self.decay_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.inner_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(slots=True)
class OuterState:
    """The global state every peer of a run holds bit-identical: params and outer momentum
    (flat fp32, layout order) and the number of rounds applied."""

    layout: Layout
    params: torch.Tensor
    momentum: torch.Tensor
    round: int = 0

    @classmethod
    def initial(cls, model: nn.Module) -> OuterState:
        params = flatten(model)
        return cls(Layout.of(model), params, torch.zeros_like(params), 0)

    def __post_init__(self) -> None:
        for name in ("params", "momentum"):
            t = getattr(self, name)
            if t.dtype != torch.float32 or t.dim() != 1 or t.numel() != self.layout.numel:
                raise LayoutMismatch(
                    f"{name}: {tuple(t.shape)} {t.dtype}, expected ({self.layout.numel},) fp32"
                )
            if t.device.type != "cpu" or not t.is_contiguous():
                setattr(self, name, t.to("cpu").contiguous())

    def state_hash(self) -> str:
        return state_hash(self.params, self.momentum)

    def clone(self) -> OuterState:
        return OuterState(self.layout, self.params.clone(), self.momentum.clone(), self.round)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The little-endian bytes of an fp32 CPU tensor (the form hashed and downloaded)."""
    return t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()


def state_hash(params: torch.Tensor, momentum: torch.Tensor) -> str:
    """sha256 over the params' bytes, then the outer momentum's bytes (hex)."""
    h = hashlib.sha256()
    h.update(tensor_bytes(params))
    h.update(tensor_bytes(momentum))
    return h.hexdigest()


def outer_step(
    params: torch.Tensor, momentum: torch.Tensor, average: torch.Tensor, *, lr: float, mu: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nesterov SGD on the averaged pseudo-gradient ``g`` (torch.optim.SGD's formulation):

        m' = mu * m + g;   p' = p - lr * (g + mu * m')

    Every operation is a separate elementwise fp32 op on CPU, rounded on its own (IEEE
    multiply and add are exact-rounded whatever the SIMD width; no ``alpha=`` arguments,
    which torch may fuse into an FMA), so the result is a pure function of the inputs'
    bytes. Returns new tensors; the inputs are not modified.
    """
    f32 = torch.float32
    mu_t = torch.tensor(mu, dtype=f32)
    lr_t = torch.tensor(lr, dtype=f32)
    new_m = torch.add(torch.mul(momentum, mu_t), average)
    update = torch.add(average, torch.mul(new_m, mu_t))
    new_p = torch.sub(params, torch.mul(update, lr_t))
    return new_p, new_m


def check_average(average: torch.Tensor, numel: int) -> None:
    if average.dtype != torch.float32:
        raise BadAverage(f"dtype {average.dtype}, expected float32")
    if tuple(average.shape) != (numel,):
        raise BadAverage(f"shape {tuple(average.shape)}, expected ({numel},)")
    if numel and not bool(torch.isfinite(average).all()):
        raise BadAverage("non-finite values")


def _cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    inputs, targets = batch
    logits = model(inputs)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1)
    )


@dataclass(slots=True)
class PhaseStats:
    """What the last inner phase did (for progress bars and run logs)."""

    steps: int = 0
    mean_loss: float = math.nan
    last_loss: float = math.nan
    losses: list[float] = field(default_factory=list)


class DilocoPeer:
    """One peer's DiLoCo engine: a local fp32 model, its inner AdamW, and the global state.

    ``batches`` yields this peer's training batches (its own data shard). ``loss_fn`` maps
    (model, batch) to a scalar loss (default: next-token cross-entropy on ``model(x)``).
    The inner optimizer's state stays local across rounds (as in DiLoCo); it is not part
    of the global state and a joiner starts a fresh one.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Callable[[], Batch],
        config: DilocoConfig,
        *,
        run_id: str,
        state: OuterState | None = None,
        loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = _cross_entropy,
    ) -> None:
        self.model = model
        self.batches = batches
        self.config = config
        self.run_id = run_id
        self.loss_fn = loss_fn
        self.state = state if state is not None else OuterState.initial(model)
        self.state.layout.check(model)
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.inner = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": config.inner_weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=config.inner_lr,
            betas=config.inner_betas,
        )
        self.stats = PhaseStats()
        self.history: list[RoundRecord] = []

    def adopt(self, state: OuterState) -> None:
        """Replace the global state (after a sync); the local model follows at the next round."""
        state.layout.check(self.model)
        self.state = state
        load_flat(self.model, state.params, state.layout)

    def inner_phase(self) -> torch.Tensor:
        """H local steps from the global params; returns the pseudo-gradient (fp32, flat)."""
        load_flat(self.model, self.state.params, self.state.layout)
        self.model.train()
        losses = []
        first = self.state.round * self.config.inner_steps
        for i in range(self.config.inner_steps):
            for group in self.inner.param_groups:
                group["lr"] = self.config.inner_lr_at(first + i)
            loss = self.loss_fn(self.model, self.batches())
            self.inner.zero_grad(set_to_none=True)
            loss.backward()
            if self.config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.inner.step()
            losses.append(float(loss.detach()))
        self.stats = PhaseStats(
            steps=len(losses),
            mean_loss=sum(losses) / len(losses) if losses else math.nan,
            last_loss=losses[-1] if losses else math.nan,
            losses=losses,
        )
        return torch.sub(self.state.params, flatten(self.model))

    def outer_phase(
        self, average: torch.Tensor, members: Sequence[str], *, bytes_sent: int = 0
    ) -> RoundRecord:
        """Apply the averaged pseudo-gradient; returns this round's record."""
        average = average.detach().to("cpu").contiguous()
        check_average(average, self.state.layout.numel)
        params, momentum = outer_step(
            self.state.params,
            self.state.momentum,
            average,
            lr=self.config.outer_lr,
            mu=self.config.outer_momentum,
        )
        self.state = OuterState(self.state.layout, params, momentum, self.state.round + 1)
        load_flat(self.model, params, self.state.layout)
        record = RoundRecord(
            run_id=self.run_id,
            round=self.state.round,
            members=tuple(sorted(members)),
            state_hash=self.state.state_hash(),
            loss=self.stats.mean_loss,
            bytes_sent=bytes_sent,
        )
        self.history.append(record)
        return record

    def run_round(
        self, average: Callable[[torch.Tensor], torch.Tensor], members: Sequence[str]
    ) -> RoundRecord:
        return self.outer_phase(average(self.inner_phase()), members)


__all__ = [
    "Batch",
    "DilocoConfig",
    "DilocoPeer",
    "OuterState",
    "PhaseStats",
    "outer_step",
    "state_hash",
    "tensor_bytes",
]
