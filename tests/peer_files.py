"""Files through which a multi-process test and its peer processes talk
(tests/collectives_peer.py, tests/training_peer.py): written atomically, read when present,
polled until there."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio


def write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.rename(path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None


async def poll(check: Callable[[], Any], seconds: float) -> Any:
    """``check()`` until it returns something truthy (files written by other processes)."""
    with trio.fail_after(seconds):
        while True:
            value = check()
            if value:
                return value
            await trio.sleep(0.05)
