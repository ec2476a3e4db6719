"""The native chunk kernels (shoal/kernels/chunks.c): built once per source and machine into
the cache, off with SHOAL_NATIVE=0, a logged fallback without a compiler, and the same
bytes as the torch code, NaN and infinity findings included. (The codec tests in
test_collectives_codecs.py run every case on both paths too.)"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from shoal.collectives import codec
from shoal.collectives.errors import BadContribution
from shoal.kernels import native


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("SHOAL_KERNEL_CACHE", str(tmp_path / "kernels"))
    native.chunk_kernels.cache_clear()
    yield tmp_path / "kernels"
    native.chunk_kernels.cache_clear()


@pytest.fixture
def built(fresh_cache: Path) -> Path:
    if native.chunk_kernels() is None:
        pytest.skip("no C compiler here: the torch path is the one in use")
    return fresh_cache


def test_built_once_into_the_cache_and_reused(built: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    [library] = list(built.glob("chunks-*.so"))
    stamp = library.stat().st_mtime_ns
    assert built.stat().st_mode & 0o777 == 0o700  # created private
    native.chunk_kernels.cache_clear()

    def no_compiling(*args: object) -> bool:
        raise AssertionError("compiled again")

    monkeypatch.setattr(native, "_compile", no_compiling)
    assert native.chunk_kernels() is not None
    assert [p.stat().st_mtime_ns for p in built.glob("chunks-*.so")] == [stamp]
    assert len(list(built.iterdir())) == 1  # no temporary file left beside it


def test_a_damaged_library_is_built_again(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler here")
    monkeypatch.delenv("CC", raising=False)
    fresh_cache.mkdir(mode=0o700, parents=True)
    flags = (*native.FLAGS, *native.ARCH_FLAGS[0])
    library = fresh_cache / f"chunks-{native._key([cc], flags)}.so"
    library.write_bytes(b"")  # what a crash between creating and writing it leaves
    assert native.chunk_kernels() is not None
    assert library.stat().st_size > 1000


def test_a_library_others_may_write_is_not_loaded(
    built: Path, caplog: pytest.LogCaptureFixture
) -> None:
    [library] = list(built.glob("chunks-*.so"))
    library.chmod(0o666)
    native.chunk_kernels.cache_clear()
    with caplog.at_level(logging.WARNING, logger="shoal.kernels.native"):
        assert native.chunk_kernels() is None
    assert "not private to this user" in caplog.text and "SHOAL_KERNEL_CACHE" in caplog.text


def test_off_with_the_environment_variable(
    fresh_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHOAL_NATIVE", "0")
    assert native.chunk_kernels() is None
    assert not fresh_cache.exists()


@pytest.mark.parametrize(
    ("cc", "said"),
    [
        ("false", "false failed: exit 1"),  # a compiler that fails every time
        ("/nonexistent/cc -O1", "/nonexistent/cc -O1 failed"),  # one that does not run
        (None, "no C compiler"),
    ],
)
def test_without_a_working_compiler_the_fallback_is_logged(
    fresh_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    cc: str | None,
    said: str,
) -> None:
    if cc is None:
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setenv("PATH", str(fresh_cache.parent / "empty"))
    else:
        monkeypatch.setenv("CC", cc)
    with caplog.at_level(logging.WARNING, logger="shoal.kernels.native"):
        assert native.chunk_kernels() is None
    assert "native chunk kernels unavailable" in caplog.text and said in caplog.text
    assert not list(fresh_cache.glob("*"))  # no library and no temporary file left behind
    # the codec still works, on torch
    _, payload = codec.encode_chunk(torch.arange(100.0), "int8", 64)
    out = torch.empty(100)
    codec.decode_into(out, payload, "int8", 64)
    assert torch.allclose(out, torch.arange(100.0), atol=99 / 127)


def _both(fn, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """fn() with the native kernels, then with torch."""
    fast = fn()
    with monkeypatch.context() as m:
        m.setattr(native, "chunk_kernels", lambda: None)
        slow = fn()
    return fast, slow


@pytest.mark.parametrize("codec_name", ["fp32", "fp16"])
def test_float_reduction_finds_the_same_bad_parts_and_bytes(
    built: Path, monkeypatch: pytest.MonkeyPatch, codec_name: str
) -> None:
    g = torch.Generator().manual_seed(3)
    n = 3 * 4096 + 17  # several tiles and a partial one
    parts = [(torch.randn(n, generator=g), w) for w in (1.0, 0.1, 2.5)]

    def reduce() -> bytes | list[int]:
        try:
            return bytes(codec.reduce_encode(parts, codec_name, n, 64))
        except codec.NonFiniteParts as exc:
            return exc.indices

    fast, slow = _both(reduce, monkeypatch)
    assert isinstance(fast, bytes) and fast == slow
    parts[1][0][n - 1] = float("nan")  # in the last, partial tile
    parts[2][0][5000] = -float("inf")
    fast, slow = _both(reduce, monkeypatch)
    assert fast == slow == [1, 2]


def test_int8_bad_values_give_bad_scales_on_both_paths(
    built: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = torch.randn(256)
    x[70], x[200] = float("nan"), float("inf")  # blocks 1 and 3

    def scales() -> list[float]:
        _, payload = codec.encode_chunk(x, "int8", 64)
        return torch.frombuffer(bytearray(payload), dtype=torch.float32, count=4).tolist()

    fast, slow = _both(scales, monkeypatch)
    for s in (fast, slow):
        assert s[0] > 0 and s[2] > 0 and s[1] != s[1] and s[3] == float("inf"), s
    with pytest.raises(BadContribution):
        codec.encode_contribution("me", x, [(0, 256)], "int8", 64)
