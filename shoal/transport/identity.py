"""The node's persistent Ed25519 identity.

The key lives in ``<data_dir>/identity.key`` as the libp2p protobuf encoding of the
private key (the format go-libp2p and rust-libp2p use too), with file mode 0600. A key
file that cannot be parsed, or that other users can read, is an error: silently making a
new identity would change the node's peer id and orphan everything announced under it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

from shoal.transport.errors import IdentityError

IDENTITY_FILE = "identity.key"


def load_or_create_identity(data_dir: Path) -> KeyPair:
    """Load the identity in ``data_dir``, creating one (mode 0600) on first start."""
    path = data_dir / IDENTITY_FILE
    if path.exists():
        return load_identity(path)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    private = Ed25519PrivateKey.new()
    blob = private.serialize()
    # O_EXCL: two processes starting on one data dir must not both write a key.
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, blob)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        tmp.unlink()
        return load_identity(path)
    tmp.unlink()
    return KeyPair(private, private.get_public_key())


def load_identity(path: Path) -> KeyPair:
    """Load an existing identity, refusing one that is corrupt or readable by others."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise IdentityError(
            f"{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}` "
            "if you trust it, or delete it to make a new identity (a new peer id)"
        )
    blob = path.read_bytes()
    try:
        private = deserialize_private_key(blob)
    except Exception as exc:
        raise IdentityError(
            f"{path} is not a valid libp2p private key ({exc}); restore it from a backup, "
            "or delete it to make a new identity (a new peer id)"
        ) from exc
    if private.get_type() != KeyType.Ed25519:
        raise IdentityError(f"{path} holds a {private.get_type().name} key; shoal needs Ed25519")
    return KeyPair(private, private.get_public_key())


def peer_id_of(key_pair: KeyPair) -> ID:
    return ID.from_pubkey(key_pair.public_key)
