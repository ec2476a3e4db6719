"""shoal: a peer-to-peer swarm that runs and trains LLMs on devices people already own.

Packages (dependency direction in ARCHITECTURE.md, enforced by import-linter):

- ``transport``: libp2p host, identity, NAT traversal, pnet, sans-io framing, typed RPC.
- ``node``: the daemon, its configuration, CLI and HTTP API (composition root).
- ``kernels``, ``dht``, ``state``, ``collectives``, ``pipeline``, ``training``: see their
  own docstrings.
"""

__version__ = "0.1.0"
