"""Decentralized training: DiLoCo over the collectives.

- ``diloco.py``: the round engine (H inner AdamW steps, pseudo-gradient, an ``average``
  callable, the deterministic outer Nesterov step) and the global state and its hash.
- ``flat.py``: a model's parameters as one fp32 buffer in a fixed order.
- ``sync.py``: sans-io joiner sync: the state in sha256-verified parts from several peers.
- ``runlog.py``: round records as plain data for the swarm state, majority state hash.
- ``data.py``: byte-level corpus, held-out tail, per-peer shards, batches, held-out loss.
- ``swarm.py``: one round among real peers through the collectives driver (``round_tag``).
- ``membership.py``: sans-io: the round's coordinator and its READY barrier, the decision
  (members, majority hash, diverged peers).
- ``statesync.py``: the state-sync protocol on channels (manifest and parts; a server of
  the last rounds' exports, a fetch from several peers driving ``sync.StateFetch``).
- ``run.py``: ``TrainingRun``, a whole run: rounds, member agreement, retries with the
  survivors, joining and resync, checkpoints; ``run_local`` for ``--local``.
- ``checkpoint.py``: a peer's checkpoint (state, inner AdamW, data position) in one
  safetensors file.
- ``errors.py``: typed errors under :class:`shoal.errors.Error`.
"""
