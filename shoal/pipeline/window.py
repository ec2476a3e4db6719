"""A sliding window over a span's blocks, for nodes whose span does not fit in memory.

With a memory bound (``shoal node --max-memory SIZE``), a span whose blocks do not all fit
keeps only a window of them resident. Each block is read from its memory-mapped safetensors
file into memory the window owns (a chunk of the file mapped at a time, unmapped as soon as
it is copied, so touched file pages do not linger in the process's RSS), converted and
quantized on load, and dropped when the window moves past it. A background thread loads
the next blocks while the current one computes; blocks are visited in order and wrap
around from the span's last block to its first (the next token), which is the order the
window prefetches in and the reason it releases the block just used: it is the one needed
furthest in the future.

What counts against the bound: the embedding, final norm and LM head (always resident),
``window`` blocks as held (quantized when asked), and the staging memory of the block being
loaded (the mapped chunk; the block in file format when it is converted or quantized; the
quantizer's temporaries). The KV caches and activations do not: they are the sessions'
memory, bounded by ``--max-cache-tokens``. :func:`plan_window` does this arithmetic;
:func:`load_bounded_span` loads a span whole when it fits and windowed otherwise.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shoal.kernels.quant import INT4_GROUP_SIZE, quantize_linears
from shoal.pipeline.config import ModelConfig
from shoal.pipeline.errors import ModelLoadError, PipelineError
from shoal.pipeline.loading import (
    Checkpoint,
    checkpoint_names,
    load_dtype,
    load_span,
    open_checkpoint,
)
from shoal.pipeline.loading import safetensors_header as read_header
from shoal.pipeline.model import Block, DecoderSpan, Span

log = logging.getLogger(__name__)

#: Bytes of a checkpoint file mapped at once while a block is copied out of it.
CHUNK = 16 * 2**20
_ALIGN = 64  # every tensor of a block buffer starts at a multiple of this
_FILE_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class WindowTooSmall(PipelineError):
    """The memory bound cannot hold the resident parts plus one block while it loads."""

    def __init__(self, budget: int, needed: int, detail: str) -> None:
        super().__init__(
            f"--max-memory {_mb(budget)} cannot hold this span: {detail} need at least "
            f"{_mb(needed)}; raise --max-memory to {_mb(needed)} or more, serve fewer "
            "blocks (--blocks), or quantize (--quantize int8 or int4)"
        )
        self.budget, self.needed = budget, needed


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


# ---- the arithmetic -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class WindowPlan:
    """How a memory budget is spent (bytes). ``window`` blocks are held at once, counting
    the one being loaded; ``window >= blocks`` means the whole span fits."""

    budget: int
    resident_bytes: int
    block_bytes: int
    staging_bytes: int
    blocks: int
    window: int

    @property
    def fits(self) -> bool:
        return self.window >= self.blocks

    @property
    def weight_bytes(self) -> int:
        """The most weight memory the plan holds at once."""
        held = min(self.window, self.blocks) * self.block_bytes
        return self.resident_bytes + held + (0 if self.fits else self.staging_bytes)


def plan_window(
    budget: int, *, resident_bytes: int, block_bytes: int, staging_bytes: int, blocks: int
) -> WindowPlan:
    """The largest window that fits ``budget``; raises :class:`WindowTooSmall` when not
    even one block does."""
    if min(budget, resident_bytes, block_bytes, staging_bytes, blocks) < 0:
        raise ValueError("sizes and counts must not be negative")
    if resident_bytes + blocks * block_bytes <= budget:
        window = blocks
    else:
        needed = resident_bytes + block_bytes + staging_bytes
        if needed > budget:
            raise WindowTooSmall(
                budget,
                needed,
                f"the embedding/norm/head ({_mb(resident_bytes)}), one block "
                f"({_mb(block_bytes)}) and the staging of a block load ({_mb(staging_bytes)})",
            )
        window = min((budget - resident_bytes - staging_bytes) // block_bytes, blocks)
    return WindowPlan(
        budget=budget,
        resident_bytes=resident_bytes,
        block_bytes=block_bytes,
        staging_bytes=staging_bytes,
        blocks=blocks,
        window=window,
    )


def linear_bytes(out_features: int, in_features: int, quantize: str | None, itemsize: int) -> int:
    """Bytes an ``[out, in]`` linear weight is held in (see :mod:`shoal.kernels.quant`)."""
    if quantize is None:
        return out_features * in_features * itemsize
    if quantize == "int8":  # codes, fp32 scales, bf16 scales for the packed kernel
        return out_features * in_features + out_features * (4 + 2)
    groups = out_features * (in_features // INT4_GROUP_SIZE)
    size = out_features * in_features // 2 + groups * (4 + 4)  # codes, scales, zeros
    if hasattr(torch, "_weight_int4pack_mm_for_cpu") and out_features % 16 == 0:
        size += out_features * in_features // 2 + groups * 2 * 2  # packed, bf16 scales+zeros
    return size


def held_bytes(module: nn.Module, dtype: torch.dtype, quantize: str | None) -> int:
    """Bytes ``module`` (built on the meta device) takes once loaded as ``dtype``, with its
    linear layers quantized to ``quantize``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)] if quantize else []
    quantized = {id(m.weight) for m in linears}
    size = sum(linear_bytes(m.out_features, m.in_features, quantize, itemsize) for m in linears)
    return size + sum(p.numel() * itemsize for p in module.parameters() if id(p) not in quantized)


# ---- reading blocks out of memory-mapped files ------------------------------------------


@dataclass(frozen=True)
class _Entry:
    path: Path
    offset: int  # absolute, in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class BlockReader:
    """Copies tensors of a checkpoint out of their memory-mapped files into one owned
    buffer per call, mapping at most :data:`CHUNK` bytes at a time."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._entries: dict[str, _Entry] = {}
        for path in sorted(set(checkpoint.weight_files.values())):
            with path.open("rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
            for name, info in read_header(path).items():
                if info["dtype"] not in _FILE_DTYPES:
                    raise ModelLoadError(
                        path, f"{name} has dtype {info['dtype']}", "convert the checkpoint"
                    )
                begin, end = (int(x) for x in info["data_offsets"])
                self._entries[name] = _Entry(
                    path,
                    8 + header_len + begin,
                    end - begin,
                    _FILE_DTYPES[info["dtype"]],
                    tuple(int(d) for d in info["shape"]),
                )

    def nbytes(self, names: Sequence[str]) -> int:
        """Bytes the tensors take in their files."""
        return sum(self._entries[n].nbytes for n in names)

    def dtype_of(self, name: str) -> torch.dtype:
        return self._entries[name].dtype

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The named tensors, in file dtype, as views of one buffer this process owns."""
        entries = [self._entries[n] for n in names]
        starts, size = [], 0
        for entry in entries:
            starts.append(size)
            size += -(-entry.nbytes // _ALIGN) * _ALIGN
        buffer = torch.empty(size, dtype=torch.uint8)
        out = {}
        for name, entry, start in zip(names, entries, starts, strict=True):
            target = buffer[start : start + entry.nbytes]
            try:
                _copy_mapped(entry.path, entry.offset, target)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(
                    entry.path, f"cannot read {name} ({exc})", "re-download the file"
                ) from None
            out[name] = target.view(entry.dtype).view(entry.shape)
        return out


def _copy_mapped(path: Path, offset: int, target: torch.Tensor) -> None:
    """Fill ``target`` (uint8) with the file's bytes at ``offset``, through mappings of
    at most :data:`CHUNK` bytes that are unmapped right after their copy."""
    fd = os.open(path, os.O_RDONLY)
    try:
        done, total = 0, target.numel()
        while done < total:
            start = offset + done
            skip = start % mmap.ALLOCATIONGRANULARITY
            length = min(CHUNK, total - done)
            # ACCESS_COPY: a writable (private) mapping that torch.frombuffer takes without
            # a warning; nothing writes to it, so no page is ever copied
            with mmap.mmap(fd, skip + length, access=mmap.ACCESS_COPY, offset=start - skip) as mm:
                source = torch.frombuffer(mm, dtype=torch.uint8, count=length, offset=skip)
                target[done : done + length].copy_(source)
                del source  # releases the buffer, so the mapping can close
            done += length
    finally:
        os.close(fd)


def block_names(block: nn.Module, index: int) -> dict[str, str]:
    """Block ``index``'s state-dict keys -> their checkpoint names."""
    return {key: f"model.layers.{index}.{key}" for key in block.state_dict()}


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()  # None: not Linux, or not glibc (musl has neither call)
_M_MMAP_THRESHOLD = -3
#: Allocations from this size up get their own mapping, returned to the system when freed.
MMAP_THRESHOLD = 2**20


def keep_freed_memory_out_of_rss() -> None:
    """Make glibc return freed memory so that the RSS follows the window.

    glibc serves allocations below its mmap threshold from its heaps, and a freed one stays
    in the RSS; the threshold grows (up to 32 MiB) each time a large mapping is freed. A
    quantized window allocates tensors of a few MB and the quantizer's temporaries of tens
    of MB for every block: measured on the 1 GB test model with int8 and a window of one
    block, the peak grew by 160 MB from the first block load to the second. Fixing the
    threshold at 1 MiB (which also stops it growing) and trimming after each load and
    release keeps them out. Process-wide, and only done when a span is windowed.
    """
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def return_freed_memory() -> None:
    """Hand memory freed inside glibc's heaps back to the system (see above)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class BlockLoader:
    """Builds block ``i`` of a checkpoint: read, converted to ``dtype``, quantized."""

    def __init__(self, checkpoint: Checkpoint, *, dtype: torch.dtype, quantize: str | None) -> None:
        self.checkpoint, self.dtype, self.quantize = checkpoint, dtype, quantize
        self.reader = BlockReader(checkpoint)

    def __call__(self, index: int) -> nn.Module:
        with torch.device("meta"):
            block = Block(self.checkpoint.config, index)
        with torch.no_grad():
            self._fill(block, block_names(block, index))
            if self.quantize is not None:
                quantize_linears(block, self.quantize)
                for param in block.parameters():  # norms, biases: views that would pin
                    param.data = param.data.clone()  # the whole file-format buffer
        return_freed_memory()  # the file-format copy and the quantizer's temporaries
        return block.eval()

    def ends(self, span: Span) -> DecoderSpan:
        """A span of no blocks holding ``span``'s embedding and/or norm and head, read into
        owned memory like the blocks (``load_span`` would keep views of a mapping of the
        whole file, whose touched pages stay in the RSS)."""
        config = self.checkpoint.config
        ends = Span(start=span.start, end=span.start, embed=span.embed, head=span.head)
        with torch.device("meta"):
            model = DecoderSpan(config, ends)
        with torch.no_grad():
            self._fill(model, checkpoint_names(model))
            if self.quantize is not None and model.lm_head is not None:
                model.lm_head = quantize_linears(model.lm_head, self.quantize)
        if config.tie_word_embeddings and self.quantize is None:
            model.tie_weights()
        return model

    def _fill(self, module: nn.Module, names: dict[str, str]) -> None:
        """Load ``module``'s state (keys -> checkpoint names) as ``dtype``, checking shapes."""
        expected = module.state_dict()
        raw = self.reader.read(sorted(set(names.values())))
        state = {}
        for key, name in names.items():
            tensor = raw[name]
            if tensor.shape != expected[key].shape:
                raise ModelLoadError(
                    self.checkpoint.directory,
                    f"{name} has shape {tuple(tensor.shape)}, the config implies "
                    f"{tuple(expected[key].shape)}",
                    "check that config.json belongs to these weights",
                )
            state[key] = tensor.to(self.dtype)
        del raw, tensor  # a converted block drops the file-format copy here
        module.load_state_dict(state, assign=True)


# ---- the window ---------------------------------------------------------------------


class WindowClosed(PipelineError):
    """A block was asked of a window after :meth:`WeightWindow.close`."""


class WeightWindow:
    """At most ``size`` of ``indices`` resident at once, loaded by ``load`` on a background
    thread in visiting order (wrapping from the last index to the first).

    :meth:`block` returns block ``i``, waiting for it if it is not resident yet, and marks
    it current: from then on the thread fills the window with the blocks after ``i`` and
    releases the ones behind it. The current block is never released. Callers must not
    keep a block after asking for the next one, or its memory outlives the window.
    ``events`` records ``("request", i)``, ``("load", i)``, ``("ready", i)`` and
    ``("release", i)`` in order, for tests and logs.
    """

    def __init__(self, indices: Sequence[int], size: int, load: Callable[[int], nn.Module]) -> None:
        if not indices or size < 1:
            raise ValueError("a window needs at least one block and a size of at least 1")
        self.indices = list(indices)
        self.size = min(size, len(self.indices))
        self.events: list[tuple[str, int]] = []
        self.loads = 0
        self._load = load
        self._known = set(self.indices)
        self._resident: OrderedDict[int, nn.Module] = OrderedDict()
        self._current: int | None = None
        self._failure: BaseException | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._prefetch, name="shoal-window", daemon=True)
        self._thread.start()

    def block(self, index: int) -> nn.Module:
        """Block ``index``, resident; blocks the caller until it is."""
        if index not in self._known:
            raise KeyError(f"block {index} is not in this window's span")
        with self._changed:
            self.events.append(("request", index))
            self._current = index
            self._changed.notify_all()
            while index not in self._resident:
                self._raise_if_stopped()
                self._changed.wait()
            return self._resident[index]

    def resident(self) -> list[int]:
        with self._changed:
            return list(self._resident)

    def close(self) -> None:
        """Stop the thread and release every block."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join()
        with self._changed:
            self._resident.clear()

    def _raise_if_stopped(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise WindowClosed("the weight window is closed")

    def _next_load(self) -> int | None:
        """Under the lock: the block to load now (releasing one first if needed), or None."""
        release, load = next_step(list(self._resident), self._current, self.indices, self.size)
        if release is not None:
            del self._resident[release]  # its last reference: the memory goes now
            return_freed_memory()
            self.events.append(("release", release))
        if load is not None:
            self.events.append(("load", load))
        return load

    def _prefetch(self) -> None:
        while True:
            with self._changed:
                index = None
                while not self._closed and (index := self._next_load()) is None:
                    self._changed.wait()
                if index is None:
                    return
            try:
                block = self._load(index)
            except BaseException as exc:  # reported to whoever waits for a block
                with self._changed:
                    self._failure = exc
                    self._changed.notify_all()
                return
            with self._changed:
                self._resident[index] = block
                self.loads += 1
                self.events.append(("ready", index))
                self._changed.notify_all()
            del block


def next_step(
    resident: Sequence[int], current: int | None, indices: Sequence[int], size: int
) -> tuple[int | None, int | None]:
    """(block to release, block to load) for a window of ``size`` over ``indices``
    (visiting order, wrapping around) holding ``resident`` while ``current`` runs.

    The window wants ``current`` and the ``size - 1`` blocks after it. It loads the first
    one it lacks; when full, it first releases the resident block needed furthest in the
    future, which in a cyclic visit is the one just behind ``current``.
    """
    position = {index: i for i, index in enumerate(indices)}
    first = position[current] if current is not None else 0
    n = len(indices)
    wanted = [indices[(first + k) % n] for k in range(min(size, n))]
    load = next((i for i in wanted if i not in resident), None)
    if load is None or len(resident) < size:
        return None, load
    unwanted = [i for i in resident if i not in wanted]
    if not unwanted:
        return None, None
    return max(unwanted, key=lambda i: (position[i] - first) % n), load


# ---- a span whose blocks live in a window -----------------------------------------------


class WindowedSpan(DecoderSpan):
    """A :class:`DecoderSpan` whose blocks are loaded on demand through a
    :class:`WeightWindow`; ``layers`` holds meta-device skeletons (shapes, no memory).
    Call :meth:`close` when done with it."""

    def __init__(
        self, config: ModelConfig, span: Span, window: WeightWindow, dtype: torch.dtype
    ) -> None:
        with torch.device("meta"):
            super().__init__(config, span)
        self.window = window
        self._dtype = dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def block(self, index: int) -> nn.Module:
        return self.window.block(index)

    def close(self) -> None:
        self.window.close()


def load_bounded_span(
    checkpoint: Checkpoint | str | Path,
    span: Span | None = None,
    *,
    max_memory: int | None,
    dtype: str | torch.dtype = torch.float32,
    quantize: str | None = None,
    progress: bool = False,
) -> DecoderSpan:
    """:func:`~shoal.pipeline.loading.load_span` when the span's weights fit in
    ``max_memory`` bytes (or there is no bound), else a :class:`WindowedSpan`."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    span = span or Span.full(ckpt.config)
    if max_memory is None:
        return load_span(ckpt, span, dtype=dtype, quantize=quantize, progress=progress)
    target = load_dtype(ckpt, dtype, quantize)
    plan = plan_span(ckpt, span, max_memory, dtype=target, quantize=quantize)
    if plan.fits:
        log.info("the span fits in %s: loading it whole", _mb(max_memory))
        return load_span(ckpt, span, dtype=target, quantize=quantize, progress=progress)
    log.info(
        "blocks %d:%d do not fit in %s: a window of %d block(s) of %s, %s of weights at most",
        span.start,
        span.end,
        _mb(max_memory),
        plan.window,
        _mb(plan.block_bytes),
        _mb(plan.weight_bytes),
    )
    return load_windowed_span(ckpt, span, window=plan.window, dtype=target, quantize=quantize)


def load_windowed_span(
    checkpoint: Checkpoint,
    span: Span,
    *,
    window: int,
    dtype: torch.dtype,
    quantize: str | None,
) -> WindowedSpan:
    """``span`` with its embedding/norm/head loaded and its blocks behind a window of
    ``window`` blocks (the first ones start loading at once)."""
    keep_freed_memory_out_of_rss()
    loader = BlockLoader(checkpoint, dtype=dtype, quantize=quantize)
    resident = loader.ends(span) if span.embed or span.head else None
    model = WindowedSpan(
        checkpoint.config, span, WeightWindow(range(span.start, span.end), window, loader), dtype
    )
    if resident is not None:
        model.embed_tokens, model.norm, model.lm_head = (
            resident.embed_tokens,
            resident.norm,
            resident.lm_head,
        )
    return model.eval()


def plan_span(
    checkpoint: Checkpoint,
    span: Span,
    max_memory: int,
    *,
    dtype: torch.dtype,
    quantize: str | None,
) -> WindowPlan:
    """The :class:`WindowPlan` of ``span`` under ``max_memory`` bytes, from the
    checkpoint's headers and the model's shapes (nothing is loaded)."""
    config = checkpoint.config
    span.check(config)
    with torch.device("meta"):
        skeleton = DecoderSpan(config, Span(start=0, end=0, embed=True, head=True))
        block = Block(config, span.start) if span.end > span.start else None
    resident = 0
    if span.embed and skeleton.embed_tokens is not None:
        resident += held_bytes(skeleton.embed_tokens, dtype, None)
    if span.head and skeleton.norm is not None and skeleton.lm_head is not None:
        tied = config.tie_word_embeddings and span.embed and quantize is None
        resident += held_bytes(skeleton.norm, dtype, None)
        resident += 0 if tied else held_bytes(skeleton.lm_head, dtype, quantize)
    if block is None:
        return plan_window(
            max_memory, resident_bytes=resident, block_bytes=0, staging_bytes=0, blocks=0
        )
    block_bytes = held_bytes(block, dtype, quantize)
    reader = BlockReader(checkpoint)
    names = list(block_names(block, span.start).values())
    file_bytes = reader.nbytes(names)
    itemsize = torch.empty((), dtype=dtype).element_size()
    converted = any(reader.dtype_of(n) != dtype for n in names)
    staging = min(CHUNK, file_bytes)
    if converted or quantize is not None:
        staging += file_bytes  # the block as read, next to its converted form
    if quantize is not None:  # the quantizer's fp32 temporaries, one linear at a time
        largest = max(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))
        staging += 4 * largest * max(4, itemsize)
    return plan_window(
        max_memory,
        resident_bytes=resident,
        block_bytes=block_bytes,
        staging_bytes=staging,
        blocks=span.end - span.start,
    )


# ---- measuring it -------------------------------------------------------------------


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (``VmRSS``) or its peak (``VmHWM``) from
    /proc/self/status; 0 where there is no /proc (the figures are Linux ones)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass(frozen=True, kw_only=True)
class DecodeRun:
    """One :func:`measure_decode`: the tokens, their speed, and the process's memory.
    ``weight_bytes`` is the peak RSS minus the RSS before the weights loaded."""

    tokens: list[int]
    decode_tokens_per_second: float
    load_seconds: float
    baseline_rss: int
    peak_rss: int
    window: int | None
    block_loads: int

    @property
    def weight_bytes(self) -> int:
        return self.peak_rss - self.baseline_rss


def measure_decode(
    model: str | Path,
    prompt: Sequence[int],
    *,
    new_tokens: int,
    max_memory: int | None,
    dtype: str = "fp32",
    quantize: str | None = None,
) -> DecodeRun:
    """Load ``model`` under ``max_memory`` (None: whole) and decode ``new_tokens`` greedy
    tokens after ``prompt``. Run it in a fresh process: the peak RSS is the process's.
    Before the baseline, a small matmul and a small embedding built on the meta device
    warm torch up, so that its one-off costs do not count as weights (the first meta
    embedding imports some 800 modules of torch, about 78 MB of RSS)."""
    import time

    from shoal.pipeline.generate import GenerationStats, generate

    torch.ones(64, 64) @ torch.ones(64, 64)
    with torch.device("meta"):
        nn.Embedding(2, 2)
    checkpoint = open_checkpoint(model)
    baseline = rss_bytes()
    started = time.perf_counter()
    weights = load_bounded_span(checkpoint, max_memory=max_memory, dtype=dtype, quantize=quantize)
    loaded = time.perf_counter() - started
    stats = GenerationStats()
    try:
        tokens = list(generate(weights, list(prompt), max_new_tokens=new_tokens, stats=stats))
        peak = rss_bytes("VmHWM")
    finally:
        if isinstance(weights, WindowedSpan):
            weights.close()
    window = weights.window if isinstance(weights, WindowedSpan) else None
    return DecodeRun(
        tokens=tokens,
        decode_tokens_per_second=stats.decode_tokens_per_second,
        load_seconds=loaded,
        baseline_rss=baseline,
        peak_rss=peak,
        window=None if window is None else window.size,
        block_loads=0 if window is None else window.loads,
    )
