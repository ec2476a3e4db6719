"""``shoal train``: a DiLoCo run from the command line, with a progress bar.

Swarm mode runs a node (the daemon without its HTTP API: host, peering, swarm state, DHT)
plus the collectives driver and a :class:`~shoal.training.run.TrainingRun`; without
``--bootstrap`` it founds the run and prints the address others join through. ``--local``
runs the same inner and outer steps with this process as the only member, for comparison.
Both checkpoint every round to ``<data dir>/train/<run>/checkpoint.safetensors`` and
resume from it.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import trio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shoal.collectives.codec import CODECS
from shoal.collectives.driver import open_collectives
from shoal.node.config import NodeConfig
from shoal.node.errors import NodeError, run_trio
from shoal.pipeline.loading import load_span, load_tokenizer, open_checkpoint
from shoal.pipeline.model import DecoderSpan, Span
from shoal.training.checkpoint import checkpoint_path, load_checkpoint
from shoal.training.data import Batches, byte_tokens, held_out_loss, shard, split_held_out
from shoal.training.diloco import DilocoConfig, DilocoPeer
from shoal.training.init import init_weights
from shoal.training.run import RunConfig, RunEvent, TrainingRun, run_local
from shoal.training.runlog import SECTION, RoundRecord, run_entry
from shoal.transport.logs import route_libp2p_logs
from shoal.transport.nat import NatService

BYTE_VOCAB = 258  # 256 bytes, BOS, EOS: shoal-tiny's byte-level tokenizer


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """What ``shoal train`` was asked to do (see the command's help for each)."""

    run: str
    data: Path
    model: str = "shoal-tiny"
    inner_steps: int = 50
    rounds: int | None = None
    shard: int = 0
    shards: int = 1
    codec: str = "fp32"
    batch: int = 8
    seq: int = 128
    inner_lr: float = 1e-3
    warmup: int = 0
    decay: bool = False
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    scratch: bool = False
    min_peers: int = 1
    quorum: int = 1
    seed: int = 0


def check_options(options: TrainOptions) -> None:
    """Refuse unusable options with a message that says what to do instead."""
    if not 0 <= options.shard < options.shards:
        raise NodeError(f"--shard {options.shard} must be in 0..{options.shards - 1} (--shards)")
    if options.codec not in CODECS:
        raise NodeError(f"--codec {options.codec}: use one of {', '.join(CODECS)}")
    if options.inner_steps < 1 or options.batch < 1 or options.seq < 2:
        raise NodeError("--inner-steps, --batch must be >= 1 and --seq >= 2")
    if options.rounds is not None and options.rounds < 1:
        raise NodeError("--rounds must be >= 1 (leave it out to train until Ctrl-C)")
    if options.warmup < 0 or (options.decay and options.rounds is None):
        raise NodeError("--warmup must be >= 0, and --decay needs --rounds (when to reach 10 %)")
    if options.min_peers < 1 or options.quorum < 1:
        raise NodeError("--min-peers and --quorum must be >= 1")
    if not (options.outer_lr > 0 and 0 <= options.outer_momentum < 1):
        raise NodeError("--outer-lr must be > 0 and --outer-momentum in [0, 1)")


def build_peer(options: TrainOptions) -> tuple[DilocoPeer, torch.Tensor]:
    """The model (fp32), this peer's shard of the data as batches, and the held-out tokens."""
    check_options(options)
    try:
        raw = options.data.read_bytes()
    except OSError as exc:
        raise NodeError(
            f"cannot read --data {options.data}: {exc.strerror or exc}; pass a text file"
        ) from exc
    checkpoint = open_checkpoint(options.model)
    config = checkpoint.config
    if options.seq > config.max_position_embeddings:
        raise NodeError(
            f"--seq {options.seq} is longer than the model's context "
            f"({config.max_position_embeddings}); pass a smaller --seq"
        )
    if config.vocab_size == BYTE_VOCAB:
        tokens = byte_tokens(raw)
    else:
        tokenizer = load_tokenizer(checkpoint)
        tokens = torch.tensor(tokenizer.encode(raw.decode("utf-8", "replace")), dtype=torch.long)
    train, held = split_held_out(tokens)
    mine = shard(train, options.shard, options.shards)
    if mine.numel() < options.seq + 2 or held.numel() < options.seq + 1:
        raise NodeError(
            f"--data {options.data} is too small: shard {options.shard} of {options.shards} "
            f"holds {mine.numel()} tokens (held out: {held.numel()}), a window needs "
            f"{options.seq + 2}; use a larger file, fewer --shards or a smaller --seq"
        )
    digest = hashlib.sha256(f"{options.run}/{options.shard}/{options.seed}".encode()).digest()
    batches = Batches(
        mine, batch=options.batch, seq=options.seq, seed=int.from_bytes(digest[:8], "little")
    )
    if options.scratch:
        model = DecoderSpan(config, Span.full(config))
        if config.tie_word_embeddings:
            model.tie_weights()
        init_seed = hashlib.sha256(f"{options.run}/init/{options.seed}".encode()).digest()
        init_weights(model, int.from_bytes(init_seed[:8], "little"), config.num_layers)
        model.train()
    else:
        model = load_span(checkpoint, dtype=torch.float32).train()
    diloco = DilocoConfig(
        inner_steps=options.inner_steps,
        inner_lr=options.inner_lr,
        outer_lr=options.outer_lr,
        outer_momentum=options.outer_momentum,
        warmup_steps=options.warmup,
        decay_steps=options.rounds * options.inner_steps
        if options.decay and options.rounds is not None
        else None,
    )
    return DilocoPeer(model, batches, diloco, run_id=options.run), held


class TrainProgress:
    """A rich progress bar over rounds: loss, round, peers, bytes sent, what runs now."""

    def __init__(self, console: Console, rounds: int | None, start: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]round {task.completed}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("peers {task.fields[peers]}"),
            TextColumn("sent {task.fields[sent]}"),
            TextColumn("{task.fields[phase]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(
            "train", total=rounds, completed=start, loss="-", peers="-", sent="0 B", phase=""
        )
        self.sent = 0
        self.records: list[RoundRecord] = []

    def __call__(self, event: RunEvent) -> None:
        fields: dict[str, Any] = {"phase": event.detail}
        if event.peers:
            fields["peers"] = str(event.peers)
        if event.kind == "round" and event.record is not None:
            record = event.record
            self.records.append(record)
            self.sent += record.bytes_sent
            loss = "-" if math.isnan(record.loss) else f"{record.loss:.4f}"
            retry = f" ({event.attempts} attempts)" if event.attempts > 1 else ""
            fields |= {"loss": loss, "sent": _size(self.sent), "phase": f"done{retry}"}
            self.progress.update(self.task, completed=record.round, **fields)
        elif event.kind == "sync":
            fields["phase"] = f"synced round {event.round} ({event.detail[:12]}…)"
            self.progress.update(self.task, completed=event.round, **fields)
        else:
            self.progress.update(self.task, **fields)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def train_local(options: TrainOptions, data_dir: Path, console: Console) -> dict[str, Any]:
    """``shoal train --local``: the rounds in this process alone; resumes a checkpoint."""
    peer, held = build_peer(options)
    path = checkpoint_path(data_dir, options.run)
    resumed = load_checkpoint(path, peer)
    start = peer.state.round
    if resumed:
        console.print(f"resuming run {options.run} at round {start} from {path}")
    rounds = options.rounds if options.rounds is not None else 2**31 - 1
    if start >= rounds:
        console.print(f"the checkpoint is already at round {start}; pass a larger --rounds")
    progress = TrainProgress(console, options.rounds, start)
    with progress.progress:
        run_trio(lambda: run_local(peer, rounds, checkpoint=path, events=progress))
    return _summary(peer, held, options, path, start)


def _summary(
    peer: DilocoPeer, held: torch.Tensor, options: TrainOptions, path: Path, start: int
) -> dict[str, Any]:
    loss = held_out_loss(peer.model, held, seq=options.seq, max_windows=64)
    return {
        "run": options.run,
        "start_round": start,
        "round": peer.state.round,
        "state_hash": peer.state.state_hash(),
        "held_out_loss": loss,
        "checkpoint": str(path),
    }


ADDRESS_WAIT = 15.0  # at most, before a joiner gives the run its addresses


async def _addresses_settled(nat: NatService, seconds: float) -> None:
    """Wait until this node knows whether others can reach it and, behind a NAT, holds a
    relayed address (when a peer offers to relay): its READY gives the run's members the
    addresses they dial it at, and peers behind other NATs reach it only through a relay
    (then DCUtR). Without the wait a joiner behind a NAT gave only its private address,
    and the others dropped it from its first round (tests/test_nat.py, the DiLoCo run
    across two NATs)."""
    with trio.move_on_after(seconds):
        # Polling: NatService sets plain attributes, with no event to wait on.
        while not nat.addresses_settled():  # noqa: ASYNC110
            await trio.sleep(0.1)


async def train_swarm(
    options: TrainOptions,
    config: NodeConfig,
    console: Console,
    bootstrap: tuple[str, ...],
) -> dict[str, Any]:
    """``shoal train`` in a swarm: a node, the collectives driver, the run."""
    from shoal.node.daemon import run_node

    peer, held = await trio.to_thread.run_sync(build_peer, options)
    path = checkpoint_path(config.data_dir, options.run)
    resumed = await trio.to_thread.run_sync(load_checkpoint, path, peer)
    start = peer.state.round
    if resumed:
        console.print(f"resuming run {options.run} at round {start} from {path}")
    node_config = replace(config, api=None, model=None, bootstrap=bootstrap)
    async with trio.open_nursery() as nursery:
        node = await nursery.start(run_node, node_config)
        route_libp2p_logs(logging.CRITICAL)  # the host routed them again; keep them quiet
        bootstrap_ids = []
        for addr in bootstrap:
            bootstrap_ids.append(str(await node.host.connect(addr)))
        if bootstrap:
            await _addresses_settled(node.nat, ADDRESS_WAIT)
        if not bootstrap:
            console.print(
                f"founded run {options.run}; other peers join with:\n"
                + "\n".join(
                    f"  shoal train --bootstrap {a} --run {options.run} --data FILE"
                    for a in node.host.advertised_addrs()
                ),
                soft_wrap=True,
                highlight=False,
            )

        def publish(record: RoundRecord) -> None:
            own = node.sync.state.section(SECTION).get(node.sync.state.me, {})
            node.sync.write(SECTION, record.run_id, run_entry(record, own.get(record.run_id)))

        progress = TrainProgress(console, options.rounds, start)
        async with open_collectives(node.host) as driver:
            run = TrainingRun(
                node.host,
                driver,
                peer,
                RunConfig(
                    run_id=options.run,
                    rounds=options.rounds,
                    codec=options.codec,
                    min_members=options.min_peers,
                    quorum=options.quorum,
                ),
                checkpoint=path,
                publish=publish,
                events=progress,
            )
            with progress.progress:
                await run.run(bootstrap_ids)
        nursery.cancel_scope.cancel()
    summary = _summary(peer, held, options, path, start)
    summary["bytes_sent"] = run.bytes_sent
    summary["syncs"] = len(run.syncs)
    return summary


__all__ = ["TrainOptions", "TrainProgress", "build_peer", "train_local", "train_swarm"]
