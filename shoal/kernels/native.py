"""Native kernels of the all-reduce's chunks (chunks.c), compiled on first use, with torch
as the fallback.

The int8 all-reduce spent most of its CPU quantizing: torch takes five passes per block
(abs, amax, divide, round, cast), about 1.5 ns per element even a cache-sized segment at a
time, where one C loop takes a quarter of that; the fp32 reduction reads every
contribution twice with torch (the finiteness check, then the sum), once in C
(docs/collectives.md). The C file is
compiled once per machine with the system's C compiler into a cache directory
(``$SHOAL_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/shoal/kernels``, else
``~/.cache/shoal/kernels``), named by a hash of the source, the flags and the machine, and
loaded with ctypes (which releases the GIL during each call). Where there is no compiler,
or ``SHOAL_NATIVE=0``, :func:`chunk_kernels` returns ``None`` and the callers use their
torch code: the same bytes, slower. ``-ffp-contract=off`` keeps every multiply and add
rounded on its own, as torch's are.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("chunks.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")
ARCH_FLAGS = (("-march=native",), ())  # the first that compiles


def cache_dir() -> Path:
    if d := os.environ.get("SHOAL_KERNEL_CACHE"):
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "shoal" / "kernels"


@cache
def chunk_kernels() -> ctypes.CDLL | None:
    """The compiled kernels (``shoal_int8_encode``, ``shoal_int8_decode``,
    ``shoal_int8_reduce``, ``shoal_f32_reduce``), or ``None`` where they cannot be built or
    are turned off (logged once)."""
    if os.environ.get("SHOAL_NATIVE", "1") == "0":
        log.info("native chunk kernels off (SHOAL_NATIVE=0): using torch")
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning(
            "native chunk kernels unavailable (%s); the all-reduce uses torch, slower. "
            "Install a C compiler (e.g. apt-get install gcc) to build them.",
            exc,
        )
        return None
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.shoal_int8_encode.argtypes = (p, i64, i64, p, p)
    lib.shoal_int8_decode.argtypes = (p, p, i64, i64, p)
    lib.shoal_int8_reduce.argtypes = (i64, p, p, p, f32, i64, i64, p, p, p)
    lib.shoal_f32_reduce.argtypes = (i64, p, p, f32, i64, p, p)
    for fn in (lib.shoal_int8_encode, lib.shoal_int8_decode, lib.shoal_int8_reduce):
        fn.restype = None
    lib.shoal_f32_reduce.restype = None
    return lib


def _build() -> Path:
    """The shared library for this source and machine: cached, else compiled (atomically:
    concurrent first uses in several processes each write their own file, then rename)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    source = SOURCE.read_bytes()
    errors = []
    for arch in ARCH_FLAGS:
        flags = (*FLAGS, *arch)
        key = hashlib.sha256(
            b"\0".join([source, " ".join(flags).encode(), platform.machine().encode()])
        ).hexdigest()[:16]
        target = cache_dir() / f"chunks-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        done = subprocess.run(
            [compiler, *flags, "-o", tmp, str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode == 0:
            os.replace(tmp, target)
            log.info("built the native chunk kernels: %s", target)
            return target
        os.unlink(tmp)
        errors.append(done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"])
    raise RuntimeError(f"{compiler} failed: {errors}")
