"""Rotary position embeddings, in the rotate-half layout of Hugging Face Llama checkpoints.

Scaling: none (``default``), ``linear`` (positions divided by ``factor``) and ``llama3``
(Llama 3.1's frequency-dependent rescaling). Other kinds are refused by the config parser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_KINDS = ("default", "linear", "llama3")


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """How to stretch RoPE beyond the trained context.

    kind: one of :data:`ROPE_KINDS`.
    factor: context stretch factor (``linear`` and ``llama3``).
    low_freq_factor, high_freq_factor, original_max_position_embeddings: ``llama3`` only.
    """

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> torch.Tensor:
    """Per-pair rotation frequencies (fp32, ``head_dim // 2`` of them)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None or scaling.kind == "default":
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    # llama3: keep high frequencies, divide low ones by factor, interpolate in between
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary:
    """cos/sin tables for a set of frequencies, grown on demand and indexed by position."""

    def __init__(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq
        self._cos = torch.empty(0, 2 * inv_freq.numel(), device="cpu")
        self._sin = self._cos

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape ``[len(positions), head_dim]`` for 1-D integer ``positions``."""
        needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self._cos.shape[0] or self._cos.device != positions.device:
            size = max(needed, 2 * self._cos.shape[0], 256)
            inv_freq = self.inv_freq.to(positions.device)
            steps = torch.arange(size, dtype=torch.float32, device=positions.device)
            freqs = torch.outer(steps, inv_freq)
            angles = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = angles.cos(), angles.sin()
        return self._cos[positions].to(dtype), self._sin[positions].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``[..., T, head_dim]`` by per-position ``cos``/``sin`` ``[T, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`apply_rope` as complex multiplication of (x_i, x_{i+half}) pairs."""
    half = x.shape[-1] // 2
    pairs = torch.complex(x[..., :half].double(), x[..., half:].double())
    angle = torch.atan2(sin[..., :half].double(), cos[..., :half].double())
    out = pairs * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((out.real, out.imag), dim=-1).to(x.dtype)
