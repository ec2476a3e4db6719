"""Signed, expiring server records: the rules that decide who counts as a live server."""

from __future__ import annotations

import msgpack
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.dht.errors import InvalidRecord
from shoal.dht.records import (
    ServerRecord,
    blob_key,
    block_key,
    decode_record,
    select,
    server_key,
    sign_record,
    validate,
)

KEY = create_new_key_pair()
OTHER = create_new_key_pair()


def record(seq: int = 1, expires: float = 100.0, key=KEY) -> ServerRecord:
    return sign_record(
        key, swarm="lab", seq=seq, expires=expires, spans={"tiny": (2, 5)}, blobs=("ab" * 32,)
    )


def test_key_layout() -> None:
    assert block_key("lab", "org/model", 3) == "/shoal/lab/model/org/model/block/3"
    assert blob_key("lab", "ff" * 32) == f"/shoal/lab/blob/{'ff' * 32}"
    assert server_key("lab", "12D3KooWX") == "/shoal/lab/server/12D3KooWX"


def test_round_trip_and_coverage() -> None:
    rec = record()
    key = server_key("lab", rec.peer_id)
    got = validate(key, rec.encode(), now=50.0)
    assert got == rec
    assert [got.serves("tiny", b) for b in range(7)] == [
        False,
        False,
        True,
        True,
        True,
        False,
        False,
    ]
    assert not got.serves("other", 3)


def test_expired_forged_and_misplaced_records_are_rejected() -> None:
    rec = record(expires=100.0)
    key = server_key("lab", rec.peer_id)
    with pytest.raises(InvalidRecord, match="expired"):
        validate(key, rec.encode(), now=100.0)
    # Someone else's record under this peer's key.
    with pytest.raises(InvalidRecord, match="another key"):
        validate(server_key("lab", "12D3KooWsomeoneelse"), rec.encode(), now=0.0)
    with pytest.raises(InvalidRecord, match="another key"):
        validate(server_key("prod", rec.peer_id), rec.encode(), now=0.0)
    # A record claiming this peer, signed by another key.
    forged = sign_record(OTHER, swarm="lab", seq=9, expires=1e12, spans={"tiny": (0, 8)})
    forged = ServerRecord(**{**forged.__dict__, "peer_id": rec.peer_id})
    with pytest.raises(InvalidRecord, match="bad signature"):
        validate(key, forged.encode(), now=0.0)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc1",
        msgpack.packb([1, 2, 3]),
        msgpack.packb(["shoal-server/1", "lab", "p", -1, 1.0, {}, [], [], b""]),
        msgpack.packb(["shoal-server/1", "lab", "p", 1, 1.0, {"m": [5, 2]}, [], [], b""]),
        msgpack.packb(["shoal-server/1", "lab", "p", 1, 1.0, {"m": [0, 2]}, [3], [], b""]),
        b"\x00" * 20000,
    ],
)
def test_malformed_records_are_typed_errors(raw: bytes) -> None:
    with pytest.raises(InvalidRecord):
        decode_record("/shoal/lab/server/p", raw)


def test_select_prefers_the_newest_valid_record() -> None:
    key = server_key("lab", record().peer_id)
    values = [
        record(seq=3).encode(),
        b"junk",
        record(seq=7).encode(),
        record(seq=9, expires=10).encode(),
    ]
    assert select(key, values, now=50.0) == 2  # seq 9 has expired


def test_wire_keys_fit_what_py_libp2p_routes_on() -> None:
    from multihash import decode as decode_multihash

    from shoal.dht.records import dht_provider_key, dht_value_key

    logical = block_key("a-long-swarm-name", "organisation/some-model-7b-instruct", 31)
    provider = bytes.fromhex(dht_provider_key(logical))
    assert decode_multihash(provider).code == 0x12  # sha2-256, a valid FIND_NODE target
    assert len(provider) == 34
    value = dht_value_key(server_key("lab", "12D3KooWQVdkEof1uJSWkVQx284TJzTLciCaoq1QaBLMFPj1N6wa"))
    assert value.startswith("/shoal/") and len(value.encode()) <= 50
    assert dht_value_key("x") != dht_value_key("y")
    # A record is accepted under its wire key as well as its logical key.
    rec = record()
    assert validate(dht_value_key(server_key("lab", rec.peer_id)), rec.encode(), now=0.0) == rec


def test_a_provider_walk_stops_early_only_when_answers_confirm_the_last_full_walk() -> None:
    from libp2p.peer.id import ID

    from shoal.dht.discovery import _Walk

    peers = [ID(bytes([0, 1, i])) for i in range(12)]
    key = bytes(32)
    servers = frozenset({"server-a", "server-b"})

    def walk(expected: frozenset[str]) -> _Walk:
        w = _Walk(key=key, alpha=3, quorum=8, known=list(peers), expected=expected)
        w.asked.update(peers[:8])
        return w

    confirmed = walk(servers)
    for peer in peers[5:8]:  # any three answers, not the closest three
        confirmed.answered.add(peer)
        confirmed.heard(servers)
    assert confirmed.done() and confirmed.providers == set(servers)

    news = walk(servers)  # a server announced since: the walk goes on to the quorum
    for index, found in enumerate([servers, servers | {"server-c"}, servers, servers]):
        news.answered.add(peers[index])
        news.heard(found)
    assert not news.done() and news.providers == {"server-a", "server-b", "server-c"}
    news.answered.update(peers[4:8])
    assert news.done()

    blank = walk(frozenset())  # nothing expected: never early
    for peer in peers[:3]:
        blank.answered.add(peer)
        blank.heard(frozenset())
    assert not blank.done()
