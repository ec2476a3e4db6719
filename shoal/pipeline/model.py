"""A block-addressable Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3).

A model is a sequence of stages: the embedding, blocks ``0..L-1``, and the head (final
norm + LM head). A :class:`DecoderSpan` holds any contiguous run of blocks, optionally
with the embedding and/or the head, so a server can run its span and a client the two
ends::

    hidden = span.embed(tokens)                      # [B, T] -> [B, T, D]
    hidden = span.blocks_forward(hidden, cache, positions)
    logits = span.head(hidden)                       # [B, T, D] -> [B, T, vocab]

Module names mirror the Hugging Face checkpoint (``layers.<i>`` uses the absolute block
index), so ``model.`` + a state-dict key is the name in the safetensors file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shoal.kernels.attention import KVCache, attention
from shoal.kernels.mlp import SwiGLU
from shoal.kernels.norm import RMSNorm
from shoal.kernels.rope import Rotary, apply_rope, inverse_frequencies
from shoal.pipeline.config import ModelConfig
from shoal.pipeline.errors import SpanError


@dataclass(frozen=True, kw_only=True)
class Span:
    """Which stages a :class:`DecoderSpan` holds: blocks ``start..end-1``, embed, head."""

    start: int = 0
    end: int
    embed: bool = False
    head: bool = False

    @classmethod
    def full(cls, config: ModelConfig) -> Span:
        return cls(start=0, end=config.num_layers, embed=True, head=True)

    def check(self, config: ModelConfig) -> None:
        if not 0 <= self.start <= self.end <= config.num_layers:
            raise SpanError(
                f"blocks {self.start}..{self.end} are outside the model's 0..{config.num_layers}"
            )
        if self.start == self.end and not (self.embed or self.head):
            raise SpanError("the span holds no stage: no blocks, no embedding, no head")


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.window = config.window(layer)
        self.q_proj = nn.Linear(d, config.num_heads * hd, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, config.num_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, config.num_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_heads * hd, d, bias=config.o_bias)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int,
        cache: KVCache | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, start)
            out = attention(q, k, v, start=start, window=self.window)
        else:
            out = attention(q, k, v, start=0, window=self.window)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    """One decoder layer: pre-norm attention and pre-norm SwiGLU, each with a residual."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int,
        cache: KVCache | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class SpanCache:
    """The KV caches of one session on one span: one :class:`KVCache` per block."""

    def __init__(self, layers: dict[int, KVCache]) -> None:
        self.layers = layers

    @property
    def length(self) -> int:
        """Positions cached so far (equal on every block)."""
        return next(iter(self.layers.values())).length if self.layers else 0

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers.values())


class DecoderSpan(nn.Module):
    """A contiguous span of a decoder's stages (see the module docstring)."""

    def __init__(self, config: ModelConfig, span: Span) -> None:
        super().__init__()
        span.check(config)
        self.config, self.span = config, span
        self.embed_tokens = (
            nn.Embedding(config.vocab_size, config.hidden_size) if span.embed else None
        )
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in range(span.start, span.end)})
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if span.head else None
        # an nn.Linear, or a quantized replacement
        self.lm_head: nn.Module | None = (
            nn.Linear(config.hidden_size, config.vocab_size, bias=False) if span.head else None
        )
        self.rotary = Rotary(
            inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        )

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head (tied checkpoints, when both are here)."""
        if self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def new_cache(self, batch: int = 1) -> SpanCache:
        c = self.config
        return SpanCache(
            {
                int(i): KVCache(
                    batch=batch,
                    n_kv_heads=c.num_kv_heads,
                    head_dim=c.head_dim,
                    dtype=self.dtype,
                    device=self.device,
                )
                for i in self.layers
            }
        )

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` -> hidden states ``[B, T, D]``."""
        if self.embed_tokens is None:
            raise SpanError(f"this span ({self.span}) has no embedding")
        return self.embed_tokens(tokens)

    def blocks_forward(
        self,
        hidden: torch.Tensor,
        cache: SpanCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the span's blocks over ``hidden`` ``[B, T, D]`` at ``positions`` ``[T]``.

        ``positions`` are consecutive and default to ``cache.length ..`` (or ``0 ..``
        without a cache). With a cache, they may start below its length to rewind it.
        """
        t = hidden.shape[1]
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + t, device=hidden.device)
        else:
            start = int(positions[0])
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        for name in self.layers:
            layer_cache = cache.layers[int(name)] if cache is not None else None
            hidden = self.run_block(int(name), hidden, cos, sin, start, layer_cache)
        return hidden

    def block(self, index: int) -> nn.Module:
        """Block ``index`` (absolute), ready to run; a windowed span loads it first."""
        return self.layers[str(index)]

    def run_block(
        self,
        index: int,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        start: int,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """Block ``index`` over ``hidden``; holds no reference to the block afterwards,
        so that a windowed span can release it."""
        return self.block(index)(hidden, cos, sin, start, cache)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, T, D]`` -> logits ``[B, T, vocab]`` (final norm + LM head)."""
        if self.norm is None or self.lm_head is None:
            raise SpanError(f"this span ({self.span}) has no head")
        return self.lm_head(self.norm(hidden))

    def forward(
        self,
        tokens: torch.Tensor,
        cache: SpanCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Every stage at once (a full model): token ids -> logits."""
        return self.head(self.blocks_forward(self.embed(tokens), cache, positions))
