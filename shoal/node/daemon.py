"""The node daemon: one trio nursery for every service of one node.

``run_node(config)`` loads the identity, opens the libp2p host, starts peering (bootstrap
and peer exchange), NAT traversal, state sync, DHT discovery, the diagnostic ping, the
model server when ``--model`` is given (load the span, measure it, serve inference
sessions, announce the span in the DHT and the roster) and the HTTP API with the
OpenAI-compatible routes (generations through the swarm), and runs until cancelled. On the way out it persists the known peers and removes its runtime file; the
host is closed by ``open_host`` on every path.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import trio
from libp2p.peer.id import ID

from shoal import __version__
from shoal.client import SwarmClient
from shoal.dht.discovery import Discovery, DiscoveryConfig
from shoal.dht.records import ServerRecord
from shoal.node.api import build_api, serve_api
from shoal.node.config import NodeConfig, parse_blocks, parse_size
from shoal.node.errors import NodeError
from shoal.node.openai_api import openai_routes
from shoal.node.swarm_backend import SwarmBackend
from shoal.node.tp import serve_tp_member
from shoal.pipeline.chain import ChainConfig, RemoteSwarm
from shoal.pipeline.loading import builtin_models, open_checkpoint, resolve_model
from shoal.pipeline.model import Span
from shoal.pipeline.routing import choose_span
from shoal.pipeline.serving import ModelFiles, SpanServer, measure_throughput
from shoal.pipeline.tp_group import TensorGroup
from shoal.pipeline.window import WindowedSpan, load_bounded_span
from shoal.state.document import SwarmState
from shoal.state.store import load_state, state_path
from shoal.state.sync import StateSync, SyncConfig
from shoal.state.views import coverage, models, roster
from shoal.transport.host import Host, HostConfig, open_host
from shoal.transport.identity import load_or_create_identity
from shoal.transport.nat import NatService
from shoal.transport.peering import Peering, PeeringConfig, PeerTable
from shoal.transport.ping import call_ping, serve_ping
from shoal.transport.swarmkey import read_swarm_key

if TYPE_CHECKING:
    # trio-typing's stale stubs (pulled in by libp2p) shadow trio's own types.
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

PEERS_FILE = "peers.json"
RUNTIME_FILE = "node.json"


@dataclass
class Node:
    """The running node, as the API and the CLI see it."""

    config: NodeConfig
    host: Host
    peering: Peering
    sync: StateSync
    nat: NatService
    discovery: Discovery
    client: SwarmClient
    api_url: str | None = None
    server: SpanServer | None = None
    tp_group: TensorGroup | None = None

    def status(self) -> dict[str, Any]:
        return {
            "peer_id": str(self.host.peer_id),
            "version": __version__,
            "swarm": self.config.swarm,
            "private_swarm": self.config.swarm_key is not None,
            "relay_service": self.config.relay,
            "addrs": self.host.advertised_addrs(),
            "listen_addrs": self.host.listen_addrs(),
            "reachability": self.host.reachability.value,
            "api": self.api_url,
            "dht": self.discovery.status(),
            "peers": [
                {"peer_id": link.peer_id, "addrs": list(link.addrs), "relayed": link.relayed}
                for link in self.host.links()
            ],
            "relay_reservations": [
                {"relay": slot.relay, "addrs": list(slot.addrs)} for slot in self.nat.reservations()
            ],
            "hole_punches": {
                peer: {
                    "state": str(outcome.state),
                    "attempts": outcome.attempts,
                    "seconds": outcome.took,
                }
                for peer, outcome in self.nat.punches().items()
            },
            "tp_group": self.tp_group.info() if self.tp_group is not None else None,
        }

    def swarm(self) -> dict[str, Any]:
        """The swarm as the shared state describes it: peers, models, block coverage."""
        state = self.sync.state
        entries = roster(state, self.sync.liveness.online(trio.current_time()))
        registry = models(state)
        return {
            "swarm": self.config.swarm,
            "state_digest": state.digest(),
            "rejected_updates": self.sync.rejected,
            "peers": [entry.to_json() for entry in entries],
            "models": {
                model_id: {
                    "num_blocks": record.num_blocks,
                    "registered_by": record.author,
                    "servers_per_block": [len(servers) for servers in coverage(record, entries)],
                }
                for model_id, record in registry.items()
            },
        }

    def own_roster_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "addrs": self.host.advertised_addrs(),
            "reachability": self.host.reachability.value,
            "version": __version__,
            "device": local_device(),
        }
        if self.server is not None:
            fields["spans"] = {self.server.model_id: [self.server.start, self.server.end]}
            fields["throughput"] = round(self.server.throughput, 1)
            fields["free_cache_tokens"] = self.server.free_cache_tokens()
            fields["load"] = round(self.server.load(), 3)
        return fields

    def registered_models(self) -> list[str]:
        """Model ids the swarm state registers, this node's own first."""
        own = [self.server.model_id] if self.server is not None else []
        return own + [m for m in models(self.sync.state) if m not in own]

    async def dht_servers(self, model_id: str, num_blocks: int) -> dict[str, Any]:
        """Which live servers the DHT lists for each block of a model, and their records."""
        view = await self.discovery.model_view(model_id, num_blocks)
        records = {
            peer: self.discovery.server_record_cached(peer) for peer in {p for b in view for p in b}
        }
        return {
            "model": model_id,
            "blocks": view,
            "servers": {peer: _record_json(r) for peer, r in records.items() if r is not None},
        }

    async def dht_blob(self, sha256: str) -> dict[str, Any]:
        holders = await self.discovery.find_blob(sha256)
        return {"sha256": sha256, "holders": {r.peer_id: _record_json(r) for r in holders}}

    def dht_announce(self, body: dict[str, Any]) -> dict[str, Any]:
        """Announce (or with ``withdraw``, stop announcing) a span or a blob."""
        withdraw = bool(body.get("withdraw", False))
        blob, model = body.get("blob"), body.get("model")
        try:
            if isinstance(blob, str):
                if withdraw:
                    self.discovery.withdraw_blob(blob)
                else:
                    self.discovery.announce_blob(blob)
            elif isinstance(model, str):
                if withdraw:
                    self.discovery.withdraw(model)
                else:
                    start, end = body.get("start"), body.get("end")
                    if not (isinstance(start, int) and isinstance(end, int)):
                        raise NodeError("start and end must be integers, with 0 <= start < end")
                    self.discovery.announce(model, start, end)
            else:
                raise NodeError('expected {"model": M, "start": A, "end": B} or {"blob": SHA256}')
        except ValueError as exc:  # Discovery's own checks: span and hash
            raise NodeError(str(exc)) from exc
        return self.discovery.status()

    async def ping(self, peer: str, size: int, seed: int, *, bulk: bool = False) -> dict[str, Any]:
        try:
            peer_id = ID.from_base58(peer)
        except Exception as exc:
            raise NodeError(f"{peer!r} is not a peer id") from exc
        payload = random.Random(seed).randbytes(size)
        result = await call_ping(self.host, peer_id, payload, bulk=bulk)
        return {
            "peer": result.peer,
            "bytes": result.size,
            "seed": seed,
            "seconds": result.seconds,
            "sent_sha256": result.sent_sha256,
            "remote_sha256": result.remote_sha256,
            "echoed_sha256": result.echoed_sha256,
            "intact": result.intact,
            "via": result.via,
        }


def _record_json(record: ServerRecord) -> dict[str, Any]:
    return {
        "spans": {m: list(s) for m, s in sorted(record.spans.items())},
        "blobs": list(record.blobs),
        "addrs": list(record.addrs),
        "expires": record.expires,
        "seq": record.seq,
    }


def _load_peers(path: Path, table: PeerTable) -> None:
    try:
        table.load_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


async def run_node(
    config: NodeConfig, *, task_status: TaskStatus[Node] = trio.TASK_STATUS_IGNORED
) -> None:
    key_pair = load_or_create_identity(config.data_dir)
    psk = read_swarm_key(config.swarm_key) if config.swarm_key else None
    host_config = HostConfig(
        key_pair=key_pair,
        listen=config.listen,
        announce=config.announce,
        psk=psk,
        bulk=config.bulk,
    )
    # The saved state is there before any networking: a restarted node shows it at once.
    state = SwarmState(config.swarm, key_pair)
    saved = state_path(config.data_dir, config.swarm)
    log.info("loaded %d saved state update(s)", load_state(state, saved))
    async with open_host(host_config) as host:
        table = PeerTable(str(host.peer_id))
        _load_peers(config.data_dir / PEERS_FILE, table)
        peering = Peering(
            host,
            PeeringConfig(bootstrap=config.bootstrap, target_peers=config.target_peers),
            table,
        )
        sync = StateSync(host, state, saved, SyncConfig(offline_after=config.offline_after))
        nat = NatService(host, relay_hop=config.relay)
        discovery = Discovery(
            host, config.swarm, key_pair, DiscoveryConfig(refresh_interval=config.dht_refresh)
        )
        chain = ChainConfig(step_timeout=config.step_timeout, route_timeout=config.route_timeout)
        client = SwarmClient(RemoteSwarm(host, discovery, chain))
        node = Node(config, host, peering, sync, nat, discovery, client)
        try:
            async with trio.open_nursery() as nursery:
                serve_ping(host)
                await nursery.start(peering.run)
                await nursery.start(nat.run)
                await nursery.start(sync.run)
                await nursery.start(discovery.run)
                if config.model is not None and config.tp_group is not None:
                    node.server = await nursery.start(serve_tp_member, node)
                elif config.model is not None:
                    node.server = await nursery.start(serve_model, node)
                nursery.start_soon(_publish_roster, node)
                if config.api is not None:
                    backend = SwarmBackend(client, node.registered_models)
                    await nursery.start(backend.run)
                    routes = openai_routes(backend, api_key=config.api_key)
                    app = build_api(node, extra_routes=routes)
                    node.api_url = await nursery.start(serve_api, app, config.api)
                _write_json(config.data_dir / RUNTIME_FILE, node.status() | {"pid": os.getpid()})
                log.info(
                    "node %s up; %d bootstrap address(es)", host.peer_id, len(config.bootstrap)
                )
                task_status.started(node)
        finally:
            _write_json(config.data_dir / PEERS_FILE, table.to_json())
            with suppress(FileNotFoundError):
                (config.data_dir / RUNTIME_FILE).unlink()
            log.info("node %s stopped; state saved in %s", host.peer_id, config.data_dir)


ROSTER_CHECK_INTERVAL = 2.0
#: Seconds a node with ``--blocks auto`` listens to the swarm state before it picks.
AUTO_LISTEN = 3.0


async def serve_model(node: Node, *, task_status: TaskStatus[SpanServer]) -> None:
    """Load this node's span of ``--model``, measure it, serve it and announce it."""
    config = node.config
    assert config.model is not None
    threads = set_torch_threads(config)
    log.info("torch uses %d compute thread(s) of %s core(s)", threads, os.cpu_count())
    checkpoint = await trio.to_thread.run_sync(open_checkpoint, config.model)
    model_id = config.model_id or model_name(config.model)
    num_blocks = checkpoint.config.num_layers
    start, end = await _pick_span(node, model_id, num_blocks)
    span = Span(start=start, end=end, embed=start == 0, head=end == num_blocks)
    log.info("loading blocks %d:%d of %s (%d blocks)", start, end, model_id, num_blocks)
    max_memory = None if config.max_memory is None else parse_size(config.max_memory)
    weights = await trio.to_thread.run_sync(
        lambda: load_bounded_span(
            checkpoint,
            span,
            max_memory=max_memory,
            dtype=config.dtype,
            quantize=config.weight_quantization,
        )
    )
    throughput = await trio.to_thread.run_sync(measure_throughput, weights)
    files = await trio.to_thread.run_sync(ModelFiles.read, checkpoint.directory)
    server = SpanServer(
        node.host,
        model_id,
        weights,
        files,
        config.server_config(),
        throughput=throughput,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            node.discovery.announce(model_id, start, end)
            node.sync.write("models", model_id, {"num_blocks": num_blocks})
            log.info("serving blocks %d:%d of %s at %.1f steps/s", start, end, model_id, throughput)
            task_status.started(server)
    finally:
        if isinstance(weights, WindowedSpan):  # stops its prefetch thread
            weights.close()


def set_torch_threads(config: NodeConfig) -> int:
    """Give torch ``--threads`` threads (default: a core less than the machine has)."""
    threads = config.compute_threads(os.cpu_count())
    torch.set_num_threads(threads)
    return threads


def model_name(model: str) -> str:
    """The id a model is announced under: a built-in's name, else its directory's name."""
    if model in builtin_models():
        return model
    return resolve_model(model).resolve().name


async def _pick_span(node: Node, model_id: str, num_blocks: int) -> tuple[int, int]:
    assert node.config.blocks is not None or node.config.model is not None
    choice = parse_blocks(node.config.blocks or "auto")
    if isinstance(choice, tuple):
        start, end = choice
        if end > num_blocks:
            raise NodeError(
                f"--blocks {start}:{end} is past the end of {model_id}, which has "
                f"{num_blocks} blocks (0:{num_blocks})"
            )
        return start, end
    length = min(num_blocks, choice if choice is not None else math.ceil(num_blocks / 3))
    await trio.sleep(AUTO_LISTEN)  # hear the roster first
    throughput = [0.0] * num_blocks
    online = node.sync.liveness.online(trio.current_time())
    for entry in roster(node.sync.state, online):
        span = entry.spans.get(model_id)
        if entry.online and span is not None and entry.peer_id != node.sync.state.me:
            for block in range(span[0], min(span[1], num_blocks)):
                throughput[block] += entry.throughput or 1.0
    start = choose_span(throughput, length)
    log.info(
        "--blocks auto: blocks %d:%d (served throughput %s)", start, start + length, throughput
    )
    return start, start + length


async def _publish_roster(node: Node) -> None:
    """Write this node's roster fields whenever one of them changes."""
    written: dict[str, Any] = dict(node.sync.state.section("peer").get(node.sync.state.me, {}))
    while True:
        for key, value in node.own_roster_fields().items():
            if written.get(key) != value:
                node.sync.write("peer", key, value)
                written[key] = value
        await trio.sleep(ROSTER_CHECK_INTERVAL)


def local_device() -> dict[str, Any]:
    """What this machine offers; the model-runtime issue adds GPU detection."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 0
    return {
        "kind": "cpu",
        "name": os.uname().machine,
        "memory_bytes": memory,
        "cores": os.cpu_count() or 1,
    }
