"""The OpenAI-compatible API, served for real by hypercorn's trio worker on loopback and
called with the official ``openai`` client: output parity with single-process generation,
streaming, usage counts, every bad-input case, auth, busy, disconnects, concurrency.

Each server runs in its own thread with its own trio loop (as a node's would), so the test
can use the blocking client; the concurrency test uses the async client under trio.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import Any

import httpx
import openai
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from shoal.kernels.sampling import SamplingParams
from shoal.node.backend import (
    Busy,
    GenerationBackend,
    GenerationFailed,
    GenerationRequest,
    LocalBackend,
    MaxTokensTooLarge,
    ModelInfo,
    Piece,
    PromptTooLong,
    TextStream,
    UnknownModel,
    chat_prompt,
)
from shoal.node.openai_api import openai_app
from shoal.pipeline.generate import generate
from shoal.pipeline.loading import DEFAULT_MODEL, load_span, load_tokenizer
from shoal.pipeline.model import DecoderSpan
from shoal.pipeline.tokenizer import TextTokenizer

MODEL = DEFAULT_MODEL  # shoal-tiny: byte-level tokenizer, 256-token context
PROMPTS = ("ROMEO:\n", "KING HENRY VI:\nWhat")
KEY = "sekrit-key"


# --- serving -------------------------------------------------------------------------------


@contextmanager
def serving(backend: GenerationBackend, *, api_key: str | None = None) -> Iterator[str]:
    """Serve ``openai_app(backend)`` on 127.0.0.1:<random> in a thread; yields the base URL."""
    app = openai_app(backend, api_key=api_key)
    ready: dict[str, Any] = {}
    started = threading.Event()

    async def main() -> None:
        config = HypercornConfig()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.errorlog = logging.getLogger("test.http")
        config.graceful_timeout = 1.0
        stop = trio.Event()
        ready["token"], ready["stop"] = trio.lowlevel.current_trio_token(), stop
        async with trio.open_nursery() as nursery:

            async def run(*, task_status: Any) -> None:
                await serve(app, config, shutdown_trigger=stop.wait, task_status=task_status)

            urls = await nursery.start(run)
            ready["url"] = urls[0]
            started.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert started.wait(30), "the server did not start"
    try:
        yield ready["url"]
    finally:
        trio.from_thread.run_sync(ready["stop"].set, trio_token=ready["token"])
        thread.join(10)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def weights() -> DecoderSpan:
    return load_span(MODEL)


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def url(weights: DecoderSpan, tokenizer: TextTokenizer) -> Iterator[str]:
    with serving(LocalBackend(MODEL, weights, tokenizer)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def reference(
    weights: DecoderSpan,
    tokenizer: TextTokenizer,
    prompt: str | list[int],
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
) -> list[int]:
    """shoal.pipeline's single-process generation: what the API must reproduce."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    return list(
        generate(
            weights,
            ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_ids=tokenizer.eos_ids,
        )
    )


def token_ids(tokenizer: TextTokenizer, text: str) -> list[int]:
    """The ids of ``text`` without the bos (shoal-tiny's byte-level encoding is exact)."""
    return tokenizer.encode(text)[1:]


def assert_good_request(client: openai.OpenAI, weights: DecoderSpan, tok: TextTokenizer) -> None:
    """The server still answers correctly (after a refused request)."""
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    expected = reference(weights, tok, PROMPTS[0], 12)
    assert token_ids(tok, out.choices[0].text) == expected


# --- models --------------------------------------------------------------------------------


def test_models_list_and_retrieve(client: openai.OpenAI, weights: DecoderSpan) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model" and models.data[0].owned_by == "shoal"
    extra = models.data[0].model_extra or {}
    assert extra["max_context"] == weights.config.max_position_embeddings == 256
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.code == "model_not_found"


# --- completions ---------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_pipeline_generation(
    client: openai.OpenAI, weights: DecoderSpan, tokenizer: TextTokenizer, prompt: str
) -> None:
    expected = reference(weights, tokenizer, prompt, 64)
    assert len(expected) == 64 and not set(expected) & set(tokenizer.eos_ids)
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=64, temperature=0)
    choice = out.choices[0]
    assert token_ids(tokenizer, choice.text) == expected
    assert choice.text == tokenizer.decode(expected)
    assert choice.finish_reason == "length" and choice.index == 0
    assert out.object == "text_completion" and out.model == MODEL
    assert out.usage is not None
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert out.usage.completion_tokens == 64
    assert out.usage.total_tokens == out.usage.prompt_tokens + 64
    # greedy is deterministic: a second run gives the same text
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=64, temperature=0)
    assert again.choices[0].text == choice.text


def test_streamed_completion_equals_pipeline_generation(
    client: openai.OpenAI, weights: DecoderSpan, tokenizer: TextTokenizer
) -> None:
    expected = reference(weights, tokenizer, PROMPTS[1], 40)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt=PROMPTS[1],
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].text for c in text_chunks)
    assert token_ids(tokenizer, text) == expected
    assert len(text_chunks) > 1  # streamed, not sent whole
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    usage = chunks[-1].usage  # include_usage: a last chunk with no choices and the usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(tokenizer.encode(PROMPTS[1])), 40)


def test_token_id_prompt_and_echo(
    client: openai.OpenAI, weights: DecoderSpan, tokenizer: TextTokenizer
) -> None:
    ids = tokenizer.encode(PROMPTS[0])
    expected = reference(weights, tokenizer, ids, 20)
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0)
    assert token_ids(tokenizer, out.choices[0].text) == expected
    assert out.usage is not None and out.usage.prompt_tokens == len(ids)
    echoed = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPTS[0] + tokenizer.decode(expected)
    streamed = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=20, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text


def test_default_max_tokens_is_16(
    client: openai.OpenAI, weights: DecoderSpan, tokenizer: TextTokenizer
) -> None:
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], temperature=0)
    assert token_ids(tokenizer, out.choices[0].text) == reference(
        weights, tokenizer, PROMPTS[0], 16
    )
    assert out.usage is not None and out.usage.completion_tokens == 16


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_text(
    client: openai.OpenAI, weights: DecoderSpan, tokenizer: TextTokenizer, stream: bool
) -> None:
    full = reference(weights, tokenizer, PROMPTS[0], 64)
    full_text = tokenizer.decode(full)
    stop = "the"
    assert stop in full_text
    # the stop string completes at the k-th token; the text ends right before it
    k = next(n for n in range(1, 65) if stop in tokenizer.decode(full[:n]))
    expected_text = full_text[: full_text.index(stop)]
    kwargs: dict[str, Any] = dict(
        model=MODEL, prompt=PROMPTS[0], max_tokens=64, temperature=0, stop=[stop, "zzz"]
    )
    if stream:
        chunks = list(
            client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        usage = chunks[-1].usage
    else:
        out = client.completions.create(**kwargs)
        text, finish, usage = out.choices[0].text, out.choices[0].finish_reason, out.usage
    assert text == expected_text and finish == "stop"
    assert usage is not None and usage.completion_tokens == k


def test_seeded_sampling_equals_pipeline_sampling(
    client: openai.OpenAI, weights: DecoderSpan, tokenizer: TextTokenizer
) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=1234)
    expected = reference(weights, tokenizer, PROMPTS[0], 48, params)
    texts = [
        client.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=48, temperature=0.9, top_p=0.9, seed=1234
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert token_ids(tokenizer, texts[0]) == expected
    assert texts[1] == texts[0]
    other = reference(weights, tokenizer, PROMPTS[0], 48, SamplingParams(temperature=0.9, seed=1))
    assert other != expected  # the seed matters, so the equality above means something


# --- chat ----------------------------------------------------------------------------------


def test_fallback_chat_format() -> None:
    tok = load_tokenizer(MODEL)
    assert tok.chat_template is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat_prompt(tok, messages) == "SYSTEM:\nBe brief.\n\nUSER:\nHi\n\nASSISTANT:\n"


def test_chat_greedy_equals_pipeline_generation(
    client: openai.OpenAI, weights: DecoderSpan, tokenizer: TextTokenizer
) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "A play."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Who art "}, {"type": "text", "text": "thou?"}],
        },
    ]
    prompt = "SYSTEM:\nA play.\n\nUSER:\nWho art thou?\n\nASSISTANT:\n"
    expected = reference(weights, tokenizer, prompt, 40)
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=40, temperature=0
    )
    assert out.object == "chat.completion"
    message = out.choices[0].message
    assert message.role == "assistant"
    assert token_ids(tokenizer, message.content or "") == expected
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (
        len(tokenizer.encode(prompt)),
        40,
    )

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and finishes.count("length") == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 40


TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}"
    "{{ raise_exception('the first message must come from the user') }}{% endif %}"
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_chat_uses_the_model_chat_template(weights: DecoderSpan, tokenizer: TextTokenizer) -> None:
    templated = TextTokenizer(
        tokenizer.tokenizer,
        bos_id=tokenizer.bos_id,
        eos_ids=tokenizer.eos_ids,
        chat_template=TEMPLATE,
    )
    messages = [{"role": "user", "content": "Speak."}]
    rendered = "<user>Speak.</user>\n<assistant>"
    assert chat_prompt(templated, messages) == rendered
    expected = reference(weights, templated, rendered, 24)
    with (
        serving(LocalBackend(MODEL, weights, templated)) as base,
        openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as c,
    ):
        out = c.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=0
        )
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(
                model=MODEL, messages=[{"role": "assistant", "content": "Hark."}], max_tokens=4
            )
    assert token_ids(tokenizer, out.choices[0].message.content or "") == expected
    assert out.usage is not None and out.usage.prompt_tokens == len(templated.encode(rendered))
    assert err.value.param == "messages" and "the first message must come from" in err.value.message


# --- bad input -----------------------------------------------------------------------------


LONG = "x" * 300  # 301 tokens with the bos: over shoal-tiny's 256


@pytest.mark.parametrize(
    ("kwargs", "status", "param", "code"),
    [
        (dict(prompt=LONG), 400, "prompt", "context_length_exceeded"),
        (dict(model="gpt-4o"), 404, "model", "model_not_found"),
        (dict(max_tokens=10_000), 400, "max_tokens", "context_length_exceeded"),
        (dict(prompt="y" * 200, max_tokens=100), 400, "max_tokens", "context_length_exceeded"),
        (dict(max_tokens=0), 400, "max_tokens", "invalid_value"),
        (dict(temperature=2.5), 400, "temperature", "invalid_value"),
        (dict(top_p=0), 400, "top_p", "invalid_value"),
        (dict(n=2), 400, "n", None),
        (dict(stop=["a", "b", "c", "d", "e"]), 400, "stop", "invalid_value"),
        (dict(prompt=[1, 2, 999]), 400, "prompt", None),
        (dict(prompt=["one", "two"]), 400, "prompt", "invalid_value"),
        (dict(logprobs=2), 400, "logprobs", None),
        (dict(extra_body={"frobnicate": 1}), 400, "frobnicate", None),
        (dict(extra_body={"max_tokens": True}), 400, "max_tokens", "invalid_value"),
    ],
)
def test_bad_completion_requests_get_openai_errors(
    client: openai.OpenAI,
    weights: DecoderSpan,
    tokenizer: TextTokenizer,
    kwargs: dict[str, Any],
    status: int,
    param: str,
    code: str | None,
) -> None:
    request: dict[str, Any] = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    request.update(kwargs)
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(**request)
    assert err.value.status_code == status
    body = err.value.body
    assert isinstance(body, dict)
    assert body["type"] == "invalid_request_error"
    assert body["param"] == param and body["code"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert_good_request(client, weights, tokenizer)


@pytest.mark.parametrize(
    ("kwargs", "param", "code"),
    [
        (dict(messages=[{"role": "user", "content": LONG}]), "messages", "context_length_exceeded"),
        (dict(messages=[]), "messages", "invalid_value"),
        (dict(messages=[{"role": "tool", "content": "x"}]), "messages[0].role", "invalid_value"),
        (
            dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
            "messages[0].content",
            "invalid_value",
        ),
        (dict(max_completion_tokens=300), "max_completion_tokens", "context_length_exceeded"),
        (
            dict(tools=[{"type": "function", "function": {"name": "f"}}]),
            "tools",
            None,
        ),
        (dict(stream_options={"include_usage": True}), "stream_options", "invalid_value"),
    ],
)
def test_bad_chat_requests_get_openai_errors(
    client: openai.OpenAI,
    weights: DecoderSpan,
    tokenizer: TextTokenizer,
    kwargs: dict[str, Any],
    param: str,
    code: str | None,
) -> None:
    request: dict[str, Any] = dict(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0
    )
    request.update(kwargs)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**request)
    assert err.value.status_code == 400
    body = err.value.body
    assert isinstance(body, dict)
    assert body["type"] == "invalid_request_error"
    assert (body["param"], body["code"]) == (param, code)
    assert_good_request(client, weights, tokenizer)


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b'{"model": "shoal-tiny", "prompt": "x",', 400),  # cut short
        (b"not json", 400),
        (b"\xff\xfe\x00", 400),  # not UTF-8
        (b'["model", "prompt"]', 400),  # JSON, not an object
        (b"[" * 100_000 + b"]" * 100_000, 400),  # nesting past the recursion limit
        (b'{"model": "shoal-tiny", "prompt": "x", "temperature": NaN}', 400),
        (b'{"model": "shoal-tiny", "prompt": "\\ud800"}', 400),  # a lone surrogate
        (b" " * (2**20 + 1), 413),  # over the body limit
    ],
)
def test_malformed_bodies_get_400(
    url: str,
    client: openai.OpenAI,
    weights: DecoderSpan,
    tokenizer: TextTokenizer,
    content: bytes,
    status: int,
) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        response = httpx.post(
            f"{url}{path}", content=content, headers={"content-type": "application/json"}
        )
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
    assert_good_request(client, weights, tokenizer)


def test_api_key_is_required_when_set(weights: DecoderSpan, tokenizer: TextTokenizer) -> None:
    with serving(LocalBackend(MODEL, weights, tokenizer), api_key=KEY) as base:
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
        for headers in ({}, {"authorization": "Basic abc"}, {"authorization": "Bearer"}):
            response = httpx.post(f"{base}/v1/completions", json=body, headers=headers)
            assert response.status_code == 401
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{base}/v1/models").status_code == 401
        with openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError) as err:
                wrong.completions.create(model=MODEL, prompt="x", max_tokens=2)
            assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                wrong.models.list()
        with openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0) as right:
            assert [m.id for m in right.models.list().data] == [MODEL]
            assert_good_request(right, weights, tokenizer)


class Failing:
    """A backend over a LocalBackend whose generations break after ``after`` pieces."""

    def __init__(self, inner: LocalBackend, after: int) -> None:
        self.inner, self.after = inner, after

    def models(self) -> Sequence[ModelInfo]:
        return self.inner.models()

    def model(self, model_id: str) -> ModelInfo:
        return self.inner.model(model_id)

    def tokenizer(self, model_id: str) -> TextTokenizer:
        return self.inner.tokenizer(model_id)

    @asynccontextmanager
    async def _open(self, request: GenerationRequest) -> AsyncIterator[AsyncIterator[Piece]]:
        async with self.inner.open_generation(request) as pieces:
            yield self._pieces(pieces)

    def open_generation(
        self, request: GenerationRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[Piece]]:
        return self._open(request)

    def _pieces(self, pieces: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
        after = self.after

        class Breaking:
            count = 0

            def __aiter__(self) -> Breaking:
                return self

            async def __anext__(self) -> Piece:
                if self.count == after:
                    raise GenerationFailed(MODEL, "the server of blocks 3:6 reset the stream")
                self.count += 1
                return await pieces.__anext__()

        return Breaking()


def test_generation_limit_and_failures(weights: DecoderSpan, tokenizer: TextTokenizer) -> None:
    backend = Failing(LocalBackend(MODEL, weights, tokenizer, max_new_tokens=20), after=3)
    with (
        serving(backend) as base,
        openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as c,
    ):
        assert (c.models.list().data[0].model_extra or {})["max_new_tokens"] == 20
        with pytest.raises(openai.BadRequestError) as err:
            c.completions.create(model=MODEL, prompt="x", max_tokens=21)
        assert (err.value.param, err.value.code) == ("max_tokens", "max_tokens_exceeded")
        # a failure before the status line: 502; after it: an error event, no [DONE]
        with pytest.raises(openai.APIStatusError) as failed:
            c.completions.create(model=MODEL, prompt="x", max_tokens=10, temperature=0)
        assert failed.value.status_code == 502
        assert failed.value.code == "generation_failed"
        assert "blocks 3:6" in failed.value.message
        got: list[str] = []
        with pytest.raises(openai.APIError) as broken:
            for chunk in c.completions.create(
                model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True
            ):
                got.append(chunk.choices[0].text)
        assert "blocks 3:6" in broken.value.message
        expected = reference(weights, tokenizer, PROMPTS[0], 3)
        assert "".join(got) == tokenizer.decode(expected)  # the 3 pieces before the failure
        events = (
            httpx.post(
                f"{base}/v1/completions",
                json={"model": MODEL, "prompt": "x", "max_tokens": 10, "stream": True},
            )
            .text.strip()
            .split("\n\n")
        )
        assert json.loads(events[-1].removeprefix("data: "))["error"]["code"] == (
            "generation_failed"
        )
        assert "data: [DONE]" not in events


# --- busy, disconnects, concurrency --------------------------------------------------------


class Gated:
    """A backend over a LocalBackend whose generations stop after their first piece until
    ``release`` is set; records when a generation's context is left."""

    def __init__(self, inner: LocalBackend) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.entered = threading.Event()
        self.left = threading.Event()

    def models(self) -> Sequence[ModelInfo]:
        return self.inner.models()

    def model(self, model_id: str) -> ModelInfo:
        return self.inner.model(model_id)

    def tokenizer(self, model_id: str) -> TextTokenizer:
        return self.inner.tokenizer(model_id)

    def open_generation(
        self, request: GenerationRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[Piece]]:
        return self._open(request)

    @asynccontextmanager
    async def _open(self, request: GenerationRequest) -> AsyncIterator[AsyncIterator[Piece]]:
        async with self.inner.open_generation(request) as pieces:
            self.entered.set()
            try:
                yield self._gate(pieces)
            finally:
                self.left.set()

    def _gate(self, pieces: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
        release = self.release

        class GatedPieces:
            count = 0

            def __aiter__(self) -> GatedPieces:
                return self

            async def __anext__(self) -> Piece:
                if self.count >= 1:
                    await trio.to_thread.run_sync(release.wait, abandon_on_cancel=True)
                self.count += 1
                return await pieces.__anext__()

        return GatedPieces()


def test_busy_gets_503_and_a_disconnect_frees_the_slot(
    weights: DecoderSpan, tokenizer: TextTokenizer
) -> None:
    gated = Gated(LocalBackend(MODEL, weights, tokenizer, max_sessions=1, max_waiting=0))
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 30, "temperature": 0}
    try:
        with serving(gated) as base, httpx.Client(base_url=base) as http:
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as held:
                assert held.status_code == 200
                lines = held.iter_lines()  # kept: a dropped generator closes the connection
                first = next(lines)
                assert first.startswith("data: ") and json.loads(first[6:])["choices"]
                # the only slot is taken and nobody may wait: 503, OpenAI's error shape
                busy = http.post("/v1/completions", json=body)
                assert busy.status_code == 503
                assert busy.json()["error"]["type"] == "server_error"
                assert busy.json()["error"]["code"] == "overloaded"
                assert busy.headers["retry-after"] == "1"
                assert not gated.left.is_set()
            # the client went away mid-stream: the generation is cancelled, the slot freed
            assert gated.left.wait(10)
            gated.release.set()
            out = http.post("/v1/completions", json=body)
            assert out.status_code == 200
            expected = reference(weights, tokenizer, PROMPTS[0], 30)
            assert token_ids(tokenizer, out.json()["choices"][0]["text"]) == expected
    finally:
        gated.release.set()  # unblock the abandoned waiting thread in any case


async def test_concurrent_requests_all_get_correct_output(
    url: str, client: openai.OpenAI, weights: DecoderSpan, tokenizer: TextTokenizer
) -> None:
    # six at once, more than the four generation slots, so some wait for one. Streams go
    # through the blocking client on worker threads: under trio, the async client leaves
    # its SSE generators unclosed after [DONE] (a ResourceWarning, an error here).
    jobs = [(PROMPTS[i % 2], 24 + 4 * i, i % 3 == 0) for i in range(6)]
    expected = [tokenizer.decode(reference(weights, tokenizer, p, n)) for p, n, _ in jobs]
    results: list[str | None] = [None] * len(jobs)

    def streamed(prompt: str, n: int) -> str:
        events = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True
        )
        return "".join(e.choices[0].text for e in events)

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as c:

        async def one(i: int) -> None:
            prompt, n, stream = jobs[i]
            if stream:
                results[i] = await trio.to_thread.run_sync(streamed, prompt, n)
            else:
                out = await c.completions.create(
                    model=MODEL, prompt=prompt, max_tokens=n, temperature=0
                )
                results[i] = out.choices[0].text

        async with trio.open_nursery() as nursery:
            for i in range(len(jobs)):
                nursery.start_soon(one, i)
    assert results == expected


def test_chunked_body_over_the_limit_gets_413(
    url: str, client: openai.OpenAI, weights: DecoderSpan, tokenizer: TextTokenizer
) -> None:
    def chunks() -> Iterator[bytes]:  # no content-length: the limit applies while reading
        yield b'{"model": "shoal-tiny", "prompt": "'
        for _ in range(64):
            yield b"x" * 2**15
        yield b'"}'

    response = httpx.post(f"{url}/v1/completions", content=chunks())
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert_good_request(client, weights, tokenizer)


# --- the backend on its own ----------------------------------------------------------------


def test_text_stream_holds_back_and_cuts_at_stop_strings(tokenizer: TextTokenizer) -> None:
    def run(text: str, stop: Sequence[str]) -> tuple[list[str], bool]:
        stream = TextStream(tokenizer, stop)
        pieces = [stream.push(b) for b in text.encode()]
        if not stream.stopped:
            pieces.append(stream.flush())
        return pieces, stream.stopped

    pieces, stopped = run("abcXYdef", ["XYZ"])  # "XY" is held until "d" rules the stop out
    assert pieces == ["a", "b", "c", "", "", "XYd", "e", "f", ""] and not stopped
    pieces, stopped = run("ab\nEND more", ["\nEND", "zz"])
    assert "".join(pieces) == "ab" and stopped
    pieces, stopped = run("abX", ["XYZ"])  # a held partial stop comes out at the end
    assert pieces == ["a", "b", "", "X"] and not stopped
    pieces, stopped = run("é!", [])  # two bytes, one character: never split
    assert pieces == ["", "é", "!", ""]


async def test_local_backend_typed_refusals_and_eos(
    weights: DecoderSpan, tokenizer: TextTokenizer
) -> None:
    backend = LocalBackend(MODEL, weights, tokenizer, max_new_tokens=50)
    ids = tokenizer.encode(PROMPTS[0])
    cases: list[tuple[GenerationRequest, type[Exception]]] = [
        (GenerationRequest(model="nope", prompt=ids, max_new_tokens=4), UnknownModel),
        (GenerationRequest(model=MODEL, prompt=LONG, max_new_tokens=4), PromptTooLong),
        (GenerationRequest(model=MODEL, prompt=ids, max_new_tokens=51), MaxTokensTooLarge),
    ]
    for request, error in cases:
        with pytest.raises(error):
            async with backend.open_generation(request):
                pass
    # a token of the greedy continuation made an end-of-sequence id: finish "stop" on it
    free = reference(weights, tokenizer, ids, 20)
    eos = free[5]
    ended = TextTokenizer(tokenizer.tokenizer, bos_id=tokenizer.bos_id, eos_ids=(eos,))
    backend = LocalBackend(MODEL, weights, ended)
    request = GenerationRequest(model=MODEL, prompt=PROMPTS[0], max_new_tokens=20)
    async with backend.open_generation(request) as pieces:
        got = [piece async for piece in pieces]
    assert [p.token for p in got] == free[: free.index(eos) + 1]
    assert [p.finish_reason for p in got] == [None] * (len(got) - 1) + ["stop"]
    assert "".join(p.text for p in got) == tokenizer.decode(free[: free.index(eos) + 1])


async def test_local_backend_busy_when_the_queue_is_full(
    weights: DecoderSpan, tokenizer: TextTokenizer
) -> None:
    backend = LocalBackend(MODEL, weights, tokenizer, max_sessions=1, max_waiting=1, max_wait=0.5)
    request = GenerationRequest(model=MODEL, prompt=PROMPTS[0], max_new_tokens=4)
    outcomes: list[str] = []

    async def waiter() -> None:
        try:
            async with backend.open_generation(request):
                outcomes.append("ran")
        except Busy:
            outcomes.append("busy")

    async with backend.open_generation(request), trio.open_nursery() as nursery:
        nursery.start_soon(waiter)  # waits for the slot: the queue is now full
        await trio.sleep(0.1)
        with pytest.raises(Busy):
            async with backend.open_generation(request):
                pass
    # the waiter gave up after max_wait, as the slot stayed taken
    assert outcomes == ["busy"]
