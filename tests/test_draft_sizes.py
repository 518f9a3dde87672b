"""Draft sizes (``PolicyConfig.draft_headroom``): a request's next tree has at most
``ceil(headroom x its latest budget)`` nodes, at least ``max(1, probe_budget)``, so large
batches with small budgets draft small trees, and a budget can still grow every step."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from das_sglang.core.cost_model import CostModel
from das_sglang.core.policy import BudgetRow, LengthAware, PolicyConfig

PAID = replace(CostModel.preset("h100-7b"), free_tokens=0.0)
PROBS = 0.9 ** np.arange(1, 9)


def _rows(gen: dict[str, int], sizes, probs=PROBS) -> list[BudgetRow]:
    """Rows whose trees have ``sizes`` nodes (the first of ``probs``), as a drafter asked
    for those sizes gives them (a smaller tree is the bigger one's first nodes)."""
    if isinstance(sizes, int):
        sizes = [sizes] * len(gen)
    return [BudgetRow(r, "q", g, 4000, probs[: int(k)], 100, 5) for (r, g), k in zip(gen.items(), sizes)]


def test_sizes_follow_the_latest_budgets():
    policy = LengthAware(PAID, PolicyConfig(max_budget=8, probe_budget=2, draft_headroom_min_rows=4))
    ids = [f"r{i}" for i in range(6)]
    assert policy.draft_sizes(ids, 8) == 8  # before any plan: the cap, every row
    plan = policy.plan(_rows(dict.fromkeys(ids, 10), 8))
    budgets = plan.budgets.astype(np.int64)
    sizes = policy.draft_sizes(ids + ["new"], 8)
    want = [min(8, max(2, 2 * b)) for b in budgets.tolist()] + [8]  # a new request: the cap
    assert sizes.tolist() == want
    assert policy.draft_sizes(ids, 3).max() <= 3  # never above the cap asked for
    assert policy.draft_sizes(ids[:3], 8) == 8  # a small batch drafts full trees
    # 1.5 x, rounded up
    odd = LengthAware(PAID, PolicyConfig(max_budget=8, probe_budget=0, draft_headroom=1.5,
                                                     draft_headroom_min_rows=0))
    b = odd.plan(_rows(dict.fromkeys(ids, 10), 8)).budgets.tolist()
    assert odd.draft_sizes(ids, 8).tolist() == [min(8, max(1, math.ceil(1.5 * x))) for x in b]
    off = LengthAware(PAID, PolicyConfig(max_budget=8, draft_headroom=0, draft_headroom_min_rows=0))
    off.plan(_rows(dict.fromkeys(ids, 10), 8))
    assert off.draft_sizes(ids, 8) == 8


def test_sizes_of_the_plans_own_rows_are_made_once_per_plan_and_read_only():
    policy = LengthAware(PAID, PolicyConfig(max_budget=8, probe_budget=2, draft_headroom_min_rows=4))
    ids = [f"r{i}" for i in range(6)]
    budgets = policy.plan(_rows(dict.fromkeys(ids, 10), 8)).budgets.astype(np.int64)
    first = policy.draft_sizes(list(ids), 8)
    assert first.tolist() == [min(8, max(2, 2 * b)) for b in budgets.tolist()]
    assert policy.draft_sizes(list(ids), 8) is first  # the same rows again: not made again
    assert not first.flags.writeable  # (shared by the calls: nobody may change it)
    assert policy.draft_sizes(ids, 3).tolist() == [min(3, max(2, 2 * b)) for b in budgets.tolist()]
    other = policy.draft_sizes(ids[::-1], 8)  # other rows: looked up, not the cached array
    assert other.tolist() == first.tolist()[::-1] and other.flags.writeable
    policy.plan(_rows(dict.fromkeys(ids, 11), 8))  # a new plan: its own sizes
    assert policy.draft_sizes(list(ids), 8) is not first


def test_a_row_planned_zero_still_drafts_and_recovers():
    """Budget 0 is not absorbing with sized drafts either: the row keeps a small tree (its
    drafter's confidence, and what a probe needs), and once drafts are accepted its budget
    grows by at most the headroom per plan up to full trees."""
    policy = LengthAware(PAID, PolicyConfig(max_budget=8, draft_headroom_min_rows=8))
    gen = {f"r{i}": 10 for i in range(8)}

    def step(accept_all: bool):
        ids = list(gen)
        sizes = policy.draft_sizes(ids, 8)
        plan = policy.plan(_rows(gen, sizes))
        s = np.broadcast_to(np.asarray(sizes), (len(ids),))
        assert (plan.budgets <= s).all()  # a plan never gives more than the tree has
        for r, b in zip(ids, plan.budgets.tolist()):
            a = b if accept_all else 0
            policy.observe_verify("q", b, a)
            gen[r] += a + 1
        return plan, s

    step(False)
    for _ in range(3):
        plan, sizes = step(False)
    assert plan.width == 0
    assert (policy.draft_sizes(list(gen), 8) >= 2).all()  # still drafted: max(1, probe_budget)
    widths, prev = [], None
    for _ in range(40):
        plan, sizes = step(True)
        widths.append(plan.width)
        if prev is not None:
            assert (sizes <= np.maximum(2, 2 * prev)).all()  # grows at most 2x per plan
        prev = plan.budgets.astype(np.int64)
    first = next(i for i, w in enumerate(widths) if w > 0)
    assert max(widths[first:]) == 8  # full trees again


@pytest.mark.parametrize("bad", [0.5, -1.0, float("nan"), True, 2000.0])
def test_bad_headroom_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="draft_headroom"):
        PolicyConfig(draft_headroom=bad)


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_bad_headroom_min_rows_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="draft_headroom_min_rows"):
        PolicyConfig(draft_headroom_min_rows=bad)
