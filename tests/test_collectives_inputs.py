"""Bad inputs: wrong shape or dtype, NaN/inf, a sender outside the group, oversized or
malformed messages, another view. Each is refused with a typed error and the round goes
on without it."""

from __future__ import annotations

import struct

import msgpack
import pytest
import torch
from test_collectives_support import check_safety, contributions, group, reference, rewrite, run

from shoal.collectives import AllReduce, wire
from shoal.collectives.errors import (
    BadContribution,
    MalformedMessage,
    MessageTooLarge,
    NotAMember,
    ViewMismatch,
)
from shoal.collectives.memnet import Fault, MemoryNetwork
from shoal.kernels import codecs


@pytest.mark.parametrize(
    ("tensor", "field"),
    [
        (torch.zeros(12, 51), "shape"),
        (torch.zeros(12, 50, dtype=torch.float64), "dtype"),
        (torch.zeros(12, 50, dtype=torch.float16), "dtype"),
        (torch.full((12, 50), float("nan")), "nonfinite"),
        (torch.full((12, 50), float("inf")), "nonfinite"),
        (
            torch.zeros(12, 50).index_put_(
                (torch.tensor(11), torch.tensor(49)), torch.tensor(-float("inf"))
            ),
            "nonfinite",
        ),
    ],
)
@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_local_bad_contribution_raises_and_changes_nothing(
    tensor: torch.Tensor, field: str, codec: str
) -> None:
    """int8 finds NaN and infinity by the scales it computes, the others by a pass."""
    view = group(3, codec=codec)
    op = AllReduce(view, view.peers[0])
    with pytest.raises(BadContribution) as info:
        op.contribute(tensor)
    assert info.value.field == field and info.value.peer == view.peers[0]
    assert op.contribute(torch.zeros(view.shape))  # a good one is still accepted


def test_fp16_codec_refuses_values_beyond_its_range() -> None:
    view = group(3, codec="fp16")
    with pytest.raises(BadContribution) as info:
        AllReduce(view, view.peers[1]).contribute(torch.full(view.shape, 1e5))
    assert info.value.field == "range"


def _nan_payload(data: bytes) -> bytes:
    header = msgpack.unpackb(data[4 : 4 + int.from_bytes(data[:4], "big")], raw=False)
    n = header["x"]["shape"][0]
    _, payload = codecs.encode(torch.full((n,), float("nan")))
    return rewrite(data, payload=payload)


CORRUPTIONS = {
    "shape": lambda d: rewrite(d, x={"shape": [3]}),
    "dtype": lambda d: rewrite(d, x={"dtype": "float16"}),
    "codec": lambda d: rewrite(d, x={"codec": "int8_block", "block": 64}),
    "nbytes": lambda d: rewrite(d, payload=b"\0" * 8),
    "nonfinite": _nan_payload,
}


@pytest.mark.parametrize("field", sorted(CORRUPTIONS))
def test_remote_bad_contribution_is_refused_and_the_sender_excluded(field: str) -> None:
    view = group(4)
    xs = contributions(view)
    bad = "peer02"
    fault = Fault(bad, 0, "before", action="corrupt", kind="DATA", corrupt=CORRUPTIONS[field])
    ops, net, _ = run(view, xs, [fault])
    others = tuple(p for p in view.peers if p != bad)
    assert check_safety(view, xs, ops, net.alive) == others
    # every member completes, the refused one too (it still learns the result)
    for op in ops.values():
        assert op.result is not None and torch.equal(op.result.tensor, reference(view, xs, others))
    refusals = [e for op in ops.values() for e in op.rejections]
    assert len(refusals) == 1
    assert isinstance(refusals[0], BadContribution | MalformedMessage)
    assert refusals[0].peer == bad
    if field != "nbytes":  # a short payload is caught by the frame check before the codec
        assert isinstance(refusals[0], BadContribution) and refusals[0].field == field


def _started(view):  # type: ignore[no-untyped-def]
    ops = {p: AllReduce(view, p) for p in view.peers}
    net = MemoryNetwork(ops)
    xs = contributions(view)
    for p in view.peers:
        net.call(p, lambda p=p: ops[p].contribute(xs[p]))  # type: ignore[misc]
    return ops, net, xs


def _data_frame(view, c: int, tensor: torch.Tensor, vh: bytes | None = None) -> bytes:  # type: ignore[no-untyped-def]
    header, payload = codecs.encode(tensor)
    return wire.encode("DATA", view.tag, vh or view.vh, {"c": c, "x": header}, payload)


def test_sender_outside_the_group_is_refused_round_goes_on() -> None:
    view = group(3)
    ops, net, xs = _started(view)
    owner = view.owner(0, view.peers)
    assert owner is not None
    net.inject("mallory", owner, _data_frame(view, 0, torch.full((view.chunk_len(0),), 1e3)))
    net.run()
    assert check_safety(view, xs, ops, net.alive) == view.peers
    errors = ops[owner].rejections
    assert len(errors) == 1 and isinstance(errors[0], NotAMember) and errors[0].peer == "mallory"


def test_oversized_and_malformed_messages_are_refused() -> None:
    view = group(3)
    ops, net, xs = _started(view)
    target, sender = view.peers[0], view.peers[1]
    limit = ops[target].max_message_bytes
    net.inject(sender, target, b"\0" * (limit + 1))
    net.inject(sender, target, struct.pack(">I", 2**31) + b"x")  # header length bomb
    net.inject(sender, target, b"\x00\x00\x00\x03abc")  # not msgpack
    huge = wire.encode("FETCH", view.tag, view.vh, {"c": 0, "h": b"0" * 16})
    net.inject(sender, target, huge[:4] + huge[4:].replace(b"\xa1h", b"\xa1q"))  # field missing
    other = group(3, tag="run/0/other")
    net.inject(sender, target, _data_frame(other, 0, torch.zeros(other.chunk_len(0))))
    net.inject(sender, target, _data_frame(view, 0, torch.zeros(view.chunk_len(0)), vh=b"x" * 16))
    net.run()
    assert check_safety(view, xs, ops, net.alive) == view.peers
    kinds = [type(e) for e in ops[target].rejections]
    assert kinds == [
        MessageTooLarge,
        MessageTooLarge,
        MalformedMessage,
        MalformedMessage,
        ViewMismatch,
        ViewMismatch,
    ]


def test_abstaining_member_is_left_out_and_still_gets_the_result() -> None:
    view = group(4)
    xs = contributions(view)
    ops = {p: AllReduce(view, p) for p in view.peers}
    net = MemoryNetwork(ops)
    for p in view.peers:
        if p == "peer01":
            net.call(p, ops[p].abstain)
        else:
            net.call(p, lambda p=p: ops[p].contribute(xs[p]))  # type: ignore[misc]
    net.run()
    others = tuple(p for p in view.peers if p != "peer01")
    for op in ops.values():
        assert op.result is not None and op.result.contributors == others
        assert torch.equal(op.result.tensor, reference(view, xs, others))


def test_wire_round_trip_and_schema() -> None:
    data = wire.encode("AMEND", "t", b"v" * 16, {"e": 2, "m": 5, "s": ["a", "b"]})
    msg = wire.decode("a", data, max_bytes=1024)
    assert (msg.type, msg.tag, dict(msg.fields)) == (
        "AMEND",
        "t",
        {"e": 2, "m": 5, "s": ["a", "b"]},
    )
    assert bytes(msg.payload) == b""
    for bad_fields in (
        {"e": -1, "m": 0, "s": []},
        {"e": 1, "m": True, "s": []},
        {"e": 1, "m": 0, "s": [1]},
    ):
        with pytest.raises(MalformedMessage):
            wire.decode("a", wire.encode("AMEND", "t", b"v" * 16, bad_fields), max_bytes=1024)
    with pytest.raises(MalformedMessage, match="payload"):
        wire.decode("a", wire.encode("RC_ACK", "t", b"v" * 16, {"e": 1}, b"xyz"), max_bytes=1024)
    with pytest.raises(MalformedMessage, match="unknown message type"):
        wire.decode("a", wire.encode("PICKLE", "t", b"v" * 16, {}), max_bytes=1024)
    data = wire.encode("CHUNK", "t", b"v" * 16, {"c": 0, "h": b"h" * 16}, b"12345678")
    with pytest.raises(MalformedMessage, match="payload is"):
        wire.decode("a", data[:-1], max_bytes=1024)
    with pytest.raises(MessageTooLarge):
        wire.decode("a", data, max_bytes=len(data) - 1)
