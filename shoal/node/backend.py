"""What the OpenAI-compatible API generates with: the :class:`GenerationBackend` protocol.

The HTTP layer (``openai_api.py``) knows nothing about where the model runs. It asks a
backend for the models it serves (:class:`ModelInfo`), their tokenizers and chat templates,
and opens generations: ``async with backend.open_generation(request) as pieces:`` then
``async for piece in pieces`` yields one :class:`Piece` per generated token, the last one
carrying the finish reason. Entering the context is where a backend refuses a request
(:class:`UnknownModel`, :class:`PromptTooLong`, :class:`MaxTokensTooLarge`, :class:`Busy`),
so the API can still answer with an HTTP error before it commits to a status line.

:class:`LocalBackend` runs a whole model in this process with ``shoal.pipeline`` (tests, a
single node); a swarm backend routes the same requests along a chain of servers. Both share
:class:`TextStream` (token ids -> text, cut at stop strings) and :func:`check_request`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import trio

from shoal.errors import Error
from shoal.kernels.sampling import SamplingParams
from shoal.node.errors import NodeError
from shoal.pipeline.generate import generate
from shoal.pipeline.loading import load_span, load_tokenizer, open_checkpoint
from shoal.pipeline.model import DecoderSpan
from shoal.pipeline.tokenizer import StreamDecoder, TextTokenizer

FinishReason = Literal["stop", "length"]

#: A fallback chat format for models without a chat template (shoal-tiny has none): the
#: play-script layout "ROLE:\ntext\n\n", which a model trained on plays continues sensibly.
FALLBACK_CHAT_ROLE = "{role}:\n{content}\n\n"


class BackendError(NodeError):
    """Base class of the errors a generation backend raises on purpose."""


class UnknownModel(BackendError):
    def __init__(self, model: str, available: Sequence[str]) -> None:
        super().__init__(
            f"the model {model!r} does not exist; served here: {', '.join(available) or '(none)'}"
        )
        self.model = model
        self.available = tuple(available)


class InvalidRequest(BackendError):
    """A request a model cannot run as asked (empty prompt, token id out of range, ...)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLong(BackendError):
    def __init__(self, model: str, prompt_tokens: int, max_context: int) -> None:
        super().__init__(
            f"the prompt has {prompt_tokens} tokens; {model}'s context is {max_context} tokens"
        )
        self.model, self.prompt_tokens, self.max_context = model, prompt_tokens, max_context


class MaxTokensTooLarge(BackendError):
    """max_tokens is over the backend's limit, or the prompt plus it overflow the context."""

    def __init__(
        self, model: str, requested: int, limit: int, prompt_tokens: int, *, context_bound: bool
    ) -> None:
        why = (
            f"{model}'s context leaves room for {limit} after a prompt of {prompt_tokens} tokens"
            if context_bound
            else f"{model} generates at most {limit} tokens per request"
        )
        super().__init__(f"max_tokens is {requested}, too many: {why}")
        self.model, self.requested, self.limit = model, requested, limit
        self.prompt_tokens, self.context_bound = prompt_tokens, context_bound


class Busy(BackendError):
    """Every generation slot is taken and the wait queue is full (or waiting timed out)."""

    def __init__(self, model: str, retry_after: float) -> None:
        super().__init__(f"{model} is busy: every generation slot is taken; retry shortly")
        self.model, self.retry_after = model, retry_after


class GenerationFailed(BackendError):
    """Generation broke after it started (a server of the chain died, a kernel failed)."""

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"generation with {model} failed: {reason}")
        self.model, self.reason = model, reason


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """A served model as the API describes it.

    max_context: prompt plus completion tokens one request may hold.
    max_new_tokens: the most tokens one request may ask for (also bounded by the context).
    vocab_size: token ids a prompt may contain are ``0 <= id < vocab_size``.
    """

    id: str
    created: int
    owned_by: str
    max_context: int
    max_new_tokens: int
    vocab_size: int


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One generation. ``prompt`` is token ids, or text the backend encodes itself.

    temperature 0 is greedy (deterministic); ``seed`` makes sampling reproducible.
    ``stop``: strings that end the completion; the text returned stops before them.
    """

    model: str
    prompt: str | Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Piece:
    """One generated token and the text it completes (possibly empty: a partial character,
    text held back while it may begin a stop string, a special token). The last piece of a
    generation has a ``finish_reason``."""

    token: int
    text: str
    finish_reason: FinishReason | None = None


class GenerationBackend(Protocol):
    """Where the API's generations run (this process, or a chain of swarm servers)."""

    def models(self) -> Sequence[ModelInfo]: ...

    def model(self, model_id: str) -> ModelInfo:
        """The served model ``model_id``; raises :class:`UnknownModel`."""
        ...

    def tokenizer(self, model_id: str) -> TextTokenizer:
        """``model_id``'s tokenizer (with its chat template); raises :class:`UnknownModel`."""
        ...

    def open_generation(
        self, request: GenerationRequest
    ) -> AbstractAsyncContextManager[AsyncIterator[Piece]]:
        """Start a generation; entering raises the typed errors above, never after a piece."""
        ...


def check_request(info: ModelInfo, prompt: Sequence[int], max_new_tokens: int) -> None:
    """Raise the typed error for a prompt/max_new_tokens ``info``'s model cannot run."""
    if not prompt:
        raise InvalidRequest("the prompt has no tokens", param="prompt")
    bad = next((t for t in prompt if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(
            f"token id {bad} is outside {info.id}'s vocabulary [0, {info.vocab_size})",
            param="prompt",
        )
    if len(prompt) > info.max_context:
        raise PromptTooLong(info.id, len(prompt), info.max_context)
    if max_new_tokens < 1:
        raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
    room = info.max_context - len(prompt)
    if max_new_tokens > min(info.max_new_tokens, room):
        raise MaxTokensTooLarge(
            info.id,
            max_new_tokens,
            min(info.max_new_tokens, room),
            len(prompt),
            context_bound=room < info.max_new_tokens,
        )


def chat_prompt(tokenizer: TextTokenizer, messages: list[dict[str, str]]) -> str:
    """``messages`` rendered with the model's chat template, or :data:`FALLBACK_CHAT_ROLE`
    per message plus ``ASSISTANT:\\n`` when the model has none."""
    if tokenizer.chat_template is not None:
        return tokenizer.render_chat(messages)
    turns = (
        FALLBACK_CHAT_ROLE.format(role=m["role"].upper(), content=m["content"]) for m in messages
    )
    return "".join(turns) + "ASSISTANT:\n"


class TextStream:
    """Token ids -> text pieces: never splits a UTF-8 character, holds back text that may
    begin a stop string, and ends the text right before the first stop string."""

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()) -> None:
        if any(not s for s in stop):
            raise ValueError("a stop string is empty")
        self._tokenizer = tokenizer
        self._decoder = StreamDecoder(tokenizer)
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._decoded = 0  # characters the decoder has returned
        self._held = ""  # decoded but not yet returned
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text now safe to show. Sets ``stopped`` on a stop string."""
        if self.stopped:
            return ""
        self._ids.append(token)
        piece = self._decoder.push(token)
        self._decoded += len(piece)
        self._held += piece
        hits = [i for i in (self._held.find(s) for s in self._stop) if i >= 0]
        if hits:
            out, self._held, self.stopped = self._held[: min(hits)], "", True
            return out
        keep = self._partial_stop_length()
        out, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        return out

    def flush(self) -> str:
        """The end of generation without a stop string: the held text and any partial
        character (as U+FFFD)."""
        if self.stopped:
            return ""
        tail = self._tokenizer.decode(self._ids)[self._decoded :]
        out, self._held = self._held + tail, ""
        return out

    def _partial_stop_length(self) -> int:
        """Length of the longest suffix of the held text that is a prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._held)), longest, -1):
                if self._held.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class LocalBackend:
    """One model run in this process by ``shoal.pipeline.generate``.

    At most ``max_sessions`` generations hold a KV cache at once; their token steps take
    turns on one compute thread (``trio.to_thread.run_sync``), so the event loop keeps
    serving. Up to ``max_waiting`` more requests wait at most ``max_wait`` seconds for a
    slot; past either, :class:`Busy`. Its locks are trio's: use it from one trio run.
    """

    def __init__(
        self,
        model_id: str,
        weights: DecoderSpan,
        tokenizer: TextTokenizer,
        *,
        max_new_tokens: int | None = None,
        max_sessions: int = 4,
        max_waiting: int = 16,
        max_wait: float = 30.0,
        owned_by: str = "shoal",
    ) -> None:
        if weights.embed_tokens is None or weights.lm_head is None:
            raise ValueError("LocalBackend needs the whole model (embedding to head)")
        if max_sessions < 1 or max_waiting < 0 or max_wait < 0:
            raise ValueError("max_sessions must be >= 1, max_waiting and max_wait >= 0")
        context = weights.config.max_position_embeddings
        self.info = ModelInfo(
            id=model_id,
            created=int(time.time()),
            owned_by=owned_by,
            max_context=context,
            max_new_tokens=context if max_new_tokens is None else max_new_tokens,
            vocab_size=weights.config.vocab_size,
        )
        self._weights = weights
        self._tokenizer = tokenizer
        self._slots = trio.Semaphore(max_sessions)
        self._compute = trio.CapacityLimiter(1)
        self._waiting = 0
        self._max_waiting = max_waiting
        self._max_wait = max_wait

    @classmethod
    def load(
        cls,
        model: str | Path,
        *,
        model_id: str | None = None,
        dtype: str = "fp32",
        quantize: str | None = None,
        max_new_tokens: int | None = None,
        max_sessions: int = 4,
        max_waiting: int = 16,
        max_wait: float = 30.0,
    ) -> LocalBackend:
        """Load ``model`` (a directory or built-in name) whole; blocking, so call it before
        the event loop runs or through ``trio.to_thread.run_sync``. The model id defaults
        to ``model`` as given; the limits are :class:`LocalBackend`'s."""
        checkpoint = open_checkpoint(model)
        weights = load_span(checkpoint, dtype=dtype, quantize=quantize)
        return cls(
            model_id or str(model),
            weights,
            load_tokenizer(checkpoint),
            max_new_tokens=max_new_tokens,
            max_sessions=max_sessions,
            max_waiting=max_waiting,
            max_wait=max_wait,
        )

    def models(self) -> Sequence[ModelInfo]:
        return [self.info]

    def model(self, model_id: str) -> ModelInfo:
        if model_id != self.info.id:
            raise UnknownModel(model_id, [self.info.id])
        return self.info

    def tokenizer(self, model_id: str) -> TextTokenizer:
        self.model(model_id)
        return self._tokenizer

    @asynccontextmanager
    async def open_generation(
        self, request: GenerationRequest
    ) -> AsyncIterator[AsyncIterator[Piece]]:
        info = self.model(request.model)
        prompt = (
            self._tokenizer.encode(request.prompt)
            if isinstance(request.prompt, str)
            else list(request.prompt)
        )
        check_request(info, prompt, request.max_new_tokens)
        sampling = SamplingParams(
            temperature=request.temperature, top_p=request.top_p, seed=request.seed
        )
        async with self._slot():
            tokens = generate(
                self._weights,
                prompt,
                max_new_tokens=request.max_new_tokens,
                sampling=sampling,
                stop_ids=self._tokenizer.eos_ids,
            )
            try:
                yield _LocalPieces(
                    info.id,
                    tokens,
                    TextStream(self._tokenizer, request.stop),
                    eos_ids=self._tokenizer.eos_ids,
                    max_new_tokens=request.max_new_tokens,
                    limiter=self._compute,
                )
            finally:
                if isinstance(tokens, Generator):  # releases the KV cache now, not at GC
                    tokens.close()

    @asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        if self._slots.value == 0 and self._waiting >= self._max_waiting:
            raise Busy(self.info.id, retry_after=1.0)
        self._waiting += 1
        try:
            with trio.move_on_after(self._max_wait) as waited:
                await self._slots.acquire()
        finally:
            self._waiting -= 1
        if waited.cancelled_caught:
            raise Busy(self.info.id, retry_after=1.0)
        try:
            yield
        finally:
            self._slots.release()


class PieceMaker:
    """Token ids -> :class:`Piece` objects: the text they complete, and the finish reason
    (a stop string, an end-of-sequence token, or the token budget spent)."""

    def __init__(self, text: TextStream, *, eos_ids: tuple[int, ...], max_new_tokens: int) -> None:
        self._text = text
        self._eos_ids = eos_ids
        self._max_new_tokens = max_new_tokens
        self._count = 0

    def piece(self, token: int) -> Piece:
        self._count += 1
        text = self._text.push(token)
        finish: FinishReason | None = None
        if self._text.stopped or token in self._eos_ids:
            finish = "stop"
        elif self._count >= self._max_new_tokens:
            finish = "length"
        if finish is not None:
            text += self._text.flush()
        return Piece(token, text, finish)


class _LocalPieces:
    """Steps a ``generate()`` iterator on a worker thread, one token per ``__anext__``.

    A class, not an async generator: an abandoned async generator is finalized by the
    garbage collector, outside the generation's context.
    """

    def __init__(
        self,
        model: str,
        tokens: Iterator[int],
        text: TextStream,
        *,
        eos_ids: tuple[int, ...],
        max_new_tokens: int,
        limiter: trio.CapacityLimiter,
    ) -> None:
        self._model = model
        self._tokens = tokens
        self._pieces = PieceMaker(text, eos_ids=eos_ids, max_new_tokens=max_new_tokens)
        self._limiter = limiter
        self._done = False

    def __aiter__(self) -> _LocalPieces:
        return self

    async def __anext__(self) -> Piece:
        if self._done:
            raise StopAsyncIteration
        return await trio.to_thread.run_sync(self._step, limiter=self._limiter)

    def _step(self) -> Piece:
        try:
            token = next(self._tokens)  # prefill on the first call, one decode step after
        except Error as exc:
            self._done = True
            raise GenerationFailed(self._model, str(exc)) from exc
        piece = self._pieces.piece(token)
        self._done = piece.finish_reason is not None
        return piece
