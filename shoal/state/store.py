"""Persistence of the swarm state in the data dir: every author's signed log.

The file is a msgpack list of encoded signed updates, written atomically. Loading
re-verifies every signature, so a tampered file cannot inject state; a corrupt file is
set aside (renamed) and the node starts empty and catches up from its peers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgpack

from shoal.state.document import SwarmState
from shoal.state.errors import RejectedUpdate
from shoal.state.records import from_wire

log = logging.getLogger(__name__)

MAX_STATE_FILE = 256 << 20


def state_path(data_dir: Path, swarm: str) -> Path:
    return data_dir / f"state-{swarm}.msgpack"


def encode_state(state: SwarmState) -> bytes:
    return bytes(msgpack.packb([u.to_wire() for u in state.all_updates()], use_bin_type=True))


def write_state(blob: bytes, path: Path) -> None:
    """Atomically replace ``path`` (safe to run in a worker thread: touches no state)."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(state: SwarmState, path: Path) -> int:
    """Apply the updates saved at ``path``; returns how many were applied."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    try:
        if size > MAX_STATE_FILE:
            raise ValueError(f"{size} bytes is over the {MAX_STATE_FILE} limit")
        records = msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=True)
        if not isinstance(records, list):
            raise ValueError("not a list of updates")
    except (OSError, ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        aside = path.with_suffix(".corrupt")
        os.replace(path, aside)
        log.warning(
            "state file %s unreadable (%s); moved to %s, catching up from peers", path, exc, aside
        )
        return 0
    applied = 0
    for record in records:
        try:
            applied += len(state.receive(from_wire(record)))
        except RejectedUpdate as exc:
            log.warning("dropping a saved update: %s", exc)
    return applied
