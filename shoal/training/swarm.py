"""The trio shell of a DiLoCo round among real peers: the inner phase on a worker thread,
the pseudo-gradient through the collectives driver, the outer step on a worker thread.

    record = await swarm_round(peer, driver, [Member(pid, weight=1.0), ...], codec="fp32")

Every member computes the same view from the round's agreed member list (sorted by peer
id inside ``make_view``), so the operation's tag is ``<run id>/round-<n>``. The driver
hands every completing peer the same averaged bytes; the outer step is deterministic, so
the new state hashes are equal on every peer that completes. The record's members are the
all-reduce's contributors (peers that failed before the commit are left out).
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from shoal.collectives import Member, make_view
from shoal.collectives.driver import CollectivesDriver
from shoal.training.diloco import DilocoPeer
from shoal.training.runlog import RoundRecord


def round_tag(run_id: str, round_: int, attempt: int = 0) -> str:
    return f"{run_id}/round-{round_}" + (f"/attempt-{attempt}" if attempt else "")


async def swarm_round(
    peer: DilocoPeer,
    driver: CollectivesDriver,
    members: Sequence[Member],
    *,
    codec: str = "fp32",
) -> RoundRecord:
    """One DiLoCo round of ``peer`` with the other ``members``; raises the all-reduce's
    ``OperationFailed`` (the state is then unchanged: the caller may retry the round's
    average with the survivors, or resync)."""
    pseudo_gradient = await trio.to_thread.run_sync(peer.inner_phase)
    view = make_view(
        round_tag(peer.run_id, peer.state.round + 1),
        members,
        (peer.state.layout.numel,),
        codec=codec,
    )
    sent_before = driver.bytes_sent
    result = await driver.all_reduce(view, pseudo_gradient)
    sent = driver.bytes_sent - sent_before

    def outer() -> RoundRecord:
        return peer.outer_phase(result.tensor, result.contributors, bytes_sent=sent)

    return await trio.to_thread.run_sync(outer)


__all__ = ["round_tag", "swarm_round"]
