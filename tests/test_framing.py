"""The sans-io frame decoder: round trips, limits checked before allocation, bad bytes."""

from __future__ import annotations

import itertools
import struct

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.transport.errors import FrameError, FrameTooLarge
from shoal.transport.framing import FrameDecoder, encode_frame, encode_header


def decode_all(data: bytes, *, cuts: list[int] | None = None, **limits: int) -> list:
    decoder = FrameDecoder(**limits)
    frames = []
    pieces = [data]
    if cuts:
        bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
        pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    for piece in pieces:
        decoder.feed(piece)
        while (frame := decoder.next_frame()) is not None:
            frames.append((dict(frame.header), bytes(frame.payload)))
    decoder.feed_eof()
    return frames


headers = st.dictionaries(
    st.text(min_size=1, max_size=8).filter(lambda k: k not in ("t", "n")),
    st.one_of(st.integers(-(2**40), 2**40), st.text(max_size=20), st.binary(max_size=20)),
    max_size=4,
)


@given(
    st.lists(st.tuples(headers, st.binary(max_size=3000)), min_size=1, max_size=5),
    st.lists(st.integers(0, 20000), max_size=6),
)
def test_round_trip_across_any_split(messages: list, cuts: list[int]) -> None:
    wire = b"".join(encode_frame({"t": "x", **h}, p) for h, p in messages)
    frames = decode_all(wire, cuts=cuts, max_payload=4096)
    assert [p for _, p in frames] == [p for _, p in messages]
    for (header, payload), (sent, _) in zip(frames, messages, strict=True):
        assert header["t"] == "x"
        assert {k: v for k, v in header.items() if k not in ("t", "n")} == sent
        assert header.get("n", 0) == len(payload)


def test_exact_bytes_on_the_wire() -> None:
    wire = encode_frame({"t": "call", "b": {"k": 1}}, b"\x00\x01")
    packed = msgpack.packb({"t": "call", "b": {"k": 1}, "n": 2}, use_bin_type=True)
    assert wire == struct.pack(">I", len(packed)) + packed + b"\x00\x01"


def test_oversized_payload_is_refused_before_allocation() -> None:
    decoder = FrameDecoder(max_payload=1024)
    # Declares 1 TiB; only the header is on the wire. Allocating would take the machine.
    decoder.feed(encode_header({"t": "x"}, 1 << 40))
    with pytest.raises(FrameTooLarge) as info:
        decoder.next_frame()
    assert (info.value.what, info.value.size, info.value.limit) == ("payload", 1 << 40, 1024)


def test_oversized_header_is_refused_from_the_prefix_alone() -> None:
    decoder = FrameDecoder(max_header=100)
    decoder.feed(struct.pack(">I", 0xFFFFFFFF))
    with pytest.raises(FrameTooLarge) as info:
        decoder.next_frame()
    assert info.value.size == 0xFFFFFFFF


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xc1", "not valid msgpack"),  # 0xc1 is never used in msgpack
        (msgpack.packb([1, 2]), "must be a map"),
        (msgpack.packb({"x": 1}), "no type field"),
        (msgpack.packb({"t": "x", "n": -5}), "non-negative"),
        (msgpack.packb({"t": "x", "n": "big"}), "non-negative"),
        (msgpack.packb({1: "x"}), "not valid msgpack"),  # strict_map_key: keys must be str
    ],
)
def test_bad_headers_are_typed_errors(raw: bytes, reason: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", len(raw)) + raw)
    with pytest.raises(FrameError, match=reason):
        decoder.next_frame()


def test_truncated_frame_is_an_error_at_eof() -> None:
    wire = encode_frame({"t": "x"}, b"abcdef")
    decoder = FrameDecoder()
    decoder.feed(wire[:-2])
    assert decoder.next_frame() is None
    assert decoder.wanted() == 2
    with pytest.raises(FrameError, match="truncated"):
        decoder.feed_eof()


def test_truncated_msgpack_is_an_error_at_eof() -> None:
    raw = msgpack.packb({"t": "call", "b": {"long": "x" * 50}})
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">I", len(raw)) + raw[:10])
    assert decoder.next_frame() is None
    with pytest.raises(FrameError, match="truncated"):
        decoder.feed_eof()


def test_clean_eof_between_frames() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame({"t": "x"}))
    assert decoder.next_frame() is not None
    decoder.feed_eof()  # no error
