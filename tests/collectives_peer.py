"""One peer process of the multi-process collectives tests (run by test_collectives_driver.py).

``python tests/collectives_peer.py CONFIG.json``. The config names this peer, the shared
directory and the group; the process opens a libp2p host on loopback, publishes its
address in ``<dir>/<name>.addr.json``, dials the peers listed before it, waits until it is
connected to every other peer, runs the configured operations concurrently through
:class:`CollectivesDriver`, writes each result to ``<dir>/<name>.<op>.bin`` (raw fp32) and
a summary to ``<dir>/<name>.out.json``, then keeps serving until ``<dir>/exit`` appears.

Fault hooks (deterministic, inside the victim): ``kill`` = {"type": T, "index": k} makes
the process SIGKILL itself just before writing its k-th frame of type T (0-based);
``bad`` = "nan" | "shape" makes a member send a crafted bad contribution instead of its
own; ``outsider`` = true makes a non-member send frames to every member. Contributions
are ``randn(size)`` from seed ``seed * 1000 + position in the peers list``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from peer_files import poll, read_json, write_json

from shoal.collectives import AllReduce, AllReduceResult, Member, Send, View, make_view, wire
from shoal.collectives.codec import encode_chunk
from shoal.collectives.driver import CollectivesDriver, DriverConfig, open_collectives
from shoal.transport.framing import PREFIX_SIZE
from shoal.transport.host import HostConfig, open_host


def contribution(seed: int, position: int, size: int) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed * 1000 + position))


def _write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _frame_type(data: bytes) -> str:
    hlen = int.from_bytes(data[:PREFIX_SIZE], "big")
    return str(wire.header_of("me", data[: PREFIX_SIZE + hlen])["t"])


async def main(cfg: dict[str, Any]) -> None:
    root = Path(cfg["dir"])
    name: str = cfg["name"]
    names: list[str] = cfg["peers"]
    members: list[str] = cfg["members"]
    me_pos = names.index(name)
    kill = cfg.get("kill")
    counts: dict[str, int] = {}

    def before_send(to: str, data: bytes) -> None:
        if not kill:
            return
        kind = _frame_type(data)
        n = counts.get(kind, 0)
        counts[kind] = n + 1
        if kind == kill["type"] and n == kill["index"]:
            os.kill(os.getpid(), signal.SIGKILL)

    config = HostConfig(key_pair=create_new_key_pair(), listen=("/ip4/127.0.0.1/tcp/0",))
    driver_config = DriverConfig(deadline=cfg.get("deadline", 5.0), timeout=cfg.get("timeout", 60))
    async with (
        open_host(config) as host,
        open_collectives(host, driver_config, before_send=before_send) as driver,
    ):
        write_json(
            root / f"{name}.addr.json", {"peer_id": driver.me, "addr": host.listen_addrs()[0]}
        )
        info = {n: await poll(partial(read_json, root / f"{n}.addr.json"), 60) for n in names}
        for other in names[:me_pos]:
            await host.connect(info[other]["addr"])
        others = [host_id(info[n]) for n in names if n != name]
        await poll(lambda: all(host.is_connected(p) for p in others), 60)
        ids = {n: info[n]["peer_id"] for n in names}
        names_of = {v: k for k, v in ids.items()}
        size = int(cfg["size"])
        out: dict[str, Any] = {"peer_id": driver.me, "ids": ids, "ops": {}}
        views = {
            spec["tag"]: make_view(
                spec["tag"], [Member(ids[m]) for m in members], (size,), codec=spec["codec"]
            )
            for spec in cfg["ops"]
        }
        x = contribution(cfg["seed"], me_pos, size)

        def rejections() -> list[list[Any]]:
            found = list(driver.mux.rejections)
            for tag in views:
                op = driver.operation(tag)
                found += op.rejections if op is not None else []
            return [
                [type(r).__name__, names_of.get(r.peer, r.peer), getattr(r, "field", None)]
                for r in found
            ]

        if name not in members:  # an outsider: frames that every member must refuse
            total = 0
            for view in views.values():
                header, payload = encode_chunk(x[:8], view.codec, view.block)
                frame = wire.encode("DATA", view.tag, view.vh, {"c": 0, "x": header}, payload)
                driver.send_nowait([Send(ids[m], frame) for m in members])
                total += len(members) * len(frame)
            await poll(lambda: driver.bytes_sent >= total, 30)
        elif cfg.get("wait_for"):
            await poll((root / f"{cfg['wait_for']}.out.json").exists, 60)

        async def run_op(view: View, spec: dict[str, Any]) -> None:
            record: dict[str, Any] = {}
            try:
                if cfg.get("bad"):
                    result = await bad_member(driver, view, x, cfg["bad"])
                else:
                    result = await driver.all_reduce(view, x, star=spec.get("star", False))
                _write_bytes(
                    root / f"{name}.{view.tag.replace('/', '_')}.bin",
                    result.tensor.numpy().tobytes(),
                )
                record["sha256"] = result.digest.hex()
                record["contributors"] = sorted(names_of[p] for p in result.contributors)
            except Exception as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
            out["ops"][view.tag] = record

        if name in members:
            async with trio.open_nursery() as nursery:
                for spec in cfg["ops"]:
                    nursery.start_soon(run_op, views[spec["tag"]], spec)
        out["bytes_sent"] = driver.bytes_sent
        write_json(root / f"{name}.out.json", out)
        # keep serving (retained chunks) until the test has every outcome
        await poll((root / "exit").exists, 120)
        write_json(root / f"{name}.final.json", {"rejections": rejections()})


def host_id(info: dict[str, Any]) -> ID:
    return ID.from_base58(info["peer_id"])


async def bad_member(
    driver: CollectivesDriver, view: View, x: torch.Tensor, kind: str
) -> AllReduceResult:
    """Take part in the operation, but send every owner a crafted bad contribution (the
    local ``contribute`` would refuse it before sending)."""
    op = AllReduce(view, driver.me)

    def begin() -> list[Send]:
        sends: list[Send] = []
        for c in range(view.n_chunks):
            owner = view.owner(c, view.peers)
            assert owner is not None
            lo, hi = view.chunk(c)
            chunk = x[lo:hi].clone()
            if kind == "nan":
                chunk[0] = float("nan")
            else:  # a chunk one element short, announced as such
                chunk = chunk[:-1]
            header, payload = encode_chunk(chunk, view.codec, view.block)
            frame = wire.encode("DATA", view.tag, view.vh, {"c": c, "x": header}, payload)
            if owner == driver.me:
                sends += op.receive(driver.me, frame)  # refused by itself, like by the others
            else:
                sends.append(Send(owner, frame))
        return sends

    return await driver.run_operation(op, begin)


if __name__ == "__main__":
    started = time.monotonic()
    trio.run(main, json.loads(Path(sys.argv[1]).read_text()))
