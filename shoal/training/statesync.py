"""The state-sync protocol: a run's global state served in parts over libp2p channels.

Protocol ``/shoal/train-state/1`` (a :class:`~shoal.transport.channel.ChannelProtocol`:
many calls multiplexed on one stream per peer). Requests are msgpack bodies without a
payload (the request limit is 4 KiB, checked by the frame decoder before anything is
allocated):

- ``{"t": "manifest", "run": RUN}`` (optionally ``"round": R``) -> body
  ``{"manifest": Manifest.to_data(), "members": [peer ids of that round]}`` of the latest
  round (or of round R);
- ``{"t": "part", "run": RUN, "round": R, "index": I}`` -> the raw bytes of part I of the
  state at round R (payload; at most ``part_bytes``).

Errors are typed replies (:class:`RemoteError` on the caller): ``bad_request`` (a missing
field or a field of the wrong type or range), ``unknown_run``, ``gone`` (this peer no
longer holds that round). A malformed or oversized frame closes that stream only; the
server keeps serving every other call.

:class:`StateServer` holds the exports of the last :data:`KEEP_EXPORTS` rounds, so a
joiner downloading round R can finish while the run moves to R+1.
:func:`fetch_state` drives the sans-io :class:`~shoal.training.sync.StateFetch` over the
network: parts from several peers at once, each checked by sha256, a peer that sends a
bad part or fails asked nothing more. :func:`agreed_manifest` asks every peer for its
manifest and keeps the one a strict majority of that round's members hold.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.peer.id import ID

from shoal.training.diloco import OuterState
from shoal.training.errors import LayoutMismatch, NoConsensus, SyncFailed
from shoal.training.flat import Layout
from shoal.training.sync import DEFAULT_PART_BYTES, Manifest, StateFetch, export_state
from shoal.transport.channel import ChannelProtocol, Channels
from shoal.transport.errors import RemoteError, RpcError
from shoal.transport.rpc import Message

log = logging.getLogger(__name__)

#: Parts are at most 1 MiB by default; the reply limit leaves room for up to 4 MiB parts.
MAX_PART_BYTES = 4 << 20
STATE_PROTOCOL = ChannelProtocol(
    name="train-state",
    max_request=4096,
    max_response=MAX_PART_BYTES,
    timeout=60.0,
    max_concurrent=64,
    idempotent=True,
    bulk=True,  # a joiner downloads the whole state: bytes, from peers it all-reduces with
)
KEEP_EXPORTS = 2


@dataclass(frozen=True, slots=True)
class Export:
    """One round's state as served: the manifest, its parts, that round's members."""

    manifest: Manifest
    parts: tuple[bytes, ...]
    members: tuple[str, ...]


def _field(body: Any, name: str, kind: type) -> Any:
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RpcError("bad_request", f"field {name!r} must be a {kind.__name__}")
    return value


class StateServer:
    """Serves the state of one run on :data:`STATE_PROTOCOL` (the last rounds' exports)."""

    def __init__(self, run_id: str, *, part_bytes: int = DEFAULT_PART_BYTES) -> None:
        if not 0 < part_bytes <= MAX_PART_BYTES:
            raise ValueError(f"part_bytes must be in 1..{MAX_PART_BYTES}")
        self.run_id = run_id
        self.part_bytes = part_bytes
        self.exports: dict[int, Export] = {}
        self.served_parts = 0

    def publish(self, state: OuterState, members: Iterable[str]) -> Export:
        """Export ``state`` (after each round); older rounds beyond the last few are dropped."""
        return self.publish_export(self.export(state, members))

    def export(self, state: OuterState, members: Iterable[str]) -> Export:
        """The export of ``state`` (hashing and copying: a worker thread's job for big states)."""
        manifest, parts = export_state(state, run_id=self.run_id, part_bytes=self.part_bytes)
        return Export(manifest, tuple(parts), tuple(sorted(members)))

    def publish_export(self, export: Export) -> Export:
        self.exports[export.manifest.round] = export
        for old in sorted(self.exports)[:-KEEP_EXPORTS]:
            del self.exports[old]
        return export

    def latest(self) -> Export | None:
        return self.exports[max(self.exports)] if self.exports else None

    def serve(self, channels: Channels) -> None:
        channels.serve(STATE_PROTOCOL, self.rpc_state)

    def _held(self, round_: int) -> Export:
        export = self.exports.get(round_)
        if export is None:
            held = ", ".join(map(str, sorted(self.exports)))
            raise RpcError("gone", f"round {round_} is not held here (holding {held})")
        return export

    async def rpc_state(self, peer: ID, request: Message) -> Message:
        return self.handle(request.body)

    def handle(self, body: Any) -> Message:
        """One request -> its reply (raises :class:`RpcError` for a typed error reply)."""
        kind = _field(body, "t", str)
        run = _field(body, "run", str)
        if run != self.run_id or not self.exports:
            raise RpcError("unknown_run", f"this peer serves no state of run {run[:80]!r}")
        if kind == "manifest":
            export = self.latest()
            if "round" in body:
                export = self._held(_field(body, "round", int))
            assert export is not None
            return Message({"manifest": export.manifest.to_data(), "members": export.members})
        if kind == "part":
            export = self._held(_field(body, "round", int))
            index = _field(body, "index", int)
            if not 0 <= index < len(export.parts):
                raise RpcError("bad_request", f"part {index} is not in 0..{len(export.parts) - 1}")
            self.served_parts += 1
            return Message({}, export.parts[index])
        raise RpcError("bad_request", f"unknown request type {kind[:40]!r}")


async def call_manifest(
    channels: Channels, peer: str, run_id: str, round_: int | None = None
) -> tuple[Manifest, tuple[str, ...]]:
    """``peer``'s manifest of ``run_id`` (its latest, or of ``round_``) and that round's
    members."""
    body: dict[str, object] = {"t": "manifest", "run": run_id}
    if round_ is not None:
        body["round"] = round_
    reply = await channels.call(ID.from_base58(peer), STATE_PROTOCOL, Message(body))
    try:
        manifest = Manifest.from_data(reply.body["manifest"])
        members = tuple(str(m) for m in reply.body["members"])
    except (KeyError, TypeError, ValueError, LayoutMismatch) as exc:
        raise RemoteError(peer, "bad_reply", f"unusable manifest: {exc!r}") from exc
    return manifest, members


async def call_part(channels: Channels, peer: str, run_id: str, round_: int, index: int) -> bytes:
    reply = await channels.call(
        ID.from_base58(peer),
        STATE_PROTOCOL,
        Message({"t": "part", "run": run_id, "round": round_, "index": index}),
    )
    return bytes(reply.payload)


async def agreed_manifest(
    channels: Channels,
    peers: Sequence[str],
    run_id: str,
    *,
    round_: int | None = None,
    patience: float = 20.0,
) -> tuple[Manifest, list[str], tuple[str, ...]]:
    """Ask every peer for its manifest (its latest, or of ``round_``); returns the manifest of the latest round that a
    strict majority of that round's members report (same state hash), the peers that
    hold it, and that round's members. Raises :class:`NoConsensus` when no round has
    such a majority (peers caught between two rounds: ask again)."""
    answers: dict[str, tuple[Manifest, tuple[str, ...]]] = {}

    async def ask(peer: str) -> None:
        try:
            answers[peer] = await call_manifest(channels, peer, run_id, round_)
        except RemoteError as exc:
            log.info("no manifest of %s from %s: %s", run_id, peer, exc)

    with trio.move_on_after(patience):
        async with trio.open_nursery() as nursery:
            for peer in dict.fromkeys(peers):
                nursery.start_soon(ask, peer)
    votes = Counter((m.round, m.state_hash) for m, _ in answers.values())
    for (round_, digest), count in sorted(votes.items(), reverse=True):
        holders = sorted(
            p for p, (m, _) in answers.items() if (m.round, m.state_hash) == (round_, digest)
        )
        members = answers[holders[0]][1]
        if 2 * count > max(len(members), 1):
            return answers[holders[0]][0], holders, members
    raise NoConsensus(
        f"no state of run {run_id!r} is held by a majority of its members "
        f"({len(answers)} of {len(set(peers))} peers answered)"
    )


async def fetch_state(
    channels: Channels,
    manifest: Manifest,
    peers: Sequence[str],
    layout: Layout,
    *,
    per_peer: int = 2,
) -> tuple[OuterState, StateFetch]:
    """Download the state of ``manifest`` from ``peers`` (parts spread over them, each
    verified); returns the state (checked against the manifest's state hash) and the
    finished :class:`StateFetch` (where each part came from, what was refused).
    Raises :class:`SyncFailed` when a part has no peer left to ask."""
    if manifest.layout_digest != layout.digest():
        raise LayoutMismatch("the run's state does not fit this model (another model or config?)")
    fetch = StateFetch(manifest, peers, per_peer=per_peer)
    done_send, done_receive = trio.open_memory_channel[None](math.inf)

    async def get(peer: str, index: int) -> None:
        try:
            data = await call_part(channels, peer, manifest.run_id, manifest.round, index)
        except RemoteError as exc:
            log.info("part %d from %s failed: %s", index, peer, exc)
            fetch.peer_failed(peer)
        else:
            fetch.receive(peer, index, data)
        done_send.send_nowait(None)

    async with trio.open_nursery() as nursery:
        while not fetch.done:
            for request in fetch.requests():  # raises SyncFailed when a part is unreachable
                nursery.start_soon(get, request.peer, request.index)
            if not fetch.inflight and not fetch.done:
                raise SyncFailed(-1, tuple(fetch.peers))
            await done_receive.receive()
    for rejection in fetch.rejections:
        log.warning("%s", rejection)
    state = await trio.to_thread.run_sync(fetch.result, layout)
    return state, fetch


__all__ = [
    "KEEP_EXPORTS",
    "STATE_PROTOCOL",
    "Export",
    "StateServer",
    "agreed_manifest",
    "call_manifest",
    "call_part",
    "fetch_state",
]
