"""Sampling: the same filtering as transformers' logits processors, seeded and reproducible."""

from __future__ import annotations

import pytest
import torch

from shoal.kernels.sampling import Sampler, SamplingParams, process_logits


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 50, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_after_repetition_penalty() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.9, -2.0]])
    assert Sampler(SamplingParams())(logits).tolist() == [1]
    # token 1 was seen: 4.0 / 1.1 < 3.9
    params = SamplingParams(repetition_penalty=1.1)
    assert Sampler(params)(logits, torch.tensor([[1]])).tolist() == [2]


def test_processing_matches_transformers_processors() -> None:
    pytest.importorskip("transformers")
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits, history = (
        _logits(),
        torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1)),
    )
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.3)
    expected = logits.clone()
    for proc in (
        RepetitionPenaltyLogitsProcessor(1.3),
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(20),
        TopPLogitsWarper(0.8),
    ):
        expected = proc(history, expected)
    ours = process_logits(logits, history, params)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    kept = ~torch.isinf(ours)
    torch.testing.assert_close(ours[kept], expected[kept])
    assert 0 < int(kept.sum()) < 3 * 20


def test_same_seed_same_tokens_different_seed_different_tokens() -> None:
    params = SamplingParams(temperature=1.5, top_k=40, seed=7)

    def draw(p: SamplingParams) -> list[int]:
        sampler = Sampler(p)
        return [t for i in range(20) for t in sampler(_logits(i)).tolist()]

    first = draw(params)
    assert first == draw(params)
    assert first != draw(SamplingParams(temperature=1.5, top_k=40, seed=8))
    assert len(set(first)) > 10


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    logits = _logits()
    greedy = logits.argmax(-1).tolist()
    assert Sampler(SamplingParams(temperature=1.0, top_k=1, seed=0))(logits).tolist() == greedy
    assert Sampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=0))(logits).tolist() == greedy
