"""Model-shard discovery on py-libp2p's Kademlia.

A server announces the blocks it serves: one provider record per block key and one
signed server record (spans, blobs, addresses, expiry) under its own server key, both
refreshed every ``refresh_interval``; the record expires after twice that. Lookups ask
the DHT for a block's providers and keep those whose record is valid, unexpired and
covers the block, so a dead server drops out within two refresh periods even though
py-libp2p keeps returning its provider records (48 h).

Reachable nodes run the DHT in server mode, nodes behind NAT in client mode (they query
but do not store), following ``Host.reachability``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service import background_trio_service

from shoal.dht.errors import InvalidRecord
from shoal.dht.records import (
    NAMESPACE,
    ServerRecord,
    block_key,
    dht_provider_key,
    dht_value_key,
    server_key,
    sign_record,
    validate,
)
from shoal.dht.records import select as select_record
from shoal.transport.host import Host, Reachability

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)


class _RecordValidator(Validator):
    """Plugs shoal's record rules into py-libp2p (on store and on read)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock

    def validate(self, key: str, value: bytes) -> None:
        try:
            validate(key, value, self.clock())
        except InvalidRecord as exc:
            log.info("%s", exc)
            raise ValueError(str(exc)) from exc  # what py-libp2p expects from validators

    def select(self, key: str, values: list[bytes]) -> int:
        return select_record(key, values, self.clock())


@dataclass(frozen=True, kw_only=True)
class DiscoveryConfig:
    """refresh_interval: seconds between re-announcements; records expire after twice
    that. lookup_timeout: seconds one lookup may take."""

    refresh_interval: float = 60.0
    lookup_timeout: float = 5.0


class Discovery:
    def __init__(
        self,
        host: Host,
        swarm: str,
        key_pair: KeyPair,
        config: DiscoveryConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.swarm = swarm
        self.key_pair = key_pair
        self.config = config
        self.clock = clock
        self.spans: dict[str, tuple[int, int]] = {}
        self._seq = 0
        self._changed = trio.Event()
        self._records: dict[str, ServerRecord] = {}
        self.dht: KadDHT | None = None

    # ---- announcing ------------------------------------------------------------------

    def announce(self, model_id: str, start: int, end: int) -> None:
        """Serve blocks [start, end) of ``model_id`` from now on (published at once)."""
        self.spans[model_id] = (start, end)
        self._changed.set()

    def withdraw(self, model_id: str) -> None:
        self.spans.pop(model_id, None)
        self._changed.set()

    async def publish(self) -> None:
        dht = self._require_dht()
        self._seq += 1
        record = sign_record(
            self.key_pair,
            swarm=self.swarm,
            seq=self._seq,
            expires=self.clock() + 2 * self.config.refresh_interval,
            spans=self.spans,
            addrs=tuple(self.host.advertised_addrs()),
        )
        key = dht_value_key(server_key(self.swarm, record.peer_id))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dht.put_value, key, record.encode())
            for model_id, (start, end) in self.spans.items():
                for block in range(start, end):
                    logical = block_key(self.swarm, model_id, block)
                    nursery.start_soon(dht.provide, dht_provider_key(logical))

    # ---- looking up ------------------------------------------------------------------

    async def find_servers(self, model_id: str, block: int) -> list[ServerRecord]:
        """Live servers of one block, by their signed records."""
        dht = self._require_dht()
        with trio.move_on_after(self.config.lookup_timeout):
            logical = block_key(self.swarm, model_id, block)
            providers = await dht.find_providers(dht_provider_key(logical))
            found: list[ServerRecord] = []
            # py-libp2p returns a provider once per peer that told it about the provider.
            unique = {str(info.peer_id): info.peer_id for info in providers}
            async with trio.open_nursery() as nursery:
                for peer in unique.values():
                    nursery.start_soon(self._collect, peer, found)
            return sorted((r for r in found if r.serves(model_id, block)), key=lambda r: r.peer_id)
        log.warning("lookup of %s block %d timed out", model_id, block)
        return []

    async def model_view(self, model_id: str, num_blocks: int) -> list[list[str]]:
        """For each block, the peer ids of its live servers."""
        view: list[list[str]] = [[] for _ in range(num_blocks)]

        async def one(block: int) -> None:
            view[block] = [r.peer_id for r in await self.find_servers(model_id, block)]

        async with trio.open_nursery() as nursery:
            for block in range(num_blocks):
                nursery.start_soon(one, block)
        return view

    async def _collect(self, peer: ID, found: list[ServerRecord]) -> None:
        record = await self.server_record(str(peer))
        if record is not None:
            found.append(record)

    async def server_record(self, peer_id: str) -> ServerRecord | None:
        """A peer's current record: from our cache while it is unexpired, else the DHT."""
        now = self.clock()
        cached = self._records.get(peer_id)
        if cached is not None and cached.expires > now:
            return cached
        dht = self._require_dht()
        key = dht_value_key(server_key(self.swarm, peer_id))
        # py-libp2p answers from its local store first, expired or not: drop a stale copy
        # so that the lookup goes to the network for the refreshed record.
        dht.value_store.remove(key.encode())
        raw = await dht.get_value(key)
        if raw is None:
            return None
        try:
            record = validate(key, raw, now)
        except InvalidRecord as exc:
            log.info("ignoring server record: %s", exc)
            return None
        self._records[peer_id] = record
        return record

    # ---- service ---------------------------------------------------------------------

    def _mode(self) -> DHTMode:
        return DHTMode.CLIENT if self.host.reachability is Reachability.PRIVATE else DHTMode.SERVER

    def _require_dht(self) -> KadDHT:
        if self.dht is None:
            raise RuntimeError("Discovery.run() has not started")
        return self.dht

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        dht = KadDHT(self.host.libp2p, self._mode(), enable_random_walk=False)
        dht.register_validator(NAMESPACE, _RecordValidator(self.clock))
        async with background_trio_service(dht):
            self.dht = dht
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._track_peers, dht)
                nursery.start_soon(self._refresh)
                task_status.started()

    async def _track_peers(self, dht: KadDHT) -> None:
        """Keep the routing table in step with our connections and the DHT mode."""
        known: set[str] = set()
        while True:
            mode = self._mode()
            if dht.mode != mode:
                log.info("DHT switches to %s mode", mode.name.lower())
                await dht.switch_mode(mode)
            for link in self.host.links():
                if link.peer_id not in known:
                    known.add(link.peer_id)
                    await dht.add_peer(ID.from_base58(link.peer_id))
            known &= {link.peer_id for link in self.host.links()}
            await trio.sleep(0.2)

    async def _refresh(self) -> None:
        while True:
            # Reset before publishing: an announce() during the publish wakes the next round.
            self._changed = trio.Event()
            if self.spans:
                try:
                    await self.publish()
                except Exception:  # the next round retries; one bad round must not stop it
                    log.exception("announcing to the DHT failed")
            with trio.move_on_after(self.config.refresh_interval):
                await self._changed.wait()
