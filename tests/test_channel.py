"""Channels between real libp2p hosts on loopback: many calls on one stream, bad input."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from shoal.transport.channel import ChannelProtocol
from shoal.transport.errors import RemoteError, RpcError
from shoal.transport.framing import FrameDecoder, encode_frame, encode_header
from shoal.transport.rpc import Message
from tests.conftest import loopback_host

ECHO = ChannelProtocol(name="test-chan", max_request=4096, max_response=4096, timeout=5)
TIGHT = ChannelProtocol(name="test-chan-tight", max_concurrent=2, timeout=5)
IDLE = ChannelProtocol(name="test-chan-idle", idle_close=1.0, idle_timeout=30.0, idempotent=True)


async def echo(peer: ID, request: Message) -> Message:
    """Replies out of order: a call with a larger ``k`` waits longer."""
    k = int(request.body["k"])
    if k < 0:
        raise RpcError("bad_request", "k must not be negative")
    if k == 13:
        raise ZeroDivisionError("secret internals")
    await trio.sleep(0.001 * (k % 7))
    return Message({"k": k, "peer": str(peer)}, hashlib.sha256(bytes(request.payload)).digest())


async def test_concurrent_calls_share_one_stream_and_get_their_own_replies() -> None:
    async with loopback_host() as server, loopback_host() as client:
        server.channels.serve(ECHO, echo)
        peer = await client.connect(server.listen_addrs()[0])
        replies: dict[int, Message] = {}

        async def one(k: int) -> None:
            replies[k] = await client.channels.call(peer, ECHO, Message({"k": k}, bytes([k]) * k))

        async with trio.open_nursery() as nursery:
            for k in range(50):
                if k != 13:
                    nursery.start_soon(one, k)
        assert sorted(replies) == [k for k in range(50) if k != 13]
        for k, reply in replies.items():
            assert reply.body == {"k": k, "peer": str(client.peer_id)}
            assert reply.payload == hashlib.sha256(bytes([k]) * k).digest()
        assert client.channels.opened[ECHO.id] == 1
        assert client.channels.streams() == 1


async def test_handler_failures_are_per_call() -> None:
    async with loopback_host() as server, loopback_host() as client:
        server.channels.serve(ECHO, echo)
        peer = await client.connect(server.listen_addrs()[0])
        with pytest.raises(RemoteError) as typed:
            await client.channels.call(peer, ECHO, Message({"k": -1}))
        assert (typed.value.code, typed.value.message) == ("bad_request", "k must not be negative")
        with pytest.raises(RemoteError) as internal:
            await client.channels.call(peer, ECHO, Message({"k": 13}))
        assert internal.value.code == "internal"
        assert "secret" not in internal.value.message
        # The stream survived both failures.
        assert (await client.channels.call(peer, ECHO, Message({"k": 5}))).body["k"] == 5
        assert client.channels.opened[ECHO.id] == 1
        with pytest.raises(RpcError):  # refused before sending
            await client.channels.call(peer, ECHO, Message({"k": 1}, b"x" * 5000))


async def test_busy_beyond_the_concurrency_limit() -> None:
    release = trio.Event()

    async def held(peer: ID, request: Message) -> Message:
        await release.wait()
        return Message({"n": request.body["n"]})

    async with loopback_host() as server, loopback_host() as client:
        server.channels.serve(TIGHT, held)
        peer = await client.connect(server.listen_addrs()[0])
        done: list[int] = []

        async def one(n: int) -> None:
            done.append(int((await client.channels.call(peer, TIGHT, Message({"n": n}))).body["n"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, 1)
            nursery.start_soon(one, 2)
            await trio.sleep(0.3)
            with pytest.raises(RemoteError) as busy:
                await client.channels.call(peer, TIGHT, Message({"n": 3}))
            assert busy.value.code == "busy"
            release.set()
        assert sorted(done) == [1, 2]


async def test_bad_frames_close_only_that_stream() -> None:
    async with loopback_host() as server, loopback_host() as client, loopback_host() as other:
        server.channels.serve(ECHO, echo)
        peer = await client.connect(server.listen_addrs()[0])
        await other.connect(server.listen_addrs()[0])
        cases = [
            (encode_frame({"t": "req", "i": 1, "b": {"k": 1}}, b"x" * 5000), "too_large"),
            (encode_header({"t": "req"}, 0), "bad_frame"),  # no call id
            (b"\x00\x00\x00\x04\xc1\xc1\xc1\xc1", "bad_frame"),  # not msgpack
        ]
        for raw, code in cases:
            stream = await client.libp2p.new_stream(peer, [TProtocol(ECHO.id)])
            await stream.write(raw)
            decoder = FrameDecoder(max_header=4096, max_payload=0)
            with trio.fail_after(5):  # the error frame, then the server closes the stream
                with contextlib.suppress(StreamEOF):
                    while data := await stream.read(4096):
                        decoder.feed(data)
            frame = decoder.next_frame()
            assert frame is not None
            assert (frame.type, frame.header["i"], frame.header["c"]) == ("err", None, code)
            # Meanwhile, and after it, the server answers everyone else.
            reply = await other.channels.call(server.peer_id, ECHO, Message({"k": 2}, b"ab"))
            assert reply.payload == hashlib.sha256(b"ab").digest()


async def test_idle_streams_close_and_calls_reopen_them() -> None:
    async with loopback_host() as server, loopback_host() as client:
        server.channels.serve(IDLE, echo)
        peer = await client.connect(server.listen_addrs()[0])
        assert (await client.channels.call(peer, IDLE, Message({"k": 1}))).body["k"] == 1
        assert client.channels.streams() == 1
        await trio.sleep(2.5)
        assert client.channels.streams() == 0
        assert (await client.channels.call(peer, IDLE, Message({"k": 2}))).body["k"] == 2
        assert client.channels.opened[IDLE.id] == 2


async def test_a_stream_reset_by_the_server_is_replaced_for_idempotent_calls() -> None:
    async with loopback_host() as server, loopback_host() as client:
        server.channels.serve(IDLE, echo)
        peer = await client.connect(server.listen_addrs()[0])
        await client.channels.call(peer, IDLE, Message({"k": 1}))
        # The server drops every stream of the connection's protocol (as a restart would).
        for conn in server.libp2p.get_network().get_connections(client.peer_id):
            for stream in list(conn.get_streams()):
                if stream.get_protocol() == IDLE.id:
                    await stream.reset()
        await trio.sleep(0.2)
        assert (await client.channels.call(peer, IDLE, Message({"k": 3}))).body["k"] == 3
        assert client.channels.opened[IDLE.id] == 2


async def test_unreachable_and_unknown_protocol_are_typed() -> None:
    async with loopback_host() as server, loopback_host() as client:
        peer = await client.connect(server.listen_addrs()[0])
        with pytest.raises(RemoteError) as unknown:
            await client.channels.call(peer, ECHO, Message({"k": 1}))
        assert unknown.value.code == "unsupported_protocol"
