"""Typed RPC between real libp2p hosts on loopback, including bad input from a peer."""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections.abc import AsyncIterator

import msgpack
import multiaddr
import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.peer.id import ID

from shoal.transport.errors import DialError, RemoteError, RpcError
from shoal.transport.framing import encode_frame, encode_header
from shoal.transport.ping import call_ping, serve_ping
from shoal.transport.rpc import Message, Protocol
from shoal.transport.swarmkey import generate_swarm_key, parse_swarm_key
from tests.conftest import loopback_host

ECHO = Protocol(name="test-echo", max_request=4096, max_response=4096, timeout=5)
COUNT = Protocol(name="test-count")
FAIL = Protocol(name="test-fail")
SLOW = Protocol(name="test-slow", max_concurrent=1)


async def echo(peer: ID, request: Message) -> Message:
    return Message({"peer": str(peer), "k": request.body.get("k")}, bytes(request.payload)[::-1])


async def count(peer: ID, request: Message) -> AsyncIterator[Message]:
    for i in range(int(request.body["n"])):
        yield Message({"i": i}, bytes([i]) * i)


async def fail(peer: ID, request: Message) -> Message:
    if request.body.get("typed"):
        raise RpcError("bad_request", "k must be positive")
    raise ZeroDivisionError("secret internals")


async def slow(peer: ID, request: Message) -> Message:
    await trio.sleep(1)
    return Message({"done": True})


def serve_all(host) -> None:
    host.rpc.serve(ECHO, echo)
    host.rpc.serve_stream(COUNT, count)
    host.rpc.serve(FAIL, fail)
    host.rpc.serve(SLOW, slow)


async def test_unary_and_streaming() -> None:
    async with loopback_host() as server, loopback_host() as client:
        serve_all(server)
        peer = await client.connect(server.listen_addrs()[0])
        assert peer == server.peer_id
        reply = await client.rpc.call(peer, ECHO, Message({"k": [1, "x"]}, b"abc"))
        assert reply.body == {"peer": str(client.peer_id), "k": [1, "x"]}
        assert bytes(reply.payload) == b"cba"
        async with client.rpc.open_stream_call(peer, COUNT, Message({"n": 5})) as replies:
            items = [(m.body["i"], bytes(m.payload)) async for m in replies]
        assert items == [(i, bytes([i]) * i) for i in range(5)]
        links = client.links()
        assert [(link.peer_id, link.relayed) for link in links] == [(str(peer), False)]


async def test_remote_failures_are_typed() -> None:
    async with loopback_host() as server, loopback_host() as client:
        serve_all(server)
        peer = await client.connect(server.listen_addrs()[0])
        with pytest.raises(RemoteError) as info:
            await client.rpc.call(peer, FAIL, Message({"typed": True}))
        assert (info.value.peer, info.value.code, info.value.message) == (
            str(peer),
            "bad_request",
            "k must be positive",
        )
        with pytest.raises(RemoteError) as info:
            await client.rpc.call(peer, FAIL, Message())
        assert info.value.code == "internal"
        assert "secret" not in info.value.message  # no internals leak to the caller
        with pytest.raises(RemoteError) as info:
            await client.rpc.call(peer, Protocol(name="test-echo", major=2), Message())
        assert info.value.code == "unsupported_protocol"
        assert "/shoal/test-echo/2" in info.value.message
        # The server still answers after all that.
        assert bytes((await client.rpc.call(peer, ECHO, Message({}, b"ok"))).payload) == b"ko"


async def test_request_over_the_limit() -> None:
    async with loopback_host() as server, loopback_host() as client:
        serve_all(server)
        peer = await client.connect(server.listen_addrs()[0])
        # Refused locally before sending...
        with pytest.raises(RpcError, match="exceeds"):
            await client.rpc.call(peer, ECHO, Message({}, b"x" * 5000))
        # ...and by the server when a caller lies about its limits.
        liar = Protocol(name="test-echo", max_request=1 << 20)
        with pytest.raises(RemoteError) as info:
            await client.rpc.call(peer, liar, Message({}, b"x" * 5000))
        assert info.value.code == "too_large"
        assert "5000" in info.value.message


async def test_busy_protocol_refuses_instead_of_queueing() -> None:
    async with loopback_host() as server, loopback_host() as client:
        serve_all(server)
        peer = await client.connect(server.listen_addrs()[0])
        codes: list[str] = []

        async def one() -> None:
            try:
                await client.rpc.call(peer, SLOW, Message())
                codes.append("ok")
            except RemoteError as exc:
                codes.append(exc.code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one)
            await trio.sleep(0.3)
            nursery.start_soon(one)
        assert sorted(codes) == ["busy", "ok"]


async def raw_exchange(client, peer: ID, proto: Protocol, data: bytes) -> bytes:
    """Write raw bytes on a fresh stream, half-close, and read all the server answers."""
    stream = await client.libp2p.new_stream(peer, [proto.id])
    await stream.write(data)
    received = b""
    with trio.move_on_after(5):
        with contextlib.suppress(Exception):  # half-close, where the stream supports it
            await stream.close_write()
        while True:
            try:
                chunk = await stream.read(65536)
            except Exception:
                break
            if not chunk:
                break
            received += chunk
    await stream.reset()
    return received


def error_code(wire: bytes) -> str:
    (hlen,) = struct.unpack(">I", wire[:4])
    header = msgpack.unpackb(wire[4 : 4 + hlen])
    assert header["t"] == "err"
    return header["c"]


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("garbage", b"\xde\xad\xbe\xef" * 64, "too_large"),  # 0xdeadbeef-byte header
        ("oversized frame", encode_header({"t": "call", "b": {}}, 1 << 40), "too_large"),
        ("not msgpack", struct.pack(">I", 3) + b"\xc1\xc1\xc1", "bad_frame"),
        (
            "truncated msgpack",
            struct.pack(">I", 40) + msgpack.packb({"t": "call"})[:3],
            "bad_frame",
        ),
        ("wrong frame type", encode_frame({"t": "ok", "b": {}}), "bad_frame"),
        ("body not a map", encode_frame({"t": "call", "b": [1, 2]}), "bad_frame"),
    ],
)
async def test_bad_input_gets_a_typed_error_and_others_are_served(
    name: str, data: bytes, code: str
) -> None:
    async with loopback_host() as server, loopback_host() as attacker, loopback_host() as other:
        serve_all(server)
        bad_peer = await attacker.connect(server.listen_addrs()[0])
        good_peer = await other.connect(server.listen_addrs()[0])
        async with trio.open_nursery() as nursery:
            answers: list[bytes] = []

            async def attack() -> None:
                answers.append(await raw_exchange(attacker, bad_peer, ECHO, data))

            nursery.start_soon(attack)
            reply = await other.rpc.call(good_peer, ECHO, Message({"k": 1}, b"123"))
            assert bytes(reply.payload) == b"321"
        assert error_code(answers[0]) == code, name
        # Same connection, same attacker: the node still serves it properly afterwards.
        reply = await attacker.rpc.call(bad_peer, ECHO, Message({}, b"ab"))
        assert bytes(reply.payload) == b"ba"


async def test_unknown_protocol_is_refused_and_node_keeps_serving() -> None:
    async with loopback_host() as server, loopback_host() as client:
        serve_all(server)
        peer = await client.connect(server.listen_addrs()[0])
        with pytest.raises(RemoteError) as info:
            await client.rpc.call(peer, Protocol(name="nonexistent"), Message())
        assert info.value.code == "unsupported_protocol"
        with pytest.raises(StreamFailure) as raw:
            await client.libp2p.new_stream(peer, [TProtocol("/not-shoal/at-all")])
        assert "protocol not supported" in str(raw.value.__cause__)
        assert bytes((await client.rpc.call(peer, ECHO, Message({}, b"xy"))).payload) == b"yx"


async def test_ping_carries_a_large_payload_intact() -> None:
    async with loopback_host() as server, loopback_host() as client:
        serve_ping(server)
        peer = await client.connect(server.listen_addrs()[0])
        payload = bytes(range(256)) * (8 << 20 >> 8)  # 8 MiB; 64 MiB runs across processes
        result = await call_ping(client, peer, payload)
        assert result.intact
        assert result.remote_sha256 == hashlib.sha256(payload).hexdigest()


async def test_private_swarm_key() -> None:
    key = parse_swarm_key(generate_swarm_key())
    wrong = parse_swarm_key(generate_swarm_key())
    async with loopback_host(psk=key) as server:
        serve_ping(server)
        target = server.listen_addrs()[0]
        for psk in (None, wrong):
            async with loopback_host(psk=psk, dial_timeout=3) as outsider:
                with pytest.raises(DialError):
                    await outsider.connect(target)
                assert not outsider.is_connected(server.peer_id)
        async with loopback_host(psk=key) as member:
            peer = await member.connect(target)
            assert (await call_ping(member, peer, b"inside")).intact
        assert len(server.links()) <= 1


async def test_a_dial_to_a_full_address_is_not_shadowed_by_a_stale_one() -> None:
    # py-libp2p dials one address per transport class, the first it stored: a peer that
    # restarted on a new port stayed unreachable while its old address was remembered
    async with loopback_host() as server, loopback_host(dial_timeout=5) as client:
        serve_ping(server)
        served = str(server.listen_addrs()[0])
        with trio.socket.socket() as placeholder:  # a port nothing listens on
            await placeholder.bind(("127.0.0.1", 0))
            stale_port = placeholder.getsockname()[1]
        stale = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{stale_port}")
        client.libp2p.get_peerstore().add_addrs(server.peer_id, [stale], 3600)
        assert await client.connect(served) == server.peer_id
        assert (await call_ping(client, server.peer_id, b"new port")).intact
