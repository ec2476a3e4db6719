"""Typed views of the swarm state: the roster, the model registry, block coverage.

Documents hold JSON-like values (pycrdt turns integers into floats); these accessors turn
them back into typed records and skip fields a peer filled with the wrong type, so one
misbehaving peer cannot break another node's view.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from shoal.state.document import SwarmState


@dataclass(frozen=True, kw_only=True)
class Device:
    kind: str = "cpu"  # cpu, cuda, mps
    name: str = ""
    memory_bytes: int = 0


@dataclass(frozen=True, kw_only=True)
class RosterEntry:
    """One peer as it describes itself, plus whether we hear from it (``online``)."""

    peer_id: str
    addrs: tuple[str, ...] = ()
    reachability: str = "unknown"
    device: Device = field(default_factory=Device)
    # model id -> [start, end) of the blocks this peer serves
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    throughput: float = 0.0
    load: float = 0.0
    free_cache_tokens: int = 0
    version: str = ""
    heartbeat: float = 0.0
    online: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["spans"] = {m: list(span) for m, span in self.spans.items()}
        return data


@dataclass(frozen=True, kw_only=True)
class ModelRecord:
    """A model as registered by one peer: config, tokenizer, per-file sha256 manifest."""

    model_id: str
    author: str
    num_blocks: int
    config: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = ""
    manifest: dict[str, str] = field(default_factory=dict)


def _int(value: Any, default: int = 0) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _float(value: Any, default: float = 0.0) -> float:
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default
    )


def _str(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _spans(raw: Any) -> dict[str, tuple[int, int]]:
    if not isinstance(raw, Mapping):
        return {}
    out = {}
    for model, span in raw.items():
        if isinstance(span, list) and len(span) == 2:
            start, end = _int(span[0], -1), _int(span[1], -1)
            if 0 <= start < end:
                out[str(model)] = (start, end)
    return out


def roster_entry(peer_id: str, raw: Mapping[str, Any], online: bool) -> RosterEntry:
    raw_device = raw.get("device")
    device: Mapping[str, Any] = raw_device if isinstance(raw_device, Mapping) else {}
    addrs = raw.get("addrs")
    return RosterEntry(
        peer_id=peer_id,
        addrs=tuple(a for a in addrs if isinstance(a, str)) if isinstance(addrs, list) else (),
        reachability=_str(raw.get("reachability"), "unknown"),
        device=Device(
            kind=_str(device.get("kind"), "cpu"),
            name=_str(device.get("name")),
            memory_bytes=_int(device.get("memory_bytes")),
        ),
        spans=_spans(raw.get("spans")),
        throughput=_float(raw.get("throughput")),
        load=_float(raw.get("load")),
        free_cache_tokens=_int(raw.get("free_cache_tokens")),
        version=_str(raw.get("version")),
        heartbeat=_float(raw.get("heartbeat")),
        online=online,
    )


def roster(state: SwarmState, online: set[str]) -> list[RosterEntry]:
    return sorted(
        (roster_entry(pid, raw, pid in online) for pid, raw in state.section("peer").items()),
        key=lambda entry: entry.peer_id,
    )


def models(state: SwarmState) -> dict[str, ModelRecord]:
    """One record per model id; when several peers registered one, the earliest author
    in peer-id order wins, so every node picks the same."""
    out: dict[str, ModelRecord] = {}
    registrations = state.section("models")
    for author in sorted(registrations):
        for model_id, raw in registrations[author].items():
            if model_id in out or not isinstance(raw, Mapping):
                continue
            num_blocks = _int(raw.get("num_blocks"), 0)
            if num_blocks <= 0:
                continue
            config = raw.get("config")
            manifest = raw.get("manifest")
            out[model_id] = ModelRecord(
                model_id=model_id,
                author=author,
                num_blocks=num_blocks,
                config=dict(config) if isinstance(config, Mapping) else {},
                tokenizer=_str(raw.get("tokenizer")),
                manifest={str(k): v for k, v in manifest.items() if isinstance(v, str)}
                if isinstance(manifest, Mapping)
                else {},
            )
    return out


def coverage(record: ModelRecord, entries: list[RosterEntry]) -> list[list[str]]:
    """For each block of the model, the online peers that serve it."""
    blocks: list[list[str]] = [[] for _ in range(record.num_blocks)]
    for entry in entries:
        span = entry.spans.get(record.model_id)
        if not entry.online or span is None:
            continue
        for block in range(span[0], min(span[1], record.num_blocks)):
            blocks[block].append(entry.peer_id)
    return blocks
