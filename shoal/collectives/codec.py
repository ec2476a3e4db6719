"""Compression of all-reduce chunks, on top of :mod:`shoal.kernels.codecs`.

Three codecs, all decoding to fp32:

``fp32``  exact: raw little-endian float32.
``fp16``  raw float16. Per element, a contribution and the result each round to nearest,
          so |result - exact average| <= 2**-11 * (A + |avg|) + 2**-24 <= 2**-10 * A + 2**-24,
          where A is the largest |x| any contributor had at that element.
``int8``  blockwise: per ``block`` elements one fp32 scale (absmax/127) and int8 codes.
          Each rounding errs by at most half a step, absmax/254 of its block, so
          |result - exact average| <= (A_b + R_b) / 254 (+ fp32 rounding), where A_b is the
          largest |x| over all contributors in the element's block and R_b <= A_b the
          absmax of the average in that block: at most A_b / 127.

The owner of a chunk encodes its reduced value once and keeps ``decode(encode(R))`` (the
PCCL trick): everyone, the owner included, holds the same bytes. Contributions go through
the same codec, the owner's own too, so the result does not depend on who owned what.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch

from shoal.collectives.errors import BadContribution
from shoal.kernels import codecs
from shoal.kernels.errors import CodecError

CODECS = ("fp32", "fp16", "int8")
DEFAULT_BLOCK = 64
FP16_MAX = 65504.0
_WIRE: dict[str, tuple[str, torch.dtype]] = {
    "fp32": ("raw", torch.float32),
    "fp16": ("raw", torch.float16),
    "int8": ("int8_block", torch.float32),
}


def payload_nbytes(codec: str, n: int, block: int) -> int:
    """Bytes of an encoded chunk of ``n`` elements."""
    if codec == "fp32":
        return 4 * n
    if codec == "fp16":
        return 2 * n
    return 4 * -(-n // block) + n


def encode_chunk(values: torch.Tensor, codec: str, block: int) -> tuple[dict[str, Any], bytes]:
    """A 1-D fp32 chunk -> (kernels codec header, payload)."""
    kind, dtype = _WIRE[codec]
    return codecs.encode(values, codec=kind, dtype=dtype, block=block)


def expected_header(codec: str, n: int, block: int, payload: bytes | memoryview) -> dict[str, Any]:
    """The header a well-formed chunk of ``n`` elements has (used to decode committed
    chunks whose bytes are already pinned by a digest)."""
    kind, dtype = _WIRE[codec]
    header: dict[str, Any] = {
        "dtype": str(dtype).removeprefix("torch."),
        "shape": [n],
        "codec": kind,
        "nbytes": payload_nbytes(codec, n, block),
        "checksum": zlib.crc32(payload),
    }
    if kind == "int8_block":
        header["block"] = block
    return header


def decode_chunk(
    peer: str,
    header: Any,
    payload: bytes | memoryview,
    *,
    codec: str,
    n: int,
    block: int,
) -> torch.Tensor:
    """Validate a contribution's header against what the view expects, then decode it to
    fp32. Raises :class:`BadContribution` naming the field; allocates only after the
    header's sizes match the expected ones."""
    kind, dtype = _WIRE[codec]
    if not isinstance(header, dict):
        raise BadContribution(peer, "codec", "tensor header is not a map")
    want_dtype = str(dtype).removeprefix("torch.")
    if header.get("dtype") != want_dtype:
        raise BadContribution(peer, "dtype", f"{header.get('dtype')!r}, expected {want_dtype}")
    if header.get("shape") != [n]:
        raise BadContribution(peer, "shape", f"{header.get('shape')!r}, expected [{n}]")
    if header.get("codec") != kind or (kind == "int8_block" and header.get("block") != block):
        raise BadContribution(
            peer, "codec", f"{header.get('codec')!r}/{header.get('block')!r}, expected {kind}"
        )
    if len(payload) != payload_nbytes(codec, n, block):
        raise BadContribution(peer, "nbytes", f"{len(payload)} bytes for {n} elements")
    try:
        values = codecs.decode(header, payload, max_elements=n).float().reshape(-1)
    except CodecError as exc:
        raise BadContribution(peer, exc.field, str(exc)) from exc
    if not all_finite(values):
        raise BadContribution(peer, "nonfinite", "NaN or infinity in the contribution")
    return values


def all_finite(values: torch.Tensor) -> bool:
    """No NaN or infinity in ``values``: one pass of ``aminmax`` (which propagates NaN),
    about 10x faster than ``isfinite(x).all()`` on large tensors (no boolean tensor)."""
    if values.numel() == 0:
        return True
    lo, hi = torch.aminmax(values)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def roundtrip(values: torch.Tensor, codec: str, block: int) -> torch.Tensor:
    """What the owner holds after encoding and decoding ``values`` (fp32, 1-D)."""
    header, payload = encode_chunk(values, codec, block)
    return codecs.decode(header, payload).float().reshape(-1)


def check_contribution(peer: str, tensor: torch.Tensor, shape: tuple[int, ...], codec: str) -> None:
    """Local validation of a contribution before anything is sent."""
    if not isinstance(tensor, torch.Tensor):
        raise BadContribution(peer, "dtype", f"{type(tensor).__name__} is not a tensor")
    if tuple(tensor.shape) != shape:
        raise BadContribution(peer, "shape", f"{tuple(tensor.shape)}, expected {shape}")
    if tensor.dtype != torch.float32:
        raise BadContribution(peer, "dtype", f"{tensor.dtype}, expected torch.float32")
    if not all_finite(tensor):
        raise BadContribution(peer, "nonfinite", "NaN or infinity in the contribution")
    if codec == "fp16" and float(tensor.abs().amax()) > FP16_MAX:
        raise BadContribution(peer, "range", f"values beyond fp16's range (|x| > {FP16_MAX})")


def error_bound(contributions: list[torch.Tensor], codec: str, block: int) -> torch.Tensor:
    """Per-element bound on |result - exact weighted average| for ``codec`` (flat fp32),
    as stated in this module's docstring, with a little slack for fp32 rounding."""
    stacked = torch.stack([c.reshape(-1).float() for c in contributions])
    a = stacked.abs().amax(dim=0)
    slack = 1e-6 * a + 1e-30
    if codec == "fp32":
        return slack
    if codec == "fp16":
        return 2.0**-10 * a + 2.0**-24 + slack
    n = a.numel()
    blocks = torch.nn.functional.pad(a, (0, -n % block)).view(-1, block).amax(dim=1)
    return (blocks / 127).repeat_interleave(block)[:n] + slack
