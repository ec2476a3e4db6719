"""Joiner sync: the global state (params + outer momentum) in parts verified by sha256,
fetched from several peers at once. Sans-io: no awaits, no streams.

A serving peer exports its state once per round::

    manifest, parts = export_state(state, run_id=..., part_bytes=1 << 20)

The joiner takes the manifest whose state hash the run's majority reports (``runlog``),
then drives a :class:`StateFetch`::

    fetch = StateFetch(manifest, peers=[...])
    for req in fetch.requests(): send req.index to req.peer      # spread over the peers
    fetch.receive(peer, index, data)   # a bad part is refused and asked of another peer
    fetch.peer_failed(peer)            # its outstanding parts go to other peers
    state = fetch.result(layout)       # every part verified, then the whole state hash

The state's bytes are the params' little-endian fp32 bytes followed by the momentum's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shoal.training.diloco import OuterState, state_hash, tensor_bytes
from shoal.training.errors import CorruptPart, LayoutMismatch, StateHashMismatch, SyncFailed
from shoal.training.flat import Layout

DEFAULT_PART_BYTES = 1 << 20
MAX_PARTS = 1 << 16


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What a state download must produce: its size, each part's sha256, the state hash."""

    run_id: str
    round: int
    layout_digest: str
    numel: int
    part_bytes: int
    part_hashes: tuple[str, ...]
    state_hash: str

    @property
    def total_bytes(self) -> int:
        return 8 * self.numel  # params and momentum, fp32

    def part_size(self, index: int) -> int:
        start = index * self.part_bytes
        return max(0, min(self.part_bytes, self.total_bytes - start))

    def to_data(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "round": self.round,
            "layout_digest": self.layout_digest,
            "numel": self.numel,
            "part_bytes": self.part_bytes,
            "part_hashes": list(self.part_hashes),
            "state_hash": self.state_hash,
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Manifest:
        manifest = cls(
            run_id=str(data["run_id"]),
            round=int(data["round"]),
            layout_digest=str(data["layout_digest"]),
            numel=int(data["numel"]),
            part_bytes=int(data["part_bytes"]),
            part_hashes=tuple(str(h) for h in data["part_hashes"]),
            state_hash=str(data["state_hash"]),
        )
        expected = -(-manifest.total_bytes // manifest.part_bytes) if manifest.part_bytes else -1
        if manifest.part_bytes <= 0 or len(manifest.part_hashes) != expected:
            raise LayoutMismatch("manifest part count does not match its size")
        if expected > MAX_PARTS:
            raise LayoutMismatch(f"manifest has {expected} parts, more than {MAX_PARTS}")
        return manifest


def state_to_bytes(state: OuterState) -> bytes:
    return tensor_bytes(state.params) + tensor_bytes(state.momentum)


def export_state(
    state: OuterState, *, run_id: str, part_bytes: int = DEFAULT_PART_BYTES
) -> tuple[Manifest, list[bytes]]:
    """The manifest and the parts of ``state`` (every peer exports identical parts)."""
    if part_bytes <= 0 or part_bytes % 4:
        raise ValueError("part_bytes must be a positive multiple of 4")
    if -(-8 * state.layout.numel // part_bytes) > MAX_PARTS:
        raise ValueError(f"part_bytes {part_bytes} makes more than {MAX_PARTS} parts")
    blob = state_to_bytes(state)
    parts = [blob[i : i + part_bytes] for i in range(0, len(blob), part_bytes)]
    manifest = Manifest(
        run_id=run_id,
        round=state.round,
        layout_digest=state.layout.digest(),
        numel=state.layout.numel,
        part_bytes=part_bytes,
        part_hashes=tuple(hashlib.sha256(p).hexdigest() for p in parts),
        state_hash=state.state_hash(),
    )
    return manifest, parts


def import_state(manifest: Manifest, parts: Sequence[bytes], layout: Layout) -> OuterState:
    """Rebuild the state from verified parts; checks layout, every part and the state hash."""
    if manifest.layout_digest != layout.digest() or manifest.numel != layout.numel:
        raise LayoutMismatch("the manifest's layout differs from this model's")
    if len(parts) != len(manifest.part_hashes):
        raise LayoutMismatch(f"{len(parts)} parts, the manifest has {len(manifest.part_hashes)}")
    for i, part in enumerate(parts):
        if hashlib.sha256(part).hexdigest() != manifest.part_hashes[i]:
            raise CorruptPart("local", i, "sha256 mismatch")
    blob = b"".join(parts)
    values = torch.from_numpy(np.frombuffer(blob, dtype="<f4").astype(np.float32))
    params, momentum = values[: layout.numel].clone(), values[layout.numel :].clone()
    actual = state_hash(params, momentum)
    if actual != manifest.state_hash:
        raise StateHashMismatch(manifest.state_hash, actual)
    return OuterState(layout, params, momentum, manifest.round)


@dataclass(frozen=True, slots=True)
class PartRequest:
    peer: str
    index: int


class StateFetch:
    """Downloads the parts of ``manifest`` from ``peers``, at most ``per_peer`` in flight
    per peer. Parts are spread round-robin; a part that fails verification or whose peer
    fails is asked of a peer that has not yet been tried for it. Refused parts are kept in
    :attr:`rejections`; a peer that sent a bad part gets no further requests."""

    def __init__(self, manifest: Manifest, peers: Iterable[str], *, per_peer: int = 2) -> None:
        self.manifest = manifest
        self.peers = list(dict.fromkeys(peers))
        self.per_peer = per_peer
        self.parts: dict[int, bytes] = {}
        self.inflight: dict[int, str] = {}
        self.tried: dict[int, list[str]] = {i: [] for i in range(len(manifest.part_hashes))}
        self.bad_peers: set[str] = set()
        self.failed_peers: set[str] = set()
        self.rejections: list[CorruptPart] = []
        self._cursor = 0

    @property
    def done(self) -> bool:
        return len(self.parts) == len(self.manifest.part_hashes)

    def _usable(self) -> list[str]:
        return [p for p in self.peers if p not in self.bad_peers and p not in self.failed_peers]

    def requests(self) -> list[PartRequest]:
        """New requests to send now (raises :class:`SyncFailed` if a part is unreachable)."""
        load = {p: 0 for p in self._usable()}
        for peer in self.inflight.values():
            if peer in load:
                load[peer] += 1
        out = []
        for index in range(len(self.manifest.part_hashes)):
            if index in self.parts or index in self.inflight:
                continue
            candidates = [p for p in load if p not in self.tried[index]]
            if not candidates:
                raise SyncFailed(index, tuple(self.tried[index]))
            # round-robin over the peers, so parts come from several peers at once
            candidates.sort(key=lambda p: (self.peers.index(p) - self._cursor) % len(self.peers))
            free = [p for p in candidates if load[p] < self.per_peer]
            if not free:
                continue
            peer = free[0]
            self._cursor = (self.peers.index(peer) + 1) % len(self.peers)
            load[peer] += 1
            self.inflight[index] = peer
            self.tried[index].append(peer)
            out.append(PartRequest(peer, index))
        return out

    def receive(self, peer: str, index: int, data: bytes) -> None:
        """A part arrived; verified before it is kept. Unrequested parts are ignored."""
        if self.inflight.get(index) != peer:
            return
        del self.inflight[index]
        expected = self.manifest.part_size(index)
        if len(data) != expected:
            reason = f"{len(data)} bytes, expected {expected}"
        elif hashlib.sha256(data).hexdigest() != self.manifest.part_hashes[index]:
            reason = "sha256 mismatch"
        else:
            self.parts[index] = bytes(data)
            return
        self.rejections.append(CorruptPart(peer, index, reason))
        self.bad_peers.add(peer)

    def peer_failed(self, peer: str) -> None:
        """``peer`` is gone (or timed out): its outstanding parts go to other peers."""
        self.failed_peers.add(peer)
        for index in [i for i, p in self.inflight.items() if p == peer]:
            del self.inflight[index]

    def result(self, layout: Layout) -> OuterState:
        if not self.done:
            missing = [i for i in self.tried if i not in self.parts]
            raise SyncFailed(missing[0], tuple(self.tried[missing[0]]))
        ordered = [self.parts[i] for i in range(len(self.manifest.part_hashes))]
        return import_state(self.manifest, ordered, layout)


__all__ = [
    "DEFAULT_PART_BYTES",
    "Manifest",
    "PartRequest",
    "StateFetch",
    "export_state",
    "import_state",
    "state_to_bytes",
]
