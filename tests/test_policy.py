"""Policies through the DraftBudget interface the worker and the replay use."""

import subprocess
import sys

import numpy as np
import pytest

from das_sglang.core.cost_model import CostModel
from das_sglang.core.policy import (
    POLICIES,
    BudgetPlan,
    BudgetRow,
    DraftBudget,
    FixedBudget,
    LengthAware,
    NoSpeculation,
    PaperClosedForm,
    PolicyConfig,
    UnlimitedBudget,
    make_policy,
)

COST = CostModel(c_base_s=0.010, c_tok_s=1e-4)
PROBS = 0.9 ** np.arange(1, 33)  # a confident 32-node draft


def row(i, problem="q", generated=0, max_new=16384, probs=PROBS):
    return BudgetRow(f"r{i}", problem, generated, max_new, np.asarray(probs, dtype=float))


def history(policy, problem, lengths):
    for n in lengths:
        policy.observe_finished(problem, n)


class TestInterface:
    @pytest.mark.parametrize("name", sorted(POLICIES))
    def test_every_policy_is_a_draft_budget(self, name):
        policy = make_policy(name, COST)
        assert isinstance(policy, DraftBudget)
        plan = policy.plan([row(0), row(1, probs=[])])
        assert plan.budgets.dtype == np.int32 and len(plan.budgets) == 2
        assert plan.width == int(plan.budgets.max(initial=0))
        assert plan.budgets[1] == 0  # no nodes found: nothing to propose
        policy.observe_verify("q", 4, 2)
        policy.observe_finished("q", 100)
        policy.advance_step(1)
        empty = policy.plan([])
        assert empty.width == 0 and len(empty.budgets) == 0

    def test_unknown_policy_is_named(self):
        with pytest.raises(ValueError, match="'greedy'"):
            make_policy("greedy")

    def test_core_never_imports_torch_or_sglang(self):
        code = ("import sys, das_sglang.core.policy; "
                "bad = [m for m in ('torch', 'sglang') if m in sys.modules]; assert not bad, bad")
        subprocess.run([sys.executable, "-c", code], check=True)


class TestSimplePolicies:
    def test_no_speculation(self):
        assert NoSpeculation().plan([row(0), row(1)]).width == 0

    def test_fixed_budget_caps_at_nodes_found(self):
        plan = FixedBudget(8).plan([row(0), row(1, probs=[0.5, 0.4, 0.3])])
        np.testing.assert_array_equal(plan.budgets, [8, 3])
        assert plan.width == 8

    def test_unlimited_uses_every_node_up_to_max_budget(self):
        plan = UnlimitedBudget(PolicyConfig(max_budget=16)).plan([row(0), row(1, probs=[0.5] * 5)])
        np.testing.assert_array_equal(plan.budgets, [16, 5])

    def test_defaults_come_from_policy_config(self):
        assert FixedBudget().k == PolicyConfig().fixed_budget
        assert UnlimitedBudget().k == PolicyConfig().max_budget == 32

    def test_bad_rows_and_config(self):
        with pytest.raises(ValueError, match="'r9'"):
            BudgetRow("r9", "q", -1, 100, np.zeros(0))
        with pytest.raises(ValueError, match="node_probs"):
            BudgetRow("r9", "q", 0, 100, np.array([1.5]))
        with pytest.raises(ValueError, match="fixed_budget=40"):
            PolicyConfig(fixed_budget=40)
        with pytest.raises(ValueError, match="cost_preset"):
            PolicyConfig(cost_preset="nope")
        with pytest.raises(ValueError, match="k=-1"):
            FixedBudget(-1)


class TestLengthAware:
    def test_short_requests_get_no_budget(self):
        policy = LengthAware(COST, PolicyConfig(class_thresholds=(500, 4000)))
        history(policy, "short", [100, 120, 150])
        history(policy, "long", [6000, 8000, 9000])
        rows = [row(i, "short") for i in range(4)] + [row(4 + i, "long") for i in range(4)]
        plan = policy.plan(rows)
        np.testing.assert_array_equal(plan.budgets[:4], 0)
        assert np.all(plan.budgets[4:] > 0)
        assert policy.last.makespan_steps > 150  # the short ones finish before the target N

    def test_budgets_shrink_as_batch_grows(self):
        widths = []
        for batch in (1, 16, 64, 256, 1024):
            policy = LengthAware(COST)
            history(policy, "q", [4000, 5000, 6000])
            widths.append(policy.plan([row(i) for i in range(batch)]).width)
        assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]

    def test_speculates_more_for_the_tail_of_a_step(self):
        policy = LengthAware(COST)
        history(policy, "q", [1000, 2000, 8000])
        full = policy.plan([row(i, generated=100) for i in range(256)])
        tail = policy.plan([row(i, generated=3000) for i in range(4)])
        assert tail.width > full.width

    def test_degenerate_inputs(self):
        policy = LengthAware(COST)
        assert policy.plan([]).width == 0  # empty batch
        no_history = policy.plan([row(0), row(1)])  # zero history: prior lengths, still defined
        assert no_history.width > 0
        at_cap = policy.plan([row(0, generated=100, max_new=100), row(1, generated=99, max_new=100)])
        assert at_cap.width == 0  # nothing left to generate: N > l for every row
        zero_len = policy.plan([row(0, probs=[]), row(1, probs=[])])
        assert zero_len.width == 0
        for _ in range(300):  # zero acceptance observed on everything the policy proposed
            for b in range(1, 33):
                policy.acceptance.expect("dead", b, float(PROBS[:b].sum()))
                policy.observe_verify("dead", b, 0)
        assert policy.plan([row(0, "dead")]).width == 0
        assert np.isfinite(policy.last.modeled_s)

    def test_uniform_width_pads_every_row(self):
        policy = LengthAware(COST, PolicyConfig(uniform_width=True))
        history(policy, "q", [4000, 5000, 6000])
        history(policy, "short", [100, 120])
        plan = policy.plan([row(0), row(1, "short", probs=[0.5, 0.5]), row(2)])
        assert plan.width > 2
        np.testing.assert_array_equal(plan.budgets, [plan.width, 2, plan.width])

    @pytest.mark.parametrize("lookahead", ["marginal", "stationary"])
    def test_modes_agree_on_the_basics(self, lookahead):
        cfg = PolicyConfig(lookahead=lookahead, class_thresholds=(500, 4000))
        policy = LengthAware(COST, cfg)
        history(policy, "short", [100, 120, 150])
        history(policy, "long", [6000, 8000, 9000])
        plan = policy.plan([row(i, "short") for i in range(4)] + [row(4 + i, "long") for i in range(4)])
        np.testing.assert_array_equal(plan.budgets[:4], 0)
        assert np.all(plan.budgets[4:] > 0)
        small = LengthAware(COST, cfg)
        big = LengthAware(COST, cfg)
        history(small, "long", [6000, 8000])
        history(big, "long", [6000, 8000])
        assert small.plan([row(i, "long") for i in range(2)]).width > big.plan([row(i, "long") for i in range(512)]).width

    def test_beats_paper_fixed_and_unlimited_on_its_objective(self):
        rng = np.random.default_rng(11)
        for trial in range(5):
            # the stationary allocator is the exact minimiser of expected_time
            policy = LengthAware(COST, PolicyConfig(lookahead="stationary"))
            for p in "abcd":
                history(policy, p, rng.lognormal(7.5, 0.8, 6).astype(int) + 1)
            rows = [row(i, "abcd"[i % 4], int(rng.integers(0, 3000)),
                        probs=np.sort(rng.uniform(0, 1, int(rng.integers(0, 33))))[::-1])
                    for i in range(int(rng.integers(1, 80)))]
            mine = policy.expected_time(rows, policy.plan(rows).budgets)
            others = [PaperClosedForm(COST), FixedBudget(4), FixedBudget(8), UnlimitedBudget(), NoSpeculation()]
            for other in others:
                for p in "abcd":
                    other.lengths = policy.lengths  # same predictions for a fair comparison
                theirs = policy.expected_time(rows, other.plan(rows).budgets)
                assert mine <= theirs * (1 + 1e-9), (trial, other)

    def test_calibration_learns_from_verify_outcomes(self):
        policy = LengthAware(COST, PolicyConfig(curve_mode="tree"))
        history(policy, "q", [4000, 5000, 6000])
        first = policy.plan([row(i) for i in range(32)])
        for b in first.budgets.tolist():  # drafts accepted at a third of the drafter's estimate
            policy.observe_verify("q", b, int(PROBS[:b].sum() / 3))
        assert policy.acceptance.estimate("q").calibration < 0.6
        assert policy.plan([row(i) for i in range(32)]).width < first.width


class TestPaperClosedForm:
    def test_short_requests_get_no_budget(self):
        policy = PaperClosedForm(COST, PolicyConfig(class_thresholds=(500, 4000)))
        history(policy, "short", [100, 120, 150])
        history(policy, "long", [6000, 8000, 9000])
        plan = policy.plan([row(i, "short") for i in range(4)] + [row(4 + i, "long") for i in range(4)])
        np.testing.assert_array_equal(plan.budgets[:4], 0)
        assert np.all(plan.budgets[4:] > 0)

    def test_zero_acceptance_means_no_drafts(self):
        policy = PaperClosedForm(COST)
        for _ in range(100):
            policy.observe_verify("q", 8, 0)
        # alpha ~ 0.016 remains (the prior's pseudo-outcomes): still worth it for a lone row
        # at c_base = 100 c_tok, but not for a batch of 64
        plan = policy.plan([row(i) for i in range(64)])
        assert plan.width == 0
        policy.observe_verify("never-verified", 0, 0)
        assert policy.plan([row(0, "q", generated=10, max_new=10)]).width == 0


def test_budget_plan_none():
    plan = BudgetPlan.none(3)
    assert plan.width == 0 and plan.budgets.tolist() == [0, 0, 0]


def test_finished_lengths_at_once_keep_a_subclass_s_own_observe_finished():
    """``observe_finished_many`` (the session's call for a run of finished lengths) gives
    what one ``observe_finished`` per length gives, for a policy that overrides the
    one-by-one method too: then it is called per length."""
    seen = []

    class Counting(LengthAware):
        def observe_finished(self, problem_id, length):
            seen.append((problem_id, length))
            super().observe_finished(problem_id, length)

    a, b = LengthAware(), LengthAware()
    for pid, n in [("x", 10), ("y", 2000), ("x", 30)]:
        a.observe_finished(pid, n)
    b.observe_finished_many(["x", "y", "x"], [10, 2000, 30])
    assert np.array_equal(a.lengths.state()["columns"], b.lengths.state()["columns"])
    assert a._log_err == b._log_err
    c = Counting()
    c.observe_finished_many(["x", "y"], [10, 2000])
    assert seen == [("x", 10), ("y", 2000)]
    assert c.lengths.num_lengths == 2
