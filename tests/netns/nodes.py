"""Real ``shoal node`` daemons, each in its own network namespace.

The test process lives in the root namespace and cannot reach a daemon's API on the
namespace's loopback, so every API call runs a tiny stdlib-only Python inside the
namespace (``ip netns exec``), about 30 ms each.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from shoal.transport.identity import load_or_create_identity, peer_id_of

PORT = 4001
API = "127.0.0.1:8470"  # one per namespace, so every node can use the same one

# urllib with proxies off (a proxy set for the test machine must not see these calls);
# an HTTP error still prints its JSON body.
_HTTP = """
import sys, urllib.request as u, urllib.error as e
api, method, path = sys.argv[1], sys.argv[2], sys.argv[3]
data = sys.argv[4].encode() if len(sys.argv) > 4 else None
req = u.Request("http://" + api + path, data=data, method=method,
                headers={"content-type": "application/json"})
try:
    print(u.build_opener(u.ProxyHandler({})).open(req, timeout=60).read().decode())
except e.HTTPError as err:
    print(err.read().decode())
"""

T = TypeVar("T")

# Nodes started and not yet stopped by stop_all: a failed wait shows all their logs (a
# punch that fails on A is decided on B).
_running: list[NsNode] = []


@dataclass
class NsNode:
    """One daemon: its namespace, its address, its data dir (identity made up front)."""

    name: str
    namespace: str
    ip: str
    data_dir: Path
    relay: bool = False
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        # Known before the daemon starts, so every node can be given the others' addresses.
        self.peer_id = str(peer_id_of(load_or_create_identity(self.data_dir)))

    @property
    def addr(self) -> str:
        return f"/ip4/{self.ip}/tcp/{PORT}/p2p/{self.peer_id}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    def start(self, *bootstrap: str) -> NsNode:
        command = [
            "ip", "netns", "exec", self.namespace,
            sys.executable, "-m", "shoal.node.cli", "node",
            "--data-dir", str(self.data_dir),
            "--listen", f"/ip4/{self.ip}/tcp/{PORT}",
            "--api", API,
            "--log-level", "info",
            "--relay" if self.relay else "--no-relay",
        ]  # fmt: skip
        for addr in bootstrap:
            command += ["--bootstrap", addr]
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        _running.append(self)
        return self

    def api(self, method: str, path: str, body: Any = None) -> Any:
        args = [API, method, path] + ([json.dumps(body)] if body is not None else [])
        command = ["ip", "netns", "exec", self.namespace, sys.executable, "-I", "-S", "-c", _HTTP]
        result = subprocess.run(command + args, capture_output=True, text=True, timeout=90)
        if result.returncode != 0:
            return None  # not listening yet
        return json.loads(result.stdout)

    def status(self) -> dict[str, Any] | None:
        data = self.api("GET", "/v1/status")
        return dict(data) if data else None

    def link(self, peer: NsNode) -> dict[str, Any] | None:
        """This node's link to ``peer`` as /v1/status reports it, or None."""
        status = self.status() or {"peers": []}
        return next((p for p in status["peers"] if p["peer_id"] == peer.peer_id), None)

    def ping(self, peer: NsNode, size: int, seed: int, *, bulk: bool = False) -> dict[str, Any]:
        body = {"peer": peer.peer_id, "bytes": size, "seed": seed, "bulk": bulk}
        return dict(self.api("POST", "/v1/ping", body))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        """The last log records, without the indented detail lines of py-libp2p's errors."""
        records = [ln for ln in self.log().splitlines() if ln and not ln[0].isspace()]
        return "\n".join(records[-lines:])

    def wait(self, probe: Callable[[NsNode], T | None], timeout: float, what: str) -> T:
        """Poll ``probe(self)`` until it returns something truthy; fail with the log."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited ({what})\n{_logs(self)}")
            value = probe(self)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {what}: not within {timeout}s\n{_logs(self)}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def _logs(failed: NsNode) -> str:
    """Every running node's log tail, the failed wait's own node last."""
    order = [n for n in _running if n is not failed] + [failed]
    return "\n".join(f"---- {n.name} ({n.peer_id[-8:]}) ----\n{n.log_tail()}" for n in order)


def stop_all(nodes: Sequence[NsNode]) -> None:
    for node in nodes:
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGTERM)
    for node in nodes:
        node.stop()
        if node in _running:
            _running.remove(node)
