"""DHT lookup latency and roster propagation across 32 real nodes in 4 processes.

    python scripts/bench/dht.py [--nodes 32] [--procs 4] [--lookups 400] [--settle 60]
                                [--json FILE]

Each worker process runs ``nodes / procs`` full shoal nodes (``run_node``: host, peering,
state sync, NAT service, discovery; no HTTP API) in one trio loop, all on 127.0.0.1,
joined through the first node of worker 0. The coordinator (this process, no node)
drives them over stdin/stdout with one JSON line per command and reply.

Once every node's view of the model is complete, the swarm is left ``--settle`` seconds
(a swarm that just formed is still exchanging state and peers) and each worker's CPU use
is sampled for 10 s (idle) and over the lookups. Measured, one lookup at a time across
the whole swarm (so a lookup does not wait on
another):

- ``find_servers(model, block)`` from a random node for a random block of an 8-block
  model served by 4 nodes: warm (server records cached, as when a client routes again:
  an untimed view from that node first)
  and cold (record cache cleared first: a provider walk plus a record walk);
- ``model_view(model, 8)``: every block's servers in one batched lookup;
- the baseline, in the same run: one py-libp2p Kademlia FIND_NODE on a new stream (its
  own request path, ``shoal.dht.kad.find_node``) from a node to a random routing-table
  peer; the ratio lookup / FIND_NODE says how many of py-libp2p's requests a lookup
  costs;
- roster propagation: a node writes a roster field; every other node polls its own
  document every 5 ms; the time until the last of the 31 sees it (several writes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
MODEL = "bench-model"
BLOCKS = 8


# ---- worker ------------------------------------------------------------------------


def worker(index: int, count: int, bootstrap: str | None, data: Path) -> None:
    import logging

    import trio

    from shoal.transport.logs import route_libp2p_logs

    logging.basicConfig(
        level=logging.WARNING, format=f"w{index} %(levelname)s %(name)s: %(message)s"
    )
    route_libp2p_logs()

    from shoal.dht import kad
    from shoal.node.config import NodeConfig
    from shoal.node.daemon import Node, run_node

    async def main() -> None:
        nodes: list[Node] = []
        async with trio.open_nursery() as nursery:
            for i in range(count):
                boot = (
                    (bootstrap,) if bootstrap else ((nodes[0].host.listen_addrs()[0],) if i else ())
                )
                config = NodeConfig(
                    data_dir=data / f"w{index}n{i}",
                    listen=("/ip4/127.0.0.1/tcp/0",),
                    bootstrap=boot,
                    api=None,
                    swarm="bench",
                    log_level="warning",
                )
                nodes.append(await nursery.start(run_node, config))
            reply(
                {
                    "ready": [n.host.listen_addrs()[0] for n in nodes],
                    "peers": [str(n.host.peer_id) for n in nodes],
                }
            )
            stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            buffer = b""
            while True:
                chunk = await stdin.receive_some(65536)
                if not chunk:
                    nursery.cancel_scope.cancel()
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    nursery.start_soon(handle, nodes, json.loads(line))

    async def handle(nodes: list[Node], command: dict[str, Any]) -> None:
        kind = command["cmd"]
        out: dict[str, Any] = {"id": command["id"]}
        if kind == "rt":
            out["rt"] = [n.discovery.status()["routing_table"] for n in nodes]
        elif kind == "announce":
            nodes[command["node"]].discovery.announce(MODEL, command["start"], command["end"])
        elif kind == "lookup":
            out.update(await lookups(nodes, command))
        elif kind == "baseline":
            out["lat"] = await find_nodes(nodes, command["n"])
        elif kind == "write":
            out["t"] = time.time()
            nodes[command["node"]].sync.write("peer", "bench_mark", command["value"])
        elif kind == "watch":
            out["seen"] = await watch(nodes, command["author"], command["value"])
        reply(out)

    async def lookups(nodes: list[Node], command: dict[str, Any]) -> dict[str, Any]:
        expect: dict[str, list[str]] = command["expect"]
        rng = random.Random(command["seed"])
        lat: list[float] = []
        wrong = 0
        for _ in range(command["n"]):
            node = rng.choice(nodes)
            if command["mode"] == "cold":
                node.discovery._records.clear()
            elif command["mode"] == "warm":  # untimed: records cached as after routing once
                await node.discovery.model_view(MODEL, BLOCKS)
            block = rng.randrange(BLOCKS)
            start = time.perf_counter()
            if command["mode"] == "view":
                view = await node.discovery.model_view(MODEL, BLOCKS)
                ok = view == [expect[str(b)] for b in range(BLOCKS)]
            else:
                found = await node.discovery.find_servers(MODEL, block)
                ok = [r.peer_id for r in found] == expect[str(block)]
                if not ok and wrong < 3:
                    print(
                        "WRONG",
                        block,
                        [r.peer_id[-6:] for r in found],
                        [p[-6:] for p in expect[str(block)]],
                        file=sys.stderr,
                        flush=True,
                    )
            lat.append(time.perf_counter() - start)
            wrong += not ok
        return {"lat": lat, "wrong": wrong}

    async def find_nodes(nodes: list[Node], n: int) -> list[float]:
        lat = []
        rng = random.Random(7)
        for _ in range(n):
            node = rng.choice(nodes)
            dht = node.discovery.dht
            assert dht is not None
            peer = rng.choice(dht.routing_table.get_peer_ids())
            start = time.perf_counter()
            await kad.find_node(node.host.libp2p, peer, rng.randbytes(32))
            lat.append(time.perf_counter() - start)
        return lat

    async def watch(nodes: list[Node], author: str, value: int) -> list[float]:
        seen: list[float] = []

        async def one(node: Node) -> None:
            with trio.fail_after(30):
                while node.sync.state.section("peer").get(author, {}).get("bench_mark") != value:  # noqa: ASYNC110
                    await trio.sleep(0.005)
            seen.append(time.time())

        async with trio.open_nursery() as nursery:
            for node in nodes:
                if str(node.host.peer_id) != author:
                    nursery.start_soon(one, node)
        return seen

    trio.run(main)


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


# ---- coordinator -------------------------------------------------------------------


class Worker:
    def __init__(self, index: int, count: int, bootstrap: str | None, data: Path) -> None:
        args = [sys.executable, str(HERE), "--worker", str(index), "--count", str(count)]
        args += ["--data", str(data)] + (["--bootstrap", bootstrap] if bootstrap else [])
        self.process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        ready = self.read()
        self.addrs: list[str] = ready["ready"]
        self.peers: list[str] = ready["peers"]
        self.ids = 0
        self.cpu: Any = None

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"worker exited ({self.process.wait()})")
        return dict(json.loads(line))

    def send(self, **command: Any) -> int:
        assert self.process.stdin is not None
        self.ids += 1
        self.process.stdin.write(json.dumps({"id": self.ids, **command}) + "\n")
        self.process.stdin.flush()
        return self.ids

    def ask(self, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return self.read()

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def cpu_percent(workers: list[Worker], seconds: float) -> list[float]:
    """Each worker's CPU use (% of one core) over the next ``seconds``, or, with 0, since
    the previous call."""
    import psutil

    for w in workers:
        w.cpu = w.cpu or psutil.Process(w.process.pid)
        if seconds:
            w.cpu.cpu_percent()
    time.sleep(seconds)
    return [round(w.cpu.cpu_percent(), 1) for w in workers]


def percentiles(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 2),
        "mean_ms": round(statistics.fmean(ms), 2),
    }


def coordinate(args: argparse.Namespace) -> dict[str, Any]:
    per = args.nodes // args.procs
    data = Path(tempfile.mkdtemp(prefix="shoal-bench-dht-"))
    workers = [Worker(0, per, None, data)]
    try:
        for index in range(1, args.procs):
            workers.append(Worker(index, per, workers[0].addrs[0], data))
        started = time.monotonic()
        while True:  # every routing table holds most of the swarm
            tables = [t for w in workers for t in w.ask(cmd="rt")["rt"]]
            if min(tables) >= min(args.nodes - 1, 16) or time.monotonic() - started > 60:
                break
            time.sleep(0.5)
        print(f"swarm up: routing tables {min(tables)}..{max(tables)}", file=sys.stderr, flush=True)

        # Four servers (one per process) cover the 8 blocks twice: [0,4) [4,8) [0,4) [4,8).
        spans = [(0, 4), (4, 8), (0, 4), (4, 8)]
        servers: dict[int, list[str]] = {b: [] for b in range(BLOCKS)}
        for w, (start, end) in zip(workers, spans, strict=False):
            w.ask(cmd="announce", node=1, start=start, end=end)
            for b in range(start, end):
                servers[b].append(w.peers[1])
        expect = {str(b): sorted(p) for b, p in servers.items()}
        announced = time.monotonic()
        while time.monotonic() - announced < 120:  # until every node's view is complete
            checks = [
                w.ask(cmd="lookup", n=per, mode="view", seed=9, expect=expect) for w in workers
            ]
            if all(c["wrong"] == 0 for c in checks):
                break
        formed = time.monotonic() - announced
        print(f"every view complete {formed:.1f}s after the announcements", file=sys.stderr)
        results: dict[str, Any] = {"views_complete_s": round(formed, 1)}
        # A swarm that just formed is still exchanging state and peers: measure a settled one.
        time.sleep(args.settle)
        results["idle_cpu_per_process"] = cpu_percent(workers, 10.0)
        print("idle CPU % per process", results["idle_cpu_per_process"], file=sys.stderr)

        per_worker = max(1, args.lookups // args.procs)
        for mode in ("warm", "cold", "view"):
            lat: list[float] = []
            wrong = 0
            for i, w in enumerate(workers):
                got = w.ask(cmd="lookup", n=per_worker, mode=mode, seed=i, expect=expect)
                lat += got["lat"]
                wrong += got["wrong"]
            results[f"lookup_{mode}"] = percentiles(lat) | {"wrong": wrong}
            print(mode, results[f"lookup_{mode}"], file=sys.stderr, flush=True)
        base: list[float] = []
        for w in workers:
            base += w.ask(cmd="baseline", n=per_worker)["lat"]
        results["find_node_baseline"] = percentiles(base)
        results["lookup_warm_over_find_node_p50"] = round(
            results["lookup_warm"]["p50_ms"] / results["find_node_baseline"]["p50_ms"], 2
        )

        results["lookup_cpu_per_process"] = cpu_percent(workers, 0.0)
        spreads = []
        for round_ in range(args.writes):
            writer = workers[round_ % args.procs]
            author = writer.peers[2]
            value = round_ + 1
            watches = {id(w): w.send(cmd="watch", author=author, value=value) for w in workers}
            time.sleep(0.2)
            write_id = writer.send(cmd="write", node=2, value=value)
            seen: list[float] = []
            wrote_at = 0.0
            for w in workers:
                want = {watches[id(w)]} | ({write_id} if w is writer else set())
                while want:
                    got = w.read()
                    want.discard(got["id"])
                    seen += got.get("seen", [])
                    wrote_at = got.get("t", wrote_at)
            assert len(seen) == args.nodes - 1, len(seen)
            spreads.append(max(seen) - wrote_at)
            time.sleep(0.5)
        results["roster_write_to_all_s"] = {
            "writes": len(spreads),
            "median": round(statistics.median(spreads), 3),
            "max": round(max(spreads), 3),
        }
        return results
    finally:
        for w in workers:
            w.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=32)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--lookups", type=int, default=400)
    parser.add_argument("--writes", type=int, default=5)
    parser.add_argument(
        "--settle", type=float, default=60.0, help="seconds to wait after the swarm formed"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.count, args.bootstrap, args.data)
        return
    results = coordinate(args)
    results["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
