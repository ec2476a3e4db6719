"""The built-in model shoal-tiny: shipped files, int8 fidelity, held-out quality, the CLI."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from shoal.node.cli import app
from shoal.pipeline.generate import generate
from shoal.pipeline.loading import DEFAULT_MODEL, builtin_models, load_span, load_tokenizer
from shoal.pipeline.model import DecoderSpan

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
PROMPT = "ROMEO:\n"
# greedy fp32 continuation of PROMPT by the shipped weights (update when retraining)
GREEDY = "I would not be the seat of the sea of the prince"


@pytest.fixture(scope="module")
def fp32() -> DecoderSpan:
    return load_span(DEFAULT_MODEL)


def test_shipped_files() -> None:
    directory = builtin_models()["shoal-tiny"]
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"} <= names
    assert (directory / "model.safetensors").stat().st_size <= 16 * 2**20
    model = load_span(DEFAULT_MODEL)
    assert model.config.num_layers == 8 and model.config.architecture == "LlamaForCausalLM"
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    text = "First Citizen:\nBefore we proceed, é"
    ids = tokenizer.encode(text)
    assert ids[0] == 256 and ids[1:] == list(text.encode())
    assert tokenizer.decode(ids) == text


def test_greedy_continuation_is_pinned(fp32: DecoderSpan) -> None:
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    tokens = list(generate(fp32, tokenizer.encode(PROMPT), max_new_tokens=48))
    assert tokenizer.decode(tokens) == GREEDY


@torch.no_grad()
def test_generation_past_the_context_restarts_from_the_recent_half(fp32: DecoderSpan) -> None:
    prompt = load_tokenizer(DEFAULT_MODEL).encode(PROMPT)
    assert fp32.config.max_position_embeddings == 256
    shift = 256 - len(prompt)  # the cache is full once this token has been yielded
    out = list(generate(fp32, prompt, max_new_tokens=shift + 2))
    recent = torch.tensor([(prompt + out[: shift + 1])[-128:]])
    assert out[shift + 1] == int(fp32(recent)[0, -1].argmax())


@torch.no_grad()
def test_int8_keeps_greedy_tokens_for_64_tokens(fp32: DecoderSpan) -> None:
    int8 = load_span(DEFAULT_MODEL, quantize="int8")
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    for prompt in (PROMPT, "KING HENRY VI:\nWhat"):
        ids = tokenizer.encode(prompt)
        expected = list(generate(fp32, ids, max_new_tokens=64))
        assert list(generate(int8, ids, max_new_tokens=64)) == expected
        assert len(expected) == 64


@torch.no_grad()
def test_held_out_loss_is_far_below_the_unigram_baseline(fp32: DecoderSpan) -> None:
    if not CORPUS.is_file():
        pytest.skip(f"{CORPUS} is absent (the corpus lives in ../shared/data)")
    data = CORPUS.read_bytes()
    held = torch.tensor(list(data[len(data) * 9 // 10 :][: 16 * 256 + 1]))
    logits = fp32(held[:-1].view(16, 256))
    loss = float(torch.nn.functional.cross_entropy(logits.reshape(-1, 258), held[1:]))
    counts = torch.bincount(torch.tensor(list(data[: len(data) * 9 // 10])), minlength=256) + 1
    unigram = float(-(counts / counts.sum()).log()[held[1:]].mean())
    assert unigram > 3.0
    assert loss < 2.0 < unigram - 1.0


runner = CliRunner()


def test_cli_generate_local_streams_greedy_text_and_speed() -> None:
    result = runner.invoke(
        app, ["generate", "--local", "--temperature", "0", "--max-tokens", "48", PROMPT]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(PROMPT + GREEDY)
    assert "48 tokens" in result.stderr and "tokens/s" in result.stderr


def test_cli_generate_seeded_sampling_is_reproducible() -> None:
    args = ["generate", "--local", "--seed", "3", "--max-tokens", "40", "--top-k", "20", "To be"]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout and len(first.stdout) > len("To be")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "hello"], "give --bootstrap ADDR"),
        (["generate", "--local", "--model", "no-such-model", "hi"], "not a built-in model"),
        (["generate", "--local", "--quantize", "int2", "hi"], "unknown quantization 'int2'"),
    ],
)
def test_cli_generate_errors(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output


def test_wheel_ships_the_model(tmp_path: Path) -> None:
    """A non-editable install gets the model files (package data)."""
    source = tmp_path / "src"  # build from a copy: an in-tree build would write build/ here
    shutil.copytree(ROOT / "shoal", source / "shoal", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*command, "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("shoal-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md"):
        assert f"shoal/models/shoal-tiny/{name}" in names
