"""Torch ops only (no networking, no other shoal package).

norm.py       RMSNorm (fused torch op) and its reference
rope.py       rotary embeddings, Llama 3 / linear scaling
attention.py  grouped-query attention with SDPA, the per-layer KV cache
mlp.py        SwiGLU
quant.py      int8 per-channel and int4 group-wise weight-only linear layers
sampling.py   greedy / temperature / top-k / top-p / repetition penalty, seeded
codecs.py     tensor <-> bytes for the wire (raw fp32/fp16/bf16, int8 blockwise)
errors.py     CodecError, QuantizationError
"""
