"""py-libp2p 0.8.1's Kademlia, adapted for shoal: the one module that touches its internals.

shoal keeps py-libp2p's Kademlia wire protocol (``/ipfs/kad/1.0.0``), its server-side
handler and its record and provider stores, and replaces two things:

- ADD_PROVIDER rate limit: py-libp2p accepts 10 per peer per 10 s and resets the rest;
  a server re-announces every block and weight file it holds each refresh period, so a
  span of 8 blocks already goes past it. ``KadNode`` allows ``PROVIDER_RATE_MAX``.
- Routing table: py-libp2p adds any peer that opens a Kademlia stream, client-mode peers
  behind NAT included (``KadNode.add_peer``).
- Inbound streams: py-libp2p serves at most 12 at once and *resets* the 13th at once. A
  node that announces a few blocks while others look them up goes past 12 in bursts, and
  the resets surface on the other side as "failed to open a stream" and lookups that run
  out their timeout (what broke the first 10-node experiment, docs/state.md). ``KadNode``
  queues an inbound stream for a slot and has more slots; ``QUEUE_WAIT`` bounds the wait
  and the handling together.
- The client side: py-libp2p's ``find_providers`` answers from its local store whenever
  that holds anything (so a new server of a block is never seen by a node that looked the
  block up before), and its ``get_value`` asks every candidate it learns of. The request
  functions here send one request on one stream and raise on failure, so that
  ``shoal.dht.discovery`` can run bounded lookups: ask the closest peers, stop when they
  have answered.
"""

from __future__ import annotations

import trio
import varint
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE, PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.network.stream.net_stream import INetStream
from libp2p.peer.id import ID
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.records.record import make_signed_put_record
from libp2p.utils.varint import read_varint_prefixed_bytes_limited
from multiaddr import Multiaddr

from shoal.dht.errors import DhtError

#: Seconds an inbound stream may take, waiting for a handler slot and being served,
#: before it is reset.
QUEUE_WAIT = 5.0
INBOUND_SLOTS = 64
#: ADD_PROVIDER messages accepted per peer per 10 s (py-libp2p: 10).
PROVIDER_RATE_MAX = 2048
#: Seconds py-libp2p's peer store keeps addresses learned from a lookup.
LEARNED_ADDR_TTL = 600


class RequestFailed(DhtError):
    """A Kademlia request to one peer failed (no stream, reset, bad or missing reply)."""

    def __init__(self, peer: ID, what: str, reason: str) -> None:
        super().__init__(f"{what} to {peer} failed: {reason}")
        self.peer = peer


class KadNode(KadDHT):
    """py-libp2p's KadDHT with queued inbound streams and a workable provider rate limit."""

    def __init__(self, host: IHost, mode: DHTMode) -> None:
        super().__init__(host, mode, enable_random_walk=False)
        self._inbound_limiter = trio.CapacityLimiter(INBOUND_SLOTS)
        self._provider_rate_max = PROVIDER_RATE_MAX

    async def add_peer(self, peer_id: ID, *, skip_server_mode_check: bool = False) -> bool:
        """py-libp2p adds every peer that opens a Kademlia stream to it, as a server, and
        any peer identify has not yet described: a client-mode peer behind NAT then sits
        in routing tables and fails every request. Add only peers that identify says
        serve Kademlia."""
        if not self.serves_kad(peer_id):
            return False
        return bool(await self.routing_table.add_peer(peer_id))

    def serves_kad(self, peer_id: ID) -> bool:
        try:
            protocols = self.host.get_peerstore().get_protocols(peer_id)
        except Exception:  # not in the peer store (yet)
            return False
        return PROTOCOL_ID in (protocols or ())

    def drop_clients(self) -> None:
        """Forget routing-table peers that no longer serve Kademlia (switched to client
        mode, as a node does once it learns it is behind NAT)."""
        for peer_id in self.routing_table.get_peer_ids():
            if not self.serves_kad(peer_id):
                self.routing_table.remove_peer(peer_id)

    async def handle_stream(self, stream: INetStream) -> None:
        if self.mode == DHTMode.CLIENT:
            await stream.close()
            return
        with trio.move_on_after(QUEUE_WAIT):
            async with self._inbound_limiter:
                await self._do_handle_stream(stream)
            return
        await stream.reset()


async def _exchange(host: IHost, peer: ID, request: Message, what: str) -> Message:
    """One request, one reply, one stream. Callers bound it with a cancel scope."""
    envelope, _ = env_to_send_in_RPC(host)
    request.senderRecord = envelope
    payload = request.SerializeToString()
    try:
        stream = await host.new_stream(peer, [TProtocol(PROTOCOL_ID)])
    except Exception as exc:
        raise RequestFailed(peer, what, f"no stream ({exc})") from exc
    try:
        await stream.write(varint.encode(len(payload)) + payload)
        raw = await read_varint_prefixed_bytes_limited(stream, MAX_DHT_MESSAGE_SIZE)
        reply = Message()
        reply.ParseFromString(raw)
    except Exception as exc:
        raise RequestFailed(peer, what, str(exc) or type(exc).__name__) from exc
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.close()
    if reply.type != request.type:
        raise RequestFailed(peer, what, f"reply of type {reply.type}")
    return reply


def _learn_peers(host: IHost, peers: list[Message.Peer]) -> list[ID]:
    """Peer ids from a reply, with their addresses added to the peer store (to dial them),
    leaving us out (we do not ask ourselves)."""
    found: list[ID] = []
    for proto in peers:
        try:
            peer = ID(proto.id)
            addrs = [Multiaddr(raw) for raw in proto.addrs]
        except Exception:  # one bad entry does not spoil the rest of the reply
            continue
        if peer == host.get_id():
            continue
        if addrs:
            host.get_peerstore().add_addrs(peer, addrs, LEARNED_ADDR_TTL)
        found.append(peer)
    return found


async def find_node(host: IHost, peer: ID, key: bytes) -> list[ID]:
    """The peers ``peer`` knows closest to ``key``."""
    reply = await _exchange(
        host, peer, Message(type=Message.MessageType.FIND_NODE, key=key), "FIND_NODE"
    )
    return _learn_peers(host, list(reply.closerPeers))


async def put_value(host: IHost, peer: ID, key: bytes, value: bytes) -> None:
    """Store ``value`` under ``key`` at ``peer``; raises if it refuses (its validator)."""
    request = Message(type=Message.MessageType.PUT_VALUE, key=key)
    request.record.CopyFrom(make_signed_put_record(key, value, host.get_private_key()))
    request.record.ClearField("timeReceived")
    reply = await _exchange(host, peer, request, "PUT_VALUE")
    if reply.key != key:
        raise RequestFailed(peer, "PUT_VALUE", "stored under another key")
