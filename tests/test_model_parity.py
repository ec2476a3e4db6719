"""shoal's decoder against transformers on tiny random checkpoints of each family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shoal.pipeline.loading import load_span, open_checkpoint
from shoal.pipeline.model import Span
from tests.models import FAMILIES, save_hf_model

pytest.importorskip("transformers")

TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, Path]:
    directory = tmp_path_factory.mktemp(request.param)
    return save_hf_model(request.param, directory), directory


@torch.no_grad()
def test_prefill_and_decode_logits_match(checkpoint: tuple[Any, Path]) -> None:
    hf, directory = checkpoint
    model = load_span(directory)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 96, (2, 9), generator=gen)
    cache = model.new_cache(batch=2)
    logits = model(tokens, cache)
    torch.testing.assert_close(logits, hf(tokens).logits, atol=TOL, rtol=0)
    for _ in range(20):  # past the sliding window of the mistral config (16)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat((tokens, nxt), dim=1)
        logits = model(nxt, cache)
        torch.testing.assert_close(logits[:, -1], hf(tokens).logits[:, -1], atol=TOL, rtol=0)
    assert cache.length == 29


@torch.no_grad()
def test_greedy_generation_is_identical(checkpoint: tuple[Any, Path]) -> None:
    from shoal.pipeline.generate import generate

    hf, directory = checkpoint
    model = load_span(directory)
    prompt = [1, 17, 42, 5, 88, 23]
    ours = list(generate(model, prompt, max_new_tokens=24))
    theirs = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    assert ours == theirs
    assert len(ours) == 24


@torch.no_grad()
def test_span_of_blocks_2_to_4_matches_full_model(checkpoint: tuple[Any, Path]) -> None:
    hf, directory = checkpoint
    ckpt = open_checkpoint(directory)
    front = load_span(ckpt, Span(start=0, end=2, embed=True))
    middle = load_span(ckpt, Span(start=2, end=4))
    assert sorted(int(i) for i in middle.layers) == [2, 3]
    assert middle.embed_tokens is None and middle.lm_head is None
    full = load_span(ckpt)
    tokens = torch.tensor([[1, 5, 9, 33, 70, 2, 11]])
    handoff = front.blocks_forward(front.embed(tokens))
    # transformers' hidden_states[i] is the input of block i
    torch.testing.assert_close(
        handoff, hf(tokens, output_hidden_states=True).hidden_states[2], atol=TOL, rtol=0
    )
    hidden = middle.blocks_forward(handoff)
    assert torch.equal(hidden, full.blocks_forward(full.embed(tokens)))
    torch.testing.assert_close(full.head(hidden), hf(tokens).logits, atol=TOL, rtol=0)


@torch.no_grad()
def test_rewinding_the_cache_replays_exactly(checkpoint: tuple[Any, Path]) -> None:
    """Positions below the cache length rewind it (failover replay, speculative rollback)."""
    hf, directory = checkpoint
    model = load_span(directory)
    tokens = torch.tensor([[1, 8, 30, 4, 61, 19, 77, 52, 9, 40]])
    cache = model.new_cache()
    model(tokens[:, :7], cache)
    model(torch.tensor([[3, 3, 3]]), cache)  # a branch that is then abandoned
    assert cache.length == 10
    replay = model(tokens[:, 5:], cache, torch.arange(5, 10))
    assert cache.length == 10
    torch.testing.assert_close(replay, hf(tokens).logits[:, 5:], atol=TOL, rtol=0)
