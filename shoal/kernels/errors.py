"""Errors of the kernels: bad wire tensors and unusable quantization settings."""

from __future__ import annotations

from shoal.errors import Error


class KernelError(Error):
    """Base class of kernel errors."""


class CodecError(KernelError):
    """A tensor frame (header + payload) is invalid; nothing was allocated for it.

    ``field`` names the header field or check that failed (``dtype``, ``shape``,
    ``nbytes``, ``checksum``, ...).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"bad tensor frame ({field}): {message}")
        self.field = field


class QuantizationError(KernelError):
    """A weight cannot be quantized with the requested format (for example its shape)."""
