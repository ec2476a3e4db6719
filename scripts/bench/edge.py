"""Edge benchmark: decode tokens/s of a tensor-parallel group of 1, 2 and 3 members,
star vs ring, on loopback and over links with an added delay; the memory window; peak RSS.

    python scripts/bench/edge.py --json edge.json --delay-ms 0,0.5,5 [--model shoal-tiny]

Every configuration serves the whole model (blocks 0:L) with ``shoal node`` processes (a
fresh bootstrap node each): ``plain`` is one ordinary server; ``window`` the same under
``--max-memory`` of half the model's weight bytes (the sliding window, docs/memory.md);
``tp1`` a group of one (the group code path without a network all-reduce);
``tp2``/``tp3`` groups of 2 and 3 equal members, the all-reduce forced to ``star`` or
``ring``. The client (``shoal.open_client``, in this process) generates greedily; every
generation's tokens are checked against one process first (no figure for wrong output).
Decode tokens/s is (new tokens - 1) over the time from the first to the last token, the
median of --repeats generations after a warm-up one. Every process runs --threads torch
threads (default 1). Peak RSS is each serving node's VmHWM, read just before it is killed.

--configs run on plain loopback. Then, for each --delay-ms D, --delayed-configs run with
every node in a network namespace of its own and every link to a node held D ms each way
(scripts/bench/delaylink.py): by ``tc netem`` where the kernel has it, else (``proxy``) by
a userspace TCP proxy in front of each node. D = 0 through the proxy shows what the proxy
itself costs. Each row prints the round trip one link measured (a one-byte echo through
the same delay), so the delay is seen, not assumed. The netem path has never run with a
delay (the kernel it was written on has no netem).
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

import torch
import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))

import delaylink  # noqa: E402

from shoal.client import open_client  # noqa: E402
from shoal.pipeline.chain import ChainConfig  # noqa: E402
from shoal.pipeline.errors import ModelNotFound  # noqa: E402
from shoal.pipeline.generate import generate  # noqa: E402
from shoal.pipeline.loading import Checkpoint, load_span, open_checkpoint  # noqa: E402
from shoal.pipeline.model import Span  # noqa: E402
from shoal.pipeline.window import plan_span  # noqa: E402

CONFIGS: dict[str, tuple[int, str | None]] = {
    "plain": (1, None),
    "window": (1, None),  # plain under --max-memory of half the weights
    "tp1": (1, "star"),
    "tp2-star": (2, "star"),
    "tp2-ring": (2, "ring"),
    "tp3-star": (3, "star"),
    "tp3-ring": (3, "ring"),
}
DELAYED = ["plain", "tp2-star", "tp2-ring", "tp3-star", "tp3-ring"]
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


class Node:
    def __init__(
        self,
        data_dir: Path,
        args: Sequence[str],
        env: dict[str, str],
        *,
        listen: Sequence[str] = ("--listen", LOOPBACK),
        prefix: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.log = data_dir.parent / f"{data_dir.name}.log"
        command = [
            *prefix, sys.executable, "-m", "shoal.node.cli", "node", "--data-dir", str(data_dir),
            *listen, "--api", "off", *args,
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

    def peak_rss(self) -> int | None:
        """The process's peak RSS in bytes (VmHWM), None once it has ended."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class Link:
    """How the nodes of one configuration reach each other (scripts/bench/delaylink.py):
    ``loopback`` (``delay_ms`` None: all on 127.0.0.1), or each node in a network namespace
    of its own on a bridge, every link held ``delay_ms`` each way, by ``proxy`` (node I
    listens on its namespace's 127.0.0.1, reachable from nowhere else, and announces its
    proxy's address; a listen address leaked through the DHT or identify cannot be dialled
    from outside) or by ``netem`` on its veth."""

    def __init__(self, mode: str, delay_ms: float | None, members: int) -> None:
        self.mode = "loopback" if delay_ms is None else mode
        self.delay_ms = delay_ms or 0.0
        self.proxies: list[delaylink.ProxyProcess] = []
        self.ports: list[int] = []  # each node's own port, in its namespace
        self.namespaces = delaylink.Namespaces(members, self.delay_ms if mode == "netem" else 0)
        self.boot_listen = LOOPBACK
        if self.mode != "loopback":
            self.namespaces.up()
            self.boot_listen = f"/ip4/{delaylink.BRIDGE_IP}/tcp/0"

    def start(self, size: int) -> float | None:
        """Set up the links of ``size`` nodes; the measured round trip (s) of one link."""
        if self.mode == "proxy":
            self.ports = [delaylink.free_port() for _ in range(size)]
            ns = self.namespaces
            for i, own in enumerate(self.ports):
                # the dial-back check dials a peer at 127.0.0.1 (where this node sees it)
                relays = [(p + 1, ns.ip(j)) for j, p in enumerate(self.ports) if j != i]
                proxy = delaylink.ProxyProcess.start(
                    [(own + 1, own)], self.delay_ms, host=ns.ip(i), prefix=ns.prefix(i),
                    relays=relays,
                )  # fmt: skip
                self.proxies.append(proxy)
            return self.proxies[0].rtt()
        if self.mode == "netem" and size > 1:
            return self.namespaces.rtt()
        return None

    def node(self, index: int) -> dict[str, list[str]]:
        """Node's keyword arguments (listen, announce, namespace) for node ``index``."""
        if self.mode == "loopback":
            return {}
        prefix = self.namespaces.prefix(index)
        if self.mode == "proxy":
            own, ip = self.ports[index], self.namespaces.ip(index)
            listen = ["--listen", f"/ip4/127.0.0.1/tcp/{own}"]
            return {"listen": [*listen, "--announce", f"/ip4/{ip}/tcp/{own + 1}"], "prefix": prefix}
        listen = ["--listen", f"/ip4/{self.namespaces.ip(index)}/tcp/0"]
        return {"listen": listen, "prefix": prefix}

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        self.proxies = []

    def close(self) -> None:
        self.stop()
        if self.mode != "loopback":
            self.namespaces.down()


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


def generation(
    args: argparse.Namespace, boot: str, model_id: str, retries: list[str]
) -> tuple[float, list[int]]:
    """One timed generation, asked again while the model is not found, until
    --start-timeout: a group over slow links may announce itself later than the client
    looks for it (20 s), and its leader, whose dial-back check fails through the proxies
    (the proxy hides the dialer's IP), goes to DHT client mode, after which the client
    has been seen to miss its records for a while. Each retry is noted in ``retries``."""
    deadline = time.monotonic() + args.start_timeout
    while True:
        try:
            return trio.run(decode_rate, boot, model_id, args.prompt, args.new_tokens)
        except* ModelNotFound:
            if time.monotonic() > deadline:
                raise
            retries.append(time.strftime("%H:%M:%S"))
        print(f"{model_id}: not found, asking again", flush=True)


def weight_bytes(checkpoint: Checkpoint) -> int:
    """Bytes of the whole model's weights as served (fp32, not quantized)."""
    plan = plan_span(checkpoint, Span.full(checkpoint.config), 1 << 62, dtype=torch.float32,
                     quantize=None)  # fmt: skip
    return plan.weight_bytes


def measure(
    args: argparse.Namespace, link: Link, name: str, tmp: Path, expected: list[int]
) -> dict[str, Any]:
    """One configuration on ``link``: a fresh bootstrap node and servers, the decode rate."""
    checkpoint = open_checkpoint(args.model)
    size, topology = CONFIGS[name]
    label = f"{name}@{link.mode}" + ("" if link.mode == "loopback" else f"-{link.delay_ms}ms")
    model_id = f"edge-{label.replace('@', '-')}"  # its own id: no stale announcement
    extra = ["--model", args.model, "--model-id", model_id, "--blocks", f"0:{checkpoint.config.num_layers}"]  # fmt: skip
    extra += ["--threads", str(args.threads)]
    if args.no_bulk:
        extra += ["--no-bulk"]
    if name == "window":
        extra += ["--max-memory", str(args.max_memory)]
    if topology is not None:
        extra += ["--tp-group", model_id, "--tp-size", str(size), "--tp-weight", "1"]
        extra += ["--tp-topology", topology]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    boot = Node(tmp / f"boot-{label}", [], env, listen=["--listen", link.boot_listen])
    nodes: list[Node] = []
    try:
        addr = boot.wait(args.start_timeout).info["addrs"][0]
        rtt = link.start(size)
        for i in range(size):
            nodes.append(
                Node(tmp / f"{label}-{i}", ["--bootstrap", addr, *extra], env, **link.node(i))
            )
        for node in nodes:
            node.wait(args.start_timeout)
        retries: list[str] = []
        generation(args, addr, model_id, retries)  # warm-up
        rates = []
        for _ in range(args.repeats):
            rate, tokens = generation(args, addr, model_id, retries)
            if tokens != expected:
                raise RuntimeError(f"{label}: wrong tokens {tokens} != {expected}")
            rates.append(rate)
        rss = [node.peak_rss() for node in nodes]
    finally:
        for node in nodes:
            node.kill()
        boot.kill()
        link.stop()
    delay = None if link.mode == "loopback" else link.delay_ms
    row = {"config": name, "link": link.mode, "delay_ms": delay,
           "rtt_ms": None if rtt is None else round(rtt * 1000, 2),
           "members": size, "topology": topology,
           "decode_tokens_per_s": round(statistics.median(rates), 2),
           "runs": [round(r, 2) for r in rates],
           "peak_rss_mb": [None if r is None else round(r / 1e6) for r in rss],
           "model_not_found_retries": len(retries)}  # fmt: skip
    if name == "window":
        row["max_memory"] = args.max_memory
    print(row, flush=True)
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    checkpoint = open_checkpoint(args.model)
    args.prompt = [(7 * i + 3) % checkpoint.config.vocab_size for i in range(args.prompt_tokens)]
    expected = list(generate(load_span(checkpoint), args.prompt, max_new_tokens=args.new_tokens))
    weights = weight_bytes(checkpoint)
    if args.max_memory is None:
        args.max_memory = weights // 2
    mode = args.link
    if mode == "auto":
        why_not = delaylink.netem_available()
        mode = "netem" if why_not is None else "proxy"
        print(f"links: {mode}" + ("" if why_not is None else f" ({why_not})"), flush=True)
    settings: list[tuple[float | None, list[str]]] = [(None, args.configs)]
    settings += [(d, args.delayed_configs) for d in args.delay_ms]
    tmp = Path(tempfile.mkdtemp(prefix="shoal-edge-"))
    rows = []
    try:
        for delay, names in settings:
            if not names:
                continue
            link = Link(mode, delay, max(CONFIGS[n][0] for n in names))
            try:
                for name in names:
                    tp3_skipped = args.tp3_delay_ms is not None and delay not in args.tp3_delay_ms
                    if delay is not None and CONFIGS[name][0] == 3 and tp3_skipped:
                        continue
                    rows.append(measure(args, link, name, tmp, expected))
            finally:
                link.close()
    finally:
        for path in tmp.glob("*.log"):
            if args.keep_logs:
                shutil.copy(path, Path(args.keep_logs) / path.name)
        shutil.rmtree(tmp, ignore_errors=True)
    plain = [r for r in rows if r["config"] == "plain" and r["delay_ms"] is None]
    window = [r for r in rows if r["config"] == "window"]
    ratio = None
    if plain and window:
        ratio = round(window[0]["decode_tokens_per_s"] / plain[0]["decode_tokens_per_s"], 3)
    return {
        "model": args.model,
        "weight_bytes": weights,
        "max_memory": args.max_memory,
        "window_ratio": ratio,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "repeats": args.repeats,
        "link": mode,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
    }


def table(report: dict[str, Any]) -> str:
    lines = ["config     link      delay ms  rtt ms  tok/s   runs                 peak RSS MB"]
    for r in report["rows"]:
        delay = "-" if r["delay_ms"] is None else f"{r['delay_ms']:g}"
        rtt = "-" if r["rtt_ms"] is None else f"{r['rtt_ms']:.2f}"
        runs = ", ".join(f"{x:g}" for x in r["runs"])
        rss = ", ".join(str(x) for x in r["peak_rss_mb"])
        lines.append(f"{r['config']:<10} {r['link']:<9} {delay:>8} {rtt:>7} "
                     f"{r['decode_tokens_per_s']:>6g}  {runs:<20} {rss}")  # fmt: skip
    if report["window_ratio"] is not None:
        lines.append(f"window/plain decode tokens/s: {report['window_ratio']} "
                     f"(--max-memory {report['max_memory']} of {report['weight_bytes']} "
                     "weight bytes)")  # fmt: skip
    return "\n".join(lines)


def delays(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--delay-ms {text!r}: give numbers, e.g. 0,0.5,5"
        ) from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"--delay-ms {text!r}: delays must not be negative")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shoal-tiny")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS),
                        help="configurations on plain loopback")  # fmt: skip
    parser.add_argument("--delay-ms", type=delays, default=[],
                        help="one-way link delays, e.g. 0,0.5,5 (0: the links' own cost)")  # fmt: skip
    parser.add_argument("--delayed-configs", nargs="*", default=DELAYED, choices=list(CONFIGS),
                        help="configurations run at each --delay-ms")  # fmt: skip
    parser.add_argument("--tp3-delay-ms", type=delays, default=None,
                        help="run groups of 3 only at these of --delay-ms (default: all)")  # fmt: skip
    parser.add_argument("--link", choices=["auto", "proxy", "netem"], default="auto",
                        help="how links are delayed (auto: netem where the kernel has it)")  # fmt: skip
    parser.add_argument("--no-bulk", action="store_true",
                        help="nodes run --no-bulk (every link over libp2p streams)")  # fmt: skip
    parser.add_argument("--max-memory", type=int, default=None,
                        help="the window row's bound in bytes (default: half the weights)")  # fmt: skip
    parser.add_argument(
        "--start-timeout", type=float, default=600.0, help="seconds a node may take to start"
    )
    parser.add_argument("--keep-logs", default=None, help="copy the nodes' logs here")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    # the client's DHT logs every dial to a stopped configuration's server, and every dial
    # to a listen address that identify leaked from inside a namespace (dead outside it)
    logging.disable(logging.ERROR)
    report = run(args)
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
