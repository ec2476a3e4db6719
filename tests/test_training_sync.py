"""Joiner sync: state export/import is exact; parts come from several peers, a corrupted
part is refused and refetched from another peer, a failed peer's parts move on, and a
download that cannot complete fails with a typed error."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
import torch
from training_peer import tiny_model

from shoal.training.diloco import OuterState, outer_step
from shoal.training.errors import CorruptPart, LayoutMismatch, StateHashMismatch, SyncFailed
from shoal.training.flat import Layout
from shoal.training.sync import Manifest, StateFetch, export_state, import_state

torch.set_num_threads(1)

Server = Callable[[int], bytes | None]  # None: the peer is gone


def _state(round_: int = 3) -> OuterState:
    state = OuterState.initial(tiny_model(0))
    gen = torch.Generator().manual_seed(1)
    for _ in range(round_):  # a non-zero momentum, as after real rounds
        g = torch.randn(state.layout.numel, generator=gen) * 1e-3
        state.params, state.momentum = outer_step(state.params, state.momentum, g, lr=0.7, mu=0.9)
    state.round = round_
    return state


def _download(fetch: StateFetch, servers: dict[str, Server]) -> dict[str, int]:
    """Drive ``fetch`` against in-memory servers; returns how many parts each one served."""
    served = dict.fromkeys(servers, 0)
    for _ in range(10_000):
        if fetch.done:
            return served
        requests = fetch.requests()
        assert requests, "no progress: nothing in flight and nothing to request"
        for req in requests:
            data = servers[req.peer](req.index)
            if data is None:
                fetch.peer_failed(req.peer)
            else:
                served[req.peer] += 1
                fetch.receive(req.peer, req.index, data)
    raise AssertionError("download did not finish")


@pytest.mark.parametrize("part_bytes", [1000, 4096, 10_000, 1 << 22])
def test_export_import_roundtrip_is_exact(part_bytes: int) -> None:
    state = _state()
    manifest, parts = export_state(state, run_id="run-1", part_bytes=part_bytes)
    assert sum(len(p) for p in parts) == 8 * state.layout.numel == manifest.total_bytes
    assert all(manifest.part_size(i) == len(p) for i, p in enumerate(parts))
    assert manifest.round == 3 and manifest.state_hash == state.state_hash()
    back = import_state(Manifest.from_data(manifest.to_data()), parts, state.layout)
    assert torch.equal(back.params, state.params) and torch.equal(back.momentum, state.momentum)
    assert back.state_hash() == state.state_hash() and back.round == 3
    # bit patterns survive, not only values: -0.0 stays -0.0
    state.params[0] = -0.0
    manifest, parts = export_state(state, run_id="run-1", part_bytes=part_bytes)
    back = import_state(manifest, parts, state.layout)
    assert torch.signbit(back.params[0]) and back.state_hash() == state.state_hash()


def test_parts_come_from_several_peers_and_a_corrupted_part_is_refetched() -> None:
    state = _state()
    manifest, parts = export_state(state, run_id="run-1", part_bytes=8192)
    assert len(parts) > 6

    def honest(index: int) -> bytes:
        return parts[index]

    def corrupts_part_2(index: int) -> bytes:
        data = bytearray(parts[index])
        if index == 2:
            data[100] ^= 0x01  # one flipped bit
        return bytes(data)

    fetch = StateFetch(manifest, ["p1", "p2", "p3"], per_peer=1)
    first = fetch.requests()
    assert [r.peer for r in first] == ["p1", "p2", "p3"]  # spread over the peers
    assert [r.index for r in first] == [0, 1, 2]  # p3 is asked for part 2
    for r in first:
        fetch.receive(r.peer, r.index, {"p3": corrupts_part_2}.get(r.peer, honest)(r.index))
    [rejection] = fetch.rejections
    assert isinstance(rejection, CorruptPart)
    assert (rejection.peer, rejection.index, rejection.reason) == ("p3", 2, "sha256 mismatch")
    served = _download(fetch, {"p1": honest, "p2": honest, "p3": corrupts_part_2})
    assert served["p3"] == 0  # after a bad part, p3 is asked nothing more
    assert fetch.tried[2] == ["p3", "p1"] or fetch.tried[2] == ["p3", "p2"]
    result = fetch.result(state.layout)
    assert result.state_hash() == state.state_hash()
    assert torch.equal(result.params, state.params)


def test_a_truncated_part_and_a_failed_peer_move_to_other_peers() -> None:
    state = _state()
    manifest, parts = export_state(state, run_id="run-1", part_bytes=8192)
    calls = {"dead": 0}

    def dies_at_first_request(index: int) -> bytes | None:
        calls["dead"] += 1
        return None

    def truncates(index: int) -> bytes:
        return parts[index][:-4]

    fetch = StateFetch(manifest, ["dead", "short", "good"])
    served = _download(
        fetch, {"dead": dies_at_first_request, "short": truncates, "good": parts.__getitem__}
    )
    # "short" had two parts in flight (per_peer=2) and both were refused; every part
    # ends up coming from "good"
    assert served == {"dead": 0, "short": 2, "good": len(parts)}
    assert len(fetch.rejections) == 2 and {r.peer for r in fetch.rejections} == {"short"}
    assert all(tried[-1] == "good" for tried in fetch.tried.values())
    assert fetch.failed_peers == {"dead"} and fetch.bad_peers == {"short"}
    assert "bytes, expected 8192" in fetch.rejections[0].reason
    assert fetch.result(state.layout).state_hash() == state.state_hash()


def test_no_peer_left_for_a_part_is_a_typed_error() -> None:
    state = _state()
    manifest, parts = export_state(state, run_id="run-1", part_bytes=8192)

    def bad(index: int) -> bytes:
        return b"\0" * len(parts[index])

    fetch = StateFetch(manifest, ["x", "y"])
    with pytest.raises(SyncFailed) as info:
        _download(fetch, {"x": bad, "y": bad})
    # x sent a bad part 0, y a bad part 1: nobody is left to ask for part 0
    assert (info.value.index, info.value.tried) == (0, ("x",))
    assert fetch.bad_peers == {"x", "y"}
    with pytest.raises(SyncFailed):
        fetch.result(state.layout)


def test_late_or_unrequested_parts_are_ignored() -> None:
    state = _state()
    manifest, parts = export_state(state, run_id="run-1", part_bytes=8192)
    fetch = StateFetch(manifest, ["a"])
    fetch.receive("a", 0, parts[0])  # never asked
    assert fetch.parts == {}
    [req, *_] = fetch.requests()
    fetch.receive("intruder", req.index, b"junk")
    assert fetch.parts == {} and not fetch.rejections


def test_import_checks_layout_parts_and_state_hash() -> None:
    state = _state()
    manifest, parts = export_state(state, run_id="run-1", part_bytes=8192)
    other = Layout(state.layout.names[:-1], state.layout.shapes[:-1])
    with pytest.raises(LayoutMismatch):
        import_state(manifest, parts, other)
    with pytest.raises(LayoutMismatch):
        import_state(manifest, parts[:-1], state.layout)
    broken = [*parts]
    broken[1] = bytes(len(parts[1]))
    with pytest.raises(CorruptPart):
        import_state(manifest, broken, state.layout)
    # parts that match their hashes but a manifest that lies about the state hash
    lying = Manifest.from_data({**manifest.to_data(), "state_hash": hashlib.sha256().hexdigest()})
    with pytest.raises(StateHashMismatch):
        import_state(lying, parts, state.layout)
    with pytest.raises(LayoutMismatch):
        Manifest.from_data({**manifest.to_data(), "part_hashes": manifest.part_hashes[:-1]})
