"""Native kernels of the all-reduce's chunks (chunks.c), compiled on first use, with torch
as the fallback.

The int8 all-reduce spent most of its CPU quantizing: torch takes five passes per block
(abs, amax, divide, round, cast), about 1.5 ns per element even a cache-sized segment at a
time, where one C loop takes a quarter of that; the fp32 reduction reads every
contribution twice with torch (the finiteness check, then the sum), once in C
(docs/collectives.md). The C file is compiled once per machine with the system's C
compiler into a cache directory (``$SHOAL_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/shoal/kernels``, else ``~/.cache/shoal/kernels``; created private),
named by a hash of the source, the flags, the compiler's version and the CPU's model and
features (``-march=native`` code from one CPU must not be loaded on another that shares
the directory), and loaded with ctypes (which releases the GIL during each call). A
library there that does not load is built again once; one owned by another user or
writable by others is not loaded. Where there is no compiler, or ``SHOAL_NATIVE=0``,
:func:`chunk_kernels` returns ``None`` (logged once, saying why) and the callers use
their torch code: the same bytes, slower. ``-ffp-contract=off`` keeps every multiply
and add rounded on its own, as torch's are.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("chunks.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")
ARCH_FLAGS = (("-march=native",), ())  # the first that compiles
COMPILE_TIMEOUT = 120.0


class NativeUnavailable(RuntimeError):
    """Why the native kernels cannot be used here (the message says what to do)."""


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
        lib = _load()
    except NativeUnavailable as exc:
        log.warning("native chunk kernels unavailable: %s; the all-reduce uses torch, slower", exc)
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


def _load() -> ctypes.CDLL:
    compiler = shlex.split(os.environ.get("CC", "")) or [
        c for c in (shutil.which("cc") or shutil.which("gcc"),) if c
    ]
    if not compiler:
        raise NativeUnavailable(
            "no C compiler (cc or gcc) on PATH: install one (apt-get install gcc)"
        )
    directory = cache_dir()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise NativeUnavailable(
            f"cannot create {directory} ({exc}): set SHOAL_KERNEL_CACHE"
        ) from exc
    _check_private(directory)
    errors: list[str] = []
    for arch in ARCH_FLAGS:
        flags = (*FLAGS, *arch)
        target = directory / f"chunks-{_key(compiler, flags)}.so"
        for attempt in range(2):
            if not target.exists() and not _compile(compiler, flags, target, errors):
                break  # these flags do not compile here: try the next
            _check_private(target)
            try:
                return ctypes.CDLL(str(target))
            except OSError as exc:  # a damaged or foreign file: build it again, once
                log.warning("cannot load %s (%s); building it again", target, exc)
                target.unlink(missing_ok=True)
                if attempt:
                    errors.append(f"built but cannot load: {exc}")
    raise NativeUnavailable(f"{shlex.join(compiler)} failed: {'; '.join(errors)}")


def _key(compiler: list[str], flags: tuple[str, ...]) -> str:
    """A hash of what the library depends on: the source, the flags, the compiler's
    version and this CPU (``-march=native`` code is this CPU's)."""
    parts = [SOURCE.read_bytes(), " ".join(flags).encode(), _machine(tuple(compiler))]
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


@cache
def _machine(compiler: tuple[str, ...]) -> bytes:
    """The compiler's version and this CPU (:func:`_cpu`): asked once per process, not
    once per set of flags tried."""
    try:
        version = subprocess.run(
            [*compiler, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    return f"{version}\0{_cpu()}".encode()


def _cpu() -> str:
    """The CPU's architecture, model and feature flags (from /proc/cpuinfo where there is
    one: the first processor's, all cores alike)."""
    lines = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read(1 << 16)
    except OSError:
        return "\n".join(lines)
    wanted = ("model name", "flags", "features", "cpu part", "cpu implementer")
    seen = set()
    for line in info.splitlines():
        name = line.partition(":")[0].strip().lower()
        if name in wanted and name not in seen:
            seen.add(name)
            lines.append(line)
    return "\n".join(lines)


def _compile(compiler: list[str], flags: tuple[str, ...], target: Path, errors: list[str]) -> bool:
    """Compile to ``target`` (a private temporary file, flushed, then renamed: several
    processes may build at once); False, with the error noted, where it fails."""
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [*compiler, *flags, "-o", tmp, str(SOURCE), "-lm"],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            errors.append(
                " ".join(done.stderr.strip().splitlines()[-2:]) or f"exit {done.returncode}"
            )
            return False
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except (OSError, subprocess.SubprocessError) as exc:
        errors.append(str(exc))
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)
    log.info("built the native chunk kernels: %s", target)
    return True


def _check_private(path: Path) -> None:
    """Load code only from a directory and file that this user owns and nobody else may
    write (a shared cache directory could hand another user's library to this process)."""
    st = path.stat()
    if hasattr(os, "getuid") and (st.st_uid != os.getuid() or st.st_mode & 0o022):
        raise NativeUnavailable(
            f"{path} is not private to this user (owner uid {st.st_uid}, mode "
            f"{st.st_mode & 0o777:o}): point SHOAL_KERNEL_CACHE at a directory of your own"
        )
