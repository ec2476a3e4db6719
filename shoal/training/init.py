"""Random initial weights for training a model from scratch.

GPT-2's scheme: every matrix and embedding from N(0, 0.02), the projections that write
into the residual stream (``o_proj``, ``down_proj``) scaled by 1/sqrt(2 * layers), norms
left at one. Drawn from a generator seeded by ``seed`` in a fixed order, so every peer of
a run that starts from scratch builds the same bits without sending them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

RESIDUAL_PROJECTIONS = ("o_proj.weight", "down_proj.weight")


def init_weights(model: nn.Module, seed: int, num_layers: int) -> None:
    """Overwrite ``model``'s parameters in place (norm weights are left as they are)."""
    gen = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * num_layers)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            continue
        std = residual_std if name.endswith(RESIDUAL_PROJECTIONS) else 0.02
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
