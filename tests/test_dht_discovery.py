"""Discovery on real libp2p hosts on loopback (one process; tests/test_dht_daemons.py runs
the same across separate daemon processes)."""

from __future__ import annotations

import gc
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.dht import kad, query
from shoal.dht.discovery import Discovery, DiscoveryConfig
from shoal.dht.records import dht_value_key, server_key, sign_record
from shoal.transport.errors import RemoteError
from shoal.transport.host import Host, HostConfig, Reachability, open_host
from shoal.transport.rpc import Message
from tests.conftest import LOOPBACK

# Known leak, not yet fixed: a host closed while a Kademlia dial toward it is in flight
# can leave one socket unclosed (workaround 8 in host.py covers the upgrade path only).
# Collect garbage after each test so that such a socket warns here, where it is allowed.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]


@pytest.fixture(autouse=True)
def _collect_leaked_sockets() -> Iterator[None]:
    yield
    gc.collect()


FAST = DiscoveryConfig(refresh_interval=2.0, lookup_timeout=5.0, absent_ttl=0.5)


@asynccontextmanager
async def open_peer(
    config: DiscoveryConfig = FAST,
    reachability: Reachability = Reachability.UNKNOWN,
    announce: tuple[str, ...] = (),
) -> AsyncIterator[tuple[Host, Discovery]]:
    key = create_new_key_pair()
    host_config = HostConfig(key_pair=key, listen=(LOOPBACK,), announce=announce)
    async with open_host(host_config) as host:
        host.reachability = reachability
        discovery = Discovery(host, "lab", key, config)
        async with trio.open_nursery() as nursery:
            await nursery.start(discovery.run)
            yield host, discovery
            nursery.cancel_scope.cancel()


async def run_peer(
    scope: trio.CancelScope, *, task_status: trio.TaskStatus[tuple[Host, Discovery]]
) -> None:
    """A peer in its own task, to stop (``scope.cancel()``) while the others go on."""
    with scope:
        async with open_peer() as peer:
            task_status.started(peer)
            await trio.sleep_forever()


async def mesh(peers: list[tuple[Host, Discovery]]) -> None:
    """Connect every peer to every other and wait until each routing table holds them all
    (identify must have told each side the other speaks Kademlia)."""
    for i, (host, _) in enumerate(peers):
        for other, _ in peers[i + 1 :]:
            await host.connect(other.listen_addrs()[0])
    servers = sum(1 for h, _ in peers if h.reachability is not Reachability.PRIVATE)
    with trio.fail_after(15):
        for host, discovery in peers:
            expected = servers - (host.reachability is not Reachability.PRIVATE)
            while discovery.dht is None or discovery.dht.routing_table.size() < expected:  # noqa: ASYNC110
                await trio.sleep(0.05)


async def eventually(probe, within: float):  # type: ignore[no-untyped-def]
    """Poll a lookup (itself async, so not a plain predicate) until it returns truthy."""
    with trio.fail_after(within):
        while True:
            value = await probe()
            if value:
                return value
            await trio.sleep(0.1)


async def test_every_peer_finds_every_block_and_blob_and_a_dead_server_drops_out() -> None:
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        b_scope = trio.CancelScope()
        peers = [await stack.enter_async_context(open_peer()) for _ in range(5)]
        peers.insert(1, await nursery.start(run_peer, b_scope))
        await mesh(peers)
        (_, a), (host_b, b) = peers[0], peers[1]
        a.announce("tiny", 0, 4)
        b.announce("tiny", 2, 8)
        blob = hashlib.sha256(b"weights").hexdigest()
        b.announce_blob(blob)
        expected = [
            sorted({a.peer_id} if blk < 2 else {a.peer_id, b.peer_id} if blk < 4 else {b.peer_id})
            for blk in range(8)
        ]
        for _, discovery in peers:
            view = await eventually(
                lambda d=discovery: _complete(d.model_view("tiny", 8), expected), 10
            )
            assert view == expected
            holders = await eventually(lambda d=discovery: d.find_blob(blob), 10)
            assert [r.peer_id for r in holders] == [b.peer_id]
            assert await discovery.find_blob(hashlib.sha256(b"other").hexdigest()) == []
        record = (await peers[5][1].find_servers("tiny", 5))[0]
        assert record.spans == {"tiny": (2, 8)}
        assert record.blobs == (blob,)
        assert set(record.addrs) >= {str(a) for a in host_b.listen_addrs()}

        # b stops (host closed, no goodbye). Its last record expires twice the refresh
        # period after it was signed; from then on no lookup anywhere may return b,
        # although py-libp2p still holds its provider records (for 48 h).
        last = await b.server_record(b.peer_id)
        assert last is not None
        assert last.expires - last.seq / 1000 == pytest.approx(2 * FAST.refresh_interval, abs=0.01)
        b_scope.cancel()
        await trio.sleep(max(0.0, last.expires - time.time()))
        only_a = [[a.peer_id] if blk < 4 else [] for blk in range(8)]
        for _, discovery in peers[:1] + peers[2:]:
            view = await discovery.model_view("tiny", 8)
            assert all(b.peer_id not in servers for servers in view), view
            await eventually(lambda d=discovery: _complete(d.model_view("tiny", 8), only_a), 10)


async def _complete(view_coro, expected):  # type: ignore[no-untyped-def]
    view = await view_coro
    return view if view == expected else None


async def test_a_node_behind_nat_looks_up_in_client_mode_and_stores_nothing() -> None:
    async with AsyncExitStack() as stack:
        servers = [await stack.enter_async_context(open_peer()) for _ in range(3)]
        client = await stack.enter_async_context(open_peer(reachability=Reachability.PRIVATE))
        await mesh([*servers, client])
        assert client[1].dht is not None and client[1].dht.mode.name == "CLIENT"
        client[1].announce("tiny", 0, 2)  # a NATed peer may still serve (over a relay)
        servers[0][1].announce("tiny", 2, 4)
        expected = [[client[1].peer_id]] * 2 + [[servers[0][1].peer_id]] * 2
        for _, discovery in [*servers, client]:
            assert await eventually(
                lambda d=discovery: _complete(d.model_view("tiny", 4), expected), 10
            )
        # The client's stores stay empty: nobody lists it as a Kademlia server.
        assert client[1].dht.value_store.size() == 0
        assert all(
            client[0].peer_id not in d.dht.routing_table.get_peer_ids()  # type: ignore[union-attr]
            for _, d in servers
        )


async def test_forged_and_malformed_records_are_refused_on_store_and_ignored_on_read() -> None:
    async with AsyncExitStack() as stack:
        peers = [await stack.enter_async_context(open_peer()) for _ in range(3)]
        await mesh(peers)
        (_, a), (host_m, mallory), (host_c, c) = peers
        a.announce("tiny", 0, 2)
        genuine = (await eventually(lambda: c.find_servers("tiny", 0), 10))[0]
        # Mallory signs a record claiming to be a, with a higher seq: refused by c's store.
        mine = sign_record(
            create_new_key_pair(), swarm="lab", seq=2**40, expires=1e12, spans={"tiny": (0, 8)}
        )
        key = dht_value_key(server_key("lab", a.peer_id)).encode()
        forged = mine.__class__(**{**mine.__dict__, "peer_id": a.peer_id})
        for raw in (forged.encode(), b"\xc1 not msgpack", b"\x93\x01\x02\x03"):
            try:
                await kad.put_value(host_m.libp2p, host_c.libp2p.get_id(), key, raw)
            except kad.RequestFailed:
                pass
            else:
                raise AssertionError("a forged record was accepted")
        stored = c.dht.value_store.get(key)  # type: ignore[union-attr]
        assert stored is None or stored.value == genuine.encode()
        # c still answers lookups, with a's real record (fetched afresh: a request can time
        # out on a loaded box, so poll).
        c._records.clear()
        record = await eventually(lambda: c.server_record(a.peer_id), 10)
        assert record.spans == {"tiny": (0, 2)}
        assert mallory.peer_id not in [r.peer_id for r in await c.find_servers("tiny", 0)]


async def test_bad_dht_queries_get_typed_errors_and_the_node_keeps_answering() -> None:
    async with AsyncExitStack() as stack:
        public = "/ip4/198.51.100.7/tcp/4001"  # a's --announce (a port forward, say)
        peers = [await stack.enter_async_context(open_peer(announce=(public,)))]
        peers.append(await stack.enter_async_context(open_peer()))
        await mesh(peers)
        (host_a, a), (host_b, b) = peers
        b.announce("tiny", 0, 1)
        await eventually(lambda: a.find_servers("tiny", 0), 10)
        bad = [
            {"op": "find", "keys": "not a list"},
            {"op": "find", "keys": []},
            {"op": "find", "keys": [b"k"] * (query.MAX_KEYS + 1)},
            {"op": "find", "keys": [b"x" * (query.MAX_KEY_BYTES + 1)]},
            {"op": "provide", "keys": [b"k"], "addrs": [b"\xff\xff not a multiaddr"]},
            {"op": "provide", "keys": [b"k"], "addrs": "nope"},
            {"op": "delete", "keys": [b"k"]},
        ]
        for body in bad:
            with pytest.raises(RemoteError) as refused:
                await host_a.channels.call(host_b.peer_id, query.DHT_QUERY, Message(body))
            assert refused.value.code == "bad_request", body
        # A provide stores the *caller* (authenticated by the connection), whatever it says.
        key = b"\x12" * 32
        await query.provide(host_a, host_b.peer_id, [key])
        stored = b.dht.provider_store.get_providers(key)  # type: ignore[union-attr]
        assert [str(info.peer_id) for info in stored] == [a.peer_id]
        # with the address it announces, not the one it listens on
        assert [str(x) for x in stored[0].addrs] == [f"{public}/p2p/{a.peer_id}"]
        found = await query.find(host_a, host_b.peer_id, [key], values=False)
        assert [str(p) for p in found[0].providers] == [a.peer_id]
        assert [r.peer_id for r in await a.find_servers("tiny", 0)] == [b.peer_id]
