"""The sliding weight window: its arithmetic, release order and prefetch, equal tokens with
and without it, and the issue's bound: a 1 GB model decoded in 300 MB of weight memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from shoal.kernels.sampling import SamplingParams
from shoal.node.cli import app
from shoal.node.config import NodeConfig, load_config, parse_size
from shoal.node.errors import ConfigError
from shoal.pipeline.errors import ModelLoadError
from shoal.pipeline.generate import generate
from shoal.pipeline.loading import DEFAULT_MODEL, load_span, open_checkpoint
from shoal.pipeline.model import DecoderSpan, Span
from shoal.pipeline.serving import run_blocks
from shoal.pipeline.window import (
    CHUNK,
    WeightWindow,
    WindowClosed,
    WindowedSpan,
    WindowTooSmall,
    held_bytes,
    load_bounded_span,
    load_windowed_span,
    next_step,
    plan_span,
    plan_window,
)
from tests.models import save_hf_model, save_random_llama

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [1, 5, 9, 33, 70, 11, 64, 3]
HANG_GUARD = 30.0  # seconds a test waits for the prefetch thread before it fails


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("llama")
    save_hf_model("llama", directory)  # GQA: 4 heads, 2 KV heads
    return directory


def greedy(weights: DecoderSpan, n: int = 24) -> list[int]:
    return list(generate(weights, PROMPT, max_new_tokens=n, sampling=SamplingParams()))


# ---- arithmetic ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "window"),
    [(130, 1), (229, 1), (230, 2), (330, 3), (809, 7), (810, 8), (10_000, 8)],
)
def test_window_size_is_what_the_budget_leaves_after_resident_parts_and_staging(
    budget: int, window: int
) -> None:
    plan = plan_window(budget, resident_bytes=10, block_bytes=100, staging_bytes=20, blocks=8)
    assert plan.window == window
    assert plan.fits == (window == 8)
    assert plan.weight_bytes <= budget


def test_a_budget_below_one_block_says_what_to_do() -> None:
    with pytest.raises(WindowTooSmall) as caught:
        plan_window(129, resident_bytes=10, block_bytes=100, staging_bytes=20, blocks=8)
    assert caught.value.needed == 130
    message = str(caught.value)
    assert "raise --max-memory" in message and "--quantize" in message and "--blocks" in message


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_held_bytes_are_what_a_loaded_block_and_the_ends_take(
    llama_dir: Path, quantize: str | None
) -> None:
    checkpoint = open_checkpoint(llama_dir)
    loaded = load_span(checkpoint, quantize=quantize)
    whole = load_span(checkpoint)
    plan = plan_span(
        checkpoint, Span.full(checkpoint.config), 2**40, dtype=torch.float32, quantize=quantize
    )

    def nbytes(*modules: nn.Module | None) -> int:
        tensors = {
            id(t): t for m in modules if m is not None for t in [*m.parameters(), *m.buffers()]
        }
        return sum(t.numel() * t.element_size() for t in tensors.values())

    assert plan.block_bytes == nbytes(loaded.layers["0"])
    assert plan.resident_bytes == nbytes(loaded.embed_tokens, loaded.norm, loaded.lm_head)
    assert held_bytes(whole.layers["0"], torch.float32, None) == nbytes(whole.layers["0"])


def test_a_budget_too_small_for_the_model_is_a_typed_error(llama_dir: Path) -> None:
    with pytest.raises(WindowTooSmall, match="raise --max-memory"):
        load_bounded_span(llama_dir, max_memory=100_000)


def test_staging_counts_the_file_copy_when_a_block_is_converted() -> None:
    """shoal-tiny is stored in bf16: an fp32 window holds the bf16 block next to its
    conversion while it loads."""
    checkpoint = open_checkpoint(DEFAULT_MODEL)
    span = Span.full(checkpoint.config)
    plan = plan_span(checkpoint, span, 2**40, dtype=torch.float32, quantize=None)
    as_bf16 = plan_span(checkpoint, span, 2**40, dtype=torch.bfloat16, quantize=None)
    assert plan.block_bytes == 2 * as_bf16.block_bytes
    assert as_bf16.staging_bytes == min(CHUNK, as_bf16.block_bytes)
    assert plan.staging_bytes == as_bf16.staging_bytes + as_bf16.block_bytes


@pytest.mark.parametrize(
    ("text", "size"),
    [("300MB", 300_000_000), ("1.5GiB", 3 * 2**29), ("4096", 4096), ("2 kB", 2000)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-5MB", "0", "300XB", "nanMB", "inf", "1e30GB"])
def test_bad_sizes_are_config_errors(text: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"max_memory .*expected a positive size such as 300MB"):
        NodeConfig(data_dir=tmp_path, max_memory=text)


def test_max_memory_from_the_config_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('max_memory = "1.5GiB"\n')
    assert load_config(path, {"data_dir": tmp_path}).max_memory == "1.5GiB"
    flags = {"data_dir": tmp_path, "max_memory": "300MB"}
    assert parse_size(load_config(path, flags).max_memory or "") == 300_000_000
    path.write_text("max_memory = 300\n")
    with pytest.raises(ConfigError, match="max_memory: expected a string"):
        load_config(path, {"data_dir": tmp_path})


# ---- the window with a fake loader ------------------------------------------------------


class FakeLoader:
    """Blocks that are plain modules; counts the live ones (by weak reference)."""

    def __init__(self) -> None:
        self.live: set[int] = set()
        self.most_live = 0
        self.started = {i: threading.Event() for i in range(16)}
        self.fail: int | None = None
        self._lock = threading.Lock()

    def __call__(self, index: int) -> nn.Module:
        self.started[index].set()
        if index == self.fail:
            raise ModelLoadError("fake", f"block {index} is unreadable", "re-download it")
        block = nn.Identity()
        with self._lock:
            self.live.add(index)
            self.most_live = max(self.most_live, len(self.live))
        weakref.finalize(block, self._dead, index)
        return block

    def _dead(self, index: int) -> None:
        with self._lock:
            self.live.discard(index)


def test_blocks_load_in_visiting_order_and_the_one_just_behind_is_released() -> None:
    loader = FakeLoader()
    window = WeightWindow(range(5), 2, loader)
    try:
        for _ in range(3):  # three tokens through five blocks
            for i in range(5):
                window.block(i)
        assert window.block(0) is window.block(0)  # a resident block is not reloaded
    finally:
        window.close()
    loads = [i for kind, i in window.events if kind == "load"]
    releases = [i for kind, i in window.events if kind == "release"]
    assert loads == [k % 5 for k in range(len(loads))]
    assert 15 <= len(loads) <= 17  # each block once per token, plus what was prefetched
    assert len(releases) == len(loads) - 2
    assert loader.most_live <= 2 and window.resident() == []


@pytest.mark.parametrize(
    ("resident", "current", "step"),
    [
        ([], None, (None, 0)),  # a new window prefetches from the start
        ([0], None, (None, 1)),
        ([0, 1], None, (None, None)),
        ([0, 1], 0, (None, None)),
        ([0, 1], 1, (0, 2)),  # release behind, load ahead
        ([0, 1], 2, (1, 2)),  # both behind: the one just behind is needed last
        ([1, 2], 2, (1, 3)),
        ([3, 4], 4, (3, 0)),  # wrap around: the next token starts at block 0
        ([4], 4, (None, 0)),
    ],
)
def test_release_and_load_order(
    resident: list[int], current: int | None, step: tuple[int | None, int | None]
) -> None:
    assert next_step(resident, current, range(5), 2) == step


def test_the_next_block_loads_while_the_current_one_computes() -> None:
    loader = FakeLoader()
    window = WeightWindow(range(4), 2, loader)
    try:
        window.block(0)
        window.block(1)  # block 1 "computes" until block 2 has started loading
        assert loader.started[2].wait(HANG_GUARD)
        events = list(window.events)
        window.block(2)
    finally:
        window.close()
    assert events.index(("request", 1)) < events.index(("load", 2))
    assert ("request", 2) not in events


def test_a_load_failure_reaches_the_caller_and_a_closed_window_refuses() -> None:
    loader = FakeLoader()
    loader.fail = 2
    window = WeightWindow(range(4), 2, loader)
    try:
        window.block(0)
        with pytest.raises(ModelLoadError, match="block 2 is unreadable"):
            window.block(2)
    finally:
        window.close()
    ok = WeightWindow(range(4), 2, FakeLoader())
    ok.close()
    with pytest.raises(WindowClosed):
        ok.block(0)
    with pytest.raises(KeyError):
        WeightWindow(range(4), 1, FakeLoader()).block(7)


# ---- equal tokens -------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("model", ["llama", "shoal-tiny"])
def test_windowed_greedy_tokens_equal_the_whole_model(
    llama_dir: Path, model: str, quantize: str | None
) -> None:
    checkpoint = open_checkpoint(llama_dir if model == "llama" else DEFAULT_MODEL)
    expected = greedy(load_span(checkpoint, quantize=quantize))
    for size in (1, 2):
        windowed = load_windowed_span(
            checkpoint,
            Span.full(checkpoint.config),
            window=size,
            dtype=torch.float32,
            quantize=quantize,
        )
        try:
            assert greedy(windowed) == expected
            assert windowed.window.loads >= 24  # the window really cycled
        finally:
            windowed.close()


def test_a_budget_picks_the_window_and_a_roomy_one_loads_whole(llama_dir: Path) -> None:
    checkpoint = open_checkpoint(llama_dir)
    plan = plan_span(
        checkpoint, Span.full(checkpoint.config), 2**40, dtype=torch.float32, quantize=None
    )
    budget = plan.resident_bytes + plan.staging_bytes + 2 * plan.block_bytes
    windowed = load_bounded_span(checkpoint, max_memory=budget)
    try:
        assert isinstance(windowed, WindowedSpan) and windowed.window.size == 2
        assert greedy(windowed) == greedy(load_span(checkpoint))
    finally:
        windowed.close()
    whole = load_bounded_span(checkpoint, max_memory=plan.weight_bytes)
    assert not isinstance(whole, WindowedSpan)


@torch.inference_mode()
def test_a_windowed_middle_span_serves_the_same_hidden_states(llama_dir: Path) -> None:
    """What a server runs (``run_blocks``) on a span without embedding or head."""
    checkpoint = open_checkpoint(llama_dir)
    span = Span(start=1, end=4)
    whole = load_span(checkpoint, span)
    windowed = load_windowed_span(checkpoint, span, window=1, dtype=torch.float32, quantize=None)
    hidden = torch.randn(1, 5, checkpoint.config.hidden_size, generator=torch.Generator())
    try:
        expected = run_blocks(whole, hidden, whole.new_cache(), 0, 1, 4)
        got = run_blocks(windowed, hidden, windowed.new_cache(), 0, 1, 4)
        assert torch.equal(got, expected)
        assert [i for kind, i in windowed.window.events if kind == "request"] == [1, 2, 3]
    finally:
        windowed.close()


def test_cli_generate_local_with_a_memory_bound() -> None:
    runner = CliRunner()
    args = ["generate", "--local", "--temperature", "0", "--max-tokens", "24", "ROMEO:\n"]
    whole = runner.invoke(app, args)
    bounded = runner.invoke(app, [*args, "--max-memory", "8MB"])
    assert bounded.exit_code == 0, bounded.output
    assert bounded.stdout == whole.stdout
    assert "a window of 2 of 8 blocks" in bounded.stderr
    refused = runner.invoke(app, [*args, "--max-memory", "1MB"])
    assert refused.exit_code == 2 and "raise --max-memory" in refused.output
    bad = runner.invoke(app, [*args, "--max-memory", "8 parsecs"])
    assert bad.exit_code == 2 and "expected a positive size" in bad.output


# ---- the memory bound -----------------------------------------------------------


def _decode_in_processes(model: Path, bounds: list[str], new_tokens: int) -> list[dict[str, Any]]:
    """``tests/window_peer.py`` for each bound at once, each in its own process (so each
    peak RSS is its own); their JSON results."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    prompt = ",".join(map(str, PROMPT))
    command = [sys.executable, "-m", "tests.window_peer", str(model)]
    runs = [
        subprocess.Popen(
            [*command, bound, "none", str(new_tokens), prompt],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for bound in bounds
    ]
    results = []
    for run in runs:
        out, err = run.communicate(timeout=240)
        assert run.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.slow
def test_a_1gb_model_decodes_in_300mb_of_weight_memory(tmp_path: Path) -> None:
    """10 blocks of 100.7 MB (fp32, hidden 1536, GQA 12/4 heads): a window of 2 blocks."""
    model = tmp_path / "llama-1gb"
    size = save_random_llama(
        model, hidden=1536, intermediate=4096, layers=10, heads=12, kv_heads=4, vocab=512
    )
    assert 1.0e9 < size < 1.1e9
    bounded, whole = _decode_in_processes(model, [str(parse_size("300MB")), "none"], 4)
    assert bounded["tokens"] == whole["tokens"] and len(set(bounded["tokens"])) > 1
    assert bounded["window"] == 2 and bounded["block_loads"] >= 30
    assert bounded["weight_bytes"] < 300_000_000
    # the same measure sees the whole model when it is all there
    assert whole["weight_bytes"] > 1_000_000_000


@pytest.mark.slow
async def test_a_node_serving_every_block_under_a_bound_generates_the_same_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real `shoal node --max-memory 8MB` serving all 8 blocks of shoal-tiny (a window of
    2 blocks), reached through the swarm client."""
    from shoal.client import open_client
    from tests.daemons import Daemon

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    boot = Daemon(tmp_path / "boot", ()).start()
    server: Daemon | None = None
    try:
        args = ("--bootstrap", boot.addr, "--model", DEFAULT_MODEL, "--blocks", "0:8")
        server = Daemon(tmp_path / "server", (*args, "--max-memory", "8MB")).start()
        async with open_client([boot.addr]) as swarm:
            tokens = [
                t
                async for t in swarm.generate_tokens(
                    PROMPT, model=DEFAULT_MODEL, max_new_tokens=24, stop_ids=()
                )
            ]
        assert tokens == greedy(load_span(DEFAULT_MODEL))
        assert "a window of 2 block(s)" in server.log_path.read_text()
    finally:
        for daemon in (server, boot):
            if daemon is not None:
                daemon.kill()
