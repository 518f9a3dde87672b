"""The native per-row allocators (native/src/allocation.cpp) against the numpy reference in
core/allocation.py: the same budgets and, bit for bit, the same modeled seconds, ties and
equal gains included; bad inputs are rejected naming the value."""

import dataclasses

import numpy as np
import pytest

from das_sglang.core import allocation as A
from das_sglang.core.cost_model import CostModel
from das_sglang.native import best_per_row, lookahead_per_row


def _case(rng, trial):
    n, width = int(rng.integers(1, 120)), int(rng.integers(1, 18))
    m = rng.integers(0, width, n).astype(np.int64)
    m[rng.integers(n)] = width - 1  # the widest row sets the width, as inputs() builds it
    inc = rng.random((n, width)) * rng.choice([0.0, 0.5, 1.0], (n, width))
    if trial % 3 == 0:
        inc = np.round(inc * 4) / 4  # many equal gains and events
    acc = np.cumsum(inc, axis=1)
    acc[:, 0] = 0.0
    acc = np.maximum.accumulate(np.where(np.arange(width)[None, :] <= m[:, None], acc, 0.0), axis=1)
    remaining = rng.choice([10.0, 100.0, 1000.0, 5000.0], n)
    if trial % 2:
        remaining = remaining * rng.random(n)
    kv = rng.random(n) * [0.0, 4000.0][trial % 2]
    cost = CostModel.preset(["h100-7b", "h100-32b", "cpu-tiny"][trial % 3])
    if trial % 4 == 0:
        cost = dataclasses.replace(cost, free_tokens=float(rng.integers(0, 800)))
    return remaining, acc, m, kv, cost, [0.0, 0.05, 0.3][trial % 3]


def _both(fn, *args):
    A.NATIVE = False
    try:
        want = fn(*args)
    finally:
        A.NATIVE = True
    return fn(*args), want


def _same(got, want):
    np.testing.assert_array_equal(got.budgets, want.budgets)
    assert got.budgets.dtype == np.int32
    assert (got.width, got.modeled_s, got.baseline_s, got.makespan_steps) == (
        want.width, want.modeled_s, want.baseline_s, want.makespan_steps)


def test_native_allocators_equal_numpy_bit_for_bit():
    rng = np.random.default_rng(5)
    drafted = 0
    for trial in range(500):
        remaining, acc, m, kv, cost, spread = _case(rng, trial)
        got, want = _both(A.optimal_step_budgets, remaining, (acc, m), kv, cost)
        _same(got, want)
        got, want = _both(A.lookahead_step_budgets, remaining, (acc, m), kv, cost, False, spread)
        _same(got, want)
        drafted += int(want.width > 0)
    assert drafted > 200  # (the cases do speculate)


def test_native_allocator_is_what_the_policy_runs(monkeypatch):
    # the allocation functions the policy calls hand their result from the native calls
    # (a spy on each: numpy's answer would be the same numbers, so equality alone proves
    # nothing about which path ran)
    calls = []

    def spy(fn):
        def wrapped(*args):
            calls.append(fn.__name__)
            return fn(*args)
        return wrapped

    monkeypatch.setattr(A, "_native_lookahead_per_row", spy(lookahead_per_row))
    monkeypatch.setattr(A, "_native_best_per_row", spy(best_per_row))
    rng = np.random.default_rng(2)
    remaining, acc, m, kv, cost, spread = _case(rng, 1)
    direct = lookahead_per_row(remaining, acc, m, kv, cost.c_base_s, cost.c_tok_s, cost.c_kv_s, spread,
                               max(cost.free_tokens - len(m), 0.0))
    alloc = A.lookahead_step_budgets(remaining, (acc, m), kv, cost, False, spread)
    assert calls == ["lookahead_per_row"]
    np.testing.assert_array_equal(direct[0], alloc.budgets)
    assert direct[2] == alloc.modeled_s
    A.optimal_step_budgets(remaining, (acc, m), kv, cost)
    assert calls == ["lookahead_per_row", "best_per_row"]
    A.lookahead_step_budgets(remaining, (acc, m), kv, cost, True, spread)  # one batch width: numpy's
    assert calls == ["lookahead_per_row", "best_per_row"]


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply")
def test_numpy_ranks_what_the_native_path_declines():
    # value 0 (no cost at all) makes numpy's gains NaN past a row's nodes: numpy ranks every
    # node there; the native call says so (None) and the result is numpy's
    rng = np.random.default_rng(3)
    remaining, acc, m, kv, _, _ = _case(rng, 1)
    free = CostModel(c_base_s=0.0, c_tok_s=0.0)
    assert lookahead_per_row(remaining, acc, m, kv, 0.0, 0.0, 0.0, 0.05, 0.0) is None
    got, want = _both(A.lookahead_step_budgets, remaining, (acc, m), kv, free, False, 0.05)
    _same(got, want)


def test_native_allocator_rejects_bad_inputs_naming_them():
    remaining, kv = np.array([100.0, 200.0]), np.zeros(2)
    acc = np.array([[0.0, 0.5, 0.8], [0.0, 0.4, 0.4]])
    with pytest.raises(ValueError, match=r"invalid m\[1\]=3: must be in \[0, 3\)"):
        best_per_row(remaining, acc, np.array([2, 3]), kv, 0.01, 1e-4, 0.0)
    with pytest.raises(ValueError, match=r"invalid m\[0\]=-1"):
        best_per_row(remaining, acc, np.array([-1, 0]), kv, 0.01, 1e-4, 0.0)
    with pytest.raises(ValueError, match="invalid acc: expected a 2-D C-contiguous float64"):
        best_per_row(remaining, acc.astype(np.float32), np.array([2, 1]), kv, 0.01, 1e-4, 0.0)
    with pytest.raises(ValueError, match="invalid m: expected a 1-D contiguous int64"):
        best_per_row(remaining, acc, np.array([2, 1], dtype=np.int32), kv, 0.01, 1e-4, 0.0)
    with pytest.raises(ValueError, match="2 remaining but acc has 1 rows"):
        best_per_row(remaining, acc[:1], np.array([2, 1]), kv, 0.01, 1e-4, 0.0)
    with pytest.raises(ValueError, match="invalid c_tok=nan"):
        best_per_row(remaining, acc, np.array([2, 1]), kv, 0.01, float("nan"), 0.0)
    with pytest.raises(ValueError, match="invalid free_tokens=-1"):
        lookahead_per_row(remaining, acc, np.array([2, 1]), kv, 0.01, 1e-4, 0.0, 0.05, -1.0)
    # the policy's wrapper converts what it can (any float / int dtype, a strided acc)
    cost = CostModel(c_base_s=0.01, c_tok_s=1e-4)
    got = A.optimal_step_budgets(remaining.astype(np.float32), (np.asfortranarray(acc), np.array([2, 1], np.int32)),
                                 kv, cost)
    _same(got, A._best_per_row_numpy(remaining, acc, np.array([2, 1]), kv, cost))


def _best_per_row_every_event(remaining, acc, m, kv_tokens, cost):
    """The per-row budgets ranking every event, as _best_per_row_numpy did before it ranked
    only the events above n_lo."""
    b = np.arange(acc.shape[1])
    usable = b[None, :] <= m[:, None]
    steps = remaining[:, None] / (1.0 + acc)
    row_cost = np.where(usable, steps * (cost.c_tok_s * (1.0 + b)[None, :] + cost.c_kv_s * kv_tokens[:, None]),
                        np.inf)
    best_cost = np.minimum.accumulate(row_cost[:, ::-1], axis=1)[:, ::-1]
    ev = usable[:, 1:]
    rows_a, vals_a = np.nonzero(ev)[0], steps[:, :-1][ev]
    with np.errstate(invalid="ignore"):
        deltas_a = np.diff(best_cost, axis=1)[ev]
    n_lo, top = float(steps[np.arange(len(m)), m].max()), float(remaining.max())
    base = float(best_cost[:, 0].sum())
    order = A.stable_argsort(vals_a)
    v_sorted = vals_a[order]
    prefix = np.concatenate([[0.0], np.cumsum(deltas_a[order])])
    cand = A._sorted_unique(np.concatenate([[n_lo], v_sorted[(v_sorted >= n_lo) & (v_sorted < top)], [top]]))
    t = cost.c_base_s * cand + base + (prefix[-1] - prefix[np.searchsorted(v_sorted, cand, side="right")])
    n_star = float(cand[int(np.flatnonzero(t <= t.min() * (1 + 1e-12))[-1])])
    least = np.bincount(rows_a[vals_a > n_star], minlength=len(m))
    return np.argmin(np.where(b[None, :] >= least[:, None], row_cost, np.inf), axis=1).astype(np.int32)


def test_ranking_only_the_events_above_the_least_makespan_gives_the_same_budgets():
    # An event at or below n_lo has fired for every candidate makespan: leaving it out of
    # the ranking (what makes the per-step allocation ~35 % cheaper at batch 512) changes
    # no budget, here on random curves, ties and flat curves included.
    rng = np.random.default_rng(11)
    for trial in range(400):
        remaining, acc, m, kv, cost, _ = _case(rng, trial)
        want = _best_per_row_every_event(remaining, acc, m, kv, cost)
        for native in (False, True):
            A.NATIVE = native
            try:
                got = A.optimal_step_budgets(remaining, (acc, m), kv, cost)
            finally:
                A.NATIVE = True
            np.testing.assert_array_equal(got.budgets, want)
