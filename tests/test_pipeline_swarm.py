"""Generation across real `shoal node` processes on loopback: parity with one process,
8 clients at once, the OpenAI API on a node, bad input, and failover after kill -9."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import trio

from shoal.client import open_client
from shoal.pipeline.chain import ChainConfig
from shoal.pipeline.errors import ModelNotFound, NoRoute, RequestRejected
from shoal.pipeline.generate import generate
from shoal.pipeline.loading import load_span, load_tokenizer, open_checkpoint
from tests.daemons import Daemon, wait_for
from tests.models import save_hf_model

pytestmark = pytest.mark.slow

KEY = "test-key"
TINY = "shoal-tiny"
PROMPTS = ("ROMEO:", "JULIET:\nO", "KING HENRY:", "First Citizen:", "To be", "HAMLET:", "Ay", "Nay")


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_process() -> Iterator[None]:
    """Every daemon of these tests shares two cores: one torch thread each."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def start_all(daemons: Sequence[Daemon]) -> list[Daemon]:
    with ThreadPoolExecutor(len(daemons)) as pool:
        return list(pool.map(lambda d: d.start(), daemons))


def servers(tmp: Path, boot: Daemon, model: str, spans: Sequence[str], *extra: str) -> list[Daemon]:
    return [
        Daemon(tmp / f"{Path(model).name}-{span.replace(':', '_')}-{i}",
               ("--bootstrap", boot.addr, "--model", model, "--blocks", span, *extra))
        for i, span in enumerate(spans)
    ]  # fmt: skip


def stop_all(daemons: Sequence[Daemon]) -> None:
    for daemon in daemons:
        daemon.kill()


def reference(model: str | Path, prompt: list[int], n: int) -> list[int]:
    return list(generate(load_span(open_checkpoint(model)), prompt, max_new_tokens=n))


def encode(text: str) -> list[int]:
    return load_tokenizer(open_checkpoint(TINY)).encode(text)


async def swarm_tokens(
    boot: Daemon, prompt: list[int], n: int, model: str = TINY, **chain: float
) -> list[int]:
    async with open_client([boot.addr], chain=ChainConfig(**chain)) as swarm:
        return [
            t
            async for t in swarm.generate_tokens(prompt, model=model, max_new_tokens=n, stop_ids=())
        ]


@pytest.fixture(scope="module")
def tiny_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Daemon]]:
    """A bootstrap node (API key set) and three servers of shoal-tiny: 0:3, 3:6, 6:8."""
    tmp = tmp_path_factory.mktemp("swarm")
    made: list[Daemon] = []
    try:
        boot = Daemon(tmp / "boot", ("--api-key", KEY)).start()
        made.append(boot)
        made += start_all(servers(tmp, boot, TINY, ("0:3", "3:6", "6:8")))
        yield made
    finally:
        stop_all(made)


async def test_three_servers_generate_exactly_what_one_process_does(
    tiny_swarm: list[Daemon],
) -> None:
    prompt = encode("ROMEO:")
    assert await swarm_tokens(tiny_swarm[0], prompt, 64, route_timeout=30) == reference(
        TINY, prompt, 64
    )
    # every server ran its part: the steps were counted on each
    spans = {d.peer_id: d for d in tiny_swarm[1:]}
    assert len(spans) == 3


async def test_eight_clients_at_once_all_get_parity_correct_output(
    tiny_swarm: list[Daemon],
) -> None:
    boot = tiny_swarm[0]
    results: dict[str, list[int]] = {}

    async def one(text: str) -> None:
        results[text] = await swarm_tokens(boot, encode(text), 24, route_timeout=30)

    async with trio.open_nursery() as nursery:
        for text in PROMPTS:
            nursery.start_soon(one, text)
    for text in PROMPTS:
        assert results[text] == reference(TINY, encode(text), 24), text


async def test_client_bad_input_is_refused_clearly(tiny_swarm: list[Daemon]) -> None:
    boot = tiny_swarm[0]
    chain = ChainConfig(route_timeout=3, model_timeout=3)
    async with open_client([boot.addr], chain=chain) as swarm:
        with pytest.raises(RequestRejected, match="context is 256"):
            await anext(aiter(swarm.generate_tokens([65] * 300, max_new_tokens=4)))
        with pytest.raises(RequestRejected, match="context is 256"):
            await anext(aiter(swarm.generate_tokens([65] * 10, max_new_tokens=400)))
        with pytest.raises(RequestRejected, match="outside"):
            await anext(aiter(swarm.generate_tokens([100000], max_new_tokens=4)))
        started = time.monotonic()
        with pytest.raises(ModelNotFound, match="no-such-model"):
            await anext(aiter(swarm.generate("hi", model="no-such-model")))
        assert time.monotonic() - started < 10
        # the swarm still serves
        text = "".join([p async for p in swarm.generate("ROMEO:", max_new_tokens=16)])
    tokenizer = load_tokenizer(open_checkpoint(TINY))
    assert text == tokenizer.decode(reference(TINY, encode("ROMEO:"), 16))


def test_openai_api_on_a_node_generates_through_the_swarm(tiny_swarm: list[Daemon]) -> None:
    import openai

    boot = tiny_swarm[0]
    api = f"{boot.api}/v1"
    wait_for(
        lambda: TINY in httpx.get(f"{api}/models", headers=auth()).text,
        60,
        "the node learns shoal-tiny from the swarm",
        boot,
    )

    def post(body: str, headers: dict[str, str] | None = None) -> httpx.Response:
        headers = auth() if headers is None else headers
        return httpx.post(f"{api}/completions", content=body, headers=headers, timeout=60)

    good = {"model": TINY, "prompt": "ROMEO:", "max_tokens": 20, "temperature": 0}
    cases = [
        (post(json.dumps(good), {}), 401, "invalid_api_key"),
        (post("{not json", auth()), 400, None),
        (post(json.dumps(good | {"model": "nope"})), 404, "model_not_found"),
        (post(json.dumps(good | {"max_tokens": 1000})), 400, "context_length_exceeded"),
        (post(json.dumps(good | {"prompt": "x" * 400})), 400, "context_length_exceeded"),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code, response.text
    expected = load_tokenizer(open_checkpoint(TINY)).decode(reference(TINY, encode("ROMEO:"), 20))
    client = openai.OpenAI(base_url=api, api_key=KEY, max_retries=0)
    done = client.completions.create(model=TINY, prompt="ROMEO:", max_tokens=20, temperature=0)
    assert done.choices[0].text == expected
    assert done.choices[0].finish_reason == "length"
    stream = client.completions.create(
        model=TINY, prompt="ROMEO:", max_tokens=20, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
async def test_random_llama_and_qwen2_checkpoints_split_across_three_servers(
    family: str, tiny_swarm: list[Daemon], tmp_path: Path
) -> None:
    directory = tmp_path / f"tiny-{family}"
    save_hf_model(family, directory)
    made = start_all(servers(tmp_path, tiny_swarm[0], str(directory), ("0:1", "1:3", "3:4")))
    try:
        prompt = [1, 5, 17, 42, 9, 33]
        tokens = await swarm_tokens(
            tiny_swarm[0], prompt, 64, model=directory.name, route_timeout=30
        )
        assert tokens == reference(directory, prompt, 64)
    finally:
        stop_all(made)


async def test_kill_9_of_the_middle_server_fails_over_with_identical_tokens(
    tmp_path: Path,
) -> None:
    """Servers 0:3, 3:6 twice, 6:8. The middle server of the chain is killed mid-way
    through a 128-token generation: the other takes over, the tokens do not change. Then
    the other is killed too: a clear error naming blocks 3-5 within the route timeout."""
    route_timeout = 4.0
    boot = Daemon(tmp_path / "first", ("--model", TINY, "--blocks", "0:3")).start()
    rest = start_all(servers(tmp_path, boot, TINY, ("3:6", "3:6", "6:8")))
    made = [boot, *rest]
    by_peer = {d.peer_id: d for d in made}
    prompt = encode("ROMEO:")
    expected = reference(TINY, prompt, 128)
    try:  # the whole swarm announced (a client with a long route timeout gets a token)
        assert await swarm_tokens(boot, prompt, 1, route_timeout=60) == expected[:1]
        async with open_client(
            [boot.addr], chain=ChainConfig(route_timeout=route_timeout, step_timeout=20)
        ) as swarm:
            tokens: list[int] = []
            killed: list[str] = []
            stream = swarm.generate_tokens(prompt, max_new_tokens=128, stop_ids=())
            async for token in stream:
                tokens.append(token)
                if len(tokens) == 40:
                    middle = swarm.last_trace.route[1].peer
                    assert swarm.last_trace.route[1].start == 3
                    by_peer[middle].kill()  # SIGKILL
                    killed.append(middle)
            assert tokens == expected
            assert swarm.last_trace.failovers == 1
            survivor = swarm.last_trace.route[1].peer
            assert survivor != killed[0] and by_peer[survivor].args[-1] == "3:6"

            tokens = []
            with pytest.raises(NoRoute) as caught:
                async for token in swarm.generate_tokens(prompt, max_new_tokens=128, stop_ids=()):
                    tokens.append(token)
                    if len(tokens) == 10:
                        by_peer[survivor].kill()
                        started = time.monotonic()
            waited = time.monotonic() - started
            assert caught.value.missing == [3, 4, 5]
            assert "blocks 3-5 of shoal-tiny" in str(caught.value)
            assert survivor in caught.value.banned
            assert waited < route_timeout + 10  # the lookups' own timeouts bound the rest
            assert tokens == expected[:10]
    finally:
        stop_all(made)
        for daemon in made:
            assert daemon.process is not None and daemon.process.poll() is not None


def test_blocking_facade_and_chat_messages(tiny_swarm: list[Daemon]) -> None:
    import shoal
    from shoal.client import chat_text

    tokenizer = load_tokenizer(open_checkpoint(TINY))
    messages = [{"role": "user", "content": "Who art thou?"}]
    prompt = tokenizer.encode(chat_text(tokenizer, messages))
    expected = tokenizer.decode(reference(TINY, prompt, 24))
    with shoal.connect([tiny_swarm[0].addr]) as swarm:
        assert swarm.generate(messages, max_new_tokens=24) == expected
        assert "".join(swarm.stream("ROMEO:", max_new_tokens=8)) == tokenizer.decode(
            reference(TINY, encode("ROMEO:"), 8)
        )
