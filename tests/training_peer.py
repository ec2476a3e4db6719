"""Helpers of the training tests (a tiny byte-level model, the corpus), and one peer
process of the multi-process DiLoCo test: ``python tests/training_peer.py CONFIG.json``.

The config names this peer, the shared directory and the group; the process opens a
libp2p host on loopback, publishes its address in ``<dir>/<name>.addr.json``, dials the
peers listed before it, runs ``rounds`` DiLoCo rounds through the collectives driver on
its own shard of the corpus, writes its round records to ``<dir>/<name>.out.json``, and
keeps serving until ``<dir>/exit`` appears.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from shoal.collectives import Member
from shoal.collectives.driver import DriverConfig, open_collectives
from shoal.pipeline.config import ModelConfig
from shoal.pipeline.model import DecoderSpan, Span
from shoal.training.data import Batches, byte_tokens, shard, split_held_out
from shoal.training.diloco import DilocoConfig, DilocoPeer
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


# ---- the multi-process worker: ``python tests/training_peer.py CONFIG.json`` ----------


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.rename(path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None


async def _poll(check: Callable[[], Any], seconds: float) -> Any:
    """``check()`` until it returns something truthy (files written by other processes)."""
    with trio.fail_after(seconds):
        while True:
            value = check()
            if value:
                return value
            await trio.sleep(0.05)


def make_peer(index: int, count: int, *, inner_steps: int, seed: int) -> DilocoPeer:
    """Peer ``index`` of ``count``: the shared initial model, its own shard of the corpus."""
    train, _ = split_held_out(byte_tokens(CORPUS.read_bytes()))
    batches = Batches(shard(train, index, count), batch=4, seq=32, seed=seed * 100 + index)
    config = DilocoConfig(inner_steps=inner_steps, inner_lr=3e-3)
    return DilocoPeer(tiny_model(seed), batches, config, run_id="run-mp")


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
        _write_json(
            root / f"{name}.addr.json", {"peer_id": driver.me, "addr": host.listen_addrs()[0]}
        )
        info = {n: await _poll(partial(_read_json, root / f"{n}.addr.json"), 60) for n in names}
        for other in names[:me]:
            await host.connect(info[other]["addr"])
        others = [ID.from_base58(info[n]["peer_id"]) for n in names if n != name]
        await _poll(lambda: all(host.is_connected(p) for p in others), 60)
        members = [Member(info[n]["peer_id"]) for n in names]
        rounds = []
        for _ in range(cfg["rounds"]):
            record = await swarm_round(peer, driver, members)
            rounds.append(record.to_data())
        out = {"peer_id": driver.me, "rounds": rounds, "state_hash": peer.state.state_hash()}
        _write_json(root / f"{name}.out.json", out)
        await _poll((root / "exit").exists, 120)  # keep serving FETCH until everyone is done


if __name__ == "__main__":
    trio.run(main, json.loads(Path(sys.argv[1]).read_text()))
