"""Node configuration: a TOML file plus command-line flags, flags winning.

This is the only module that reads configuration files and the environment. The TOML
file uses the flag names with underscores (``data_dir``, ``swarm_key``, ...)::

    listen = ["/ip4/0.0.0.0/tcp/4001"]
    bootstrap = ["/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."]
    relay = true
    swarm = "main"
    api = "127.0.0.1:8470"
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from shoal.node.errors import ConfigError
from shoal.pipeline.serving import ServerConfig
from shoal.transport.host import DEFAULT_LISTEN

DEFAULT_API = "127.0.0.1:8470"


def default_data_dir() -> Path:
    """``$SHOAL_HOME`` if set, else ``~/.shoal``."""
    return Path(os.environ.get("SHOAL_HOME", "~/.shoal")).expanduser()


PI_MEMORY_SHARE = 0.6  # of the RAM available at start, for weights on a Raspberry Pi


def board_model(path: Path = Path("/proc/device-tree/model")) -> str | None:
    """The board's model string (``Raspberry Pi 5 Model B Rev 1.0``), None off boards."""
    try:
        return path.read_bytes().rstrip(b"\0").decode(errors="replace").strip() or None
    except OSError:
        return None


def mem_available(path: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes of RAM available now (Linux's MemAvailable), None where unknown."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """Everything a node daemon needs to start.

    data_dir: identity key, known peers and state (default ~/.shoal or $SHOAL_HOME).
    listen: libp2p multiaddrs to listen on (default /ip4/0.0.0.0/tcp/4001).
    announce: addresses to advertise instead of the listen addresses.
    bootstrap: full multiaddrs (with /p2p/<id>) of peers to join through.
    relay: run a Circuit Relay v2 hop service for peers behind NAT (public nodes).
    bulk: carry tensors over bulk streams (a second TCP port; docs/transport.md).
    swarm: the swarm's name; it prefixes DHT keys and gossip topics.
    swarm_key: a pnet key file for a private swarm (see `shoal keygen`).
    api: HOST:PORT for the HTTP API, or None to run without it.
    target_peers: connections the node keeps to other peers.
    offline_after: seconds of silence after which a peer is shown offline.
    dht_refresh: seconds between DHT re-announcements; a dead server's records lapse
        after twice that.
    log_level: debug, info, warning or error.
    model: a model to serve (a Hugging Face directory or a built-in name), or None.
    model_id: the name the swarm knows the model by (default: the built-in name or the
        directory's name).
    blocks: ``A:B`` (serve blocks A..B-1), ``auto`` (the weakest-covered span, a third of
        the model) or ``auto:N`` (N blocks where coverage is weakest).
    dtype / quantize: how the served span is held (fp32, bf16, fp16; int8, int4, or
        ``none``: as ``dtype``, also on a Raspberry Pi, see ``with_edge_defaults``).
    max_sessions / max_cache_tokens / session_idle: inference session limits (sessions at
        once, cache positions reserved in all, seconds before an idle session is dropped).
    api_key: bearer token the OpenAI-compatible routes require (None: no auth).
    step_timeout / route_timeout: the API's swarm client: seconds one token may take along
        the chain; seconds to wait for servers of missing blocks before an error.
    threads: torch compute threads of the served span (None: the machine's cores minus
        one, at least 1, so a core stays free for networking; see ``compute_threads``).
    max_memory: a bound on the served span's weight memory, e.g. ``300MB`` or ``1.5GiB``
        (see ``parse_size``); a span that does not fit keeps a sliding window of its
        blocks in memory (docs/memory.md). None: no bound, the span loads whole.
    tp_group: serve ``--blocks`` together with the nodes that give the same name, model
        and blocks: a tensor-parallel group (docs/tensor-parallel.md); None: alone.
    tp_size: members the group waits for before it forms (None: those seen within
        ``TP_LISTEN`` seconds). tp_topology: all-reduce ``auto`` (by measured round trip),
        ``star`` or ``ring``. tp_weight: this member's share weight (None: measured speed).
    """

    data_dir: Path
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    announce: tuple[str, ...] = ()
    bootstrap: tuple[str, ...] = ()
    relay: bool = False
    bulk: bool = True
    swarm: str = "main"
    swarm_key: Path | None = None
    api: str | None = DEFAULT_API
    target_peers: int = 16
    offline_after: float = 30.0
    dht_refresh: float = 30.0
    log_level: str = "info"
    model: str | None = None
    model_id: str | None = None
    blocks: str | None = None
    dtype: str = "fp32"
    quantize: str | None = None
    max_sessions: int = 32
    max_cache_tokens: int = 65536
    session_idle: float = 300.0
    api_key: str | None = None
    step_timeout: float = 60.0
    route_timeout: float = 20.0
    threads: int | None = None
    max_memory: str | None = None
    tp_group: str | None = None
    tp_size: int | None = None
    tp_topology: str = "auto"
    tp_weight: float | None = None

    @property
    def weight_quantization(self) -> str | None:
        """What the served weights are quantized to (None: kept as ``dtype``)."""
        return None if self.quantize in (None, "none") else self.quantize

    def with_edge_defaults(self, board: str | None, available: int | None) -> NodeConfig:
        """This config with a Raspberry Pi's defaults for what was not given: int8 weights
        (``quantize none`` keeps them as ``dtype``), and a weight-memory bound of
        ``PI_MEMORY_SHARE`` of the RAM available at start (``available`` bytes; not for a
        tensor-parallel member, which loads its slices whole). ``board`` is the
        device-tree model string (``board_model()``); other machines keep the config."""
        if board is None or not board.startswith("Raspberry Pi"):
            return self
        changes: dict[str, Any] = {}
        if self.quantize is None:
            changes["quantize"] = "int8"
        if self.max_memory is None and self.tp_group is None and available:
            changes["max_memory"] = str(int(available * PI_MEMORY_SHARE))
        return replace(self, **changes)

    def server_config(self) -> ServerConfig:
        """The span server's session limits, as this node was told."""
        return ServerConfig(
            max_sessions=self.max_sessions,
            max_cache_tokens=self.max_cache_tokens,
            session_idle=self.session_idle,
        )

    def compute_threads(self, cpu_count: int | None) -> int:
        """Torch threads for a machine with ``cpu_count`` cores (None: unknown)."""
        if self.threads is not None:
            return self.threads
        return max(1, (cpu_count or 1) - 1)

    def __post_init__(self) -> None:
        if not self.listen:
            raise ConfigError("listen: give at least one multiaddr to listen on")
        for addr in self.bootstrap:
            if "/p2p/" not in addr:
                raise ConfigError(
                    f"bootstrap address {addr!r} has no /p2p/<peer id>; "
                    "copy the full address that `shoal id` prints on that node"
                )
        if not self.swarm or not all(c.isalnum() or c in "-_." for c in self.swarm):
            raise ConfigError(f"swarm name {self.swarm!r}: use letters, digits, '-', '_', '.'")
        if self.api is not None:
            parse_bind(self.api)
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level {self.log_level!r}: use debug, info, warning or error")
        if self.target_peers < 1:
            raise ConfigError("target_peers must be at least 1")
        if not 1.0 <= self.offline_after <= 3600.0:
            raise ConfigError("offline_after must be between 1 and 3600 seconds")
        if not 1.0 <= self.dht_refresh <= 3600.0:
            raise ConfigError("dht_refresh must be between 1 and 3600 seconds")
        if self.blocks is not None:
            if self.model is None:
                raise ConfigError("blocks: give --model too (which model's blocks to serve)")
            parse_blocks(self.blocks)
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"dtype {self.dtype!r}: use fp32, bf16 or fp16")
        if self.quantize not in (None, "none", "int8", "int4"):
            raise ConfigError(f"quantize {self.quantize!r}: use int8, int4 or none")
        if self.max_sessions < 1 or self.max_cache_tokens < 1:
            raise ConfigError("max_sessions and max_cache_tokens must be at least 1")
        for name in ("session_idle", "step_timeout", "route_timeout"):
            if not 0.1 <= getattr(self, name) <= 86400:
                raise ConfigError(f"{name} must be between 0.1 and 86400 seconds")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads must be at least 1")
        if self.max_memory is not None:
            parse_size(self.max_memory)
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key is empty; give a token or leave it out")
        self._check_tp()

    def _check_tp(self) -> None:
        if self.tp_group is None:
            return
        if not self.tp_group or not all(c.isalnum() or c in "-_." for c in self.tp_group):
            raise ConfigError(f"tp_group {self.tp_group!r}: use letters, digits, '-', '_', '.'")
        if (
            self.model is None
            or self.blocks is None
            or not isinstance(parse_blocks(self.blocks), tuple)
        ):
            raise ConfigError("tp_group: give --model and --blocks A:B (the span the group serves)")
        if self.tp_size is not None and not 1 <= self.tp_size <= 64:
            raise ConfigError("tp_size must be between 1 and 64")
        if self.tp_topology not in ("auto", "star", "ring"):
            raise ConfigError(f"tp_topology {self.tp_topology!r}: use auto, star or ring")
        if self.tp_weight is not None and not 0 < self.tp_weight < 1e9:
            raise ConfigError("tp_weight must be a positive number")
        if self.max_memory is not None:
            raise ConfigError(
                "tp_group and max_memory together are not supported yet: a group member "
                "loads its slices whole; drop --max-memory, or give the group more members"
            )


def parse_blocks(blocks: str) -> tuple[int, int] | int | None:
    """``A:B`` -> (A, B); ``auto:N`` -> N; ``auto`` -> None (a third of the model)."""
    if blocks == "auto":
        return None
    if blocks.startswith("auto:") and blocks[5:].isdigit() and int(blocks[5:]) >= 1:
        return int(blocks[5:])
    start, sep, end = blocks.partition(":")
    if sep and start.isdigit() and end.isdigit() and int(start) < int(end):
        return int(start), int(end)
    raise ConfigError(
        f"blocks {blocks!r}: expected A:B with A < B (blocks A..B-1, e.g. 0:4), auto or auto:N"
    )


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(size: str) -> int:
    """``300MB`` / ``1.5GiB`` / ``1048576`` -> bytes (kB, MB, GB, TB are powers of 1000;
    KiB, MiB, GiB, TiB of 1024)."""
    text = size.strip()
    number = text.rstrip("kKmMgGtTiIbB ")
    unit = text[len(number) :].strip().lower()
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        value = -1.0
    if not 1 <= value < 2**60:  # also false for nan
        raise ConfigError(
            f"max_memory {size!r}: expected a positive size such as 300MB, 1.5GiB or "
            "4000000000 (units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    return int(value)


def parse_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); port 0 picks a free port."""
    host, sep, port = bind.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"api address {bind!r}: expected HOST:PORT, e.g. {DEFAULT_API}")
    return host.strip("[]"), int(port)


_TUPLES = {"listen", "announce", "bootstrap"}
_PATHS = {"data_dir", "swarm_key"}


def _coerce(name: str, value: Any) -> Any:
    if name in _TUPLES:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: expected a list of multiaddr strings")
        return tuple(value)
    if name in _PATHS:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{name}: expected a path")
        return Path(value).expanduser()
    if name == "api" and value in ("", "off", "none", False):
        return None
    return value


def load_config(path: Path | None, overrides: Mapping[str, Any]) -> NodeConfig:
    """Read ``path`` (TOML) if given, then apply ``overrides`` (flags; None = not given)."""
    known = {f.name for f in fields(NodeConfig)}
    values: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"config file {path}: unknown keys {unknown}; known: {sorted(known)}")
        values.update(data)
    for name, value in overrides.items():
        if name not in known:
            raise ConfigError(f"unknown option {name}")
        if value is not None and value != ():
            values[name] = value
    coerced = {name: _coerce(name, value) for name, value in values.items()}
    coerced.setdefault("data_dir", default_data_dir())
    types = {f.name: f.type for f in fields(NodeConfig)}
    for name in ("relay",):
        if name in coerced and not isinstance(coerced[name], bool):
            raise ConfigError(f"{name}: expected true or false, got {coerced[name]!r}")
    for name in (
        "swarm",
        "log_level",
        "model",
        "model_id",
        "blocks",
        "dtype",
        "quantize",
        "api_key",
        "max_memory",
        "tp_group",
        "tp_topology",
    ):
        if name in coerced and not isinstance(coerced[name], str):
            raise ConfigError(f"{name}: expected a string ({types[name]})")
    for name in ("target_peers", "max_sessions", "max_cache_tokens", "threads", "tp_size"):
        if name in coerced and not isinstance(coerced[name], int):
            raise ConfigError(f"{name}: expected an integer")
    for name in ("offline_after", "dht_refresh", "session_idle", "step_timeout", "route_timeout"):
        if name in coerced and not isinstance(coerced[name], int | float):
            raise ConfigError(f"{name}: expected a number of seconds")
    if "tp_weight" in coerced and not isinstance(coerced["tp_weight"], int | float):
        raise ConfigError("tp_weight: expected a number")
    return NodeConfig(**coerced)
