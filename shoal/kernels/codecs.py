"""Tensors to bytes and back, for the wire: raw fp32/fp16/bf16 and int8 blockwise.

A frame is a small header dict (sent as msgpack by the caller) plus a payload::

    {"dtype": "float16", "shape": [1, 7, 4096], "codec": "raw",
     "nbytes": 57344, "checksum": <crc32 of the payload>}

``dtype`` is the tensor's dtype after decoding. ``int8_block`` stores, per block of
``block`` consecutive elements, one fp32 scale (absmax / 127) and int8 codes: the payload is
all scales (fp32, little-endian) then all int8 codes. :func:`decode` checks every field
against an allow-list and limits, and the payload length against the header, before it
allocates anything.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch

from shoal.kernels.errors import CodecError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
CODECS = ("raw", "int8_block")
INT8_BLOCK = 64
MAX_DIMS = 8
MAX_ELEMENTS = 2**31 - 1  # per-call limits are tighter (decode's max_elements)


def encode(
    tensor: torch.Tensor,
    *,
    codec: str = "raw",
    dtype: torch.dtype | None = None,
    block: int = INT8_BLOCK,
) -> tuple[dict[str, Any], bytes]:
    """``tensor`` -> (header, payload). ``dtype`` casts first (e.g. fp32 activations -> fp16)."""
    t = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
    name = _dtype_name(t.dtype)
    if codec == "raw":
        payload = _raw_bytes(t)
    elif codec == "int8_block":
        payload = _int8_block_bytes(t, block)
    else:
        raise CodecError("codec", f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
    header: dict[str, Any] = {
        "dtype": name,
        "shape": list(t.shape),
        "codec": codec,
        "nbytes": len(payload),
        "checksum": zlib.crc32(payload),
    }
    if codec == "int8_block":
        header["block"] = block
    return header, payload


def expected_nbytes(header: dict[str, Any], *, max_elements: int = MAX_ELEMENTS) -> int:
    """Validate a header (dtype, shape, codec, sizes) and return the payload size it implies."""
    name = header.get("dtype")
    if name not in DTYPES:
        raise CodecError("dtype", f"{name!r} is not one of {', '.join(DTYPES)}")
    shape = header.get("shape")
    if (
        not isinstance(shape, list | tuple)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise CodecError("shape", f"{shape!r} is not a list of at most {MAX_DIMS} sizes >= 0")
    elements = math.prod(shape)
    if elements > max_elements:
        raise CodecError("shape", f"{elements} elements exceed the limit of {max_elements}")
    codec = header.get("codec")
    if codec == "raw":
        size = elements * DTYPES[name].itemsize
    elif codec == "int8_block":
        block = header.get("block")
        if not isinstance(block, int) or isinstance(block, bool) or not 1 <= block <= 2**16:
            raise CodecError("block", f"{block!r} is not a block size in 1..65536")
        size = 4 * -(-elements // block) + elements
    else:
        raise CodecError("codec", f"{codec!r} is not one of {', '.join(CODECS)}")
    if header.get("nbytes") != size:
        raise CodecError(
            "nbytes", f"header says {header.get('nbytes')!r}, dtype and shape imply {size}"
        )
    return size


def decode(
    header: dict[str, Any],
    payload: bytes | bytearray | memoryview,
    *,
    max_elements: int = MAX_ELEMENTS,
) -> torch.Tensor:
    """(header, payload) -> tensor, after validating both (:class:`CodecError` otherwise)."""
    size = expected_nbytes(header, max_elements=max_elements)
    if len(payload) != size:
        raise CodecError("nbytes", f"payload has {len(payload)} bytes, the header says {size}")
    if zlib.crc32(payload) != header.get("checksum"):
        raise CodecError("checksum", "the payload's crc32 does not match the header")
    dtype, shape = DTYPES[header["dtype"]], header["shape"]
    buffer = bytearray(payload)  # a writable copy: torch.frombuffer shares it
    if header["codec"] == "raw":
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)
    return _from_int8_block(buffer, shape, header["block"], dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise CodecError("dtype", f"{dtype} cannot go on the wire; use one of {', '.join(DTYPES)}")


def _raw_bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: send its bits
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _int8_block_bytes(t: torch.Tensor, block: int) -> bytes:
    flat = t.float().reshape(-1)
    pad = -flat.numel() % block
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    scales = blocks.abs().amax(dim=1) / 127
    safe = scales.clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(blocks / safe[:, None]).clamp(-127, 127).to(torch.int8)
    return scales.numpy().tobytes() + codes.reshape(-1)[: flat.numel()].numpy().tobytes()


def _from_int8_block(
    buffer: bytearray, shape: list[int], block: int, dtype: torch.dtype
) -> torch.Tensor:
    elements = math.prod(shape)
    n_blocks = -(-elements // block)
    if elements == 0:
        return torch.empty(shape, dtype=dtype)
    scales = torch.frombuffer(buffer, dtype=torch.float32, count=n_blocks)
    codes = torch.frombuffer(buffer, dtype=torch.int8, offset=4 * n_blocks).float()
    codes = torch.nn.functional.pad(codes, (0, -elements % block)).view(n_blocks, block)
    return (codes * scales[:, None]).reshape(-1)[:elements].reshape(shape).to(dtype)


def int8_block_reference(t: torch.Tensor, block: int = INT8_BLOCK) -> torch.Tensor:
    """What int8_block encode+decode yields, computed without bytes (for tests)."""
    flat = t.detach().float().reshape(-1)
    out = torch.empty_like(flat)
    for i in range(0, flat.numel(), block):
        chunk = flat[i : i + block]
        scale = chunk.abs().max() / 127
        q = torch.round(chunk / scale.clamp(min=torch.finfo(torch.float32).tiny)).clamp(-127, 127)
        out[i : i + block] = q * scale
    return out.reshape(t.shape).to(t.dtype)
