"""The client side of a chain: find servers, route, run steps, fail over and replay.

:class:`RemoteSwarm` finds a model's servers (DHT model view, each server's signed record
for its addresses, then each server's live ``info``, which also measures the round trip),
fetches the model's config and tokenizer from a server, and opens
:class:`ChainSession`\\ s.

:class:`ChainSession` sends each step to the first server of its route; the servers pass
it along. When a step fails it bans the server the error names, routes again around it,
and replays the session: one step at position 0 carrying every token so far, split into
the chunks the original steps used, so that every server recomputes the same numbers and
greedy output stays identical to a run without the failure.
"""

from __future__ import annotations

import json
import logging
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from shoal.dht.discovery import Discovery
from shoal.errors import Error
from shoal.pipeline import protocol as wire
from shoal.pipeline.config import ModelConfig
from shoal.pipeline.errors import (
    ModelNotFound,
    NoRoute,
    RequestRejected,
    ServerRefused,
    StageFailed,
)
from shoal.pipeline.protocol import INFERENCE, Hop, Sampling, StepRequest
from shoal.pipeline.routing import Bans, ServerInfo, missing_blocks, plan_route
from shoal.pipeline.serving import connect, model_files_body
from shoal.pipeline.tokenizer import TextTokenizer
from shoal.transport.host import Host
from shoal.transport.rpc import Message

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ChainConfig:
    """step_timeout: seconds one step may take along the whole chain. route_timeout:
    seconds to keep looking for servers of missing blocks before :class:`NoRoute`.
    model_timeout: seconds to look for a model's first servers before :class:`ModelNotFound`.
    info_timeout: seconds a server has to answer ``info``. max_failures: server failures
    one step survives. ban_seconds: first ban of a failed server (doubles per repeat)."""

    step_timeout: float = 60.0
    route_timeout: float = 20.0
    model_timeout: float = 20.0
    info_timeout: float = 3.0
    max_failures: int = 8
    ban_seconds: float = 15.0


@dataclass(frozen=True)
class RemoteModel:
    """A model as served by the swarm: its config and (if the checkpoint has one) tokenizer."""

    model_id: str
    config: ModelConfig
    tokenizer: TextTokenizer | None

    @property
    def num_blocks(self) -> int:
        return self.config.num_layers

    @property
    def context(self) -> int:
        return self.config.max_position_embeddings


@dataclass
class StepTrace:
    """How the last step went: the route and each hop's milliseconds (its compute plus
    everything after it, as it measured)."""

    route: list[Hop] = field(default_factory=list)
    hop_ms: list[tuple[str, float]] = field(default_factory=list)
    failovers: int = 0


class _StepError(Exception):
    def __init__(self, peer: str, code: str, message: str) -> None:
        super().__init__(f"{peer}: [{code}] {message}")
        self.peer, self.code, self.message = peer, code, message


class RemoteSwarm:
    """Routes generations over the servers of a swarm, through ``host`` and ``discovery``
    (both owned by the caller). Shares one ban list among its sessions."""

    def __init__(self, host: Host, discovery: Discovery, config: ChainConfig | None = None) -> None:
        self.host = host
        self.discovery = discovery
        self.config = config or ChainConfig()
        self.bans = Bans(base=self.config.ban_seconds)
        self._models: dict[str, RemoteModel] = {}

    def now(self) -> float:
        return trio.current_time()

    async def model(self, model_id: str) -> RemoteModel:
        """The model's config and tokenizer, from one of its first-block servers (cached)."""
        cached = self._models.get(model_id)
        if cached is not None:
            return cached
        waited = self.config.model_timeout
        with trio.move_on_after(waited):
            while True:
                for record in await self.discovery.find_servers(model_id, 0):
                    if self.bans.banned(record.peer_id, self.now()):
                        continue
                    span = record.spans.get(model_id, (0, 0))
                    hop = Hop(record.peer_id, span[0], span[1], tuple(record.addrs))
                    try:
                        model = await self._fetch_model(model_id, hop)
                    except (Error, ValueError) as exc:
                        log.info("cannot fetch %s from %s: %s", model_id, record.peer_id, exc)
                        continue
                    self._models[model_id] = model
                    return model
                await trio.sleep(0.5)
        raise ModelNotFound(model_id, waited)

    async def _fetch_model(self, model_id: str, hop: Hop) -> RemoteModel:
        with trio.fail_after(self.config.step_timeout):
            peer = await connect(self.host, hop)
            reply = await self.host.channels.call(
                peer, INFERENCE, Message({"op": "model", "model": model_id})
            )
        if wire.is_error(reply.body):
            raise ValueError(str(reply.body["error"]))
        config_text, tokenizer_config = model_files_body(reply.body)
        config = ModelConfig.from_hf(json.loads(config_text), f"{model_id}/config.json")
        tokenizer = None
        if reply.payload:
            with tempfile.TemporaryDirectory() as tmp:
                directory = Path(tmp)
                (directory / "tokenizer.json").write_bytes(bytes(reply.payload))
                if tokenizer_config:
                    (directory / "tokenizer_config.json").write_text(tokenizer_config)
                tokenizer = TextTokenizer.from_directory(
                    directory, bos_id=config.bos_token_id, eos_ids=config.eos_token_ids
                )
        return RemoteModel(model_id, config, tokenizer)

    async def servers(self, model: RemoteModel) -> list[ServerInfo]:
        """The model's live servers that answer ``info``, with their measured round trip."""
        view = await self.discovery.model_view(model.model_id, model.num_blocks)
        peers = sorted({peer for block in view for peer in block})
        found: list[ServerInfo] = []

        async def ask(peer: str) -> None:
            record = self.discovery.server_record_cached(peer)
            span = record.spans.get(model.model_id) if record is not None else None
            if record is None or span is None:
                return
            hop = Hop(peer, span[0], span[1], tuple(record.addrs))
            with trio.move_on_after(self.config.info_timeout):
                try:
                    node = await connect(self.host, hop)
                    sent = trio.current_time()
                    reply = await self.host.channels.call(node, INFERENCE, Message({"op": "info"}))
                    rtt = trio.current_time() - sent
                except Error as exc:
                    log.info("server %s does not answer: %s", peer, exc)
                    return
                info = reply.body
                if info.get("model") != model.model_id:
                    return
                found.append(
                    ServerInfo(
                        peer=peer,
                        start=_int(info.get("start"), span[0]),
                        end=_int(info.get("end"), span[1]),
                        addrs=hop.addrs,
                        throughput=_float(info.get("throughput")),
                        rtt=rtt,
                        free_cache_tokens=_int(info.get("free_cache_tokens"), 0),
                        sessions=_int(info.get("sessions"), 0),
                        max_sessions=_int(info.get("max_sessions"), 1),
                    )
                )

        async with trio.open_nursery() as nursery:
            for peer in peers:
                if not self.bans.banned(peer, self.now()):
                    nursery.start_soon(ask, peer)
        return sorted(found, key=lambda s: s.peer)

    async def plan(self, model: RemoteModel, need_tokens: int) -> list[Hop]:
        """A route over the servers not banned, waiting up to ``route_timeout`` for
        missing blocks to get a server; :class:`NoRoute` names the blocks after that."""
        started = self.now()
        deadline = started + self.config.route_timeout
        missing = list(range(model.num_blocks))
        while True:
            with trio.move_on_at(deadline):
                servers = await self.servers(model)
                usable = [s for s in servers if not self.bans.banned(s.peer, self.now())]
                route = plan_route(usable, model.num_blocks, need_tokens=need_tokens)
                if route is not None:
                    return route
                missing = missing_blocks(usable, model.num_blocks)
                log.info("no route for %s yet: blocks %s have no server", model.model_id, missing)
                await trio.sleep(min(1.0, max(0.0, deadline - self.now())))
            if self.now() >= deadline:
                raise NoRoute(
                    model.model_id, missing, self.bans.active(self.now()), self.now() - started
                )

    def open_session(
        self, model: RemoteModel, *, max_length: int, sampling: Sampling
    ) -> ChainSession:
        if max_length > model.context:
            raise RequestRejected(
                f"the prompt and the new tokens need {max_length} positions; "
                f"{model.model_id}'s context is {model.context}",
                param="max_tokens",
            )
        return ChainSession(self, model, max_length=max_length, sampling=sampling)


class ChainSession:
    """One generation's session on a chain of servers. Use :meth:`step` with the prompt,
    then with each new token; :meth:`aclose` drops the servers' caches."""

    def __init__(
        self, swarm: RemoteSwarm, model: RemoteModel, *, max_length: int, sampling: Sampling
    ) -> None:
        self.swarm = swarm
        self.model = model
        self.max_length = max_length
        self.sampling = sampling
        self.session_id = secrets.token_hex(16)
        self.route: list[Hop] | None = None
        self.history: list[int] = []  # tokens the servers' caches hold
        self.chunks: list[int] = []  # how the history was sent, step by step
        self.trace = StepTrace()
        self._replay = False

    async def step(self, tokens: Sequence[int]) -> int:
        """Run ``tokens`` (the prompt, then one token at a time); return the next token."""
        if not tokens:
            raise RequestRejected("a step needs at least one token", param="prompt")
        if len(self.history) + len(tokens) > self.max_length:
            raise RequestRejected(
                f"the session holds {len(self.history)} positions of {self.max_length}"
            )
        failures = 0
        while True:
            if self.route is None:
                self.route = await self.swarm.plan(self.model, self.max_length)
                self._replay = bool(self.history)
            if self._replay:
                request_tokens = [*self.history, *tokens]
                chunks, position = [*self.chunks, len(tokens)], 0
            else:
                request_tokens, chunks, position = list(tokens), [len(tokens)], len(self.history)
            try:
                token, hops = await self._call(request_tokens, chunks, position)
            except _StepError as exc:
                failures += 1
                self._on_failure(exc, failures)
                continue
            self.history.extend(tokens)
            self.chunks.append(len(tokens))
            self._replay = False
            self.trace.route = list(self.route)
            self.trace.hop_ms = hops
            return token

    def _on_failure(self, exc: _StepError, failures: int) -> None:
        now = self.swarm.now()
        if exc.code == wire.BAD_REQUEST:
            raise RequestRejected(f"server {exc.peer} rejected the step: {exc.message}")
        if failures > self.swarm.config.max_failures:
            if exc.code in wire.REFUSALS:
                raise ServerRefused(exc.peer, exc.code, exc.message)
            raise StageFailed(exc.peer, exc.code, exc.message)
        self._replay = True
        self.trace.failovers += 1
        if exc.code == wire.SESSION_UNKNOWN:  # same route, rebuild the caches
            log.info("session %s lost on %s; replaying", self.session_id[:8], exc.peer)
            return
        seconds = self.swarm.bans.ban(exc.peer, now)
        log.warning(
            "server %s failed ([%s] %s); banned for %.0fs, re-routing",
            exc.peer,
            exc.code,
            exc.message,
            seconds,
        )
        self.route = None

    async def _call(
        self, tokens: list[int], chunks: list[int], position: int
    ) -> tuple[int, list[tuple[str, float]]]:
        assert self.route is not None
        timeout = self.swarm.config.step_timeout
        request = StepRequest(
            session=self.session_id,
            model=self.model.model_id,
            route=tuple(self.route),
            hop=0,
            position=position,
            chunks=tuple(chunks),
            max_length=self.max_length,
            sampling=self.sampling,
            timeout=timeout,
            tokens=tuple(tokens),
        )
        first = self.route[0]
        with trio.move_on_after(timeout + wire_margin(len(self.route))):
            try:
                peer = await connect(self.swarm.host, first)
                reply = await self.swarm.host.channels.call(
                    peer, INFERENCE, Message(request.to_wire())
                )
            except Error as exc:
                raise _StepError(first.peer, wire.UNREACHABLE, str(exc)) from exc
            body = reply.body
            if wire.is_error(body):
                error = body["error"]
                raise _StepError(
                    str(error.get("peer", first.peer)),
                    str(error.get("code", wire.INTERNAL)),
                    str(error.get("message", "")),
                )
            token = body.get("token")
            if not isinstance(token, int) or not 0 <= token < self.model.config.vocab_size:
                raise _StepError(first.peer, wire.INTERNAL, f"bad token in reply: {token!r}")
            hops = body.get("hops")
            trace = [
                (str(h[0]), float(h[1]))
                for h in (hops if isinstance(hops, list) else [])
                if isinstance(h, list) and len(h) == 2
            ]
            return token, trace
        raise _StepError(first.peer, wire.TIMEOUT, f"no reply within {timeout:.0f}s")

    async def aclose(self) -> None:
        """Drop the session on every server of the route (best effort, two seconds)."""
        if self.route is None or not self.history:
            return
        body = {
            "op": "close",
            "session": self.session_id,
            "route": [h.to_wire() for h in self.route],
            "hop": 0,
        }
        with trio.move_on_after(2.0) as scope:
            scope.shield = True
            try:
                peer = await connect(self.swarm.host, self.route[0])
                await self.swarm.host.channels.call(peer, INFERENCE, Message(body))
            except Error:
                pass


def wire_margin(hops: int) -> float:
    """Extra seconds the client waits past the step's timeout: every server keeps a margin
    back so that the innermost failure is reported first."""
    return 1.0 + 0.5 * hops


def _int(value: Any, default: int) -> int:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else default


def _float(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
