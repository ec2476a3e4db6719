"""Fast kernels against their plain-torch references (and RoPE scaling against transformers)."""

from __future__ import annotations

import pytest
import torch

from shoal.kernels.attention import KVCache, attention, attention_reference
from shoal.kernels.mlp import swiglu, swiglu_reference
from shoal.kernels.norm import rms_norm, rms_norm_reference
from shoal.kernels.rope import (
    RopeScaling,
    Rotary,
    apply_rope,
    apply_rope_reference,
    inverse_frequencies,
)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_reference(dtype: torch.dtype) -> None:
    x, w = _randn(3, 5, 64, dtype=dtype), _randn(64, seed=1, dtype=dtype)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


def test_rope_matches_complex_reference_and_preserves_norm() -> None:
    rotary = Rotary(inverse_frequencies(32, 10000.0))
    positions = torch.arange(5, 17)
    cos, sin = rotary.cos_sin(positions, torch.float32)
    x = _randn(2, 4, 12, 32)
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out, apply_rope_reference(x, cos, sin))
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    # position 0 is the identity
    cos0, sin0 = rotary.cos_sin(torch.tensor([0]), torch.float32)
    assert torch.equal(apply_rope(x[:, :, :1], cos0, sin0), x[:, :, :1])


def test_llama3_rope_scaling_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = transformers.LlamaConfig(
        hidden_size=4096, num_attention_heads=32, rope_parameters=params
    )
    expected, scaling = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = inverse_frequencies(
        128,
        500000.0,
        RopeScaling(kind="llama3", factor=8.0, original_max_position_embeddings=8192),
    )
    assert scaling == 1.0
    torch.testing.assert_close(ours, expected.float())
    plain = inverse_frequencies(128, 500000.0)
    assert torch.equal(ours[:8], plain[:8])  # high frequencies are kept
    torch.testing.assert_close(ours[-8:], plain[-8:] / 8.0)  # low ones divided by factor


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("groups", [1, 4])
def test_attention_prefill_then_decode_matches_reference(groups: int, window: int | None) -> None:
    kv_heads, head_dim = 2, 16
    q = _randn(2, kv_heads * groups, 13, head_dim, seed=1)
    k = _randn(2, kv_heads, 13, head_dim, seed=2)
    v = _randn(2, kv_heads, 13, head_dim, seed=3)
    full = attention_reference(q, k, v, start=0, window=window)
    cache = KVCache(batch=2, n_kv_heads=kv_heads, head_dim=head_dim, dtype=torch.float32)
    # prefill 7 positions, then 2 more at once, then 4 one at a time
    pieces = []
    for a, b in ((0, 7), (7, 9), (9, 10), (10, 11), (11, 12), (12, 13)):
        keys, values = cache.update(k[:, :, a:b], v[:, :, a:b], a)
        pieces.append(attention(q[:, :, a:b], keys, values, start=a, window=window))
    torch.testing.assert_close(torch.cat(pieces, dim=2), full)
    assert cache.length == 13


def test_kv_cache_grows_and_rewinds() -> None:
    cache = KVCache(batch=1, n_kv_heads=1, head_dim=4, dtype=torch.float32)
    first = _randn(1, 1, 300, 4)
    cache.update(first, first, 0)
    assert cache.capacity == 512 and cache.length == 300
    replacement = _randn(1, 1, 3, 4, seed=9)
    keys, _ = cache.update(replacement, replacement, 100)  # rewind to 100, then write 3
    assert cache.length == 103
    assert torch.equal(keys[:, :, :100], first[:, :, :100])
    assert torch.equal(keys[:, :, 100:], replacement)
    with pytest.raises(ValueError, match="cache holds 103"):
        cache.update(replacement, replacement, 104)


def test_swiglu_matches_reference() -> None:
    gate, up = _randn(4, 32), _randn(4, 32, seed=1)
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up))
