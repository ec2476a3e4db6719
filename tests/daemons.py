"""Run real ``shoal node`` daemons as separate processes for integration tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

START_TIMEOUT = 30.0


@dataclass
class Daemon:
    data_dir: Path
    args: Sequence[str] = ()
    listen: str = "/ip4/127.0.0.1/tcp/0"
    process: subprocess.Popen[bytes] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def start(self, *extra: str) -> Daemon:
        runtime = self.data_dir / "node.json"
        runtime.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "shoal.node.cli", "node",
            "--data-dir", str(self.data_dir),
            "--listen", self.listen,
            "--api", "127.0.0.1:0",
            *self.args, *extra,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.info = wait_for(
                lambda: _read_json(runtime), START_TIMEOUT, f"{self.data_dir.name} start", self
            )
        except BaseException:  # not yet in any fixture's list: do not leave it running
            self.kill()
            raise
        return self

    @property
    def peer_id(self) -> str:
        return str(self.info["peer_id"])

    @property
    def addr(self) -> str:
        return str(self.info["addrs"][0])

    @property
    def api(self) -> str:
        return str(self.info["api"])

    def status(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.api}/v1/status", timeout=10).json())

    def peers(self) -> set[str]:
        return {p["peer_id"] for p in self.status()["peers"]}

    def ping(self, peer: str, size: int, seed: int, *, bulk: bool = False) -> dict[str, Any]:
        body = {"peer": peer, "bytes": size, "seed": seed, "bulk": bulk}
        response = httpx.post(f"{self.api}/v1/ping", json=body, timeout=120)
        return dict(response.json())

    def terminate(self, timeout: float = 10.0) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds to exit)."""
        assert self.process is not None
        start = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        return code, time.monotonic() - start

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError):
        return None


def wait_for(
    probe: Callable[[], Any], timeout: float, what: str, daemon: Daemon | None = None
) -> Any:
    """Poll ``probe`` until it returns something truthy; fail with the daemon's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon is not None and daemon.process is not None and daemon.process.poll() is not None:
            raise AssertionError(
                f"{what}: daemon exited {daemon.process.returncode}\n{daemon.log()}"
            )
        try:
            value = probe()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        time.sleep(0.1)
    tail = daemon.log()[-3000:] if daemon else ""
    raise AssertionError(f"{what}: not done within {timeout}s\n{tail}")


def env_without_proxies() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
