"""Byte-level training data: a corpus as token ids, a held-out tail, per-peer shards,
seeded batches, and the held-out loss.

Token ``i`` is byte ``i`` (the byte-level tokenizer of shoal-tiny). The last
``held_out`` fraction of the corpus is never trained on; the rest is split into
``count`` contiguous shards, one per peer.
"""

from __future__ import annotations

import torch
from torch import nn

from shoal.training.errors import TrainingError

Batch = tuple[torch.Tensor, torch.Tensor]


def byte_tokens(data: bytes) -> torch.Tensor:
    """Bytes -> int64 token ids (one per byte)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def split_held_out(
    tokens: torch.Tensor, fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the held-out part is the last ``fraction`` of the tokens."""
    cut = tokens.numel() - int(tokens.numel() * fraction)
    return tokens[:cut], tokens[cut:]


def shard(tokens: torch.Tensor, index: int, count: int) -> torch.Tensor:
    """Contiguous shard ``index`` of ``count`` (the remainder goes to the last shard)."""
    if not 0 <= index < count:
        raise TrainingError(f"shard {index} is not in 0..{count - 1}")
    size = tokens.numel() // count
    end = tokens.numel() if index == count - 1 else (index + 1) * size
    return tokens[index * size : end]


class Batches:
    """Random windows of ``seq + 1`` tokens from ``tokens``, from a seeded generator
    (deterministic for a seed). Calling it returns one (inputs, targets) batch."""

    def __init__(self, tokens: torch.Tensor, *, batch: int, seq: int, seed: int) -> None:
        if tokens.numel() < seq + 2:
            raise TrainingError(f"{tokens.numel()} tokens are too few for windows of {seq + 1}")
        self.tokens, self.batch, self.seq = tokens, batch, seq
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> Batch:
        starts = torch.randint(
            0, self.tokens.numel() - self.seq - 1, (self.batch,), generator=self.generator
        )
        rows = torch.stack([self.tokens[s : s + self.seq + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def held_out_loss(
    model: nn.Module, tokens: torch.Tensor, *, seq: int, max_windows: int | None = None
) -> float:
    """Mean next-token cross-entropy (nats/token) over non-overlapping windows of ``seq``."""
    was_training = model.training
    model.eval()
    usable = (tokens.numel() - 1) // seq * seq
    inputs = tokens[:usable].view(-1, seq)
    targets = tokens[1 : usable + 1].view(-1, seq)
    if max_windows is not None:
        inputs, targets = inputs[:max_windows], targets[:max_windows]
    total, count = 0.0, 0
    for i in range(0, inputs.shape[0], 16):
        logits = model(inputs[i : i + 16]).float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[i : i + 16].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += targets[i : i + 16].numel()
    model.train(was_training)
    return total / count


__all__ = ["Batch", "Batches", "byte_tokens", "held_out_loss", "shard", "split_held_out"]
