"""The view of one operation: who takes part, who owns which chunk, who coordinates.

Every member builds the same :class:`View` from the same inputs (the run's agreed member
list with declared weights and bandwidths, the tensor's shape, the codec), so the view is
*computed*, not negotiated; its hash ``vh`` travels in every message and a peer holding
another view is refused (:class:`ViewMismatch`). Everything here is a pure function of the
view and a contributor set ``S``: chunk bounds (proportional to declared bandwidth,
aligned to the codec block), the owner and backup of each chunk under ``S``, the
coordinator ranking.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgpack

from shoal.collectives.codec import CODECS, DEFAULT_BLOCK, payload_nbytes
from shoal.collectives.errors import CollectiveError

DOMAIN = "shoal-allreduce/1"
MAX_TAG = 256
MAX_MEMBERS = 256
MAX_ELEMENTS = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Member:
    """One peer of an operation.

    ``weight`` is its share in the weighted average (e.g. tokens processed);
    ``bandwidth`` its declared upload bandwidth (any unit, only ratios matter): chunk
    ownership is proportional to it, and 0 means it owns nothing (a NAT'd or relayed peer).
    """

    peer: str
    weight: float = 1.0
    bandwidth: float = 1.0


@dataclass(frozen=True, slots=True)
class View:
    """One attempt of one operation, as every member computes it. Build with :func:`make_view`."""

    tag: str
    attempt: int
    members: tuple[Member, ...]
    shape: tuple[int, ...]
    codec: str
    block: int
    quorum: int
    bounds: tuple[int, ...]
    first_owner: tuple[int, ...]  # member index of each chunk's initial owner
    vh: bytes = field(default=b"")
    peers: tuple[str, ...] = field(default=())
    _ranking: tuple[str, ...] = field(default=())

    @property
    def numel(self) -> int:
        return self.bounds[-1]

    @property
    def n_chunks(self) -> int:
        return len(self.bounds) - 1

    def chunk(self, c: int) -> tuple[int, int]:
        return self.bounds[c], self.bounds[c + 1]

    def chunk_len(self, c: int) -> int:
        return self.bounds[c + 1] - self.bounds[c]

    def chunk_nbytes(self, c: int) -> int:
        return payload_nbytes(self.codec, self.chunk_len(c), self.block)

    def max_chunk_nbytes(self) -> int:
        return max((self.chunk_nbytes(c) for c in range(self.n_chunks)), default=0)

    def weight(self, peer: str) -> float:
        return self.members[self.peers.index(peer)].weight

    def candidates(self, c: int) -> list[str]:
        """Owner-capable members in the order they take chunk ``c`` over: the initial owner,
        then the next owner-capable members in view order (the first of them is the backup)."""
        capable = [m.peer for m in self.members if m.bandwidth > 0]
        start = capable.index(self.members[self.first_owner[c]].peer)
        return capable[start:] + capable[:start]

    def owner(self, c: int, contributors: Iterable[str]) -> str | None:
        s = set(contributors)
        return next((p for p in self.candidates(c) if p in s), None)

    def backup(self, c: int, contributors: Iterable[str]) -> str | None:
        s = set(contributors)
        found = [p for p in self.candidates(c) if p in s]
        return found[1] if len(found) > 1 else None

    def holders(self, c: int, contributors: Iterable[str]) -> list[str]:
        """Where to fetch committed chunk ``c``: owner, backup, then every other member."""
        first = [p for p in (self.owner(c, contributors), self.backup(c, contributors)) if p]
        return first + [p for p in self.peers if p not in first]

    def coordinator(self, epoch: int) -> str:
        """The coordinator of ``epoch``: a ranking by H(tag, attempt, peer), rotating."""
        return self._ranking[epoch % len(self._ranking)]


def make_view(
    tag: str,
    members: Sequence[Member],
    shape: Sequence[int],
    *,
    codec: str = "fp32",
    block: int = DEFAULT_BLOCK,
    attempt: int = 0,
    quorum: int | None = None,
) -> View:
    """Validate the inputs and compute the view (members sorted by peer id)."""
    if not isinstance(tag, str) or not 0 < len(tag) <= MAX_TAG:
        raise CollectiveError(f"operation tag must be a string of 1..{MAX_TAG} characters")
    if codec not in CODECS:
        raise CollectiveError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")
    if not 1 <= block <= 2**16:
        raise CollectiveError(f"block {block} is not in 1..65536")
    if attempt < 0:
        raise CollectiveError("attempt must be >= 0")
    ordered = tuple(sorted(members, key=lambda m: m.peer))
    peers = tuple(m.peer for m in ordered)
    if not 0 < len(peers) <= MAX_MEMBERS or len(set(peers)) != len(peers):
        raise CollectiveError(f"a view needs 1..{MAX_MEMBERS} distinct members")
    for m in ordered:
        if not m.peer or len(m.peer) > 128:
            raise CollectiveError(f"bad peer id {m.peer!r}")
        if not (math.isfinite(m.weight) and m.weight > 0):
            raise CollectiveError(f"{m.peer}: weight must be finite and > 0")
        if not (math.isfinite(m.bandwidth) and m.bandwidth >= 0):
            raise CollectiveError(f"{m.peer}: bandwidth must be finite and >= 0")
    if not any(m.bandwidth > 0 for m in ordered):
        raise CollectiveError("no member can own a chunk (every bandwidth is 0)")
    dims = tuple(int(d) for d in shape)
    if len(dims) > 8 or any(d < 0 for d in dims):
        raise CollectiveError(f"bad shape {dims}")
    numel = math.prod(dims)
    if not 0 < numel <= MAX_ELEMENTS:
        raise CollectiveError(f"a tensor of {numel} elements cannot be all-reduced")
    n = len(peers)
    q = n // 2 + 1 if quorum is None else quorum
    if not n / 2 < q <= n:
        raise CollectiveError(f"quorum {q} is not a majority of {n} members")
    bounds, first_owner = _split(ordered, numel, block if codec == "int8" else 1)
    ranking = tuple(
        sorted(peers, key=lambda p: hashlib.blake2b(f"{tag}\0{attempt}\0{p}".encode()).digest())
    )
    canonical = [
        DOMAIN,
        tag,
        attempt,
        [[m.peer, m.weight, m.bandwidth] for m in ordered],
        list(dims),
        codec,
        block,
        q,
        list(bounds),
        list(first_owner),
    ]
    vh = hashlib.blake2b(msgpack.packb(canonical, use_bin_type=True), digest_size=16).digest()
    return View(
        tag, attempt, ordered, dims, codec, block, q, bounds, first_owner, vh, peers, ranking
    )


def _split(
    members: tuple[Member, ...], numel: int, align: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Chunk bounds proportional to bandwidth (largest-remainder rounding, in units of
    ``align`` elements so int8 blocks never straddle chunks), one chunk per owner that gets
    at least one unit."""
    units = -(-numel // align)
    capable = [(i, m.bandwidth) for i, m in enumerate(members) if m.bandwidth > 0]
    total = sum(bw for _, bw in capable)
    quotas = [units * bw / total for _, bw in capable]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(capable)), key=lambda k: (-(quotas[k] - counts[k]), k))
    for k in order[: units - sum(counts)]:
        counts[k] += 1
    bounds, owners, at = [0], [], 0
    for (i, _), count in zip(capable, counts, strict=True):
        if count:
            at += count * align
            bounds.append(min(at, numel))
            owners.append(i)
    return tuple(bounds), tuple(owners)
