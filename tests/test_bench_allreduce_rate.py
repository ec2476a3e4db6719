"""The all-reduce benchmark's shaped link (scripts/bench/delaylink.py ``Namespaces(rate=)``,
``allreduce.py --rate``): tbf on both sides of a node's veth holds a TCP transfer between
two namespaces to the rate (a lower bound on the time: it holds however slow the machine
is). Needs root and network namespaces; skipped without them."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from conftest import load_bench_script

delaylink = load_bench_script("delaylink")

# a set of its own: a benchmark's namespaces running beside the tests stay untouched
NETNS = {"netns_prefix": "shoal-tst-", "bridge": "shoaltst0", "subnet": "10.215.0"}


def _netns_usable() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    try:
        done = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no ip netns: {exc}"
    return None if done.returncode == 0 else f"no ip netns: {done.stderr!r}"


def test_tbf_args() -> None:
    assert delaylink.tbf_args("1gbit") == [
        "tbf", "rate", "1gbit", "burst", "125000", "latency", "50ms",
    ]  # fmt: skip
    assert delaylink.tbf_args("100mbit")[4] == "65536"  # at least 64 KiB
    assert delaylink.rate_bits("50mbit") == 50e6
    assert delaylink.rate_bits("1mbps") == 8e6  # tc: bytes per second
    with pytest.raises(ValueError):
        delaylink.rate_bits("fast")
    with pytest.raises(ValueError):
        delaylink.Namespaces(2, 0, rate="0mbit")


def test_rate_shapes_a_link_between_namespaces() -> None:
    why_not = _netns_usable()
    if why_not:
        pytest.skip(why_not)
    namespaces = delaylink.Namespaces(2, 0, rate="50mbit", **NETNS)
    try:
        try:
            namespaces.up()
        except RuntimeError as exc:
            pytest.skip(f"namespaces or tbf unavailable: {exc}")
        start = time.monotonic()
        bits = namespaces.throughput(4 << 20)  # 4 MiB at 50 Mbit/s: 0.67 s
        elapsed = time.monotonic() - start
    finally:
        namespaces.down()
    assert bits <= 50e6 * 1.1  # the burst (64 KiB) lets a little more through at first
    assert elapsed >= 0.5
    assert bits > 50e6 * 0.5  # shaped, not broken
