"""A peer's training checkpoint: the global state plus what makes a resumed run continue
exactly where it stopped (the local AdamW state and the data generator's position).

One safetensors file (no pickle), written atomically after every round::

    params, momentum                      the OuterState (flat fp32, layout order)
    inner.<i>.<name>                      AdamW state of parameter i (step, exp_avg, ...)
    batches.generator                     the data generator's state (uint8)
    metadata: run_id, round, layout digest, state hash, inner param groups (JSON)

Loading checks the layout digest and the state hash before anything is adopted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from shoal.training.data import Batches
from shoal.training.diloco import DilocoPeer, OuterState
from shoal.training.errors import LayoutMismatch, StateHashMismatch, TrainingError

CHECKPOINT_FILE = "checkpoint.safetensors"


class CheckpointError(TrainingError):
    """A checkpoint file is unreadable or belongs to another run or model."""


def checkpoint_path(data_dir: Path, run_id: str) -> Path:
    """``<data dir>/train/<run>/checkpoint.safetensors`` (the run name made path-safe)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id) or "_"
    return data_dir / "train" / safe / CHECKPOINT_FILE


def save_checkpoint(path: Path, peer: DilocoPeer) -> None:
    """Write ``peer``'s state, inner optimizer and data position to ``path`` (atomic)."""
    state = peer.state
    tensors: dict[str, torch.Tensor] = {"params": state.params, "momentum": state.momentum}
    inner = peer.inner.state_dict()
    for index, entry in inner["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"inner.{index}.{name}"] = value.detach().to("cpu").contiguous()
    if isinstance(peer.batches, Batches):
        tensors["batches.generator"] = peer.batches.generator.get_state()
    metadata = {
        "run_id": peer.run_id,
        "round": str(state.round),
        "layout": state.layout.digest(),
        "state_hash": state.state_hash(),
        "inner_groups": json.dumps(inner["param_groups"]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_checkpoint(path: Path, peer: DilocoPeer) -> bool:
    """Resume ``peer`` from ``path``: adopts the state, the inner optimizer's state and the
    data position. False if there is no checkpoint; raises :class:`CheckpointError` for a
    checkpoint of another run or model, or a damaged one."""
    if not path.exists():
        return False
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            metadata: dict[str, Any] = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); delete it to start over") from exc
    if metadata.get("run_id") != peer.run_id:
        raise CheckpointError(
            f"{path} belongs to run {metadata.get('run_id')!r}, not {peer.run_id!r}"
        )
    layout = peer.state.layout
    if metadata.get("layout") != layout.digest():
        raise CheckpointError(
            f"{path} was written for another model (its parameters differ); use the same "
            "--model as before, or delete the checkpoint to start over"
        )
    try:
        state = OuterState(layout, tensors["params"], tensors["momentum"], int(metadata["round"]))
    except (KeyError, ValueError, LayoutMismatch) as exc:
        raise CheckpointError(f"{path} is damaged ({exc!r}); delete it to start over") from exc
    if state.state_hash() != metadata.get("state_hash"):
        raise StateHashMismatch(str(metadata.get("state_hash")), state.state_hash())
    peer.adopt(state)
    inner_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("inner."):
            _, index, name = key.split(".", 2)
            inner_state.setdefault(int(index), {})[name] = value
    if inner_state:
        groups = json.loads(metadata["inner_groups"])
        for group in groups:
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
        peer.inner.load_state_dict({"state": inner_state, "param_groups": groups})
    generator = tensors.get("batches.generator")
    if generator is not None and isinstance(peer.batches, Batches):
        peer.batches.generator.set_state(generator)
    return True


__all__ = [
    "CHECKPOINT_FILE",
    "CheckpointError",
    "checkpoint_path",
    "load_checkpoint",
    "save_checkpoint",
]
