"""A model's parameters as one fp32 buffer in a fixed order.

The outer optimizer, the state hash and the state download all work on this buffer, so
their results depend only on the bytes, not on how torch lays out or groups parameters.
The order is ``named_parameters()`` order (module definition order, tied weights once),
which is the same on every peer that builds the same model class from the same config.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from shoal.training.errors import LayoutMismatch


@dataclass(frozen=True, slots=True)
class Layout:
    """Names and shapes of the parameters, in buffer order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: nn.Module) -> Layout:
        named = list(model.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def numel(self) -> int:
        total = 0
        for shape in self.shapes:
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def digest(self) -> str:
        """sha256 over names and shapes: two peers can exchange state iff these are equal."""
        h = hashlib.sha256()
        for name, shape in zip(self.names, self.shapes, strict=True):
            h.update(f"{name}:{','.join(map(str, shape))};".encode())
        return h.hexdigest()

    def check(self, model: nn.Module) -> None:
        theirs = Layout.of(model)
        if theirs != self:
            raise LayoutMismatch(
                f"model parameters ({len(theirs.names)} tensors, {theirs.numel} elements) do not "
                f"match the state's layout ({len(self.names)} tensors, {self.numel} elements)"
            )


def flatten(model: nn.Module) -> torch.Tensor:
    """A new contiguous 1-D fp32 CPU tensor holding every parameter, in layout order."""
    with torch.no_grad():
        parts = [p.detach().to("cpu", torch.float32).reshape(-1) for p in model.parameters()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float32)


def load_flat(model: nn.Module, flat: torch.Tensor, layout: Layout) -> None:
    """Copy ``flat`` (layout order) into the model's parameters (exact for fp32 models)."""
    if flat.dtype != torch.float32 or flat.dim() != 1 or flat.numel() != layout.numel:
        raise LayoutMismatch(
            f"flat state of {flat.numel()} {flat.dtype} elements does not fit a layout of "
            f"{layout.numel} fp32 elements"
        )
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(flat[offset : offset + n].view(p.shape))
            offset += n
