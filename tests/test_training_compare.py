"""DiLoCo (H=50) against all-reducing gradients every step, 3 peers, a small byte model:
held-out loss within 5 % with at least 20x fewer bytes, bytes counted by the all-reduce.

The comparison itself is scripts/bench/diloco.py (the same code runs shoal-tiny's
architecture there); this test runs it on tests/training_peer.py's TINY-sized model.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from conftest import load_bench_script

bench = load_bench_script("diloco")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: the runs (and so the asserted losses) are deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_all_reduce_bytes_follow_the_protocol() -> None:
    """3 peers, fp32: each sends 2/3 of the tensor to the owners, its own reduced third to
    its backup, and that third to the one peer that is neither owner nor backup, i.e.
    4/3 of the tensor, plus headers and control messages (a few hundred bytes)."""
    numel = 3 * 10_000
    tensors = {p: torch.full((numel,), float(i)) for i, p in enumerate(bench.PEERS)}
    average, sent = bench.all_reduce(tensors, "bytes/0")
    assert torch.equal(average, torch.full((numel,), 1.0))
    for peer, n in sent.items():
        assert 4 * numel * 4 // 3 < n < 4 * numel * 4 // 3 + 2048, (peer, n)


def test_diloco_h50_is_within_5_percent_of_per_step_with_20x_fewer_bytes(
    one_thread: None,
) -> None:
    """500 inner steps of 8x64 bytes per peer (10 rounds of H=50), the same batches both
    ways, every average through the sans-io all-reduce (fp32) on the in-memory network.
    Outer Nesterov lr 0.7 with momentum 0.5: the DiLoCo paper's 0.9 ends 10 % behind in
    runs this short (docs/training.md)."""
    setup = bench.Setup(
        model=bench.SMALL,
        steps=500,
        inner_steps=50,
        batch=8,
        seq=64,
        inner_lr=3e-3,
        outer_lr=0.7,
        outer_momentum=0.5,
        eval_windows=64,
    )
    result = bench.compare(setup)
    per_step, diloco = result.per_step, result.diloco
    assert per_step.steps == diloco.steps == [50, 100, 150, 200, 250, 300, 350, 400, 450, 500]
    # both really trained: from ~5.5 nats/byte (uniform) to well under the unigram ~3.3
    assert result.initial_loss > 5.0
    assert per_step.loss[-1] < 2.3 and diloco.loss[-1] < 2.3, (per_step.loss, diloco.loss)
    # the property
    assert result.loss_ratio <= 1.05, (per_step.loss, diloco.loss)
    assert result.bytes_ratio >= 20, (per_step.bytes, diloco.bytes)
    # the bytes are the all-reduce's: 500 all-reduces against 10, each about 4/3 of the
    # parameters' fp32 bytes per peer
    one = 3 * 4 * result.params * 4 / 3
    assert one < diloco.bytes[-1] / 10 < one * 1.01
    assert one < per_step.bytes[-1] / 500 < one * 1.01


def test_loss_against_bytes_reach_is_diloco_s_first_point_within_5_percent() -> None:
    """The loss-against-bytes reading: DiLoCo may run longer than per step; the ratios at
    equal steps and the first DiLoCo point within 5 % of per step's final loss."""
    per_step = bench.Curve(steps=[50, 100], loss=[2.0, 1.0], bytes=[1000, 2000])
    diloco = bench.Curve(steps=[50, 100, 150, 200], loss=[2.5, 1.2, 1.04, 0.9], bytes=[2, 4, 6, 8])
    result = bench.Comparison(bench.Setup(model=bench.SMALL), 1, 5.0, per_step, diloco)
    assert result.loss_ratio == 1.2 and result.bytes_ratio == 500.0  # at step 100
    assert result.diloco_reach() == (150, 6)
    assert result.diloco_reach(tolerance=0.01) == (200, 8)
    assert result.diloco_reach(tolerance=-0.5) is None
