"""Errors of the collectives: rejected messages and contributions, failed operations.

Two families. A *rejection* (:class:`Rejected` and subclasses) is recorded by an
operation and the round goes on without the offending message or contribution. An
*operation failure* (:class:`OperationFailed` and subclasses) ends one peer's part in an
operation: it never returns a result that differs from the one other peers hold.
"""

from __future__ import annotations

from shoal.errors import Error


class CollectiveError(Error):
    """Base class of collectives errors."""


class Rejected(CollectiveError):
    """A message from ``peer`` was refused; nothing was allocated or applied for it."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"message from {peer} rejected: {reason}")
        self.peer = peer
        self.reason = reason


class MalformedMessage(Rejected):
    """Bytes that are not a valid collectives message (msgpack, fields, types)."""


class MessageTooLarge(Rejected):
    """A message (or its declared payload) exceeds the operation's size limit."""

    def __init__(self, peer: str, size: int, limit: int) -> None:
        super().__init__(peer, f"{size} bytes exceed the limit of {limit}")
        self.size = size
        self.limit = limit


class NotAMember(Rejected):
    """The sender is not in the operation's group."""


class ViewMismatch(Rejected):
    """The message belongs to another view of the operation (tag, attempt or members)."""


class BadContribution(Rejected):
    """A member's contribution is unusable; ``field`` says why.

    ``field`` is one of ``shape``, ``dtype``, ``codec``, ``nbytes``, ``checksum``,
    ``nonfinite``, ``range``. The sender is removed from the contributor set of the whole
    operation (removal is global), so the result is an exact average over the others.
    """

    def __init__(self, peer: str, field: str, reason: str) -> None:
        super().__init__(peer, f"bad contribution ({field}): {reason}")
        self.field = field


class OperationFailed(CollectiveError):
    """This peer cannot complete operation ``tag``; it holds no result for it."""

    def __init__(self, tag: str, reason: str) -> None:
        super().__init__(f"all-reduce {tag!r} failed: {reason}")
        self.tag = tag
        self.reason = reason


class NoQuorum(OperationFailed):
    """Fewer than a majority of the view's members are reachable, so nothing can be
    committed (the minority side of a partition ends here)."""


class ChunkUnavailable(OperationFailed):
    """No live peer holds a committed chunk: the attempt is aborted for this peer.

    By the all-or-nothing lemma no live peer can have completed it either, so a retry
    (a new attempt) among the survivors loses nothing anyone applied.
    """

    def __init__(self, tag: str, chunk: int) -> None:
        super().__init__(tag, f"no live holder of chunk {chunk}")
        self.chunk = chunk


class Excluded(OperationFailed):
    """This peer was removed from the contributor set (its own contribution was refused
    or it was suspected) and the group committed without it."""


class LeaderFailed(OperationFailed):
    """The star all-reduce's leader failed before this peer received the result."""


class Stalled(OperationFailed):
    """A deadline passed with nobody left to suspect: the peer gives up."""
