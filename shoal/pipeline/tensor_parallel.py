"""Tensor parallelism as a transform: split each block's heads and MLP columns over members.

A group of ``n`` members serves one span together. Member ``r`` holds

- a contiguous run of KV heads ``kv_heads[r]`` and the query heads that attend to them
  (GQA: query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``), i.e. those
  rows of ``q_proj``/``k_proj``/``v_proj`` and the matching input columns of ``o_proj``;
- a contiguous run of MLP intermediate columns ``columns[r]``: those rows of
  ``gate_proj``/``up_proj`` and input columns of ``down_proj``;
- the norms whole; the output biases (``o_proj``, ``down_proj``) on rank 0 only.

Its :meth:`ShardedBlock.attention_part` and :meth:`ShardedBlock.mlp_part` return partial
outputs whose sum over members is the full block's attention (resp. MLP) output, so a
block is::

    x = x + all_reduce(block.attention_part(x, ...))
    x = x + all_reduce(block.mlp_part(x))

Every member keeps the whole hidden state (identical everywhere after each all-reduce)
and a KV cache of its own heads only. Shares follow the members' weights (measured speed
or memory): uneven splits are fine, so a group need not have a power-of-two size.
Quantization (int8/int4) is applied to each member's slices after slicing.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from shoal.kernels.attention import KVCache
from shoal.kernels.quant import INT4_GROUP_SIZE
from shoal.pipeline.config import ModelConfig
from shoal.pipeline.errors import ModelLoadError, PipelineError
from shoal.pipeline.loading import (
    Checkpoint,
    checkpoint_names,
    fill_span,
    load_dtype,
    open_checkpoint,
)
from shoal.pipeline.model import Block, DecoderSpan, Span, SpanCache

#: Quantized column shares are multiples of this: int4's group size; int8's packed kernel
#: (``_weight_int8pack_mm``, torch 2.13 CPU) reads out of bounds (garbage or a segfault)
#: when the input width is not a multiple of 16.
COLUMN_ALIGN = {"int4": INT4_GROUP_SIZE, "int8": 16}

#: ``all_reduce(tensor) -> sum over the group`` (the same value on every member).
AllReduce = Callable[[torch.Tensor], torch.Tensor]


class SplitError(PipelineError):
    """A model cannot be split over the group as asked (too many members, bad weights)."""


@dataclass(frozen=True, kw_only=True)
class Shard:
    """Member ``rank``'s part of every block: KV heads ``[kv_start, kv_end)`` (and their
    query heads) and MLP intermediate columns ``[col_start, col_end)``."""

    rank: int
    kv_start: int
    kv_end: int
    col_start: int
    col_end: int

    def to_wire(self) -> list[int]:
        return [self.rank, self.kv_start, self.kv_end, self.col_start, self.col_end]

    @classmethod
    def from_wire(cls, value: Any) -> Shard:
        if (
            not isinstance(value, list | tuple)
            or len(value) != 5
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise SplitError(f"a shard is five integers, not {value!r}")
        rank, kv_start, kv_end, col_start, col_end = value
        return cls(
            rank=rank, kv_start=kv_start, kv_end=kv_end, col_start=col_start, col_end=col_end
        )


@dataclass(frozen=True)
class SplitPlan:
    """The members in rank order and each one's shard."""

    members: tuple[str, ...]
    shards: tuple[Shard, ...]

    def shard_of(self, member: str) -> Shard:
        return self.shards[self.members.index(member)]

    def check(self, config: ModelConfig) -> None:
        """Raise :class:`SplitError` unless the shards tile the heads and columns exactly."""
        if len(self.members) != len(self.shards) or not self.members:
            raise SplitError("a plan needs one shard per member, and at least one member")
        kv, col = 0, 0
        for rank, shard in enumerate(self.shards):
            if shard.rank != rank or shard.kv_start != kv or shard.col_start != col:
                raise SplitError(f"shard {rank} does not follow shard {rank - 1}: {shard}")
            if shard.kv_end <= shard.kv_start or shard.col_end <= shard.col_start:
                raise SplitError(f"shard {rank} is empty: {shard}")
            kv, col = shard.kv_end, shard.col_end
        if (kv, col) != (config.num_kv_heads, config.intermediate_size):
            raise SplitError(
                f"the shards cover {kv} KV heads and {col} columns; the model has "
                f"{config.num_kv_heads} and {config.intermediate_size}"
            )


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` units into ``len(weights)`` parts of at least 1, in proportion to
    ``weights`` (largest remainder; ties go to the lower index)."""
    n = len(weights)
    if n == 0 or total < n:
        raise SplitError(f"cannot give each of {n} members at least one of {total} units")
    if any(not math.isfinite(w) or w <= 0 for w in weights):
        raise SplitError(f"member weights must be positive numbers, not {list(weights)}")
    scale = sum(weights)
    exact = [total * w / scale for w in weights]
    parts = [max(1, math.floor(e)) for e in exact]
    while sum(parts) < total:  # the largest shortfall first
        parts[max(range(n), key=lambda i: (exact[i] - parts[i], -i))] += 1
    while sum(parts) > total:  # the minimum of 1 overshot: take from the most over-served
        parts[min((i for i in range(n) if parts[i] > 1), key=lambda i: exact[i] - parts[i])] -= 1
    return parts


def plan_split(
    config: ModelConfig,
    weights_by_member: Mapping[str, float],
    *,
    quantize: str | None = None,
) -> SplitPlan:
    """Shares of KV heads and MLP columns for each member, in proportion to its weight.

    Members are ranked by peer id (sorted), so every member computes the same plan from
    the same inputs. Each member gets at least one KV head: a group larger than
    ``num_kv_heads`` is refused (:class:`SplitError` naming how many members fit).
    Quantized, column shares are multiples of :data:`COLUMN_ALIGN` (down_proj's input is
    split, and the packed kernels need it).
    """
    members = tuple(sorted(weights_by_member))
    if len(members) > config.num_kv_heads:
        raise SplitError(
            f"{len(members)} members but the model has {config.num_kv_heads} KV heads: at most "
            f"{config.num_kv_heads} members can each hold one; leave the slowest out"
        )
    weights = [float(weights_by_member[m]) for m in members]
    kv = apportion(config.num_kv_heads, weights)
    align = COLUMN_ALIGN.get(quantize or "", 1)
    if config.intermediate_size % align:
        raise SplitError(
            f"intermediate size {config.intermediate_size} is not a multiple of {align}"
        )
    cols = [c * align for c in apportion(config.intermediate_size // align, weights)]
    shards, kv_at, col_at = [], 0, 0
    for rank, (k, c) in enumerate(zip(kv, cols, strict=True)):
        shards.append(
            Shard(rank=rank, kv_start=kv_at, kv_end=kv_at + k, col_start=col_at, col_end=col_at + c)
        )
        kv_at, col_at = kv_at + k, col_at + c
    plan = SplitPlan(members, tuple(shards))
    plan.check(config)
    return plan


def shard_config(config: ModelConfig, shard: Shard) -> ModelConfig:
    """The config of a member's slice: its heads, KV heads and intermediate columns."""
    group = config.num_heads // config.num_kv_heads
    kv = shard.kv_end - shard.kv_start
    return replace(
        config,
        num_heads=kv * group,
        num_kv_heads=kv,
        intermediate_size=shard.col_end - shard.col_start,
    )


class ShardedBlock(Block):
    """One member's slice of a decoder layer (module names as in :class:`Block`)."""

    def __init__(self, config: ModelConfig, layer: int, shard: Shard) -> None:
        super().__init__(shard_config(config, shard), layer)
        self.shard = shard
        if shard.rank != 0:  # the output biases are added once, by rank 0
            self.self_attn.o_proj.register_parameter("bias", None)
            self.mlp.down_proj.register_parameter("bias", None)

    def attention_part(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """This member's heads through its columns of ``o_proj`` (a partial sum)."""
        return self.self_attn(self.input_layernorm(x), cos, sin, start, cache)

    def mlp_part(self, x: torch.Tensor) -> torch.Tensor:
        """This member's MLP columns through its rows of ``down_proj`` (a partial sum)."""
        return self.mlp(self.post_attention_layernorm(x))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int,
        cache: KVCache | None,
    ) -> torch.Tensor:
        raise PipelineError("a sharded block runs through run_sharded (it needs an all-reduce)")


def slice_of(config: ModelConfig, shard: Shard, key: str) -> tuple[int, int, int] | None:
    """For a block state-dict key (``self_attn.q_proj.weight``...), the (dim, start, end)
    of the full tensor that ``shard`` holds; None when it holds the whole tensor."""
    hd, group = config.head_dim, config.num_heads // config.num_kv_heads
    q = (shard.kv_start * group * hd, shard.kv_end * group * hd)
    kv = (shard.kv_start * hd, shard.kv_end * hd)
    cols = (shard.col_start, shard.col_end)
    module = key.rsplit(".", 1)[0]
    if module == "self_attn.q_proj":
        return (0, *q)
    if module in ("self_attn.k_proj", "self_attn.v_proj"):
        return (0, *kv)
    if key == "self_attn.o_proj.weight":
        return (1, *q)
    if module in ("mlp.gate_proj", "mlp.up_proj"):
        return (0, *cols)
    if key == "mlp.down_proj.weight":
        return (1, *cols)
    return None


class ShardCache(SpanCache):
    """A member's KV caches of one session; ``key`` names the session within the group."""

    _keys = itertools.count(1)

    def __init__(self, layers: dict[int, KVCache]) -> None:
        super().__init__(layers)
        self.key = next(self._keys)


class ShardedSpan(DecoderSpan):
    """A :class:`DecoderSpan` whose blocks are ``shard``'s slices (:class:`ShardedBlock`);
    the embedding and head, when in ``span``, are whole. ``config`` is the full model's."""

    def __init__(self, config: ModelConfig, span: Span, shard: Shard) -> None:
        super().__init__(shard_config(config, shard), span)
        self.config = config
        self.shard = shard
        for name in list(self.layers):
            self.layers[name] = ShardedBlock(config, int(name), shard)

    def new_cache(self, batch: int = 1) -> ShardCache:
        kv_heads = self.shard.kv_end - self.shard.kv_start
        return ShardCache(
            {
                int(i): KVCache(
                    batch=batch,
                    n_kv_heads=kv_heads,
                    head_dim=self.config.head_dim,
                    dtype=self.dtype,
                    device=self.device,
                )
                for i in self.layers
            }
        )


def shard_weights(full: DecoderSpan, shard: Shard) -> ShardedSpan:
    """Slice an already loaded span (tests; a node reads only its slices: :func:`load_shard`)."""
    with torch.device("meta"):
        model = ShardedSpan(full.config, full.span, shard)
    state = {}
    for key, tensor in full.state_dict().items():
        part = key.split(".", 2)
        cut = slice_of(full.config, shard, part[2]) if part[0] == "layers" else None
        if key not in model.state_dict():
            continue  # a bias only rank 0 holds
        state[key] = tensor if cut is None else tensor.narrow(cut[0], cut[1], cut[2] - cut[1])
    model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    head, embed = full.lm_head, full.embed_tokens
    if head is not None and embed is not None and head.weight is embed.weight:
        model.tie_weights()
    return model.eval()


def load_shard(
    checkpoint: Checkpoint | str,
    span: Span,
    shard: Shard,
    *,
    dtype: str | torch.dtype = torch.float32,
    quantize: str | None = None,
) -> ShardedSpan:
    """Read ``shard``'s slices of ``span`` from a checkpoint (and only those: each block
    tensor is read through safetensors' slice API), then quantize them block by block."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    config = ckpt.config
    target = load_dtype(ckpt, dtype, quantize)
    with torch.device("meta"):
        model = ShardedSpan(config, span, shard)
    names = checkpoint_names(model)
    files: dict[str, Any] = {}

    def read(key: str) -> torch.Tensor:
        name = names[key]
        path = ckpt.weight_files.get(name)
        if path is None:
            raise ModelLoadError(ckpt.directory, f"the checkpoint lacks {name}", "re-download it")
        try:
            if str(path) not in files:
                files[str(path)] = safe_open(os.fspath(path), framework="pt")
            part = key.split(".", 2)
            cut = slice_of(config, shard, part[2]) if part[0] == "layers" else None
            if cut is None:
                return files[str(path)].get_tensor(name)
            dim, start, end = cut
            view = files[str(path)].get_slice(name)
            return view[start:end] if dim == 0 else view[:, start:end]
        except SafetensorError as exc:
            raise ModelLoadError(path, f"cannot read {name} ({exc})", "re-download it") from None

    fill_span(model, ckpt, read, names, dtype=target, quantize=quantize)
    files.clear()
    if config.tie_word_embeddings and quantize is None:
        model.tie_weights()
    return model.eval()


def run_sharded(
    weights: DecoderSpan,
    hidden: torch.Tensor,
    cache: SpanCache,
    position: int,
    start: int,
    end: int,
    all_reduce: AllReduce,
) -> torch.Tensor:
    """Blocks ``start..end-1`` of a sharded span over ``hidden`` at ``position..``, with
    ``all_reduce`` after each attention and each MLP (every member calls it in the same
    order, with tensors of the same shape)."""
    positions = torch.arange(position, position + hidden.shape[1], device=hidden.device)
    cos, sin = weights.rotary.cos_sin(positions, hidden.dtype)
    for index in range(start, end):
        block = weights.layers[str(index)]
        assert isinstance(block, ShardedBlock)
        hidden = hidden + all_reduce(
            block.attention_part(hidden, cos, sin, position, cache.layers[index])
        )
        hidden = hidden + all_reduce(block.mlp_part(hidden))
    return hidden
