"""Model-shard and weight-file discovery on Kademlia.

A server announces what it serves: one provider record per block key and per weight-file
key (by sha256), and one signed server record (spans, blobs, addresses, expiry) under its
own server key, all refreshed every ``refresh_interval``; the record expires after twice
that. Lookups ask the DHT for a key's providers and keep those whose record is valid,
unexpired and covers the key, so a dead server drops out within two refresh periods even
though py-libp2p keeps provider records for 48 h.

Lookups are Kademlia's iterative walk, bounded: ask the closest peers we know at once (as
many as the answers the walk needs: the ``replication`` closest, or ``alpha`` once a value
is found), learn closer ones from their replies, stop when the closest known peers have
answered. In a swarm whose routing tables hold the closest peers (every swarm of a few
dozen nodes) that is one round trip. Server records are cached until they expire.

Reachable nodes run the DHT in server mode, nodes behind NAT in client mode (they query
but do not store), following ``Host.reachability``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import trio
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.kad_dht import DHTMode
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service import background_trio_service

from shoal.dht import kad, query
from shoal.dht.errors import InvalidRecord
from shoal.dht.records import (
    NAMESPACE,
    ServerRecord,
    blob_key,
    block_key,
    dht_provider_key,
    dht_value_key,
    is_sha256_hex,
    server_key,
    sign_record,
    validate,
)
from shoal.dht.records import select as select_record
from shoal.transport.host import Host, Reachability, advertised_multiaddrs

if TYPE_CHECKING:
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


class _RecordValidator(Validator):
    """Plugs shoal's record rules into py-libp2p's store (on PUT_VALUE from peers)."""

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
    """refresh_interval: seconds between re-announcements (records expire after twice
    that); lookup_timeout: seconds one lookup may take; request_timeout: seconds one
    request to one peer may take; replication: peers that store each record; alpha:
    peers asked at once; max_requests: requests this node has in flight at most;
    absent_ttl: seconds to remember that a provider has no valid record."""

    refresh_interval: float = 30.0
    lookup_timeout: float = 5.0
    request_timeout: float = 2.0
    replication: int = 8
    alpha: int = 3
    max_requests: int = 32
    absent_ttl: float = 5.0


MAX_EXPECTED = 4096  # provider sets kept for early stops, before old ones are pruned


@dataclass
class _Walk:
    """The state of one iterative lookup: peers by distance to the key, which were asked,
    which answered, which failed."""

    key: bytes
    alpha: int
    known: list[ID]
    asked: set[ID] = field(default_factory=set)
    answered: set[ID] = field(default_factory=set)
    failed: set[ID] = field(default_factory=set)
    in_flight: int = 0
    quorum: int = 3
    providers: set[str] = field(default_factory=set)
    values: list[bytes] = field(default_factory=list)
    expected: frozenset[str] = frozenset()
    agreeing: int = 0
    disagreed: bool = False

    def learn(self, peers: list[ID]) -> None:
        fresh = [p for p in peers if p not in self.known]
        if fresh:
            self.known = sort_peer_ids_by_distance(self.key, self.known + fresh)

    def closest(self, count: int) -> list[ID]:
        """The ``count`` closest peers not known to have failed (where records go)."""
        return [p for p in self.known if p not in self.failed][:count]

    def done(self) -> bool:
        """The ``quorum`` closest peers that answered are closer than every peer not yet
        asked (a peer still in flight does not hold the walk up: a slow or dead peer
        costs nothing once closer ones have answered). A value lookup that found a value
        needs only ``alpha`` of them.

        Providers and records live at the ``replication`` closest peers *as the writer
        saw them*; a reader whose view differs (a routing table still filling, churn) may
        find its closest few hold nothing. Asking only ``alpha`` lost one server in two
        for lookups made seconds after a 24-node swarm formed (scripts/bench/dht.py)."""
        if self.confirmed():
            return True
        need = self.alpha if self.values else self.quorum
        seen = 0
        for peer in self.known:
            if peer in self.answered:
                seen += 1
                if seen == need:
                    return True
            elif peer not in self.asked:
                return False
        return self.in_flight == 0 and not self.next_peers(1)

    def confirmed(self) -> bool:
        """A provider lookup stops early once ``alpha`` peers answered exactly the
        providers the last full walk for this key found (``expected``, not empty), and
        none answered otherwise: the set has not changed. A new announcement shows up in
        some answer and sends the walk on to the ``quorum``; with nothing expected (no
        recent full walk, or it found nothing) the walk always goes the whole way."""
        return bool(self.expected) and not self.disagreed and self.agreeing >= self.alpha

    def heard(self, providers: frozenset[str]) -> None:
        self.providers.update(providers)
        if providers == self.expected:
            self.agreeing += 1
        else:
            self.disagreed = True

    def next_peers(self, count: int) -> list[ID]:
        return [p for p in self.known if p not in self.asked][:count]

    def wanted_in_flight(self) -> int:
        """Requests to keep in flight: at least ``alpha``, and as many as the answers the
        walk still needs, so a walk that needs the ``quorum`` closest asks them all in its
        first round trip (with ``alpha`` at a time, 8 answers took three round trips)."""
        need = self.alpha if self.values else self.quorum
        return max(self.alpha, need - len(self.answered))


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
        self.peer_id = str(host.peer_id)
        self.spans: dict[str, tuple[int, int]] = {}
        self.blobs: set[str] = set()
        self._changed = trio.Event()
        self._records: dict[str, tuple[ServerRecord, float]] = {}  # peer -> (record, fetched)
        self._absent: dict[str, float] = {}  # peer -> until when it counts as absent
        self._providers: dict[
            bytes, tuple[frozenset[str], float]
        ] = {}  # key -> (full walk's, when)
        self._requests = trio.Semaphore(config.max_requests)
        self.dht: kad.KadNode | None = None

    # ---- announcing ------------------------------------------------------------------

    def announce(self, model_id: str, start: int, end: int) -> None:
        """Serve blocks [start, end) of ``model_id`` from now on (published at once)."""
        if not 0 <= start < end:
            raise ValueError(f"block span [{start}, {end}) is empty or negative")
        self.spans[model_id] = (start, end)
        self._changed.set()

    def withdraw(self, model_id: str) -> None:
        self.spans.pop(model_id, None)
        self._changed.set()

    def announce_blob(self, sha256: str) -> None:
        """Hold the weight file with this content hash (hex) from now on."""
        if not is_sha256_hex(sha256):
            raise ValueError(f"{sha256!r} is not a lowercase hex sha256")
        self.blobs.add(sha256)
        self._changed.set()

    def withdraw_blob(self, sha256: str) -> None:
        self.blobs.discard(sha256)
        self._changed.set()

    async def publish(self) -> None:
        """Store our record, then our provider records (so that whoever finds us as a
        provider finds the record too). One batched walk finds where every key goes."""
        now = self.clock()
        record = sign_record(
            self.key_pair,
            swarm=self.swarm,
            seq=int(now * 1000),  # grows across restarts, unlike a counter
            expires=now + 2 * self.config.refresh_interval,
            spans=self.spans,
            blobs=tuple(sorted(self.blobs)),
            addrs=tuple(self.host.advertised_addrs()),
        )
        self._records[self.peer_id] = (record, now)
        record_key = dht_value_key(server_key(self.swarm, self.peer_id)).encode()
        logical = [
            block_key(self.swarm, model_id, block)
            for model_id, (start, end) in self.spans.items()
            for block in range(start, end)
        ]
        logical += [blob_key(self.swarm, sha256) for sha256 in self.blobs]
        provider_keys = [bytes.fromhex(dht_provider_key(k)) for k in logical]
        dht = self._require_dht()
        if dht.mode is DHTMode.SERVER:
            dht.value_store.put(record_key, record.encode())
            me = PeerInfo(self.host.libp2p.get_id(), advertised_multiaddrs(self.host))
            for key in provider_keys:
                dht.provider_store.add_provider(key, me)
        walks = await self._lookup([record_key, *provider_keys], values=False)
        value = record.encode()
        async with trio.open_nursery() as nursery:
            for peer in walks[record_key].closest(self.config.replication):
                nursery.start_soon(
                    self._request, kad.put_value, self.host.libp2p, peer, record_key, value
                )
        async with trio.open_nursery() as nursery:
            for peer, keys in self._by_closest_peer(walks, provider_keys).items():
                for chunk in _chunks(keys, query.MAX_KEYS):
                    nursery.start_soon(self._request, query.provide, self.host, peer, chunk)

    def _by_closest_peer(
        self, walks: dict[bytes, _Walk], keys: list[bytes]
    ) -> dict[ID, list[bytes]]:
        """Group ``keys`` by the peers that should store them (the ``replication`` closest)."""
        grouped: dict[ID, list[bytes]] = {}
        for key in keys:
            for peer in walks[key].closest(self.config.replication):
                grouped.setdefault(peer, []).append(key)
        return grouped

    # ---- looking up ------------------------------------------------------------------

    async def find_servers(self, model_id: str, block: int) -> list[ServerRecord]:
        """Live servers of one block, by their signed records, ordered by peer id."""
        wanted = [(block_key(self.swarm, model_id, block), _serves(model_id, block))]
        return (await self._find_many(wanted))[0]

    async def find_blob(self, sha256: str) -> list[ServerRecord]:
        """Live holders of the weight file with this content hash."""
        wanted = [(blob_key(self.swarm, sha256), _holds(sha256))]
        return (await self._find_many(wanted))[0]

    async def model_view(self, model_id: str, num_blocks: int) -> list[list[str]]:
        """For each block, the peer ids of its live servers (one batched lookup)."""
        wanted = [
            (block_key(self.swarm, model_id, block), _serves(model_id, block))
            for block in range(num_blocks)
        ]
        return [[r.peer_id for r in records] for records in await self._find_many(wanted)]

    async def _find_many(
        self, wanted: list[tuple[str, Callable[[ServerRecord], bool]]]
    ) -> list[list[ServerRecord]]:
        """For each (logical key, covers): the providers of the key whose live record
        ``covers`` it, ordered by peer id. One walk for all keys, one for the records."""
        with trio.move_on_after(self.config.lookup_timeout):
            keys = [bytes.fromhex(dht_provider_key(logical)) for logical, _ in wanted]
            now = self.clock()
            remembered = {key: self._providers.get(key) for key in keys}
            expected = {
                key: seen[0]
                for key, seen in remembered.items()
                if seen is not None and now - seen[1] < self.config.refresh_interval
            }
            walks = await self._lookup(keys, values=False, expected=expected)
            now = self.clock()
            for key, walk in walks.items():
                if not walk.confirmed():  # a full walk: what the next lookups expect
                    self._providers[key] = (frozenset(walk.providers), now)
            if len(self._providers) > MAX_EXPECTED:
                self._providers = {
                    k: v for k, v in self._providers.items()
                    if now - v[1] < self.config.refresh_interval
                }  # fmt: skip
            covers_of: dict[str, list[Callable[[ServerRecord], bool]]] = {}
            for key, (_, covers) in zip(keys, wanted, strict=True):
                for peer_id in walks[key].providers:
                    covers_of.setdefault(peer_id, []).append(covers)

            def needs(record: ServerRecord) -> bool:
                return all(covers(record) for covers in covers_of.get(record.peer_id, ()))

            records = await self.server_records(sorted(covers_of), needs=needs)
            return [
                sorted(
                    (
                        records[p]
                        for p in walks[key].providers
                        if p in records and covers(records[p])
                    ),
                    key=lambda r: r.peer_id,
                )
                for key, (_, covers) in zip(keys, wanted, strict=True)
            ]
        log.warning("lookup of %s timed out after %.1fs", wanted[0][0], self.config.lookup_timeout)
        return [[] for _ in wanted]

    async def server_record(
        self, peer_id: str, needs: Callable[[ServerRecord], bool] | None = None
    ) -> ServerRecord | None:
        """A peer's current record (see :meth:`server_records`)."""
        return (await self.server_records([peer_id], needs=needs)).get(peer_id)

    async def server_records(
        self, peer_ids: list[str], needs: Callable[[ServerRecord], bool] | None = None
    ) -> dict[str, ServerRecord]:
        """Current records of peers: cached while unexpired and younger than a refresh
        period, else from the DHT (one batched walk for all that are not). A cached record
        that fails ``needs`` (it does not list what the peer was just found a provider of)
        counts as stale: the peer has announced more since."""
        now = self.clock()
        out: dict[str, ServerRecord] = {}
        missing: list[str] = []
        for peer_id in peer_ids:
            cached = self._records.get(peer_id)
            if cached is not None:
                record, fetched = cached
                fresh = record.expires > now and now - fetched < self.config.refresh_interval
                if fresh and (needs is None or needs(record)):
                    out[peer_id] = record
                    continue
            if self._absent.get(peer_id, 0.0) <= now:
                missing.append(peer_id)
        if not missing:
            return out
        keys = {p: dht_value_key(server_key(self.swarm, p)) for p in missing}
        walks = await self._lookup([k.encode() for k in keys.values()], values=True)
        now = self.clock()
        for peer_id, key in keys.items():
            best: ServerRecord | None = None
            for value in walks[key.encode()].values:
                try:
                    candidate = validate(key, value, now)
                except InvalidRecord as exc:
                    log.info("ignoring server record: %s", exc)
                    continue
                if best is None or candidate.seq > best.seq:
                    best = candidate
            if best is None:
                self._absent[peer_id] = now + self.config.absent_ttl
                self._records.pop(peer_id, None)
                continue
            self._absent.pop(peer_id, None)
            self._records[peer_id] = (best, now)
            out[peer_id] = best
        return out

    def server_record_cached(self, peer_id: str) -> ServerRecord | None:
        """The record a lookup last found for ``peer_id``, if any (no network)."""
        cached = self._records.get(peer_id)
        return None if cached is None else cached[0]

    # ---- the walk --------------------------------------------------------------------

    async def _lookup(
        self,
        keys: list[bytes],
        *,
        values: bool,
        expected: dict[bytes, frozenset[str]] | None = None,
    ) -> dict[bytes, _Walk]:
        """Kademlia's iterative lookup toward every key at once: keep
        ``_Walk.wanted_in_flight`` requests in flight per key to the closest peers not yet
        asked, learn the closer peers they name, stop a key when the closest that answered
        are closer than anyone not yet asked (``_Walk.done``), or a provider lookup's
        answers confirm what the last full walk found (``expected``, ``_Walk.confirmed``).
        One request to a peer carries every key it is asked about."""
        dht = self._require_dht()
        table = dht.routing_table.get_peer_ids()
        walks: dict[bytes, _Walk] = {}
        for key in keys:
            walk = walks[key] = _Walk(
                key=key,
                alpha=self.config.alpha,
                quorum=self.config.replication,
                known=sort_peer_ids_by_distance(key, table),
                expected=(expected or {}).get(key, frozenset()),
            )
            walk.providers.update(str(i.peer_id) for i in dht.provider_store.get_providers(key))
            local = dht.value_store.get(key) if values else None
            if local is not None and local.value:
                walk.values.append(local.value)
        progress = trio.Event()

        async def ask(peer: ID, batch: list[bytes]) -> None:
            nonlocal progress
            found = await self._request(query.find, self.host, peer, batch, values=values)
            for index, key in enumerate(batch):
                walk = walks[key]
                walk.in_flight -= 1
                if found is None:
                    walk.failed.add(peer)
                    continue
                walk.answered.add(peer)
                walk.learn(found[index].closer)
                walk.heard(frozenset(str(p) for p in found[index].providers))
                value = found[index].value
                if value is not None:
                    walk.values.append(value)
            progress.set()

        async with trio.open_nursery() as nursery:
            while True:
                plan: dict[ID, list[bytes]] = {}
                for key, walk in walks.items():
                    if walk.done():
                        continue
                    for peer in walk.next_peers(walk.wanted_in_flight() - walk.in_flight):
                        walk.asked.add(peer)
                        walk.in_flight += 1
                        plan.setdefault(peer, []).append(key)
                for peer, batch in plan.items():
                    for chunk in _chunks(batch, query.MAX_KEYS):
                        nursery.start_soon(ask, peer, chunk)
                if all(walk.done() for walk in walks.values()):
                    break
                await progress.wait()
                progress = trio.Event()
            nursery.cancel_scope.cancel()
        return walks

    async def _request(
        self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T | None:
        """One request, bounded by ``request_timeout`` and ``max_requests``; None on
        failure (the walk then asks the next closest peer)."""
        async with self._requests:
            with trio.move_on_after(self.config.request_timeout):
                try:
                    return await fn(*args, **kwargs)
                except kad.RequestFailed as exc:
                    log.debug("%s", exc)
                    return None
            log.debug("DHT request %s%s timed out", getattr(fn, "__name__", fn), args)
            return None

    # ---- service ---------------------------------------------------------------------

    def _mode(self) -> DHTMode:
        return DHTMode.CLIENT if self.host.reachability is Reachability.PRIVATE else DHTMode.SERVER

    def _require_dht(self) -> kad.KadNode:
        if self.dht is None:
            raise RuntimeError("Discovery.run() has not started")
        return self.dht

    def status(self) -> dict[str, object]:
        dht = self.dht
        return {
            "mode": "off" if dht is None else dht.mode.name.lower(),
            "routing_table": 0 if dht is None else dht.routing_table.size(),
            "spans": {m: list(s) for m, s in sorted(self.spans.items())},
            "blobs": sorted(self.blobs),
        }

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        dht = kad.KadNode(self.host.libp2p, self._mode())
        dht.register_validator(NAMESPACE, _RecordValidator(self.clock))
        self.host.channels.serve(query.DHT_QUERY, query.QueryServer(dht).handle)
        async with background_trio_service(dht):
            self.dht = dht
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._track_peers, dht)
                nursery.start_soon(self._refresh)
                task_status.started()

    async def _track_peers(self, dht: kad.KadNode) -> None:
        """Keep the routing table in step with our connections and the DHT mode."""
        known: set[str] = set()
        while True:
            mode = self._mode()
            if dht.mode != mode:
                log.info("DHT switches to %s mode", mode.name.lower())
                await dht.switch_mode(mode)
            links = self.host.connected_peers()
            for peer_id in links - known:
                if await dht.add_peer(ID.from_base58(peer_id)):
                    known.add(peer_id)
            known &= links
            dht.drop_clients()
            await trio.sleep(0.5)

    async def _refresh(self) -> None:
        """Publish every ``refresh_interval`` from the start of the last round (not its
        end: a slow round must not let the record, valid for two periods, lapse), and at
        once when the announcements change."""
        while True:
            # Reset before publishing: an announce() during the publish wakes the next round.
            self._changed = trio.Event()
            deadline = trio.current_time() + self.config.refresh_interval
            if self.spans or self.blobs:
                try:
                    await self.publish()
                except Exception:  # the next round retries; one bad round must not stop it
                    log.exception("announcing to the DHT failed")
            with trio.move_on_at(deadline):
                await self._changed.wait()


def _chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _serves(model_id: str, block: int) -> Callable[[ServerRecord], bool]:
    return lambda record: record.serves(model_id, block)


def _holds(sha256: str) -> Callable[[ServerRecord], bool]:
    return lambda record: sha256 in record.blobs
