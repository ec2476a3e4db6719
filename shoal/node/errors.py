"""Errors of the node daemon and its configuration, and how they reach the command line."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from shoal.errors import Error

T = TypeVar("T")


class NodeError(Error):
    """Base class of node errors."""


class ConfigError(NodeError):
    """The configuration file or a flag is invalid; the message says which and why."""


def run_trio(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``trio.run``, raising Ctrl-C and a lone shoal error as themselves.

    trio wraps what escapes a nursery in an exception group, so a command's
    ``except KeyboardInterrupt`` missed a Ctrl-C that landed inside one: the group went
    on to the top and the process exited 1 with a traceback instead of 130. A group
    holding only interrupts becomes one :class:`KeyboardInterrupt`; a group holding one
    :class:`Error` and nothing else becomes that error, so its message reaches the user.
    """
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        interrupts, rest = group.split(KeyboardInterrupt)
        if interrupts is not None and rest is None:
            raise KeyboardInterrupt from group
        leaves = list(_leaves(group))
        if len(leaves) == 1 and isinstance(leaves[0], Error):
            raise leaves[0] from group
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found
