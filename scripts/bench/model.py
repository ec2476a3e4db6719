"""Model runtime benchmark: shoal vs transformers on the same weights, CPU.

    python scripts/bench/model.py --json model.json

For shoal-tiny and a random ~100M-parameter Llama config, in fp32, bf16 and int8
(weight-only): prefill tokens/s (one forward over the prompt) and decode tokens/s (greedy,
KV cache, batch 1) for shoal, and for transformers' ``generate`` on the same checkpoint.
transformers has no int8 CPU path of its own, so int8 rows compare with its fp32 run.
Then peak RSS of loading all blocks vs half of them, each in a fresh process.
Each figure is the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shoal.pipeline.generate import generate  # noqa: E402
from shoal.pipeline.loading import load_span, open_checkpoint  # noqa: E402

LLAMA_100M = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.inference_mode()
def bench_shoal(
    directory: Path, dtype: str, quantize: str | None, prompt: list[int], new: int, repeats: int
) -> dict[str, float]:
    model = load_span(directory, dtype=dtype, quantize=quantize)
    tokens = torch.tensor([prompt])
    list(generate(model, prompt, max_new_tokens=4))  # warm-up
    prefill = median_time(lambda: model(tokens, model.new_cache()), repeats)
    full = median_time(lambda: list(generate(model, prompt, max_new_tokens=new)), repeats)
    return {"prefill": len(prompt) / prefill, "decode": (new - 1) / max(full - prefill, 1e-9)}


@torch.inference_mode()
def bench_transformers(
    directory: Path, dtype: str, prompt: list[int], new: int, repeats: int
) -> dict[str, float]:
    import transformers

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch_dtype).eval()
    tokens = torch.tensor([prompt])

    def run(n: int) -> None:
        model.generate(tokens, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    run(4)  # warm-up
    prefill = median_time(lambda: model(tokens, use_cache=True), repeats)
    full = median_time(lambda: run(new), repeats)
    return {"prefill": len(prompt) / prefill, "decode": (new - 1) / max(full - prefill, 1e-9)}


def peak_rss(directory: Path, span: str) -> float:
    """Peak RSS (MiB) of a fresh process loading a span and touching its weights, over import.

    Reads VmHWM, which starts afresh with the new process image (ru_maxrss would carry this
    process's peak across exec).
    """
    code = (
        "import re, torch; from shoal.pipeline.loading import load_span, open_checkpoint;"
        "from shoal.pipeline.model import Span;"
        "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]);"
        "before = hwm();"
        f"ck = open_checkpoint({str(directory)!r}); L = ck.config.num_layers;"
        f"span = {{'full': Span(start=0, end=L, embed=True, head=True), 'blocks': Span(start=0, end=L),"
        f" 'half': Span(start=0, end=L // 2)}}[{span!r}];"
        "m = load_span(ck, span);"
        # the weights are mmapped: touch every byte, as the first forward pass would
        "sum(float(t.float().sum()) for t in m.state_dict().values());"
        "print(before, hwm())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    before, after = map(int, out.stdout.split())
    return (after - before) / 1024


def make_100m(directory: Path) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **{k: v for k, v in LLAMA_100M.items() if k != "architectures"}
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "rows": [],
        "rss_mib": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "llama-100m"
        make_100m(big)
        for name, directory in (
            ("shoal-tiny", open_checkpoint("shoal-tiny").directory),
            ("llama-100m", big),
        ):
            vocab = open_checkpoint(directory).config.vocab_size
            gen = torch.Generator().manual_seed(0)
            prompt = torch.randint(
                0, min(vocab, 256), (args.prompt_tokens,), generator=gen
            ).tolist()
            hf_cache: dict[str, dict[str, float]] = {}
            for dtype, quantize in (("fp32", None), ("bf16", None), ("fp32", "int8")):
                label = quantize or dtype
                ours = bench_shoal(
                    directory, dtype, quantize, prompt, args.new_tokens, args.repeats
                )
                if dtype not in hf_cache:
                    hf_cache[dtype] = bench_transformers(
                        directory, dtype, prompt, args.new_tokens, args.repeats
                    )
                theirs = hf_cache[dtype]
                row = {
                    "model": name,
                    "dtype": label,
                    "shoal_prefill": ours["prefill"],
                    "hf_prefill": theirs["prefill"],
                    "shoal_decode": ours["decode"],
                    "hf_decode": theirs["decode"],
                    "hf_dtype": dtype,
                }
                results["rows"].append(row)
                print(
                    f"{name:11} {label:5} prefill {ours['prefill']:8.1f} vs {theirs['prefill']:8.1f} tok/s"
                    f" ({ours['prefill'] / theirs['prefill']:.2f}x)  decode {ours['decode']:7.1f} vs"
                    f" {theirs['decode']:7.1f} tok/s ({ours['decode'] / theirs['decode']:.2f}x)",
                    flush=True,
                )
        for span in ("full", "blocks", "half"):
            results["rss_mib"][span] = peak_rss(big, span)
        rss = results["rss_mib"]
        print(
            f"llama-100m peak RSS over import: full model {rss['full']:.0f} MiB, all 12 blocks"
            f" {rss['blocks']:.0f} MiB, blocks 0..5 {rss['half']:.0f} MiB"
        )
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


def markdown(results: dict[str, Any]) -> str:
    """The figures as the table in docs/benchmarks.md (tokens/s; ratio = shoal / transformers)."""
    lines = [
        "| model | shoal weights | transformers weights | prefill shoal | prefill transformers"
        " | ratio | decode shoal | decode transformers | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['hf_dtype']} | {r['shoal_prefill']:.0f}"
            f" | {r['hf_prefill']:.0f} | {r['shoal_prefill'] / r['hf_prefill']:.2f}x"
            f" | {r['shoal_decode']:.1f} | {r['hf_decode']:.1f}"
            f" | {r['shoal_decode'] / r['hf_decode']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
