"""``shoal demo``: a whole swarm on this machine, one generation through it, then clean up.

Four ``shoal node`` processes on loopback: a bootstrap node, and three servers of
shoal-tiny's 8 blocks (0:3 with the embedding, 3:6, 6:8 with the head). The demo waits
until each is serving, generates through the swarm with the Python client (the servers
pass activations along the chain), prints the text as it streams and the route it took,
and stops every process: SIGTERM, then SIGKILL for any that lingers, also on Ctrl-C or an
error. On Linux each child also gets SIGTERM if the demo process itself dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from shoal.node.errors import NodeError, run_trio

MODEL = "shoal-tiny"
SPANS = ((0, 3), (3, 6), (6, 8))
SWARM = "demo"
START_TIMEOUT = 180.0
err = Console(stderr=True)


@dataclass
class DemoNode:
    name: str
    data_dir: Path
    process: subprocess.Popen[bytes]

    @property
    def log_path(self) -> Path:
        return self.data_dir.with_suffix(".log")

    def runtime(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.data_dir / "node.json").read_text()))
        except (FileNotFoundError, ValueError):
            return None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class DemoSwarm:
    """The demo's processes; :meth:`stop` ends every one of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: list[DemoNode] = []

    def launch(self, name: str, *args: str) -> DemoNode:
        data_dir = self.root / name
        data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "shoal.node.cli", "node",
            "--data-dir", str(data_dir),
            "--listen", "/ip4/127.0.0.1/tcp/0",
            "--api", "off",
            "--swarm", SWARM,
            "--dht-refresh", "10",
            "--log-level", "warning",
            *args,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env.setdefault("OMP_NUM_THREADS", "1")  # four processes share this machine's cores
        with data_dir.with_suffix(".log").open("wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_die_with_parent,  # the demo's parent is single-threaded here
            )
        node = DemoNode(name, data_dir, process)
        self.nodes.append(node)
        return node

    def wait_ready(self, node: DemoNode, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise NodeError(
                    f"demo node {node.name} exited with code {node.process.returncode}:\n"
                    f"{node.log_tail()}"
                )
            info = node.runtime()
            if info is not None:
                return info
            time.sleep(0.1)
        raise NodeError(
            f"demo node {node.name} did not start within {timeout:.0f}s:\n{node.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            try:
                node.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(5)


@contextlib.contextmanager
def _workdir(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="shoal-demo-") as tmp:
        yield Path(tmp)


def run_demo(
    prompt: str, *, max_tokens: int = 120, temperature: float = 0.0, workdir: Path | None = None
) -> str:
    """Run the demo; prints the text to stdout and the story to stderr; returns the text."""
    with _workdir(workdir) as root:
        swarm = DemoSwarm(root)
        try:
            started = time.monotonic()
            err.print("starting a local swarm: a bootstrap node and 3 servers of shoal-tiny")
            boot = swarm.wait_ready(swarm.launch("bootstrap"))
            address = str(boot["addrs"][0])
            servers = [
                swarm.launch(f"server{i}", "--bootstrap", address, "--model", MODEL,
                             "--blocks", f"{a}:{b}")
                for i, (a, b) in enumerate(SPANS, 1)
            ]  # fmt: skip
            for node, (a, b) in zip(servers, SPANS, strict=True):
                info = swarm.wait_ready(node)
                err.print(
                    f"  {node.name} (pid {node.process.pid}, peer …{str(info['peer_id'])[-8:]}) "
                    f"serves blocks {a}:{b}"
                    + (" + embedding" if a == 0 else "")
                    + (" + head" if b == 8 else ""),
                    highlight=False,
                )
            err.print(f"swarm up in {time.monotonic() - started:.1f}s; generating\n")
            options = {
                "model": MODEL,
                "max_new_tokens": max_tokens,
                "temperature": temperature,
            }
            return run_trio(_generate, address, prompt, options)
        finally:
            swarm.stop()
            err.print(f"stopped {len(swarm.nodes)} node processes")


async def _generate(address: str, prompt: str, options: dict[str, Any]) -> str:
    from shoal.client import open_client
    from shoal.node.cli import stream_generation

    async with open_client([address], swarm=SWARM) as client:
        return await stream_generation(client, prompt, options)
