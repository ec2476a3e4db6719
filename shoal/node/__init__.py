"""The node: composition root of every service. Nothing imports shoal.node.

- ``config.py``: ``NodeConfig``, from a TOML file plus flags (the only place that reads
  files and the environment for configuration).
- ``daemon.py``: ``run_node``, one nursery for every service; persists state on exit.
- ``api.py``: the HTTP API (starlette on hypercorn's trio worker).
- ``cli.py``: the ``shoal`` command; ``logs.py``: log lines tagged with the peer id.
- ``train.py``: ``shoal train``: a DiLoCo run (a node plus ``TrainingRun``) or ``--local``,
  with a progress bar and checkpoints in the data dir.
- ``errors.py``: ``NodeError``, ``ConfigError``.
"""
