"""Errors of the node daemon and its configuration."""

from __future__ import annotations

from shoal.errors import Error


class NodeError(Error):
    """Base class of node errors."""


class ConfigError(NodeError):
    """The configuration file or a flag is invalid; the message says which and why."""
