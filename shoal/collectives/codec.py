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

import ctypes
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import numpy as np
import torch

from shoal.collectives.errors import BadContribution
from shoal.kernels import codecs, native
from shoal.kernels.errors import CodecError

CODECS = ("fp32", "fp16", "int8")
DEFAULT_BLOCK = 64
FP16_MAX = 65504.0
#: the largest int8 scale accepted: every code, -128 included, times it is finite
#: (FLOAT_MAX times 2**-7, exact in fp32; an honest block's absmax above 0.992 x FLOAT_MAX
#: is refused with it)
_INT8_MAX_SCALE = torch.finfo(torch.float32).max / 128
#: a payload as built (bytes, a view of a tensor, an int8 chunk written in place) or
#: received (a buffer or a view of one)
Payload = bytes | bytearray | memoryview
#: an accepted contribution: fp32 and fp16 ones decoded to fp32, int8 ones as their payload
#: (decoded a segment at a time when reduced: :func:`reduce_encode`)
Slot = torch.Tensor | Payload
#: where the buffers of encoded chunks and sums come from: ``bytearray`` by default, a
#: driver's pool (``BufferPool.take``, reused buffers: no page faults) in a node
Alloc = Callable[[int], bytearray]
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


def encode_chunk(
    values: torch.Tensor, codec: str, block: int, alloc: Alloc = bytearray
) -> tuple[dict[str, Any], Payload]:
    """A 1-D fp32 chunk -> (header, payload): the header and bytes of
    ``shoal.kernels.codecs.encode`` without its crc32 (the transports authenticate every
    byte: Noise, or a bulk stream's AEAD). No copy where none is needed: an fp32 payload
    is a view of ``values`` itself (the caller leaves it unchanged while the payload is in
    use), fp16 a view of its cast; int8 is computed here with fewer passes and temporaries
    (:func:`_int8_block`, checked equal byte for byte in the tests)."""
    kind, dtype = _WIRE[codec]
    flat = values.detach().to("cpu", torch.float32).contiguous().reshape(-1)
    raw = codec != "int8"
    payload: Payload = (
        flat.to(dtype).numpy().data.cast("B") if raw else _int8_block(flat, block, alloc)
    )
    header: dict[str, Any] = {
        "dtype": "float16" if codec == "fp16" else "float32",
        "shape": [flat.numel()],
        "codec": kind,
        "nbytes": len(payload),
    }
    if codec == "int8":
        header["block"] = block
    return header, payload


class NonFiniteParts(ValueError):
    """Contributions that hold NaN or infinity, found when reduced: their indices, and
    their senders where the caller named the parts."""

    def __init__(self, indices: list[int], peers: Sequence[str] = ()) -> None:
        super().__init__(f"NaN or infinity in parts {indices}")
        self.indices = indices
        self.peers = list(peers)


def _tensor(slot: Slot) -> torch.Tensor:
    assert isinstance(slot, torch.Tensor), "fp32 and fp16 contributions are decoded tensors"
    return slot


SEGMENT = 1 << 16  # elements per step of the int8 kernels: 256 KiB of fp32, kept in L2


def _segments(n: int, block: int) -> Iterator[tuple[int, int, int]]:
    """``(lo, hi, rows)``: an int8 chunk of ``n`` elements in the steps its kernels take,
    whole blocks ``SEGMENT`` elements at a time, then the partial last block as one row.
    Every pass of a step runs over data still in the cache; one pass over the whole chunk
    per operation, with a temporary as large as the chunk, costs 3-4x as much."""
    full = n // block * block
    step = max(block, SEGMENT // block * block)
    for lo in range(0, full, step):
        hi = min(lo + step, full)
        yield lo, hi, (hi - lo) // block
    if full < n:
        yield full, n, 1


def _int8_parts(payload: Payload, n: int, block: int) -> tuple[torch.Tensor, np.ndarray]:
    """An int8 payload's scales (a tensor: a copy, n / block floats) and codes (a numpy
    view of the payload, which may be read-only)."""
    scales, codes = _native_parts(payload, n, block)
    return torch.from_numpy(scales.copy()), codes


def _int8_block(flat: torch.Tensor, block: int, alloc: Alloc = bytearray) -> bytearray:
    """``codecs.encode(flat, codec="int8_block")``'s payload: per block
    scale = absmax / 127 (fp32), code = round(x / max(scale, tiny)) (within ±127 without
    the kernel's clamp: :func:`_int8_encode_into`), the scales then the codes. The same
    fp32 operations as the kernel, so the same bytes, written straight into the payload:
    by the native kernel where it is built, else a segment at a time (:func:`_segments`)
    in one small scratch buffer."""
    n = flat.numel()
    out = alloc(payload_nbytes("int8", n, block))
    if (lib := native.chunk_kernels()) is not None and n and _aligned(flat):
        scales, codes = _addresses(out, n, block)
        lib.shoal_int8_encode(flat.data_ptr(), n, block, scales, codes)
        return out
    _int8_encode_into(out, n, block, lambda lo, hi, _: flat[lo:hi])
    return out


def _aligned(t: torch.Tensor) -> bool:
    """A tensor the native kernels may read or write as floats (4-byte aligned; a
    ``torch.frombuffer`` view at an odd offset is not)."""
    return t.data_ptr() % 4 == 0


def _addresses(payload: bytearray, n: int, block: int) -> tuple[int, int]:
    """Where a writable int8 payload's scales and codes start in memory (for the native
    kernels; a fresh bytearray is aligned for floats)."""
    at = ctypes.addressof(ctypes.c_char.from_buffer(payload))
    return at, at + 4 * -(-n // block)


def _native_parts(payload: Payload, n: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """An int8 payload's scales (aligned: copied where the payload is not) and codes, as
    numpy arrays whose ``ctypes.data`` the native kernels read (read-only ones too)."""
    n_blocks = -(-n // block)
    scales = np.frombuffer(payload, dtype="<f4", count=n_blocks)
    codes = np.frombuffer(payload, dtype=np.int8, offset=4 * n_blocks)
    return (scales if scales.flags.aligned else scales.copy()), codes


def _int8_encode_into(
    payload: bytearray,
    n: int,
    block: int,
    values_at: Callable[[int, int, torch.Tensor], torch.Tensor],
) -> None:
    """Encode into ``payload`` the values ``values_at(lo, hi, scratch)`` gives for each
    segment (a tensor of hi - lo fp32 elements; it may compute them in ``scratch``, which
    it may then not keep)."""
    if n == 0:
        return
    n_blocks = -(-n // block)
    scales = torch.frombuffer(payload, dtype=torch.float32, count=n_blocks)
    codes = torch.frombuffer(payload, dtype=torch.int8, offset=4 * n_blocks)
    tiny = torch.finfo(torch.float32).tiny
    work = torch.empty(2 * min(n, max(block, SEGMENT)), dtype=torch.float32)
    given, scratch = work.chunk(2)
    for lo, hi, rows in _segments(n, block):
        values = values_at(lo, hi, given[: hi - lo]).view(rows, -1)
        q = scratch[: hi - lo].view(rows, -1)
        s = scales[lo // block : lo // block + rows]
        torch.amax(torch.abs(values, out=q), dim=1, out=s)
        s.div_(127)
        torch.div(values, s.clamp(min=tiny)[:, None], out=q)
        # no clamp to ±127, unlike the kernel: |x| <= absmax and s = fl(absmax / 127) make
        # |x / s| <= 127 * (1 + 2**-23) (or < 127 where s is raised to tiny), which rounds
        # to at most 127; the byte-for-byte test holds it to the kernel's clamped bytes
        codes[lo:hi].view_as(q).copy_(q.round_())


def _int8_decode_step(
    out: torch.Tensor, scales: torch.Tensor, codes: np.ndarray, lo: int, hi: int, block: int
) -> None:
    """Decode elements ``lo:hi`` of an int8 chunk (whole blocks, or the partial last one)
    into ``out`` (hi - lo fp32): code * scale, rounded once per element in fp32."""
    rows = (hi - lo) // block or 1
    out.numpy()[:] = codes[lo:hi]
    out.view(rows, -1).mul_(scales[lo // block : lo // block + rows, None])


def reduce_encode(
    parts: Sequence[tuple[Slot, float]], codec: str, n: int, block: int, alloc: Alloc = bytearray
) -> Payload:
    """The canonical reduction, encoded: sum of w_i * x_i in the order given (sorted peer
    order), in fp32, divided by the sum of the weights (accumulated in fp32 in the same
    order). Each product and each sum is rounded on its own (no fused ops), and a weight of
    1 skips the product, which is exact then. fp32/fp16 parts are decoded tensors, checked
    for NaN and infinity here (:class:`NonFiniteParts` names the parts that hold any);
    int8 parts are payloads (see :func:`accept_chunk`), decoded, summed and encoded again
    a segment at a time, with the same values as decoding whole chunks first. The native
    kernels (:mod:`shoal.kernels.native`) compute the same bytes where they are built."""
    size = payload_nbytes(codec, n, block)
    if any(_bad_part(p, codec, n, size) for p, _ in parts):  # the native kernels trust them
        kind = f"a payload of {size} bytes" if codec == "int8" else f"{n} fp32 CPU values"
        raise ValueError(f"every part of a {codec} chunk of {n} elements must be {kind}")
    total = torch.zeros((), dtype=torch.float32)
    for _, w in parts:
        total = total + w
    if codec == "int8":
        payloads = [(cast(Payload, p), w) for p, w in parts]  # checked just above
        return _reduce_int8(payloads, total, n, block, alloc)
    acc = _reduce_float([(_tensor(t), w) for t, w in parts], total, n, alloc)
    return encode_chunk(acc, codec, block)[1]


def _bad_part(part: Slot, codec: str, n: int, size: int) -> bool:
    if isinstance(part, torch.Tensor):
        return codec == "int8" or (
            part.numel() != n or part.dtype != torch.float32 or part.device.type != "cpu"
        )
    return codec != "int8" or len(part) != size


def _reduce_float(
    parts: Sequence[tuple[torch.Tensor, float]], total: torch.Tensor, n: int, alloc: Alloc
) -> torch.Tensor:
    """:func:`reduce_encode`'s fp32 sum of decoded contributions, before encoding (in a
    buffer from ``alloc``: an fp32 chunk is sent as a view of it)."""
    acc = torch.frombuffer(alloc(4 * n), dtype=torch.float32) if n else torch.empty(0)
    if (lib := native.chunk_kernels()) is not None:
        # every buffer the call reads or writes is held by a name until it returns
        tensors = [t.contiguous() if _aligned(t) else t.clone() for t, _ in parts]
        weights = np.array([w for _, w in parts], dtype=np.float32)
        k = len(tensors)
        bad = np.zeros(k, dtype=np.uint8)
        lib.shoal_f32_reduce(
            k,
            (ctypes.c_void_p * k)(*(t.data_ptr() for t in tensors)),
            weights.ctypes.data,
            float(total),
            n,
            acc.data_ptr(),
            bad.ctypes.data,
        )
        if bad.any():
            raise NonFiniteParts([int(i) for i in np.flatnonzero(bad)])
        return acc
    if nonfinite := [i for i, (t, _) in enumerate(parts) if not all_finite(t)]:
        raise NonFiniteParts(nonfinite)
    acc.zero_()
    scratch: torch.Tensor | None = None
    for values, w in parts:
        if w == 1.0:
            acc.add_(values)
        else:
            scratch = torch.empty_like(acc) if scratch is None else scratch
            acc.add_(torch.mul(values, w, out=scratch))
    return acc.div_(total)


def _reduce_int8(
    parts: Sequence[tuple[Payload, float]], total: torch.Tensor, n: int, block: int, alloc: Alloc
) -> bytearray:
    """:func:`reduce_encode` of int8 payloads: decoded, summed and encoded again a block
    (native) or a segment (torch) at a time."""
    out = alloc(payload_nbytes("int8", n, block))
    if (lib := native.chunk_kernels()) is not None and n:
        # every buffer the call reads or writes is held by a name until it returns
        held = [_native_parts(p, n, block) for p, _ in parts]
        weights = np.array([w for _, w in parts], dtype=np.float32)
        scratch = np.empty(block, dtype=np.float32)
        k = len(held)
        lib.shoal_int8_reduce(
            k,
            (ctypes.c_void_p * k)(*(scales.ctypes.data for scales, _ in held)),
            (ctypes.c_void_p * k)(*(codes.ctypes.data for _, codes in held)),
            weights.ctypes.data,
            float(total),
            n,
            block,
            scratch.ctypes.data,
            *_addresses(out, n, block),
        )
        return out
    decoded = [(*_int8_parts(p, n, block), w) for p, w in parts]
    step = torch.empty(min(n, max(block, SEGMENT)), dtype=torch.float32)

    def reduced(lo: int, hi: int, acc: torch.Tensor) -> torch.Tensor:
        x = step[: hi - lo]
        acc.zero_()
        for scales, codes, w in decoded:
            _int8_decode_step(x, scales, codes, lo, hi, block)
            acc.add_(x if w == 1.0 else x.mul_(w))
        return acc.div_(total)

    _int8_encode_into(out, n, block, reduced)
    return out


def decode_into(
    out: torch.Tensor, payload: bytes | bytearray | memoryview, codec: str, block: int
) -> None:
    """Decode a committed chunk (its bytes already pinned by the chosen digest) straight
    into ``out`` (a contiguous 1-D fp32 slice of the result): no checksum and no copy
    between the wire bytes and the result. The values equal ``codecs.decode`` followed by
    ``.float()``: fp32 and fp16 -> fp32 are exact, and int8 is ``code * scale`` rounded
    once per element in fp32, as :mod:`shoal.kernels.codecs` computes it."""
    n = out.numel()
    if not out.is_contiguous() or out.dtype != torch.float32:
        raise ValueError("decode_into needs a contiguous fp32 tensor")
    if len(payload) != payload_nbytes(codec, n, block):
        raise ValueError(f"a {codec} chunk of {n} elements cannot be {len(payload)} bytes")
    dst = out.numpy()  # shares out's memory; numpy reads read-only buffers without a copy
    if codec == "fp32":
        dst[:] = np.frombuffer(payload, dtype="<f4")
        return
    if codec == "fp16":
        dst[:] = np.frombuffer(payload, dtype="<f2")
        return
    if (lib := native.chunk_kernels()) is not None and n and _aligned(out):
        held = _native_parts(payload, n, block)
        lib.shoal_int8_decode(held[0].ctypes.data, held[1].ctypes.data, n, block, out.data_ptr())
        return
    scales, codes = _int8_parts(payload, n, block)
    for lo, hi, _ in _segments(n, block):
        _int8_decode_step(out[lo:hi], scales, codes, lo, hi, block)


def accept_chunk(
    peer: str,
    header: Any,
    payload: bytes | bytearray | memoryview,
    *,
    codec: str,
    n: int,
    block: int,
) -> Slot:
    """Validate a contribution's header against what the view expects: an fp32 or fp16
    one is decoded to fp32 (an aligned, writable fp32 payload is used in place, without a
    copy), and checked for NaN and infinity by :func:`reduce_encode`, on the pass that
    sums it; an int8 one stays as it came, and its scales are checked here (n / block
    floats: every code times a finite scale of at most FLOAT_MAX / 128 is finite). Raises
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
    if codec == "int8":
        if not _scales_ok(payload, n, block):
            raise BadContribution(peer, "nonfinite", "a scale is NaN, infinite or too large")
        return payload
    raw = np.frombuffer(payload, dtype="<f4") if codec == "fp32" else None
    if raw is not None and raw.flags.writeable and raw.flags.aligned:
        return torch.from_numpy(raw)  # the received buffer itself: no copy
    values = torch.empty(n, dtype=torch.float32)
    decode_into(values, payload, codec, block)
    return values


def _scales_ok(payload: Payload, n: int, block: int) -> bool:
    """An int8 chunk decodes to finite values: every scale is finite and at most
    FLOAT_MAX / 128 (a NaN or an infinity among the values gives a NaN or infinite scale)."""
    scales, _ = _int8_parts(payload, n, block)
    return n == 0 or (all_finite(scales) and bool(scales.abs().amax() <= _INT8_MAX_SCALE))


def encode_contribution(
    peer: str,
    flat: torch.Tensor,
    bounds: Sequence[tuple[int, int]],
    codec: str,
    block: int,
    alloc: Alloc = bytearray,
) -> list[tuple[dict[str, Any], Payload]]:
    """The chunks ``flat[lo:hi]`` of a local contribution (checked by
    :func:`check_contribution`), encoded. An int8 contribution is checked for NaN and
    infinity here, by its scales, instead of by a pass over the whole tensor."""
    chunks = [encode_chunk(flat[lo:hi], codec, block, alloc) for lo, hi in bounds]
    if codec == "int8" and not all(
        _scales_ok(payload, hi - lo, block)
        for (lo, hi), (_, payload) in zip(bounds, chunks, strict=True)
    ):
        raise BadContribution(
            peer, "nonfinite", "NaN, infinity or |x| > 0.99 x FLOAT_MAX in the contribution"
        )
    return chunks


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
    """Local validation of a contribution before anything is sent (for int8 but NaN and
    infinity, which :func:`encode_contribution` finds on the way)."""
    if not isinstance(tensor, torch.Tensor):
        raise BadContribution(peer, "dtype", f"{type(tensor).__name__} is not a tensor")
    if tuple(tensor.shape) != shape:
        raise BadContribution(peer, "shape", f"{tuple(tensor.shape)}, expected {shape}")
    if tensor.dtype != torch.float32:
        raise BadContribution(peer, "dtype", f"{tensor.dtype}, expected torch.float32")
    if codec != "int8" and not all_finite(tensor):
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
