"""SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated activation between the two projections."""
    return F.silu(gate) * up


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference of :func:`swiglu` (``silu(x) = x * sigmoid(x)``)."""
    return gate * torch.sigmoid(gate) * up


class SwiGLU(nn.Module):
    """The Llama MLP; checkpoint names ``gate_proj``, ``up_proj``, ``down_proj``.

    The projections are plain ``nn.Linear`` so quantization can replace them afterwards.
    """

    def __init__(self, dim: int, hidden: int, *, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
