"""``/shoal/ping/1``: echo a payload back with its SHA-256.

Used to check a path end to end (bytes intact, hash compared) and to measure round trip
and throughput to a peer. Large pings are allowed (bulk checks), but only two at a time
per node, so they cannot pin much memory. ``/shoal/ping-bulk/1`` is the same echo as a
channel protocol carried on a bulk stream where the peer can be reached that way (the
path tensors take), on libp2p otherwise; the result says which carried it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from libp2p.peer.id import ID

from shoal.transport.channel import ChannelProtocol
from shoal.transport.errors import RemoteError
from shoal.transport.host import Host
from shoal.transport.rpc import Message, Protocol

MAX_PING_BYTES = 128 << 20
PING = Protocol(
    name="ping",
    max_request=MAX_PING_BYTES,
    max_response=MAX_PING_BYTES,
    timeout=120.0,
    max_concurrent=2,
)
PING_BULK = ChannelProtocol(
    name="ping-bulk",
    max_request=MAX_PING_BYTES,
    max_response=MAX_PING_BYTES,
    timeout=120.0,
    max_concurrent=2,
    bulk=True,
)


@dataclass(frozen=True, slots=True)
class PingResult:
    peer: str
    size: int
    seconds: float
    sent_sha256: str
    remote_sha256: str
    echoed_sha256: str
    via: str = "libp2p"  # what carried it: "libp2p" or "bulk"

    @property
    def intact(self) -> bool:
        return self.sent_sha256 == self.remote_sha256 == self.echoed_sha256


async def rpc_ping(peer: ID, request: Message) -> Message:
    return Message({"sha256": hashlib.sha256(request.payload).hexdigest()}, request.payload)


def serve_ping(host: Host) -> None:
    host.rpc.serve(PING, rpc_ping)
    host.channels.serve(PING_BULK, rpc_ping)


async def call_ping(host: Host, peer: ID, payload: bytes, *, bulk: bool = False) -> PingResult:
    """Echo ``payload`` off ``peer``; ``bulk``: on the path tensors take (a bulk stream
    where it can be had)."""
    sent = hashlib.sha256(payload).hexdigest()
    start = time.perf_counter()
    via = "libp2p"
    if bulk:
        reply = await host.channels.call(peer, PING_BULK, Message({}, payload))
        via = host.channels.carrier(peer, PING_BULK) or via
    else:
        reply = await host.rpc.call(peer, PING, Message({}, payload))
    seconds = time.perf_counter() - start
    remote = reply.body.get("sha256")
    if not isinstance(remote, str):
        raise RemoteError(str(peer), "bad_reply", "ping reply has no sha256")
    return PingResult(
        str(peer),
        len(payload),
        seconds,
        sent,
        remote,
        hashlib.sha256(reply.payload).hexdigest(),
        via,
    )
