"""A server of a span of a model: inference sessions with their KV caches, forwarding.

:class:`SpanServer` answers ``/shoal/inference/1`` (:mod:`shoal.pipeline.protocol`). A
step runs the server's blocks of the route on a worker thread (one at a time: torch uses
every core it is given), then sends its hidden states straight to the next server of the
route and relays the token that comes back. The first server embeds the token ids; the
last applies the final norm and the LM head and samples.

Sessions hold one KV cache per block of the span. Limits: ``max_sessions`` at once, and
``max_cache_tokens`` positions reserved in all (a session reserves its ``max_length`` on
its first step). A request over a limit gets ``too_many_sessions`` or ``cache_full`` at
once. A session unused for ``session_idle`` seconds is dropped; a later step on it gets
``session_unknown`` and the client replays it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import trio
from libp2p.peer.id import ID

from shoal.errors import Error
from shoal.kernels import codecs
from shoal.kernels.errors import CodecError
from shoal.kernels.sampling import Sampler, SamplingParams
from shoal.pipeline import protocol as wire
from shoal.pipeline.model import DecoderSpan, SpanCache
from shoal.pipeline.protocol import INFERENCE, Hop, ProtocolViolation, Sampling, StepRequest
from shoal.transport.host import Host
from shoal.transport.rpc import Message

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

#: Seconds a server keeps back from its own deadline when it calls the next hop, so that
#: a hop that hangs is reported by its caller before the client gives up on the caller.
FORWARD_MARGIN = 0.5

#: ``runner(weights, hidden, cache, position, start, end)``: how a server runs blocks
#: ``start..end-1`` (:func:`run_blocks`; a tensor-parallel leader runs its whole group).
BlockRunner = Callable[[DecoderSpan, torch.Tensor, SpanCache, int, int, int], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """max_sessions: sessions held at once. max_cache_tokens: positions reserved by all
    sessions together (each reserves its max_length). session_idle: seconds after which
    an unused session is dropped."""

    max_sessions: int = 32
    max_cache_tokens: int = 65536
    session_idle: float = 300.0

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.max_cache_tokens < 1 or self.session_idle <= 0:
            raise ValueError("max_sessions, max_cache_tokens and session_idle must be positive")


@dataclass(frozen=True)
class ModelFiles:
    """What a client needs to talk to a model: config.json, tokenizer_config.json (JSON
    text) and tokenizer.json (bytes; empty if the checkpoint has none)."""

    config: str
    tokenizer_config: str
    tokenizer: bytes

    @classmethod
    def read(cls, directory: Path) -> ModelFiles:
        def text(name: str) -> str:
            path = directory / name
            return path.read_text() if path.is_file() else ""

        tokenizer = directory / "tokenizer.json"
        return cls(
            text("config.json"),
            text("tokenizer_config.json"),
            tokenizer.read_bytes() if tokenizer.is_file() else b"",
        )


@dataclass
class Session:
    """One client session on this server: its caches and how far they are filled."""

    cache: SpanCache
    start: int
    end: int
    max_length: int
    length: int = 0
    last_used: float = 0.0
    lock: trio.Lock = field(default_factory=trio.Lock)
    sampler: Sampler | None = None


class StepFailed(Exception):
    """Inside the server: a step ends with this error reply (peer, code, message)."""

    def __init__(self, peer: str, code: str, message: str) -> None:
        super().__init__(message)
        self.peer, self.code, self.message = peer, code, message


class SpanServer:
    """Serves ``weights`` (blocks ``span.start..span.end`` of ``model_id``) to the swarm."""

    def __init__(
        self,
        host: Host,
        model_id: str,
        weights: DecoderSpan,
        files: ModelFiles,
        config: ServerConfig,
        *,
        throughput: float = 0.0,
        block_runner: BlockRunner | None = None,
    ) -> None:
        self.host = host
        self.block_runner = block_runner or run_blocks
        self.model_id = model_id
        self.weights = weights
        self.files = files
        self.config = config
        self.throughput = throughput
        self.peer_id = str(host.peer_id)
        self.start, self.end = weights.span.start, weights.span.end
        self.num_blocks = weights.config.num_layers
        self.context = weights.config.max_position_embeddings
        self.sessions: dict[str, Session] = {}
        self.steps = 0
        self._compute = trio.CapacityLimiter(1)

    # ---- what the swarm sees ----------------------------------------------------------

    def reserved_tokens(self) -> int:
        return sum(s.max_length for s in self.sessions.values())

    def free_cache_tokens(self) -> int:
        return max(0, self.config.max_cache_tokens - self.reserved_tokens())

    def load(self) -> float:
        return len(self.sessions) / self.config.max_sessions

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "start": self.start,
            "end": self.end,
            "num_blocks": self.num_blocks,
            "context": self.context,
            "throughput": self.throughput,
            "sessions": len(self.sessions),
            "max_sessions": self.config.max_sessions,
            "free_cache_tokens": self.free_cache_tokens(),
            "steps": self.steps,
        }

    # ---- service ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the protocol and drop idle sessions until cancelled."""
        self.host.channels.serve(INFERENCE, self.handle)
        task_status.started()
        period = min(5.0, self.config.session_idle / 4)
        while True:
            await trio.sleep(period)
            self.drop_idle(trio.current_time())

    def drop_idle(self, now: float) -> None:
        for session_id, session in list(self.sessions.items()):
            if now - session.last_used > self.config.session_idle and not session.lock.locked():
                log.info(
                    "dropping session %s: idle for %.0fs", session_id[:8], now - session.last_used
                )
                del self.sessions[session_id]

    async def handle(self, peer: ID, request: Message) -> Message:
        op = request.body.get("op")
        if op == "step":
            return await self._step(request)
        if op == "info":
            return Message(self.info())
        if op == "close":
            return await self._close(request)
        if op == "model":
            if request.body.get("model") != self.model_id:
                return Message(self._error(wire.WRONG_SPAN, f"this server serves {self.model_id}"))
            body = {
                "model": self.model_id,
                "config": self.files.config,
                "tokenizer_config": self.files.tokenizer_config,
            }
            return Message(body, self.files.tokenizer)
        return Message(self._error(wire.BAD_REQUEST, f"unknown op {op!r}"))

    def _error(self, code: str, message: str) -> dict[str, Any]:
        return wire.error_body(self.peer_id, code, message)

    # ---- steps ------------------------------------------------------------------------

    async def _step(self, request: Message) -> Message:
        started = trio.current_time()
        try:
            step = StepRequest.from_wire(request.body)
            deadline = started + step.timeout
            self._check_route(step)
            inputs = self._inputs(step, request.payload)
            session = self._session(step)
        except ProtocolViolation as exc:
            return Message(self._error(wire.BAD_REQUEST, str(exc)))
        except StepFailed as exc:
            return Message(wire.error_body(exc.peer, exc.code, exc.message))
        async with session.lock:
            if step.position > session.length:
                return Message(
                    self._error(
                        wire.SESSION_UNKNOWN,
                        f"the session holds {session.length} positions and the step starts "
                        f"at {step.position}; replay it from position 0",
                    )
                )
            try:
                out = await trio.to_thread.run_sync(
                    self._compute_step, session, step, inputs, limiter=self._compute
                )
            except Exception as exc:  # a kernel failed: this server's fault
                log.exception("step of session %s failed", step.session[:8])
                return Message(self._error(wire.INTERNAL, f"the step failed: {exc!r}"))
            session.last_used = trio.current_time()
            self.steps += 1
        computed = trio.current_time()
        here = [self.peer_id, round((computed - started) * 1e3, 3)]
        if step.last:
            assert isinstance(out, int)
            return Message({"token": out, "hops": [here]})
        assert isinstance(out, torch.Tensor)
        reply = await self._forward(step, out, deadline)
        if not wire.is_error(reply.body):
            hops = reply.body.get("hops")
            body = dict(reply.body)
            body["hops"] = [here, *(hops if isinstance(hops, list) else [])]
            return Message(body)
        return reply

    def _check_route(self, step: StepRequest) -> None:
        hop = step.here
        if hop.peer != self.peer_id:
            raise StepFailed(
                self.peer_id, wire.WRONG_SPAN, f"hop {step.hop} names {hop.peer}, not this server"
            )
        if step.model != self.model_id or not self.start <= hop.start < hop.end <= self.end:
            raise StepFailed(
                self.peer_id,
                wire.WRONG_SPAN,
                f"this server runs blocks {self.start}:{self.end} of {self.model_id}, "
                f"not {hop.start}:{hop.end} of {step.model}",
            )
        if step.last and hop.end != self.num_blocks:
            raise ProtocolViolation(
                f"route: it ends at block {hop.end}; {self.model_id} has {self.num_blocks}"
            )
        if step.max_length > self.context:
            raise ProtocolViolation(
                f"max_length: {step.max_length} positions exceed {self.model_id}'s context "
                f"of {self.context}"
            )

    def _inputs(self, step: StepRequest, payload: bytes | bytearray | memoryview) -> torch.Tensor:
        if step.hop == 0:
            vocab = self.weights.config.vocab_size
            if any(t >= vocab for t in step.tokens):
                raise ProtocolViolation(f"tokens: ids must be below the vocabulary size {vocab}")
            return torch.tensor([step.tokens], dtype=torch.long)
        assert step.hidden is not None
        expected = [1, step.length, self.weights.config.hidden_size]
        try:
            if list(step.hidden.get("shape", ())) != expected:
                raise CodecError("shape", f"{step.hidden.get('shape')!r}, expected {expected}")
            hidden = codecs.decode(
                dict(step.hidden), payload, max_elements=step.length * expected[2]
            )
        except CodecError as exc:
            raise ProtocolViolation(f"hidden: {exc}") from None
        return hidden.to(self.weights.dtype)

    def _session(self, step: StepRequest) -> Session:
        hop = step.here
        session = self.sessions.get(step.session)
        if session is not None and (session.start, session.end) == (hop.start, hop.end):
            if step.position == 0 and step.max_length != session.max_length:
                self._reserve(step.max_length - session.max_length)
                session.max_length = step.max_length
            return session
        if step.position != 0:
            raise StepFailed(
                self.peer_id,
                wire.SESSION_UNKNOWN,
                f"no session {step.session[:8]} for blocks {hop.start}:{hop.end} here "
                "(expired, or the server restarted); replay it from position 0",
            )
        if session is not None:  # the route changed: start this session over
            del self.sessions[step.session]
        if len(self.sessions) >= self.config.max_sessions:
            raise StepFailed(
                self.peer_id,
                wire.TOO_MANY_SESSIONS,
                f"this server holds its maximum of {self.config.max_sessions} sessions",
            )
        self._reserve(step.max_length)
        session = Session(
            cache=self.weights.new_cache(batch=1),
            start=hop.start,
            end=hop.end,
            max_length=step.max_length,
            last_used=trio.current_time(),
        )
        self.sessions[step.session] = session
        return session

    def _reserve(self, tokens: int) -> None:
        free = self.free_cache_tokens()
        if tokens > free:
            raise StepFailed(
                self.peer_id,
                wire.CACHE_FULL,
                f"the session needs {tokens} cache positions; {free} of "
                f"{self.config.max_cache_tokens} are free here",
            )

    @torch.inference_mode()
    def _compute_step(
        self, session: Session, step: StepRequest, inputs: torch.Tensor
    ) -> torch.Tensor | int:
        """On the worker thread: run each chunk through the hop's blocks (and the head)."""
        weights, hop = self.weights, step.here
        position, offset, outputs = step.position, 0, []
        for size in step.chunks:
            part = inputs[:, offset : offset + size]
            hidden = weights.embed(part) if hop.start == 0 else part
            hidden = self.block_runner(weights, hidden, session.cache, position, hop.start, hop.end)
            outputs.append(hidden)
            position += size
            offset += size
        session.length = position
        if not step.last:
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        logits = weights.head(outputs[-1][:, -1:])[:, -1]
        return int(self._sampler(session, step.sampling, position)(logits)[0])

    @staticmethod
    def _sampler(session: Session, sampling: Sampling, position: int) -> Sampler:
        params = SamplingParams(
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            seed=None if sampling.seed is None else (sampling.seed * 1_000_003 + position) % 2**63,
        )
        if sampling.seed is not None or session.sampler is None:
            session.sampler = Sampler(params)  # seeded by position: a replay draws the same
        return session.sampler

    async def _forward(self, step: StepRequest, hidden: torch.Tensor, deadline: float) -> Message:
        nxt = step.route[step.hop + 1]
        header, payload = codecs.encode(hidden)
        budget = deadline - trio.current_time() - FORWARD_MARGIN
        if budget <= 0:
            return Message(self._error(wire.TIMEOUT, "the step's deadline passed on this server"))
        with trio.move_on_after(budget):
            try:
                peer = await connect(self.host, nxt)
                return await self.host.channels.call(
                    peer, INFERENCE, Message(step.forward(header, budget).to_wire(), payload)
                )
            except Error as exc:
                log.info("next hop %s failed: %s", nxt.peer, exc)
                return Message(wire.error_body(nxt.peer, wire.UNREACHABLE, str(exc)))
        return Message(wire.error_body(nxt.peer, wire.TIMEOUT, f"no reply within {budget:.1f}s"))

    async def _close(self, request: Message) -> Message:
        session_id = request.body.get("session")
        route, hop = request.body.get("route"), request.body.get("hop")
        if isinstance(session_id, str):
            self.sessions.pop(session_id, None)
        try:
            hops = [Hop.from_wire(h) for h in route] if isinstance(route, list) else []
        except ProtocolViolation:
            hops = []
        if isinstance(hop, int) and 0 <= hop < len(hops) - 1 and len(hops) <= wire.MAX_ROUTE:
            body = dict(request.body) | {"hop": hop + 1}
            with trio.move_on_after(2.0):
                try:
                    peer = await connect(self.host, hops[hop + 1])
                    await self.host.channels.call(peer, INFERENCE, Message(body))
                except Error:
                    pass  # the session expires there anyway
        return Message({"closed": True})


def run_blocks(
    weights: DecoderSpan,
    hidden: torch.Tensor,
    cache: SpanCache,
    position: int,
    start: int,
    end: int,
) -> torch.Tensor:
    """Blocks ``start..end-1`` of ``weights`` over ``hidden`` at ``position..``: the same
    operations as :meth:`DecoderSpan.blocks_forward`, on a sub-range of the span."""
    positions = torch.arange(position, position + hidden.shape[1], device=hidden.device)
    cos, sin = weights.rotary.cos_sin(positions, hidden.dtype)
    for block in range(start, end):
        hidden = weights.run_block(block, hidden, cos, sin, position, cache.layers[block])
    return hidden


async def connect(host: Host, hop: Hop) -> ID:
    """The peer of ``hop``, connected (through one of its addresses if not yet)."""
    peer = ID.from_base58(hop.peer)
    if host.is_connected(peer):
        return peer
    failure: Error | None = None
    for addr in hop.addrs:
        try:
            await host.connect(addr)
            return peer
        except Error as exc:
            failure = exc
    if failure is not None:
        raise failure
    return peer  # no address: libp2p may still know one


def measure_throughput(
    weights: DecoderSpan,
    *,
    steps: int = 8,
    prefill: int = 16,
    runner: BlockRunner | None = None,
) -> float:
    """Decode steps per second of ``weights``' whole span (blocks, plus the embedding and
    head when it holds them), after a short prefill; blocking (run it on a thread).
    ``runner`` runs the blocks (default :func:`run_blocks`)."""
    run = runner or run_blocks
    config = weights.config
    with torch.inference_mode():
        cache = weights.new_cache(batch=1)

        def once(length: int, position: int) -> None:
            if weights.embed_tokens is not None:
                hidden = weights.embed(torch.zeros(1, length, dtype=torch.long))
            else:
                hidden = torch.zeros(1, length, config.hidden_size, dtype=weights.dtype)
            hidden = run(weights, hidden, cache, position, weights.span.start, weights.span.end)
            if weights.lm_head is not None:
                weights.head(hidden[:, -1:])

        once(prefill, 0)
        started = time.perf_counter()
        for i in range(steps):
            once(1, prefill + i)
        elapsed = time.perf_counter() - started
    return steps / elapsed if elapsed > 0 else 0.0


def model_files_body(body: Mapping[str, Any]) -> tuple[str, str]:
    """(config.json, tokenizer_config.json) text from a ``model`` reply; checked."""
    config, tok = body.get("config"), body.get("tokenizer_config")
    if not isinstance(config, str) or not isinstance(tok, str):
        raise ProtocolViolation("model reply: config and tokenizer_config must be JSON text")
    return config, tok
