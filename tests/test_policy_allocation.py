"""Allocation math: the paper's closed form against a brute-force optimum, and the exact
per-step allocator against exhaustive search."""

import itertools

import numpy as np
import pytest

from das_sglang.core.allocation import (
    FREE_TOKEN_SHARE,
    lookahead_step_budgets,
    pad_curves,
    token_values,
    optimal_step_budgets,
    paper_budget,
    paper_min_steps,
    paper_objective,
    paper_objective_n,
    paper_optimal_n,
    paper_steps,
    step_objective,
)
from das_sglang.core.cost_model import CostModel

COST = CostModel(c_base_s=0.010, c_tok_s=1e-4)  # c_base / c_tok = 100 tokens


class TestClosedForm:
    def test_worked_number(self):
        # l = 1000, N = 800, alpha = 2, k = 2: p = -(1000/2) ln(1 - 2 * 0.2) = -500 ln 0.6
        assert paper_budget(1000, 800, 2.0, 2.0) == pytest.approx(-500 * np.log(0.6))
        assert paper_budget(1000, 800, 2.0, 2.0) == pytest.approx(255.41281, rel=1e-6)

    def test_inverts_the_step_model(self):
        p = paper_budget(1000.0, 700.0, 1.5, 2.5)
        assert paper_steps(p, 1000.0, 1.5, 2.5) == pytest.approx(700.0)

    def test_edges(self):
        assert paper_budget(500, 800, 2.0, 2.0) == 0.0  # N > l: not on the critical path
        assert paper_budget(1000, 400, 2.0, 2.0) == np.inf  # below l (1 - 1/k) = 500
        assert paper_budget(1000, 800, 0.0, 2.0) == np.inf  # nothing is ever accepted
        assert paper_min_steps([1000, 3000], [2.0, 0.0], [2.0, 2.0]) == 3000.0

    def test_matches_brute_force_optimum(self):
        length = np.array([1000.0, 3000.0, 6000.0])
        alpha = np.array([1.2, 0.9, 1.5])
        k = np.array([1.6, 1.5, 2.0])
        n_star = paper_optimal_n(length, alpha, k, COST)
        p_star = paper_budget(length, n_star, alpha, k)
        t_star = paper_objective(p_star, length, alpha, k, COST)
        # Brute force: every budget vector on a 121^3 grid of the same objective.
        grids = [np.linspace(0, 4.0 * l, 121) for l in length]
        steps = [paper_steps(g, l, a, kk) for g, l, a, kk in zip(grids, length, alpha, k)]
        s0, s1, s2 = np.ix_(*steps)
        p0, p1, p2 = np.ix_(*grids)
        t = COST.c_base_s * np.maximum(np.maximum(s0, s1), s2) + COST.c_tok_s * (s0 + s1 + s2 + p0 + p1 + p2)
        assert t_star <= t.min() + 1e-9  # the closed form is the continuous optimum ...
        assert t_star == pytest.approx(t.min(), rel=2e-3)  # ... and the grid gets close to it
        best = np.unravel_index(np.argmin(t), t.shape)
        grid_makespan = max(s[i] for s, i in zip(steps, best))
        assert grid_makespan == pytest.approx(n_star, rel=0.02)
        # Worked numbers for this instance (documented in docs/cost_model.md).
        assert n_star == pytest.approx(3039.604, rel=1e-5)
        np.testing.assert_array_equal(p_star[:2], [0.0, 0.0])  # short requests: no budget
        assert p_star[2] > 0

    def test_optimality_condition_is_a_minimum_in_n(self):
        length = np.array([800.0, 2000.0, 2500.0, 9000.0])
        alpha, k = np.full(4, 1.0), np.full(4, 1.8)
        n_star = paper_optimal_n(length, alpha, k, COST)
        lo = paper_min_steps(length, alpha, k)
        grid = np.linspace(lo + 1e-6, length.max(), 5001)
        t_grid = [paper_objective_n(n, length, alpha, k, COST) for n in grid]
        assert paper_objective_n(n_star, length, alpha, k, COST) <= min(t_grid) + 1e-9

    def test_requests_below_n_get_nothing(self):
        length = np.array([200.0, 500.0, 4000.0, 5000.0])
        n_star = paper_optimal_n(length, 1.0, 2.0, COST)
        p = paper_budget(length, n_star, 1.0, 2.0)
        assert np.all(p[length <= n_star] == 0) and np.all(p[length > n_star] > 0)

    def test_budget_shrinks_as_batch_grows(self):
        totals = []
        for batch in (1, 4, 16, 64, 256):
            length = np.full(batch, 4000.0)
            n_star = paper_optimal_n(length, 1.0, 2.0, COST)
            totals.append(float(paper_budget(4000.0, n_star, 1.0, 2.0)))
        assert all(a > b for a, b in zip(totals, totals[1:]))
        assert totals[-1] == 0.0  # 256 rows: drafts cost more than the saved c_base

    @pytest.mark.parametrize(
        "length, alpha, k",
        [([], [], []), ([1000.0], [0.0], [2.0]), ([1000.0], [1.0], [np.inf]), ([0.0], [1.0], [2.0])],
    )
    def test_degenerate_inputs_are_defined(self, length, alpha, k):
        n = paper_optimal_n(np.array(length), np.array(alpha), np.array(k), COST)
        assert np.isfinite(n)
        if length:
            assert n == pytest.approx(max(length))

    def test_free_drafts_go_to_the_minimum_makespan(self):
        free = CostModel(0.01, 0.0)
        n = paper_optimal_n(np.array([1000.0, 2000.0]), 1.0, 2.0, free)
        assert n == pytest.approx(1000.0, rel=1e-6)  # 2000 * (1 - 1/2)


def _curve(probs):
    return np.concatenate([[0.0], np.cumsum(probs)])


def _brute(remaining, curves, kv, cost, uniform):
    best = np.inf
    for b in itertools.product(*[range(len(c)) for c in curves]):
        best = min(best, step_objective(remaining, curves, np.array(b), kv, cost, uniform)[0])
    return best


class TestStepAllocator:
    @pytest.mark.parametrize("uniform", [False, True])
    @pytest.mark.parametrize("seed", range(6))
    def test_matches_exhaustive_search(self, seed, uniform):
        rng = np.random.default_rng(seed)
        rows = int(rng.integers(1, 5))
        remaining = rng.uniform(10, 5000, rows)
        curves = [_curve(np.sort(rng.uniform(0, 1, int(rng.integers(0, 6))))[::-1]) for _ in range(rows)]
        kv = rng.uniform(0, 4000, rows)
        cost = CostModel(0.01, float(rng.choice([1e-5, 1e-4, 1e-3])), 1e-7)
        alloc = optimal_step_budgets(remaining, curves, kv, cost, uniform)
        got = step_objective(remaining, curves, alloc.budgets, kv, cost, uniform)[0]
        assert got == pytest.approx(alloc.modeled_s, rel=1e-9)
        assert got == pytest.approx(_brute(remaining, curves, kv, cost, uniform), rel=1e-9)
        assert alloc.baseline_s == pytest.approx(step_objective(remaining, curves, np.zeros(rows), kv, cost, uniform)[0])

    def test_short_rows_get_nothing(self):
        curve = _curve([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
        remaining = np.array([100.0, 150.0, 5000.0, 6000.0])
        alloc = optimal_step_budgets(remaining, [curve] * 4, np.zeros(4), COST)
        # makespan target ~ 6000 / (1 + 3.9) = 1224 forwards: rows of 100/150 tokens finish first
        assert alloc.makespan_steps > 150
        np.testing.assert_array_equal(alloc.budgets[:2], [0, 0])
        assert np.all(alloc.budgets[2:] > 0)
        assert alloc.budgets[3] >= alloc.budgets[2]

    def test_budgets_shrink_as_batch_grows(self):
        curve = _curve(0.9 ** np.arange(1, 33))
        got = []
        for batch in (1, 8, 32, 128, 512, 2048):
            alloc = optimal_step_budgets(np.full(batch, 3000.0), [curve] * batch, np.zeros(batch), COST)
            got.append(int(alloc.budgets.max()))
        assert got == sorted(got, reverse=True) and got[0] > got[-1]
        # 2048 rows x c_tok = 20 c_base: one draft token (p = .9) saves 47% of the forwards
        # but doubles their cost -> none
        assert got == [24, 11, 6, 3, 1, 0]

    def test_degenerate(self):
        empty = optimal_step_budgets(np.zeros(0), [], np.zeros(0), COST)
        assert empty.width == 0 and len(empty.budgets) == 0
        none = optimal_step_budgets(np.array([50.0, 60.0]), [_curve([]), _curve([])], np.zeros(2), COST)
        np.testing.assert_array_equal(none.budgets, [0, 0])
        zero_acc = optimal_step_budgets(np.array([5000.0]), [_curve([0.0] * 8)], np.zeros(1), COST)
        assert zero_acc.width == 0 and np.isfinite(zero_acc.modeled_s)
        no_base = optimal_step_budgets(np.array([5000.0]), [_curve([0.5] * 8)], np.zeros(1), CostModel(0.0, 1e-4))
        assert no_base.width == 0  # no shared cost to amortise: drafts only add tokens


class TestLookahead:
    """The default LengthAware allocator: pay this forward's drafts now, value accepted tokens
    by what they save later (dT*/dr of the stationary plan)."""

    @pytest.mark.parametrize("uniform", [False, True])
    @pytest.mark.parametrize("seed", range(6))
    def test_is_the_exact_maximiser_of_its_one_step_gain(self, seed, uniform):
        rng = np.random.default_rng(100 + seed)
        rows = int(rng.integers(1, 5))
        remaining = rng.uniform(10, 5000, rows)
        curves = [_curve(np.sort(rng.uniform(0, 1, int(rng.integers(0, 6))))[::-1]) for _ in range(rows)]
        kv = rng.uniform(0, 4000, rows)
        cost = CostModel(0.01, float(rng.choice([1e-5, 1e-4, 1e-3])), 1e-7)
        pair = pad_curves(curves)
        value, _ = token_values(remaining, pair, kv, cost, uniform, 0.05)

        def gain(b):
            b = np.asarray(b)
            paid = len(b) * b.max(initial=0) if uniform else b.sum()
            return float(np.sum(value * pair[0][np.arange(rows), b]) - cost.c_tok_s * paid)

        choices = itertools.product(*[range(len(c)) for c in curves])
        if uniform:
            choices = [np.minimum(w, pair[1]) for w in range(pair[0].shape[1])]
        best = max(gain(b) for b in choices)
        alloc = lookahead_step_budgets(remaining, curves, kv, cost, uniform, 0.05)
        assert gain(alloc.budgets) == pytest.approx(best, rel=1e-9, abs=1e-15)

    def test_token_values_worked_example(self):
        # one row, nothing drafted later: a token saves one forward of c_base + c_tok
        value, future = token_values(np.array([100.0]), pad_curves([_curve([])]), np.zeros(1), COST, False, 0.05)
        assert value[0] == pytest.approx(COST.c_base_s + COST.c_tok_s)
        # two rows, one far shorter: the long one carries (almost all of) c_base
        value, _ = token_values(np.array([100.0, 1000.0]), pad_curves([_curve([]), _curve([])]),
                                np.zeros(2), COST, False, 0.05)
        assert value[1] == pytest.approx(COST.c_base_s + COST.c_tok_s, rel=1e-6)
        assert value[0] == pytest.approx(COST.c_tok_s, abs=1e-9)  # + c_base e^-18

    def test_short_rows_get_nothing_and_budgets_shrink_with_batch(self):
        curve = _curve(0.9 ** np.arange(1, 33))
        alloc = lookahead_step_budgets(np.array([100.0, 150.0, 5000.0, 6000.0]), [curve] * 4, np.zeros(4), COST)
        np.testing.assert_array_equal(alloc.budgets[:2], [0, 0])
        assert np.all(alloc.budgets[2:] > 0)  # 5000 is close enough to 6000 to matter
        widths = [lookahead_step_budgets(np.full(n, 3000.0), [curve] * n, np.zeros(n), COST, True).width
                  for n in (1, 8, 32, 128, 512, 2048)]
        assert widths == sorted(widths, reverse=True) and widths[0] > 0 and widths[-1] == 0

    def test_degenerate(self):
        assert lookahead_step_budgets(np.zeros(0), [], np.zeros(0), COST).width == 0
        dead = lookahead_step_budgets(np.array([5000.0]), [_curve([0.0] * 8)], np.zeros(1), COST)
        assert dead.width == 0 and np.isfinite(dead.modeled_s)


def test_lookahead_fills_the_free_tokens_first():
    """With free_tokens (the ridge point), the per-row lookahead takes the batch's best
    nodes up to the free capacity even when each gains less than c_tok, then only nodes
    gaining more than c_tok; each row's nodes stay a prefix of its tree."""
    rows = 4
    curves = [np.concatenate([[0.0], np.cumsum(np.full(8, 0.5 ** (i + 1)))]) for i in range(rows)]
    remaining = np.full(rows, 400.0)
    kv = np.zeros(rows)
    paid = CostModel(c_base_s=0.01, c_tok_s=0.01)
    free = CostModel(c_base_s=0.01, c_tok_s=0.01, free_tokens=rows + 12)
    none = lookahead_step_budgets(remaining, curves, kv, paid)
    some = lookahead_step_budgets(remaining, curves, kv, free)
    assert int(none.budgets.sum()) == 0  # no node pays c_tok here
    assert int(some.budgets.sum()) == 12  # the 12 free slots, best rows first
    assert list(some.budgets) == sorted(some.budgets, reverse=True)
    huge = CostModel(c_base_s=0.01, c_tok_s=0.01, free_tokens=10_000)
    value, _ = token_values(remaining, pad_curves(curves), kv, huge, False, 0.05)
    cheap = value * 0.5 ** (np.arange(rows) + 1) > FREE_TOKEN_SHARE * huge.c_tok_s
    assert cheap.any() and not cheap.all()  # a free token still has to gain something
    assert list(lookahead_step_budgets(remaining, curves, kv, huge).budgets) == [8 if c else 0 for c in cheap]
    # uniform width: the padded tokens past the free ones are what is paid
    wide = lookahead_step_budgets(remaining, curves, kv, huge, uniform_width=True)
    assert wide.width == 8
