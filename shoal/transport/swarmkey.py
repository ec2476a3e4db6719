"""Swarm keys for private swarms (libp2p pnet).

The file format is the one go-libp2p and IPFS use (``swarm.key``)::

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits>
"""

from __future__ import annotations

import os
from pathlib import Path

from shoal.transport.errors import SwarmKeyError

_HEADER = "/key/swarm/psk/1.0.0/"
_ENCODING = "/base16/"


def generate_swarm_key() -> str:
    """A new swarm key file's text."""
    return f"{_HEADER}\n{_ENCODING}\n{os.urandom(32).hex()}\n"


def write_swarm_key(path: Path) -> None:
    """Write a new swarm key to ``path`` (mode 0600); refuses to overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(generate_swarm_key())


def parse_swarm_key(text: str) -> str:
    """Return the 32-byte key as 64 hex digits, the form libp2p's pnet takes."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) != 3 or lines[0] != _HEADER:
        raise SwarmKeyError(f"not a swarm key: expected 3 lines starting with {_HEADER}")
    if lines[1] != _ENCODING:
        raise SwarmKeyError(f"unsupported swarm key encoding {lines[1]!r}; only /base16/")
    key = lines[2].lower()
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise SwarmKeyError("swarm key must be 64 hex digits (32 bytes)")
    return key


def read_swarm_key(path: Path) -> str:
    try:
        return parse_swarm_key(path.read_text())
    except OSError as exc:
        raise SwarmKeyError(f"cannot read swarm key {path}: {exc}") from exc
