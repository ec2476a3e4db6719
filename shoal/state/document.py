"""The swarm state: one pycrdt document per author, fed only by signed updates.

Why per author and not one shared Yjs document: the trust rule is "a peer may write only
what it owns". In one shared document, enforcing that means parsing Yjs update internals
(a delete set can name other authors' items, and takes effect later on peers that have
not seen them yet), and a signed log of such a document cannot be compacted without its
authors. With one document per author, the rule is a signature check (an update for
author X's document must be signed by X), and compaction is X re-signing a snapshot of
its own document. Readers see one merged view (roster, registry, run logs) across all.

This module is sans-io: updates in, updates out, no awaits. ``sync.py`` moves them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from pycrdt import Doc, Map

from shoal.state.errors import RejectedUpdate, StateError
from shoal.state.records import SignedUpdate, sign_update

SECTIONS = ("peer", "models", "runs")
MAX_PENDING_PER_AUTHOR = 256
MAX_LOG_PER_AUTHOR = 4096
MAX_AUTHORS = 10_000


def client_id_of(author: str) -> int:
    """A stable Yjs client id per author, so a restarted author continues its clock."""
    return int.from_bytes(hashlib.sha256(author.encode()).digest()[:4], "big")


@dataclass
class AuthorLog:
    """One author's document and the signed updates that built it (since its snapshot)."""

    author: str
    doc: Doc = field(init=False)
    seq: int = 0
    log: list[SignedUpdate] = field(default_factory=list)
    pending: dict[int, SignedUpdate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.doc = _new_doc(self.author)

    def content(self) -> dict[str, Any]:
        return {name: self.doc.get(name, type=Map).to_py() or {} for name in SECTIONS}


def _new_doc(author: str) -> Doc:
    doc: Doc = Doc(client_id=client_id_of(author))
    for name in SECTIONS:
        doc.get(name, type=Map)
    return doc


class SwarmState:
    """Every author's document for one swarm, and this node's own writes to its own."""

    def __init__(self, swarm: str, key_pair: KeyPair, *, compact_every: int = 64) -> None:
        self.swarm = swarm
        self.key_pair = key_pair
        self.me = ID.from_pubkey(key_pair.public_key).to_base58()
        self.compact_every = compact_every
        self.authors: dict[str, AuthorLog] = {self.me: AuthorLog(self.me)}

    # ---- receiving -------------------------------------------------------------------

    def receive(self, update: SignedUpdate, sender: str | None = None) -> list[SignedUpdate]:
        """Verify and apply an update; returns the updates applied (to forward, persist).

        Updates of one author are applied in sequence order; a later one waits (bounded)
        for the ones before it. Duplicates and superseded updates return ``[]``.
        """
        log = self.authors.get(update.author)
        if log is not None and (update.seq <= log.seq or update.seq in log.pending):
            return []  # a duplicate (gossip, overlapping pulls): no signature check needed
        try:
            update.verify(self.swarm)
        except RejectedUpdate as exc:
            raise RejectedUpdate(exc.author, exc.reason, sender) from None
        if log is None:
            if len(self.authors) >= MAX_AUTHORS:
                raise RejectedUpdate(update.author, "too many authors in this swarm", sender)
            log = self.authors[update.author] = AuthorLog(update.author)
        if update.seq <= log.seq:
            return []
        if update.kind == "delta" and update.seq != log.seq + 1:
            if len(log.pending) >= MAX_PENDING_PER_AUTHOR:
                raise RejectedUpdate(update.author, "too many updates out of order", sender)
            log.pending[update.seq] = update
            return []
        applied = [self._apply(log, update, sender)]
        while (following := log.pending.pop(log.seq + 1, None)) is not None:
            applied.append(self._apply(log, following, sender))
        for seq in [s for s in log.pending if s <= log.seq]:
            del log.pending[seq]
        return applied

    def _apply(self, log: AuthorLog, update: SignedUpdate, sender: str | None) -> SignedUpdate:
        if update.kind == "snapshot":
            doc = _new_doc(log.author)
            _apply_bytes(doc, update, sender)
            log.doc, log.log = doc, [update]
        else:
            if len(log.log) >= MAX_LOG_PER_AUTHOR:
                raise RejectedUpdate(log.author, "author never compacts its log", sender)
            _apply_bytes(log.doc, update, sender)
            log.log.append(update)
        log.seq = update.seq
        return update

    # ---- writing our own document ----------------------------------------------------

    def write(self, section: str, key: str, value: Any) -> list[SignedUpdate]:
        """Set (or with ``None``, delete) ``section[key]`` in our own document.

        Returns the signed updates to send: the delta, and a snapshot when the log is due
        for compaction.
        """
        if section not in SECTIONS:
            raise StateError(f"unknown section {section!r}; one of {SECTIONS}")
        own = self.authors[self.me]
        before = own.doc.get_state()
        with own.doc.transaction():
            target = own.doc.get(section, type=Map)
            if value is None:
                if key in target:
                    del target[key]
            else:
                target[key] = value
        out = [self._sign_own(own, "delta", own.doc.get_update(before))]
        if len(own.log) >= self.compact_every:
            out.append(self._sign_own(own, "snapshot", own.doc.get_update()))
        return out

    def _sign_own(self, own: AuthorLog, kind: str, update: bytes) -> SignedUpdate:
        signed = sign_update(self.key_pair, self.swarm, own.seq + 1, kind, update)
        own.seq = signed.seq
        own.log = [signed] if kind == "snapshot" else [*own.log, signed]
        return signed

    # ---- anti-entropy ----------------------------------------------------------------

    def vector(self) -> dict[str, int]:
        """Highest sequence number applied, per author."""
        return {author: log.seq for author, log in self.authors.items() if log.seq}

    def missing(self, theirs: Mapping[str, int], limit: int = 512) -> list[SignedUpdate]:
        """Updates a peer with vector ``theirs`` lacks, oldest first, at most ``limit``."""
        out: list[SignedUpdate] = []
        for author, log in sorted(self.authors.items()):
            have = theirs.get(author, 0)
            if have >= log.seq:
                continue
            first = log.log[0].seq if log.log else log.seq + 1
            # Older than our snapshot: they get the snapshot and everything after it.
            start = 0 if have < first else have - first + 1
            out.extend(log.log[start:])
            if len(out) >= limit:
                break
        return out[:limit]

    def all_updates(self) -> Iterable[SignedUpdate]:
        for log in self.authors.values():
            yield from log.log

    # ---- reading ---------------------------------------------------------------------

    def section(self, name: str) -> dict[str, dict[str, Any]]:
        """``{author: that author's section}`` for every author that wrote something."""
        if name not in SECTIONS:
            raise StateError(f"unknown section {name!r}; one of {SECTIONS}")
        out = {}
        for author, log in self.authors.items():
            content = log.doc.get(name, type=Map).to_py()
            if content:
                out[author] = content
        return out

    def digest(self) -> str:
        """A hash of the whole state: equal on two nodes iff they hold the same state."""
        h = hashlib.sha256()
        for author in sorted(self.authors):
            log = self.authors[author]
            if not log.seq:
                continue
            content = json.dumps(log.content(), sort_keys=True, separators=(",", ":"))
            h.update(f"{author}\x00{log.seq}\x00{content}\x00".encode())
        return h.hexdigest()


def _apply_bytes(doc: Doc, update: SignedUpdate, sender: str | None) -> None:
    try:
        doc.apply_update(update.update)
    except Exception as exc:  # yrs raises its own types for malformed updates
        raise RejectedUpdate(update.author, f"malformed CRDT update ({exc})", sender) from exc
