"""Acceptance statistics: the saturating model, its robust fit, calibration of node probs."""

import numpy as np
import pytest

from das_sglang.core.acceptance import AcceptanceTracker, fit_saturating, paper_params, saturating_accept
from das_sglang.core.policy_config import PolicyConfig


def test_model_worked_numbers():
    # k (1 - exp(-alpha b / k)) with alpha = .5, k = 4, b = 4: 4 (1 - e^-0.5)
    assert saturating_accept(4, 0.5, 4.0) == pytest.approx(1.5738774)
    assert saturating_accept(10**6, 0.5, 4.0) == pytest.approx(4.0)  # saturates at k
    assert saturating_accept(0, 0.5, 4.0) == 0.0
    assert saturating_accept(8, 0.0, 4.0) == 0.0 and saturating_accept(8, 0.5, 0.0) == 0.0
    b = np.arange(0, 64)
    assert np.all(saturating_accept(b, 0.9, 6.0) <= 0.9 * b + 1e-12)


def test_paper_params_worked_numbers():
    alpha_p, k_p = paper_params(0.5, 4.0)
    assert k_p == pytest.approx(1.25) and alpha_p == pytest.approx(0.625)
    assert paper_params(0.0, 4.0) == (0.0, float("inf"))


@pytest.mark.parametrize("alpha, k", [(0.7, 6.0), (0.4, 2.0), (0.95, 15.0)])
def test_recovers_known_alpha_k_from_synthetic_outcomes(alpha, k):
    rng = np.random.default_rng(7)
    budgets = rng.integers(1, 33, 3000)
    # integer outcomes with the model's mean: Binomial(b, A(b) / b)
    accepted = rng.binomial(budgets, saturating_accept(budgets, alpha, k) / budgets)
    tracker = AcceptanceTracker(PolicyConfig(acceptance_memory=4096))
    for b, a in zip(budgets, accepted):
        tracker.observe("q", int(b), int(a))
    est = tracker.estimate("q")
    assert est.alpha == pytest.approx(alpha, abs=0.05)
    assert est.k == pytest.approx(k, rel=0.1)
    assert est.n_obs == 3000


def test_fit_tracks_the_mean_of_a_geometric_acceptance_process():
    # chain drafts where each token matches with probability .8 until the first miss: the
    # accepted count is a truncated geometric with mean 4 (1 - .8^b): in the family (k = 4)
    rng = np.random.default_rng(3)
    b = rng.integers(1, 33, 20000)  # the geometric's variance (~20) needs many outcomes
    a = np.minimum(rng.geometric(0.2, len(b)) - 1, b)
    alpha, k = fit_saturating(b, a, 0.5, 4.0, 8.0, k_max=32.0)
    for budget in (2, 8, 32):
        true_mean = 0.8 * (1 - 0.8**budget) / 0.2
        assert saturating_accept(budget, alpha, k) == pytest.approx(true_mean, rel=0.1)


def test_no_data_gives_the_prior_and_zero_acceptance_gives_zero():
    cfg = PolicyConfig()
    tracker = AcceptanceTracker(cfg)
    est = tracker.estimate("new")
    assert (est.alpha, est.k, est.calibration, est.n_obs) == (cfg.prior_alpha, cfg.prior_k, 1.0, 0)
    for _ in range(200):
        tracker.observe("dead", 8, 0)
    dead = tracker.estimate("dead")
    assert saturating_accept(8, dead.alpha, dead.k) < 0.1
    assert dead.mean_accepted == 0.0
    tracker.observe("dead", 0, 0)  # nothing drafted: ignored, no crash
    assert tracker.estimate("dead").n_obs == 200


def test_calibration_of_node_probs():
    tracker = AcceptanceTracker(PolicyConfig(calibration_prior_tokens=8.0))
    for _ in range(8):
        tracker.expect("q", 4, 2.0)  # drafter expected 2 accepted tokens with budget 4
        tracker.observe("q", 4, 1)  # verification accepted 1
    # pooled over problems: (8 pseudo x 1 + 8 accepted) / (8 pseudo + 16 expected) = 2/3;
    # the problem shrinks to the pooled value: (8 x 2/3 + 8) / (8 + 16) = 5/9
    assert tracker.estimate("q").calibration == pytest.approx(5 / 9)
    assert tracker.calibration("fresh") == pytest.approx(2 / 3)  # a new problem: the pooled value
    tracker.observe("q", 3, 3)  # no plan recorded for budget 3: not used for calibration
    assert tracker.estimate("q").calibration == pytest.approx(5 / 9)


@pytest.mark.parametrize("proposed, accepted", [(-1, 0), (3, 4), (2, -1)])
def test_bad_outcomes_are_named(proposed, accepted):
    with pytest.raises(ValueError, match=f"proposed={proposed}"):
        AcceptanceTracker(PolicyConfig()).observe("q", proposed, accepted)


def test_expectations_recorded_later_give_the_same_statistics():
    """The plan hands its rows' expectations over as arrays (``expect_many_later``) and the
    next observation records them first: the statistics are those of recording them in the
    plan, bit for bit, through observations, a plan with none after it, and ``forget``."""
    import numpy as np

    from das_sglang.core.policy import BudgetRow, LengthAware, PolicyConfig

    def run(now: bool):
        policy = LengthAware(config=PolicyConfig(max_budget=8, draft_headroom_min_rows=0))
        tracker = policy.acceptance
        if now:  # the earlier path: recorded in the plan
            tracker.expect_many_later = lambda pids, rows, b, e: tracker.expect_many(
                [pids[i] for i in rows.tolist()], b.tolist(), e.tolist())
        rng = np.random.default_rng(5)
        gen = {f"r{i}": 0 for i in range(20)}
        for step in range(30):
            rows = [BudgetRow(r, f"p{i % 3}", g, 4000, np.sort(rng.random(8))[::-1], 50, 4)
                    for i, (r, g) in enumerate(gen.items())]
            plan = policy.plan(rows)
            if step % 7 == 3:
                continue  # no outcome reported for this plan
            acc = [int(rng.integers(0, b + 1)) for b in plan.budgets.tolist()]
            policy.observe_verify_many([r.problem_id for r in rows], plan.budgets, acc)
            for r, a in zip(gen, acc):
                gen[r] += a + 1
            if step == 20:
                policy.forget_problems(["p1"])
        tracker._flush_later()
        return (tracker._by_budget.tolist(),
                {p: (s.n_obs, s.sum_expected, s.sum_matched, list(s.recent)) for p, s in tracker._stats.items()},
                {k: list(q) for k, q in tracker._pending.items() if q})

    later, now = run(False), run(True)
    assert later == now
    assert later[0] != [[0.0, 0.0]] * len(later[0])  # expectations were matched with outcomes
