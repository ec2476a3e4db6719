"""``--tp-group``: serve a span as one member of a tensor-parallel group.

Every member writes a roster field ``tp`` (group, model, span, weight, addresses) and
waits until the swarm state shows the group complete (``--tp-size`` members, or those
seen within :data:`TP_LISTEN` seconds). The member with the lowest peer id leads: it
sends each member the plan and loads its own slices, then serves and announces the span
like any server (its block runner is the group's step). The other members only answer
the group's calls; they announce nothing. If a member fails, the leader withdraws its
announcement (the group can no longer compute the span) and answers steps with an error,
so clients re-route.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from shoal.node.errors import NodeError
from shoal.pipeline.loading import open_checkpoint
from shoal.pipeline.model import Span
from shoal.pipeline.serving import ModelFiles, SpanServer, measure_throughput
from shoal.pipeline.tensor_parallel import Shard, ShardedSpan, load_shard
from shoal.pipeline.tp_group import (
    PLAN_TIMEOUT,
    TP,
    GroupJoin,
    TensorGroup,
    group_candidates,
    measure_speed,
)

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from shoal.node.daemon import Node

log = logging.getLogger(__name__)

#: Seconds a member without ``--tp-size`` listens to the roster before the group forms.
TP_LISTEN = 5.0
#: Seconds a member with ``--tp-size`` waits for the others to appear.
TP_WAIT = 120.0


async def serve_tp_member(node: Node, *, task_status: TaskStatus[SpanServer | None]) -> None:
    """Join ``--tp-group``; the leader's :class:`SpanServer` (None on other members)."""
    from shoal.node.daemon import model_name, set_torch_threads

    config = node.config
    assert config.model is not None and config.tp_group is not None
    threads = set_torch_threads(config)
    checkpoint = await trio.to_thread.run_sync(open_checkpoint, config.model)
    model_id = config.model_id or model_name(config.model)
    num_blocks = checkpoint.config.num_layers
    assert config.blocks is not None
    start, _, end_text = config.blocks.partition(":")
    first, end = int(start), int(end_text)
    if end > num_blocks:
        raise NodeError(f"--blocks {config.blocks} is past the end of {model_id} ({num_blocks})")
    span = Span(start=first, end=end, embed=first == 0, head=end == num_blocks)

    def load(shard: Shard) -> ShardedSpan:
        # only the leader (rank 0) serves the embedding and the head
        mine = span if shard.rank == 0 else Span(start=first, end=end)
        return load_shard(
            checkpoint, mine, shard, dtype=config.dtype, quantize=config.weight_quantization
        )

    join = GroupJoin(
        node.host,
        group=config.tp_group,
        model=model_id,
        start=first,
        end=end,
        load=load,
        topology=config.tp_topology,
        session_idle=config.session_idle + 60.0,  # outlive the leader's sessions
    )
    node.host.channels.serve(TP, join.handle)
    weight = config.tp_weight
    if weight is None:
        weight = await trio.to_thread.run_sync(measure_speed)
    node.sync.write("peer", "tp", join.roster_field(weight))
    log.info(
        "tensor-parallel group %s: blocks %d:%d of %s, weight %.2f, %d thread(s); waiting "
        "for %s member(s)",
        config.tp_group, first, end, model_id, weight, threads, config.tp_size or "the",
    )  # fmt: skip
    candidates = await _wait_for_members(node, join, config.tp_size)
    me = str(node.host.peer_id)
    if min(candidates) == me:
        group = await join.lead(candidates, checkpoint.config, quantize=config.weight_quantization)
    else:
        with trio.move_on_after(PLAN_TIMEOUT):
            await join.formed.wait()
        if join.group is None:
            raise NodeError(
                f"tensor-parallel group {config.tp_group}: no plan from the leader "
                f"{min(candidates)} within {PLAN_TIMEOUT:.0f}s"
            )
        group = join.group
    node.tp_group = group
    if not group.is_leader:
        task_status.started(None)
        return
    await _serve_as_leader(node, group, model_id, checkpoint.directory, task_status)


async def _wait_for_members(
    node: Node, join: GroupJoin, size: int | None
) -> dict[str, tuple[float, list[str]]]:
    me = str(node.host.peer_id)
    deadline = trio.current_time() + (TP_WAIT if size is not None else TP_LISTEN)
    while True:
        online = node.sync.liveness.online(trio.current_time()) | {me}
        found = group_candidates(
            node.sync.state.section("peer"),
            online,
            group=join.name,
            model=join.model,
            start=join.start,
            end=join.end,
        )
        if size is not None and len(found) >= size:
            return found
        if trio.current_time() >= deadline:
            if size is None and me in found:
                return found
            raise NodeError(
                f"tensor-parallel group {join.name}: {len(found)} of {size} members appeared "
                f"within {TP_WAIT:.0f}s ({', '.join(sorted(found)) or 'none'})"
            )
        await trio.sleep(0.2)


async def _serve_as_leader(
    node: Node,
    group: TensorGroup,
    model_id: str,
    directory: Path,
    task_status: TaskStatus[SpanServer | None],
) -> None:
    config = node.config
    weights = group.weights
    throughput = await trio.to_thread.run_sync(
        # a short measurement: every all-reduce of it crosses the network
        lambda: measure_throughput(weights, steps=4, prefill=4, runner=group.run_blocks)
    )
    files = await trio.to_thread.run_sync(ModelFiles.read, directory)
    server = SpanServer(
        node.host,
        model_id,
        weights,
        files,
        config.server_config(),
        throughput=throughput,
        block_runner=group.run_blocks,
    )
    start, end = weights.span.start, weights.span.end

    def broken(reason: str) -> None:
        node.discovery.withdraw(model_id)
        log.error("withdrew blocks %d:%d of %s: the group broke (%s)", start, end, model_id, reason)

    group.on_broken(broken)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        node.discovery.announce(model_id, start, end)
        node.sync.write("models", model_id, {"num_blocks": weights.config.num_layers})
        log.info(
            "serving blocks %d:%d of %s as group %s (%d members) at %.1f steps/s",
            start, end, model_id, group.plan.group, group.n, throughput,
        )  # fmt: skip
        task_status.started(server)
