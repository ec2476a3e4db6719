"""The edge benchmark's delaying proxy (scripts/bench/delaylink.py): bytes come back
unchanged and in order, and every round trip waits at least twice the one-way delay
(a lower bound on an injected delay: it holds however slow the machine is)."""

from __future__ import annotations

import time

import trio
from conftest import load_bench_script

delaylink = load_bench_script("delaylink")
DELAY = 0.020


async def _through_proxy(delay: float, messages: list[bytes]) -> tuple[list[bytes], list[float]]:
    """Each message through a proxy in front of an echo server: what came back, and each
    round trip's seconds."""
    async with trio.open_nursery() as nursery:
        echo = await nursery.start(delaylink.echo_server)
        port = await nursery.start(delaylink.DelayProxy(echo, delay).serve)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        replies, rtts = [], []
        async with stream:
            for message in messages:
                start = time.monotonic()
                await stream.send_all(message)
                got = b""
                while len(got) < len(message):
                    got += await stream.receive_some()
                rtts.append(time.monotonic() - start)
                replies.append(got)
        nursery.cancel_scope.cancel()
    return replies, rtts


def test_proxy_returns_the_bytes_after_twice_the_delay() -> None:
    messages = [b"ping", bytes(range(256)) * 1024, b"\x00" * 3, b"last"]
    replies, rtts = trio.run(_through_proxy, DELAY, messages)
    assert replies == messages
    assert len(rtts) == 4
    assert min(rtts) >= 2 * DELAY


def test_chunks_keep_their_order_under_the_delay() -> None:
    """A burst of writes, then one read of all of it: in order, one delay for the burst."""

    async def burst() -> tuple[bytes, float]:
        async with trio.open_nursery() as nursery:
            echo = await nursery.start(delaylink.echo_server)
            port = await nursery.start(delaylink.DelayProxy(echo, DELAY).serve)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            sent = b"".join(i.to_bytes(4, "big") for i in range(5000))
            start = time.monotonic()
            async with stream:
                for i in range(0, len(sent), 1000):
                    await stream.send_all(sent[i : i + 1000])
                got = b""
                while len(got) < len(sent):
                    got += await stream.receive_some()
            nursery.cancel_scope.cancel()
            assert got == sent
            return got, time.monotonic() - start

    got, elapsed = trio.run(burst)
    assert len(got) == 20000
    assert elapsed >= 2 * DELAY


def test_echo_rtt_through_a_proxy_process() -> None:
    """The benchmark's own path: a proxy process, its echo measured from outside trio."""
    proxies = delaylink.ProxyProcess.start([], 20.0)
    try:
        rtt = proxies.rtt()
    finally:
        proxies.stop()
    assert rtt >= 2 * DELAY
    assert proxies.process.returncode is not None


def test_a_negative_delay_is_refused() -> None:
    try:
        delaylink.DelayProxy(1, -0.001)
    except ValueError as exc:
        assert "must not be negative" in str(exc)
    else:
        raise AssertionError("a negative delay was accepted")
