"""Shared fixtures: real libp2p hosts on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from libp2p.crypto.ed25519 import create_new_key_pair

from shoal.transport.host import Host, HostConfig, open_host

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@asynccontextmanager
async def loopback_host(psk: str | None = None, dial_timeout: float = 5.0) -> AsyncIterator[Host]:
    config = HostConfig(
        key_pair=create_new_key_pair(), listen=(LOOPBACK,), psk=psk, dial_timeout=dial_timeout
    )
    async with open_host(config) as host:
        yield host
