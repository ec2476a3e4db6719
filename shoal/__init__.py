"""shoal: a peer-to-peer swarm that runs and trains LLMs on devices people already own.

``shoal.open_client(bootstrap=[...])`` (trio) and ``shoal.connect(bootstrap=[...])``
(blocking) generate text with a model served by a swarm; see ``shoal/client.py``.

Packages (dependency direction in ARCHITECTURE.md, enforced by import-linter):

- ``transport``: libp2p host, identity, NAT traversal, pnet, sans-io framing, typed RPC.
- ``node``: the daemon, its configuration, CLI and HTTP API (composition root).
- ``kernels``, ``dht``, ``state``, ``collectives``, ``pipeline``, ``training``: see their
  own docstrings.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "connect", "open_client"]


def __getattr__(name: str) -> Any:
    # Imported on first use: ``import shoal.kernels`` must not pull in libp2p and torch.
    if name in ("open_client", "connect"):
        from shoal import client

        return getattr(client, name)
    raise AttributeError(f"module 'shoal' has no attribute {name!r}")
