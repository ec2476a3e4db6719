"""`shoal demo` end to end: four real processes, the text equals one-process generation,
and nothing is left running afterwards (also after Ctrl-C)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from shoal.pipeline.generate import generate
from shoal.pipeline.loading import load_span, load_tokenizer, open_checkpoint
from tests.daemons import env_without_proxies

pytestmark = pytest.mark.slow

PROMPT = "JULIET:"


def demo_command(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "shoal.node.cli", "demo", "--workdir", str(workdir), *args]


def leftovers(workdir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if str(workdir) in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


def test_demo_streams_the_same_text_as_one_process_and_cleans_up(tmp_path: Path) -> None:
    result = subprocess.run(
        demo_command(tmp_path, "--prompt", PROMPT, "--max-tokens", "48"),
        capture_output=True,
        text=True,
        timeout=280,
        env=env_without_proxies() | {"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    checkpoint = open_checkpoint("shoal-tiny")
    tokenizer = load_tokenizer(checkpoint)
    tokens = generate(load_span(checkpoint), tokenizer.encode(PROMPT), max_new_tokens=48,
                      stop_ids=tokenizer.eos_ids)  # fmt: skip
    assert result.stdout == PROMPT + tokenizer.decode(list(tokens)) + "\n"
    assert "route: client -> " in result.stderr
    for span in ("blocks 0:3", "blocks 3:6", "blocks 6:8"):
        assert result.stderr.count(span) == 2  # started, and on the route
    assert "stopped 4 node processes" in result.stderr
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "interrupt_after",
    [
        "serves blocks 3:6",  # the demo waits for the last server
        "swarm up in",  # the client generates inside trio (Ctrl-C lands in a nursery)
    ],
)
def test_ctrl_c_stops_every_node_of_the_demo(tmp_path: Path, interrupt_after: str) -> None:
    process = subprocess.Popen(
        demo_command(tmp_path, "--max-tokens", "200"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env_without_proxies() | {"OMP_NUM_THREADS": "1"},
    )
    try:
        assert process.stderr is not None
        for line in process.stderr:
            if interrupt_after in line:
                break
        nodes = [p for p in leftovers(tmp_path) if p.pid != process.pid]
        assert len(nodes) == 4  # the demo's nodes, up
        time.sleep(1.0)  # into the wait, or into the generation (200 tokens take longer)
        os.kill(process.pid, signal.SIGINT)
        started = time.monotonic()
        _, rest = process.communicate(timeout=30)
        assert process.returncode == 130, rest
        assert time.monotonic() - started < 30
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        if process.stderr is not None:
            process.stderr.close()
    assert leftovers(tmp_path) == []
