"""Loading checkpoints: shards, dtypes, quantization, partial reads, and clear errors."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from shoal.kernels.quant import Int4Linear, Int8Linear
from shoal.pipeline.errors import ModelLoadError, SpanError, UnsupportedArchitecture
from shoal.pipeline.loading import load_span, load_tokenizer, open_checkpoint
from shoal.pipeline.model import Span
from shoal.pipeline.tokenizer import StreamDecoder, byte_level_tokenizer
from tests.models import save_hf_model

pytest.importorskip("transformers")

TOKENS = torch.tensor([[1, 5, 9, 33, 70, 2, 11, 64]])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    save_hf_model("llama", directory)
    return directory


@pytest.fixture(scope="module")
def reference_logits(llama_dir: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_span(llama_dir)(TOKENS)


@torch.no_grad()
def test_sharded_checkpoint_loads(tmp_path: Path, reference_logits: torch.Tensor) -> None:
    save_hf_model("llama", tmp_path, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "model.safetensors.index.json").is_file()
    assert torch.equal(load_span(tmp_path)(TOKENS), reference_logits)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_names_the_file(llama_dir: Path, tmp_path: Path) -> None:
    broken = _copy(llama_dir, tmp_path / "m")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError) as info:
        open_checkpoint(broken)
    message = str(info.value)
    assert "model.safetensors" in message and "truncated" in message and "re-download" in message


def test_file_shorter_than_its_header_is_truncated(llama_dir: Path, tmp_path: Path) -> None:
    broken = _copy(llama_dir, tmp_path / "m")
    (broken / "model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{")
    with pytest.raises(ModelLoadError, match=r"truncated \(its header claims 1000000 bytes"):
        open_checkpoint(broken)


def test_unknown_architecture_is_named(llama_dir: Path, tmp_path: Path) -> None:
    broken = _copy(llama_dir, tmp_path / "m")
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitecture) as info:
        open_checkpoint(broken)
    assert info.value.architecture == "GPT2LMHeadModel"
    assert "unsupported architecture 'GPT2LMHeadModel'" in str(info.value)
    assert "LlamaForCausalLM" in str(info.value)


@pytest.mark.parametrize(
    ("remove", "expected"),
    [
        ("config.json", "config.json is missing"),
        ("model.safetensors", "no weights: neither model.safetensors nor"),
    ],
)
def test_missing_files_are_named(
    llama_dir: Path, tmp_path: Path, remove: str, expected: str
) -> None:
    broken = _copy(llama_dir, tmp_path / "m")
    (broken / remove).unlink()
    with pytest.raises(ModelLoadError, match=expected):
        open_checkpoint(broken)


def test_missing_shard_and_missing_key_are_named(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path, max_shard_size="40KB")
    last = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    last.unlink()
    with pytest.raises(ModelLoadError, match=f"lists shards that are missing: {last.name}"):
        open_checkpoint(tmp_path)


def test_config_missing_a_field_or_unknown_rope_is_named(llama_dir: Path, tmp_path: Path) -> None:
    broken = _copy(llama_dir, tmp_path / "m")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(
        json.dumps({**config, "rope_parameters": {"rope_type": "yarn"}})
    )
    with pytest.raises(ModelLoadError, match="unsupported RoPE scaling 'yarn'"):
        open_checkpoint(broken)
    del config["hidden_size"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"config\.json lacks 'hidden_size'"):
        open_checkpoint(broken)


@torch.no_grad()
def test_weights_outside_the_span_are_never_read(llama_dir: Path, tmp_path: Path) -> None:
    """Overwrite block 0's bytes with NaNs: a span of blocks 2..3 still loads exactly."""
    broken = _copy(llama_dir, tmp_path / "m")
    path = broken / "model.safetensors"
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    nan = struct.pack("<f", float("nan"))
    for name, entry in header.items():
        if name.startswith("model.layers.0."):
            a, b = entry["data_offsets"]
            data[8 + header_len + a : 8 + header_len + b] = nan * ((b - a) // 4)
    path.write_bytes(bytes(data))
    hidden = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(0))
    expected = load_span(llama_dir, Span(start=2, end=4)).blocks_forward(hidden)
    assert torch.equal(load_span(broken, Span(start=2, end=4)).blocks_forward(hidden), expected)
    assert torch.isnan(load_span(broken, Span(start=0, end=1)).blocks_forward(hidden)).all()


@torch.no_grad()
def test_dtypes_and_quantization_at_load(llama_dir: Path, reference_logits: torch.Tensor) -> None:
    bf16 = load_span(llama_dir, dtype="bf16")
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16(TOKENS).float(), reference_logits, atol=0.1, rtol=0)
    int8 = load_span(llama_dir, quantize="int8")
    assert isinstance(int8.layers["0"].self_attn.q_proj, Int8Linear)
    assert isinstance(int8.lm_head, Int8Linear)  # untied head
    torch.testing.assert_close(int8(TOKENS), reference_logits, atol=0.02, rtol=0)
    int4 = load_span(llama_dir, quantize="int4")
    assert isinstance(int4.layers["3"].mlp.down_proj, Int4Linear)
    torch.testing.assert_close(int4(TOKENS), reference_logits, atol=0.1, rtol=0)
    with pytest.raises(ModelLoadError, match="unknown quantization 'int2'"):
        load_span(llama_dir, quantize="int2")


def test_bad_spans_are_refused(llama_dir: Path) -> None:
    with pytest.raises(SpanError, match=r"outside the model's 0\.\.4"):
        load_span(llama_dir, Span(start=2, end=5))
    span = load_span(llama_dir, Span(start=1, end=2))
    with pytest.raises(SpanError, match="has no embedding"):
        span.embed(TOKENS)
    with pytest.raises(SpanError, match="has no head"):
        span.head(torch.zeros(1, 1, 64))


def test_head_only_span_of_a_tied_model_reads_the_embedding(tmp_path: Path) -> None:
    hf = save_hf_model("qwen2", tmp_path)  # tied embeddings: no lm_head.weight in the file
    head = load_span(tmp_path, Span(start=4, end=4, head=True))
    assert head.embed_tokens is None
    assert torch.equal(head.lm_head.weight, hf.model.embed_tokens.weight)  # type: ignore[union-attr]


def test_tokenizer_and_chat_template(tmp_path: Path) -> None:
    save_hf_model("llama", tmp_path)
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json is missing"):
        load_tokenizer(tmp_path)
    byte_level_tokenizer().save(str(tmp_path / "tokenizer.json"))
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.bos_id == 1 and tokenizer.eos_ids == (2,)
    text = tokenizer.render_chat([{"role": "user", "content": "hi"}])
    assert text == "<user>hi\n<assistant>"
    assert tokenizer.encode("hé") == [1, 104, 195, 169]
    assert tokenizer.decode([104, 195, 169]) == "hé"
    stream = StreamDecoder(tokenizer)  # "é" is two bytes: nothing until both arrived
    assert [stream.push(t) for t in (104, 195, 169, 33)] == ["h", "", "é", "!"]
