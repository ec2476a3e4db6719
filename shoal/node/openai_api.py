"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions.

``openai_routes(backend, api_key=...)`` returns starlette routes for any
:class:`~shoal.node.backend.GenerationBackend`; the daemon adds them to its app, and
``openai_app`` wraps them in an app of their own. Every request is checked in this order
before any generation work: bearer token, body size, JSON, each field's type and range,
the model, the prompt's length against the context. Errors use OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``; docs/api.md lists the mapping and
which fields are supported, ignored or refused.

A generation response is an ASGI callable rather than a starlette Response: it enters the
backend's generation context first, so a backend refusal (busy, prompt too long) still
gets an HTTP error status; then it streams server-sent events or sends one JSON body. It
watches for the client going away and cancels the generation when it does.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

import trio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from shoal.errors import Error
from shoal.node.backend import (
    BackendError,
    Busy,
    GenerationBackend,
    GenerationFailed,
    GenerationRequest,
    InvalidRequest,
    MaxTokensTooLarge,
    ModelInfo,
    Piece,
    PromptTooLong,
    UnknownModel,
    chat_prompt,
    check_request,
)
from shoal.node.errors import NodeError

log = logging.getLogger(__name__)

#: Largest request body accepted (bytes); larger ones get 413.
MAX_BODY_BYTES = 1 << 20
#: A body over the limit is still read (and dropped) up to this many times the limit, so
#: the client gets the 413 rather than a connection reset; past it, the 413 comes at once.
DRAIN_FACTOR = 8
#: OpenAI's limits on stop sequences (count); shoal also bounds their length.
MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_MESSAGES = 2048
#: OpenAI's default max_tokens for /v1/completions.
DEFAULT_COMPLETION_TOKENS = 16

ErrorType = Literal["invalid_request_error", "server_error"]


class ApiError(NodeError):
    """A request refused with an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: ErrorType = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def api_error(exc: BackendError, *, prompt_param: str, max_tokens_param: str) -> ApiError:
    """The HTTP error for a backend's typed refusal or failure."""
    if isinstance(exc, UnknownModel):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, MaxTokensTooLarge):
        code = "context_length_exceeded" if exc.context_bound else "max_tokens_exceeded"
        return ApiError(400, str(exc), param=max_tokens_param, code=code)
    if isinstance(exc, InvalidRequest):
        param = max_tokens_param if exc.param == "max_tokens" else exc.param
        return ApiError(400, str(exc), param=prompt_param if param == "prompt" else param)
    if isinstance(exc, Busy):
        retry = str(max(1, math.ceil(exc.retry_after)))
        return ApiError(
            503, str(exc), type="server_error", code="overloaded", headers={"Retry-After": retry}
        )
    if isinstance(exc, GenerationFailed):
        return ApiError(502, str(exc), type="server_error", code="generation_failed")
    return ApiError(500, str(exc), type="server_error")


# ---------------------------------------------------------------------------------------
# request parsing: each helper returns a checked value or raises ApiError(400, param=name)


def _invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


def _reject_unknown(body: dict[str, Any], known: frozenset[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(
            400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0]
        )


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > 1024:
        raise _invalid("model", "model must be a non-empty string (see GET /v1/models)")
    return model


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(name, f"{name} must be a number")
    if not low <= value <= high:
        raise _invalid(name, f"{name} must be between {low} and {high}, got {value}")
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(name, f"{name} must be an integer")
    if not low <= value <= high:
        raise _invalid(name, f"{name} must be between {low} and {high}, got {value}")
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(name, f"{name} must be true or false")
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise _invalid(
            "stop",
            f"stop must be a string or a list of at most {MAX_STOP} non-empty strings "
            f"of at most {MAX_STOP_CHARS} characters",
        )
    return tuple(stops)


def _only(body: dict[str, Any], name: str, allowed: Sequence[object], why: str) -> None:
    """Fields shoal accepts only at their neutral value (anything else would be ignored)."""
    value = body.get(name)
    if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
        raise ApiError(400, f"{name}={json.dumps(value)[:80]} is not supported: {why}", param=name)


@dataclass(frozen=True, kw_only=True)
class _Sampling:
    model: str
    max_tokens: int | None
    max_tokens_param: str
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


# fields both endpoints take, with their meaning in shoal
_SAMPLING_FIELDS = frozenset(
    {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options"}
)
# fields accepted only at their neutral value (see _only)
_NEUTRAL_FIELDS = frozenset({"n", "presence_penalty", "frequency_penalty", "logit_bias"})
# accepted and ignored: they change nothing about the output
_IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})


def _sampling(body: dict[str, Any], *, max_tokens_field: str = "max_tokens") -> _Sampling:
    model = _model(body)
    max_tokens = _integer(body, max_tokens_field, 1, 2**31 - 1)
    if max_tokens_field != "max_tokens":  # chat: max_completion_tokens wins over max_tokens
        legacy = _integer(body, "max_tokens", 1, 2**31 - 1)
        max_tokens_param = max_tokens_field if max_tokens is not None else "max_tokens"
        max_tokens = max_tokens if max_tokens is not None else legacy
    else:
        max_tokens_param = "max_tokens"
    seed = _integer(body, "seed", -(2**63), 2**64 - 1)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _invalid("stream_options", "stream_options is only allowed with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _invalid("stream_options", 'stream_options must be {"include_usage": bool}')
        include_usage = _flag(options, "include_usage")
    _only(body, "n", [1], "one choice per request")
    _only(body, "presence_penalty", [0, 0.0], "no presence penalty")
    _only(body, "frequency_penalty", [0, 0.0], "no frequency penalty")
    _only(body, "logit_bias", [{}], "no logit bias")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise _invalid("top_p", "top_p must be above 0 (use temperature 0 for greedy decoding)")
    return _Sampling(
        model=model,
        max_tokens=max_tokens,
        max_tokens_param=max_tokens_param,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=top_p,
        seed=None if seed is None else seed % 2**64,
        stop=_stop(body),
        stream=stream,
        include_usage=include_usage,
    )


def _prompt(body: dict[str, Any]) -> str | list[int]:
    """A completion prompt: a string or a list of token ids (or a list holding one of those)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        return prompt
    raise _invalid(
        "prompt",
        "prompt must be a string or a non-empty list of token ids "
        "(one prompt per request: a list of several prompts is not supported)",
    )


_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages as role/content strings; text content parts are joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise _invalid("messages", f"messages must be a list of 1 to {MAX_MESSAGES} messages")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _invalid(param, f"{param} must be an object with role and content")
        role = message.get("role")
        if role not in _CHAT_ROLES:
            raise _invalid(
                f"{param}.role",
                f"{param}.role must be one of {', '.join(_CHAT_ROLES)} (tools are not supported)",
            )
        for key, value in message.items():
            if key not in ("role", "content", "name") and value not in (None, [], ""):
                raise ApiError(
                    400,
                    f"{param}.{key} is not supported (no tools or audio)",
                    param=f"{param}.{key}",
                )
        out.append({"role": _CHAT_ROLES[role], "content": _content(message.get("content"), param)})
    return out


def _content(content: object, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise _invalid(
        f"{param}.content",
        f"{param}.content must be a string or a list of text parts (the model reads text only)",
    )


# ---------------------------------------------------------------------------------------
# responses


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class _Shape:
    """How one endpoint's objects look: a whole response and stream chunks."""

    def __init__(self, kind: Literal["completion", "chat"], model: str, echo: str = "") -> None:
        self.kind, self.model, self.echo = kind, model, echo
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.kind == "completion":
            choice = {
                "index": 0,
                "text": self.echo + text,
                "logprobs": None,
                "finish_reason": finish,
            }
            return {**self._envelope("text_completion"), "choices": [choice], "usage": usage}
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        return {**self._envelope("chat.completion"), "choices": [choice], "usage": usage}

    def chunk(self, text: str | None, finish: str | None, *, first: bool = False) -> dict[str, Any]:
        """A stream chunk: new text (None: none) and/or the finish reason."""
        if self.kind == "completion":
            choice = {
                "index": 0,
                "text": (self.echo if first else "") + (text or ""),
                "logprobs": None,
                "finish_reason": finish,
            }
            return {**self._envelope("text_completion"), "choices": [choice]}
        delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {**self._envelope("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        object_name = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        return {**self._envelope(object_name), "choices": [], "usage": usage}


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


class _Generation:
    """The ASGI response of one completion, streamed or whole."""

    def __init__(
        self,
        backend: GenerationBackend,
        request: GenerationRequest,
        shape: _Shape,
        *,
        prompt_tokens: int,
        sampling: _Sampling,
        prompt_param: str,
    ) -> None:
        self._backend, self._request, self._shape = backend, request, shape
        self._prompt_tokens = prompt_tokens
        self._stream, self._include_usage = sampling.stream, sampling.include_usage
        self._prompt_param, self._max_tokens_param = prompt_param, sampling.max_tokens_param
        self._started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            await self._respond(send)
            nursery.cancel_scope.cancel()

    async def _respond(self, send: Send) -> None:
        try:
            async with self._backend.open_generation(self._request) as pieces:
                if self._stream:
                    await self._stream_events(pieces, send)
                else:
                    await self._send_whole(pieces, send)
        except BackendError as exc:
            await self._fail(
                api_error(
                    exc, prompt_param=self._prompt_param, max_tokens_param=self._max_tokens_param
                ),
                send,
            )
        except Exception:
            log.exception("generation with %s failed", self._request.model)
            await self._fail(ApiError(500, "internal error", type="server_error"), send)

    async def _send_whole(self, pieces: AsyncIterator[Piece], send: Send) -> None:
        text: list[str] = []
        count, finish = 0, "length"
        async for piece in pieces:
            count += 1
            text.append(piece.text)
            finish = piece.finish_reason or finish
        body = self._shape.whole("".join(text), finish, _usage(self._prompt_tokens, count))
        await _send_json(send, 200, body)

    async def _stream_events(self, pieces: AsyncIterator[Piece], send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
        self._started = True
        chat = self._shape.kind == "chat"
        if chat or self._shape.echo:  # chat opens with the role; echo sends the prompt first
            await _send_body(
                send, _sse(self._with_usage(self._shape.chunk(None, None, first=True)))
            )
        count = 0
        async for piece in pieces:
            count += 1
            last = piece.finish_reason is not None
            if piece.text and (chat or not last):
                await _send_body(send, _sse(self._with_usage(self._shape.chunk(piece.text, None))))
            if last:
                text = piece.text if not chat else None
                chunk = self._shape.chunk(text, piece.finish_reason)
                await _send_body(send, _sse(self._with_usage(chunk)))
        if self._include_usage:
            usage = _usage(self._prompt_tokens, count)
            await _send_body(send, _sse(self._shape.usage_chunk(usage)))
        await _send_body(send, _sse("[DONE]"), more=False)

    def _with_usage(self, chunk: dict[str, Any]) -> dict[str, Any]:
        # with include_usage, OpenAI sends "usage": null on every chunk but the last
        return {**chunk, "usage": None} if self._include_usage else chunk

    async def _fail(self, error: ApiError, send: Send) -> None:
        if not self._started:
            await _send_json(send, error.status, error.body(), error.headers)
            return
        # the status line is gone: an error event (the openai client raises on it), no [DONE]
        await _send_body(send, _sse(error.body()), more=False)


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


async def _send_body(send: Send, data: bytes, *, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await _send_body(send, data, more=False)


# ---------------------------------------------------------------------------------------
# routes


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    too_big = ApiError(413, f"the request body is over {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
        raise too_big
    body, seen = bytearray(), 0
    async with aclosing(request.stream()) as chunks:
        async for chunk in chunks:
            seen += len(chunk)
            if seen > DRAIN_FACTOR * limit:
                raise too_big
            if seen <= limit:
                body += chunk
    if seen > limit:
        # read to the end first: closing on unread bytes resets the connection, and the
        # client would see the reset instead of this error
        raise too_big
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:  # JSON escapes can spell lone surrogates, which no tokenizer can encode
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ApiError(400, "the request body holds a lone surrogate (invalid Unicode)") from None
    return data


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401,
            "no API key: send the header 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers=challenge,
        )
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(
            401,
            "incorrect API key",
            code="invalid_api_key",
            headers=challenge,
        )


def _model_object(info: ModelInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "object": "model",
        "created": info.created,
        "owned_by": info.owned_by,
        "max_context": info.max_context,
        "max_new_tokens": info.max_new_tokens,
    }


Handler = Callable[[Request], Awaitable[Any]]


def openai_routes(
    backend: GenerationBackend, *, api_key: str | None, max_body_bytes: int = MAX_BODY_BYTES
) -> list[Route]:
    """The OpenAI-compatible routes over ``backend``; ``api_key``: the bearer token every
    request must carry (None: no authentication)."""

    def guarded(handler: Handler, *, prompt_param: str = "prompt") -> Handler:
        async def endpoint(request: Request) -> Any:
            try:
                _authorize(request, api_key)
                return await handler(request)
            except ApiError as exc:
                return exc.response()
            except BackendError as exc:
                return api_error(
                    exc, prompt_param=prompt_param, max_tokens_param="max_tokens"
                ).response()
            except ClientDisconnect:
                return Response(status_code=400)  # nobody is left to read it
            except Exception:
                log.exception("%s %s failed", request.method, request.url.path)
                return ApiError(500, "internal error", type="server_error").response()

        return endpoint

    async def list_models(request: Request) -> JSONResponse:
        data = [_model_object(info) for info in backend.models()]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(request: Request) -> JSONResponse:
        return JSONResponse(_model_object(backend.model(request.path_params["model"])))

    async def completions(request: Request) -> _Generation:
        body = await _read_json(request, max_body_bytes)
        _reject_unknown(
            body,
            _SAMPLING_FIELDS
            | _NEUTRAL_FIELDS
            | _IGNORED_FIELDS
            | {"prompt", "echo", "best_of", "logprobs", "suffix"},
        )
        sampling = _sampling(body)
        prompt = _prompt(body)
        echo = _flag(body, "echo")
        _only(body, "best_of", [1], "one candidate per request")
        _only(body, "logprobs", [], "log probabilities are not returned")
        _only(body, "suffix", [""], "no insertion (suffix)")
        info = backend.model(sampling.model)
        tokenizer = backend.tokenizer(sampling.model)
        if isinstance(prompt, str):
            ids = await trio.to_thread.run_sync(tokenizer.encode, prompt)
        else:
            ids = prompt
        generation = _request(
            info, ids, sampling, default_tokens=DEFAULT_COMPLETION_TOKENS, prompt_param="prompt"
        )
        echo_text = "" if not echo else prompt if isinstance(prompt, str) else tokenizer.decode(ids)
        return _Generation(
            backend,
            generation,
            _Shape("completion", info.id, echo_text),
            prompt_tokens=len(ids),
            sampling=sampling,
            prompt_param="prompt",
        )

    async def chat_completions(request: Request) -> _Generation:
        body = await _read_json(request, max_body_bytes)
        _reject_unknown(
            body,
            _SAMPLING_FIELDS
            | _NEUTRAL_FIELDS
            | _IGNORED_FIELDS
            | {
                "messages",
                "max_completion_tokens",
                "logprobs",
                "top_logprobs",
                "tools",
                "tool_choice",
                "functions",
                "function_call",
                "parallel_tool_calls",
                "response_format",
                "modalities",
            },
        )
        sampling = _sampling(body, max_tokens_field="max_completion_tokens")
        messages = _messages(body)
        _only(body, "logprobs", [False], "log probabilities are not returned")
        _only(body, "top_logprobs", [0], "log probabilities are not returned")
        for name in ("tools", "functions"):
            _only(body, name, [[]], "the models served here do not call tools")
        _only(body, "tool_choice", ["none"], "the models served here do not call tools")
        _only(body, "function_call", ["none"], "the models served here do not call tools")
        _flag(body, "parallel_tool_calls")  # meaningless without tools
        _only(body, "response_format", [{"type": "text"}], "only plain text responses")
        _only(body, "modalities", [["text"]], "text only")
        info = backend.model(sampling.model)
        tokenizer = backend.tokenizer(sampling.model)

        def render() -> list[int]:
            return tokenizer.encode(chat_prompt(tokenizer, messages))

        try:
            ids = await trio.to_thread.run_sync(render)
        except BackendError:
            raise
        except Error as exc:  # the chat template refused the messages
            raise ApiError(400, str(exc), param="messages") from None
        generation = _request(info, ids, sampling, default_tokens=None, prompt_param="messages")
        return _Generation(
            backend,
            generation,
            _Shape("chat", info.id),
            prompt_tokens=len(ids),
            sampling=sampling,
            prompt_param="messages",
        )

    return [
        Route("/v1/models", guarded(list_models)),
        Route("/v1/models/{model:path}", guarded(get_model)),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route(
            "/v1/chat/completions",
            guarded(chat_completions, prompt_param="messages"),
            methods=["POST"],
        ),
    ]


def _request(
    info: ModelInfo,
    ids: list[int],
    sampling: _Sampling,
    *,
    default_tokens: int | None,
    prompt_param: str,
) -> GenerationRequest:
    """The generation to run, after checking the prompt and max_tokens against the model."""
    max_tokens = sampling.max_tokens
    if max_tokens is None:  # unset: the default, or all the room the context leaves
        room = max(1, min(info.max_new_tokens, info.max_context - len(ids)))
        max_tokens = room if default_tokens is None else min(default_tokens, room)
    try:
        check_request(info, ids, max_tokens)
    except BackendError as exc:
        raise api_error(
            exc, prompt_param=prompt_param, max_tokens_param=sampling.max_tokens_param
        ) from None
    return GenerationRequest(
        model=info.id,
        prompt=ids,
        max_new_tokens=max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stop=sampling.stop,
    )


def openai_app(
    backend: GenerationBackend, *, api_key: str | None, max_body_bytes: int = MAX_BODY_BYTES
) -> Starlette:
    """The OpenAI-compatible routes as an app of their own (a single-model server, tests)."""
    return Starlette(routes=openai_routes(backend, api_key=api_key, max_body_bytes=max_body_bytes))
