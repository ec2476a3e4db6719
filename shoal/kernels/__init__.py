"""Torch ops only: norms, RoPE, attention with KV cache, sampling, codecs (not built yet)."""
