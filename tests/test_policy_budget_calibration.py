"""Calibration by budget: wide drafts' outcomes correct the wide end of the curve only."""

import numpy as np
import pytest

from das_sglang.core.acceptance import AcceptanceTracker, OutcomeCalibration
from das_sglang.core.cost_model import CostModel
from das_sglang.core.policy import BudgetRow, LengthAware
from das_sglang.core.policy_config import PolicyConfig


def _outcomes(tracker, problem, budget, expected, accepted, n=8):
    for _ in range(n):
        tracker.expect(problem, budget, expected)
        tracker.observe(problem, budget, accepted)


def test_budget_shape_worked_numbers():
    tracker = AcceptanceTracker(PolicyConfig(calibration_prior_tokens=8.0, max_budget=32))
    assert np.array_equal(tracker.budget_shape(4), np.ones(5))  # no outcomes: no correction
    _outcomes(tracker, "q", 1, 0.5, 1)  # budget 1: 8 accepted of 4 expected
    _outcomes(tracker, "q", 8, 4.0, 1)  # budget 8: 8 accepted of 32 expected
    # pooled ratio (8 + 16) / (8 + 36) = 6/11; bin {1}: (8 * 6/11 + 8) / (8 + 4) = 34/33;
    # bins {2}, {3-4} unseen: keep 34/33; bin {5-8}: (8 * 34/33 + 8) / (8 + 32) = 67/165;
    # wider bins unseen: keep 67/165. Shape = bin ratio / pooled ratio.
    shape = tracker.budget_shape(32)
    assert shape[0] == 1.0
    assert shape[1] == pytest.approx(17 / 9)
    assert shape[2] == shape[4] == pytest.approx(17 / 9)
    assert shape[5] == shape[8] == shape[32] == pytest.approx(67 / 90)
    # the pooled calibration itself is unchanged by the option
    assert tracker.calibration("fresh") == pytest.approx(6 / 11)


def test_length_aware_curve_uses_budget_shape():
    cost = CostModel(c_base_s=0.010, c_tok_s=1e-4)
    probs = np.full(8, 0.9)  # an overconfident chain: 0.9 at every depth
    rows = [BudgetRow("r0", "q", 100, 4096, probs)]
    curves = {}
    for flag in (False, True):
        policy = LengthAware(cost, PolicyConfig(curve_mode="tree", budget_calibration=flag))
        for b in (1, 2, 4, 8):  # the first node is accepted as often as drafted, no deeper one
            _outcomes(policy.acceptance, "q", b, 0.9 * b, 1)
        _, (acc, _), _, _ = policy.inputs(rows)
        curves[flag] = acc[0]
    flat, shaped = curves[False], curves[True]
    # one factor for all budgets: the wide end is overstated, the narrow end understated
    assert shaped[8] < flat[8]
    assert shaped[1] > flat[1]
    assert np.all(np.diff(shaped) >= 0)  # still a non-decreasing curve
    assert np.all(shaped <= np.arange(9))  # never more than drafted


def test_outcome_calibration_reads_progress_and_conditions_on_the_last_outcome():
    cfg = PolicyConfig(calibration_prior_tokens=8.0, max_budget=8)
    oc = OutcomeCalibration(cfg)
    assert oc.pooled(0.5) == 0.5  # no outcomes: the prior
    # States: accepted 0 of 4 -> 1; 3 of 8 -> 1 + bin(4) = 3; all 4 of 4 (censored) -> 10.
    assert (oc.state_of(0, 4), oc.state_of(3, 8), oc.state_of(4, 4)) == (1, 3, 10)
    base = np.concatenate([[0.0], np.cumsum(np.full(4, 0.9))])[None, :]
    oc.planned([BudgetRow("r", "q", 0, 100)], np.array([4]), base)
    oc.update([BudgetRow("r", "q", 3, 100)])  # grew by 3 = 2 accepted + the bonus token
    # 2 of 3.6 expected tokens accepted; 8 pseudo-tokens at ratio 1
    assert oc.pooled(1.0) == pytest.approx((8 + 2) / (8 + 3.6))
    assert oc.ratios(["r"], 4).shape == (1, 4)
    # a row that keeps accepting its whole draft vs one that accepts nothing
    oc = OutcomeCalibration(cfg)
    gen = {"hot": 0, "cold": 0}
    for _ in range(50):
        rows = [BudgetRow(r, "q", g, 10_000) for r, g in gen.items()]
        oc.update(rows)
        oc.planned(rows, np.array([4, 4]), np.vstack([base, base]))
        gen["hot"] += 5  # 4 accepted + bonus
        gen["cold"] += 1
    oc.update([BudgetRow(r, "q", g, 10_000) for r, g in gen.items()])
    hot, cold = oc.ratios(["hot", "cold"], 4)
    assert np.all(hot > 1.0) and np.all(cold < 0.2)


def test_length_aware_outcome_mode_separates_copying_rows():
    """Same problem, same tree: the row that keeps copying history gets the higher curve
    (one factor per problem, ``curve_mode="tree"``, cannot tell them apart)."""
    cost = CostModel(c_base_s=0.010, c_tok_s=1e-4)
    probs = np.full(8, 0.6)
    curves = {}
    for mode in ("outcome", "tree"):
        policy = LengthAware(cost, PolicyConfig(curve_mode=mode, uniform_width=True))
        gen = {"hot": 0, "cold": 0}
        for _ in range(30):
            rows = [BudgetRow(r, "q", g, 10_000, probs) for r, g in gen.items()]
            plan = policy.plan(rows)
            hot_b, cold_b = plan.budgets.tolist()
            policy.observe_verify("q", hot_b, hot_b)
            policy.observe_verify("q", cold_b, 0)
            gen["hot"] += hot_b + 1
            gen["cold"] += 1
        rows = [BudgetRow(r, "q", g, 10_000, probs) for r, g in gen.items()]
        policy._read_outcomes(rows)
        _, (acc, _), _, _ = policy.inputs(rows)
        curves[mode] = acc
    assert np.array_equal(curves["tree"][0], curves["tree"][1])
    hot, cold = curves["outcome"]
    assert hot[8] > 2 * cold[8]
    assert np.all(np.diff(hot) >= 0) and np.all(hot <= np.arange(9))
