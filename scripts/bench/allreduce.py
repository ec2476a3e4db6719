"""All-reduce benchmark: shoal's fault-tolerant all-reduce against torch.distributed gloo.

    python scripts/bench/allreduce.py [--peers 4] [--mib 64] [--iters 3]
        [--codecs fp32,int8] [--transports bulk,libp2p] [--rate RATE] [--profile DIR]
        [--json PATH]

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

``--rate RATE`` (a tc rate: ``1gbit``, ``100mbit``; root only) puts the processes on a
shaped link instead of loopback, where bandwidth rather than CPU bounds the time: rank I of
either system runs in network namespace ``shoal-ar-I`` (10.214.0.(I+2), a veth on the
bridge ``shoalar0``; scripts/bench/delaylink.py's ``Namespaces``), and every node's link is
capped to RATE each way by a token bucket, its upload and its download::

    ip netns exec shoal-ar-I tc qdisc add dev eth0 root tbf rate RATE burst B latency 50ms
    tc qdisc add dev shoalar0pI root tbf rate RATE burst B latency 50ms

B = max(65536, RATE x 1 ms) bytes (1gbit: 125000). shoal listens on
``/ip4/10.214.0.(I+2)/tcp/0``; gloo meets at ``tcp://10.214.0.2:PORT`` (rank 0's
namespace) with ``GLOO_SOCKET_IFNAME=eth0``. Before the rounds one TCP transfer of 32 MiB
from namespace 0 to namespace 1 measures what the link carries (printed, and in the JSON);
the namespaces are removed at the end, also on failure.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import delaylink

MIB = 1 << 20
LOOPBACK = "127.0.0.1"
# the shaped link's namespaces: beside the edge benchmark's (shoal-edge-I, 10.213.0.0/24)
RATE_NETNS = {"netns_prefix": "shoal-ar-", "bridge": "shoalar0", "subnet": "10.214.0"}
PROBE_BYTES = 32 * MIB


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
        "gloo",
        init_method=f"tcp://{args.master}:{args.port}",
        rank=args.rank,
        world_size=args.peers,
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
    config = HostConfig(key_pair=create_new_key_pair(), listen=(f"/ip4/{args.host}/tcp/0",))
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
                # every peer holds the result before one hashes it: the hashing of an early
                # finisher would take CPU from the last ones (gloo's workers hash nothing)
                after = make_view(f"after/{codec}/{i}", members, (1,))
                await driver.all_reduce(after, tick, star=True)
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
    system: str,
    args: argparse.Namespace,
    root: Path,
    transport: str = "",
    profile: bool = False,
    namespaces: delaylink.Namespaces | None = None,
) -> list[dict[str, Any]]:
    """Run the ``--peers`` workers of ``system`` (each in its namespace where
    ``namespaces``) to their end; their outputs."""
    port = _free_port()
    master = namespaces.ip(0) if namespaces else LOOPBACK
    env = dict(os.environ, GLOO_SOCKET_IFNAME="eth0") if namespaces else None
    procs = []
    for rank in range(args.peers):
        command = [
            sys.executable, __file__, "--worker", system, "--rank", str(rank),
            "--peers", str(args.peers), "--mib", str(args.mib), "--iters", str(args.iters),
            "--codecs", args.codecs, "--dir", str(root), "--port", str(port),
            "--out", str(root / f"out{rank}.json"), "--transport", transport,
            "--host", namespaces.ip(rank) if namespaces else LOOPBACK, "--master", master,
        ]  # fmt: skip
        if system == "shoal" and rank == 0 and args.profile and profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            raw = Path(args.profile) / "shoal-rank0.txt"
            command = ["py-spy", "record", "-r", "200", "-f", "raw", "-o", str(raw), "--", *command]
        if namespaces:
            command = [*namespaces.prefix(rank), *command]
        procs.append(subprocess.Popen(command, env=env))
    try:
        for p in procs:
            if p.wait(1200) != 0:
                raise SystemExit(f"a {system} worker failed ({p.returncode})")
    finally:
        for p in procs:  # the others of a failed one: not left behind
            if p.poll() is None:
                p.kill()
                p.wait(10)
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
    parser.add_argument(
        "--rate",
        default=None,
        help="a tc rate (1gbit, 100mbit): every process in a network namespace of its own, "
        "its link capped to RATE each way (root only); default: all on 127.0.0.1",
    )
    parser.add_argument("--profile", default="")
    parser.add_argument("--json", default="")
    parser.add_argument("--worker", choices=["gloo", "shoal"])
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--dir", default="")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", default="")
    parser.add_argument("--host", default=LOOPBACK)
    parser.add_argument("--master", default=LOOPBACK)
    args = parser.parse_args()
    if args.worker == "gloo":
        gloo_worker(args)
        return
    if args.worker == "shoal":
        shoal_worker(args)
        return

    transports = args.transports.split(",")
    namespaces = None
    link: dict[str, Any] = {"kind": "loopback", "host": LOOPBACK}
    if args.rate:
        if os.geteuid() != 0:
            raise SystemExit("--rate needs root (network namespaces and tc); run without it")
        try:
            namespaces = delaylink.Namespaces(args.peers, 0, rate=args.rate, **RATE_NETNS)
        except ValueError as exc:
            raise SystemExit(f"--rate: {exc}") from None
        tbf = " ".join(delaylink.tbf_args(args.rate))
        link = {
            "kind": "namespaces",
            "rate": args.rate,
            "tc": [" ".join(c) for c in namespaces.tc_commands(0)],
            "qdisc": tbf,
        }
    shoal_outs: dict[str, list[dict[str, Any]]] = {}
    try:
        if namespaces:
            namespaces.up()
            if args.peers > 1:
                bits = namespaces.throughput(PROBE_BYTES)
                link["measured_mbit_s"] = bits / 1e6
                print(
                    f"link: {args.rate} each way ({link['qdisc']}); measured "
                    f"{bits / 1e6:.1f} Mbit/s ({PROBE_BYTES // MIB} MiB over TCP, "
                    f"{namespaces.names[0]} -> {namespaces.names[1]})",
                    flush=True,
                )
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "gloo").mkdir()
            gloo = _round_times(_launch("gloo", args, Path(tmp) / "gloo", namespaces=namespaces))
            for i, transport in enumerate(transports):
                (Path(tmp) / transport).mkdir()
                shoal_outs[transport] = _launch(
                    "shoal", args, Path(tmp) / transport, transport, i == 0, namespaces
                )
    finally:
        if namespaces:
            namespaces.down()
    gloo_s = statistics.median(gloo)
    rows: list[tuple[str, list[float], float, float | None, float | None]] = [
        ("gloo all_reduce (fp32, sum)", gloo, gloo_s, None, None)
    ]
    report: dict[str, Any] = {"link": link, "mib": args.mib, "peers": args.peers, "gloo": gloo}
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
    if namespaces:
        where = f"link {args.rate} each way (tbf; network namespaces)"
        if "measured_mbit_s" in link:
            where += f", measured {link['measured_mbit_s']:.0f} Mbit/s"
    else:
        where = "loopback 127.0.0.1"
    print(
        f"\n{args.peers} processes, {args.mib} MiB fp32 each, {where}, {os.cpu_count()} CPUs, "
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
