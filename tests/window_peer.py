"""A process that decodes with a memory bound and prints what it measured, as JSON.

``python -m tests.window_peer MODEL MAX_MEMORY|none QUANTIZE|none NEW_TOKENS PROMPT_IDS``
(prompt ids comma-separated). Its own process, so that its peak RSS is its own.
"""

from __future__ import annotations

import json
import sys

import torch

from shoal.pipeline.window import measure_decode


def main() -> None:
    model, max_memory, quantize, new_tokens, prompt = sys.argv[1:6]
    torch.set_num_threads(1)
    run = measure_decode(
        model,
        [int(t) for t in prompt.split(",")],
        new_tokens=int(new_tokens),
        max_memory=None if max_memory == "none" else int(max_memory),
        quantize=None if quantize == "none" else quantize,
    )
    result = {
        "tokens": run.tokens,
        "baseline_rss": run.baseline_rss,
        "peak_rss": run.peak_rss,
        "weight_bytes": run.weight_bytes,
        "window": run.window,
        "block_loads": run.block_loads,
        "decode_tokens_per_second": run.decode_tokens_per_second,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
