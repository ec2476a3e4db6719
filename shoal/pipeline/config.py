"""The decoder's hyperparameters, parsed from (and written to) Hugging Face ``config.json``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.kernels.rope import ROPE_KINDS, RopeScaling
from shoal.pipeline.errors import ModelLoadError, UnsupportedArchitecture

# architecture name in config.json -> the flags that tell its variant apart
ARCHITECTURES: dict[str, dict[str, bool]] = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"qkv_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A Llama-family decoder.

    qkv_bias: q/k/v projections have a bias (Qwen2; Llama's ``attention_bias`` also sets it).
    o_bias: the output projection has a bias (Llama's ``attention_bias``).
    qk_norm: RMSNorm over each head of q and k before RoPE (Qwen3).
    windows: per layer, the sliding attention window, or None for full attention.
    """

    architecture: str = "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None

    @classmethod
    def from_hf(cls, raw: dict[str, Any], path: Path | str = "config.json") -> ModelConfig:
        """Parse a Hugging Face config dict; raise :class:`ModelLoadError` naming what is wrong."""
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(raw.get("model_type"))
        if arch not in ARCHITECTURES:
            raise UnsupportedArchitecture(path, str(arch), tuple(ARCHITECTURES))
        flags = ARCHITECTURES[arch]
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            layers = int(raw["num_hidden_layers"])
            eos = raw.get("eos_token_id")
            bias = bool(raw.get("attention_bias", False))
            rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
            return cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
                rope_scaling=_rope_scaling(rope, path),
                max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=flags.get("qkv_bias", False) or bias,
                o_bias=bias and arch != "Qwen2ForCausalLM",
                mlp_bias=bool(raw.get("mlp_bias", False)),
                qk_norm=flags.get("qk_norm", False),
                windows=_windows(raw, arch, layers),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=tuple(eos)
                if isinstance(eos, list)
                else (() if eos is None else (int(eos),)),
            )
        except KeyError as exc:
            raise ModelLoadError(
                path, f"config.json lacks {exc.args[0]!r}", "use the model's original config.json"
            ) from None
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(
                path,
                f"config.json has a malformed value ({exc})",
                "use the model's original config.json",
            ) from None

    def to_hf(self) -> dict[str, Any]:
        """The config.json that :meth:`from_hf` reads back (and transformers loads)."""
        out: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": _MODEL_TYPES[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.o_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids)
            if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
        }
        return out


_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def _arch_from_model_type(model_type: object) -> str:
    for arch, name in _MODEL_TYPES.items():
        if name == model_type:
            return arch
    return f"model_type={model_type!r}" if model_type else "none named in config.json"


def _rope_scaling(rope: dict[str, Any], path: Path | str) -> RopeScaling | None:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ROPE_KINDS:
        raise ModelLoadError(
            path,
            f"unsupported RoPE scaling {kind!r}",
            f"shoal implements {', '.join(ROPE_KINDS)}",
        )
    if kind == "default":
        return None
    return RopeScaling(
        kind=kind,
        factor=float(rope.get("factor", 1.0)),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
    )


def _windows(raw: dict[str, Any], arch: str, layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if window is None or (arch.startswith("Qwen") and not raw.get("use_sliding_window", False)):
        return ()
    types = raw.get("layer_types")
    if types:
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    if arch.startswith("Qwen"):  # Qwen2/3: layers from max_window_layers on use the window
        first = int(raw.get("max_window_layers", layers))
        return tuple(int(window) if i >= first else None for i in range(layers))
    return (int(window),) * layers
