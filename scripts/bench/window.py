"""The sliding weight window: decode speed and memory with and without a memory bound.

    python scripts/bench/window.py --max-memory 300MB --new-tokens 16 --json window.json

Decodes greedy tokens from the same model twice, each in a fresh process
(``tests/window_peer.py``, so each peak RSS is its own): once with the whole span loaded,
once under ``--max-memory``. Prints decode tokens/s, the windowed/unbounded ratio, peak RSS,
and weight memory (peak RSS minus the RSS before the weights loaded). Without ``--model``
it writes the random 1.01 GB Llama of the memory test (10 blocks of 100.7 MB, fp32) to a
temporary directory. :func:`compare` is the hook for other scripts (the edge benchmark
measures the window in a serving node instead).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shoal.node.config import parse_size  # noqa: E402
from tests.models import save_random_llama  # noqa: E402

PROMPT = [1, 5, 9, 33, 70, 11, 64, 3]


def decode_once(
    model: Path, max_memory: int | None, new_tokens: int, quantize: str | None
) -> dict[str, Any]:
    """One fresh process decoding ``new_tokens`` after an 8-token prompt; its JSON."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tests.window_peer", str(model)]
    command += ["none" if max_memory is None else str(max_memory), quantize or "none"]
    command += [str(new_tokens), ",".join(map(str, PROMPT))]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the decode process failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def compare(
    model: Path, max_memory: int, *, new_tokens: int = 16, quantize: str | None = None
) -> dict[str, Any]:
    """Decode with and without the window (one after the other, so that they do not share
    the cores); tokens/s of each, their ratio, peak RSS and weight memory in bytes."""
    whole = decode_once(model, None, new_tokens, quantize)
    windowed = decode_once(model, max_memory, new_tokens, quantize)
    if windowed["tokens"] != whole["tokens"]:
        raise RuntimeError(f"tokens differ: {windowed['tokens']} != {whole['tokens']}")
    return {
        "max_memory": max_memory,
        "quantize": quantize,
        "new_tokens": new_tokens,
        "window": windowed["window"],
        "block_loads": windowed["block_loads"],
        "unbounded": whole,
        "windowed": windowed,
        "ratio": windowed["decode_tokens_per_second"] / whole["decode_tokens_per_second"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a model directory (default: random 1 GB)")
    parser.add_argument("--max-memory", default="300MB")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--quantize", choices=["int8", "int4"])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            model = Path(scratch) / "llama-1gb"
            save_random_llama(
                model, hidden=1536, intermediate=4096, layers=10, heads=12, kv_heads=4, vocab=512
            )
        result = compare(
            model,
            parse_size(args.max_memory),
            new_tokens=args.new_tokens,
            quantize=args.quantize,
        )
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {sys.version[:6]}"
    mb = 1e6
    print(f"window: {result['window']} blocks, {result['block_loads']} block loads")
    print("run        decode tok/s  peak RSS MB  weight MB")
    for name in ("unbounded", "windowed"):
        run = result[name]
        print(
            f"{name:<10} {run['decode_tokens_per_second']:>12.2f} {run['peak_rss'] / mb:>12.0f}"
            f" {run['weight_bytes'] / mb:>10.0f}"
        )
    print(f"windowed/unbounded decode tokens/s: {result['ratio']:.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
