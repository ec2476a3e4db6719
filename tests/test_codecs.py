"""Wire codecs: exact round trips, bounded int8 error, and validation before allocation."""

from __future__ import annotations

import zlib

import pytest
import torch

from shoal.kernels.codecs import decode, encode, int8_block_reference
from shoal.kernels.errors import CodecError


def _tensor(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_raw_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    t = _tensor(dtype)
    header, payload = encode(t)
    assert header == {
        "dtype": str(dtype).removeprefix("torch."),
        "shape": [2, 3, 50],
        "codec": "raw",
        "nbytes": 300 * dtype.itemsize,
        "checksum": zlib.crc32(payload),
    }
    out = decode(header, payload)
    assert out.dtype == dtype and torch.equal(out, t)


def test_raw_known_bytes() -> None:
    header, payload = encode(torch.tensor([1.0, -2.0]), dtype=torch.float16)
    assert payload == bytes.fromhex("003c00c0")
    assert header["dtype"] == "float16" and header["nbytes"] == 4


def test_int8_block_matches_reference_and_is_small() -> None:
    t = _tensor()
    header, payload = encode(t, codec="int8_block", block=64)
    assert header["nbytes"] == len(payload) == 300 + 4 * 5  # 5 blocks of 64 cover 300 values
    out = decode(header, payload)
    torch.testing.assert_close(out, int8_block_reference(t, 64), atol=1e-6, rtol=0)
    assert float((out - t).abs().max()) <= float(t.abs().max()) / 127 / 2 + 1e-6


def test_empty_tensor_round_trips() -> None:
    for codec in ("raw", "int8_block"):
        header, payload = encode(torch.empty(0, 4), codec=codec)
        assert decode(header, payload).shape == (0, 4)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"dtype": "int64"}, "dtype"),
        ({"dtype": "torch.float32"}, "dtype"),
        ({"shape": [2, -3, 50]}, "shape"),
        ({"shape": [2**20, 2**20]}, "shape"),
        ({"shape": "300"}, "shape"),
        ({"codec": "pickle"}, "codec"),
        ({"nbytes": 1}, "nbytes"),
        ({"checksum": 0}, "checksum"),
    ],
)
def test_bad_headers_are_rejected(change: dict[str, object], field: str) -> None:
    header, payload = encode(_tensor())
    with pytest.raises(CodecError) as info:
        decode({**header, **change}, payload, max_elements=10**6)
    assert info.value.field == field


def test_short_payload_is_rejected() -> None:
    header, payload = encode(_tensor())
    with pytest.raises(CodecError, match="payload has 1196 bytes, the header says 1200"):
        decode(header, payload[:-4])


def test_unsupported_dtype_cannot_be_encoded() -> None:
    with pytest.raises(CodecError, match="cannot go on the wire"):
        encode(torch.arange(3))
