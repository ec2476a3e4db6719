"""A small internet in network namespaces: a public bridge, two NATed home LANs, and a
"public" host whose firewall drops inbound connections (adapted from
design/libp2p-probe/nat_setup.sh)::

    shoaltest-pub   bridge 100.64.0.1/24: the internet; the relay/bootstrap node runs here
    shoaltest-natA  wan 100.64.0.2 <-> lan 10.1.0.1/24: MASQUERADE + home-router firewall
    shoaltest-lanA  10.1.0.2/24, default via 10.1.0.1: node A
    shoaltest-natB  wan 100.64.0.3 <-> lan 10.2.0.1/24
    shoaltest-lanB  10.2.0.2/24, default via 10.2.0.1: node B
    shoaltest-fw    100.64.0.4 on the bridge, inbound NEW tcp/4001 dropped: node F

The NAT boxes drop unsolicited inbound packets silently (not RST), as home routers do;
without that their kernel answers a hole-punch SYN with a reset. ``symmetric=True`` adds
``--random-fully``: every connection gets a random external port, so hole punching
cannot work. Run as root: ``python -m tests.netns.topology up [--symmetric] | down``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

PREFIX = "shoaltest-"
NAMESPACES = tuple(PREFIX + n for n in ("pub", "natA", "natB", "lanA", "lanB", "fw"))
PUB, NAT_A, NAT_B, LAN_A, LAN_B, FW = NAMESPACES
RELAY_IP, NAT_A_IP, NAT_B_IP, FW_IP = "100.64.0.1", "100.64.0.2", "100.64.0.3", "100.64.0.4"
A_IP, B_IP = "10.1.0.2", "10.2.0.2"
LOCK_FILE = os.path.join(tempfile.gettempdir(), "shoaltest-netns.lock")


class TopologyError(RuntimeError):
    pass


def sh(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise TopologyError(f"{' '.join(args)}: {result.stderr.strip()}")


def missing_requirement() -> str | None:
    """Why the NAT topology cannot be built here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs the `{tool}` command (apt-get install iproute2 iptables)"
    probe = f"{PREFIX}probe-{os.getpid()}"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", "-n")
    except TopologyError as exc:
        return f"cannot create namespaces with NAT here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


@contextmanager
def running(*, symmetric: bool, wait: float = 180.0) -> Iterator[None]:
    """The topology, built for the duration of the block and removed after it.

    A lock file serializes test sessions on one machine: the namespace names are fixed,
    and a second session would otherwise tear down the first one's network. Whatever a
    crashed session left behind is removed first.
    """
    with open(LOCK_FILE, "w") as lock:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TopologyError(f"another session holds {LOCK_FILE}") from None
                time.sleep(0.5)
        try:
            up(symmetric=symmetric)
            yield
        finally:
            down()


def leftovers() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    return [line.split()[0] for line in out.stdout.splitlines() if line.startswith(PREFIX)]


def down() -> None:
    """Delete the topology's namespaces (veths and bridges die with them), and probes
    left by processes that no longer run."""
    for ns in leftovers():
        pid = ns.removeprefix(f"{PREFIX}probe-")
        if ns in NAMESPACES or (pid.isdigit() and not os.path.exists(f"/proc/{pid}")):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def up(*, symmetric: bool) -> None:
    down()
    for ns in NAMESPACES:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", PUB, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", PUB, "addr", "add", f"{RELAY_IP}/24", "dev", "br0")
    sh("ip", "-n", PUB, "link", "set", "br0", "up")
    _wan(NAT_A, "wan", "pA", NAT_A_IP)
    _wan(NAT_B, "wan", "pB", NAT_B_IP)
    _wan(FW, "wan", "pF", FW_IP)
    _lan(NAT_A, LAN_A, "10.1.0.1", A_IP)
    _lan(NAT_B, LAN_B, "10.2.0.1", B_IP)
    _nat(NAT_A, symmetric=symmetric)
    _nat(NAT_B, symmetric=symmetric)
    # F has a public IP, but its firewall drops unsolicited connections to its port.
    _ipt(FW, "-A", "INPUT", "-p", "tcp", "--dport", "4001", "-m", "conntrack", "--ctstate", "NEW", "-j", "DROP")  # fmt: skip


def _wan(ns: str, ifname: str, port: str, ip: str) -> None:
    # Both ends are created directly in their namespaces: no names in the root namespace.
    sh("ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port, "netns", PUB)  # fmt: skip
    sh("ip", "-n", PUB, "link", "set", port, "master", "br0", "up")
    sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ifname)
    sh("ip", "-n", ns, "link", "set", ifname, "up")


def _lan(nat: str, lan: str, gateway: str, ip: str) -> None:
    sh("ip", "link", "add", "lan", "netns", nat, "type", "veth", "peer", "name", "eth0", "netns", lan)  # fmt: skip
    sh("ip", "-n", nat, "addr", "add", f"{gateway}/24", "dev", "lan")
    sh("ip", "-n", nat, "link", "set", "lan", "up")
    sh("ip", "-n", lan, "addr", "add", f"{ip}/24", "dev", "eth0")
    sh("ip", "-n", lan, "link", "set", "eth0", "up")
    sh("ip", "-n", lan, "route", "add", "default", "via", gateway)


def _nat(ns: str, *, symmetric: bool) -> None:
    sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    masquerade = ["-j", "MASQUERADE"] + (["--random-fully"] if symmetric else [])
    _ipt(ns, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", *masquerade)
    _ipt(ns, "-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT")
    _ipt(ns, "-A", "FORWARD", "-i", "wan", "-o", "lan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
    _ipt(ns, "-A", "FORWARD", "-i", "wan", "-j", "DROP")
    _ipt(ns, "-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")  # fmt: skip
    _ipt(ns, "-A", "INPUT", "-i", "wan", "-j", "DROP")


def _ipt(ns: str, *rule: str) -> None:
    sh("ip", "netns", "exec", ns, "iptables", *rule)


if __name__ == "__main__":
    with open(LOCK_FILE, "w") as held:
        try:  # never under a running test session's feet
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit(f"a test session is using the topology ({LOCK_FILE})")
        if sys.argv[1:2] == ["down"]:
            down()
        else:
            up(symmetric="--symmetric" in sys.argv)
    print("namespaces:", " ".join(leftovers()) or "none")
