"""Next-token sampling: greedy, temperature, top-k, top-p and repetition penalty, seeded.

The processing order is Hugging Face's: repetition penalty, temperature, top-k, top-p.
A :class:`Sampler` owns its random generator, so two samplers with the same seed draw the
same tokens from the same logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to pick the next token.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0: all).
    top_p: keep the smallest set of tokens whose probability reaches p (1.0: all).
    repetition_penalty: > 1 discourages tokens already in the history (CTRL-style).
    seed: seeds the sampler's generator (None: nondeterministic).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(
    logits: torch.Tensor, history: torch.Tensor, penalty: float
) -> torch.Tensor:
    """``logits`` ``[B, V]``; tokens in ``history`` ``[B, N]`` get positive logits divided by
    ``penalty`` and negative ones multiplied by it."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = logits.gather(1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, history, seen)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering; the most likely token always survives."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token when the tokens before it already reach p
    drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(
    logits: torch.Tensor, history: torch.Tensor, params: SamplingParams
) -> torch.Tensor:
    """The filtered, temperature-scaled logits ``[B, V]`` that sampling draws from (fp32)."""
    logits = apply_repetition_penalty(logits.float(), history, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    return filter_top_p(filter_top_k(logits, params.top_k), params.top_p)


class Sampler:
    """Picks next tokens according to :class:`SamplingParams`, with its own generator."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` ``[B, V]``, ``history`` ``[B, N]`` token ids -> next tokens ``[B]``."""
        if history is None:
            history = torch.empty(logits.shape[0], 0, dtype=torch.long, device=logits.device)
        processed = process_logits(logits, history, self.params)
        if self.params.greedy:
            return processed.argmax(dim=-1)
        probs = processed.softmax(dim=-1).cpu()
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1).to(logits.device)
