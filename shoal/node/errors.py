"""Errors of the node daemon and its configuration, and how they reach the command line."""

from __future__ import annotations

import signal
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
    """``trio.run`` for a command: Ctrl-C cancels ``fn`` and is raised as one plain
    :class:`KeyboardInterrupt`; a lone shoal error escapes a nursery as itself.

    trio raises Ctrl-C wherever the program happens to be. Two ways that went wrong for
    the demo: inside a nursery the interrupt reached the command wrapped in an exception
    group (its ``except KeyboardInterrupt`` missed it: exit 1 and a traceback); and when
    it landed in code CPython runs through ``exec`` (a dataclass being made by a lazy
    import), CPython marked it unhandled even though the command caught it, and the
    process killed itself with SIGINT at exit (or a library swallowed it and Ctrl-C did
    nothing). So here SIGINT arrives on a signal channel instead, cancels ``fn`` at its
    next checkpoint, and the interrupt is raised at one known place. A group holding one
    :class:`Error` and nothing else becomes that error, so its message reaches the user.
    """
    try:
        return trio.run(_until_ctrl_c, fn, args)
    except BaseExceptionGroup as group:
        interrupts, rest = group.split(KeyboardInterrupt)
        if interrupts is not None and rest is None:
            raise KeyboardInterrupt from group
        leaves = list(_leaves(group))
        if len(leaves) == 1 and isinstance(leaves[0], Error):
            raise leaves[0] from group
        raise


async def _until_ctrl_c(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
    interrupted = False

    async def watch(signals: Any, scope: trio.CancelScope) -> None:
        nonlocal interrupted
        async for _ in signals:
            interrupted = True
            scope.cancel()
            return

    with trio.open_signal_receiver(signal.SIGINT) as signals:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, signals, nursery.cancel_scope)
                try:
                    result = await fn(*args)
                finally:
                    nursery.cancel_scope.cancel()
        except BaseException as exc:
            if interrupted:  # whatever the cancellation made fn raise, the user pressed Ctrl-C
                raise KeyboardInterrupt from exc
            raise
    if interrupted:
        raise KeyboardInterrupt
    return result


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found
