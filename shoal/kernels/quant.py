"""Weight-only quantized linear layers for CPU: int8 per output channel, int4 group-wise.

int8: ``w ~= q * scale`` with ``q`` int8 in [-127, 127] and one scale per output row.
int4: for each group of ``group_size`` input columns of a row, ``w ~= (q - 8) * scale +
zero`` with ``q`` in [0, 15] (the layout of torch's ``_weight_int4pack_mm_for_cpu``).

Each layer runs torch's packed kernel (``_weight_int8pack_mm``,
``_weight_int4pack_mm_for_cpu``) for decode-sized inputs (at most ``PACKED_MAX_ROWS`` rows)
when the platform has it, and dequantize + matmul otherwise; the plain fp32 path is also
the reference the tests compare against. Compute is bf16 on CPUs where oneDNN runs bf16
natively (AVX512-BF16, AMX), for both paths: the packed kernels' fp32 variants are scalar
code (768x2048, one thread on the benchmark box: int8 0.094 ms with bf16 activations,
1.09 ms with fp32; an fp32 matmul 0.21 ms), and their cost grows with the row count, so
prefill dequantizes to bf16 and multiplies there (128 rows: 1.4 ms, against 2.7 ms for
the fp32 layer and 6.0 ms for the packed kernel). Activations are cast to bf16 for these
calls and the result back to the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from shoal.kernels.errors import QuantizationError

QUANT_FORMATS = ("int8", "int4")
INT4_GROUP_SIZE = 32
PACKED_MAX_ROWS = 16
INT8_PACKED_ALIGN = 16  # input widths torch's packed int8 kernel handles correctly
_PACKED_DTYPE = torch.bfloat16
# oneDNN runs bf16 matmuls natively (AVX512-BF16 / AMX) rather than emulating them
_BF16_MATMUL = torch.backends.mkldnn.is_available() and bool(
    torch.ops.mkldnn._is_mkldnn_bf16_supported()
)
_HAS_INT8_MM = hasattr(torch, "_weight_int8pack_mm")
_HAS_INT4_MM = hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch, "_convert_weight_to_int4pack_for_cpu"
)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[out, in]`` float weight -> (int8 ``[out, in]``, fp32 scales ``[out]``)."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales[:, None]


def quantize_int4(
    weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[out, in]`` weight -> (int32 codes in [0, 15], scales, zeros), both ``[out, in/group]``."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise QuantizationError(
            f"int4 needs in_features ({in_features}) divisible by the group size ({group_size})"
        )
    groups = weight.float().reshape(out_features, -1, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-6)
    zeros = lo + 8 * scales
    q = torch.round((groups - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(out_features, in_features), scales, zeros


def dequantize_int4(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    out_features, in_features = q.shape
    groups = q.reshape(out_features, -1, group_size).to(dtype)
    offset = (zeros - 8 * scales).to(dtype)[..., None]  # (q - 8) * s + z == q * s + (z - 8 s)
    return (groups * scales.to(dtype)[..., None] + offset).reshape(out_features, in_features)


class _QuantizedLinear(nn.Module):
    """What both formats share: the choice between packed kernel and dequantize + matmul."""

    in_features: int
    out_features: int
    fast: bool
    bias: nn.Parameter | None

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, in]`` bf16 -> ``[rows, out]`` with torch's packed kernel."""
        raise NotImplementedError

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[out, in]`` the codes stand for."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.fast and rows <= PACKED_MAX_ROWS:
            y = self.packed_mm(x.reshape(rows, self.in_features).to(_PACKED_DTYPE))
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        elif self.fast and _BF16_MATMUL:
            w = self.dequantized(_PACKED_DTYPE)
            y = (x.to(_PACKED_DTYPE) @ w.T).to(x.dtype)
        else:
            y = self.reference(x, with_bias=False)
        return y if self.bias is None else y + self.bias

    def reference(self, x: torch.Tensor, *, with_bias: bool = True) -> torch.Tensor:
        y = x @ self.dequantized().to(x.dtype).T
        return y + self.bias if with_bias and self.bias is not None else y


class Int8Linear(_QuantizedLinear):
    """Weight-only int8 linear layer, one scale per output channel."""

    weight_int8: torch.Tensor
    scales: torch.Tensor
    packed_scales: torch.Tensor

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        # torch 2.13's packed int8 CPU kernel reads past the row when the input width is
        # not a multiple of 16 and returns garbage (1e31) or crashes: dequantize there
        self.fast = (
            _HAS_INT8_MM and q.device.type == "cpu" and self.in_features % INT8_PACKED_ALIGN == 0
        )
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales.float())
        self.register_buffer("packed_scales", scales.to(_PACKED_DTYPE))
        self._set_bias(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scales = quantize_int8(linear.weight.detach())
        return cls(q, scales, None if linear.bias is None else linear.bias.detach())

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.weight_int8, self.packed_scales)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if dtype == torch.float32:
            return dequantize_int8(self.weight_int8, self.scales)
        return self.weight_int8.to(dtype) * self.scales.to(dtype)[:, None]


class Int4Linear(_QuantizedLinear):
    """Weight-only int4 linear layer with one (scale, zero) per group of input columns."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor

    def __init__(
        self,
        q: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        # the packing op needs out_features divisible by 16 (a byte vocabulary of 258 is not)
        self.fast = _HAS_INT4_MM and q.device.type == "cpu" and self.out_features % 16 == 0
        # reference layout: two codes per byte, low nibble first
        self.register_buffer("codes", (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8))
        self.register_buffer("scales", scales.float())
        self.register_buffer("zeros", zeros.float())
        if self.fast:
            self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 8))
            # [in/group, out, 2]: what the packed kernel takes
            sz = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()
            self.register_buffer("scales_and_zeros", sz.to(_PACKED_DTYPE))
        self._set_bias(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> Int4Linear:
        q, scales, zeros = quantize_int4(linear.weight.detach(), group_size)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scales, zeros, bias, group_size)

    def unpacked(self) -> torch.Tensor:
        """The codes, one uint8 per weight."""
        q = torch.stack((self.codes & 0xF, self.codes >> 4), dim=-1)
        return q.reshape(self.out_features, self.in_features)

    def packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.scales_and_zeros
        )

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int4(self.unpacked(), self.scales, self.zeros, self.group_size, dtype)


def quantize_linears(module: nn.Module, fmt: str) -> nn.Module:
    """Replace every ``nn.Linear`` inside ``module`` (or ``module`` itself) in place; returns it."""
    if fmt not in QUANT_FORMATS:
        raise QuantizationError(f"unknown format {fmt!r}; use one of {', '.join(QUANT_FORMATS)}")
    convert = Int8Linear.from_linear if fmt == "int8" else Int4Linear.from_linear
    if isinstance(module, nn.Linear):
        return convert(module)
    for name, child in list(module.named_children()):
        setattr(module, name, quantize_linears(child, fmt))
    return module
