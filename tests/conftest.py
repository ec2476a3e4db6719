"""Shared fixtures: real libp2p hosts on loopback, and the benchmark scripts as modules."""

from __future__ import annotations

import importlib.util
import sys
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair

from shoal.transport.host import Host, HostConfig, open_host

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"


def load_bench_script(name: str) -> ModuleType:
    """scripts/bench/<name>.py imported as the module ``bench_<name>`` (tests of its logic)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@asynccontextmanager
async def loopback_host(
    psk: str | None = None, dial_timeout: float = 5.0, key_pair: KeyPair | None = None
) -> AsyncIterator[Host]:
    config = HostConfig(
        key_pair=key_pair or create_new_key_pair(),
        listen=(LOOPBACK,),
        psk=psk,
        dial_timeout=dial_timeout,
    )
    async with open_host(config) as host:
        yield host


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Trio nests exception groups deeper than Python prints (10 levels): add the leaf
    exceptions of a failure to the report, so that the cause is visible."""
    outcome = yield
    if call.excinfo is not None and isinstance(call.excinfo.value, BaseExceptionGroup):
        report = outcome.get_result()
        text = "\n".join(
            "".join(traceback.format_exception(type(leaf), leaf, leaf.__traceback__, limit=-8))
            for leaf in _leaves(call.excinfo.value)
            if not isinstance(leaf, KeyboardInterrupt)
        )
        report.sections.append(("leaf exceptions", text))
