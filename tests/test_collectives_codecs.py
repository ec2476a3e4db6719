"""Compressed all-reduce: the owner applies the dequantized value, so every peer holds the
same bytes, equal to the documented reduction; the error against the exact average stays
within the stated bound."""

from __future__ import annotations

import pytest
import torch
from test_collectives_support import contributions, exact_average, group, reference, run, sha

from shoal.collectives import AllReduce
from shoal.collectives.codec import (
    SEGMENT,
    accept_chunk,
    decode_into,
    encode_chunk,
    encode_contribution,
    error_bound,
    payload_nbytes,
    reduce_encode,
)
from shoal.collectives.errors import BadContribution
from shoal.collectives.memnet import Fault, MemoryNetwork
from shoal.kernels import codecs, native


@pytest.fixture(autouse=True, params=["native", "torch"])
def int8_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with the native int8 kernels and with the torch code."""
    if request.param == "torch":
        monkeypatch.setattr(native, "chunk_kernels", lambda: None)
    elif native.chunk_kernels() is None:
        pytest.skip("the native int8 kernels could not be built here (no C compiler?)")
    return str(request.param)


@pytest.mark.parametrize("codec", ["fp16", "int8"])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_lossy_codecs_identical_bytes_and_within_stated_bound(codec: str, n: int) -> None:
    view = group(n, (9, 130), codec=codec)  # 1170 elements: a partial last int8 block
    xs = contributions(view, seed=n, scale=3.0)
    # make block maxima very different, so a wrong per-block bound would show
    xs[view.peers[0]][0, :64] *= 100
    ops, _, _ = run(view, xs)
    ref = reference(view, xs, view.peers)
    exact = exact_average(view, xs, view.peers).reshape(-1)
    bound = error_bound([xs[p] for p in view.peers], codec, view.block).double()
    digests = set()
    for op in ops.values():
        assert op.result is not None
        assert torch.equal(op.result.tensor, ref)  # the owner's dequantized value, everywhere
        digests.add(op.result.digest)
        err = (op.result.tensor.reshape(-1).double() - exact).abs()
        assert bool((err <= bound).all()), float((err - bound).max())
    assert len(digests) == 1
    # the codec is really lossy here (the test would not notice a silent fp32 path)
    assert not torch.equal(ref, reference(group(n, (9, 130)), xs, view.peers))


def test_int8_bound_is_per_block() -> None:
    view = group(3, (256,), codec="int8")
    xs = contributions(view, seed=1)
    xs[view.peers[2]][:64] *= 100
    bound = error_bound([xs[p] for p in view.peers], "int8", view.block)
    block_max = torch.stack(list(xs.values())).abs().amax(dim=0).view(4, 64).amax(dim=1)
    assert torch.allclose(bound.view(4, 64), (block_max / 127)[:, None].expand(4, 64), rtol=2e-4)
    assert float(bound[:64].min()) > 50 * float(bound[64:].max())


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_lossy_codec_with_owner_killed_mid_reduce_scatter(codec: str) -> None:
    view = group(4, (3, 200), codec=codec)
    xs = contributions(view, seed=7)
    owner = view.owner(1, view.peers)
    assert owner is not None
    ops, net, _ = run(view, xs, [Fault(owner, 0, "before", kind="REPL")])
    survivors = sorted(net.alive)
    results = [ops[p].result for p in survivors]
    assert all(r is not None for r in results)
    assert {r.digest for r in results if r} == {sha(reference(view, xs, survivors))}


def test_compressed_contributions_are_smaller_on_the_wire() -> None:
    sizes = {}
    for codec in ("fp32", "fp16", "int8"):
        view = group(4, (64, 64), codec=codec)
        _, _, stats = run(view, contributions(view))
        sizes[codec] = sum(stats.bytes_sent.values())
    assert sizes["fp16"] < 0.6 * sizes["fp32"]
    assert sizes["int8"] < 0.35 * sizes["fp32"]
    assert payload_nbytes("int8", 4096, 64) == 4096 + 4 * 64


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("n", [1, 63, 64, 65, 1170, 2 * SEGMENT + 65])
@pytest.mark.parametrize("block", [1, 7, 64])
def test_chunk_codec_is_the_kernel_codec_byte_for_byte(codec: str, n: int, block: int) -> None:
    """encode_chunk (int8 computed a segment at a time here) gives the kernel's header
    (less its crc32: the transports authenticate the bytes) and bytes, and decode_into
    (straight into the result) gives the kernel's decoded values, bit for bit: zero blocks,
    -0.0, tiny and huge magnitudes, partial last blocks, several segments. accept_chunk
    decodes fp32 and fp16 the same way and keeps an int8 payload as it is."""
    kind, dtype = {"fp32": ("raw", torch.float32), "fp16": ("raw", torch.float16)}.get(
        codec, ("int8_block", torch.float32)
    )
    g = torch.Generator().manual_seed(n * 100 + block)
    for scale in (1e-30, 1.0, 1e4 if codec == "fp16" else 1e30):
        x = torch.randn(n, generator=g) * scale
        x[::5] = 0.0
        x[1::9] = -0.0
        if n > 130:
            x[64:128] = 0.0  # a whole zero block
        header, payload = encode_chunk(x, codec, block)
        ref_header, ref_payload = codecs.encode(x, codec=kind, dtype=dtype, block=block)
        assert header == {k: v for k, v in ref_header.items() if k != "checksum"}
        assert bytes(payload) == bytes(ref_payload)
        out = torch.full((n,), float("nan"))
        decode_into(out, bytes(payload), codec, block)
        ref = codecs.decode(ref_header, ref_payload).float()
        assert out.numpy().tobytes() == ref.numpy().tobytes()
        slot = accept_chunk("p", header, payload, codec=codec, n=n, block=block)
        if codec == "int8":
            assert slot is payload
        else:
            assert isinstance(slot, torch.Tensor) and torch.equal(slot, ref)


def test_an_aligned_writable_fp32_payload_is_used_in_place_and_others_are_copied() -> None:
    x = torch.randn(1000)
    header, payload = encode_chunk(x, "fp32", 64)
    assert isinstance(payload, memoryview)  # a view of x: no copy on the way out either
    received = bytearray(payload)  # what a transport hands over: a buffer of its own
    values = accept_chunk("p", header, received, codec="fp32", n=1000, block=64)
    assert isinstance(values, torch.Tensor) and torch.equal(values, x)
    assert values.data_ptr() == torch.frombuffer(received, dtype=torch.float32).data_ptr()
    frozen = accept_chunk("p", header, bytes(received), codec="fp32", n=1000, block=64)
    odd = memoryview(bytearray(b"\0" + received))[1:]  # writable, not 4-byte aligned
    unaligned = accept_chunk("p", header, odd, codec="fp32", n=1000, block=64)
    assert isinstance(frozen, torch.Tensor) and torch.equal(frozen, x)
    assert isinstance(unaligned, torch.Tensor) and torch.equal(unaligned, x)


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize(("n", "block"), [(1170, 64), (2 * SEGMENT + 100, 64), (SEGMENT + 3, 7)])
def test_reduce_encode_equals_decoding_reducing_and_encoding_whole_chunks(
    codec: str, n: int, block: int
) -> None:
    """The owner's reduction (int8: decoded, summed and encoded again a segment at a
    time, from the payloads) gives the bytes of the plain recipe: the kernel decodes each
    contribution, they are summed in order with their weights in fp32, divided by the
    weights' sum, and the kernel encodes that."""
    kind, dtype = {"fp32": ("raw", torch.float32), "fp16": ("raw", torch.float16)}.get(
        codec, ("int8_block", torch.float32)
    )
    g = torch.Generator().manual_seed(n + block)
    weights = [1.0, 0.1, 3.0, 1 / 3]
    xs = [torch.randn(n, generator=g) * s for s in (1.0, 1e-3, 50.0, 1.0)]
    xs[0][: 2 * block] = 0.0
    encoded = [codecs.encode(x, codec=kind, dtype=dtype, block=block) for x in xs]
    decoded = [codecs.decode(h, p).float() for h, p in encoded]
    acc, total = torch.zeros(n), torch.zeros(())
    for x, w in zip(decoded, weights, strict=True):
        acc += x if w == 1.0 else x * w
        total = total + w
    _, want = codecs.encode(acc / total, codec=kind, dtype=dtype, block=block)
    slots = [
        accept_chunk(
            "p", {k: v for k, v in h.items() if k != "checksum"}, p, codec=codec, n=n, block=block
        )
        for h, p in encoded
    ]
    got = reduce_encode(list(zip(slots, weights, strict=True)), codec, n, block)
    assert bytes(got) == bytes(want)


FLOAT_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize(
    "bad_scale",
    [float("nan"), float("inf"), -float("inf"), 3e38, FLOAT_MAX / 127, -FLOAT_MAX / 127],
)
def test_an_int8_contribution_with_a_bad_scale_is_refused(bad_scale: float) -> None:
    """int8 contributions are checked by their scales only: one NaN, infinite, or so
    large that some code times it overflows, is refused (FLOAT_MAX / 127 rounded to fp32
    times 127 overflows, and so does anything above FLOAT_MAX / 128 times the code -128,
    which no honest encoder writes but a peer may)."""
    x = torch.randn(640)
    header, payload = encode_chunk(x, "int8", 64)
    good = accept_chunk("p", header, payload, codec="int8", n=640, block=64)
    assert good is payload
    bad = bytearray(payload)
    bad[4 * 10 + 3 * 64] = 0x80  # code -128, in block 3
    bad[12:16] = torch.tensor([bad_scale]).numpy().tobytes()  # block 3's scale
    with pytest.raises(BadContribution) as info:
        accept_chunk("p", header, bad, codec="int8", n=640, block=64)
    assert info.value.field == "nonfinite" and info.value.peer == "p"


def test_int8_codes_need_no_clamp_at_any_magnitude() -> None:
    """encode_chunk leaves out the kernel's clamp to ±127 (x / fl(absmax / 127) rounds to at
    most 127): its bytes equal the kernel's for blocks of every magnitude fp32 holds,
    subnormal ones included, with each block's largest value of either sign."""
    g = torch.Generator().manual_seed(5)
    blocks = 4096
    exponents = torch.randint(-149, 128, (blocks, 1), generator=g).float()
    x = (torch.rand(blocks, 64, generator=g) * 2 - 1) * torch.exp2(exponents)
    x[::2, 7] = -x[::2].abs().amax(dim=1) * (1 + 2**-23)  # a negative largest value
    x = torch.nan_to_num(x, posinf=3e38, neginf=-3e38).reshape(-1)
    _, payload = encode_chunk(x, "int8", 64)
    _, ref_payload = codecs.encode(x, codec="int8_block", block=64)
    assert bytes(payload) == bytes(ref_payload)
    codes = torch.frombuffer(bytearray(payload), dtype=torch.int8, offset=4 * blocks)
    assert int(codes.abs().max()) == 127


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_encoded_contributions_and_sums_come_from_the_given_allocator(codec: str) -> None:
    """A driver hands its buffer pool to the machines: every encoded int8 chunk and every
    reduced chunk is written into a buffer from ``alloc`` (fp32 contributions are sent as
    views of the tensor itself), and the result is the same as with fresh buffers."""
    view = group(4, (3, 1000), codec=codec)
    xs = contributions(view, seed=11)
    sizes: dict[str, list[int]] = {p: [] for p in view.peers}

    def alloc_for(peer: str):  # type: ignore[no-untyped-def]
        def alloc(size: int) -> bytearray:
            sizes[peer].append(size)
            return bytearray(b"\xa5" * size)  # not zeroed: every byte must be written

        return alloc

    ops = {p: AllReduce(view, p, alloc=alloc_for(p)) for p in view.peers}
    net = MemoryNetwork(ops, [])
    for p in view.peers:
        net.call(p, lambda p=p: ops[p].contribute(xs[p]))  # type: ignore[misc]
    net.run()
    ref = reference(view, xs, view.peers)
    for p, op in ops.items():
        assert op.result is not None and torch.equal(op.result.tensor, ref)
        chunks = [view.chunk_len(c) for c in range(view.n_chunks)]
        owned = [n for c, n in enumerate(chunks) if view.owner(c, view.peers) == p]
        encoded = [payload_nbytes(codec, n, view.block) for n in chunks]
        reduced = [payload_nbytes(codec, n, view.block) for n in owned]
        assert sorted(sizes[p]) == sorted((encoded if codec == "int8" else []) + reduced)


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_reduce_encode_refuses_parts_of_another_size(codec: str) -> None:
    """The native kernels read n elements of every part: a part of another size is a
    ValueError before any of them runs."""
    good = encode_chunk(torch.randn(640), codec, 64)[1]
    short = encode_chunk(torch.randn(576), codec, 64)[1]
    parts = [
        accept_chunk(
            "p", encode_chunk(torch.randn(640), codec, 64)[0], good, codec=codec, n=640, block=64
        )
    ]
    other = accept_chunk(
        "q", encode_chunk(torch.randn(576), codec, 64)[0], short, codec=codec, n=576, block=64
    )
    with pytest.raises(ValueError, match=r"must be (a payload of|640 fp32)"):
        reduce_encode([(parts[0], 1.0), (other, 1.0)], codec, 640, 64)
    assert len(reduce_encode([(parts[0], 1.0)], codec, 640, 64)) == payload_nbytes(codec, 640, 64)
    wrong_kind = torch.randn(640, dtype=torch.float64) if codec == "fp32" else torch.randn(640)
    with pytest.raises(ValueError, match="must be"):  # another dtype; a tensor for int8
        reduce_encode([(parts[0], 1.0), (wrong_kind, 1.0)], codec, 640, 64)


def test_the_largest_scale_accepted_keeps_every_code_finite() -> None:
    """At the limit, FLOAT_MAX / 128, even the code -128 decodes to a finite value; an
    honest contribution whose block holds FLOAT_MAX is refused where it is encoded."""
    x = torch.randn(640)
    header, payload = encode_chunk(x, "int8", 64)
    edge = bytearray(payload)
    edge[4 * 10 + 3 * 64] = 0x80
    edge[12:16] = torch.tensor([FLOAT_MAX / 128]).numpy().tobytes()
    slot = accept_chunk("p", header, edge, codec="int8", n=640, block=64)
    out = torch.empty(640)
    decode_into(out, slot, "int8", 64)  # type: ignore[arg-type]
    assert bool(torch.isfinite(out).all()) and float(out[3 * 64]) == -FLOAT_MAX
    huge = torch.zeros(640)
    huge[100] = FLOAT_MAX
    with pytest.raises(BadContribution) as info:
        encode_contribution("me", huge, [(0, 640)], "int8", 64)
    assert info.value.field == "nonfinite"
