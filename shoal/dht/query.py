"""shoal's batched DHT requests, on a channel (one long-lived stream per peer).

py-libp2p's Kademlia protocol carries one key per message and opens a stream for each
(2.4-2.9 ms of setup on this machine, where the request itself takes under 1 ms). A model
view needs the providers of every block: with one message per key and peer, 8 blocks in
a 10-node swarm took ~32 streams and 0.4-1.4 s between busy daemons (docs/state.md).

This protocol reads and writes the same stores as py-libp2p's handler (``KadNode``'s
provider store, value store and routing table), and batches keys:

- ``find``: ``{"op": "find", "keys": [key, ...], "values": bool}`` -> for each key, the
  providers stored here, the value stored here (if asked), and the closer peers this node
  knows: ``{"r": [{"p": [peer, ...], "v": value | None, "c": [peer, ...]}, ...]}``, where
  a peer is ``[peer id bytes, [multiaddr bytes, ...]]``.
- ``provide``: ``{"op": "provide", "keys": [key, ...], "addrs": [multiaddr bytes, ...]}``
  stores the *caller* (the peer the channel's Noise session authenticated) as a provider
  of each key -> ``{"n": count}``. Rate limited per peer.

Values are still written with Kademlia's PUT_VALUE (once per refresh), where py-libp2p's
store runs shoal's record validator. A node in client mode refuses both operations, as
it refuses Kademlia streams.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.kad_dht.kad_dht import DHTMode
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from shoal.dht.kad import LEARNED_ADDR_TTL, PROVIDER_RATE_MAX, KadNode, RequestFailed
from shoal.transport.channel import ChannelProtocol
from shoal.transport.errors import RemoteError, RpcError
from shoal.transport.host import Host, advertised_multiaddrs
from shoal.transport.rpc import Message

log = logging.getLogger(__name__)

DHT_QUERY = ChannelProtocol(
    name="dht", max_request=256 << 10, max_response=4 << 20, timeout=5.0, idempotent=True
)
#: Keys one request may carry; a caller splits longer lists.
MAX_KEYS = 64
MAX_KEY_BYTES = 256
MAX_ADDRS = 8
MAX_ADDR_BYTES = 256
#: Peers per list in a reply (Kademlia's k).
MAX_PEERS = 20
PROVIDER_RATE_WINDOW = 10.0


@dataclass
class Found:
    """One key's answer from one peer."""

    providers: list[ID]
    value: bytes | None
    closer: list[ID]


class QueryServer:
    """Answers ``find`` and ``provide`` from a ``KadNode``'s stores."""

    def __init__(self, dht: KadNode) -> None:
        self.dht = dht
        self._provided: dict[ID, tuple[float, int]] = {}  # peer -> (window start, keys)

    async def handle(self, peer: ID, request: Message) -> Message:
        if self.dht.mode is DHTMode.CLIENT:
            raise RpcError("client_mode", "this node runs the DHT in client mode")
        body = request.body
        keys = _keys(body.get("keys"))
        op = body.get("op")
        # The caller speaks the DHT as a server: it belongs in our routing table (as on a
        # Kademlia stream; KadNode.add_peer checks identify).
        await self.dht.add_peer(peer)
        if op == "find":
            values = bool(body.get("values"))
            return Message({"r": [self._find(peer, key, values) for key in keys]})
        if op == "provide":
            addrs = _addrs(body.get("addrs"))
            self._charge(peer, len(keys))
            info = PeerInfo(peer, addrs)
            for key in keys:
                self.dht.provider_store.add_provider(key, info)
            return Message({"n": len(keys)})
        raise RpcError("bad_request", f"unknown op {op!r}; expected 'find' or 'provide'")

    def _find(self, caller: ID, key: bytes, values: bool) -> dict[str, Any]:
        providers = self.dht.provider_store.get_providers(key)[:MAX_PEERS]
        record = self.dht.value_store.get(key) if values else None
        closer = self.dht.routing_table.find_local_closest_peers(key, MAX_PEERS + 1)
        peerstore = self.dht.host.get_peerstore()
        return {
            "p": [_peer(info.peer_id, info.addrs) for info in providers],
            "v": record.value if record is not None and record.value else None,
            "c": [_peer(p, peerstore.addrs(p)) for p in closer if p != caller][:MAX_PEERS],
        }

    def _charge(self, peer: ID, keys: int) -> None:
        now = trio.current_time()
        start, used = self._provided.get(peer, (now, 0))
        if now - start >= PROVIDER_RATE_WINDOW:
            start, used = now, 0
        if used + keys > PROVIDER_RATE_MAX:
            log.warning(
                "provider rate limit: %s sent %d keys in %.0fs", peer, used + keys, now - start
            )
            raise RpcError("rate_limited", f"more than {PROVIDER_RATE_MAX} keys in 10 s")
        self._provided[peer] = (start, used + keys)


def _peer(peer: ID, addrs: list[Multiaddr]) -> list[Any]:
    return [peer.to_bytes(), [a.to_bytes() for a in addrs[:MAX_ADDRS]]]


def _keys(raw: object) -> list[bytes]:
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_KEYS:
        raise RpcError("bad_request", f"keys must be a list of 1 to {MAX_KEYS} byte strings")
    if not all(isinstance(k, bytes) and 0 < len(k) <= MAX_KEY_BYTES for k in raw):
        raise RpcError("bad_request", f"each key must be 1 to {MAX_KEY_BYTES} bytes")
    return list(raw)


def _addrs(raw: object) -> list[Multiaddr]:
    if not isinstance(raw, list) or len(raw) > MAX_ADDRS:
        raise RpcError("bad_request", f"addrs must be a list of at most {MAX_ADDRS} multiaddrs")
    try:
        addrs = [Multiaddr(a) for a in raw if isinstance(a, bytes) and len(a) <= MAX_ADDR_BYTES]
        for addr in addrs:
            str(addr)  # py-multiaddr parses bytes lazily
    except Exception as exc:
        raise RpcError("bad_request", f"bad multiaddr: {exc}") from exc
    return addrs


# ---- calling -------------------------------------------------------------------------


async def find(host: Host, peer: ID, keys: list[bytes], *, values: bool) -> list[Found]:
    """Ask ``peer`` about ``keys`` (at most MAX_KEYS); raises :class:`RequestFailed`."""
    try:
        reply = await host.channels.call(
            peer, DHT_QUERY, Message({"op": "find", "keys": keys, "values": values})
        )
    except RemoteError as exc:
        raise RequestFailed(peer, "find", f"{exc.code}: {exc.message}") from exc
    answers = reply.body.get("r")
    if not isinstance(answers, list) or len(answers) != len(keys):
        raise RequestFailed(peer, "find", "reply does not answer every key")
    me = host.peer_id
    found: list[Found] = []
    for answer in answers:
        if not isinstance(answer, dict):
            raise RequestFailed(peer, "find", "an answer is not a map")
        value = answer.get("v")
        found.append(
            Found(
                providers=_learn(host, answer.get("p"), keep=me),
                value=value if isinstance(value, bytes) else None,
                closer=[p for p in _learn(host, answer.get("c"), keep=None) if p != me],
            )
        )
    return found


async def provide(host: Host, peer: ID, keys: list[bytes]) -> None:
    """Have ``peer`` store us as a provider of ``keys``; raises :class:`RequestFailed`."""
    # what the node advertises (--announce, wildcards expanded), not what it listens on
    addrs = [a.to_bytes() for a in advertised_multiaddrs(host)[:MAX_ADDRS]]
    try:
        reply = await host.channels.call(
            peer, DHT_QUERY, Message({"op": "provide", "keys": keys, "addrs": addrs})
        )
    except RemoteError as exc:
        raise RequestFailed(peer, "provide", f"{exc.code}: {exc.message}") from exc
    if reply.body.get("n") != len(keys):
        raise RequestFailed(peer, "provide", f"stored {reply.body.get('n')} of {len(keys)} keys")


def _learn(host: Host, raw: object, *, keep: ID | None) -> list[ID]:
    """Peer ids from a reply list, their addresses added to the peer store. Entries that
    do not parse are skipped (one bad entry does not spoil the rest); our own id is kept
    only where ``keep`` says (a provider list may name us)."""
    if not isinstance(raw, list):
        return []
    found: list[ID] = []
    peerstore = host.libp2p.get_peerstore()
    for entry in raw[:MAX_PEERS]:
        try:
            raw_id, raw_addrs = entry
            peer = ID(raw_id)
            addrs = [Multiaddr(a) for a in raw_addrs[:MAX_ADDRS]]
            for addr in addrs:
                str(addr)  # py-multiaddr parses bytes lazily
        except Exception:
            continue
        if peer == host.peer_id and keep is None:
            continue
        if addrs and peer != host.peer_id:
            peerstore.add_addrs(peer, addrs, LEARNED_ADDR_TTL)
        found.append(peer)
    return found
