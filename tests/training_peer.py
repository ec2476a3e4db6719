"""Helpers of the training tests: a tiny byte-level model and the corpus.

(Also the place for a multi-process training worker, when one is built.)
"""

from __future__ import annotations

from pathlib import Path

import torch

from shoal.pipeline.config import ModelConfig
from shoal.pipeline.model import DecoderSpan, Span

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
