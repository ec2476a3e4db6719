"""Peer table and backoff: pure logic with the clock passed in."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from shoal.transport.backoff import Backoff
from shoal.transport.peering import PeerTable, parse_peer_list

A = "12D3KooWA"
B = "12D3KooWB"


def addr(peer: str, port: int = 4001) -> str:
    return f"/ip4/10.0.0.1/tcp/{port}/p2p/{peer}"


def test_backoff_doubles_caps_and_resets() -> None:
    backoff: Backoff[str] = Backoff(base=1.0, cap=8.0)
    delays = [backoff.failed("x", 100.0) for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert not backoff.ready("x", 107.9)
    assert backoff.ready("x", 108.0)
    assert backoff.ready("other", 0.0)
    backoff.succeeded("x")
    assert backoff.ready("x", 0.0) and backoff.failures("x") == 0


@given(st.integers(0, 30), st.floats(0, 1), st.integers(0, 2**32))
def test_backoff_jitter_stays_in_band(failures: int, jitter: float, seed: int) -> None:
    backoff: Backoff[str] = Backoff(base=0.5, cap=30.0, jitter=jitter, rng=random.Random(seed))
    for _ in range(failures):
        backoff.failed("x", 0.0)
    base = min(30.0, 0.5 * 2.0**failures)
    delay = backoff.failed("x", 0.0)
    assert base * (1 - jitter) - 1e-9 <= delay <= base * (1 + jitter) + 1e-9


def test_table_learns_only_usable_addresses() -> None:
    table = PeerTable(self_id=A)
    assert not table.learn(A, [addr(A)])  # never ourselves
    assert not table.learn(B, ["/ip4/0.0.0.0/tcp/1/p2p/" + B, "garbage", addr(A)])
    assert table.learn(B, [addr(B)])
    assert not table.learn(B, [addr(B, 5000)])  # known: addresses merge, newest first
    assert table.peers[B].addrs == [addr(B, 5000), addr(B)]


def test_dial_candidates_respect_backoff_connections_and_limit() -> None:
    table = PeerTable(self_id=A)
    peers = [f"12D3KooWP{i}" for i in range(5)]
    for peer in peers:
        table.learn(peer, [addr(peer)])
    table.backoff.failed(peers[0], 10.0)
    got = table.dial_candidates(10.0, connected={peers[1]}, limit=10)
    assert got == [peers[2], peers[3], peers[4]]
    assert table.dial_candidates(10.0, connected=set(), limit=2) == [peers[1], peers[2]]
    assert table.dial_candidates(1000.0, connected=set(), limit=10)[-1] == peers[0]


def test_table_persists_as_json() -> None:
    table = PeerTable(self_id=A)
    table.learn(B, [addr(B)])
    other = PeerTable(self_id=A)
    other.load_json(table.to_json() | {"junk": 5})
    assert other.to_json() == {B: [addr(B)]}


def test_parse_peer_list_drops_malformed_entries() -> None:
    body = {"peers": [{"id": B, "addrs": [addr(B), 7]}, "x", {"id": 3, "addrs": []}]}
    assert parse_peer_list(body) == [(B, [addr(B)])]
