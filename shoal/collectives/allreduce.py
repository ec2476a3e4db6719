"""The fault-tolerant all-reduce of one peer, as a sans-io state machine.

Feed it events, collect the messages it wants sent::

    op = AllReduce(view, me)
    sends = op.contribute(tensor)              # local contribution ready
    sends = op.receive(peer, data)             # a message arrived from ``peer``
    sends = op.peer_failed(peer)               # the failure detector gave up on ``peer``
    sends = op.deadline()                      # a phase deadline passed
    op.result / op.error / op.rejections       # outcome, and what was refused on the way

Each call returns a list of :class:`Send` (destination, bytes); messages to itself are
handled inside. No clock, no sockets, no awaits. The protocol follows
design/allreduce-protocol.md (docs/collectives.md lists the simplifications):

* reduce-scatter: each member encodes its chunks with the view's codec and sends chunk c
  to ``owner(c, S)``; the owner reduces once it holds every contribution of ``S``, in
  sorted peer order in fp32, keeps ``decode(encode(R_c))``, replicates it to the backup,
  and reports ``CHUNK_DONE(c, h_c)`` to the coordinator;
* failures before the commit shrink ``S`` (``AMEND``, global removal); chunks of a removed
  owner move to the next candidate, and senders resend only those chunks;
* commit: the coordinator proposes the digest vector (``RCOMMIT``) and announces
  ``CHOSEN`` once a majority of the view's members stored it (single-decree Paxos, with
  takeover by ``RECOVER``/``RSTATE`` at a higher epoch when the coordinator fails);
* all-gather: members fetch every chunk they lack from owner, backup, then anyone, and
  verify it against the chosen digest; they complete only with ``CHOSEN`` and every chunk,
  and then say ``DONE``: a peer drops the chunks it holds for others once every member it
  does not suspect is done.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import blake3
import torch

from shoal.collectives import codec as chunk_codec
from shoal.collectives import wire
from shoal.collectives.errors import (
    BadContribution,
    ChunkUnavailable,
    CollectiveError,
    MalformedMessage,
    NoQuorum,
    OperationFailed,
    Rejected,
    Stalled,
)
from shoal.collectives.view import View


@dataclass(frozen=True, slots=True)
class Send:
    """A message for the driver to deliver to ``to``: the frame's length prefix and
    header, then its payload (a view of the tensor bytes: written as it is, not copied
    into the frame)."""

    to: str
    head: bytes
    payload: wire.Payload = b""

    @property
    def data(self) -> bytes:
        """The whole frame as one bytes object (a copy: for tests and the memory network)."""
        return self.head + bytes(self.payload) if self.payload else self.head

    @property
    def nbytes(self) -> int:
        return len(self.head) + len(self.payload)


@dataclass(frozen=True, slots=True)
class Decision:
    """The value the commit fixes: the amendment it belongs to, the contributor set S
    (sorted) and the digest of every reduced chunk."""

    version: tuple[int, int]
    contributors: tuple[str, ...]
    digests: tuple[bytes, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "ve": self.version[0],
            "vn": self.version[1],
            "s": list(self.contributors),
            "d": list(self.digests),
        }

    @classmethod
    def from_wire(cls, v: Mapping[str, Any]) -> Decision:
        return cls((v["ve"], v["vn"]), tuple(v["s"]), tuple(v["d"]))


@dataclass(frozen=True)
class AllReduceResult:
    """What a completed peer holds: the same bytes on every completed peer."""

    tag: str
    tensor: torch.Tensor  # fp32, the view's shape
    contributors: tuple[str, ...]
    chunk_digests: tuple[bytes, ...]

    @cached_property
    def digest(self) -> bytes:
        """sha256 of the tensor's bytes (computed when first asked: 64 MiB take ~50 ms)."""
        return hashlib.sha256(self.tensor.numpy().data).digest()  # the buffer, no copy


def digest(payload: wire.Payload) -> bytes:
    """A chunk's digest: BLAKE3 truncated to 128 bits (3.4x sha256's speed with SHA
    instructions here, and faster still where the CPU has none: docs/collectives.md)."""
    return blake3.blake3(payload).digest(length=16)


def reduce_chunk(
    view: View,
    contributors: tuple[str, ...],
    slots: Mapping[str, chunk_codec.Slot],
    n: int,
    alloc: chunk_codec.Alloc = bytearray,
) -> wire.Payload:
    """The canonical reduction of a chunk of ``n`` elements, encoded with the view's
    codec: sum of w_i * x_i in sorted peer order, in fp32, divided by the sum of the
    weights (:func:`~shoal.collectives.codec.reduce_encode`). Raises
    :class:`~shoal.collectives.codec.NonFiniteParts` naming the peers whose
    contributions hold NaN or infinity."""
    order = sorted(contributors)
    parts = [(slots[peer], view.weight(peer)) for peer in order]
    try:
        return chunk_codec.reduce_encode(parts, view.codec, n, view.block, alloc)
    except chunk_codec.NonFiniteParts as exc:
        raise chunk_codec.NonFiniteParts(exc.indices, [order[i] for i in exc.indices]) from exc


@dataclass(slots=True)
class _Coordinator:
    epoch: int
    phase: str  # "recover" | "collect" | "commit" | "chosen" | "aborted"
    version: tuple[int, int]
    contributors: frozenset[str]
    done: dict[int, bytes] = field(default_factory=dict)
    acks: set[str] = field(default_factory=set)
    decision: Decision | None = None
    states: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)  # suspected while recovering


class Receiver:
    """``receive`` (whole frames) and ``receive_frame`` (frames a transport parsed) of an
    operation: a refused message is recorded in ``rejections``; an accepted one goes to
    ``_accept``."""

    view: View
    max_message_bytes: int
    rejections: list[Rejected]

    def receive(self, sender: str, data: bytes | memoryview) -> list[Send]:
        return self._parse_then(
            sender,
            lambda: wire.decode_for(self.view, sender, data, max_bytes=self.max_message_bytes),
        )

    def receive_frame(
        self, sender: str, header: Mapping[str, Any], payload: wire.Payload
    ) -> list[Send]:
        """:meth:`receive` of a frame a transport parsed already (no rebuilt copy)."""
        return self._parse_then(
            sender,
            lambda: wire.frame_for(
                self.view, sender, header, payload, max_bytes=self.max_message_bytes
            ),
        )

    def _parse_then(self, sender: str, parse: Callable[[], wire.Message]) -> list[Send]:
        try:
            msg = parse()
        except Rejected as exc:
            self.rejections.append(exc)
            return []
        return self._accept(sender, msg)

    def _accept(self, sender: str, msg: wire.Message) -> list[Send]:
        raise NotImplementedError


class AllReduce(Receiver):
    """One peer's side of one all-reduce operation (one view)."""

    def __init__(
        self,
        view: View,
        me: str,
        *,
        out: torch.Tensor | None = None,
        alloc: chunk_codec.Alloc = bytearray,
    ) -> None:
        """``out``: where the result goes (a contiguous fp32 CPU tensor of the view's
        shape, e.g. the contribution itself, as gloo's in-place all-reduce); a new tensor
        without it. It is written from the commit on, chunk by chunk as they arrive (the
        contribution is not needed any more then): an operation that fails after its
        commit may leave part of the result in it. ``alloc``: where the buffers of encoded
        contributions and reduced chunks come from (a driver passes its pool's ``take``,
        callable from any thread)."""
        if me not in view.peers:
            raise CollectiveError(f"{me} is not a member of {view.tag!r}")
        if out is not None and (
            tuple(out.shape) != view.shape
            or out.dtype != torch.float32
            or out.device.type != "cpu"
            or not out.is_contiguous()
        ):
            raise CollectiveError(
                f"out must be a contiguous fp32 CPU tensor of shape {view.shape}, "
                f"not {out.dtype} {tuple(out.shape)} on {out.device}"
            )
        self._into = out
        self._alloc = alloc
        self._flat: torch.Tensor | None = None  # the result, decoded chunk by chunk
        self._decoded: set[int] = set()
        self.view = view
        self.me = me
        self.result: AllReduceResult | None = None
        self.error: OperationFailed | None = None
        self.rejections: list[Rejected] = []
        self.max_message_bytes = wire.max_message_bytes(view.max_chunk_nbytes())
        self._out: list[Send] = []
        self._local: deque[wire.Message] = deque()
        self._suspected: set[str] = set()
        self._bad: set[str] = set()  # members whose contribution this peer refused
        self._deadlines = 0
        # member: its encoded contribution per chunk, and where it went
        self._mine: list[tuple[dict[str, Any], wire.Payload]] | None = None
        self._abstained = False
        self._sent: set[tuple[int, str]] = set()
        self._promised = 0
        self._expected = 0  # the epoch whose coordinator this peer waits for (>= promised)
        self._version = (0, 0)
        self._contributors = frozenset(view.peers)
        # owner: decoded contributions, reduced chunks, replication
        self._slots: dict[int, dict[str, chunk_codec.Slot]] = {}
        self._reduced: dict[tuple[int, frozenset[str]], tuple[wire.Payload, bytes]] = {}
        self._store: dict[tuple[int, bytes], wire.Payload] = {}
        self._awaiting_ack: dict[int, tuple[bytes, str]] = {}
        self._acked: set[tuple[int, bytes, str]] = set()
        self._done: set[str] = set()  # members that hold the result (DONE)
        # acceptor and learner
        self._accepted: tuple[int, Decision] | None = None
        self.chosen: Decision | None = None
        self._fetch: dict[int, list[str]] = {}  # chunk -> holders still to try (first = asked)
        # coordinator of epoch 0 starts with everyone's implicit promise
        self._coord: _Coordinator | None = None
        if view.coordinator(0) == me:
            self._coord = _Coordinator(0, "collect", (0, 0), frozenset(view.peers))

    # ------------------------------------------------------------------ events

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None

    @property
    def held(self) -> int:
        """Chunks this peer holds to serve FETCH (0 once every live member is DONE)."""
        return len(self._store)

    def prepare(self, tensor: torch.Tensor) -> None:
        """Check and encode the local contribution, the CPU work of :meth:`contribute`
        (a driver runs it on a worker thread before it registers the operation). Raises
        :class:`BadContribution` (and changes nothing) when it has the wrong shape or
        dtype or holds NaN/inf."""
        view = self.view
        chunk_codec.check_contribution(self.me, tensor, view.shape, view.codec)
        if self._mine is not None or self._abstained:
            raise CollectiveError(f"{self.me} already contributed to {view.tag!r}")
        bounds = [view.chunk(c) for c in range(view.n_chunks)]
        flat = tensor.detach().reshape(-1)
        self._mine = chunk_codec.encode_contribution(
            self.me, flat, bounds, view.codec, view.block, self._alloc
        )

    def contribute(self, tensor: torch.Tensor | None = None) -> list[Send]:
        """The local contribution is ready (``None``: the one given to :meth:`prepare`);
        raises as :meth:`prepare` does."""
        if tensor is not None:
            self.prepare(tensor)
        elif self._mine is None:
            raise CollectiveError(f"{self.me} has no contribution prepared for {self.view.tag!r}")
        return self._run(self._send_data)

    def abstain(self, reason: str = "abstained") -> list[Send]:
        """Take part without a contribution (e.g. a NaN pseudo-gradient): the coordinator
        drops this peer from S, and it still receives the result."""
        self._abstained = True
        self._bad.add(self.me)
        return self._run(lambda: self._report(self.me, "bad"))

    def _accept(self, sender: str, msg: wire.Message) -> list[Send]:
        return self._run(lambda: self._handle(sender, msg))

    def peer_failed(self, peer: str) -> list[Send]:
        return self._run(lambda: self._on_failed(peer))

    def deadline(self) -> list[Send]:
        """A phase deadline passed: suspect whoever this peer waits on; with nobody left
        to suspect, give up (:class:`Stalled`)."""
        return self._run(self._on_deadline)

    # ------------------------------------------------------------------ plumbing

    def _run(self, action: Callable[[], None]) -> list[Send]:
        action()
        while self._local:
            msg = self._local.popleft()
            self._handle(self.me, msg)
        out, self._out = self._out, []
        return out

    def _send(
        self, to: str, kind: str, fields: Mapping[str, Any], payload: wire.Payload = b""
    ) -> None:
        if to == self.me:
            self._local.append(wire.Message(kind, self.view.tag, self.view.vh, fields, payload))
        elif to not in self._suspected:
            self._out.append(
                Send(to, *wire.encode_parts(kind, self.view.tag, self.view.vh, fields, payload))
            )

    def _broadcast(self, kind: str, fields: Mapping[str, Any]) -> None:
        for peer in self.view.peers:
            self._send(peer, kind, fields)

    def _fail(self, error: OperationFailed) -> None:
        if not self.finished:
            self.error = error

    def _reject(self, error: Rejected) -> None:
        self.rejections.append(error)

    def _handle(self, sender: str, msg: wire.Message) -> None:
        handler = getattr(self, f"_on_{msg.type.lower()}", None)
        if handler is None:
            self._reject(MalformedMessage(sender, f"{msg.type} is not an all-reduce message"))
            return
        handler(sender, msg)

    # ------------------------------------------------------------------ member

    def _send_data(self) -> None:
        """Send each chunk of the contribution to its current owner (once per owner)."""
        if self._mine is None or self.me not in self._contributors or self.chosen:
            return
        for c in range(self.view.n_chunks):
            owner = self.view.owner(c, self._contributors)
            if owner is not None and (c, owner) not in self._sent:
                self._sent.add((c, owner))
                header, payload = self._mine[c]
                self._send(owner, "DATA", {"c": c, "x": header}, payload)

    def _coordinator(self) -> str:
        return self.view.coordinator(max(self._promised, self._expected))

    def _report(self, peer: str, kind: str) -> None:
        self._send(self._coordinator(), "SUSPECT", {"p": peer, "k": kind})

    def _on_amend(self, sender: str, msg: wire.Message) -> None:
        e, n = msg.fields["e"], msg.fields["m"]
        if sender != self.view.coordinator(e) or not set(msg.fields["s"]) <= set(self.view.peers):
            self._reject(MalformedMessage(sender, "AMEND from a peer that is not its coordinator"))
            return
        if e < self._promised:
            self._send(sender, "NACK", {"e": self._promised})
            return
        if (e, n) <= self._version:
            return
        self._promised = e
        self._expected = max(self._expected, e)
        self._version = (e, n)
        self._contributors = frozenset(msg.fields["s"])
        self._awaiting_ack.clear()
        for peer in sorted(self._bad & self._contributors):  # a new coordinator may not know
            self._report(peer, "bad")
        self._send_data()
        for c in range(self.view.n_chunks):
            self._try_reduce(c)

    def _on_rcommit(self, sender: str, msg: wire.Message) -> None:
        e = msg.fields["e"]
        if sender != self.view.coordinator(e):
            self._reject(
                MalformedMessage(sender, "RCOMMIT from a peer that is not its coordinator")
            )
            return
        if e < self._promised:
            self._send(sender, "NACK", {"e": self._promised})
            return
        decision = Decision.from_wire(msg.fields["val"])
        if not self._valid_decision(sender, decision):
            return
        self._promised = e
        self._expected = max(self._expected, e)
        self._accepted = (e, decision)
        self._send(sender, "RC_ACK", {"e": e})

    def _on_chosen(self, sender: str, msg: wire.Message) -> None:
        decision = Decision.from_wire(msg.fields["val"])
        if not self._valid_decision(sender, decision):
            return
        if self.chosen is not None:
            if decision != self.chosen:  # impossible unless a peer is buggy or Byzantine
                self._reject(MalformedMessage(sender, "CHOSEN differs from the chosen value"))
            return
        self.chosen = decision
        # the contributions are no longer needed (the chosen chunks are in the store)
        self._mine, self._slots, self._reduced = None, {}, {}
        coord = self._coord
        if coord is not None and coord.phase != "chosen":
            coord.phase, coord.decision = "chosen", decision
            self._broadcast("CHOSEN", {"e": coord.epoch, "val": decision.to_wire()})
        for c in range(self.view.n_chunks):
            self._fetch_next(c, start=True)
        self._maybe_complete()

    def _valid_decision(self, sender: str, d: Decision) -> bool:
        if (
            len(d.digests) != self.view.n_chunks
            or not d.contributors
            or not set(d.contributors) <= set(self.view.peers)
        ):
            self._reject(MalformedMessage(sender, "decision does not fit the view"))
            return False
        return True

    def _on_recover(self, sender: str, msg: wire.Message) -> None:
        e = msg.fields["e"]
        if sender != self.view.coordinator(e):
            self._reject(
                MalformedMessage(sender, "RECOVER from a peer that is not its coordinator")
            )
            return
        if self.chosen is not None:  # a fact: tell the new coordinator directly
            self._send(sender, "CHOSEN", {"e": e, "val": self.chosen.to_wire()})
            return
        if e < self._promised or (e == self._promised and sender != self.me):
            self._send(sender, "NACK", {"e": self._promised})
            return
        self._promised = e
        self._expected = max(self._expected, e)
        if self._coord is not None and self._coord.epoch < e:
            self._coord = None  # a higher epoch took over
        ae, acc = self._accepted if self._accepted else (-1, None)
        self._send(
            sender,
            "RSTATE",
            {
                "e": e,
                "ae": ae,
                "acc": acc.to_wire() if acc else None,
                "ve": self._version[0],
                "vn": self._version[1],
                "s": sorted(self._contributors),
                "sus": sorted(self._suspected | self._bad),
            },
        )

    def _on_abort(self, sender: str, msg: wire.Message) -> None:
        if sender == self._coordinator() and self.chosen is None:
            self._fail(OperationFailed(self.view.tag, f"aborted by {sender}: {msg.fields['why']}"))

    # ------------------------------------------------------------------ owner

    def _on_data(self, sender: str, msg: wire.Message) -> None:
        c = msg.fields["c"]
        if c >= self.view.n_chunks:
            self._reject(MalformedMessage(sender, f"chunk {c} does not exist"))
            return
        slots = self._slots.setdefault(c, {})
        if sender in slots or sender in self._bad or self.chosen:
            return
        try:
            values = chunk_codec.accept_chunk(
                sender,
                msg.fields["x"],
                msg.payload,
                codec=self.view.codec,
                n=self.view.chunk_len(c),
                block=self.view.block,
            )
        except BadContribution as exc:
            self._refuse(sender, exc)
            return
        slots[sender] = values
        self._try_reduce(c)

    def _refuse(self, sender: str, error: BadContribution) -> None:
        """A contribution is refused: the coordinator drops its sender from S."""
        self._reject(error)
        self._bad.add(sender)
        self._report(sender, "bad")

    def _try_reduce(self, c: int) -> None:
        """Reduce chunk c if this peer owns it and holds every contribution of S."""
        S = self._contributors
        if self.chosen or self.view.owner(c, S) != self.me or c in self._awaiting_ack:
            return
        slots = self._slots.get(c, {})
        if not S.issubset(slots.keys()):
            return
        key = (c, S)
        if key not in self._reduced:
            try:
                n = self.view.chunk_len(c)
                encoded = reduce_chunk(self.view, tuple(S), slots, n, self._alloc)
            except chunk_codec.NonFiniteParts as exc:
                for peer in exc.peers:
                    self._refuse(peer, BadContribution(peer, "nonfinite", "NaN or infinity"))
                    del slots[peer]
                return
            self._reduced[key] = (encoded, digest(encoded))
        payload, h = self._reduced[key]
        self._store[(c, h)] = payload
        backup = self.view.backup(c, S)
        if backup is None or (c, h, backup) in self._acked:
            self._chunk_done(c, h)
        else:
            self._awaiting_ack[c] = (h, backup)
            self._send(backup, "REPL", {"c": c, "h": h}, payload)

    def _chunk_done(self, c: int, h: bytes) -> None:
        e, n = self._version
        self._send(self._coordinator(), "CHUNK_DONE", {"c": c, "e": e, "m": n, "h": h})

    def _on_repl(self, sender: str, msg: wire.Message) -> None:
        c, h = msg.fields["c"], msg.fields["h"]
        if c >= self.view.n_chunks or len(msg.payload) != self.view.chunk_nbytes(c):
            self._reject(MalformedMessage(sender, f"REPL of chunk {c} has the wrong size"))
            return
        if digest(msg.payload) != h:
            self._reject(MalformedMessage(sender, f"REPL of chunk {c} does not match its digest"))
            return
        self._store[(c, h)] = msg.payload  # a view of the received frame, not a copy
        self._send(sender, "REPL_ACK", {"c": c, "h": h})

    def _on_repl_ack(self, sender: str, msg: wire.Message) -> None:
        c, h = msg.fields["c"], msg.fields["h"]
        self._acked.add((c, h, sender))
        if self._awaiting_ack.get(c) == (h, sender):
            del self._awaiting_ack[c]
            self._chunk_done(c, h)

    # ------------------------------------------------------------------ all-gather

    def _on_fetch(self, sender: str, msg: wire.Message) -> None:
        c, h = msg.fields["c"], msg.fields["h"]
        payload = self._store.get((c, h))
        if payload is None:
            self._send(sender, "NOHAVE", {"c": c, "h": h})
        else:
            self._send(sender, "CHUNK", {"c": c, "h": h}, payload)

    def _fetch_next(self, c: int, *, start: bool = False) -> None:
        assert self.chosen is not None
        h = self.chosen.digests[c]
        if (c, h) in self._store or self.finished:
            self._fetch.pop(c, None)
            return
        if start:
            self._fetch[c] = self.view.holders(c, self.chosen.contributors)
        else:
            self._fetch[c].pop(0)
        queue = self._fetch[c]
        while queue and (queue[0] == self.me or queue[0] in self._suspected):
            queue.pop(0)
        if not queue:
            self._fail(ChunkUnavailable(self.view.tag, c))
            return
        self._send(queue[0], "FETCH", {"c": c, "h": h})

    def _on_chunk(self, sender: str, msg: wire.Message) -> None:
        c, h = msg.fields["c"], msg.fields["h"]
        if self.chosen is None or c >= self.view.n_chunks or self._asked(c) != sender:
            return
        if h != self.chosen.digests[c] or digest(msg.payload) != h:
            self._reject(MalformedMessage(sender, f"chunk {c} does not match the chosen digest"))
            self._fetch_next(c)
            return
        self._store[(c, h)] = msg.payload
        del self._fetch[c]
        self._maybe_complete()

    def _on_nohave(self, sender: str, msg: wire.Message) -> None:
        c = msg.fields["c"]
        if self.chosen is not None and self._asked(c) == sender:
            self._fetch_next(c)

    def _asked(self, c: int) -> str | None:
        queue = self._fetch.get(c)
        return queue[0] if queue else None

    def _maybe_complete(self) -> None:
        """Decode every chosen chunk held and not decoded yet into the result (chunk by
        chunk as they arrive, so the last one to arrive is the only one left to decode);
        complete when all are."""
        d = self.chosen
        if d is None or self.finished:
            return
        view = self.view
        if self._flat is None:
            self._flat = self._into.view(-1) if self._into is not None else torch.empty(view.numel)
        missing = False
        for c, h in enumerate(d.digests):
            payload = self._store.get((c, h)) if c not in self._decoded else None
            if payload is not None:
                lo, hi = view.chunk(c)
                chunk_codec.decode_into(self._flat[lo:hi], payload, view.codec, view.block)
                self._decoded.add(c)
            missing |= c not in self._decoded
        if missing:
            return
        self.result = AllReduceResult(
            view.tag, self._flat.reshape(view.shape), d.contributors, d.digests
        )
        self._broadcast("DONE", {})

    def _on_done(self, sender: str, msg: wire.Message) -> None:
        self._done.add(sender)
        self._release()

    def _release(self) -> None:
        """Once every member not suspected holds the result, nobody will FETCH again: the
        chunks held for them go (their buffers return to the driver's pool), long before
        the driver forgets the operation (``retain``). A late FETCH gets NOHAVE."""
        if self.result is not None and set(self.view.peers) - self._suspected <= self._done:
            self._store.clear()

    # ------------------------------------------------------------------ failures

    def _on_failed(self, peer: str) -> None:
        if peer == self.me or peer not in self.view.peers or peer in self._suspected:
            return
        self._suspected.add(peer)
        if self.chosen is not None:
            self._release()
            if peer == self._coordinator():
                # others may be waiting for CHOSEN from it: the value is a fact, relay it
                self._broadcast("CHOSEN", {"e": self._promised, "val": self.chosen.to_wire()})
            for c, queue in list(self._fetch.items()):
                if queue and queue[0] == peer:
                    self._fetch_next(c)
            return
        if len(set(self.view.peers) - self._suspected) < self.view.quorum:
            self._fail(
                NoQuorum(
                    self.view.tag,
                    f"{len(self._suspected)} of {len(self.view.peers)} members unreachable",
                )
            )
            return
        if self._coord is not None:
            self._coord_exclude(peer)
        elif peer == self._coordinator():
            self._take_over()
        else:
            self._report(peer, "failed")

    def _on_suspect(self, sender: str, msg: wire.Message) -> None:
        peer, kind = msg.fields["p"], msg.fields["k"]
        if peer not in self.view.peers or kind not in ("failed", "bad"):
            self._reject(MalformedMessage(sender, f"SUSPECT of {peer!r} ({kind!r})"))
            return
        if self._coord is not None and self.chosen is None:
            self._coord_exclude(peer)

    def _on_deadline(self) -> None:
        if self.finished:
            return
        self._deadlines += 1
        direct, indirect = self._waiting_on()
        waiting = direct - self._suspected - {self.me}
        if not waiting and self._deadlines >= 2:
            waiting = indirect - self._suspected - {self.me}
            if not waiting:
                self._fail(Stalled(self.view.tag, "a deadline passed with nobody left to suspect"))
        for peer in sorted(waiting):
            self._on_failed(peer)

    def _waiting_on(self) -> tuple[set[str], set[str]]:
        """Whom this peer waits on: directly (senders, backups, voters, holders), and
        indirectly (owners that have not reported, the coordinator): the second set is
        suspected only after a second deadline, so a slow sender is blamed, not its owner."""
        if self.chosen is not None:
            return {q[0] for q in self._fetch.values() if q}, set()
        direct: set[str] = set()
        S = self._contributors
        for c in range(self.view.n_chunks):
            if self.view.owner(c, S) == self.me:
                direct |= S - self._slots.get(c, {}).keys()
        direct |= {backup for _, backup in self._awaiting_ack.values()}
        coord = self._coord
        if coord is not None and coord.phase == "recover":
            direct |= set(self.view.peers) - coord.states.keys()
        if coord is not None and coord.phase == "commit":
            direct |= set(self.view.peers) - coord.acks
        if coord is not None and coord.phase == "collect":
            indirect = {
                owner
                for c in range(self.view.n_chunks)
                if c not in coord.done and (owner := self.view.owner(c, coord.contributors))
            }
            return direct, indirect
        return direct, {self._coordinator()}

    # ------------------------------------------------------------------ coordinator

    def _take_over(self) -> None:
        """The coordinator failed: the next unsuspected one in the ranking takes over at a
        higher epoch. If that is this peer, it starts recovery (Paxos phase 1)."""
        e = max(self._promised, self._expected) + 1
        while self.view.coordinator(e) in self._suspected:
            e += 1
        self._expected = e
        if self.view.coordinator(e) != self.me:
            return
        self._coord = _Coordinator(e, "recover", self._version, self._contributors)
        self._broadcast("RECOVER", {"e": e})

    def _on_rstate(self, sender: str, msg: wire.Message) -> None:
        coord = self._coord
        if coord is None or coord.phase != "recover" or msg.fields["e"] != coord.epoch:
            return
        coord.states[sender] = msg.fields
        if len(coord.states) < self.view.quorum:
            return
        accepted = [s for s in coord.states.values() if s["acc"] is not None]
        if accepted:  # Paxos rule: re-propose the highest-epoch accepted value unchanged
            best = max(accepted, key=lambda s: s["ae"])
            self._coord_propose(Decision.from_wire(best["acc"]))
            return
        latest = max(coord.states.values(), key=lambda s: (s["ve"], s["vn"]))
        gone = coord.gone.union(*(set(s["sus"]) for s in coord.states.values()))
        coord.phase, coord.version = "collect", (coord.epoch, 0)
        coord.contributors = frozenset(latest["s"]) - gone
        self._coord_announce()

    def _coord_exclude(self, peer: str) -> None:
        coord = self._coord
        assert coord is not None
        if coord.phase == "recover":
            coord.gone.add(peer)  # applied with the RSTATE suspect lists in _on_rstate
            return
        if coord.phase != "collect" or peer not in coord.contributors:
            return
        coord.contributors = coord.contributors - {peer}
        coord.version = (coord.epoch, coord.version[1] + 1)
        self._coord_announce()

    def _coord_announce(self) -> None:
        coord = self._coord
        assert coord is not None
        coord.done.clear()
        S = coord.contributors
        if not S or any(self.view.owner(c, S) is None for c in range(self.view.n_chunks)):
            coord.phase = "aborted"
            self._broadcast("ABORT", {"why": "no contributor (or no owner) left"})
            return
        e, n = coord.version
        self._broadcast("AMEND", {"e": e, "m": n, "s": sorted(S)})

    def _on_chunk_done(self, sender: str, msg: wire.Message) -> None:
        coord = self._coord
        f = msg.fields
        if coord is None or coord.phase != "collect" or (f["e"], f["m"]) != coord.version:
            return
        c = f["c"]
        if c >= self.view.n_chunks or self.view.owner(c, coord.contributors) != sender:
            return
        coord.done[c] = f["h"]
        self._coord_progress()

    def _coord_progress(self) -> None:
        coord = self._coord
        if coord is None or coord.phase != "collect" or len(coord.done) < self.view.n_chunks:
            return
        digests = tuple(coord.done[c] for c in range(self.view.n_chunks))
        self._coord_propose(Decision(coord.version, tuple(sorted(coord.contributors)), digests))

    def _coord_propose(self, decision: Decision) -> None:
        coord = self._coord
        assert coord is not None
        coord.phase, coord.decision, coord.acks = "commit", decision, set()
        self._broadcast("RCOMMIT", {"e": coord.epoch, "val": decision.to_wire()})

    def _on_rc_ack(self, sender: str, msg: wire.Message) -> None:
        coord = self._coord
        if coord is None or coord.phase != "commit" or msg.fields["e"] != coord.epoch:
            return
        coord.acks.add(sender)
        if len(coord.acks) >= self.view.quorum:
            assert coord.decision is not None
            coord.phase = "chosen"
            self._broadcast("CHOSEN", {"e": coord.epoch, "val": coord.decision.to_wire()})

    def _on_nack(self, sender: str, msg: wire.Message) -> None:
        coord = self._coord
        if coord is not None and msg.fields["e"] > coord.epoch:
            self._coord = None  # a later coordinator took over; this one steps down
            self._promised = max(self._promised, msg.fields["e"])
