"""Keys and signed, expiring server records for model-shard discovery (sans-io).

Key layout (every key is prefixed by the swarm's name):

- ``/shoal/<swarm>/model/<model-id>/block/<i>``: provider key of block ``i``;
- ``/shoal/<swarm>/blob/<sha256>``: provider key of a weight file, by content hash;
- ``/shoal/<swarm>/server/<peer-id>``: the server's signed record (value key).

These logical keys are not what goes on the wire: py-libp2p 0.8.1's FIND_NODE handler
ignores target keys that are neither a multihash nor at most 50 bytes, so routing toward
a 70-byte path silently fails. ``dht_provider_key`` turns a logical key into a sha256
multihash and ``dht_value_key`` into ``/shoal/`` + 40 hex digits of its sha256 (47 bytes,
still in our validator's namespace).

py-libp2p keeps provider records for 48 h and answers from its local store first, so a
provider record alone says nothing about liveness. Each server therefore also keeps a
signed value record with an expiry (twice its refresh period) listing what it serves;
lookups keep only providers whose record is valid, unexpired and covers the block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from shoal.dht.errors import InvalidRecord

NAMESPACE = "shoal"
DOMAIN = "shoal-server/1"
MAX_RECORD_BYTES = 16 * 1024


def block_key(swarm: str, model_id: str, block: int) -> str:
    return f"/{NAMESPACE}/{swarm}/model/{model_id}/block/{block}"


def blob_key(swarm: str, sha256: str) -> str:
    return f"/{NAMESPACE}/{swarm}/blob/{sha256}"


def is_sha256_hex(text: str) -> bool:
    """Whether ``text`` is a sha256 digest as lowercase hex (how blob keys name files)."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def server_key(swarm: str, peer_id: str) -> str:
    return f"/{NAMESPACE}/{swarm}/server/{peer_id}"


def dht_provider_key(logical: str) -> str:
    """Hex of a sha256 multihash (0x12 0x20 + digest), the form py-libp2p routes on."""
    return "1220" + hashlib.sha256(logical.encode()).hexdigest()


def dht_value_key(logical: str) -> str:
    return f"/{NAMESPACE}/{hashlib.sha256(logical.encode()).hexdigest()[:40]}"


@dataclass(frozen=True, kw_only=True)
class ServerRecord:
    """What one server announces: its spans per model, blobs, addresses, until when."""

    swarm: str
    peer_id: str
    seq: int
    expires: float
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    blobs: tuple[str, ...] = ()
    addrs: tuple[str, ...] = ()
    signature: bytes = b""

    def body(self) -> list[Any]:
        spans = {model: [a, b] for model, (a, b) in sorted(self.spans.items())}
        return [
            DOMAIN,
            self.swarm,
            self.peer_id,
            self.seq,
            self.expires,
            spans,
            list(self.blobs),
            list(self.addrs),
        ]

    def signed_bytes(self) -> bytes:
        return bytes(msgpack.packb(self.body(), use_bin_type=True))

    def encode(self) -> bytes:
        return bytes(msgpack.packb([*self.body(), self.signature], use_bin_type=True))

    def serves(self, model_id: str, block: int) -> bool:
        span = self.spans.get(model_id)
        return span is not None and span[0] <= block < span[1]


def sign_record(
    key_pair: KeyPair,
    *,
    swarm: str,
    seq: int,
    expires: float,
    spans: Mapping[str, tuple[int, int]],
    blobs: tuple[str, ...] = (),
    addrs: tuple[str, ...] = (),
) -> ServerRecord:
    unsigned = ServerRecord(
        swarm=swarm,
        peer_id=ID.from_pubkey(key_pair.public_key).to_base58(),
        seq=seq,
        expires=expires,
        spans=dict(spans),
        blobs=blobs,
        addrs=addrs,
    )
    signature = key_pair.private_key.sign(unsigned.signed_bytes())
    return ServerRecord(**{**unsigned.__dict__, "signature": signature})


def decode_record(key: str, raw: bytes) -> ServerRecord:
    """Parse and check a record's shape and signature (not its expiry: see validate)."""
    if len(raw) > MAX_RECORD_BYTES:
        raise InvalidRecord(key, f"{len(raw)} bytes is over the {MAX_RECORD_BYTES} limit")
    try:
        fields = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:
        raise InvalidRecord(key, f"not msgpack ({exc})") from exc
    if not isinstance(fields, list) or len(fields) != 9 or fields[0] != DOMAIN:
        raise InvalidRecord(key, "not a shoal server record")
    _, swarm, peer_id, seq, expires, spans, blobs, addrs, signature = fields
    if not (isinstance(swarm, str) and isinstance(peer_id, str) and isinstance(signature, bytes)):
        raise InvalidRecord(key, "swarm, peer id or signature has the wrong type")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise InvalidRecord(key, "sequence number must be a non-negative integer")
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        raise InvalidRecord(key, "expiry must be a number")
    if not isinstance(spans, dict) or not all(
        isinstance(m, str)
        and isinstance(s, list)
        and len(s) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in s)
        and 0 <= s[0] < s[1]
        for m, s in spans.items()
    ):
        raise InvalidRecord(key, "spans must map model ids to [start, end) block ranges")
    if not (isinstance(blobs, list) and all(isinstance(b, str) for b in blobs)):
        raise InvalidRecord(key, "blobs must be a list of hashes")
    if not (isinstance(addrs, list) and all(isinstance(a, str) for a in addrs)):
        raise InvalidRecord(key, "addrs must be a list of multiaddrs")
    record = ServerRecord(
        swarm=swarm,
        peer_id=peer_id,
        seq=seq,
        expires=float(expires),
        spans={m: (s[0], s[1]) for m, s in spans.items()},
        blobs=tuple(blobs),
        addrs=tuple(addrs),
        signature=signature,
    )
    if key not in (server_key(swarm, peer_id), dht_value_key(server_key(swarm, peer_id))):
        raise InvalidRecord(key, f"record of {peer_id} in swarm {swarm} stored under another key")
    try:
        public_key = ID.from_base58(peer_id).extract_public_key()
    except Exception as exc:
        raise InvalidRecord(key, f"author is not a valid peer id ({exc})") from exc
    if public_key is None or not public_key.verify(record.signed_bytes(), signature):
        raise InvalidRecord(key, "bad signature")
    return record


def validate(key: str, raw: bytes, now: float) -> ServerRecord:
    """A record fit to store or use at time ``now``: well formed, signed, unexpired."""
    record = decode_record(key, raw)
    if record.expires <= now:
        raise InvalidRecord(key, f"expired {now - record.expires:.1f}s ago")
    return record


def select(key: str, values: list[bytes], now: float) -> int:
    """Index of the best of several records for one key: the valid one with highest seq."""
    best, best_seq = 0, -1
    for index, raw in enumerate(values):
        try:
            record = validate(key, raw, now)
        except InvalidRecord:
            continue
        if record.seq > best_seq:
            best, best_seq = index, record.seq
    return best
