"""Tensor-parallel groups of real `shoal node` processes on loopback: a group of 2 or 3
members generates the tokens one process does (shoal-tiny and a GQA Llama, star and
ring), and a member killed mid-generation ends in a clear error, not a hang."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shoal.client import open_client
from shoal.pipeline.chain import ChainConfig
from shoal.pipeline.errors import SwarmError
from shoal.pipeline.generate import generate
from shoal.pipeline.loading import load_span, open_checkpoint
from tests import daemons
from tests.daemons import Daemon
from tests.models import save_hf_model

pytestmark = pytest.mark.slow

TINY = "shoal-tiny"
PROMPT = [72, 1, 50, 8, 11, 44, 32, 19]  # ids below both vocabularies (258, 96)
GQA = {"num_attention_heads": 8, "num_key_value_heads": 4}


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_process() -> Iterator[None]:
    """One torch thread per process; a member starts once its whole group formed and
    measured itself, so it may take longer than a lone node on a loaded box."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setattr(daemons, "START_TIMEOUT", 300.0)
        yield


@pytest.fixture(scope="module")
def boot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp("tp") / "boot")
    try:
        yield daemon.start()
    finally:
        daemon.kill()


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tp-llama") / "gqa-llama"
    save_hf_model("llama", directory, config=GQA)
    return directory


def start_group(
    tmp: Path,
    boot: Daemon,
    model: str,
    blocks: str,
    name: str,
    weights: Sequence[float],
    *extra: str,
) -> list[Daemon]:
    """``len(weights)`` members of group ``name``, started at once; the leader first."""
    members = [
        Daemon(tmp / f"{name}-{i}",
               ("--bootstrap", boot.addr, "--model", model, "--blocks", blocks,
                "--tp-group", name, "--tp-size", str(len(weights)), "--tp-weight", str(w),
                "--threads", "1", *extra))
        for i, w in enumerate(weights)
    ]  # fmt: skip
    try:
        with ThreadPoolExecutor(len(members)) as pool:
            list(pool.map(lambda d: d.start(), members))
    except BaseException:
        for member in members:
            member.kill()
        raise
    return sorted(members, key=lambda d: d.status()["tp_group"]["rank"])


def reference(model: str | Path, prompt: list[int], n: int) -> list[int]:
    return list(generate(load_span(open_checkpoint(model)), prompt, max_new_tokens=n))


async def group_tokens(boot: Daemon, model: str, n: int, **chain: float) -> list[int]:
    async with open_client([boot.addr], chain=ChainConfig(**chain)) as swarm:
        return [
            t
            async for t in swarm.generate_tokens(PROMPT, model=model, max_new_tokens=n, stop_ids=())
        ]


@pytest.mark.parametrize(
    ("weights", "topology"), [((1.0, 3.0), "star"), ((1.0, 1.0, 2.0), "ring")], ids=str
)
async def test_shoal_tiny_group_generates_what_one_process_does(
    weights: tuple[float, ...], topology: str, boot: Daemon, tmp_path: Path
) -> None:
    name = f"tiny-{len(weights)}-{topology}"
    members = start_group(tmp_path, boot, TINY, "0:8", name, weights, "--tp-topology", topology)
    try:
        tokens = await group_tokens(boot, TINY, 24, route_timeout=30)
        assert tokens == reference(TINY, PROMPT, 24)
        infos = [m.status()["tp_group"] for m in members]
        assert [i["rank"] for i in infos] == list(range(len(weights)))
        assert all(i["members"] == infos[0]["members"] for i in infos)
        # the shares follow the weights (ranks go by peer id): here a member of weight w
        # holds w of the 4 KV heads and w/4 of the 512 MLP columns
        for member, shard in zip(members, infos[0]["shards"], strict=True):
            weight = float(member.args[member.args.index("--tp-weight") + 1])
            assert (shard[2] - shard[1], shard[4] - shard[3]) == (weight, weight * 128)
        # every member ran every step, and every all-reduce went the forced way
        steps = {i["steps"] for i in infos}
        assert len(steps) == 1 and steps.pop() >= 24
        other = "ring" if topology == "star" else "star"
        assert infos[0]["topologies_used"][topology] > 0
        assert infos[0]["topologies_used"][other] == 0
    finally:
        for member in members:
            member.kill()


@pytest.mark.parametrize("size", [2, 3])
async def test_gqa_llama_group_generates_what_one_process_does(
    size: int, boot: Daemon, llama: Path, tmp_path: Path
) -> None:
    members = start_group(tmp_path, boot, str(llama), "0:4", f"llama-{size}", [1.0] * size)
    try:
        tokens = await group_tokens(boot, llama.name, 24, route_timeout=30)
        assert tokens == reference(llama, PROMPT, 24)
        info = members[0].status()["tp_group"]
        assert len(info["members"]) == size and info["broken"] is None
    finally:
        for member in members:
            member.kill()


async def test_a_member_killed_mid_generation_ends_in_a_clear_error(
    boot: Daemon, tmp_path: Path
) -> None:
    """The only server of shoal-tiny is a group of 3; its last member is killed after 8
    tokens: the leader's step fails, it withdraws its span, and the client's generation
    ends with a routing error naming the missing blocks within its route timeout."""
    members = start_group(tmp_path, boot, TINY, "0:8", "tiny-kill", [1.0, 1.0, 1.0])
    route_timeout = 4.0
    expected = reference(TINY, PROMPT, 64)
    tokens: list[int] = []
    try:
        async with open_client(
            [boot.addr], chain=ChainConfig(route_timeout=30, step_timeout=20)
        ) as swarm:
            assert [
                t async for t in swarm.generate_tokens(PROMPT, max_new_tokens=1, stop_ids=())
            ] == expected[:1]
        async with open_client(
            [boot.addr], chain=ChainConfig(route_timeout=route_timeout, step_timeout=20)
        ) as swarm:
            with pytest.raises(SwarmError) as caught:
                async for token in swarm.generate_tokens(PROMPT, max_new_tokens=64, stop_ids=()):
                    tokens.append(token)
                    if len(tokens) == 8:
                        members[2].kill()  # SIGKILL
                        started = time.monotonic()
            waited = time.monotonic() - started
        assert tokens == expected[: len(tokens)] and 8 <= len(tokens) < 64
        assert "shoal-tiny" in str(caught.value)
        assert waited < route_timeout + 20  # bounded: no hang
        info = members[0].status()["tp_group"]
        assert info["broken"] is not None and members[2].peer_id in info["broken"]
        assert members[1].process is not None and members[1].process.poll() is None
    finally:
        for member in members:
            member.kill()
