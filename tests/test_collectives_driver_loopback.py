"""The collectives driver with real libp2p hosts in one process (fast cases the
multi-process tests do not cover): a member that stays connected but never sends is
dropped through deadlines; a frame over the size limit is refused before allocation and
its sender treated as failed; a bad local tensor raises before anything is sent."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import msgpack
import pytest
import torch
import trio
from conftest import loopback_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from test_collectives_support import reference

from shoal.collectives import AllReduceResult, Member, View, make_view
from shoal.collectives.driver import PROTOCOL, CollectivesDriver, DriverConfig, open_collectives
from shoal.collectives.errors import BadContribution, MessageTooLarge
from shoal.transport.host import Host


@asynccontextmanager
async def drivers(
    n: int, config: DriverConfig, keys: list[KeyPair] | None = None
) -> AsyncIterator[list[CollectivesDriver]]:
    keys = keys or [create_new_key_pair() for _ in range(n)]
    async with AsyncExitStack() as stack:
        hosts: list[Host] = [
            await stack.enter_async_context(loopback_host(key_pair=k)) for k in keys[:n]
        ]
        for i, host in enumerate(hosts):
            for other in hosts[:i]:
                await host.connect(other.listen_addrs()[0])
        yield [await stack.enter_async_context(open_collectives(h, config)) for h in hosts]


def tensors(ds: list[CollectivesDriver], numel: int) -> dict[str, torch.Tensor]:
    return {
        d.me: torch.randn(numel, generator=torch.Generator().manual_seed(i))
        for i, d in enumerate(ds)
    }


async def reduce_all(
    ds: list[CollectivesDriver], view: View, xs: dict[str, torch.Tensor]
) -> dict[str, AllReduceResult]:
    """Every driver of ``ds`` runs ``view`` with its tensor of ``xs``; their results."""
    results: dict[str, AllReduceResult] = {}

    async def one(d: CollectivesDriver) -> None:
        results[d.me] = await d.all_reduce(view, xs[d.me])

    async with trio.open_nursery() as nursery:
        for d in ds:
            nursery.start_soon(one, d)
    return results


async def test_a_silent_connected_member_is_dropped_by_deadlines() -> None:
    async with drivers(4, DriverConfig(deadline=1.5, timeout=60)) as ds:
        view = make_view("silent/0", [Member(d.me) for d in ds], (5000,))
        xs = tensors(ds, 5000)
        silent = ds[0]  # connected, serving its streams, never starts the operation
        results: dict[str, AllReduceResult] = {}

        async def one(d: CollectivesDriver) -> None:
            results[d.me] = await d.all_reduce(view, xs[d.me])

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for d in ds[1:]:
                    nursery.start_soon(one, d)
        survivors = sorted(d.me for d in ds[1:])
        ref = reference(view, xs, survivors)
        assert {r.contributors for r in results.values()} == {tuple(survivors)}
        assert all(torch.equal(r.tensor, ref) for r in results.values())
        assert len({r.digest for r in results.values()}) == 1
        assert silent.operation("silent/0") is None


async def test_an_oversized_frame_is_refused_and_its_sender_failed() -> None:
    async with drivers(2, DriverConfig(max_early_frame=1 << 20)) as (a, b):
        stream = await a.host.libp2p.new_stream(b.host.peer_id, [PROTOCOL])
        header = msgpack.packb({"t": "DATA", "n": 1 << 30}, use_bin_type=True)
        await stream.write(struct.pack(">I", len(header)) + header)
        with trio.fail_after(10):
            while not b.mux.rejections:  # noqa: ASYNC110
                await trio.sleep(0.01)
        (rejection,) = b.mux.rejections
        assert isinstance(rejection, MessageTooLarge)
        assert (rejection.peer, rejection.size, rejection.limit) == (a.me, 1 << 30, 1 << 20)
        assert b._failed == {a.me}


async def test_a_bad_local_tensor_raises_before_anything_is_sent() -> None:
    async with drivers(2, DriverConfig()) as (a, b):
        view = make_view("bad/0", [Member(a.me), Member(b.me)], (16,))
        bad = torch.ones(16)
        bad[3] = float("nan")
        with pytest.raises(BadContribution) as info:
            await a.all_reduce(view, bad)
        assert info.value.field == "nonfinite"
        with pytest.raises(BadContribution) as info:
            await a.all_reduce(view, torch.ones(15))
        assert info.value.field == "shape"
        assert a.bytes_sent == 0 and a.operation("bad/0") is None


async def test_a_member_restarted_with_its_identity_is_readmitted_for_later_operations() -> None:
    key = create_new_key_pair()
    async with drivers(2, DriverConfig(deadline=2.0, timeout=30)) as (a, b):

        @asynccontextmanager
        async def rejoin() -> AsyncIterator[CollectivesDriver]:
            async with loopback_host(key_pair=key) as host:
                for other in (a, b):
                    await host.connect(other.host.listen_addrs()[0])
                async with open_collectives(host, DriverConfig(deadline=2.0, timeout=30)) as c:
                    yield c

        async with rejoin() as c:
            me = c.me
        with trio.fail_after(10):  # the first process is gone: both see it fail
            while not (me in a._failed and me in b._failed):  # noqa: ASYNC110
                await trio.sleep(0.01)

        async def run(tag: str, ds: list[CollectivesDriver]) -> dict[str, AllReduceResult]:
            view = make_view(tag, [Member(d.me) for d in (a, b)] + [Member(me)], (3000,))
            xs = tensors(ds, 3000)
            results: dict[str, AllReduceResult] = {}

            async def one(d: CollectivesDriver) -> None:
                results[d.me] = await d.all_reduce(view, xs[d.me])

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    for d in ds:
                        nursery.start_soon(one, d)
            return results

        gone = await run("restart/0", [a, b])  # without it: the two survivors' average
        assert {r.contributors for r in gone.values()} == {tuple(sorted((a.me, b.me)))}

        async with rejoin() as c:  # the same peer id, a new process
            assert c.me == me
            with trio.fail_after(10):
                while me in a._failed or me in b._failed:  # noqa: ASYNC110
                    await trio.sleep(0.01)
            back = await run("restart/1", [a, b, c])
        everyone = tuple(sorted((a.me, b.me, me)))
        assert {r.contributors for r in back.values()} == {everyone}
        assert len({r.digest for r in back.values()}) == 1


@pytest.mark.parametrize("codec", ["fp32", "int8"])
async def test_bulk_and_libp2p_streams_give_the_same_bytes(codec: str) -> None:
    """The same operation over bulk streams (the default) and over libp2p streams: the
    same result bytes on every peer, and each driver opened the kind it was told to."""
    numel = 300_000  # 1.2 MB per peer in fp32: several bulk frames per link
    outcomes: dict[bool, set[bytes]] = {}
    keys = [create_new_key_pair() for _ in range(3)]  # the same peers (and chunk owners)
    for bulk in (True, False):
        async with drivers(3, DriverConfig(bulk=bulk, timeout=60), keys) as ds:
            view = make_view(f"bulk-{bulk}/0", [Member(d.me) for d in ds], (numel,), codec=codec)
            xs = tensors(ds, numel)
            with trio.fail_after(60):
                results = await reduce_all(ds, view, xs)
            outcomes[bulk] = {r.tensor.numpy().tobytes() for r in results.values()}
            kind = "bulk" if bulk else "libp2p"
            assert [set(d.opened) for d in ds] == [{kind}] * 3
            assert [d.opened[kind] for d in ds] == [2, 2, 2]
            if codec == "fp32":
                ref = reference(view, xs, sorted(xs))
                assert all(torch.equal(r.tensor, ref) for r in results.values())
    assert len(outcomes[True]) == 1 and outcomes[True] == outcomes[False]
