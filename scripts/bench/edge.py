"""Edge benchmark: decode tokens/s of a tensor-parallel group of 1, 2 and 3 members on
loopback, star vs ring.

    python scripts/bench/edge.py --json edge.json [--model shoal-tiny] [--new-tokens 32]

Every configuration serves the whole model (blocks 0:L) with ``shoal node`` processes on
loopback (a bootstrap node besides): ``plain`` is one ordinary server; ``tp1`` a group
of one (the group code path without a network all-reduce); ``tp2``/``tp3`` groups of 2
and 3 equal members, the all-reduce forced to ``star`` or ``ring``. The client
(``shoal.open_client``) generates greedily; every generation's tokens are checked
against one process first (no figure for wrong output). Decode tokens/s is (new tokens
- 1) over the time from the first to the last token, the median of --repeats
generations after a warm-up one. Every process runs --threads torch threads (default 1).

Not measured here: the memory window (--max-memory, another issue's code), and netem
delays between namespaces.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shoal.client import open_client  # noqa: E402
from shoal.pipeline.chain import ChainConfig  # noqa: E402
from shoal.pipeline.generate import generate  # noqa: E402
from shoal.pipeline.loading import load_span, open_checkpoint  # noqa: E402

CONFIGS: dict[str, tuple[int, str | None]] = {
    "plain": (1, None),
    "tp1": (1, "star"),
    "tp2-star": (2, "star"),
    "tp2-ring": (2, "ring"),
    "tp3-star": (3, "star"),
    "tp3-ring": (3, "ring"),
}


class Node:
    def __init__(self, data_dir: Path, args: Sequence[str], env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.log = data_dir.with_suffix(".log")
        command = [
            sys.executable, "-m", "shoal.node.cli", "node", "--data-dir", str(data_dir),
            "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "off", *args,
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        self.info: dict[str, Any] = {}

    def wait(self, timeout: float) -> Node:
        deadline = time.monotonic() + timeout
        runtime = self.data_dir / "node.json"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.data_dir.name} exited:\n{self.log.read_text()[-2000:]}")
            try:
                self.info = json.loads(runtime.read_text())
                return self
            except (FileNotFoundError, ValueError):
                time.sleep(0.1)
        raise RuntimeError(f"{self.data_dir.name} did not start:\n{self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


async def decode_rate(
    boot: str, model: str, prompt: list[int], new: int
) -> tuple[float, list[int]]:
    async with open_client([boot], chain=ChainConfig(route_timeout=60)) as swarm:
        tokens, times = [], []
        async for token in swarm.generate_tokens(
            prompt, model=model, max_new_tokens=new, stop_ids=()
        ):
            tokens.append(token)
            times.append(time.perf_counter())
    return (new - 1) / (times[-1] - times[0]), tokens


def run(args: argparse.Namespace) -> dict[str, Any]:
    checkpoint = open_checkpoint(args.model)
    blocks = f"0:{checkpoint.config.num_layers}"
    prompt = [(7 * i + 3) % checkpoint.config.vocab_size for i in range(args.prompt_tokens)]
    expected = list(generate(load_span(checkpoint), prompt, max_new_tokens=args.new_tokens))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    tmp = Path(tempfile.mkdtemp(prefix="shoal-edge-"))
    results: dict[str, Any] = {}
    boot: Node | None = None
    try:
        boot = Node(tmp / "boot", [], env).wait(args.start_timeout)
        addr = boot.info["addrs"][0]
        for name in args.configs:
            size, topology = CONFIGS[name]
            model_id = f"edge-{name}"  # its own id: no stale announcement of an earlier run
            extra = ["--model", args.model, "--model-id", model_id, "--blocks", blocks]
            extra += ["--threads", str(args.threads)]
            if topology is not None:
                extra += ["--tp-group", name, "--tp-size", str(size), "--tp-weight", "1"]
                extra += ["--tp-topology", topology]
            nodes = [
                Node(tmp / f"{name}-{i}", ["--bootstrap", addr, *extra], env) for i in range(size)
            ]
            try:
                for node in nodes:
                    node.wait(args.start_timeout)
                trio.run(decode_rate, addr, model_id, prompt, args.new_tokens)  # warm-up
                rates = []
                for _ in range(args.repeats):
                    rate, tokens = trio.run(decode_rate, addr, model_id, prompt, args.new_tokens)
                    if tokens != expected:
                        raise RuntimeError(f"{name}: wrong tokens {tokens} != {expected}")
                    rates.append(rate)
                results[name] = {"members": size, "topology": topology,
                                 "decode_tokens_per_s": round(statistics.median(rates), 2),
                                 "runs": [round(r, 2) for r in rates]}  # fmt: skip
                print(name, results[name], flush=True)
            finally:
                for node in nodes:
                    node.kill()
    finally:
        for path in tmp.glob("*.log"):
            if args.keep_logs:
                shutil.copy(path, Path(args.keep_logs) / path.name)
        if boot is not None:
            boot.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "model": args.model,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shoal-tiny")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument(
        "--start-timeout", type=float, default=600.0, help="seconds a node may take to start"
    )
    parser.add_argument("--keep-logs", default=None, help="copy the nodes' logs here")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    # the client's DHT logs every dial to a stopped configuration's server
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    report = run(args)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
