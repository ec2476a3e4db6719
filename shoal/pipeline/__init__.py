"""Model definition, checkpoint loading and local generation (serving and routing: next).

config.py     ModelConfig, parsed from Hugging Face config.json
model.py      DecoderSpan: embedding / blocks[a:b] / head as separate stages, KV caches
loading.py    open_checkpoint, load_span (only the span's weights, dtype, int8/int4)
tokenizer.py  tokenizer.json via tokenizers, chat templates, streaming decode
generate.py   one-process generation with a KV cache
window.py     a sliding window over a span's blocks under --max-memory (docs/memory.md)
errors.py     ModelLoadError, UnsupportedArchitecture, SpanError
"""
