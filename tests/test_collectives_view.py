"""The view: chunk ownership proportional to declared bandwidth, owner/backup under a
contributor set, the view hash, input validation."""

from __future__ import annotations

import pytest

from shoal.collectives import Member, make_view
from shoal.collectives.errors import CollectiveError


def test_chunks_are_proportional_to_bandwidth() -> None:
    members = [Member(f"p{i}", bandwidth=float(i + 1)) for i in range(4)]
    view = make_view("t", members, (1000,))
    assert view.bounds == (0, 100, 300, 600, 1000)
    assert [view.members[i].peer for i in view.first_owner] == ["p0", "p1", "p2", "p3"]


def test_zero_bandwidth_owns_nothing_and_int8_chunks_align_to_blocks() -> None:
    members = [Member("a", bandwidth=1), Member("b", bandwidth=0), Member("c", bandwidth=2)]
    view = make_view("t", members, (10, 100), codec="int8", block=64)
    assert view.n_chunks == 2
    assert all(b % 64 == 0 for b in view.bounds[:-1]) and view.bounds[-1] == 1000
    assert [view.members[i].peer for i in view.first_owner] == ["a", "c"]
    # 16 blocks split 1:2 with largest-remainder rounding
    assert view.bounds == (0, 5 * 64, 1000)
    assert view.owner(0, ["a", "b", "c"]) == "a" and view.backup(0, ["a", "b", "c"]) == "c"
    assert view.owner(0, ["b", "c"]) == "c" and view.backup(0, ["b", "c"]) is None
    assert view.owner(0, ["b"]) is None
    assert view.holders(1, ["a", "b", "c"]) == ["c", "a", "b"]


def test_view_hash_depends_on_every_input() -> None:
    base = dict(tag="t", members=[Member("a"), Member("b")], shape=(4,))
    h = make_view(**base).vh  # type: ignore[arg-type]
    assert make_view(**base).vh == h  # type: ignore[arg-type]
    assert make_view("t", [Member("b"), Member("a")], (4,)).vh == h  # order-free
    others = [
        make_view("u", [Member("a"), Member("b")], (4,)),
        make_view("t", [Member("a", weight=2), Member("b")], (4,)),
        make_view("t", [Member("a", bandwidth=3), Member("b")], (4,)),
        make_view("t", [Member("a"), Member("b")], (2, 2)),
        make_view("t", [Member("a"), Member("b")], (4,), codec="fp16"),
        make_view("t", [Member("a"), Member("b")], (4,), attempt=1),
    ]
    assert len({v.vh for v in others} | {h}) == 7


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(tag="", members=[Member("a")], shape=(4,)),
        dict(tag="t", members=[Member("a"), Member("a")], shape=(4,)),
        dict(tag="t", members=[Member("a", weight=0)], shape=(4,)),
        dict(tag="t", members=[Member("a", weight=float("nan"))], shape=(4,)),
        dict(tag="t", members=[Member("a", bandwidth=0)], shape=(4,)),
        dict(tag="t", members=[Member("a")], shape=(0,)),
        dict(tag="t", members=[Member("a")], shape=(4,), codec="int4"),
        dict(tag="t", members=[Member("a"), Member("b")], shape=(4,), quorum=1),
    ],
)
def test_bad_views_are_refused(kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(CollectiveError):
        make_view(**kwargs)
