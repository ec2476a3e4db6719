"""The OpenAI API's backend on a node: generations run along chains of swarm servers.

:class:`SwarmBackend` implements :class:`~shoal.node.backend.GenerationBackend` with the
node's :class:`~shoal.client.SwarmClient`. The models it lists are those the swarm state
registers (``models`` section) whose config and tokenizer a server has handed over;
:meth:`SwarmBackend.run` fetches them in the background, since the API's ``models()`` and
``tokenizer()`` are synchronous.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from shoal.client import SwarmClient
from shoal.errors import Error
from shoal.node.backend import (
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
    ModelInfo,
    Piece,
    PieceMaker,
    TextStream,
    UnknownModel,
    check_request,
)
from shoal.pipeline.chain import RemoteModel
from shoal.pipeline.errors import RequestRejected, SwarmError
from shoal.pipeline.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

REFRESH_SECONDS = 2.0


class SwarmBackend:
    """Generations for the API, through ``client``; ``registered()`` lists the model ids
    the swarm state knows (polled every :data:`REFRESH_SECONDS`)."""

    def __init__(self, client: SwarmClient, registered: Callable[[], Sequence[str]]) -> None:
        self.client = client
        self._registered = registered
        self._models: dict[str, tuple[ModelInfo, RemoteModel]] = {}
        self._failed: dict[str, float] = {}

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            for model_id in self._registered():
                if model_id not in self._models and self._failed.get(model_id, 0) <= time.time():
                    await self.learn(model_id)
            await trio.sleep(REFRESH_SECONDS)

    async def learn(self, model_id: str) -> None:
        try:
            remote = await self.client.model(model_id)
        except Error as exc:
            log.info("cannot learn model %s from the swarm yet: %s", model_id, exc)
            self._failed[model_id] = time.time() + 10.0
            return
        if remote.tokenizer is None:
            log.info("model %s has no tokenizer.json; the API cannot serve it", model_id)
            self._failed[model_id] = time.time() + 60.0
            return
        info = ModelInfo(
            id=model_id,
            created=int(time.time()),
            owned_by="shoal-swarm",
            max_context=remote.context,
            max_new_tokens=remote.context,
            vocab_size=remote.config.vocab_size,
        )
        self._models[model_id] = (info, remote)

    def models(self) -> Sequence[ModelInfo]:
        return [info for info, _ in sorted(self._models.values(), key=lambda m: m[0].id)]

    def model(self, model_id: str) -> ModelInfo:
        entry = self._models.get(model_id)
        if entry is None:
            raise UnknownModel(model_id, sorted(self._models))
        return entry[0]

    def tokenizer(self, model_id: str) -> TextTokenizer:
        self.model(model_id)
        tokenizer = self._models[model_id][1].tokenizer
        assert tokenizer is not None  # learn() keeps only models with one
        return tokenizer

    @asynccontextmanager
    async def open_generation(
        self, request: GenerationRequest
    ) -> AsyncIterator[AsyncIterator[Piece]]:
        info = self.model(request.model)
        tokenizer = self.tokenizer(request.model)
        prompt = (
            tokenizer.encode(request.prompt)
            if isinstance(request.prompt, str)
            else list(request.prompt)
        )
        check_request(info, prompt, request.max_new_tokens)
        tokens = self.client.generate_tokens(
            prompt,
            model=request.model,
            max_new_tokens=request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=None if request.seed is None else request.seed % 2**63,
        )
        pieces = _SwarmPieces(
            request.model,
            tokens,
            TextStream(tokenizer, request.stop),
            eos_ids=tokenizer.eos_ids,
            max_new_tokens=request.max_new_tokens,
        )
        try:
            # The route is planned on the first token: a swarm without servers for some
            # blocks is refused here, before the API commits to a status line.
            await pieces.prime()
            yield pieces
        finally:
            await tokens.aclose()


class _SwarmPieces:
    """Token ids from the chain -> :class:`Piece` objects, like the local backend's."""

    def __init__(
        self,
        model: str,
        tokens: AsyncIterator[int],
        text: TextStream,
        *,
        eos_ids: tuple[int, ...],
        max_new_tokens: int,
    ) -> None:
        self._model = model
        self._tokens = tokens
        self._pieces = PieceMaker(text, eos_ids=eos_ids, max_new_tokens=max_new_tokens)
        self._done = False
        self._first: int | None = None

    async def prime(self) -> None:
        self._first = await self._next_token()

    def __aiter__(self) -> _SwarmPieces:
        return self

    async def _next_token(self) -> int:
        try:
            return await self._tokens.__anext__()
        except RequestRejected as exc:
            self._done = True
            raise InvalidRequest(str(exc), param=exc.param) from exc
        except (SwarmError, Error) as exc:
            self._done = True
            raise GenerationFailed(self._model, str(exc)) from exc

    async def __anext__(self) -> Piece:
        if self._done:
            raise StopAsyncIteration
        if self._first is not None:
            token, self._first = self._first, None
        else:
            token = await self._next_token()
        piece = self._pieces.piece(token)
        self._done = piece.finish_reason is not None
        return piece
