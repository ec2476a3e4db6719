"""Delayed links for the edge benchmark (scripts/bench/edge.py): every link to a node of
a configuration held D ms each way.

Every node runs in a network namespace of its own (``shoal-edge-I``, 10.213.0.(I+2)), its
veth on one bridge in the root namespace (10.213.0.1: the bootstrap node and the client).
Two ways to delay, picked by :func:`netem_available`:

- ``proxy`` (what runs on a kernel without netem): a userspace TCP proxy in each node's
  namespace, on the namespace's address, in front of the node, which listens on the
  namespace's 127.0.0.1 and announces the proxy's address (``shoal node --announce``).
  Whoever dials the node from outside dials the proxy; the listen address itself, which
  the DHT and identify also pass around, leads nowhere outside the namespace, so no link
  can skip the delay. The proxy forwards both directions and holds every chunk D ms
  before forwarding it, in order: per direction a reader stamps each chunk with its due
  time into a queue and a sender waits until the chunk is due. trio's sleeps wake on
  whole milliseconds (epoll takes its timeout in ms, rounded up), so the sender sleeps in
  trio until 1 ms before the due time and the rest in ``time.sleep``, which blocks the
  proxy's loop for under 1 ms; hence a process of its own per node
  (``python scripts/bench/delaylink.py serve``). A round trip through it waits 2 D, also
  the client's to the node. A node sees whoever dialled it through its proxy at
  127.0.0.1, so when shoal's dial-back check (docs/nat.md) dials a peer back at that IP
  and the peer's announced port, a relay in every other namespace passes
  127.0.0.1:PORT on to the peer's proxy, undelayed (the proxy delays it); without it,
  leaders judged themselves unreachable, switched their DHT to client mode, and the
  client stopped finding the model.
- ``netem``: the node listens on its namespace's address and ``tc qdisc ... netem delay D``
  sits on its side of the veth: every packet a node sends waits D, so a round trip
  between two nodes waits 2 D (a client's, in the root namespace, D). The kernel this was
  written on has no netem (``CONFIG_NET_SCH_NETEM`` is not set): the namespaces and the
  bridge of this path ran (with D = 0, no qdisc), the qdisc itself never has.

:func:`echo_rtt` measures what a link really adds: a one-byte echo through a proxy with the
same delay (netem: from one namespace to another), printed next to the figures.

:class:`Namespaces` can also cap every node's bandwidth (``rate``, e.g. ``1gbit``; the
all-reduce benchmark's ``--rate``) with a token bucket, in both directions: on the
namespace's ``eth0`` (what the node sends) and on its veth's bridge side (what it
receives), :func:`tbf_args`::

    tc qdisc add dev eth0 root tbf rate RATE burst B latency 50ms     # in the namespace
    tc qdisc add dev BRIDGEpI root tbf rate RATE burst B latency 50ms  # root namespace

with B = max(64 KiB, 1 ms at RATE) bytes. :meth:`Namespaces.throughput` measures what such a
link carries (one TCP transfer from namespace 0 to namespace 1, timed by the receiver).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from trio_typing import TaskStatus

CHUNK = 65536
COARSE = 0.001  # trio's sleeps wake on whole milliseconds; the last one is time.sleep


async def _pipe(source: trio.SocketStream, sink: trio.SocketStream, delay: float) -> None:
    """Copy ``source`` to ``sink``, each chunk ``delay`` seconds after it was read, in
    order; an end of stream is forwarded (as a half close) after the same delay."""
    send, receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)

    async def read() -> None:
        async with send:
            while True:
                try:
                    chunk = await source.receive_some(CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    chunk = b""
                send.send_nowait((time.monotonic() + delay, chunk))
                if not chunk:
                    return

    async def write() -> None:
        async with receive:
            async for due, chunk in receive:
                wait = due - time.monotonic()
                if wait > COARSE:
                    await trio.sleep(wait - COARSE)
                    wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)  # noqa: ASYNC251 (below trio's resolution: block briefly)
                if not chunk:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await sink.send_eof()
                    return
                await sink.send_all(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(write)


class DelayProxy:
    """Forwards connections on ``host:port`` (port 0: a free one) to
    ``target_host:target_port``, every chunk held ``delay`` seconds in each direction."""

    def __init__(
        self,
        target_port: int,
        delay: float,
        *,
        port: int = 0,
        host: str = "127.0.0.1",
        target_host: str = "127.0.0.1",
    ) -> None:
        if delay < 0:
            raise ValueError(f"delay must not be negative, got {delay}")
        self.target_port, self.delay, self.port = target_port, delay, port
        self.host, self.target_host = host, target_host
        self.connections = 0

    async def serve(self, *, task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report the port through ``task_status``, and forward until cancelled."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._forward, listeners)

    async def _forward(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
        except OSError:
            await client.aclose()  # the node is gone: so is the connection
            return
        async with client, upstream:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pipe, client, upstream, self.delay)
                    nursery.start_soon(_pipe, upstream, client, self.delay)
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # one side reset the connection: close both


async def echo_server(
    host: str = "127.0.0.1", *, task_status: TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Echo every byte back, on a free port of ``host`` (reported through task_status)."""

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                async for data in stream:
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass

    listeners = await trio.open_tcp_listeners(0, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(echo, listeners)


def echo_rtt(
    port: int, *, host: str = "127.0.0.1", pings: int = 20, payload: bytes = b"x"
) -> float:
    """Median seconds of a ``payload`` round trip to the echo behind ``host:port``
    (blocking sockets: the caller may be outside trio)."""
    rtts = []
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(pings):
            start = time.perf_counter()
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                data = sock.recv(len(payload) - len(got))
                if not data:
                    raise ConnectionError("the echo closed the connection")
                got += data
            rtts.append(time.perf_counter() - start)
            if got != payload:
                raise ConnectionError(f"the echo sent back {got!r}, not {payload!r}")
    return statistics.median(rtts)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ProxyProcess:
    """``serve`` in a process of its own (in a namespace: ``prefix``): proxies on ``host``,
    ``listen port -> 127.0.0.1:target port``, plus one in front of an echo server
    (``echo_port``), all with the same delay."""

    process: subprocess.Popen[str]
    host: str
    echo_port: int

    @classmethod
    def start(
        cls,
        routes: Sequence[tuple[int, int]],
        delay_ms: float,
        *,
        host: str = "127.0.0.1",
        prefix: Sequence[str] = (),
        relays: Sequence[tuple[int, str]] = (),
    ) -> ProxyProcess:
        command = [*prefix, sys.executable, str(Path(__file__).resolve()), "serve", host]
        command += [str(delay_ms), *(f"{listen}:{target}" for listen, target in routes)]
        command += [f"--relay={port}:{ip}" for port, ip in relays]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None
        line = process.stdout.readline()  # "ready ECHO_PORT" once every proxy listens
        if not line.startswith("ready "):
            process.kill()
            process.wait(10)
            process.stdout.close()
            raise RuntimeError(f"the delay proxies ({' '.join(command)}) did not start: {line!r}")
        return cls(process, host, int(line.split()[1]))

    def rtt(self) -> float:
        return echo_rtt(self.echo_port, host=self.host)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


async def _serve(
    host: str, routes: Sequence[tuple[int, int]], delay: float, relays: Sequence[tuple[int, str]]
) -> None:
    async with trio.open_nursery() as nursery:
        for listen, target in routes:
            await nursery.start(DelayProxy(target, delay, port=listen, host=host).serve)
        for port, ip in relays:
            await nursery.start(DelayProxy(port, 0.0, port=port, target_host=ip).serve)
        echo = await nursery.start(echo_server)
        echo_proxy = await nursery.start(DelayProxy(echo, delay, host=host).serve)
        print(f"ready {echo_proxy}", flush=True)


async def _echo_ready(host: str) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(echo_server, host)
        print(f"ready {port}", flush=True)


# --- netem: namespaces on a bridge (untested with a delay: no netem in this kernel) ---

NETNS_PREFIX = "shoal-edge-"
BRIDGE, BRIDGE_IP, SUBNET = "shoaledge0", "10.213.0.1", "10.213.0"


def _sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)


def netem_available() -> str | None:
    """None when ``tc ... netem`` works in a throwaway namespace, else why not."""
    probe = f"{NETNS_PREFIX}probe"
    _sh("ip", "netns", "del", probe)
    made = _sh("ip", "netns", "add", probe)
    if made.returncode != 0:
        return f"no network namespaces: {made.stderr.strip()}"
    try:
        tried = _sh("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms")  # fmt: skip
        return None if tried.returncode == 0 else f"no netem: {tried.stderr.strip()}"
    finally:
        _sh("ip", "netns", "del", probe)


_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
_RATE_UNITS |= {"bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9, "tbps": 8e12}  # tc: bytes


def rate_bits(rate: str) -> float:
    """Bits per second of a tc rate (``100mbit``, ``1gbit``, ``500kbit``; tc's ``bps``
    units are bytes per second)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", rate.lower())
    if not match or match[2] not in {"", *_RATE_UNITS}:
        raise ValueError(f"not a tc rate: {rate!r} (e.g. 100mbit, 1gbit)")
    bits = float(match[1]) * _RATE_UNITS.get(match[2], 1)
    if bits <= 0:
        raise ValueError(f"the rate must be above 0, got {rate!r}")
    return bits


def tbf_args(rate: str) -> list[str]:
    """``tc qdisc add dev DEV root`` + these: a token bucket of ``rate``, its burst 1 ms of
    the rate but at least 64 KiB, packets dropped that would wait over 50 ms."""
    burst = max(64 * 1024, math.ceil(rate_bits(rate) / 8 * 0.001))
    return ["tbf", "rate", rate, "burst", str(burst), "latency", "50ms"]


class Namespaces:
    """``count`` namespaces ``shoal-edge-I`` with addresses 10.213.0.(I+2), on a bridge
    whose root-namespace address is 10.213.0.1 (the client and the bootstrap node), each
    node's veth delayed ``delay_ms`` with netem when above 0, and capped to ``rate`` (a tc
    rate, e.g. ``1gbit``) each way with tbf when given (see the module's docstring).
    ``netns_prefix``, ``bridge`` and ``subnet`` name another set, beside the edge
    benchmark's (the all-reduce benchmark's and the tests' do not tear down each other)."""

    def __init__(
        self,
        count: int,
        delay_ms: float,
        rate: str | None = None,
        *,
        netns_prefix: str = NETNS_PREFIX,
        bridge: str = BRIDGE,
        subnet: str = SUBNET,
    ) -> None:
        self.names = [f"{netns_prefix}{i}" for i in range(count)]
        self.delay_ms = delay_ms
        self.rate = rate
        if rate is not None:
            rate_bits(rate)  # a bad rate fails here, not halfway through up()
        self.bridge, self.subnet = bridge, subnet
        self.bridge_ip = f"{subnet}.1"

    def ip(self, index: int) -> str:
        return f"{self.subnet}.{index + 2}"

    def tc_commands(self, index: int) -> list[list[str]]:
        """The tc commands that cap node ``index``'s link (none without a rate): its
        upload on eth0 in its namespace, its download on the bridge side of its veth."""
        if self.rate is None:
            return []
        tbf = tbf_args(self.rate)
        return [
            [*self.prefix(index), "tc", "qdisc", "add", "dev", "eth0", "root", *tbf],
            ["tc", "qdisc", "add", "dev", f"{self.bridge}p{index}", "root", *tbf],
        ]

    def up(self) -> None:
        self.down()
        bridge = self.bridge
        self._run("ip", "link", "add", bridge, "type", "bridge")
        self._run("ip", "addr", "add", f"{self.bridge_ip}/24", "dev", bridge)
        self._run("ip", "link", "set", bridge, "up")
        for i, ns in enumerate(self.names):
            self._run("ip", "netns", "add", ns)
            self._run("ip", "-n", ns, "link", "set", "lo", "up")
            self._run("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"{bridge}p{i}")  # fmt: skip
            self._run("ip", "link", "set", f"{bridge}p{i}", "master", bridge, "up")
            self._run("ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
            self._run("ip", "-n", ns, "link", "set", "eth0", "up")
            if self.delay_ms > 0:
                self._run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", f"{self.delay_ms}ms")  # fmt: skip
            for command in self.tc_commands(i):
                self._run(*command)

    def down(self) -> None:
        for ns in self.names:
            _sh("ip", "netns", "del", ns)
        _sh("ip", "link", "del", self.bridge)

    def throughput(self, nbytes: int = 32 << 20) -> float:
        """Bits per second of one TCP transfer of ``nbytes`` from namespace 0 to namespace
        1, timed by the receiver from the connection's accept to the sender's end."""
        me = [sys.executable, str(Path(__file__).resolve())]
        sink = subprocess.Popen([*self.prefix(1), *me, "sink", self.ip(1)], stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert sink.stdout is not None
            line = sink.stdout.readline()
            if not line.startswith("ready "):
                raise RuntimeError(f"the sink in {self.names[1]} did not start: {line!r}")
            sent = _sh(*self.prefix(0), *me, "send", self.ip(1), line.split()[1], str(nbytes))
            if sent.returncode != 0:
                raise RuntimeError(f"the transfer from {self.names[0]} failed: {sent.stderr}")
            got, seconds = sink.stdout.readline().split()
            if int(got) != nbytes:
                raise RuntimeError(f"the sink got {got} bytes of {nbytes}")
            return nbytes * 8 / float(seconds)
        finally:
            sink.kill()
            sink.wait(10)
            if sink.stdout is not None:
                sink.stdout.close()

    def rtt(self) -> float:
        """Median seconds of a one-byte echo from namespace 0 to namespace 1."""
        me = [sys.executable, str(Path(__file__).resolve())]
        echo = subprocess.Popen([*self.prefix(1), *me, "echo", self.ip(1)], stdout=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert echo.stdout is not None
            line = echo.stdout.readline()
            if not line.startswith("ready "):
                raise RuntimeError(f"the echo server in {self.names[1]} did not start: {line!r}")
            done = _sh(*self.prefix(0), *me, "rtt", self.ip(1), line.split()[1])
            if done.returncode != 0:
                raise RuntimeError(f"the echo from {self.names[0]} failed: {done.stderr}")
            return float(done.stdout)
        finally:
            echo.kill()
            echo.wait(10)
            if echo.stdout is not None:
                echo.stdout.close()

    def prefix(self, index: int) -> list[str]:
        """The command prefix that runs a program in namespace ``index``."""
        return ["ip", "netns", "exec", self.names[index]]

    @staticmethod
    def _run(*args: str) -> None:
        done = _sh(*args)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")


def sink(host: str) -> None:
    """Accept one connection on a free port of ``host`` (printed: ``ready PORT``), read it
    to its end, print ``BYTES SECONDS`` (from the accept to the end)."""
    with socket.create_server((host, 0)) as server:
        print(f"ready {server.getsockname()[1]}", flush=True)
        conn, _ = server.accept()
        start, got = time.perf_counter(), 0
        with conn:
            buffer = bytearray(1 << 20)
            while n := conn.recv_into(buffer):
                got += n
        print(got, time.perf_counter() - start, flush=True)


def send(host: str, port: int, nbytes: int) -> None:
    """``nbytes`` zeros to ``host:port``, then close."""
    block = bytes(1 << 20)
    with socket.create_connection((host, port), timeout=120) as sock:
        while nbytes > 0:
            sock.sendall(block[: min(nbytes, len(block))])
            nbytes -= len(block)


def main() -> None:
    parser = argparse.ArgumentParser(description="delaying TCP proxies (see the docstring)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run proxies until killed; prints 'ready ECHO_PORT'")
    serve.add_argument("host", help="the address the proxies listen on")
    serve.add_argument("delay_ms", type=float)
    serve.add_argument("routes", nargs="*", help="LISTEN_PORT:TARGET_PORT")
    serve.add_argument(
        "--relay",
        action="append",
        default=[],
        help="PORT:IP: pass 127.0.0.1:PORT through to IP:PORT undelayed (repeatable)",
    )
    sub.add_parser("probe", help="can this kernel do netem?")
    echo = sub.add_parser("echo", help="an echo server on HOST; prints 'ready PORT'")
    echo.add_argument("host")
    rtt = sub.add_parser("rtt", help="median seconds of a one-byte echo round trip")
    rtt.add_argument("host")
    rtt.add_argument("port", type=int)
    sink_p = sub.add_parser("sink", help="receive one connection on HOST; prints 'ready PORT', then 'BYTES SECONDS'")  # fmt: skip
    sink_p.add_argument("host")
    send_p = sub.add_parser("send", help="send NBYTES to HOST:PORT")
    send_p.add_argument("host")
    send_p.add_argument("port", type=int)
    send_p.add_argument("nbytes", type=int)
    args = parser.parse_args()
    if args.command == "probe":
        print(netem_available() or "netem works")
        return
    if args.command == "echo":
        trio.run(_echo_ready, args.host)
        return
    if args.command == "rtt":
        print(echo_rtt(args.port, host=args.host))
        return
    if args.command == "sink":
        sink(args.host)
        return
    if args.command == "send":
        send(args.host, args.port, args.nbytes)
        return
    routes = [tuple(int(p) for p in r.split(":")) for r in args.routes]
    relays = [(int(r.split(":")[0]), r.split(":")[1]) for r in args.relay]
    trio.run(_serve, args.host, [(a, b) for a, b in routes], args.delay_ms / 1000, relays)


if __name__ == "__main__":
    main()
