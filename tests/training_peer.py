"""Helpers of the training tests (a tiny byte-level model, the corpus), and one peer
process of the multi-process DiLoCo test: ``python tests/training_peer.py CONFIG.json``.

The config names this peer, the shared directory and the group; the process opens a
libp2p host on loopback, publishes its address in ``<dir>/<name>.addr.json``, dials the
peers listed before it, runs ``rounds`` DiLoCo rounds through the collectives driver on
its own shard of the corpus, writes its round records to ``<dir>/<name>.out.json``, and
keeps serving until ``<dir>/exit`` appears.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from peer_files import poll, read_json, write_json
from safetensors.torch import save_file

from shoal.collectives import Member
from shoal.collectives.driver import DriverConfig, open_collectives
from shoal.pipeline.config import ModelConfig
from shoal.pipeline.loading import checkpoint_names
from shoal.pipeline.model import DecoderSpan, Span
from shoal.training.data import Batches, byte_tokens, held_out_loss, shard, split_held_out
from shoal.training.diloco import DilocoConfig, DilocoPeer
from shoal.training.run import RunConfig, RunEvent, TrainingRun
from shoal.training.runlog import RoundRecord
from shoal.training.swarm import swarm_round
from shoal.transport.host import HostConfig, open_host

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"

#: 2 blocks, dim 64, byte-level (258 tokens: 256 bytes, BOS, EOS), like shoal-tiny but small.
TINY = ModelConfig(
    vocab_size=258,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)


def tiny_model(seed: int = 0, config: ModelConfig = TINY) -> DecoderSpan:
    """The same initial weights for the same seed (every peer of a run starts from them)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DecoderSpan(config, Span.full(config))
        if config.tie_word_embeddings:
            model.tie_weights()
    return model


def write_checkpoint(directory: Path, config: ModelConfig = TINY) -> Path:
    """A tiny random model as a Hugging Face checkpoint directory (config + safetensors)."""
    directory.mkdir(exist_ok=True)
    model = tiny_model(3, config)
    (directory / "config.json").write_text(json.dumps(config.to_hf()))
    names = checkpoint_names(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.state_dict().items():  # a tied head is the embedding
        tensors.setdefault(names[name], param.detach().clone().contiguous())
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


# ---- the multi-process worker: ``python tests/training_peer.py CONFIG.json`` ----------


def stop_processes(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """Wait for test processes to exit (after the test wrote their exit file); kill the rest."""
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def make_peer(
    index: int,
    count: int,
    *,
    inner_steps: int,
    seed: int,
    run_id: str = "run-mp",
    batch_seed: int | None = None,
) -> DilocoPeer:
    """Peer ``index`` of ``count``: the shared initial model, its own shard of the corpus."""
    train, _ = split_held_out(byte_tokens(CORPUS.read_bytes()))
    batch_seed = seed * 100 + index if batch_seed is None else batch_seed
    batches = Batches(shard(train, index, count), batch=4, seq=32, seed=batch_seed)
    config = DilocoConfig(inner_steps=inner_steps, inner_lr=3e-3)
    return DilocoPeer(tiny_model(seed), batches, config, run_id=run_id)


def held_out(model: torch.nn.Module) -> float:
    """Held-out loss of the corpus's tail (64 windows of 32 bytes), nats/byte."""
    _, tokens = split_held_out(byte_tokens(CORPUS.read_bytes()))
    return held_out_loss(model, tokens, seq=32, max_windows=64)


async def main(cfg: dict[str, Any]) -> None:
    """Open a host, meet the others (addresses through files), run the rounds, report."""
    torch.set_num_threads(1)
    root, name, names = Path(cfg["dir"]), cfg["name"], cfg["peers"]
    me = names.index(name)
    peer = make_peer(me, len(names), inner_steps=cfg["inner_steps"], seed=cfg["seed"])
    host_config = HostConfig(key_pair=create_new_key_pair(), listen=("/ip4/127.0.0.1/tcp/0",))
    async with (
        open_host(host_config) as host,
        open_collectives(host, DriverConfig(deadline=10.0, timeout=90.0)) as driver,
    ):
        write_json(
            root / f"{name}.addr.json", {"peer_id": driver.me, "addr": host.listen_addrs()[0]}
        )
        info = {n: await poll(partial(read_json, root / f"{n}.addr.json"), 60) for n in names}
        for other in names[:me]:
            await host.connect(info[other]["addr"])
        others = [ID.from_base58(info[n]["peer_id"]) for n in names if n != name]
        await poll(lambda: all(host.is_connected(p) for p in others), 60)
        members = [Member(info[n]["peer_id"]) for n in names]
        rounds = []
        for _ in range(cfg["rounds"]):
            record = await swarm_round(peer, driver, members)
            rounds.append(record.to_data())
        out = {"peer_id": driver.me, "rounds": rounds, "state_hash": peer.state.state_hash()}
        write_json(root / f"{name}.out.json", out)
        await poll((root / "exit").exists, 120)  # keep serving FETCH until everyone is done


# ---- a peer of a whole run (``"mode": "run"``): TrainingRun, churn, joiners ---------


class _GatedRun(TrainingRun):
    """A run whose peer waits before round ``hold_round`` until ``<dir>/release`` exists
    (the test lets a joiner register first). With ``kill_round``, the peer SIGKILLs
    itself at its first all-reduce frame of that round if it is then the lowest-id member
    (``"kill": "coordinator"``) or the highest (``"member"``)."""

    hold_round: int | None = None
    gate: Path | None = None

    async def round(self) -> RoundRecord:
        if self.gate is not None and self.peer.state.round + 1 == self.hold_round:
            await poll(self.gate.exists, 600)
        return await super().round()


async def main_run(cfg: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for name in ("shoal.training", "shoal.collectives"):
        logging.getLogger(name).setLevel(logging.INFO)
    root, name = Path(cfg["dir"]), cfg["name"]
    peer = make_peer(
        cfg["shard"],
        cfg["shards"],
        inner_steps=cfg["inner_steps"],
        seed=cfg["seed"],
        run_id="run-churn",
        batch_seed=cfg.get("batch_seed"),
    )
    records: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    holder: dict[str, TrainingRun] = {}

    def kill_hook(to: str, frame: bytes) -> None:
        run = holder.get("run")
        if run is None or cfg.get("kill_round") is None:
            return
        victim = min(run.members) if cfg.get("kill") == "coordinator" else max(run.members)
        if run.peer.state.round + 1 == cfg["kill_round"] and run.me == victim:
            os.kill(os.getpid(), signal.SIGKILL)

    def report() -> None:
        run = holder["run"]
        out = {
            "peer_id": run.me,
            "rounds": records,
            "events": events,
            "syncs": [dataclasses.asdict(s) for s in run.syncs],
            "attempts": run.attempts,
            "state_hash": run.peer.state.state_hash(),
        }
        write_json(root / f"{name}.out.json", out)

    def on_event(event: RunEvent) -> None:
        if event.kind == "round" and event.record is not None:
            records.append(event.record.to_data())
        elif event.kind == "sync" or event.detail in ("joined", "done"):
            events.append({"kind": event.kind, "round": event.round, "detail": event.detail})
        else:
            return
        report()

    # "key_seed": a fixed identity (a peer restarted with the identity it had)
    seed = cfg.get("key_seed")
    key_pair = create_new_key_pair(bytes.fromhex(seed) if seed else None)
    host_config = HostConfig(key_pair=key_pair, listen=("/ip4/127.0.0.1/tcp/0",))
    async with (
        open_host(host_config) as host,
        open_collectives(
            host, DriverConfig(deadline=10.0, timeout=300.0), before_send=kill_hook
        ) as driver,
    ):
        run = _GatedRun(
            host,
            driver,
            peer,
            RunConfig(
                run_id="run-churn",
                rounds=cfg["rounds"],
                min_members=cfg.get("min_members", 1),
                ready_timeout=120.0,
                part_bytes=64 << 10,
                linger=0.0,
            ),
            events=on_event,
        )
        run.hold_round = cfg.get("hold_round")
        run.gate = root / "release" if run.hold_round else None
        holder["run"] = run
        write_json(root / f"{name}.addr.json", {"peer_id": run.me, "addr": host.listen_addrs()[0]})
        bootstrap = []
        if cfg.get("bootstrap"):
            info = await poll(partial(read_json, root / f"{cfg['bootstrap']}.addr.json"), 300)
            await host.connect(info["addr"])
            bootstrap = [info["peer_id"]]
        async with trio.open_nursery() as nursery:
            await nursery.start(run.run, bootstrap)
        out = {"held_out": held_out(peer.model)}
        report()
        write_json(root / f"{name}.final.json", out)
        await poll((root / "exit").exists, 600)  # keep serving until everyone is done


if __name__ == "__main__":
    config = json.loads(Path(sys.argv[1]).read_text())
    trio.run(main_run if config.get("mode") == "run" else main, config)
