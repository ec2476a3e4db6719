"""Load a span of a Hugging Face Llama-family checkpoint, reading only the weights it needs.

A model directory holds ``config.json``, the weights as ``model.safetensors`` or as shards
listed in ``model.safetensors.index.json``, and usually ``tokenizer.json`` and
``tokenizer_config.json``. Built-in models (``shoal-tiny``) live in ``shoal/models/``.

The span is built on the meta device, then each parameter is read from its memory-mapped
file and converted to the target dtype; blocks outside the span are never touched.
Quantization (int8/int4) is applied block by block right after the block loads, so the
full-precision copy of only one block is alive at a time.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from safetensors import SafetensorError, safe_open
from torch import nn

from shoal.kernels.errors import QuantizationError
from shoal.kernels.quant import QUANT_FORMATS, quantize_linears
from shoal.pipeline.config import ModelConfig
from shoal.pipeline.errors import ModelLoadError
from shoal.pipeline.model import DecoderSpan, Span
from shoal.pipeline.tokenizer import TextTokenizer

DEFAULT_MODEL = "shoal-tiny"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on the JSON header


def builtin_models() -> dict[str, Path]:
    """Names of the models shipped inside the package -> their directories."""
    root = Path(str(resources.files("shoal"))) / "models"
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "config.json").is_file()}


def resolve_model(name_or_path: str | Path) -> Path:
    """A built-in model name or a directory -> the model directory."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    builtin = builtin_models()
    if str(name_or_path) in builtin:
        return builtin[str(name_or_path)]
    raise ModelLoadError(
        path,
        "no such directory, and not a built-in model",
        f"pass a Hugging Face model directory or one of: {', '.join(builtin) or '(none)'}",
    )


@dataclass(frozen=True)
class Checkpoint:
    """A validated model directory: its config and where each weight lives."""

    directory: Path
    config: ModelConfig
    weight_files: dict[str, Path] = field(repr=False)
    raw_config: dict[str, Any] = field(repr=False)

    def weight_names(self) -> list[str]:
        return list(self.weight_files)


def open_checkpoint(name_or_path: str | Path) -> Checkpoint:
    """Read config.json and the safetensors headers; check that no file is missing or cut short."""
    directory = resolve_model(name_or_path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            directory, "config.json is missing", "copy the model's config.json into the directory"
        )
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            config_path, f"config.json is not valid JSON ({exc})", "re-download it"
        ) from None
    config = ModelConfig.from_hf(raw, config_path)
    weight_files: dict[str, Path] = {}
    for path in _weight_files(directory):
        for name in safetensors_header(path):
            weight_files[name] = path
    return Checkpoint(directory, config, weight_files, raw)


def _weight_files(directory: Path) -> list[Path]:
    index = directory / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
            raise ModelLoadError(
                index, f"the shard index is malformed ({exc})", "re-download it"
            ) from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise ModelLoadError(
                directory,
                f"{_INDEX} lists shards that are missing: {', '.join(missing)}",
                "download every shard the index names",
            )
        return files
    if (directory / _SINGLE).is_file():
        return [directory / _SINGLE]
    raise ModelLoadError(
        directory,
        f"no weights: neither {_SINGLE} nor {_INDEX} is there",
        "download the model's safetensors files (shoal does not read .bin or .pth)",
    )


def safetensors_header(path: Path) -> dict[str, Any]:
    """Tensor entries of a safetensors header, after checking the file holds all their bytes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _truncated(path, f"only {size} bytes long")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_HEADER_LIMIT, size - 8):
            raise _truncated(path, f"its header claims {header_len} bytes but the file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(
                path, f"the safetensors header is corrupt ({exc})", "re-download it"
            ) from None
    header.pop("__metadata__", None)
    data_end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    expected = 8 + header_len + data_end
    if size < expected:
        raise _truncated(path, f"the header describes {expected} bytes but the file has {size}")
    return dict(header)


def _truncated(path: Path, detail: str) -> ModelLoadError:
    return ModelLoadError(path, f"the safetensors file is truncated ({detail})", "re-download it")


def checkpoint_names(model: DecoderSpan) -> dict[str, str]:
    """The span's state-dict keys -> their names in the checkpoint."""
    config = model.config
    names = {key: f"model.{key}" for key in model.state_dict()}
    if model.lm_head is not None:
        names["lm_head.weight"] = (
            "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        )
    return names


def load_span(
    checkpoint: Checkpoint | str | Path,
    span: Span | None = None,
    *,
    dtype: str | torch.dtype = torch.float32,
    quantize: str | None = None,
    progress: bool = False,
) -> DecoderSpan:
    """Build a :class:`DecoderSpan` for ``span`` (default: the whole model) from a checkpoint.

    dtype: fp32/bf16/fp16 (or the torch dtype). quantize: None, ``int8`` or ``int4``
    (weight-only: the blocks' linear layers and the LM head).
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    config = ckpt.config
    span = span or Span.full(config)
    target = load_dtype(ckpt, dtype, quantize)
    with torch.device("meta"):
        model = DecoderSpan(config, span)
    names = checkpoint_names(model)
    missing = [n for n in set(names.values()) if n not in ckpt.weight_files]
    if missing:
        raise ModelLoadError(
            ckpt.directory,
            f"the checkpoint lacks {len(missing)} weight(s) the span needs, e.g. {sorted(missing)[0]}",
            "check that config.json belongs to these weights",
        )
    with _LoadProgress(progress, len(list(_load_groups(model)))) as advance, _Files() as files:
        fill_span(
            model,
            ckpt,
            lambda full: files.get(ckpt.weight_files[names[full]], names[full]),
            names,
            dtype=target,
            quantize=quantize,
            advance=advance,
        )
    if config.tie_word_embeddings and quantize is None:
        model.tie_weights()
    return model.eval()


def load_dtype(ckpt: Checkpoint, dtype: str | torch.dtype, quantize: str | None) -> torch.dtype:
    """The torch dtype ``dtype`` names; raises :class:`ModelLoadError` for an unknown
    ``quantize`` (what every loader checks before it allocates)."""
    if quantize is not None and quantize not in QUANT_FORMATS:
        raise ModelLoadError(
            ckpt.directory,
            f"unknown quantization {quantize!r}",
            f"use one of {', '.join(QUANT_FORMATS)}",
        )
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


def fill_span(
    model: DecoderSpan,
    ckpt: Checkpoint,
    read: Callable[[str], torch.Tensor],
    names: dict[str, str],
    *,
    dtype: torch.dtype,
    quantize: str | None,
    advance: Callable[[], None] = lambda: None,
) -> None:
    """Load a meta-device span unit by unit (embedding, each block, norm + head): each
    tensor from ``read(state-dict key)``, checked against the shape the model expects and
    converted to ``dtype``; then the unit is quantized (all but the embedding). ``names``:
    the model's ``checkpoint_names``, for the messages."""
    for prefix, module in _load_groups(model):
        state = {}
        for key, param in module.state_dict(keep_vars=True).items():
            full = f"{prefix}{key}"
            tensor = read(full)
            if tensor.shape != param.shape:
                raise ModelLoadError(
                    ckpt.directory,
                    f"{names[full]} has shape {tuple(tensor.shape)}, the config implies {tuple(param.shape)}",
                    "check that config.json belongs to these weights",
                )
            state[key] = tensor.to(dtype)
        module.load_state_dict(state, assign=True)
        # the embedding is a lookup and stays as it is; a tied head quantizes its own copy
        if quantize is not None and prefix != "embed_tokens.":
            try:
                quantized = quantize_linears(module, quantize)
            except QuantizationError as exc:
                raise ModelLoadError(
                    ckpt.directory, f"{prefix[:-1]}: {exc}", "load it with int8 or unquantized"
                ) from None
            if prefix == "lm_head.":
                model.lm_head = quantized
        advance()


def _load_groups(model: DecoderSpan) -> Iterator[tuple[str, nn.Module]]:
    """Units loaded (and quantized) one at a time, with their state-dict prefixes."""
    if model.embed_tokens is not None:
        yield "embed_tokens.", model.embed_tokens
    for name, block in model.layers.items():
        yield f"layers.{name}.", block
    if model.norm is not None and model.lm_head is not None:
        yield "norm.", model.norm
        yield "lm_head.", model.lm_head


class _Files:
    """Open safetensors files (memory-mapped), each opened once."""

    def __init__(self) -> None:
        self._open: dict[Path, Any] = {}

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *exc: object) -> None:
        self._open.clear()

    def get(self, path: Path, name: str) -> torch.Tensor:
        try:
            if path not in self._open:
                self._open[path] = safe_open(os.fspath(path), framework="pt")
            return self._open[path].get_tensor(name)
        except SafetensorError as exc:
            raise ModelLoadError(
                path, f"cannot read {name} ({exc})", "re-download the file"
            ) from None


class _LoadProgress:
    """A rich progress bar over loaded units, or nothing when ``enabled`` is False."""

    def __init__(self, enabled: bool, total: int) -> None:
        self._bar = Progress(transient=True) if enabled else None
        self._total = total

    def __enter__(self) -> Any:
        if self._bar is None:
            return lambda: None
        self._bar.start()
        task = self._bar.add_task("loading", total=self._total)
        return lambda: self._bar.advance(task) if self._bar else None

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def load_tokenizer(checkpoint: Checkpoint | str | Path) -> TextTokenizer:
    """The checkpoint's tokenizer.json, with its bos/eos ids and chat template."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    return TextTokenizer.from_directory(
        ckpt.directory, bos_id=ckpt.config.bos_token_id, eos_ids=ckpt.config.eos_token_ids
    )
