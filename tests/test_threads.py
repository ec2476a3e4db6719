"""The node's torch thread count: --threads, else the machine's cores minus one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shoal.node.config import load_config
from shoal.node.daemon import set_torch_threads
from shoal.node.errors import ConfigError


def test_default_leaves_a_core_for_networking(tmp_path: Path) -> None:
    config = load_config(None, {"data_dir": tmp_path})
    assert config.threads is None
    assert config.compute_threads(4) == 3
    assert config.compute_threads(2) == 1
    assert config.compute_threads(1) == 1
    assert config.compute_threads(None) == 1


def test_flag_and_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("threads = 2\n")
    assert load_config(path, {"data_dir": tmp_path}).compute_threads(8) == 2
    assert load_config(path, {"data_dir": tmp_path, "threads": 5}).compute_threads(8) == 5
    with pytest.raises(ConfigError, match="threads must be at least 1"):
        load_config(None, {"data_dir": tmp_path, "threads": 0})
    path.write_text('threads = "4"\n')
    with pytest.raises(ConfigError, match="threads: expected an integer"):
        load_config(path, {"data_dir": tmp_path})


def test_daemon_sets_torch_threads(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    try:
        assert set_torch_threads(load_config(None, {"data_dir": tmp_path, "threads": 1})) == 1
        assert torch.get_num_threads() == 1
        assert set_torch_threads(load_config(None, {"data_dir": tmp_path, "threads": 2})) == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
