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

from typing import Any

import numpy as np
import torch

from shoal.collectives.errors import BadContribution
from shoal.kernels import codecs
from shoal.kernels.errors import CodecError

CODECS = ("fp32", "fp16", "int8")
DEFAULT_BLOCK = 64
FP16_MAX = 65504.0
#: a payload as built (bytes, a view of a tensor, an int8 chunk written in place) or
#: received (a buffer or a view of one)
Payload = bytes | bytearray | memoryview
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


def encode_chunk(values: torch.Tensor, codec: str, block: int) -> tuple[dict[str, Any], Payload]:
    """A 1-D fp32 chunk -> (header, payload): the header and bytes of
    ``shoal.kernels.codecs.encode`` without its crc32 (the transports authenticate every
    byte: Noise, or a bulk stream's AEAD). No copy where none is needed: an fp32 payload
    is a view of ``values`` itself (the caller leaves it unchanged while the payload is in
    use), fp16 a view of its cast; int8 is computed here with fewer passes and temporaries
    (:func:`_int8_block`, checked equal byte for byte in the tests)."""
    kind, dtype = _WIRE[codec]
    flat = values.detach().to("cpu", torch.float32).contiguous().reshape(-1)
    raw = codec != "int8"
    payload: Payload = flat.to(dtype).numpy().data.cast("B") if raw else _int8_block(flat, block)
    header: dict[str, Any] = {
        "dtype": "float16" if codec == "fp16" else "float32",
        "shape": [flat.numel()],
        "codec": kind,
        "nbytes": len(payload),
    }
    if codec == "int8":
        header["block"] = block
    return header, payload


def _int8_block(flat: torch.Tensor, block: int) -> bytearray:
    """``codecs.encode(flat, codec="int8_block")``'s payload, written in place: per block
    scale = absmax / 127 (fp32), code = round(x / max(scale, tiny)) clamped to ±127, the
    scales then the codes. The same fp32 operations as the kernel, so the same bytes,
    written straight into the payload: no padding copy, the codes rounded and clamped in
    place in one scratch buffer."""
    n = flat.numel()
    n_blocks = -(-n // block)
    payload = bytearray(4 * n_blocks + n)
    if n == 0:
        return payload
    scales = torch.frombuffer(payload, dtype=torch.float32, count=n_blocks)
    codes = torch.frombuffer(payload, dtype=torch.int8, offset=4 * n_blocks)
    full = n // block
    tiny = torch.finfo(torch.float32).tiny
    for lo, hi, rows in ((0, full * block, full), (full * block, n, 1)):
        if lo == hi:
            continue
        values = flat[lo:hi].view(rows, hi - lo if rows == 1 else block)
        b0 = lo // block
        s = scales[b0 : b0 + rows]
        torch.amax(values.abs(), dim=1, out=s)
        s.div_(127)
        q = torch.div(values, s.clamp(min=tiny)[:, None])
        codes[lo:hi].view_as(q).copy_(q.round_().clamp_(-127, 127))
    return payload


def decode_into(
    out: torch.Tensor, payload: bytes | bytearray | memoryview, codec: str, block: int
) -> None:
    """Decode a committed chunk (its bytes already pinned by the chosen digest) straight
    into ``out`` (a contiguous 1-D fp32 slice of the result): no checksum and no copy
    between the wire bytes and the result. The values equal ``codecs.decode`` followed by
    ``.float()``: fp32 and fp16 -> fp32 are exact, and int8 is ``code * scale`` rounded
    once per element in fp32, as :mod:`shoal.kernels.codecs` computes it."""
    n = out.numel()
    if len(payload) != payload_nbytes(codec, n, block):
        raise ValueError(f"a {codec} chunk of {n} elements cannot be {len(payload)} bytes")
    dst = out.numpy()  # shares out's memory; numpy reads read-only buffers without a copy
    if codec == "fp32":
        dst[:] = np.frombuffer(payload, dtype="<f4")
        return
    if codec == "fp16":
        dst[:] = np.frombuffer(payload, dtype="<f2")
        return
    n_blocks = -(-n // block)
    dst[:] = np.frombuffer(payload, dtype=np.int8, offset=4 * n_blocks)
    scales = torch.from_numpy(np.frombuffer(payload, dtype="<f4", count=n_blocks).copy())
    full = n // block * block
    out[:full].view(-1, block).mul_(scales[: n // block, None])
    if full < n:
        out[full:].mul_(scales[-1])


def decode_chunk(
    peer: str,
    header: Any,
    payload: bytes | bytearray | memoryview,
    *,
    codec: str,
    n: int,
    block: int,
) -> torch.Tensor:
    """Validate a contribution's header against what the view expects, then decode it to
    fp32 (an aligned, writable fp32 payload is used in place, without a copy). Raises
    :class:`BadContribution` naming the field; allocates only after the header's sizes
    match the expected ones."""
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
        codecs.expected_nbytes(header, max_elements=n)
    except CodecError as exc:
        raise BadContribution(peer, exc.field, str(exc)) from exc
    raw = np.frombuffer(payload, dtype="<f4") if codec == "fp32" else None
    if raw is not None and raw.flags.writeable and raw.flags.aligned:
        values = torch.from_numpy(raw)  # the received buffer itself: no copy
    else:
        values = torch.empty(n, dtype=torch.float32)
        decode_into(values, payload, codec, block)
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
