"""Decentralized training: DiLoCo over the collectives.

- ``diloco.py``: the round engine (H inner AdamW steps, pseudo-gradient, an ``average``
  callable, the deterministic outer Nesterov step) and the global state and its hash.
- ``flat.py``: a model's parameters as one fp32 buffer in a fixed order.
- ``sync.py``: sans-io joiner sync: the state in sha256-verified parts from several peers.
- ``runlog.py``: round records as plain data for the swarm state, majority state hash.
- ``data.py``: byte-level corpus, held-out tail, per-peer shards, batches, held-out loss.
- ``errors.py``: typed errors under :class:`shoal.errors.Error`.
"""
