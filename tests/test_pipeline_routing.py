"""Routing, bans, placement and the inference protocol's request checks (no network)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.pipeline.errors import NoRoute
from shoal.pipeline.protocol import Hop, ProtocolViolation, Sampling, StepRequest
from shoal.pipeline.routing import (
    NO_ROOM_PENALTY,
    Bans,
    ServerInfo,
    choose_span,
    hop_cost,
    missing_blocks,
    plan_route,
)


def server(peer: str, start: int, end: int, **kw: Any) -> ServerInfo:
    defaults: dict[str, Any] = {"throughput": 100.0, "rtt": 0.002, "free_cache_tokens": 1000}
    defaults["max_sessions"] = 8
    return ServerInfo(peer=peer, start=start, end=end, **(defaults | kw))


def brute_force(servers: list[ServerInfo], blocks: int, need: int) -> float | None:
    """The cheapest cover by trying every sequence of (server, end) hops."""
    best: float | None = None

    def walk(at: int, cost: float) -> None:
        nonlocal best
        if at == blocks:
            best = cost if best is None else min(best, cost)
            return
        for s in servers:
            if s.start <= at < s.end:
                for end in range(at + 1, min(s.end, blocks) + 1):
                    walk(end, cost + hop_cost(s, end - at, need))

    walk(0, 0.0)
    return best


spans = st.tuples(st.integers(0, 5), st.integers(1, 6)).filter(lambda t: t[0] < t[1])
servers_strategy = st.lists(
    st.builds(
        lambda span, tp, rtt, room: server(
            f"p{span}{tp}{rtt}", span[0], span[1], throughput=tp, rtt=rtt, free_cache_tokens=room
        ),
        spans,
        st.sampled_from([0.0, 10.0, 100.0, 1000.0]),
        st.sampled_from([None, 0.001, 0.01, 0.1]),
        st.sampled_from([0, 500]),
    ),
    max_size=6,
    unique_by=lambda s: s.peer,
)


@settings(max_examples=200, deadline=None)
@given(servers_strategy, st.integers(1, 6))
def test_plan_route_is_a_cheapest_contiguous_cover(servers: list[ServerInfo], blocks: int) -> None:
    route = plan_route(servers, blocks, need_tokens=100)
    best = brute_force(servers, blocks, 100)
    if best is None:
        assert route is None
        assert missing_blocks(servers, blocks)
        return
    assert route is not None
    assert route[0].start == 0 and route[-1].end == blocks
    assert all(a.end == b.start for a, b in itertools.pairwise(route))
    by_peer = {s.peer: s for s in servers}
    for hop in route:
        assert by_peer[hop.peer].start <= hop.start < hop.end <= by_peer[hop.peer].end
    cost = sum(hop_cost(by_peer[h.peer], h.end - h.start, 100) for h in route)
    assert cost == pytest.approx(best)


def test_plan_route_prefers_fast_servers_and_avoids_full_ones() -> None:
    slow = server("slow", 0, 4, throughput=1.0)
    fast_a, fast_b = server("fa", 0, 2, throughput=1000.0), server("fb", 2, 4, throughput=1000.0)
    route = plan_route([slow, fast_a, fast_b], 4)
    assert [(h.peer, h.start, h.end) for h in route or []] == [("fa", 0, 2), ("fb", 2, 4)]
    full = server("full", 0, 4, free_cache_tokens=10, throughput=1e6)
    spare = server("spare", 0, 4, throughput=10.0)
    route = plan_route([full, spare], 4, need_tokens=100)
    assert [h.peer for h in route or []] == ["spare"]
    # the full one is still used when nothing else covers the blocks
    route = plan_route([full], 4, need_tokens=100)
    assert [h.peer for h in route or []] == ["full"]
    assert hop_cost(full, 4, 100) > NO_ROOM_PENALTY


def test_plan_route_is_deterministic_on_ties_and_carries_addresses() -> None:
    a = server("a", 0, 4, addrs=("/ip4/1.2.3.4/tcp/1/p2p/a",))
    b = server("b", 0, 4)
    assert plan_route([b, a], 4) == [Hop("a", 0, 4, ("/ip4/1.2.3.4/tcp/1/p2p/a",))]


def test_missing_blocks_and_no_route_message() -> None:
    servers = [server("a", 0, 3), server("c", 6, 8)]
    assert plan_route(servers, 8) is None
    assert missing_blocks(servers, 8) == [3, 4, 5]
    error = NoRoute("shoal-tiny", [3, 4, 5], ["12D3KooWdead"], 5.0)
    assert "blocks 3-5 of shoal-tiny" in str(error)
    assert "12D3KooWdead" in str(error)
    assert "--blocks 3:6" in str(error)


def test_bans_back_off_and_expire() -> None:
    bans = Bans(base=15.0, cap=50.0)
    assert bans.ban("x", now=0.0) == 15.0
    assert bans.banned("x", 14.9) and not bans.banned("x", 15.1)
    assert bans.ban("x", now=20.0) == 30.0
    assert bans.ban("x", now=60.0) == 50.0  # capped
    assert bans.active(61.0) == ["x"] and bans.active(111.0) == []
    bans.forgive("x")
    assert bans.ban("x", now=200.0) == 15.0


def test_choose_span_fills_the_weakest_window() -> None:
    assert choose_span([0.0] * 8, 3) == 0
    assert choose_span([5.0, 5.0, 5.0, 0.0, 0.0, 0.0, 5.0, 5.0], 3) == 3
    assert choose_span([1.0, 1.0, 1.0, 1.0, 2.0, 0.0], 2) == 4  # (0, 2) beats (1, 1)
    with pytest.raises(ValueError, match="does not fit"):
        choose_span([1.0, 2.0], 3)


def step_body(**overrides: Any) -> dict[str, Any]:
    body = StepRequest(
        session="s1",
        model="m",
        route=(Hop("p1", 0, 2), Hop("p2", 2, 4)),
        hop=0,
        position=0,
        chunks=(3, 1),
        max_length=10,
        sampling=Sampling(),
        timeout=5.0,
        tokens=(1, 2, 3, 4),
    ).to_wire()
    return body | overrides


def test_step_request_round_trips() -> None:
    step = StepRequest.from_wire(step_body())
    assert step.length == 4 and step.here == Hop("p1", 0, 2) and not step.last
    nxt = step.forward({"dtype": "float32"}, 4.0)
    again = StepRequest.from_wire(nxt.to_wire())
    assert again.hop == 1 and again.last and again.tokens == () and again.timeout == 4.0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"session": ""}, "session"),
        ({"session": "x" * 65}, "session"),
        ({"route": []}, "route"),
        ({"route": [["p1", 0, 2, []], ["p2", 3, 4, []]]}, "consecutive"),
        ({"route": [["p1", 1, 4, []]]}, "block 0"),
        ({"route": [["p1", 2, 2, []]]}, "span"),
        ({"hop": 2}, "hop"),
        ({"hop": True}, "hop"),
        ({"position": -1}, "position"),
        ({"chunks": []}, "chunks"),
        ({"chunks": [0, 4]}, "chunks"),
        ({"chunks": [9000], "tokens": [1] * 9000, "max_length": 9000}, "positions per step"),
        ({"max_length": 3}, "max_length"),
        ({"timeout": 0}, "timeout"),
        ({"tokens": [1, 2, 3]}, "one token per position"),
        ({"tokens": [1, 2, 3, -4]}, "token ids"),
        ({"sampling": {"t": -1}}, "temperature"),
        ({"sampling": {"p": 0}}, "top_p"),
        ({"sampling": {"s": 2**64}}, "seed"),
    ],
)
def test_step_request_rejects_each_bad_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolViolation, match=field):
        StepRequest.from_wire(step_body(**overrides))


def test_later_hops_need_hidden_states() -> None:
    with pytest.raises(ProtocolViolation, match="hidden"):
        StepRequest.from_wire(step_body(hop=1))
