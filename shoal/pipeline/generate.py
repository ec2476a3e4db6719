"""Generation in one process: prefill the prompt, then decode token by token with a KV cache."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from shoal.kernels.sampling import Sampler, SamplingParams
from shoal.pipeline.errors import PipelineError
from shoal.pipeline.model import DecoderSpan


@dataclass
class GenerationStats:
    """Filled in while :func:`generate` runs."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    tokens: list[int] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first (which the prefill produces) per second of decoding."""
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0


@torch.inference_mode()
def generate(
    model: DecoderSpan,
    prompt: list[int],
    *,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    stop_ids: tuple[int, ...] = (),
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` new token ids for ``prompt`` (a full model, batch 1).

    Stops after yielding a token in ``stop_ids``. When the cache reaches the model's
    context (``max_position_embeddings``), generation goes on from a fresh cache holding
    the most recent half of the tokens (a context shift): positions past the trained
    context would give garbage.
    """
    if not prompt:
        raise ValueError("the prompt has no tokens")
    sampler = Sampler(sampling or SamplingParams())
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    cache = model.new_cache(batch=1)
    history = torch.tensor([prompt], dtype=torch.long, device=model.device)
    started = time.perf_counter()
    context = model.config.max_position_embeddings
    if len(prompt) > context:
        raise PipelineError(
            f"the prompt has {len(prompt)} tokens, more than the model's context of {context}"
        )
    hidden = model.blocks_forward(model.embed(history), cache)
    logits = model.head(hidden[:, -1:])[:, -1]  # the prompt's other positions need no logits
    for i in range(max_new_tokens):
        token = sampler(logits, history)
        now = time.perf_counter()
        if i == 0:
            stats.prefill_seconds, decode_started = now - started, now
        else:
            stats.decode_seconds = now - decode_started
        token_id = int(token)
        stats.new_tokens += 1
        stats.tokens.append(token_id)
        yield token_id
        if token_id in stop_ids or i == max_new_tokens - 1:
            return
        history = torch.cat((history, token.view(1, 1)), dim=1)
        if cache.length < context:
            logits = model(token.view(1, 1), cache)[:, -1]
        else:  # context full: restart from position 0 with the most recent half
            cache = model.new_cache(batch=1)
            logits = model.head(
                model.blocks_forward(model.embed(history[:, -(context // 2) :]), cache)
            )[:, -1]
