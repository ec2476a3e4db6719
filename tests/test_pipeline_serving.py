"""Span servers in this process, on real libp2p hosts on loopback: bad requests, session
limits, idle sessions, and the client's replay after a lost session."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import torch
import trio

from shoal.kernels import codecs
from shoal.pipeline import protocol as wire
from shoal.pipeline.chain import ChainConfig, ChainSession, RemoteModel, RemoteSwarm
from shoal.pipeline.generate import generate
from shoal.pipeline.loading import load_span, load_tokenizer, open_checkpoint
from shoal.pipeline.model import DecoderSpan, Span
from shoal.pipeline.protocol import INFERENCE, Hop, Sampling, StepRequest
from shoal.pipeline.serving import ModelFiles, ServerConfig, SpanServer
from shoal.transport.host import Host
from shoal.transport.rpc import Message
from tests.conftest import loopback_host

MODEL = "shoal-tiny"


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, DecoderSpan, DecoderSpan, DecoderSpan]:
    checkpoint = open_checkpoint(MODEL)
    full = load_span(checkpoint)
    first = load_span(checkpoint, Span(start=0, end=4, embed=True))
    last = load_span(checkpoint, Span(start=4, end=8, head=True))
    return checkpoint, full, first, last


@asynccontextmanager
async def two_servers(
    tiny: tuple[Any, DecoderSpan, DecoderSpan, DecoderSpan], config: ServerConfig
) -> AsyncIterator[tuple[Host, SpanServer, SpanServer, list[Hop]]]:
    checkpoint, _, first, last = tiny
    files = ModelFiles.read(checkpoint.directory)
    async with loopback_host() as h1, loopback_host() as h2, loopback_host() as client:
        s1 = SpanServer(h1, MODEL, first, files, config)
        s2 = SpanServer(h2, MODEL, last, files, config)
        async with trio.open_nursery() as nursery:
            await nursery.start(s1.run)
            await nursery.start(s2.run)
            route = [
                Hop(str(h1.peer_id), 0, 4, tuple(h1.listen_addrs())),
                Hop(str(h2.peer_id), 4, 8, tuple(h2.listen_addrs())),
            ]
            for host in (h1, h2):
                await client.connect(host.listen_addrs()[0])
            yield client, s1, s2, route
            nursery.cancel_scope.cancel()


def step(route: list[Hop], session: str, tokens: list[int], **kw: Any) -> dict[str, Any]:
    request = StepRequest(
        session=session,
        model=MODEL,
        route=tuple(route),
        hop=0,
        position=kw.pop("position", 0),
        chunks=kw.pop("chunks", (len(tokens),)),
        max_length=kw.pop("max_length", 64),
        sampling=Sampling(),
        timeout=kw.pop("timeout", 20.0),
        tokens=tuple(tokens),
    )
    return request.to_wire() | kw


async def call(client: Host, hop: Hop, body: dict[str, Any], payload: bytes = b"") -> Any:
    from libp2p.peer.id import ID

    reply = await client.channels.call(ID.from_base58(hop.peer), INFERENCE, Message(body, payload))
    return reply.body


def reference(full: DecoderSpan, prompt: list[int], n: int) -> list[int]:
    return list(generate(full, prompt, max_new_tokens=n))


async def test_bad_requests_get_typed_errors_and_the_server_keeps_serving(tiny: Any) -> None:
    checkpoint, full, _, _ = tiny
    prompt = load_tokenizer(checkpoint).encode("KING:")
    async with two_servers(tiny, ServerConfig()) as (client, _, _, route):
        first, second = route
        good = step(route, "good", prompt)
        cases: list[tuple[Hop, dict[str, Any], bytes, str, str]] = [
            (first, {"op": "explode"}, b"", wire.BAD_REQUEST, "unknown op"),
            (first, good | {"chunks": "all"}, b"", wire.BAD_REQUEST, "chunks"),
            (first, good | {"tokens": [999999]}, b"", wire.BAD_REQUEST, "tokens"),
            (
                first,
                step(route, "big", prompt, max_length=10_000),
                b"",
                wire.BAD_REQUEST,
                "context",
            ),
            (second, good, b"", wire.WRONG_SPAN, "not this server"),
            (first, good | {"model": "other"}, b"", wire.WRONG_SPAN, "blocks 0:4 of shoal-tiny"),
            (first, step(route, "late", [5], position=7), b"", wire.SESSION_UNKNOWN, "replay"),
        ]
        header, payload = codecs.encode(torch.zeros(1, len(prompt), 256))
        later = good | {"hop": 1, "hidden": header}
        cases += [
            (second, later, payload[:-4], wire.BAD_REQUEST, "payload has"),  # short payload
            (second, later | {"hidden": header | {"dtype": "int64"}}, payload, wire.BAD_REQUEST, "dtype"),
            (second, later | {"hidden": header | {"shape": [1, 2, 256]}}, payload, wire.BAD_REQUEST, "shape"),
        ]  # fmt: skip
        for hop, body, data, code, text in cases:
            reply = await call(client, hop, body, data)
            assert reply["error"]["code"] == code, (body, reply)
            assert text in reply["error"]["message"], reply
        # ... and a correct session still runs, token for token
        tokens, pending, position = [], prompt, 0
        for _ in range(12):
            body = step(route, "good", pending, position=position)
            reply = await call(client, first, body)
            tokens.append(reply["token"])
            position += len(pending)
            pending = [reply["token"]]
        assert tokens == reference(full, prompt, 12)
        assert [h[0] for h in reply["hops"]] == [first.peer, second.peer]


async def test_session_limits_refuse_with_typed_errors_and_close_frees(tiny: Any) -> None:
    config = ServerConfig(max_sessions=3, max_cache_tokens=200)
    async with two_servers(tiny, config) as (client, s1, s2, route):
        first = route[0]
        for name in ("a", "b"):
            reply = await call(client, first, step(route, name, [1, 2], max_length=90))
            assert isinstance(reply["token"], int)
        reply = await call(client, first, step(route, "c", [1, 2], max_length=90))
        assert reply["error"]["code"] == wire.CACHE_FULL  # 180 of 200 reserved
        assert "20 of 200 are free" in reply["error"]["message"]
        assert reply["error"]["peer"] == first.peer
        reply = await call(client, first, step(route, "c", [1, 2], max_length=20))
        assert isinstance(reply["token"], int)
        reply = await call(client, first, step(route, "d", [1], max_length=2))
        assert reply["error"]["code"] == wire.TOO_MANY_SESSIONS
        assert s1.info()["sessions"] == 3 and s2.info()["free_cache_tokens"] == 0
        body = {"op": "close", "session": "a", "route": [h.to_wire() for h in route], "hop": 0}
        assert (await call(client, first, body)) == {"closed": True}
        assert set(s1.sessions) == set(s2.sessions) == {"b", "c"}  # closed on both hops
        reply = await call(client, first, step(route, "d", [1], max_length=2))
        assert isinstance(reply["token"], int)


class _NoDiscovery:
    """The chain below is given its route: routing is not under test here."""


async def test_idle_sessions_are_dropped_and_the_client_replays_them_exactly(tiny: Any) -> None:
    checkpoint, full, _, _ = tiny
    tokenizer = load_tokenizer(checkpoint)
    prompt = tokenizer.encode("JULIET:")
    expected = reference(full, prompt, 40)
    async with two_servers(tiny, ServerConfig(session_idle=1000.0)) as (client, s1, s2, route):
        swarm = RemoteSwarm(client, _NoDiscovery(), ChainConfig(step_timeout=20))  # type: ignore[arg-type]
        model = RemoteModel(MODEL, full.config, tokenizer)
        session = ChainSession(swarm, model, max_length=len(prompt) + 40, sampling=Sampling())
        session.route = list(route)
        tokens, pending = [], prompt
        for i in range(40):
            if i == 20:  # both servers forget the session, as after an idle timeout
                s1.drop_idle(trio.current_time() + 2000)
                s2.drop_idle(trio.current_time() + 2000)
                assert not s1.sessions and not s2.sessions
            token = await session.step(pending)
            tokens.append(token)
            pending = [token]
        assert session.trace.failovers == 1
        assert tokens == expected
        assert s2.steps == 40  # one replay step, not 20
