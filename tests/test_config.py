"""Node configuration: TOML file plus flags, flags winning; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.node.config import PI_MEMORY_SHARE, board_model, load_config, mem_available
from shoal.node.errors import ConfigError

PEER = "12D3KooWGkyJPZf5ggN5FTcbcWkgaTUvNfdpfHusqq3SiDBbVoHG"


def test_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        f'listen = ["/ip4/127.0.0.1/tcp/5000"]\nrelay = true\nswarm = "lab"\n'
        f'bootstrap = "/ip4/10.0.0.1/tcp/4001/p2p/{PEER}"\ndata_dir = "{tmp_path}/d"\n'
    )
    config = load_config(path, {"swarm": "prod", "relay": None, "listen": ()})
    assert config.swarm == "prod"  # the flag wins
    assert config.relay is True  # not given as a flag: the file's value stays
    assert config.listen == ("/ip4/127.0.0.1/tcp/5000",)
    assert config.bootstrap == (f"/ip4/10.0.0.1/tcp/4001/p2p/{PEER}",)
    assert config.data_dir == tmp_path / "d"
    assert config.api == "127.0.0.1:8470"


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHOAL_HOME", str(tmp_path))
    config = load_config(None, {})
    assert config.data_dir == tmp_path
    assert config.listen == ("/ip4/0.0.0.0/tcp/4001",)
    assert load_config(None, {"api": "off"}).api is None


@pytest.mark.parametrize(
    ("toml", "flags", "message"),
    [
        ("colour = 1\n", {}, "unknown keys"),
        ("relay = 'yes'\n", {}, "expected true or false"),
        ("listen = 3\n", {}, "expected a list"),
        ("", {"bootstrap": ("/ip4/1.2.3.4/tcp/4001",)}, "has no /p2p/"),
        ("", {"api": "localhost"}, "expected HOST:PORT"),
        ("", {"swarm": "a b"}, "swarm name"),
        ("not toml [", {}, "not valid TOML"),
    ],
)
def test_bad_config(tmp_path: Path, toml: str, flags: dict, message: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path, flags)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"tp_group": "g"}, "give --model and --blocks A:B"),
        ({"tp_group": "g", "model": "m", "blocks": "auto"}, "give --model and --blocks A:B"),
        ({"tp_group": "g h", "model": "m", "blocks": "0:4"}, "tp_group 'g h'"),
        ({"tp_group": "g", "model": "m", "blocks": "0:4", "tp_topology": "mesh"}, "auto, star"),
        ({"tp_group": "g", "model": "m", "blocks": "0:4", "tp_size": 0}, "tp_size"),
        ({"tp_group": "g", "model": "m", "blocks": "0:4", "tp_weight": -1.0}, "tp_weight"),
        ({"tp_group": "g", "model": "m", "blocks": "0:4", "tp_weight": "x"}, "tp_weight"),
        (
            {"tp_group": "g", "model": "m", "blocks": "0:4", "max_memory": "300MB"},
            "max_memory together are not supported",
        ),
    ],
)
def test_tensor_parallel_flags_are_checked(tmp_path: Path, flags: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"data_dir": tmp_path} | flags)


def test_tensor_parallel_flags(tmp_path: Path) -> None:
    flags = {"tp_group": "lan", "model": "m", "blocks": "0:4", "tp_size": 3, "tp_weight": 2}
    config = load_config(None, {"data_dir": tmp_path} | flags)
    assert (config.tp_group, config.tp_size, config.tp_topology, config.tp_weight) == (
        "lan",
        3,
        "auto",
        2,
    )


def test_raspberry_pi_defaults_fill_only_what_was_not_given(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.write_bytes(b"Raspberry Pi 5 Model B Rev 1.0\0")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        8245032 kB\nMemAvailable:    6000000 kB\n")
    board, available = board_model(model), mem_available(meminfo)
    assert (board, available) == ("Raspberry Pi 5 Model B Rev 1.0", 6_144_000_000)

    plain = load_config(None, {"data_dir": tmp_path, "model": "shoal-tiny"})
    pi = plain.with_edge_defaults(board, available)
    assert (pi.quantize, pi.weight_quantization) == ("int8", "int8")
    assert pi.max_memory == str(int(6_144_000_000 * PI_MEMORY_SHARE))
    assert plain.with_edge_defaults("Intel NUC", available) == plain
    assert plain.with_edge_defaults(None, available) == plain

    given = load_config(
        None,
        {"data_dir": tmp_path, "model": "shoal-tiny", "quantize": "none", "max_memory": "1GB"},
    ).with_edge_defaults(board, available)
    assert (given.quantize, given.weight_quantization, given.max_memory) == ("none", None, "1GB")
    member = load_config(
        None, {"data_dir": tmp_path, "model": "m", "blocks": "0:4", "tp_group": "lan"}
    ).with_edge_defaults(board, available)
    assert (member.quantize, member.max_memory) == ("int8", None)  # a member loads whole
    assert board_model(tmp_path / "absent") is None and mem_available(tmp_path / "x") is None
