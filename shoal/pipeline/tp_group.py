"""A tensor-parallel group at run time: members, the ``/shoal/tp/1`` protocol, all-reduces.

Nodes started with the same ``--tp-group NAME``, model and span form a group
(:func:`form_group` is the rendezvous; the daemon feeds it the swarm state's roster). The
member with the lowest peer id leads: it computes the split (:func:`plan_split` over the
members' measured speeds), measures its round trip to each member, and sends every member
the plan; each member loads only its slices. The leader alone serves the span to the
swarm (a :class:`SpanServer` whose block runner is :meth:`TensorGroup.run_blocks`), so
clients see one server.

A step: the leader sends the hidden states (``op: step``) to every member and runs its own
slice; every member runs :func:`run_sharded` over the same hidden states, with an
all-reduce after each attention and each MLP:

- star (``op: reduce``): a member calls the leader with its partial sum; the leader adds
  the parts in rank order and answers every call with the same bytes. One round trip.
- ring (``op: ring``): reduce-scatter then all-gather over ``n`` chunks, each member
  sending to the next in rank order: ``2(n-1)`` sequential messages of ``1/n`` the size.

:func:`choose_topology` picks one per all-reduce from the measured round trip and
bandwidth (the same inputs on every member, so the same choice), unless forced.

Frames are validated before use: the sender must be the member the message expects,
tensors go through :mod:`shoal.kernels.codecs` (dtype allow-list, element limit, crc32)
and must have the shape the step implies. A bad frame gets an error reply and a log line.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import trio
from libp2p.peer.id import ID

from shoal.errors import Error
from shoal.kernels import codecs
from shoal.kernels.errors import CodecError
from shoal.pipeline.config import ModelConfig
from shoal.pipeline.errors import PipelineError
from shoal.pipeline.model import DecoderSpan, SpanCache
from shoal.pipeline.tensor_parallel import (
    Shard,
    ShardCache,
    ShardedSpan,
    SplitError,
    SplitPlan,
    plan_split,
    run_sharded,
)
from shoal.transport.channel import ChannelProtocol
from shoal.transport.errors import RpcError
from shoal.transport.host import Host
from shoal.transport.rpc import Message

log = logging.getLogger(__name__)

TOPOLOGIES = ("auto", "star", "ring")
#: Seconds one all-reduce may wait for the other members before the group is broken.
REDUCE_TIMEOUT = 10.0
#: Largest message (hidden states of a prefill, or a partial sum).
MAX_MESSAGE = 64 << 20

TP = ChannelProtocol(
    name="tp",
    max_request=MAX_MESSAGE,
    max_response=MAX_MESSAGE,
    timeout=600.0,  # a plan call lasts as long as the member loads its slices
    max_concurrent=64,
    # A group's few streams live as long as the group. With the defaults (20 s / 60 s), a
    # group idle for a minute on a starved box had the server close a stream just as the
    # caller reused it; a step call is not idempotent, so that broke the group.
    idle_close=3600.0,
    idle_timeout=7200.0,
    bulk=True,  # a step is 16 latency-bound all-reduces per token: no Python Noise/yamux
)


class GroupError(PipelineError):
    """The group cannot form, or broke (a member failed or sent a bad frame)."""


@dataclass(frozen=True, kw_only=True)
class LinkCost:
    """What the topology choice needs: a small message's round trip, and seconds per
    byte on a member link (both the worst over the leader's links to the members)."""

    rtt: float
    seconds_per_byte: float

    def to_wire(self) -> list[float]:
        return [self.rtt, self.seconds_per_byte]


def star_seconds(n: int, nbytes: int, cost: LinkCost) -> float:
    """Star: every member sends its part to the leader, which answers each with the sum;
    the leader's link carries ``2(n-1)`` parts, and it takes one round trip."""
    return cost.rtt + 2 * (n - 1) * nbytes * cost.seconds_per_byte


def ring_seconds(n: int, nbytes: int, cost: LinkCost) -> float:
    """Ring: ``2(n-1)`` sequential steps (each a message and its acknowledgement), each
    moving ``1/n`` of the tensor over every link at once."""
    return 2 * (n - 1) * (cost.rtt + nbytes / n * cost.seconds_per_byte)


def choose_topology(n: int, nbytes: int, cost: LinkCost, forced: str = "auto") -> str:
    """``star`` or ``ring`` for one all-reduce of ``nbytes`` among ``n`` members: the
    one the cost model says is faster (star on a tie, and always for two members or
    fewer, where the ring saves no bandwidth), unless ``forced``."""
    if forced != "auto":
        return forced
    if n <= 2:
        return "star"
    return "ring" if ring_seconds(n, nbytes, cost) < star_seconds(n, nbytes, cost) else "star"


def ring_steps(rank: int, n: int) -> list[tuple[int, int, bool]]:
    """Member ``rank``'s ring schedule: per step (chunk sent to ``rank+1``, chunk received
    from ``rank-1``, add it (reduce-scatter) or replace (all-gather))."""
    steps = [((rank - s) % n, (rank - s - 1) % n, True) for s in range(n - 1)]
    steps += [((rank + 1 - s) % n, (rank - s) % n, False) for s in range(n - 1)]
    return steps


def ring_all_reduce_reference(parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The ring over in-memory parts (what each member ends with): the schedule's
    reference, for tests."""
    n = len(parts)
    chunks = [list(p.reshape(-1).clone().tensor_split(n)) for p in parts]
    for s in range(2 * (n - 1)):
        sent = [(r, ring_steps(r, n)[s]) for r in range(n)]
        values = {(r + 1) % n: chunks[r][send].clone() for r, (send, _, _) in sent}
        for r, (_, recv, add) in sent:
            chunks[r][recv] = chunks[r][recv] + values[r] if add else values[r]
    return [torch.cat(c).reshape(parts[0].shape) for c in chunks]


# ---- the plan on the wire ---------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GroupPlan:
    """What the leader sends each member: the split, the addresses, the link cost."""

    group: str
    model: str
    start: int
    end: int
    split: SplitPlan
    addrs: Mapping[str, Sequence[str]]
    cost: LinkCost
    topology: str

    @property
    def leader(self) -> str:
        return self.split.members[0]

    def to_wire(self) -> dict[str, Any]:
        return {
            "op": "plan",
            "group": self.group,
            "model": self.model,
            "start": self.start,
            "end": self.end,
            "members": list(self.split.members),
            "shards": [s.to_wire() for s in self.split.shards],
            "addrs": {p: list(a) for p, a in self.addrs.items()},
            "cost": self.cost.to_wire(),
            "topology": self.topology,
        }

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> GroupPlan:
        try:
            members = body["members"]
            cost = body["cost"]
            addrs = body["addrs"]
            if not (
                isinstance(members, list)
                and all(isinstance(m, str) for m in members)
                and isinstance(cost, list)
                and len(cost) == 2
                and all(isinstance(c, int | float) for c in cost)
                and isinstance(addrs, dict)
                and body["topology"] in TOPOLOGIES
            ):
                raise SplitError("malformed plan")
            return cls(
                group=str(body["group"]),
                model=str(body["model"]),
                start=int(body["start"]),
                end=int(body["end"]),
                split=SplitPlan(tuple(members), tuple(Shard.from_wire(s) for s in body["shards"])),
                addrs={str(p): [str(a) for a in v] for p, v in addrs.items()},
                cost=LinkCost(rtt=float(cost[0]), seconds_per_byte=float(cost[1])),
                topology=str(body["topology"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SplitError(f"malformed plan: {exc!r}") from None


# ---- the runtime --------------------------------------------------------------------------


@dataclass
class _Slot:
    """One expected message (a ring chunk, or a star sum): set once, read once."""

    done: trio.Event = field(default_factory=trio.Event)
    header: dict[str, Any] = field(default_factory=dict)
    payload: bytes | bytearray | memoryview = b""


@dataclass
class _Star:
    """The leader's side of one star all-reduce: the parts by rank, then the sum."""

    parts: dict[int, torch.Tensor] = field(default_factory=dict)
    done: trio.Event = field(default_factory=trio.Event)
    reply: Message | None = None
    result: torch.Tensor | None = None


@dataclass
class _MemberSession:
    cache: SpanCache
    last_used: float


class TensorGroup:
    """This node's side of a formed group: its slices, its peers, the step protocol.

    ``weights`` is this member's :class:`ShardedSpan` (the leader's also holds the
    embedding/head of the span when it has them).
    """

    def __init__(
        self,
        host: Host,
        plan: GroupPlan,
        weights: ShardedSpan,
        *,
        forced: str = "auto",
        session_idle: float = 300.0,
    ) -> None:
        self.host = host
        self.plan = plan
        self.weights = weights
        self.forced = forced if forced != "auto" else plan.topology
        self.session_idle = session_idle
        self.me = str(host.peer_id)
        self.members = plan.split.members
        self.rank = self.members.index(self.me)
        self.n = len(self.members)
        self.hidden_size = weights.config.hidden_size
        self.context = weights.config.max_position_embeddings
        self.broken: str | None = None
        self.steps = 0
        self.topologies_used: dict[str, int] = {"star": 0, "ring": 0}
        self._seq = 0
        self._reduce_index = 0
        self._shape: tuple[int, ...] = ()
        self._stars: dict[tuple[int, int], _Star] = {}
        self._inbox: dict[tuple[int, int, int], _Slot] = {}
        self._sessions: dict[int, _MemberSession] = {}
        self._compute = trio.CapacityLimiter(1)
        self._on_broken: list[Callable[[str], None]] = []

    @property
    def leader(self) -> str:
        return self.members[0]

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def on_broken(self, callback: Callable[[str], None]) -> None:
        self._on_broken.append(callback)

    def info(self) -> dict[str, Any]:
        return {
            "group": self.plan.group,
            "members": list(self.members),
            "rank": self.rank,
            "shards": [s.to_wire() for s in self.plan.split.shards],
            "topology": self.forced,
            "cost": self.plan.cost.to_wire(),
            "topologies_used": dict(self.topologies_used),
            "steps": self.steps,
            "broken": self.broken,
        }

    def _break(self, reason: str) -> GroupError:
        if self.broken is None:
            self.broken = reason
            log.error("tensor-parallel group %s broke: %s", self.plan.group, reason)
            for callback in self._on_broken:
                callback(reason)
        return GroupError(f"tensor-parallel group {self.plan.group} is broken: {self.broken}")

    # ---- the leader's step ------------------------------------------------------------

    def run_blocks(
        self,
        weights: DecoderSpan,
        hidden: torch.Tensor,
        cache: SpanCache,
        position: int,
        start: int,
        end: int,
    ) -> torch.Tensor:
        """A :class:`SpanServer` block runner (on its worker thread): one group step."""
        out: torch.Tensor = trio.from_thread.run(
            self.leader_step, hidden, cache, position, start, end
        )
        return out

    async def leader_step(
        self, hidden: torch.Tensor, cache: SpanCache, position: int, start: int, end: int
    ) -> torch.Tensor:
        if self.broken is not None:
            raise self._break(self.broken)
        assert isinstance(cache, ShardCache)
        self._begin(self._seq + 1, hidden.shape)
        header, payload = codecs.encode(hidden)
        body = {
            "op": "step",
            "seq": self._seq,
            "session": cache.key,
            "position": position,
            "start": start,
            "end": end,
            "hidden": header,
        }
        result: list[torch.Tensor] = []

        async def own() -> None:
            result.append(await self._run(hidden, cache, position, start, end))

        try:
            async with trio.open_nursery() as nursery:
                for member in self.members[1:]:
                    nursery.start_soon(self._call_step, member, body, payload)
                nursery.start_soon(own)
        except Exception as exc:
            failures = [e for e in _leaves(exc) if isinstance(e, Error)]
            if failures and isinstance(failures[0], GroupError) and self.broken is not None:
                raise failures[0] from None
            raise self._break(str(failures[0] if failures else exc)) from exc
        self.steps += 1
        return result[0]

    async def _call_step(self, member: str, body: dict[str, Any], payload: bytes) -> None:
        try:
            await self.host.channels.call(ID.from_base58(member), TP, Message(body, payload))
        except Error as exc:
            raise self._break(f"member {member} failed a step: {exc}") from exc

    # ---- every member's step ----------------------------------------------------------

    def _begin(self, seq: int, shape: Sequence[int]) -> None:
        self._seq, self._reduce_index, self._shape = seq, 0, tuple(shape)
        self._stars = {k: v for k, v in self._stars.items() if k[0] >= seq}
        self._inbox = {k: v for k, v in self._inbox.items() if k[0] >= seq}

    async def _run(
        self, hidden: torch.Tensor, cache: SpanCache, position: int, start: int, end: int
    ) -> torch.Tensor:
        seq = self._seq

        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = trio.from_thread.run(self.all_reduce, seq, t)
            return out

        def compute() -> torch.Tensor:
            with torch.inference_mode():
                return run_sharded(self.weights, hidden, cache, position, start, end, all_reduce)

        return await trio.to_thread.run_sync(compute, limiter=self._compute)

    async def all_reduce(self, seq: int, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the group (every member calls this in the same order)."""
        index = self._reduce_index
        self._reduce_index += 1
        topology = choose_topology(
            self.n, tensor.numel() * tensor.element_size(), self.plan.cost, self.forced
        )
        self.topologies_used[topology] += 1
        try:
            with trio.fail_after(REDUCE_TIMEOUT):
                if topology == "ring":
                    return await self._ring(seq, index, tensor)
                return await self._star(seq, index, tensor)
        except trio.TooSlowError:
            raise self._break(
                f"all-reduce {seq}.{index} ({topology}) got nothing for {REDUCE_TIMEOUT}s"
            ) from None

    async def _star(self, seq: int, index: int, tensor: torch.Tensor) -> torch.Tensor:
        if self.is_leader:
            star = self._star_slot(seq, index)
            self._add_part(star, 0, tensor)
            await star.done.wait()
            assert star.result is not None
            return star.result
        header, payload = codecs.encode(tensor)
        body = {"op": "reduce", "seq": seq, "index": index, "part": header}
        try:
            reply = await self.host.channels.call(
                ID.from_base58(self.leader), TP, Message(body, payload)
            )
        except Error as exc:
            raise self._break(f"leader {self.leader} failed an all-reduce: {exc}") from exc
        try:
            return self._decode(reply.body.get("sum"), reply.payload, tensor.shape, self.leader)
        except GroupError as exc:
            raise self._break(str(exc)) from None

    def _star_slot(self, seq: int, index: int) -> _Star:
        return self._stars.setdefault((seq, index), _Star())

    def _add_part(self, star: _Star, rank: int, part: torch.Tensor) -> None:
        if rank in star.parts or star.done.is_set():
            raise GroupError(f"rank {rank} sent a second part")
        star.parts[rank] = part
        if len(star.parts) == self.n:
            total = star.parts[0].clone()
            for r in range(1, self.n):  # rank order: the same sum on every run
                total += star.parts[r]
            header, payload = codecs.encode(total)
            star.result, star.reply = total, Message({"sum": header}, payload)
            star.done.set()

    async def _ring(self, seq: int, index: int, tensor: torch.Tensor) -> torch.Tensor:
        chunks = list(tensor.reshape(-1).clone().tensor_split(self.n))
        nxt = ID.from_base58(self.members[(self.rank + 1) % self.n])
        prev = self.members[(self.rank - 1) % self.n]
        for step, (send, recv, add) in enumerate(ring_steps(self.rank, self.n)):
            header, payload = codecs.encode(chunks[send])
            body = {"op": "ring", "seq": seq, "index": index, "step": step, "chunk": header}
            received: list[torch.Tensor] = []

            async def push(body: dict[str, Any] = body, payload: bytes = payload) -> None:
                try:
                    await self.host.channels.call(nxt, TP, Message(body, payload))
                except Error as exc:
                    raise self._break(f"member {nxt} failed a ring step: {exc}") from exc

            async def pull(
                step: int = step, recv: int = recv, received: list[torch.Tensor] = received
            ) -> None:
                slot = self._inbox.setdefault((seq, index, step), _Slot())
                await slot.done.wait()
                del self._inbox[(seq, index, step)]
                shape = chunks[recv].shape
                try:
                    received.append(self._decode(slot.header, slot.payload, shape, prev))
                except GroupError as exc:
                    raise self._break(str(exc)) from None

            async with trio.open_nursery() as nursery:
                nursery.start_soon(push)
                nursery.start_soon(pull)
            chunks[recv] = chunks[recv] + received[0] if add else received[0]
        return torch.cat(chunks).reshape(tensor.shape)

    def _decode(
        self,
        header: Any,
        payload: bytes | bytearray | memoryview,
        shape: torch.Size | Sequence[int],
        sender: str,
    ) -> torch.Tensor:
        try:
            if not isinstance(header, dict) or list(header.get("shape", ())) != list(shape):
                got = header.get("shape") if isinstance(header, dict) else header
                raise CodecError("shape", f"{got!r}, expected {list(shape)}")
            if codecs.DTYPES.get(str(header.get("dtype"))) != self.weights.dtype:
                raise CodecError("dtype", f"{header.get('dtype')!r}, expected the model's")
            return codecs.decode(header, payload, max_elements=math.prod(shape))
        except CodecError as exc:
            raise GroupError(f"bad tensor from {sender}: {exc}") from None

    # ---- the protocol handler ---------------------------------------------------------

    async def handle(self, peer: ID, request: Message) -> Message:
        """``/shoal/tp/1`` calls of a formed group (the plan itself: :class:`GroupJoin`)."""
        sender = str(peer)
        body = request.body
        op = body.get("op")
        try:
            if sender not in self.members or sender == self.me:
                raise RpcError("not_member", f"{sender} is not a member of this group")
            if op == "step":
                return await self._rpc_step(sender, body, request.payload)
            seq, index = _ints(body, "seq", "index")
            if index >= 4 * _MAX_BLOCKS:
                raise RpcError("bad_request", f"index {index} is out of range")
            if op == "reduce":
                return await self._rpc_reduce(sender, seq, index, body, request.payload)
            if op == "ring":
                return self._rpc_ring(sender, seq, index, body, request.payload)
            raise RpcError("bad_request", f"unknown op {op!r}")
        except RpcError as exc:
            log.warning("bad %s call from %s: %s", op, sender, exc.message)
            raise

    async def _rpc_step(
        self, sender: str, body: Mapping[str, Any], payload: bytes | bytearray | memoryview
    ) -> Message:
        if sender != self.leader:
            raise RpcError("not_leader", f"steps come from the leader {self.leader}")
        seq, key, position, start, end = _ints(body, "seq", "session", "position", "start", "end")
        header = body.get("hidden")
        span = self.weights.span
        if not span.start <= start < end <= span.end:
            raise RpcError("bad_request", f"blocks {start}:{end} are not in {span}")
        shape = header.get("shape") if isinstance(header, dict) else None
        if not (
            isinstance(shape, list)
            and len(shape) == 3
            and shape[0] == 1
            and _is_int(shape[1])
            and shape[2] == self.hidden_size
            and 1 <= shape[1] <= self.context
            and 0 <= position <= self.context - shape[1]
        ):
            raise RpcError("bad_request", f"hidden: shape {shape!r} does not fit a step")
        try:
            hidden = self._decode(header, payload, shape, sender)
        except GroupError as exc:
            raise RpcError("bad_request", str(exc)) from None
        session = self._member_session(key, position)
        self._begin(seq, hidden.shape)
        await self._run(hidden, session.cache, position, start, end)
        session.last_used = trio.current_time()
        self.steps += 1
        return Message({"ok": True})

    def _member_session(self, key: int, position: int) -> _MemberSession:
        now = trio.current_time()
        for k, s in list(self._sessions.items()):
            if now - s.last_used > self.session_idle:
                del self._sessions[k]
        session = self._sessions.get(key)
        if session is None:
            if position != 0:
                raise RpcError("session_unknown", f"no cache for session {key}; replay it")
            session = _MemberSession(self.weights.new_cache(), now)
            self._sessions[key] = session
        elif position > session.cache.length:
            raise RpcError("session_unknown", f"session {key} holds {session.cache.length}")
        return session

    async def _rpc_reduce(
        self,
        sender: str,
        seq: int,
        index: int,
        body: Mapping[str, Any],
        payload: bytes | bytearray | memoryview,
    ) -> Message:
        if not self.is_leader or seq != self._seq:
            raise RpcError("bad_request", f"no star all-reduce {seq}.{index} here")
        part = self._decode_part(body.get("part"), payload, sender)
        star = self._star_slot(seq, index)
        try:
            self._add_part(star, self.members.index(sender), part)
        except GroupError as exc:
            raise RpcError("bad_request", str(exc)) from None
        with trio.fail_after(REDUCE_TIMEOUT):
            await star.done.wait()
        assert star.reply is not None
        return star.reply

    def _decode_part(
        self, header: Any, payload: bytes | bytearray | memoryview, sender: str
    ) -> torch.Tensor:
        try:
            return self._decode(header, payload, self._shape, sender)
        except GroupError as exc:
            raise RpcError("bad_request", str(exc)) from None

    def _rpc_ring(
        self,
        sender: str,
        seq: int,
        index: int,
        body: Mapping[str, Any],
        payload: bytes | bytearray | memoryview,
    ) -> Message:
        (step,) = _ints(body, "step")
        if sender != self.members[(self.rank - 1) % self.n]:
            raise RpcError("bad_request", "ring chunks come from the previous member")
        if not step < 2 * (self.n - 1) or not seq >= self._seq:
            raise RpcError("bad_request", f"no ring step {step!r} of {seq} expected")
        header = body.get("chunk")
        if not isinstance(header, dict) or len(payload) > MAX_MESSAGE:
            raise RpcError("bad_request", "chunk: expected a tensor header")
        if len(self._inbox) >= 8 * self.n:
            raise RpcError("busy", "too many ring chunks waiting")
        slot = self._inbox.setdefault((seq, index, step), _Slot())
        if slot.done.is_set():
            raise RpcError("bad_request", f"ring step {seq}.{index}.{step} sent twice")
        slot.header, slot.payload = dict(header), bytes(payload)
        slot.done.set()  # the shape is checked by the receiver, which knows it
        return Message({"ok": True})


_MAX_BLOCKS = 4096


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _ints(body: Mapping[str, Any], *names: str) -> list[int]:
    """The non-negative integers ``names`` of a request body; :class:`RpcError` if one is not."""
    values = [body.get(name) for name in names]
    bad = [name for name, value in zip(names, values, strict=True) if not _is_int(value)]
    if bad:
        raise RpcError("bad_request", f"{', '.join(bad)}: expected non-negative integers")
    return [int(v) for v in values if v is not None]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


# ---- forming a group ------------------------------------------------------------------------


def measure_speed(seconds: float = 0.3, size: int = 256) -> float:
    """This machine's fp32 matmul speed in GFLOP/s (a member's default weight); blocking."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    runs, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        a @ b
        runs += 1
    return 2 * size**3 * runs / elapsed / 1e9


#: Largest echo payload (the leader's bandwidth probe).
MAX_ECHO = 1 << 20
#: Seconds a member waits for the leader's plan once the group is complete.
PLAN_TIMEOUT = 120.0


def group_candidates(
    peers: Mapping[str, Mapping[str, Any]],
    online: set[str],
    *,
    group: str,
    model: str,
    start: int,
    end: int,
) -> dict[str, tuple[float, list[str]]]:
    """Online peers whose roster field ``tp`` names this group, model and span -> (their
    weight, their addresses). ``peers`` is the swarm state's ``peer`` section."""
    found: dict[str, tuple[float, list[str]]] = {}
    for peer, fields in peers.items():
        entry = fields.get("tp")
        if peer not in online or not isinstance(entry, Mapping):
            continue
        weight, addrs = entry.get("weight"), entry.get("addrs")
        if (
            entry.get("group") == group
            and entry.get("model") == model
            and entry.get("start") == start
            and entry.get("end") == end
            and isinstance(weight, int | float)
            and math.isfinite(weight)
            and weight > 0
            and isinstance(addrs, list)
        ):
            found[peer] = (float(weight), [str(a) for a in addrs if isinstance(a, str)])
    return found


class GroupJoin:
    """Serves ``/shoal/tp/1`` for this node: while forming, the leader's ``plan`` (and its
    ``echo`` probes); once formed, the group's calls (:meth:`TensorGroup.handle`).

    ``load(shard)`` loads this node's slices (blocking; run on a thread).
    """

    def __init__(
        self,
        host: Host,
        *,
        group: str,
        model: str,
        start: int,
        end: int,
        load: Callable[[Shard], ShardedSpan],
        topology: str = "auto",
        session_idle: float = 300.0,
    ) -> None:
        if topology not in TOPOLOGIES:
            raise GroupError(f"topology {topology!r}: use one of {', '.join(TOPOLOGIES)}")
        self.host = host
        self.name, self.model, self.start, self.end = group, model, start, end
        self.load = load
        self.topology = topology
        self.session_idle = session_idle
        self.me = str(host.peer_id)
        self.group: TensorGroup | None = None
        self.formed = trio.Event()
        self._joining = False

    def roster_field(self, weight: float) -> dict[str, Any]:
        """What this node writes as its roster field ``tp``."""
        return {
            "group": self.name,
            "model": self.model,
            "start": self.start,
            "end": self.end,
            "weight": weight,
            "addrs": self.host.advertised_addrs(),
        }

    async def handle(self, peer: ID, request: Message) -> Message:
        op = request.body.get("op")
        if op == "echo":
            if len(request.payload) > MAX_ECHO:
                raise RpcError("too_large", f"echo payloads are at most {MAX_ECHO} bytes")
            return Message({}, request.payload)
        if op == "plan":
            return await self._rpc_plan(str(peer), request.body)
        if self.group is None:
            raise RpcError("not_formed", f"group {self.name} is not formed here yet")
        return await self.group.handle(peer, request)

    async def _rpc_plan(self, sender: str, body: Mapping[str, Any]) -> Message:
        try:
            plan = GroupPlan.from_wire(body)
        except SplitError as exc:
            log.warning("bad plan from %s: %s", sender, exc)
            raise RpcError("bad_request", str(exc)) from None
        mine = (self.name, self.model, self.start, self.end)
        if (plan.group, plan.model, plan.start, plan.end) != mine:
            raise RpcError("bad_request", f"this node joins {mine}, not {plan.group}")
        if sender != plan.leader or self.me not in plan.split.members:
            raise RpcError("bad_request", "a plan comes from its leader and names this node")
        if self.group is not None or self._joining:
            raise RpcError("already_formed", f"this node is already in group {self.name}")
        self._joining = True
        try:
            weights = await trio.to_thread.run_sync(self.load, plan.split.shard_of(self.me))
            plan.split.check(weights.config)
            await self._connect(plan)
        except Error as exc:
            self._joining = False
            log.error("cannot join group %s: %s", self.name, exc)
            raise RpcError("join_failed", str(exc)) from None
        self.group = TensorGroup(
            self.host, plan, weights, forced=self.topology, session_idle=self.session_idle
        )
        log.info(
            "joined tensor-parallel group %s as rank %d of %d (leader %s)",
            self.name, self.group.rank, self.group.n, plan.leader,
        )  # fmt: skip
        self.formed.set()
        return Message({"ok": True})

    async def _connect(self, plan: GroupPlan) -> None:
        """Connect to the members this node sends to (the leader, the next in the ring)."""
        members = plan.split.members
        rank = members.index(self.me)
        for peer in {members[0], members[(rank + 1) % len(members)]} - {self.me}:
            await connect_peer(self.host, peer, plan.addrs.get(peer, ()))

    async def lead(
        self,
        candidates: Mapping[str, tuple[float, Sequence[str]]],
        model_config: ModelConfig,
        *,
        quantize: str | None = None,
    ) -> TensorGroup:
        """As the leader (lowest peer id): split, measure the links, send the plan to
        every member while loading this node's own slices."""
        weights_by_member = {peer: w for peer, (w, _) in candidates.items()}
        if len(weights_by_member) > model_config.num_kv_heads:
            fastest = sorted(weights_by_member, key=lambda p: (-weights_by_member[p], p))
            kept = set(fastest[: model_config.num_kv_heads]) | {self.me}
            left_out = sorted(set(weights_by_member) - kept)
            log.error(
                "group %s: %d members but %s has %d KV heads; leaving out %s",
                self.name, len(weights_by_member), self.model, model_config.num_kv_heads,
                ", ".join(left_out),
            )  # fmt: skip
            weights_by_member = {p: w for p, w in weights_by_member.items() if p in kept}
        split = plan_split(model_config, weights_by_member, quantize=quantize)
        if split.members[0] != self.me:
            raise GroupError(f"{split.members[0]} leads group {self.name}, not this node")
        addrs = {peer: list(candidates[peer][1]) for peer in split.members}
        for peer in split.members[1:]:
            await connect_peer(self.host, peer, addrs[peer])
        cost = await self.measure_links(split.members[1:])
        plan = GroupPlan(
            group=self.name,
            model=self.model,
            start=self.start,
            end=self.end,
            split=split,
            addrs=addrs,
            cost=cost,
            topology=self.topology,
        )
        loaded: list[ShardedSpan] = []

        async def own() -> None:
            loaded.append(await trio.to_thread.run_sync(self.load, split.shard_of(self.me)))

        async def send(peer: str) -> None:
            try:
                await self.host.channels.call(ID.from_base58(peer), TP, Message(plan.to_wire()))
            except Error as exc:
                raise GroupError(f"member {peer} did not join group {self.name}: {exc}") from exc

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(own)
                for peer in split.members[1:]:
                    nursery.start_soon(send, peer)
        except BaseExceptionGroup as group:
            errors = [e for e in _leaves(group) if isinstance(e, Error)]
            if errors:
                raise errors[0] from None
            raise
        self.group = TensorGroup(
            self.host, plan, loaded[0], forced=self.topology, session_idle=self.session_idle
        )
        self.formed.set()
        log.info(
            "leading tensor-parallel group %s: %d members, rtt %.2f ms, %.0f MB/s, shards %s",
            self.name, len(split.members), cost.rtt * 1e3,
            1e-6 / cost.seconds_per_byte if cost.seconds_per_byte > 0 else math.inf,
            [s.to_wire() for s in split.shards],
        )  # fmt: skip
        return self.group

    async def measure_links(self, members: Sequence[str], probe: int = 256 << 10) -> LinkCost:
        """The worst member link: small-message round trip (best of 5) and seconds per
        byte from a ``probe``-byte echo (best of 3), over the group's own channel."""
        rtt, per_byte = 0.0, 0.0
        for member in members:
            peer = ID.from_base58(member)
            small: list[float] = []
            large: list[float] = []
            for size, times in ((16, small), (16, small), (probe, large)) * 3:
                started = time.perf_counter()
                await self.host.channels.call(peer, TP, Message({"op": "echo"}, bytes(size)))
                times.append(time.perf_counter() - started)
            best = min(small)
            rtt = max(rtt, best)
            per_byte = max(per_byte, max(0.0, min(large) - best) / (2 * probe))
        return LinkCost(rtt=rtt, seconds_per_byte=per_byte)


async def connect_peer(host: Host, peer: str, addrs: Sequence[str]) -> None:
    """Make sure ``peer`` is connected, through one of ``addrs`` if it is not yet."""
    peer_id = ID.from_base58(peer)
    if host.is_connected(peer_id):
        return
    failure: Error | None = None
    for addr in addrs:
        try:
            await host.connect(addr if "/p2p/" in addr else f"{addr}/p2p/{peer}")
            return
        except Error as exc:
            failure = exc
    if failure is not None:
        raise GroupError(f"cannot reach member {peer}: {failure}")
