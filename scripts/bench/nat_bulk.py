"""Tensors between two peers behind NATs: a bulk stream punched through both NATs against
the libp2p connection DCUtR punched (root only: network namespaces and iptables).

    sudo python scripts/bench/nat_bulk.py --mib 64 --runs 5 --json nat_bulk.json

Builds the test suite's namespace topology (tests/netns/topology.py: two home LANs behind
port-preserving MASQUERADE NATs, a relay on the "internet" bridge), starts ``shoal node``
daemons on the relay, B (behind NAT B) and A (behind NAT A, knowing only B's relayed
address), waits until DCUtR has made the A-B connection direct, then echoes the same
payload off B with ``/v1/ping`` both ways, alternating: over libp2p (``/shoal/ping/1``)
and over the path tensors take (``"bulk": true``). The first bulk ping, which finds B's
bulk port unreachable and punches, is reported on its own; the rest are timed. Each
figure is a round trip (the payload there and back), timed inside node A.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.netns import topology  # noqa: E402
from tests.netns.nodes import NsNode, stop_all  # noqa: E402


def _ping(a: NsNode, b: NsNode, size: int, seed: int, *, bulk: bool) -> dict[str, Any]:
    result = a.ping(b, size, seed, bulk=bulk)
    if not result.get("intact"):
        raise SystemExit(f"ping came back damaged or failed: {result}")
    return result


def measure(size: int, runs: int) -> dict[str, Any]:
    why = topology.missing_requirement()
    if why is not None:
        raise SystemExit(f"cannot build the NAT topology here: {why}")
    with tempfile.TemporaryDirectory() as tmp, topology.running(symmetric=False):
        base = Path(tmp)
        relay = NsNode("relay", topology.PUB, topology.RELAY_IP, base / "relay", relay=True)
        a = NsNode("a", topology.LAN_A, topology.A_IP, base / "a")
        b = NsNode("b", topology.LAN_B, topology.B_IP, base / "b")
        nodes = [relay.start(), b.start(relay.addr)]
        try:
            relayed = b.wait(
                lambda n: next(
                    (x for x in (n.status() or {"addrs": []})["addrs"] if "p2p-circuit" in x),
                    None,
                ),
                30,
                "B's relayed address",
            )
            nodes.append(a.start(relay.addr, relayed))
            started = time.monotonic()
            a.wait(lambda n: (ln := n.link(b)) and not ln["relayed"], 60, "A-B direct")
            direct_after = time.monotonic() - started
            first = _ping(a, b, size, 0, bulk=True)
            if first["via"] != "bulk":
                raise SystemExit(f"the bulk ping went over {first['via']}: no bulk stream")
            times: dict[str, list[float]] = {"libp2p": [], "bulk": []}
            for run in range(runs):
                for via in ("libp2p", "bulk"):
                    result = _ping(a, b, size, run + 1, bulk=via == "bulk")
                    assert result["via"] == via, result
                    times[via].append(result["seconds"])
        finally:
            stop_all(nodes)
    median = {via: statistics.median(t) for via, t in times.items()}
    return {
        "bytes": size,
        "runs": runs,
        "direct_after_s": round(direct_after, 2),
        "first_bulk_ping_s": round(first["seconds"], 3),
        "seconds": {via: [round(t, 4) for t in ts] for via, ts in times.items()},
        "round_trip_mb_s": {via: round(2 * size / m / 1e6, 1) for via, m in median.items()},
        "libp2p_over_bulk_time": round(median["libp2p"] / median["bulk"], 2),
        "machine": f"{platform.machine()}, {platform.node()}, python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="payload MiB (at most 128)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not 1 <= args.mib <= 128:
        parser.error("--mib must be in [1, 128] (the ping's limit)")
    figures = measure(args.mib << 20, args.runs)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
