"""Tensor-parallel shards: the sum of the members' partial outputs is the full block's.

The members run in threads of this process with an in-memory all-reduce (a barrier), the
same ``run_sharded`` the group runtime calls between network all-reduces."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from shoal.pipeline.config import ModelConfig
from shoal.pipeline.loading import load_span, open_checkpoint
from shoal.pipeline.model import DecoderSpan, Span
from shoal.pipeline.tensor_parallel import (
    ShardedSpan,
    SplitError,
    apportion,
    load_shard,
    plan_split,
    run_sharded,
    shard_weights,
)
from tests.models import save_hf_model

TINY = "shoal-tiny"
#: A random GQA Llama with enough KV heads for three members (two query heads per KV head).
GQA = {"num_attention_heads": 8, "num_key_value_heads": 4}


class LocalAllReduce:
    """``n`` threads sum their tensors in rank order; every one gets the same result."""

    def __init__(self, n: int) -> None:
        self.parts: list[torch.Tensor | None] = [None] * n
        self.result = torch.empty(0)
        self.barrier = threading.Barrier(n)
        self.calls = 0

    def for_rank(self, rank: int):  # type: ignore[no-untyped-def]
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = t
            if self.barrier.wait() == 0:
                total = self.parts[0]
                assert total is not None
                for part in self.parts[1:]:
                    assert part is not None
                    total = total + part
                self.result = total
                self.calls += 1
            self.barrier.wait()
            out = self.result
            self.barrier.wait()  # nobody overwrites a part before everyone read the result
            return out

        return all_reduce


def group_generate(
    full: DecoderSpan, members: Sequence[ShardedSpan], prompt: list[int], n: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the hidden states after the blocks, computed by the group."""
    reduce = LocalAllReduce(len(members))
    caches = [m.new_cache() for m in members]
    tokens, hiddens = list(prompt), []
    position, step = 0, prompt
    with ThreadPoolExecutor(len(members)) as pool, torch.inference_mode():
        for _ in range(n):
            hidden = full.embed(torch.tensor([step]))

            def run(
                rank: int, hidden: torch.Tensor = hidden, position: int = position
            ) -> torch.Tensor:
                m = members[rank]
                try:
                    return run_sharded(
                        m, hidden, caches[rank], position, m.span.start, m.span.end,
                        reduce.for_rank(rank),
                    )  # fmt: skip
                except BaseException:
                    reduce.barrier.abort()  # the others fail too, rather than wait forever
                    raise

            outs = list(pool.map(run, range(len(members))))
            for other in outs[1:]:  # every member holds the same hidden state
                assert torch.equal(other, outs[0])
            hiddens.append(outs[0])
            token = int(full.head(outs[0][:, -1:])[0, -1].argmax())
            position += len(step)
            tokens.append(token)
            step = [token]
    return tokens[len(prompt) :], hiddens


def full_generate(
    full: DecoderSpan, prompt: list[int], n: int
) -> tuple[list[int], list[torch.Tensor]]:
    cache = full.new_cache()
    tokens, hiddens, step = list(prompt), [], prompt
    with torch.inference_mode():
        for _ in range(n):
            hidden = full.blocks_forward(full.embed(torch.tensor([step])), cache)
            hiddens.append(hidden)
            token = int(full.head(hidden[:, -1:])[0, -1].argmax())
            tokens.append(token)
            step = [token]
    return tokens[len(prompt) :], hiddens


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tp") / "tiny-llama"
    save_hf_model("llama", directory, config=GQA)
    return directory


def test_apportion_is_proportional_with_at_least_one_each() -> None:
    assert apportion(4, [1, 1]) == [2, 2]
    assert apportion(4, [1, 1, 1]) == [2, 1, 1]
    assert apportion(4, [1, 1, 2]) == [1, 1, 2]
    assert apportion(512, [1, 3]) == [128, 384]
    assert apportion(3, [100, 1, 1]) == [1, 1, 1]
    assert apportion(10, [0.5, 0.25, 0.25]) == [5, 3, 2]
    with pytest.raises(SplitError):
        apportion(2, [1, 1, 1])
    with pytest.raises(SplitError):
        apportion(4, [1, 0])


def test_plan_split_tiles_heads_and_columns_in_peer_order() -> None:
    config = open_checkpoint(TINY).config  # 8 heads, 4 KV heads, 512 columns
    plan = plan_split(config, {"c": 1.0, "a": 1.0, "b": 2.0})
    assert plan.members == ("a", "b", "c")
    assert [(s.kv_start, s.kv_end) for s in plan.shards] == [(0, 1), (1, 3), (3, 4)]
    assert [(s.col_start, s.col_end) for s in plan.shards] == [(0, 128), (128, 384), (384, 512)]
    int4 = plan_split(config, {"a": 1.0, "b": 1.0, "c": 1.0}, quantize="int4")
    assert all((s.col_end - s.col_start) % 32 == 0 for s in int4.shards)
    with pytest.raises(SplitError, match="at most 4 members"):
        plan_split(config, {str(i): 1.0 for i in range(5)})


def test_a_group_larger_than_the_kv_heads_is_refused(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path / "two-kv", config={"num_key_value_heads": 2})
    config = open_checkpoint(tmp_path / "two-kv").config
    with pytest.raises(SplitError, match="3 members but the model has 2 KV heads"):
        plan_split(config, {"a": 1.0, "b": 1.0, "c": 1.0})


@pytest.mark.parametrize(
    "weights", [(1.0, 1.0), (1.0, 3.0), (1.0, 1.0, 1.0), (2.0, 1.0, 1.0)], ids=str
)
@pytest.mark.parametrize("model", ["tiny", "llama"])
def test_sum_of_partials_is_the_full_forward(
    model: str, weights: tuple[float, ...], llama_dir: Path
) -> None:
    checkpoint = open_checkpoint(TINY if model == "tiny" else llama_dir)
    config: ModelConfig = checkpoint.config
    full = load_span(checkpoint)
    names = [f"peer-{i}" for i in range(len(weights))]
    plan = plan_split(config, dict(zip(names, weights, strict=True)))
    members = [load_shard(checkpoint, full.span, plan.shard_of(name)) for name in names]
    for member, shard in zip(members, plan.shards, strict=True):  # each read only its slices
        assert member.layers["0"].self_attn.n_kv_heads == shard.kv_end - shard.kv_start
        assert member.layers["0"].mlp.gate_proj.out_features == shard.col_end - shard.col_start
    prompt = [1, 5, 17, 42, 9, 33, 7, 3]
    want_tokens, want_hidden = full_generate(full, prompt, 12)
    got_tokens, got_hidden = group_generate(full, members, prompt, 12)
    assert got_tokens == want_tokens
    for got, want in zip(got_hidden, want_hidden, strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_slicing_a_loaded_span_equals_loading_the_slices(llama_dir: Path) -> None:
    checkpoint = open_checkpoint(llama_dir)
    span = Span(start=1, end=3)
    full = load_span(checkpoint, span)
    plan = plan_split(checkpoint.config, {"a": 1.0, "b": 1.0})
    for name in plan.members:
        sliced = shard_weights(full, plan.shard_of(name)).state_dict()
        loaded = load_shard(checkpoint, span, plan.shard_of(name)).state_dict()
        assert sliced.keys() == loaded.keys()
        for key in sliced:
            assert torch.equal(sliced[key], loaded[key]), key
    # the output biases live on rank 0 only (none in this model: the keys match anyway)
    assert "layers.1.self_attn.o_proj.bias" not in sliced


@pytest.mark.parametrize(
    ("quantize", "widths", "linear", "reference", "tolerance"),
    [
        # int8 per output channel: within its quantization error of fp32
        ("int8", [176, 176, 160], "Int8Linear", None, 0.05),
        # int4 in groups of 32 input columns, each kept whole on one member: next to one
        # process holding the whole span in int4
        ("int4", [192, 160, 160], "Int4Linear", "int4", 0.02),
    ],
)
def test_quantized_members_quantize_their_own_slices(
    quantize: str, widths: list[int], linear: str, reference: str | None, tolerance: float
) -> None:
    checkpoint = open_checkpoint(TINY)
    full = load_span(checkpoint)
    plan = plan_split(checkpoint.config, {"a": 1.0, "b": 1.0, "c": 1.0}, quantize=quantize)
    assert [s.col_end - s.col_start for s in plan.shards] == widths
    members = [load_shard(checkpoint, full.span, s, quantize=quantize) for s in plan.shards]
    assert type(members[0].layers["0"].mlp.down_proj).__name__ == linear
    prompt = [72, 101, 108, 108, 111]
    got_tokens, got_hidden = group_generate(full, members, prompt, 16)
    want = full if reference is None else load_span(checkpoint, quantize=reference)
    want_tokens, want_hidden = full_generate(want, prompt, 16)
    scale = want_hidden[0].abs().max()
    assert (got_hidden[0] - want_hidden[0]).abs().max() < tolerance * scale
    assert got_tokens == want_tokens


def test_output_biases_are_added_once_and_qkv_biases_split(tmp_path: Path) -> None:
    """Llama with attention_bias and mlp_bias: o_proj/down_proj biases live on rank 0."""
    directory = tmp_path / "biased"
    save_hf_model("llama", directory, config=GQA | {"attention_bias": True, "mlp_bias": True})
    checkpoint = open_checkpoint(directory)
    full = load_span(checkpoint)
    plan = plan_split(checkpoint.config, {"a": 1.0, "b": 2.0, "c": 1.0})
    members = [load_shard(checkpoint, full.span, s) for s in plan.shards]
    assert [m.layers["0"].self_attn.o_proj.bias is not None for m in members] == [1, 0, 0]
    assert members[1].layers["0"].self_attn.q_proj.bias is not None
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    got_tokens, got_hidden = group_generate(full, members, prompt, 8)
    want_tokens, want_hidden = full_generate(full, prompt, 8)
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_hidden[-1], want_hidden[-1], atol=2e-5, rtol=1e-5)
