"""Errors of discovery."""

from __future__ import annotations

from shoal.errors import Error


class DhtError(Error):
    """Base class of discovery errors."""


class InvalidRecord(DhtError):
    """A DHT record failed validation (signature, key, expiry or shape)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"record at {key} rejected: {reason}")
        self.key = key
        self.reason = reason
