"""Tiny random Hugging Face checkpoints for parity tests (transformers is a test-only dependency)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

_COMMON: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def hf_config(family: str, **overrides: Any) -> Any:
    """A small config per family; each exercises what sets its family apart. ``overrides``
    replace entries of the common part (e.g. more heads)."""
    import transformers

    common = _COMMON | overrides

    if family == "llama":  # GQA, Llama 3 rope scaling, untied head
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        return transformers.LlamaConfig(**common, rope_parameters=rope)
    if family == "mistral":  # explicit head_dim != hidden/heads, sliding window
        return transformers.MistralConfig(**common, head_dim=24, sliding_window=16)
    if family == "qwen2":  # q/k/v bias, tied embeddings
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if family == "qwen3":  # q/k norm
        return transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    raise ValueError(family)


def save_hf_model(
    family: str,
    directory: Path,
    *,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    **save: Any,
) -> Any:
    """Build a random model of ``family`` (``config``: overrides of the common config) and
    ``save_pretrained`` it; returns the model (fp32, eval)."""
    import transformers

    torch.manual_seed(seed)
    built = hf_config(family, **(config or {}))
    model = transformers.AutoModelForCausalLM.from_config(built).eval()
    with torch.no_grad():  # random biases and norm weights, so that parity checks them too
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory, **save)
    return model
