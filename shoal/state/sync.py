"""Moving signed state updates between nodes: gossip push plus anti-entropy pull.

- Push: every update this node writes or newly applies goes out on the swarm's gossipsub
  topic. Gossip is lossy in py-libp2p (32-entry queues that drop silently), so it is only
  the fast path.
- Pull (anti-entropy, ``/shoal/state-pull/2``, a channel: one long-lived stream per peer):
  on every new connection, and every ``pull_interval`` seconds (1 s) with the connected
  peer pulled least recently, a node sends its version vector and gets back the updates it
  lacks. A node that was offline or partitioned converges through this. At most
  ``MAX_PULLS_IN_FLIGHT`` pulls run at once, each sending the vector it holds when it
  starts: a node that joined a 32-node swarm pulled from all 31 new links at once with the
  same vector and received (and checked the signature of) every update about 14 times.
  (Pulling from every peer every interval cost each node of a 16-node swarm about 3
  stream setups a second for nothing new.)
- Heartbeats: every ``heartbeat_interval`` (default: a third of the failure bound, 10 s)
  the node writes its heartbeat to its roster entry; any update signed by a peer counts
  as hearing from it (failure detector).
- Persistence: the state is saved to the data dir when it changed, at most every
  ``save_interval`` seconds, and on shutdown.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.pubsub import Pubsub

from shoal.state.document import SwarmState
from shoal.state.errors import RejectedUpdate
from shoal.state.liveness import FailureDetector
from shoal.state.records import SignedUpdate, decode, from_wire
from shoal.state.store import encode_state, write_state
from shoal.transport.channel import ChannelProtocol
from shoal.transport.errors import RemoteError, RpcError
from shoal.transport.host import Host
from shoal.transport.rpc import Message

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

PULL = ChannelProtocol(
    name="state-pull",
    major=2,
    max_request=1 << 20,
    max_response=16 << 20,
    timeout=20.0,
    idle_close=120.0,  # one peer a second: a link of a 32-node swarm is pulled every ~31 s
    idle_timeout=180.0,
    idempotent=True,
)
MAX_VECTOR_ENTRIES = 10_000
MAX_PULLS_IN_FLIGHT = 4


@dataclass(frozen=True, kw_only=True)
class SyncConfig:
    """pull_interval: seconds between anti-entropy rounds (each with one peer, plus one with
    every new connection at once); heartbeat_interval:
    seconds between this node's heartbeats; offline_after: silence that marks a peer
    offline; save_interval: seconds between saves of a changed state."""

    pull_interval: float = 1.0
    #: None: a third of ``offline_after`` (10 s by default): a peer misses two before it
    #: is shown offline.
    heartbeat_interval: float | None = None
    offline_after: float = 30.0
    save_interval: float = 2.0

    @property
    def heartbeat_every(self) -> float:
        if self.heartbeat_interval is not None:
            return self.heartbeat_interval
        return self.offline_after / 3


def topic_of(swarm: str) -> str:
    return f"/shoal/{swarm}/state/1"


class StateSync:
    def __init__(
        self, host: Host, state: SwarmState, path: Path | None, config: SyncConfig
    ) -> None:
        self.host = host
        self.state = state
        self.path = path
        self.config = config
        self.liveness = FailureDetector(config.offline_after)
        self.rejected = 0
        self._dirty = False
        self._outbox_send, self._outbox = trio.open_memory_channel[SignedUpdate](1024)
        self._pulled: dict[str, float] = {}
        self._pull_slots = trio.CapacityLimiter(MAX_PULLS_IN_FLIGHT)

    # ---- writing -------------------------------------------------------------------

    def write(self, section: str, key: str, value: Any) -> None:
        """Write to our own document and send the result to the swarm."""
        for update in self.state.write(section, key, value):
            self._queue(update)

    def _queue(self, update: SignedUpdate) -> None:
        self._dirty = True
        try:
            self._outbox_send.send_nowait(update)
        except trio.WouldBlock:  # pull repairs whatever gossip did not carry
            log.debug("gossip outbox full; dropping push of %s#%d", update.author, update.seq)

    def receive(self, update: SignedUpdate, sender: str | None) -> list[SignedUpdate]:
        try:
            applied = self.state.receive(update, sender)
        except RejectedUpdate as exc:
            self.rejected += 1
            log.warning("%s", exc)
            return []
        if applied:
            self._dirty = True
            self.liveness.heard_from(update.author, trio.current_time())
        return applied

    # ---- service -------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.host.channels.serve(PULL, self._rpc_pull)
        pubsub = self.host.pubsub
        subscription = await pubsub.subscribe(topic_of(self.state.swarm))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._gossip_in, subscription)
                nursery.start_soon(self._gossip_out, pubsub)
                nursery.start_soon(self._anti_entropy)
                nursery.start_soon(self._heartbeats)
                nursery.start_soon(self._saver)
                task_status.started()
        finally:
            self.save()

    def save(self) -> None:
        if self.path is not None:
            write_state(encode_state(self.state), self.path)
            self._dirty = False

    async def _gossip_in(self, subscription: Any) -> None:
        while True:
            message = await subscription.get()
            sender = _sender_of(message)
            try:
                update = decode(bytes(message.data))
            except RejectedUpdate as exc:
                self.rejected += 1
                log.warning("bad gossip from %s: %s", sender, exc)
                continue
            self.receive(update, sender)

    async def _gossip_out(self, pubsub: Pubsub) -> None:
        topic = topic_of(self.state.swarm)
        async for update in self._outbox:
            try:
                await pubsub.publish(topic, update.encode())
            except Exception as exc:  # gossip is best effort; pull repairs it
                log.debug("publish failed: %r", exc)

    async def _anti_entropy(self) -> None:
        last_round = -1e9
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                links = self.host.connected_peers()
                for gone in set(self._pulled) - links:  # pulled again when it reconnects
                    del self._pulled[gone]
                due = [p for p in links if p not in self._pulled]  # new connections
                if not due and links and now - last_round >= self.config.pull_interval:
                    due = [min(links, key=lambda p: self._pulled[p])]
                    last_round = now
                for peer_id in due:
                    self._pulled[peer_id] = now
                    nursery.start_soon(self.pull_from, ID.from_base58(peer_id))
                await trio.sleep(0.25)

    async def pull_from(self, peer: ID) -> int:
        """One anti-entropy round with ``peer``; returns how many updates were applied."""
        try:
            async with self._pull_slots:
                reply = await self.host.channels.call(
                    peer, PULL, Message({"v": self.state.vector()})
                )
        except (RemoteError, RpcError) as exc:
            log.debug("state pull from %s failed: %s", peer, exc)
            return 0
        records = reply.body.get("u")
        if not isinstance(records, list):
            log.warning("state pull from %s: reply without updates", peer)
            return 0
        applied = 0
        for record in records:
            try:
                update = from_wire(record)
            except RejectedUpdate as exc:
                self.rejected += 1
                log.warning("bad update pulled from %s: %s", peer, exc)
                continue
            applied += len(self.receive(update, str(peer)))
        return applied

    async def _rpc_pull(self, peer: ID, request: Message) -> Message:
        vector = _parse_vector(request.body.get("v"))
        updates = self.state.missing(vector)
        return Message({"u": [u.to_wire() for u in updates]})

    async def _heartbeats(self) -> None:
        while True:
            self.write("peer", "heartbeat", time.time())
            self.liveness.heard_from(self.state.me, trio.current_time())
            await trio.sleep(self.config.heartbeat_every)

    async def _saver(self) -> None:
        while True:
            await trio.sleep(self.config.save_interval)
            if self._dirty and self.path is not None:
                # Encode on the loop (the state is only touched here), write off it.
                blob, self._dirty = encode_state(self.state), False
                await trio.to_thread.run_sync(write_state, blob, self.path)


def _parse_vector(raw: Any) -> Mapping[str, int]:
    if not isinstance(raw, dict) or len(raw) > MAX_VECTOR_ENTRIES:
        raise RpcError("bad_request", "expected a version vector {author: seq}")
    return {a: s for a, s in raw.items() if isinstance(a, str) and isinstance(s, int)}


def _sender_of(message: Any) -> str | None:
    try:
        return ID(message.from_id).to_base58()
    except Exception:
        return None
