"""Errors of the replicated swarm state."""

from __future__ import annotations

from shoal.errors import Error


class StateError(Error):
    """Base class of state errors."""


class RejectedUpdate(StateError):
    """A state update was refused before it touched the document.

    ``author`` is who the update claims to come from; ``sender`` is the peer that handed
    it to us (they differ when updates are forwarded).
    """

    def __init__(self, author: str, reason: str, sender: str | None = None) -> None:
        via = f" (received from {sender})" if sender and sender != author else ""
        super().__init__(f"update by {author}{via} rejected: {reason}")
        self.author = author
        self.reason = reason
        self.sender = sender
