"""The inference wire protocol, sans-io: requests parsed and checked before any work.

One channel protocol, ``/shoal/inference/1`` (:data:`INFERENCE`), carries every call
between a client and the servers of a chain and between consecutive servers. Bodies are
msgpack maps; hidden states travel as the frame's raw payload, described by a codec header
(:mod:`shoal.kernels.codecs`) in the body.

- ``{"op": "info"}`` -> the server's span, throughput, sessions and free cache (the client
  routes with it and measures the round trip at the same time).
- ``{"op": "model", "model": M}`` -> config.json and tokenizer_config.json as JSON text in
  the body, tokenizer.json as the payload (a client needs nothing installed locally).
- ``{"op": "step", ...}`` (:class:`StepRequest`): run a session's next tokens along the
  chain. The client sends it to the first hop with the whole route; each server runs its
  blocks and sends the same request, with ``hop + 1`` and its hidden states, to the next
  server; the last one applies the head, samples, and the token comes back along the chain.
- ``{"op": "close", ...}``: drop a session on every hop of the route (best effort).

Errors come back in the reply body as ``{"error": {"peer", "code", "message"}}``, naming
the peer that failed (a server that cannot reach the next hop names that hop), so the
client knows whom to ban. Transport-level ``err`` frames are left for broken framing.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from shoal.transport.channel import ChannelProtocol

#: Hidden states of a long prefill are the largest messages: 2048 tokens x 4096 x 4 bytes.
MAX_ACTIVATION_BYTES = 64 << 20
#: A tokenizer.json (Qwen's is 11 MB) is the largest reply.
MAX_REPLY_BYTES = 32 << 20

INFERENCE = ChannelProtocol(
    name="inference",
    max_request=MAX_ACTIVATION_BYTES,
    max_response=MAX_REPLY_BYTES,
    timeout=600.0,  # the real bounds are the deadlines each call carries
    max_concurrent=256,
    idle_close=60.0,
    idle_timeout=120.0,
    bulk=True,  # a token's step per hop is latency-bound: no Python Noise/yamux where direct
)

MAX_ROUTE = 64
MAX_TOKENS_PER_STEP = 8192  # token ids ride in the msgpack body (the header limit is 64 KiB)
MAX_CHUNKS = 16384
MAX_SESSION_ID = 64

# Error codes. Those in RETRYABLE mean "this server failed": the client bans it and
# re-routes. REFUSALS mean "this server cannot take the session now": avoid it, else tell
# the user. The rest are the caller's mistakes and are raised at once.
UNREACHABLE = "unreachable"  # the next hop could not be called (reset, refused, timeout)
TIMEOUT = "timeout"
INTERNAL = "internal"
SESSION_UNKNOWN = "session_unknown"  # restarted server or expired session: replay
TOO_MANY_SESSIONS = "too_many_sessions"
CACHE_FULL = "cache_full"
BAD_REQUEST = "bad_request"
WRONG_SPAN = "wrong_span"
RETRYABLE = frozenset({UNREACHABLE, TIMEOUT, INTERNAL, WRONG_SPAN})
REFUSALS = frozenset({TOO_MANY_SESSIONS, CACHE_FULL})


class ProtocolViolation(ValueError):
    """A request that does not follow the protocol; the message says which field."""


@dataclass(frozen=True, slots=True)
class Hop:
    """One server of a chain and the blocks ``[start, end)`` it runs for this session."""

    peer: str
    start: int
    end: int
    addrs: tuple[str, ...] = ()

    def to_wire(self) -> list[Any]:
        return [self.peer, self.start, self.end, list(self.addrs)]

    @classmethod
    def from_wire(cls, raw: Any) -> Hop:
        if not (isinstance(raw, list | tuple) and len(raw) == 4):
            raise ProtocolViolation("route: each hop is [peer, start, end, addrs]")
        peer, start, end, addrs = raw
        if not isinstance(peer, str) or not 0 < len(peer) <= 128:
            raise ProtocolViolation("route: a hop's peer is not a peer id")
        if not (_is_int(start) and _is_int(end) and 0 <= start < end):
            raise ProtocolViolation(f"route: hop blocks [{start!r}, {end!r}) are not a span")
        if not (
            isinstance(addrs, list | tuple)
            and len(addrs) <= 16
            and all(isinstance(a, str) and len(a) <= 512 for a in addrs)
        ):
            raise ProtocolViolation("route: a hop's addrs are not a list of multiaddrs")
        return cls(peer, start, end, tuple(addrs))


@dataclass(frozen=True, slots=True)
class Sampling:
    """How the last hop picks the token: temperature 0 is greedy. A seeded sampler draws
    from a generator seeded by (seed, position), so a replayed step draws the same."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.temperature, "k": self.top_k, "p": self.top_p, "s": self.seed}

    @classmethod
    def from_wire(cls, raw: Any) -> Sampling:
        if not isinstance(raw, Mapping):
            raise ProtocolViolation("sampling: expected a map")
        t, k, p, s = raw.get("t", 0.0), raw.get("k", 0), raw.get("p", 1.0), raw.get("s")
        if not (_is_num(t) and 0 <= t <= 100):
            raise ProtocolViolation("sampling: temperature must be in [0, 100]")
        if not (_is_int(k) and k >= 0):
            raise ProtocolViolation("sampling: top_k must be an integer >= 0")
        if not (_is_num(p) and 0 < p <= 1):
            raise ProtocolViolation("sampling: top_p must be in (0, 1]")
        if s is not None and not (_is_int(s) and -(2**63) <= s < 2**64):
            raise ProtocolViolation("sampling: seed must be a 64-bit integer or nil")
        return cls(float(t), int(k), float(p), s)


@dataclass(frozen=True, slots=True)
class StepRequest:
    """Run ``sum(chunks)`` new positions of session ``session`` from ``position`` on.

    The tokens (first hop) or hidden states (later hops) are processed chunk by chunk in
    order, one forward pass each: a replay after a failover sends the prompt and every
    generated token at once, with the chunks the original run used, so that the numbers,
    and therefore greedy tokens, come out bit-identical. ``max_length`` is the most
    positions the session will hold (the server reserves that much cache on the first
    step). ``timeout``: seconds the sender waits for the reply.
    """

    session: str
    model: str
    route: tuple[Hop, ...]
    hop: int
    position: int
    chunks: tuple[int, ...]
    max_length: int
    sampling: Sampling
    timeout: float
    tokens: tuple[int, ...] = ()
    hidden: Mapping[str, Any] | None = None  # codec header of the payload (hop > 0)

    @property
    def here(self) -> Hop:
        return self.route[self.hop]

    @property
    def last(self) -> bool:
        return self.hop == len(self.route) - 1

    @property
    def length(self) -> int:
        return sum(self.chunks)

    def to_wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "op": "step",
            "session": self.session,
            "model": self.model,
            "route": [h.to_wire() for h in self.route],
            "hop": self.hop,
            "position": self.position,
            "chunks": list(self.chunks),
            "max_length": self.max_length,
            "sampling": self.sampling.to_wire(),
            "timeout": self.timeout,
        }
        if self.hop == 0:
            body["tokens"] = list(self.tokens)
        if self.hidden is not None:
            body["hidden"] = dict(self.hidden)
        return body

    def forward(self, hidden: Mapping[str, Any], timeout: float) -> StepRequest:
        """The same step for the next hop, carrying ``hidden`` (a codec header)."""
        return StepRequest(
            session=self.session,
            model=self.model,
            route=self.route,
            hop=self.hop + 1,
            position=self.position,
            chunks=self.chunks,
            max_length=self.max_length,
            sampling=self.sampling,
            timeout=timeout,
            hidden=hidden,
        )

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> StepRequest:
        """Parse and check every field (types, sizes, consistency) before any work."""
        session = body.get("session")
        if not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION_ID:
            raise ProtocolViolation(f"session: expected 1 to {MAX_SESSION_ID} characters")
        model = body.get("model")
        if not isinstance(model, str) or not 0 < len(model) <= 256:
            raise ProtocolViolation("model: expected a model id")
        raw_route = body.get("route")
        if not isinstance(raw_route, list | tuple) or not 0 < len(raw_route) <= MAX_ROUTE:
            raise ProtocolViolation(f"route: expected 1 to {MAX_ROUTE} hops")
        route = tuple(Hop.from_wire(h) for h in raw_route)
        for a, b in itertools.pairwise(route):
            if a.end != b.start:
                raise ProtocolViolation("route: hops must cover consecutive blocks")
        if route[0].start != 0:
            raise ProtocolViolation("route: the first hop must start at block 0")
        hop, position, max_length = body.get("hop"), body.get("position"), body.get("max_length")
        if not (_is_int(hop) and 0 <= hop < len(route)):
            raise ProtocolViolation("hop: not an index into the route")
        if not (_is_int(position) and position >= 0):
            raise ProtocolViolation("position: expected an integer >= 0")
        raw_chunks = body.get("chunks")
        if (
            not isinstance(raw_chunks, list | tuple)
            or not 0 < len(raw_chunks) <= MAX_CHUNKS
            or not all(_is_int(c) and c > 0 for c in raw_chunks)
        ):
            raise ProtocolViolation("chunks: expected a non-empty list of positive lengths")
        chunks = tuple(int(c) for c in raw_chunks)
        if sum(chunks) > MAX_TOKENS_PER_STEP:
            raise ProtocolViolation(f"chunks: at most {MAX_TOKENS_PER_STEP} positions per step")
        if not (_is_int(max_length) and position + sum(chunks) <= max_length):
            raise ProtocolViolation("max_length: must cover position + the step's positions")
        timeout = body.get("timeout")
        if not (_is_num(timeout) and 0 < timeout <= 3600):
            raise ProtocolViolation("timeout: expected seconds in (0, 3600]")
        tokens: tuple[int, ...] = ()
        hidden = body.get("hidden")
        if hop == 0:
            raw_tokens = body.get("tokens")
            if not isinstance(raw_tokens, list | tuple) or len(raw_tokens) != sum(chunks):
                raise ProtocolViolation("tokens: the first hop needs one token per position")
            if not all(_is_int(t) and 0 <= t < 2**31 for t in raw_tokens):
                raise ProtocolViolation("tokens: expected token ids")
            tokens = tuple(raw_tokens)
            hidden = None
        elif not isinstance(hidden, Mapping):
            raise ProtocolViolation("hidden: a later hop needs the hidden states' header")
        return cls(
            session=session,
            model=model,
            route=route,
            hop=int(hop),
            position=int(position),
            chunks=chunks,
            max_length=int(max_length),
            sampling=Sampling.from_wire(body.get("sampling", {})),
            timeout=float(timeout),
            tokens=tokens,
            hidden=hidden,
        )


def error_body(peer: str, code: str, message: str) -> dict[str, Any]:
    return {"error": {"peer": peer, "code": code, "message": message}}


def is_error(body: Mapping[str, Any]) -> bool:
    return isinstance(body.get("error"), Mapping)


def route_text(route: Sequence[Hop]) -> str:
    """``12D3…abcd[0:3] -> …`` (the last 6 characters of each peer id)."""
    return " -> ".join(f"…{h.peer[-6:]}[{h.start}:{h.end}]" for h in route)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
