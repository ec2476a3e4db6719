"""Quantized linear layers: packed kernels against the dequantize-then-matmul reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shoal.kernels.errors import QuantizationError
from shoal.kernels.quant import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    quantize_linears,
)


def _linear(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(128, 48, bias=bias)


def test_int8_round_trip_error_is_within_half_a_step() -> None:
    w = _linear().weight.detach()
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    err = (dequantize_int8(q, scales) - w).abs()
    assert bool((err <= scales[:, None] / 2 + 1e-7).all())


def test_int4_round_trip_error_is_within_half_a_step() -> None:
    w = _linear().weight.detach()
    q, scales, zeros = quantize_int4(w, 32)
    assert int(q.min()) == 0 and int(q.max()) == 15
    err = (dequantize_int4(q, scales, zeros, 32) - w).abs().reshape(48, 4, 32)
    assert bool((err <= scales[..., None] / 2 + 1e-6).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear])
def test_packed_kernel_matches_reference(
    kind: type[Int8Linear | Int4Linear], dtype: torch.dtype
) -> None:
    layer = kind.from_linear(_linear().to(dtype))
    assert layer.fast, "torch 2.4+ on CPU has the packed kernels"
    gen = torch.Generator().manual_seed(3)
    # 6 rows take the packed kernel, 40 rows dequantize + matmul; both in bf16 on this CPU
    for x in (torch.randn(2, 3, 128, generator=gen), torch.randn(40, 128, generator=gen)):
        x = x.to(dtype)
        expected = layer.reference(x.float())
        rel = (layer(x).float() - expected).norm() / expected.norm()
        assert float(rel) < 1e-2  # bf16 rounding, far below the quantization error itself
        layer.fast = False  # the plain path, as on platforms without the kernels
        assert torch.equal(layer(x), layer.reference(x))
        layer.fast = True


@torch.no_grad()
def test_quantized_outputs_stay_close_to_fp32() -> None:
    linear = _linear()
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(4))
    exact = linear(x)
    rel8 = (Int8Linear.from_linear(linear)(x) - exact).norm() / exact.norm()
    rel4 = (Int4Linear.from_linear(linear)(x) - exact).norm() / exact.norm()
    assert float(rel8) < 0.01
    assert float(rel4) < 0.1


def test_quantize_linears_replaces_nested_layers() -> None:
    model = nn.Sequential(_linear(), nn.Sequential(nn.Linear(48, 64), nn.Linear(64, 32)))
    quantize_linears(model, "int8")
    assert isinstance(model[0], Int8Linear) and isinstance(model[1][1], Int8Linear)
    odd = Int4Linear.from_linear(nn.Linear(64, 40))  # the packing op needs 16 | out_features
    assert not odd.fast and odd(torch.ones(1, 64)).shape == (1, 40)
    with pytest.raises(QuantizationError, match="divisible by the group size"):
        Int4Linear.from_linear(nn.Linear(40, 8))
    with pytest.raises(QuantizationError, match="unknown format 'int3'"):
        quantize_linears(model, "int3")


@pytest.mark.parametrize("in_features", [24, 40, 56, 48])
def test_int8_decode_matches_the_reference_at_any_input_width(in_features: int) -> None:
    # torch 2.13's packed int8 kernel returned ~1e31 for widths that are not a multiple
    # of 16; such layers dequantize instead
    torch.manual_seed(in_features)
    layer = Int8Linear.from_linear(nn.Linear(in_features, 64, bias=True))
    x = torch.randn(1, in_features)
    assert torch.allclose(layer(x), layer.reference(x), atol=0.02, rtol=0.02)
