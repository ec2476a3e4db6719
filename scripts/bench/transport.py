"""Transport benchmark: shoal RPC over libp2p (TCP + Noise + Yamux) against raw TCP.

    python scripts/bench/transport.py [--bulk-mib 256] [--rtt-count 2000] [--json PATH]

The script starts a server process (itself, with ``--serve``) and runs the client here, both
on 127.0.0.1, so sender and receiver each have a core. The server listens twice: a shoal host
(``open_host`` + ``Rpc``) and a plain trio TCP listener speaking a length-prefixed protocol.

Measured, same message sizes on both:

- bulk: ``--bulk-mib`` sent as calls of ``--call-mib`` each with a small reply;
  also over one already-open libp2p stream in 1 MiB writes, without RPC framing;
- 1 KiB request / 1 KiB reply round trips: one shoal RPC call per round trip (a new stream
  each, as shoal RPC works), an echo on one already-open libp2p stream (per-message cost
  without stream setup), and raw TCP;
- both again on one bulk stream (shoal/transport/bulk.py: TCP sealed with an AEAD beside
  the libp2p connection, what the all-reduce and the tensor-parallel group use): ``--call-mib``
  writes (``write_parts``, read with ``read_into`` into a buffer of that size) and echoes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from importlib.metadata import version
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from shoal.transport.bulk import BulkStream
from shoal.transport.host import Host, HostConfig, open_host
from shoal.transport.rpc import READ_CHUNK, WRITE_CHUNK, Message, Protocol

MIB = 1 << 20
MSG = 1024
WARMUP = 50
LOOPBACK = "/ip4/127.0.0.1/tcp/0"

BULK = Protocol(name="bench-bulk", max_request=256 * MIB, timeout=300)
ECHO = Protocol(name="bench-echo", max_request=MSG, max_response=MSG)
STREAM_SINK = TProtocol("/shoal-bench/sink/1")
STREAM_ECHO = TProtocol("/shoal-bench/echo/1")
BULK_SINK = "/shoal-bench/bulk-sink/1"
BULK_ECHO = "/shoal-bench/bulk-echo/1"

# Raw TCP: request = u32 request length | u32 reply length | request; reply = u32 length | reply.
_REQUEST = struct.Struct(">II")
_REPLY = struct.Struct(">I")
_COUNT = struct.Struct(">Q")


# ---- server ----------------------------------------------------------------------------


async def rpc_sink(peer: ID, request: Message) -> Message:
    return Message({"n": len(request.payload)})


async def rpc_echo(peer: ID, request: Message) -> Message:
    return Message({}, request.payload)


async def stream_sink(stream: INetStream) -> None:
    (total,) = _COUNT.unpack(await read_exactly(stream, _COUNT.size))
    got = 0
    while got < total:
        got += len(await stream.read(READ_CHUNK))
    await stream.write(_COUNT.pack(got))
    await stream.close()


async def stream_echo(stream: INetStream) -> None:
    try:
        while True:
            await stream.write(await read_exactly(stream, MSG))
    except Exception:  # the client closing the stream ends the loop
        pass
    await stream.close()


async def bulk_sink(stream: BulkStream) -> None:
    head = memoryview(bytearray(_COUNT.size))
    await bulk_exactly(stream, head)
    (total,) = _COUNT.unpack(head)
    into = memoryview(bytearray(16 * MIB))
    got = 0
    while got < total:
        got += await stream.read_into(into[: min(len(into), total - got)])
    await stream.write(_COUNT.pack(got))


async def bulk_echo(stream: BulkStream) -> None:
    into = memoryview(bytearray(MSG))
    try:
        while True:
            await bulk_exactly(stream, into)
            await stream.write(into)
    except EOFError:  # the client closing the stream ends the loop
        pass


async def bulk_exactly(stream: BulkStream, into: memoryview) -> None:
    filled = 0
    while filled < len(into):
        count = await stream.read_into(into[filled:])
        if not count:
            raise EOFError(f"bulk stream ended after {filled} of {len(into)} bytes")
        filled += count


async def raw_serve(stream: trio.SocketStream) -> None:
    reader = RawReader(stream)
    try:
        while True:
            size, reply_size = _REQUEST.unpack(await reader.exactly(_REQUEST.size))
            await reader.exactly(size)
            await stream.send_all(_REPLY.pack(reply_size) + bytes(reply_size))
    except EOFError:
        pass


async def serve() -> None:
    """Print our addresses as one JSON line, then serve until stdin closes."""
    config = HostConfig(key_pair=create_new_key_pair(), listen=(LOOPBACK,))
    async with open_host(config) as host, trio.open_nursery() as nursery:
        host.rpc.serve(BULK, rpc_sink)
        host.rpc.serve(ECHO, rpc_echo)
        host.libp2p.set_stream_handler(STREAM_SINK, stream_sink)
        host.libp2p.set_stream_handler(STREAM_ECHO, stream_echo)
        assert host.bulk is not None
        host.bulk.serve(BULK_SINK, bulk_sink)
        host.bulk.serve(BULK_ECHO, bulk_echo)
        listeners = await nursery.start(partial(trio.serve_tcp, raw_serve, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        print(json.dumps({"addr": host.listen_addrs()[0], "port": port}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)
        nursery.cancel_scope.cancel()


# ---- helpers ---------------------------------------------------------------------------


async def read_exactly(stream: INetStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.read(n - len(buf))
        if not data:
            raise EOFError(f"stream ended after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


class RawReader:
    """Buffered exact reads from a trio socket stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def exactly(self, n: int) -> bytearray:
        # One copy into a preallocated buffer, as shoal's FrameDecoder does.
        out = bytearray(n)
        filled = min(n, len(self.buf))
        out[:filled] = self.buf[:filled]
        del self.buf[:filled]
        while filled < n:
            data = await self.stream.receive_some(min(max(n - filled, 65536), READ_CHUNK))
            if not data:
                raise EOFError(f"connection ended after {filled} of {n} bytes")
            take = min(len(data), n - filled)
            out[filled : filled + take] = memoryview(data)[:take]
            self.buf += memoryview(data)[take:]
            filled += take
        return out


async def raw_call(
    stream: trio.SocketStream, reader: RawReader, payload: bytes, reply_size: int
) -> bytearray:
    header = _REQUEST.pack(len(payload), reply_size)
    if len(payload) > 65536:  # no copy of a big payload just to prepend 8 bytes
        await stream.send_all(header)
        await stream.send_all(payload)
    else:
        await stream.send_all(header + payload)
    (size,) = _REPLY.unpack(await reader.exactly(_REPLY.size))
    return await reader.exactly(size)


@dataclass(frozen=True)
class Latency:
    p50_us: float
    p99_us: float
    mean_us: float


async def time_calls(count: int, call: Callable[[], Awaitable[object]]) -> Latency:
    """Run ``call`` WARMUP times untimed, then ``count`` times timed, one at a time."""
    for _ in range(WARMUP):
        await call()
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    samples.sort()
    return Latency(
        p50_us=samples[count // 2] * 1e6,
        p99_us=samples[min(count - 1, int(count * 0.99))] * 1e6,
        mean_us=sum(samples) / count * 1e6,
    )


async def time_bulk(total: int, send: Callable[[], Awaitable[int]]) -> float:
    """MB/s of ``send`` repeated until ``total`` bytes went out (each returns its bytes)."""
    start = time.perf_counter()
    sent = 0
    while sent < total:
        sent += await send()
    return sent / (time.perf_counter() - start) / 1e6


# ---- client ----------------------------------------------------------------------------


async def bench_libp2p(
    host: Host, addr: str, bulk: int, call_size: int, rtt_count: int
) -> dict[str, Any]:
    peer = await host.connect(addr)
    payload = bytes(call_size)
    request = Message({}, bytes(MSG))

    async def rpc_bulk_call() -> int:
        reply = await host.rpc.call(peer, BULK, Message({}, payload))
        assert reply.body["n"] == call_size
        return call_size

    async def rpc_echo_call() -> None:
        reply = await host.rpc.call(peer, ECHO, request)
        assert len(reply.payload) == MSG

    await rpc_bulk_call()  # warm-up: first stream, handler registration, allocations
    rpc_mbps = await time_bulk(bulk, rpc_bulk_call)
    rpc_rtt = await time_calls(rtt_count, rpc_echo_call)

    sink = await host.libp2p.new_stream(peer, [STREAM_SINK])
    chunk = bytes(WRITE_CHUNK)

    async def stream_write() -> int:
        await sink.write(chunk)
        return len(chunk)

    await sink.write(_COUNT.pack(bulk))
    stream_mbps = await time_bulk(bulk, stream_write)
    (got,) = _COUNT.unpack(await read_exactly(sink, _COUNT.size))
    assert got == bulk
    await sink.close()

    echo = await host.libp2p.new_stream(peer, [STREAM_ECHO])

    async def stream_echo_call() -> None:
        await echo.write(bytes(MSG))
        await read_exactly(echo, MSG)

    stream_rtt = await time_calls(rtt_count, stream_echo_call)
    await echo.close()

    assert host.bulk is not None
    bulk_stream = await host.bulk.open(peer, BULK_SINK)
    view = memoryview(payload)

    async def bulk_write() -> int:
        await bulk_stream.write_parts((view,))
        return len(view)

    await bulk_stream.write(_COUNT.pack(bulk))
    bulk_mbps = await time_bulk(bulk, bulk_write)
    reply = memoryview(bytearray(_COUNT.size))
    await bulk_exactly(bulk_stream, reply)
    assert _COUNT.unpack(reply)[0] == bulk
    await bulk_stream.close()

    bulk_echo_stream = await host.bulk.open(peer, BULK_ECHO)
    answer = memoryview(bytearray(MSG))

    async def bulk_echo_call() -> None:
        await bulk_echo_stream.write(bytes(MSG))
        await bulk_exactly(bulk_echo_stream, answer)

    bulk_rtt = await time_calls(rtt_count, bulk_echo_call)
    await bulk_echo_stream.close()
    return {
        "bulk_stream_MBps": bulk_mbps,
        "bulk_stream_rtt": asdict(bulk_rtt),
        "bulk_stream_cipher": bulk_stream.cipher,
        "rpc_bulk_MBps": rpc_mbps,
        "rpc_rtt": asdict(rpc_rtt),
        "stream_bulk_MBps": stream_mbps,
        "stream_rtt": asdict(stream_rtt),
    }


async def bench_raw(port: int, bulk: int, call_size: int, rtt_count: int) -> dict[str, Any]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    reader = RawReader(stream)
    payload = bytes(call_size)
    request = bytes(MSG)

    async def bulk_call() -> int:
        await raw_call(stream, reader, payload, 16)
        return call_size

    async def echo_call() -> None:
        assert len(await raw_call(stream, reader, request, MSG)) == MSG

    await bulk_call()
    mbps = await time_bulk(bulk, bulk_call)
    rtt = await time_calls(rtt_count, echo_call)
    await stream.aclose()
    return {"bulk_MBps": mbps, "rtt": asdict(rtt)}


async def run_client(
    addr: str, port: int, bulk: int, call_size: int, rtt_count: int
) -> dict[str, Any]:
    raw = await bench_raw(port, bulk, call_size, rtt_count)
    config = HostConfig(key_pair=create_new_key_pair(), listen=(LOOPBACK,))
    async with open_host(config) as host:
        shoal = await bench_libp2p(host, addr, bulk, call_size, rtt_count)
    return {"raw": raw, "libp2p": shoal}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "python": platform.python_version(),
        "libp2p": version("libp2p"),
        "trio": version("trio"),
    }


def table(result: dict[str, Any], args: argparse.Namespace) -> str:
    raw, p2p, box = result["raw"], result["libp2p"], result["machine"]
    rpc_rtt, stream_rtt, raw_rtt = p2p["rpc_rtt"], p2p["stream_rtt"], raw["rtt"]
    load = ", ".join(f"{x:.2f}" for x in box["loadavg_before"])
    lines = [
        f"{box['cpu']}, {box['cpus']} CPUs, load average before the run {load}; "
        f"libp2p {box['libp2p']}, trio {box['trio']}, Python {box['python']}",
        "",
        "| measurement | raw TCP | libp2p stream | shoal RPC | shoal / raw | bulk stream |",
        "|---|---|---|---|---|---|",
        f"| bulk {args.bulk_mib} MiB in {args.call_mib} MiB calls, MB/s "
        f"| {raw['bulk_MBps']:.0f} | {p2p['stream_bulk_MBps']:.0f} "
        f"| {p2p['rpc_bulk_MBps']:.0f} | {p2p['rpc_bulk_MBps'] / raw['bulk_MBps']:.3f} "
        f"| {p2p['bulk_stream_MBps']:.0f} ({p2p['bulk_stream_cipher']}) |",
    ]
    bulk_rtt = p2p["bulk_stream_rtt"]
    for key in ("p50_us", "p99_us", "mean_us"):
        lines.append(
            f"| 1 KiB round trip {key[:-3]}, µs | {raw_rtt[key]:.0f} | {stream_rtt[key]:.0f} "
            f"| {rpc_rtt[key]:.0f} | {rpc_rtt[key] / raw_rtt[key]:.1f}x | {bulk_rtt[key]:.0f} |"
        )
    per_stream = rpc_rtt["p50_us"] - stream_rtt["p50_us"]
    lines.append("")
    lines.append(
        f"libp2p stream: bulk on one open stream in {WRITE_CHUNK // MIB} MiB writes; round trip "
        f"= echo on one open stream. Opening a stream per call adds {per_stream:.0f} µs (p50)."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bulk-mib", type=int, default=256, help="bytes sent in the bulk test")
    parser.add_argument("--call-mib", type=int, default=16, help="payload of one bulk call")
    parser.add_argument("--rtt-count", type=int, default=2000, help="timed round trips")
    parser.add_argument("--json", metavar="PATH", help="also write the results here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        trio.run(serve)
        return
    if args.bulk_mib % args.call_mib or args.call_mib * MIB > BULK.max_request:
        parser.error("--bulk-mib must be a multiple of --call-mib, and --call-mib at most 256")

    meta = machine()
    server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        line = server.stdout.readline()
        if not line:
            raise SystemExit("the server process exited before it listened")
        where = json.loads(line)
        result = trio.run(
            run_client,
            where["addr"],
            where["port"],
            args.bulk_mib * MIB,
            args.call_mib * MIB,
            args.rtt_count,
        )
    finally:
        server.stdin.close()  # the server's signal to close its host and exit
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    result["machine"] = meta
    result["args"] = {k: v for k, v in vars(args).items() if k != "serve"}
    print(table(result, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
