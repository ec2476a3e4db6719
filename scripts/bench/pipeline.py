"""Pipeline inference benchmark: one process vs a chain of server processes on loopback.

    python scripts/bench/pipeline.py --json pipeline.json

Two parts, greedy, batch 1, a --prompt-tokens prompt then --new-tokens new tokens:

1. ``llama-100m``, a random ~100M-parameter Llama the script builds in a temp dir (the
   config of scripts/bench/model.py): decode tokens/s and time to first token in this
   process (``shoal.pipeline.generate``), then through 2 and 3 ``shoal node`` server
   processes (a bootstrap node besides), with the real client (``shoal.open_client``).
   Target: 3 servers >= 0.85x one process in decode tokens/s.
2. ``shoal-tiny`` (8 blocks, tiny compute, so the network dominates): decode ms per token
   in this process and through 1, 2 and 3 servers; the slope of ms/token over the number
   of servers is the added cost of one more server in the chain. Target: <= 1 ms.

Every process runs --threads torch threads (default 1: the chain's processes take turns,
and a second OpenMP thread only fights the other processes for the cores). Every
generation's tokens are checked against the one-process tokens first: no figure is
reported for wrong output. Time to first token through the swarm is what a client sees:
it includes planning the route (a DHT lookup and an ``info`` round trip to each server),
then the prefill step along the chain. Each figure is the median of --repeats
generations, after one warm-up generation per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shoal.client import open_client  # noqa: E402
from shoal.node.demo import SWARM, DemoSwarm  # noqa: E402
from shoal.pipeline.chain import ChainConfig  # noqa: E402
from shoal.pipeline.generate import GenerationStats, generate  # noqa: E402
from shoal.pipeline.loading import load_span, open_checkpoint  # noqa: E402

TINY = "shoal-tiny"
#: The ~100M-parameter Llama of scripts/bench/model.py: hidden 768, 12 blocks, 12 query /
#: 4 KV heads, SwiGLU 2048, vocabulary 32000, tied embeddings.
LLAMA_100M: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
#: Server spans per chain length; each server holds a contiguous, disjoint part, so every
#: server is on the route.
SPANS = {
    12: {2: ((0, 6), (6, 12)), 3: ((0, 4), (4, 8), (8, 12))},
    8: {1: ((0, 8),), 2: ((0, 4), (4, 8)), 3: ((0, 3), (3, 6), (6, 8))},
}


def make_100m(directory: Path) -> None:
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_100M)).save_pretrained(directory)


def local_run(directory: Path, prompt: list[int], new: int, repeats: int) -> dict[str, Any]:
    """This process: shoal.pipeline.generate on the whole model."""
    model = load_span(open_checkpoint(directory))
    expected = list(generate(model, prompt, max_new_tokens=new))  # also the warm-up
    ttft, decode = [], []
    for _ in range(repeats):
        stats = GenerationStats()
        tokens = list(generate(model, prompt, max_new_tokens=new, stats=stats))
        assert tokens == expected, "one-process generation is not deterministic"
        ttft.append(stats.prefill_seconds)
        decode.append(stats.decode_seconds / (new - 1))
    return {"tokens": expected, **summary(ttft, decode)}


def summary(ttft: Sequence[float], step: Sequence[float]) -> dict[str, Any]:
    """Medians: ttft in ms, decode in ms per token and tokens/s."""
    ms = statistics.median(step) * 1e3
    return {
        "ttft_ms": statistics.median(ttft) * 1e3,
        "decode_ms": ms,
        "decode_tps": 1e3 / ms,
        "decode_ms_all": [s * 1e3 for s in step],
    }


def swarm_run(
    model: str,
    model_id: str,
    spans: Sequence[tuple[int, int]],
    prompt: list[int],
    new: int,
    repeats: int,
    expected: list[int],
    workdir: Path,
) -> dict[str, Any]:
    """A bootstrap node and one server process per span; generations through the client."""
    swarm = DemoSwarm(workdir)
    try:
        boot = swarm.wait_ready(swarm.launch("bootstrap"))
        address = str(boot["addrs"][0])
        servers = [
            swarm.launch(f"server{i}", "--bootstrap", address, "--model", model,
                         "--blocks", f"{a}:{b}")
            for i, (a, b) in enumerate(spans)
        ]  # fmt: skip
        for node in servers:
            swarm.wait_ready(node)
        return trio.run(_generate, address, model_id, len(spans), prompt, new, repeats, expected)
    finally:
        swarm.stop()


async def _generate(
    address: str,
    model_id: str,
    hops: int,
    prompt: list[int],
    new: int,
    repeats: int,
    expected: list[int],
) -> dict[str, Any]:
    chain = ChainConfig(route_timeout=60, model_timeout=60)
    async with open_client([address], swarm=SWARM, chain=chain) as client:
        ttft, decode, hop_ms = [], [], []
        for i in range(repeats + 1):  # the first one is the warm-up
            tokens: list[int] = []
            started = time.perf_counter()
            first = started
            async for token in client.generate_tokens(
                prompt, model=model_id, max_new_tokens=new, stop_ids=()
            ):
                if not tokens:
                    first = time.perf_counter()
                tokens.append(token)
            done = time.perf_counter()
            assert tokens == expected, (
                f"{model_id} on {hops} servers: tokens differ from one process"
            )
            route = client.last_trace.route
            assert len(route) == hops, f"the route has {len(route)} hops, not {hops}"
            if i:
                ttft.append(first - started)
                decode.append((done - first) / (new - 1))
                hop_ms.append([ms for _, ms in client.last_trace.hop_ms])
    return {**summary(ttft, decode), "last_step_hop_ms": hop_ms[len(hop_ms) // 2]}


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--skip-100m", action="store_true", help="only the shoal-tiny part")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server processes
    new = args.new_tokens
    results: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": new,
        "repeats": args.repeats,
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="shoal-bench-pipeline-") as tmp:
        root = Path(tmp)
        models: list[tuple[str, Path, str]] = [(TINY, open_checkpoint(TINY).directory, TINY)]
        if not args.skip_100m:
            big = root / "llama-100m"
            make_100m(big)
            models.insert(0, ("llama-100m", big, str(big)))
        for name, directory, served in models:
            config = open_checkpoint(directory).config
            gen = torch.Generator().manual_seed(0)
            prompt = torch.randint(
                0, min(config.vocab_size, 256), (args.prompt_tokens,), generator=gen
            ).tolist()
            local = local_run(directory, prompt, new, args.repeats)
            rows = [{"model": name, "servers": 0, **local}]
            print(row_text(rows[0], local), flush=True)
            for hops, spans in SPANS[config.num_layers].items():
                row = {
                    "model": name,
                    "servers": hops,
                    **swarm_run(
                        served,
                        directory.name,
                        spans,
                        prompt,
                        new,
                        args.repeats,
                        local["tokens"],
                        root / f"{name}-{hops}",
                    ),
                }
                rows.append(row)
                print(row_text(row, local), flush=True)
            del local["tokens"]
            for row in rows:
                row.pop("tokens", None)
            results["rows"] += rows
    tiny = [r for r in results["rows"] if r["model"] == TINY and r["servers"]]
    results["tiny_ms_per_server"] = slope(
        [r["servers"] for r in tiny], [r["decode_ms"] for r in tiny]
    )
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


def servers_text(n: int) -> str:
    return "one process" if n == 0 else f"{n} server" if n == 1 else f"{n} servers"


def row_text(row: dict[str, Any], local: dict[str, Any]) -> str:
    where = servers_text(row["servers"])
    hops = f"  last step per hop {row['last_step_hop_ms']}" if row["servers"] else ""
    return (
        f"{row['model']:11} {where:12} ttft {row['ttft_ms']:7.1f} ms  decode"
        f" {row['decode_ms']:6.2f} ms/token {row['decode_tps']:7.1f} tok/s"
        f" ({row['decode_tps'] / local['decode_tps']:.2f}x one process){hops}"
    )


def markdown(results: dict[str, Any]) -> str:
    """The figures as the table in docs/benchmarks.md."""
    lines = [
        "| model | where | time to first token, ms | decode, ms/token | decode, tok/s"
        " | decode vs one process |",
        "|---|---|---|---|---|---|",
    ]
    base: dict[str, float] = {}
    for r in results["rows"]:
        if not r["servers"]:
            base[r["model"]] = r["decode_tps"]
        where = servers_text(r["servers"])
        lines.append(
            f"| {r['model']} | {where} | {r['ttft_ms']:.1f} | {r['decode_ms']:.2f}"
            f" | {r['decode_tps']:.1f} | {r['decode_tps'] / base[r['model']]:.2f}x |"
        )
    lines.append(
        f"\nshoal-tiny: added decode cost per server in the chain (slope over 1-3 servers):"
        f" {results['tiny_ms_per_server']:.2f} ms/token"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
