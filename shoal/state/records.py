"""Signed state updates: the only thing that crosses the wire for the swarm state.

Each author (a peer) numbers its updates 1, 2, 3, ... and signs every one with its
Ed25519 identity. An update is either a ``delta`` (a pycrdt/Yjs update of the author's own
document) or a ``snapshot`` (the author's whole document, which replaces every earlier
update of that author: log compaction). Anyone may forward an update; nobody but its
author can make one. Decoding validates types and sizes before anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from shoal.state.errors import RejectedUpdate

DOMAIN = "shoal-state/1"
MAX_UPDATE_BYTES = 256 * 1024
KINDS = ("delta", "snapshot")


@dataclass(frozen=True, slots=True)
class SignedUpdate:
    swarm: str
    author: str
    seq: int
    kind: str
    update: bytes
    signature: bytes

    def signed_bytes(self) -> bytes:
        return signing_payload(self.swarm, self.author, self.seq, self.kind, self.update)

    def encode(self) -> bytes:
        return bytes(msgpack.packb(self.to_wire(), use_bin_type=True))

    def to_wire(self) -> dict[str, Any]:
        return {
            "w": self.swarm,
            "a": self.author,
            "q": self.seq,
            "k": self.kind,
            "u": self.update,
            "g": self.signature,
        }

    def verify(self, swarm: str) -> None:
        """Raise :class:`RejectedUpdate` unless this is a genuine update for ``swarm``."""
        if self.swarm != swarm:
            raise RejectedUpdate(self.author, f"belongs to swarm {self.swarm!r}, not {swarm!r}")
        try:
            public_key = ID.from_base58(self.author).extract_public_key()
        except Exception as exc:
            raise RejectedUpdate(self.author, f"author is not a valid peer id ({exc})") from exc
        if public_key is None or not public_key.verify(self.signed_bytes(), self.signature):
            raise RejectedUpdate(self.author, "bad signature")


def signing_payload(swarm: str, author: str, seq: int, kind: str, update: bytes) -> bytes:
    return bytes(msgpack.packb([DOMAIN, swarm, author, seq, kind, update], use_bin_type=True))


def sign_update(key_pair: KeyPair, swarm: str, seq: int, kind: str, update: bytes) -> SignedUpdate:
    author = ID.from_pubkey(key_pair.public_key).to_base58()
    payload = signing_payload(swarm, author, seq, kind, update)
    return SignedUpdate(swarm, author, seq, kind, update, key_pair.private_key.sign(payload))


def from_wire(data: Any, *, max_update: int = MAX_UPDATE_BYTES) -> SignedUpdate:
    """Validate a decoded msgpack map into a :class:`SignedUpdate` (not yet verified)."""
    if not isinstance(data, dict):
        raise RejectedUpdate("?", "update is not a map")
    author = data.get("a")
    if not isinstance(author, str) or not 0 < len(author) <= 128:
        raise RejectedUpdate("?", "update has no author")
    swarm, seq, kind = data.get("w"), data.get("q"), data.get("k")
    update, signature = data.get("u"), data.get("g")
    if not isinstance(swarm, str):
        raise RejectedUpdate(author, "swarm must be a string")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 < seq < 2**63:
        raise RejectedUpdate(author, f"bad sequence number {seq!r}")
    if kind not in KINDS:
        raise RejectedUpdate(author, f"unknown update kind {kind!r}")
    if not isinstance(update, bytes) or len(update) > max_update:
        raise RejectedUpdate(author, f"update must be at most {max_update} bytes")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise RejectedUpdate(author, "signature must be 64 bytes")
    return SignedUpdate(swarm, author, seq, kind, update, signature)


def decode(raw: bytes, *, max_update: int = MAX_UPDATE_BYTES) -> SignedUpdate:
    if len(raw) > max_update + 1024:
        raise RejectedUpdate("?", f"encoded update of {len(raw)} bytes is too large")
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:
        raise RejectedUpdate("?", f"not valid msgpack: {exc}") from exc
    return from_wire(data, max_update=max_update)
