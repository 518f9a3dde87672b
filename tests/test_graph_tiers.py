"""GraphTiers: the eager verify's extra cost over a CUDA-graph replay, measured online
(core/graph_tiers.py), and the policy planning the graph width once it is cheaper."""

from __future__ import annotations

import numpy as np
import pytest

from das_sglang.core.cost_model import CostModel
from das_sglang.core.graph_tiers import GraphSpec, GraphTiers

# The first GPU kit run's table (H200, 0.6B, benchmarks/results/gpukit_h200): graph
# replays at 17 tokens per request grow with the batch; eager forwards ~35-45 ms flat.
GRAPH_MS = {1: 4.5, 4: 4.7, 16: 5.3, 64: 9.3, 128: 15.5, 256: 28.5}


def fed(tiers, eager_ms=40.0, width=16, seed=0):
    rng = np.random.default_rng(seed)
    for bs, ms in GRAPH_MS.items():
        tiers.observe(bs, width, True, ms * 1e-3 * rng.uniform(0.97, 1.03))
    for bs in (1, 4, 16, 64, 128):
        for w in (3, 7, 11):
            tiers.observe(bs, w, False, eager_ms * 1e-3 * rng.uniform(0.9, 1.1))
    return tiers


def test_no_tiers_until_both_kinds_are_measured():
    base = CostModel.preset("h200-7b")
    tiers = GraphTiers(GraphSpec(width=16, max_bs=256), min_samples=4)
    for bs in (1, 2, 4, 8, 16):
        tiers.observe(bs, 5, False, 0.04)
    assert tiers.eager_extra_s() is None
    assert tiers.cost_model(base) is base


def test_eager_extra_is_the_median_excess_over_the_graph_line():
    tiers = fed(GraphTiers(GraphSpec(width=16, max_bs=256)))
    extra = tiers.eager_extra_s()
    # the graph line at the eager forwards' token counts is ~4.5-7 ms; eager ~40 ms
    assert 0.030 < extra < 0.037
    cost = tiers.cost_model(CostModel.preset("h200-7b"))
    assert cost.is_graph_width(16) and not cost.is_graph_width(8)
    assert cost.width_extra_s(8) - cost.width_extra_s(16) == pytest.approx(extra)
    stats = tiers.stats()
    assert stats["graph_samples"] == 6 and stats["eager_samples"] == 15
    assert stats["eager_extra_ms"] == pytest.approx(extra * 1e3)


def test_eager_cheaper_than_the_line_gives_no_negative_extra():
    tiers = fed(GraphTiers(GraphSpec(width=16, max_bs=256)), eager_ms=1.0)
    assert tiers.eager_extra_s() == 0.0


def test_explores_the_graph_width_after_a_run_of_eager_steps_only_when_it_can_replay():
    tiers = GraphTiers(GraphSpec(width=16, max_bs=64), min_samples=1, explore_every=5)
    tiers.observe(8, 16, True, 0.005)
    for _ in range(5):
        assert not tiers.explore(8)
        tiers.observe(8, 3, False, 0.03)
    assert not tiers.explore(65)  # no graph for a batch this large: nothing to learn
    assert tiers.explore(8)
    assert not tiers.explore(8)  # once, then another run of eager steps
    tiers.observe(8, 16, True, 0.005)
    for _ in range(4):
        tiers.observe(8, 3, False, 0.03)
    assert not tiers.explore(8)
    assert tiers.stats()["explored_steps"] == 1
    # before the graph line has its samples, it explores 8x as often
    eager = GraphTiers(GraphSpec(width=16, max_bs=64), min_samples=4, explore_every=64)
    for _ in range(8):
        assert not eager.explore(8)
        eager.observe(8, 3, False, 0.03)
    assert eager.explore(8)


def test_bad_samples_and_settings_are_ignored_or_rejected():
    tiers = GraphTiers(GraphSpec(width=16, max_bs=8), min_samples=1)
    for bad in (float("nan"), 0.0, -1.0, float("inf")):
        tiers.observe(4, 16, True, bad)
    tiers.observe(0, 16, True, 0.01)
    assert tiers.stats()["graph_samples"] == 0
    with pytest.raises(ValueError, match="min_samples"):
        GraphTiers(GraphSpec(width=16, max_bs=8), min_samples=0)
    with pytest.raises(ValueError, match="width"):
        GraphTiers(GraphSpec(width=-1, max_bs=8))


@pytest.mark.parametrize("allocator", ["stationary", "lookahead"])
def test_uniform_planning_picks_the_graph_width_with_measured_tiers_and_not_without(allocator):
    """Uniform (padded) planning: with an eager forward ~35 ms dearer than the replay at
    16 drafts, the forward is padded to 16 -- even past every row's tree (trees of at
    most 9 nodes here); with the linear model alone it stays at the trees' width."""
    from das_sglang.core.allocation import lookahead_step_budgets, optimal_step_budgets

    tiers = fed(GraphTiers(GraphSpec(width=16, max_bs=256)))
    rng = np.random.default_rng(0)
    remaining = rng.integers(50, 4000, 64).astype(np.float64)
    curves = [np.concatenate([[0.0], np.cumsum(np.cumprod(np.full(int(k), 0.6)))])
              for k in rng.integers(2, 10, 64)]
    widths = {}
    for label in ("linear", "tiers"):
        cost = CostModel.preset("h200-7b")
        if label == "tiers":
            cost = tiers.cost_model(cost)
        if allocator == "stationary":
            alloc = optimal_step_budgets(remaining, curves, np.zeros(64), cost, True)
        else:
            alloc = lookahead_step_budgets(remaining, curves, np.zeros(64), cost, True)
        assert int(alloc.budgets.max()) <= 9  # budgets never exceed a row's tree
        widths[label] = alloc.width
    assert widths["tiers"] == 16
    assert widths["linear"] <= 9


def test_estimate_follows_a_changing_price_past_the_window():
    tiers = fed(GraphTiers(GraphSpec(width=16, max_bs=256), window=32), eager_ms=40.0)
    first = tiers.eager_extra_s()
    for _ in range(40):  # the eager price drops (e.g. kernels warmed up): the window slides
        tiers.observe(16, 5, False, 0.010)
    assert tiers.samples == 6 + 15 + 40
    assert tiers.eager_extra_s() < first / 4


def test_prefer_graph_over_a_ragged_eager_forward_by_the_measured_lines():
    """Ragged layout: a step goes padded to the graph when the graph line at the padded
    token count is below the eager line at the ragged one (the kit's prices: always, at
    small batches); not beyond the captured batch sizes, not before both are measured."""
    tiers = GraphTiers(GraphSpec(width=16, max_bs=256))
    assert not tiers.prefer_graph(8, 8 * 3)
    fed(tiers)
    assert tiers.prefer_graph(8, 8 * 3)  # ~4.6 ms replay vs ~40 ms eager
    assert not tiers.prefer_graph(300, 300 * 3)  # no graph captured for 300 rows
    cheap = fed(GraphTiers(GraphSpec(width=16, max_bs=256)), eager_ms=2.0)
    assert not cheap.prefer_graph(8, 8 * 3)
    # ragged forwards report their own token count
    t = GraphTiers(GraphSpec(width=16, max_bs=256), min_samples=1)
    t.observe(4, 0, False, 0.01, tokens=13)
    assert t.stats()["eager_samples"] == 1


def test_eager_forwards_beyond_the_captured_batches_are_not_compared():
    tiers = GraphTiers(GraphSpec(width=16, max_bs=64), min_samples=1)
    tiers.observe(128, 4, False, 0.5)
    assert tiers.stats()["eager_samples"] == 0
    tiers.observe(64, 4, False, 0.05)
    assert tiers.stats()["eager_samples"] == 1


def test_compile_spikes_are_left_out_and_the_eager_price_is_re_measured():
    tiers = fed(GraphTiers(GraphSpec(width=16, max_bs=256), explore_every=4))
    extra = tiers.eager_extra_s()
    tiers.observe(16, 5, False, 3.0)  # a first-time kernel compile: 3 s
    assert tiers.eager_extra_s() == extra and tiers.stats()["spikes"] == 1
    # the graph is always chosen: after explore_every replays, one step plans eagerly
    seen = []
    for _ in range(8):
        tiers.observe(16, 16, True, 0.005)
        seen.append(tiers.explore_eager(16))
    assert seen == [False, False, False, True, False, False, False, True]
    assert not tiers.explore_eager(300)  # (no graph for such a batch: nothing to compare)
    assert tiers.stats()["explored_eager_steps"] == 2
