"""Several collective operations in flight on one peer, told apart by their tag.

:class:`Collectives` routes each incoming message to the operation its header names
(``o``, the tag). A message for a tag this peer has not started yet (a fast peer began
the next fragment first) is held in a bounded buffer and replayed on :meth:`start`;
beyond the buffer's limits it is refused. The same event API as one operation, so a
driver (the in-memory network, a libp2p driver) feeds one object per peer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

from shoal.collectives import wire
from shoal.collectives.allreduce import AllReduceResult, Send
from shoal.collectives.errors import CollectiveError, MessageTooLarge, OperationFailed, Rejected
from shoal.collectives.view import View
from shoal.transport.framing import encode_header

MAX_EARLY_MESSAGES = 1024
MAX_EARLY_BYTES = 64 << 20


class Operation(Protocol):
    me: str
    view: View
    max_message_bytes: int
    result: AllReduceResult | None
    error: OperationFailed | None
    rejections: list[Rejected]

    @property
    def finished(self) -> bool: ...

    def receive(self, sender: str, data: bytes | memoryview) -> list[Send]: ...

    def receive_frame(
        self, sender: str, header: Mapping[str, Any], payload: wire.Payload
    ) -> list[Send]: ...

    def peer_failed(self, peer: str) -> list[Send]: ...

    def deadline(self) -> list[Send]: ...


class Collectives:
    """All of one peer's operations, by tag."""

    def __init__(
        self,
        me: str,
        *,
        max_early_messages: int = MAX_EARLY_MESSAGES,
        max_early_bytes: int = MAX_EARLY_BYTES,
    ) -> None:
        self.me = me
        self.ops: dict[str, Operation] = {}
        self.rejections: list[Rejected] = []
        self._early: deque[tuple[str, str, bytes]] = deque()
        self._early_bytes = 0
        self._failed: set[str] = set()
        self._forgotten: set[str] = set()
        self.max_early_messages = max_early_messages
        self.max_early_bytes = max_early_bytes

    @property
    def finished(self) -> bool:
        return all(op.finished for op in self.ops.values())

    @property
    def held(self) -> int:
        """Messages held for operations not started yet."""
        return len(self._early)

    def start(self, tag: str, op: Operation) -> list[Send]:
        """Register operation ``tag`` (then call its ``contribute``) and replay what
        arrived for it early, and the failures already known."""
        if tag in self.ops or tag in self._forgotten:
            raise CollectiveError(f"operation {tag!r} is already running (or was run)")
        if op.me != self.me:
            raise CollectiveError(f"operation {tag!r} belongs to {op.me}, not {self.me}")
        self.ops[tag] = op
        out: list[Send] = []
        for peer in sorted(self._failed):
            out += op.peer_failed(peer)
        kept: deque[tuple[str, str, bytes]] = deque()
        for early_tag, sender, data in self._early:
            if early_tag == tag:
                self._early_bytes -= len(data)
                out += op.receive(sender, data)
            else:
                kept.append((early_tag, sender, data))
        self._early = kept
        return out

    def readmit(self, peer: str) -> None:
        """``peer`` is back (a restarted process with its identity): operations started
        from now on count it as alive; those that saw it fail keep it failed."""
        self._failed.discard(peer)

    def receive(self, sender: str, data: bytes | memoryview) -> list[Send]:
        try:
            tag = str(wire.header_of(sender, data)["o"])
        except Rejected as exc:
            self.rejections.append(exc)
            return []
        op = self.ops.get(tag)
        if op is not None:
            return op.receive(sender, data)
        if tag in self._forgotten:  # a late message for an operation this peer dropped
            return []
        if (
            len(self._early) >= self.max_early_messages
            or self._early_bytes + len(data) > self.max_early_bytes
        ):
            self.rejections.append(
                MessageTooLarge(sender, len(data), self.max_early_bytes - self._early_bytes)
            )
            return []
        self._early.append((tag, sender, bytes(data)))
        self._early_bytes += len(data)
        return []

    def receive_frame(
        self, sender: str, header: Mapping[str, Any], payload: wire.Payload
    ) -> list[Send]:
        """:meth:`receive` of a frame a transport parsed already: an operation running
        here takes it as it is; an early one is kept as bytes (a copy, as in :meth:`receive`)."""
        tag = header.get("o")
        op = self.ops.get(tag) if isinstance(tag, str) else None
        if op is not None:
            return op.receive_frame(sender, header, payload)
        return self.receive(sender, encode_header(header, len(payload)) + bytes(payload))

    def forget(self, tag: str) -> None:
        """Drop operation ``tag`` (finished, retained long enough); later messages for it
        are ignored instead of being held as early ones."""
        self.ops.pop(tag, None)
        self._forgotten.add(tag)

    def peer_failed(self, peer: str) -> list[Send]:
        self._failed.add(peer)
        out: list[Send] = []
        for op in self.ops.values():
            out += op.peer_failed(peer)
        return out

    def deadline(self) -> list[Send]:
        out: list[Send] = []
        for op in self.ops.values():
            if not op.finished:
                out += op.deadline()
        return out
