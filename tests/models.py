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


def save_random_llama(
    directory: Path,
    *,
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int = 256,
    seed: int = 0,
) -> int:
    """Write a random Llama checkpoint (fp32, GQA, untied head) tensor by tensor straight to
    ``model.safetensors``, never holding more than one tensor: a checkpoint of a gigabyte
    in a few seconds. Returns the bytes of its weights."""
    import ctypes
    import json
    import struct

    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * int(torch.Size(shape).numel())
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                tensor = 1 + 0.1 * torch.randn(shape, generator=generator)
            else:  # scaled so that activations keep their size through the blocks
                tensor = torch.randn(shape, generator=generator) / shape[-1] ** 0.5
            f.write((ctypes.c_char * (tensor.numel() * 4)).from_address(tensor.data_ptr()))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (directory / "config.json").write_text(json.dumps(config))
    return offset
