"""Bulk streams between real libp2p hosts on loopback: bytes arrive intact both ways;
an unknown token, a forged frame and an oversized length are refused with a typed error;
the stream closes with the peers' libp2p connection; a protocol not served in bulk is
BulkUnavailable (the caller uses libp2p)."""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from conftest import loopback_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from shoal.transport.bulk import (
    AES,
    AES128,
    CHACHA,
    FRAME,
    MAX_PENDING_PER_PEER,
    PROTOCOL,
    UNREACHABLE_RETRY,
    Bulk,
    BulkError,
    BulkStream,
    BulkUnavailable,
    choose_cipher,
    cpu_has_aes,
)
from shoal.transport.channel import ChannelProtocol
from shoal.transport.errors import RemoteError
from shoal.transport.host import Host, HostConfig, open_host
from shoal.transport.rpc import Message

pytestmark = pytest.mark.trio
ECHO = "/test/echo/1"


class Receiver:
    """Serves ECHO: reads everything, then answers its sha256; records what ended it."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.ended: list[BaseException | None] = []
        self.ciphers: list[str] = []
        self.done = trio.Event()

    async def __call__(self, stream: BulkStream) -> None:
        self.ciphers.append(stream.cipher)
        data = bytearray()
        try:
            while chunk := await stream.read(1 << 16):
                data += chunk
            self.received.append(bytes(data))
            await stream.write(hashlib.sha256(data).digest())
            self.ended.append(None)
        except (BulkError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            self.ended.append(exc)
        finally:
            self.done.set()


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[Host, Bulk, Host, Bulk, Receiver]]:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(loopback_host())
        b = await stack.enter_async_context(loopback_host())
        await a.connect(b.listen_addrs()[0])
        assert a.bulk is not None and b.bulk is not None  # every host runs one
        bulk_a, bulk_b = a.bulk, b.bulk
        receiver = Receiver()
        bulk_b.serve(ECHO, receiver)
        yield a, bulk_a, b, bulk_b, receiver


async def test_bytes_arrive_intact_both_ways() -> None:
    payload = os.urandom(3 * FRAME + 12345)  # several frames and a partial one
    async with pair() as (_, bulk_a, b, bulk_b, receiver):
        stream = await bulk_a.open(b.peer_id, ECHO)
        await stream.write(payload[:100])
        await stream.write(payload[100:])
        await stream.sock.send_eof()
        with trio.fail_after(10):
            digest = await stream.read()
        assert receiver.received == [payload]
        assert digest == hashlib.sha256(payload).digest()
        assert receiver.ended == [None]
        await stream.close()
        # a closed stream is no longer tracked on either side (its buffers go with it)
        assert not bulk_a._streams.get(b.peer_id)
        with trio.fail_after(5):  # (b closes its side once the handler has returned)
            while any(bulk_b._streams.values()):  # noqa: ASYNC110
                await trio.sleep(0.01)


@pytest.mark.parametrize(
    ("opener", "acceptor", "cipher"),
    [
        ([AES128, AES, CHACHA], [AES128, AES, CHACHA], AES128),
        ([AES, CHACHA], [AES128, AES, CHACHA], AES),  # an opener from before AES-128
        ([AES, CHACHA], [AES, CHACHA], AES),
        ([CHACHA], [AES128, AES, CHACHA], CHACHA),
        ([AES128, AES, CHACHA], [CHACHA], CHACHA),
    ],
)
async def test_the_cipher_is_aes_only_when_both_prefer_it(
    opener: list[str], acceptor: list[str], cipher: str
) -> None:
    payload = os.urandom(FRAME + 999)
    async with pair() as (_, bulk_a, b, bulk_b, receiver):
        bulk_a.ciphers, bulk_b.ciphers = opener, acceptor
        stream = await bulk_a.open(b.peer_id, ECHO)
        assert stream.cipher == cipher
        await stream.write(payload)
        await stream.sock.send_eof()
        with trio.fail_after(10):
            assert await stream.read() == hashlib.sha256(payload).digest()
        assert receiver.ciphers == [cipher] and receiver.received == [payload]
        await stream.close()


async def test_a_stream_of_small_messages_holds_small_buffers() -> None:
    async with pair() as (_, bulk_a, b, _, receiver):
        stream = await bulk_a.open(b.peer_id, ECHO)
        await stream.write(b"x" * 100)
        await stream.sock.send_eof()
        with trio.fail_after(10):
            assert await stream.read() == hashlib.sha256(b"x" * 100).digest()
        assert len(stream._wbuf) == 128 and len(stream._rbuf) == 64  # 4 + n + 16, rounded up
        assert receiver.received == [b"x" * 100]
        await stream.close()


async def test_cipher_choice_and_cpu_detection() -> None:
    assert choose_cipher([AES, CHACHA], [AES, CHACHA]) == AES
    assert choose_cipher([AES128, AES, CHACHA], [AES128, AES, CHACHA]) == AES128
    assert choose_cipher([AES128, CHACHA], [AES, CHACHA]) == CHACHA  # no AES in common
    assert choose_cipher([CHACHA, AES128], [AES128, CHACHA]) == CHACHA  # not first
    assert choose_cipher(None, [AES, CHACHA]) == CHACHA  # an opener that predates the choice
    assert choose_cipher(["rot13"], [AES, CHACHA]) == CHACHA
    x86 = "processor\t: 0\nflags\t\t: fpu vme sse2 aes avx2 sha_ni\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"
    pi4 = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
    assert cpu_has_aes(x86) and cpu_has_aes(arm) and not cpu_has_aes(pi4)
    assert not cpu_has_aes("flags : aesni-like sse\n")


async def test_parts_are_decrypted_straight_into_the_readers_buffer() -> None:
    head, payload = b"header!", os.urandom(2 * FRAME + 4321)
    got = bytearray(len(head) + len(payload))
    done = trio.Event()

    async def reader(stream: BulkStream) -> None:
        view, filled = memoryview(got), 0
        while filled < len(got):  # buffers smaller and larger than a frame
            filled += await stream.read_into(
                view[filled : filled + (3 if filled == 0 else FRAME * 2)]
            )
        done.set()

    async with pair() as (_, bulk_a, b, bulk_b, _):
        bulk_b.serve("/test/into/1", reader)
        stream = await bulk_a.open(b.peer_id, "/test/into/1")
        await stream.write_parts((head, memoryview(payload)))
        with trio.fail_after(10):
            await done.wait()
        assert bytes(got) == head + payload
        await stream.close()


async def test_a_protocol_not_served_in_bulk_is_unavailable() -> None:
    async with pair() as (_, bulk_a, b, _, _):
        with pytest.raises(BulkUnavailable, match="unsupported_protocol"):
            await bulk_a.open(b.peer_id, "/test/other/1")


def _closed_port() -> int:
    """A loopback port nothing listens on (as a NATed peer's bulk port is to others)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _echo_digest(stream: BulkStream, payload: bytes) -> bytes:
    await stream.write(payload)
    await stream.sock.send_eof()
    with trio.fail_after(10):
        digest = await stream.read()
    await stream.close()
    return bytes(digest)


async def test_an_unreachable_bulk_port_is_punched_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    payload = os.urandom(FRAME + 4321)
    async with pair() as (_, bulk_a, b, bulk_b, receiver):
        bulk_b.port = _closed_port()  # its listener cannot be reached: both ends dial
        with caplog.at_level("INFO", logger="shoal.transport.bulk"):
            for _ in range(3):
                stream = await bulk_a.open(b.peer_id, ECHO)
                assert await _echo_digest(stream, payload) == hashlib.sha256(payload).digest()
        assert receiver.received == [payload] * 3
        assert bulk_a.opened[ECHO] == 3 and b.peer_id in bulk_a._punched
        # Only the first open tried the listener; the others went straight to punching.
        assert sum("punching" in r.getMessage() for r in caplog.records) == 1
        with trio.fail_after(5):  # every punch-back has ended, its sockets closed
            while bulk_b._punching:  # noqa: ASYNC110
                await trio.sleep(0.01)


async def test_punch_backs_a_peer_leaves_running_are_capped() -> None:
    """A peer that asks for punches and then uses each token at the listener must not
    pile up the acceptor's dial-back sockets."""
    async with pair() as (a, _, b, bulk_b, _):
        body = {"t": "open", "proto": ECHO, "punch": _closed_port()}  # resets until the deadline
        for _ in range(MAX_PENDING_PER_PEER):
            reply = await a.channels.call(b.peer_id, PROTOCOL, Message(body))
            async with await trio.open_tcp_stream("127.0.0.1", bulk_b.port) as sock:
                await sock.send_all(reply.body["token"])  # the token slot is free again
        with trio.fail_after(5):
            while bulk_b._pending:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert bulk_b._punching == {a.peer_id: MAX_PENDING_PER_PEER}
        with pytest.raises(RemoteError, match="too many bulk punches"):
            await a.channels.call(b.peer_id, PROTOCOL, Message(body))


async def test_punching_a_peer_that_does_not_dial_back_is_unavailable() -> None:
    async with pair() as (_, bulk_a, b, bulk_b, receiver):
        bulk_b.port = _closed_port()

        async def never(
            dialer: trio.socket.SocketType, listener: trio.socket.SocketType, *args: object
        ) -> None:
            """It answers with a port but never dials from it nor listens on it."""
            dialer.close()
            listener.close()

        bulk_b._punch_back = never  # type: ignore[method-assign]
        with pytest.raises(BulkUnavailable, match="punched or not"):
            await bulk_a.open(b.peer_id, ECHO)
        with pytest.raises(BulkUnavailable, match="unreachable before"):
            await bulk_a.open(b.peer_id, ECHO)  # not tried again for a while
        wait = bulk_a._unreachable.retry_at(b.peer_id) - trio.current_time()  # type: ignore[operator]
        assert UNREACHABLE_RETRY - 10 < wait <= UNREACHABLE_RETRY
        assert not receiver.done.is_set() and b.peer_id not in bulk_a._punched


async def test_an_acceptor_from_before_punching_is_unavailable_at_once() -> None:
    async with pair() as (_, bulk_a, b, bulk_b, receiver):
        bulk_b.port = _closed_port()

        async def old_acceptor(peer: ID, request: Message) -> Message:
            body = {k: v for k, v in request.body.items() if k != "punch"}
            return await bulk_b._on_open(peer, Message(body))

        b.channels.serve(PROTOCOL, old_acceptor)
        with pytest.raises(BulkUnavailable, match="does not punch"):
            await bulk_a.open(b.peer_id, ECHO)
        with pytest.raises(BulkUnavailable, match="unreachable before"):
            await bulk_a.open(b.peer_id, ECHO)
        assert not receiver.done.is_set()


@pytest.mark.parametrize("punch", [0, 65536, -1, "80", True, 1.5])
async def test_a_bad_punch_port_is_refused(punch: object) -> None:
    async with pair() as (a, _, b, _, _):
        body = {"t": "open", "proto": ECHO, "punch": punch}
        with pytest.raises(RemoteError, match="bad_request"):
            await a.channels.call(b.peer_id, PROTOCOL, Message(body))
        assert not b.bulk._pending  # type: ignore[union-attr]


async def _raw(a: Host, b: Host, bulk_b: Bulk, token: bytes | None) -> trio.SocketStream:
    """A plain TCP connection to b's bulk port that sends ``token`` (None: a real one,
    asked for as an opener that predates the cipher choice does: ChaCha20 is answered)."""
    if token is None:
        reply = await a.channels.call(b.peer_id, PROTOCOL, Message({"t": "open", "proto": ECHO}))
        assert reply.body["cipher"] == CHACHA
        token = reply.body["token"]
    sock = await trio.open_tcp_stream("127.0.0.1", bulk_b.port)
    await sock.send_all(token)
    return sock


async def test_an_unknown_token_is_closed_without_reaching_the_handler() -> None:
    async with pair() as (a, _, b, bulk_b, receiver):
        async with await _raw(a, b, bulk_b, os.urandom(16)) as sock:
            with trio.fail_after(5):
                assert await sock.receive_some(10) == b""  # closed by b
        assert not receiver.done.is_set()


@pytest.mark.parametrize(
    "frame",
    [
        struct.pack(">I", 64) + os.urandom(64),  # a frame not sealed with the key
        struct.pack(">I", FRAME + 17),  # over the limit: refused before allocating it
        struct.pack(">I", 5),  # shorter than a tag
    ],
    ids=["forged", "oversized", "undersized"],
)
async def test_bad_frames_end_the_stream_with_a_bulk_error(frame: bytes) -> None:
    async with pair() as (a, _, b, bulk_b, receiver):
        async with await _raw(a, b, bulk_b, None) as sock:
            await sock.send_all(frame)
            with trio.fail_after(5):
                await receiver.done.wait()
        assert len(receiver.ended) == 1 and isinstance(receiver.ended[0], BulkError)
        assert receiver.received == []


async def test_the_stream_closes_with_the_libp2p_connection() -> None:
    async with pair() as (a, bulk_a, b, _, receiver):
        stream = await bulk_a.open(b.peer_id, ECHO)
        await stream.write(b"x" * 1000)
        await b.libp2p.disconnect(a.peer_id)
        with trio.fail_after(5):
            await receiver.done.wait()
        assert receiver.received == [] and receiver.ended[0] is not None
        with pytest.raises(BulkUnavailable, match="no direct IPv4 TCP connection"):
            await bulk_a.open(b.peer_id, ECHO)


async def test_a_channel_protocol_marked_bulk_calls_over_a_bulk_stream() -> None:
    proto = ChannelProtocol(name="test-bulk-echo", max_request=4 << 20, bulk=True)

    async def echo(peer: ID, request: Message) -> Message:
        return Message({"n": len(request.payload)}, hashlib.sha256(request.payload).digest())

    async with pair() as (a, bulk_a, b, _, _):
        b.channels.serve(proto, echo)
        for size in (0, 10, 3 * FRAME + 7):
            payload = os.urandom(size)
            reply = await a.channels.call(b.peer_id, proto, Message({}, payload))
            assert reply.body == {"n": size}
            assert reply.payload == hashlib.sha256(payload).digest()
        assert bulk_a.opened == {proto.id: 1}  # one stream, reused by every call
        assert a.channels.opened == {proto.id: 1, PROTOCOL.id: 1}  # (the opening call)


async def test_tokens_a_peer_leaves_unused_are_capped() -> None:
    """A peer that asks for bulk streams and never connects holds at most 8 tokens; the
    9th request is answered ``busy`` (its caller falls back to libp2p)."""
    async with pair() as (a, bulk_a, b, _, _):
        request = Message({"t": "open", "proto": ECHO})
        tokens = {(await a.channels.call(b.peer_id, PROTOCOL, request)).body["token"]}
        for _ in range(7):
            tokens.add((await a.channels.call(b.peer_id, PROTOCOL, request)).body["token"])
        assert len(tokens) == 8
        with pytest.raises(RemoteError, match="busy"):
            await a.channels.call(b.peer_id, PROTOCOL, request)
        with pytest.raises(BulkUnavailable, match="busy"):
            await bulk_a.open(b.peer_id, ECHO)


async def test_a_host_without_bulk_serves_and_calls_over_libp2p() -> None:
    """HostConfig(bulk=False) (``shoal node --no-bulk``): no bulk port; a peer that asks
    for a bulk stream falls back, and bulk-marked calls between them work over libp2p."""
    proto = ChannelProtocol(name="test-nobulk-echo", bulk=True)

    async def echo(peer: ID, request: Message) -> Message:
        return Message({"n": len(request.payload)})

    config = HostConfig(
        key_pair=create_new_key_pair(), listen=("/ip4/127.0.0.1/tcp/0",), bulk=False
    )
    async with loopback_host() as a, open_host(config) as b:
        assert b.bulk is None and a.bulk is not None
        b.channels.serve(proto, echo)
        await a.connect(b.listen_addrs()[0])
        with pytest.raises(BulkUnavailable, match="unsupported_protocol"):
            await a.bulk.open(b.peer_id, proto.id)
        reply = await a.channels.call(b.peer_id, proto, Message({}, b"x" * 100))
        assert reply.body == {"n": 100} and a.bulk.opened == {}


async def test_a_failing_handler_ends_its_stream_and_the_host_keeps_serving() -> None:
    async def broken(stream: BulkStream) -> None:
        await stream.read()
        raise ValueError("a bug in a handler")

    async with pair() as (_, bulk_a, b, bulk_b, _):
        bulk_b.serve("/test/broken/1", broken)
        stream = await bulk_a.open(b.peer_id, "/test/broken/1")
        await stream.write(b"x")
        with trio.fail_after(5):
            assert await stream.read() == b""  # b closed it
        await stream.close()
        echo = await bulk_a.open(b.peer_id, ECHO)  # b's listener still serves
        await echo.write(b"still here")
        await echo.sock.send_eof()
        with trio.fail_after(5):
            assert await echo.read() == hashlib.sha256(b"still here").digest()
        await echo.close()
