"""The persistent Ed25519 identity and swarm keys."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shoal.transport.errors import IdentityError, SwarmKeyError
from shoal.transport.identity import IDENTITY_FILE, load_or_create_identity, peer_id_of
from shoal.transport.swarmkey import generate_swarm_key, parse_swarm_key, write_swarm_key


def test_identity_is_created_private_and_stable(tmp_path: Path) -> None:
    first = peer_id_of(load_or_create_identity(tmp_path / "node"))
    key_file = tmp_path / "node" / IDENTITY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key_file.read_bytes()) == 36  # libp2p protobuf: 4-byte header + 32-byte seed
    again = peer_id_of(load_or_create_identity(tmp_path / "node"))
    assert again == first
    assert str(first).startswith("12D3KooW")  # Ed25519 peer ids are identity multihashes


def test_identity_readable_by_others_is_refused(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path)
    os.chmod(tmp_path / IDENTITY_FILE, 0o644)
    with pytest.raises(IdentityError, match="readable by other users"):
        load_or_create_identity(tmp_path)


def test_corrupt_identity_is_refused_not_replaced(tmp_path: Path) -> None:
    key_file = tmp_path / IDENTITY_FILE
    load_or_create_identity(tmp_path)
    key_file.write_bytes(b"\x08\x01garbage")
    with pytest.raises(IdentityError, match="not a valid libp2p private key"):
        load_or_create_identity(tmp_path)
    assert key_file.read_bytes() == b"\x08\x01garbage"


def test_swarm_key_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "swarm.key"
    write_swarm_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = parse_swarm_key(path.read_text())
    assert len(bytes.fromhex(key)) == 32
    with pytest.raises(FileExistsError):
        write_swarm_key(path)
    assert parse_swarm_key(generate_swarm_key()) != key


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/key/swarm/psk/1.0.0/\n/base64/\nAAAA\n",
        "/key/swarm/psk/1.0.0/\n/base16/\nabcd\n",
        "/key/swarm/psk/1.0.0/\n/base16/\n" + "zz" * 32 + "\n",
    ],
)
def test_bad_swarm_keys(text: str) -> None:
    with pytest.raises(SwarmKeyError):
        parse_swarm_key(text)
