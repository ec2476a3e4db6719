"""All-reduce benchmark: shoal's fault-tolerant all-reduce against torch.distributed gloo.

    python scripts/bench/allreduce.py [--peers 4] [--mib 64] [--iters 3]
        [--codecs fp32,int8] [--transports bulk,libp2p] [--profile DIR] [--json PATH]

Starts ``--peers`` processes on 127.0.0.1 for each system (this script with ``--worker``).
Each process holds ``--mib`` MiB of fp32 and the group all-reduces it:

- gloo: ``dist.all_reduce`` (sum; the average's division is not timed), after a
  ``dist.barrier``;
- shoal: ``CollectivesDriver.all_reduce``, codec fp32 and int8, after a barrier that is a
  tiny star all-reduce among the same processes, once per transport: ``bulk`` (the
  default: TCP sealed with ChaCha20-Poly1305 beside the libp2p connection,
  shoal/transport/bulk.py) and ``libp2p`` (TCP + Noise + Yamux streams); one stream per
  peer pair and direction either way.

A round's time is the last process's end minus the first process's start (wall clock of
the one machine). One warm-up round per system is not counted; the table shows the median
of ``--iters`` rounds and the ratio shoal/gloo. Every process uses one torch thread.
``--profile DIR`` runs shoal's rank-0 process (first transport) under ``py-spy record`` (raw folded stacks in
DIR) and prints where its samples went.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

MIB = 1 << 20


# ---- workers ---------------------------------------------------------------------------


def _poll_json(path: Path, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return dict(json.loads(path.read_text()))
        except (FileNotFoundError, ValueError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} did not appear") from None
            time.sleep(0.05)


def _tensor(rank: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(rank))


def gloo_worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.peers
    )
    x = _tensor(args.rank, args.mib * MIB // 4)
    rounds = []
    for i in range(args.iters + 1):
        y = x.clone()
        dist.barrier()
        t0 = time.time()
        dist.all_reduce(y)
        t1 = time.time()
        if i:
            rounds.append((t0, t1))
    dist.destroy_process_group()
    Path(args.out).write_text(json.dumps({"rounds": rounds}))


def shoal_worker(args: argparse.Namespace) -> None:
    import trio

    torch.set_num_threads(1)
    trio.run(_shoal_main, args)


async def _shoal_main(args: argparse.Namespace) -> None:
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    from shoal.collectives import Member, make_view
    from shoal.collectives.driver import DriverConfig, open_collectives
    from shoal.transport.host import HostConfig, open_host

    root = Path(args.dir)
    config = HostConfig(key_pair=create_new_key_pair(), listen=("/ip4/127.0.0.1/tcp/0",))
    async with (
        open_host(config) as host,
        open_collectives(
            host, DriverConfig(deadline=30, retain=10, bulk=args.transport == "bulk")
        ) as driver,
    ):
        (root / f"addr{args.rank}.json").write_text(
            json.dumps({"id": driver.me, "addr": host.listen_addrs()[0]})
        )
        info = [_poll_json(root / f"addr{r}.json") for r in range(args.peers)]
        for r in range(args.rank):
            await host.connect(info[r]["addr"])
        others = [ID.from_base58(i["id"]) for r, i in enumerate(info) if r != args.rank]
        with trio.fail_after(60):
            while not all(host.is_connected(p) for p in others):  # noqa: ASYNC110
                await trio.sleep(0.05)
        members = [Member(i["id"]) for i in info]
        x = _tensor(args.rank, args.mib * MIB // 4)
        y = torch.empty_like(x).fill_(0.0)  # the result, as gloo's in place: allocated once
        tick = torch.zeros(1)
        out: dict[str, Any] = {}
        for codec in args.codecs.split(","):
            rounds = []
            for i in range(args.iters + 1):
                barrier = make_view(f"barrier/{codec}/{i}", members, (1,))
                await driver.all_reduce(barrier, tick, star=True)
                view = make_view(f"bench/{codec}/{i}", members, x.shape, codec=codec)
                sent = driver.bytes_sent
                c0, t0 = time.process_time(), time.time()
                result = await driver.all_reduce(view, x, out=y)
                t1, c1 = time.time(), time.process_time()
                if i:
                    rounds.append((t0, t1, driver.bytes_sent - sent, result.digest.hex(), c1 - c0))
            out[codec] = {"rounds": rounds}
        # a last barrier: nobody leaves while another still fetches from it
        await driver.all_reduce(make_view("barrier/end", members, (1,)), tick, star=True)
    (root / f"out{args.rank}.json").write_text(json.dumps(out))


# ---- parent ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(
    system: str, args: argparse.Namespace, root: Path, transport: str = "", profile: bool = False
) -> list[dict[str, Any]]:
    port = _free_port()
    procs = []
    for rank in range(args.peers):
        command = [
            sys.executable, __file__, "--worker", system, "--rank", str(rank),
            "--peers", str(args.peers), "--mib", str(args.mib), "--iters", str(args.iters),
            "--codecs", args.codecs, "--dir", str(root), "--port", str(port),
            "--out", str(root / f"out{rank}.json"), "--transport", transport,
        ]  # fmt: skip
        if system == "shoal" and rank == 0 and args.profile and profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            raw = Path(args.profile) / "shoal-rank0.txt"
            command = ["py-spy", "record", "-r", "200", "-f", "raw", "-o", str(raw), "--", *command]
        procs.append(subprocess.Popen(command))
    for p in procs:
        if p.wait(1200) != 0:
            raise SystemExit(f"a {system} worker failed ({p.returncode})")
    return [json.loads((root / f"out{r}.json").read_text()) for r in range(args.peers)]


def _round_times(outs: list[dict[str, Any]]) -> list[float]:
    n = len(outs[0]["rounds"])
    return [
        max(o["rounds"][i][1] for o in outs) - min(o["rounds"][i][0] for o in outs)
        for i in range(n)
    ]


def profile_summary(path: Path) -> list[tuple[str, float]]:
    """Share of samples per category, from py-spy's raw folded stacks."""
    categories = [
        ("noise encrypt/decrypt (cryptography AEAD)", ("encrypt", "decrypt", "chacha", "aead")),
        ("yamux framing and windows", ("yamux",)),
        ("noise transport (msg framing)", ("noise",)),
        ("socket send/recv", ("send_all", "receive_some", "sock_send", "sock_recv", "socket")),
        ("torch (encode/decode/reduce)", ("torch", "codecs.py", "codec.py", "reduce_chunk")),
        ("hashing (blake2b, sha256)", ("digest", "blake2", "sha256")),
        ("frame decode / copies", ("framing.py", "feed", "encode_header", "wire.py")),
        ("trio scheduler / idle", ("trio", "epoll", "select")),
    ]
    counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        frames = stack.split(";")
        leafish = ";".join(frames[-6:]).lower()
        for name, keys in categories:
            if any(k in leafish for k in keys):
                counts[name] += int(n)
                break
        else:
            counts["other: " + frames[-1].split(" (")[0][:60]] += int(n)
    top = counts.most_common(14)
    return [(name, 100.0 * c / max(total, 1)) for name, c in top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--codecs", default="fp32,int8")
    parser.add_argument("--transports", default="bulk,libp2p")
    parser.add_argument("--transport", default="bulk")
    parser.add_argument("--profile", default="")
    parser.add_argument("--json", default="")
    parser.add_argument("--worker", choices=["gloo", "shoal"])
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--dir", default="")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.worker == "gloo":
        gloo_worker(args)
        return
    if args.worker == "shoal":
        shoal_worker(args)
        return

    transports = args.transports.split(",")
    shoal_outs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "gloo").mkdir()
        gloo = _round_times(_launch("gloo", args, Path(tmp) / "gloo"))
        for i, transport in enumerate(transports):
            (Path(tmp) / transport).mkdir()
            shoal_outs[transport] = _launch(
                "shoal", args, Path(tmp) / transport, transport, profile=i == 0
            )
    gloo_s = statistics.median(gloo)
    rows: list[tuple[str, list[float], float, float | None, float | None]] = [
        ("gloo all_reduce (fp32, sum)", gloo, gloo_s, None, None)
    ]
    report: dict[str, Any] = {"gloo": gloo}
    for codec, transport in [(c, t) for c in args.codecs.split(",") for t in transports]:
        outs = [o[codec] for o in shoal_outs[transport]]
        times = _round_times(outs)
        digests = {r[3] for o in outs for r in o["rounds"][-1:]}
        assert len(digests) == 1, "peers disagree on the result"
        sent = statistics.median(r[2] for o in outs for r in o["rounds"]) / MIB
        cpu = statistics.median(r[4] for o in outs for r in o["rounds"])
        name = f"shoal all-reduce {codec}, {transport}"
        rows.append((name, times, statistics.median(times), sent, cpu))
        report[f"{codec}/{transport}"] = {
            "times": times,
            "mib_sent_per_peer": sent,
            "cpu_s_per_peer": cpu,
        }
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"\n{args.peers} processes, {args.mib} MiB fp32 each, {os.cpu_count()} CPUs, "
        f"{platform.python_version()}, torch {torch.__version__}, {stamp}\n"
    )
    print("| system | rounds, s | median, s | x gloo | MiB sent per peer | CPU s per peer |")
    print("|---|---|---|---|---|---|")
    for name, times, med, sent, cpu in rows:
        ratio = f"{med / gloo_s:.1f}x" if sent is not None else "1x"
        print(
            f"| {name} | {', '.join(f'{t:.2f}' for t in times)} | {med:.2f} | {ratio} | "
            f"{'' if sent is None else f'{sent:.0f}'} | {'' if cpu is None else f'{cpu:.2f}'} |"
        )
    if args.profile:
        raw = Path(args.profile) / "shoal-rank0.txt"
        print(f"\npy-spy, shoal rank 0 (whole process life), {raw}:\n")
        for name, share in profile_summary(raw):
            print(f"- {share:5.1f} % {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
