"""A policy that pays on unseen data: budget 0 is never final, rejections of one kind of draft
do not condemn another, tree outcomes are read by depth, and on generic JSONL rollouts built
from the bundled verl dump -- with history, and cold start (each problem in one step only:
live siblings + own text) -- DAS speculates and is not beaten by das-fixed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from das_sglang.core.cost_model import CostModel
from das_sglang.core.online_acceptance import OnlineCalibration, match_bin, tree_depths
from das_sglang.core.policy import BudgetRow, LengthAware, PolicyConfig, make_policy
from das_sglang.core.tokenize import TextTokenizer
from das_sglang.replay import datasets as ds
from das_sglang.replay.contenders import build_contenders
from das_sglang.replay.simulator import replay

COST = CostModel.preset("h100-7b")
# Drafting is paid (no free tokens below the roofline ridge): what the zero-budget tests need
PAID = replace(COST, free_tokens=0.0)
PROBS = 0.9 ** np.arange(1, 9)


def rows_at(gen: dict[str, int], match_len: int = 5, probs=PROBS) -> list[BudgetRow]:
    return [BudgetRow(r, "q", g, 4000, probs, 100, match_len) for r, g in gen.items()]


def step(policy, gen, accept_all: bool, match_len: int = 5):
    """One plan + verify: every drafted row accepts all (or none) of its drafts."""
    plan = policy.plan(rows_at(gen, match_len))
    for (r, g), b in zip(list(gen.items()), plan.budgets.tolist()):
        a = b if accept_all else 0
        policy.observe_verify("q", b, a)
        gen[r] = g + a + 1
    return plan


class TestBudgetZeroIsNotAbsorbing:
    def test_rejections_stop_drafting_then_probes_recover_it(self):
        policy = LengthAware(PAID)
        gen = {f"r{i}": 10 for i in range(8)}
        assert step(policy, gen, accept_all=False).width > 0  # the prior says drafting pays
        widths = [step(policy, gen, accept_all=False).width for _ in range(3)]
        assert widths == [0, 0, 0]  # all rejected: stop
        # Now the drafts would be right: a probe (small draft) must find out, and drafting resume.
        later = [step(policy, gen, accept_all=True).width for _ in range(40)]
        first = next(i for i, w in enumerate(later) if w > 0)
        assert 0 < later[first] <= policy.config.probe_budget  # a cheap probe first
        assert max(later[first + 1:]) >= 8  # then full drafts again
        assert sum(w > 0 for w in later[first:]) >= len(later[first:]) - 1

    def test_probes_cost_at_most_their_share(self):
        cfg = PolicyConfig(probe_share=0.05)
        policy = LengthAware(PAID, cfg)
        gen = {f"r{i}": 10 for i in range(32)}
        probes = sum(step(policy, gen, accept_all=False).width > 0 for _ in range(400))
        assert probes >= 3  # keeps probing ...
        assert policy.probes.spent_s <= cfg.probe_share * policy.probes.total_s + 1e-12  # ... within budget

    def test_probing_off_means_no_drafts_after_rejections(self):
        policy = LengthAware(PAID, PolicyConfig(probe_budget=0))
        gen = {f"r{i}": 10 for i in range(8)}
        step(policy, gen, accept_all=False)
        assert all(step(policy, gen, accept_all=True).width == 0 for _ in range(40))  # the old absorbing zero


class TestOnlineCalibration:
    def test_short_match_rejections_leave_long_matches_at_the_prior(self):
        cfg = PolicyConfig()
        oc = OnlineCalibration(cfg)
        rows = [BudgetRow(f"r{i}", "q", 0, 1000, PROBS, 0, 2) for i in range(16)]
        base = np.concatenate([[0.0], np.cumsum(PROBS)])[None, :].repeat(16, axis=0)
        oc.update(rows)
        oc.planned(rows, np.full(16, 8), base)
        oc.update([replace(r, generated_len=1) for r in rows])  # all rejected
        table = oc.table()
        assert table[0, match_bin(2), 0] < 0.1  # that kind of draft: condemned
        for m in (match_bin(8), match_bin(32)):  # other match lengths, other states: the prior
            assert table[0, m, 0] == pytest.approx(cfg.prior_alpha)
            assert table[1, m, 0] == pytest.approx(cfg.prior_alpha)

    def test_forgetting_brings_a_cell_back_to_its_prior(self):
        cfg = PolicyConfig(outcome_halflife=4.0)
        oc = OnlineCalibration(cfg)
        rows = [BudgetRow(f"r{i}", "q", 0, 1000, PROBS, 0, 8) for i in range(16)]
        base = np.concatenate([[0.0], np.cumsum(PROBS)])[None, :].repeat(16, axis=0)
        oc.planned(rows, np.full(16, 8), base)
        oc.update([replace(r, generated_len=1) for r in rows])
        low = oc.table()[0, match_bin(8), 0]
        for _ in range(60):
            oc.update([])
        assert low < 0.1 and oc.table()[0, match_bin(8), 0] == pytest.approx(cfg.prior_alpha, abs=1e-3)

    def test_tree_outcomes_are_read_by_depth(self):
        # Two root children (ranks 1, 2 at depth 1), then a child of the second (rank 3, depth 2).
        parents = np.array([-1, -1, 1])
        (depths,) = tree_depths([parents])
        assert depths.tolist() == [1, 1, 2]
        probs = np.array([0.5, 0.4, 0.4])
        cfg = PolicyConfig()
        oc = OnlineCalibration(cfg)
        rows = [BudgetRow(f"r{i}", "q", 0, 1000, probs, 0, 8, depths) for i in range(50)]
        base = np.concatenate([[0.0], np.cumsum(probs)])[None, :].repeat(50, axis=0)
        oc.planned(rows, np.full(50, 3), base)
        # Every draft accepted 2 tokens: the second branch, both depths right.
        oc.update([replace(r, generated_len=3) for r in rows])
        ratios = oc.ratios([replace(r, req_id="new") for r in rows[:1]], 3)[0]
        # depth 1: 50 hits of 0.9 expected each; depth 2: 50 of 0.4. A rank reading would put
        # both hits on ranks 1-2 and call rank 3 (depth 2) a miss.
        assert ratios[0] == pytest.approx(ratios[1]) and ratios[0] > 1.0
        assert ratios[2] > 2.0

    def test_outcomes_land_in_their_cells_as_the_definition_says(self):
        """One update's additions, against the definition written row by row: a row that
        accepted ``a`` of its ``b`` drafts adds, in cell (its previous state, its match
        bin, depth bin k), one hit per depth 1..a in bin k and the drafter's expectation
        of its first ``b`` nodes whose depth is in bin k."""
        from das_sglang.core.acceptance import _bin

        rng = np.random.default_rng(11)
        cfg = PolicyConfig(max_budget=16, outcome_halflife=0)
        oc = OnlineCalibration(cfg)
        n = 40
        trees, rows = [], []
        for i in range(n):
            k = int(rng.integers(1, 17))
            parents = np.array([-1] + [int(rng.integers(-1, j)) for j in range(1, k)])
            (d,) = tree_depths([parents])
            trees.append((rng.random(k), d))
            rows.append(BudgetRow(f"r{i}", "q", 0, 1000, trees[-1][0], 0, int(rng.integers(-1, 40)), d))
        budgets = np.array([int(rng.integers(0, len(t[0]) + 1)) for t in trees])
        base = np.zeros((n, 17))
        for i, (probs, _) in enumerate(trees):
            base[i, 1:len(probs) + 1] = np.cumsum(probs)
            base[i, len(probs) + 1:] = base[i, len(probs)]
        oc._state = {f"r{i}": int(rng.integers(0, oc.N_STATES)) for i in range(0, n, 2)}  # some seen before
        before = dict(oc._state)
        oc.planned(rows, budgets, base)
        accepted = np.array([int(rng.integers(0, b + 1)) for b in budgets])
        oc.update([replace(r, generated_len=int(a) + 1) for r, a in zip(rows, accepted)])
        want = np.zeros_like(oc._cells)
        for i, ((probs, d), b, a) in enumerate(zip(trees, budgets.tolist(), accepted.tolist())):
            if b == 0:
                continue  # nothing drafted: no outcome
            cell = want[before.get(f"r{i}", 0), match_bin(rows[i].match_len)]
            for depth in range(1, a + 1):
                cell[min(_bin(depth), cell.shape[0] - 1), 0] += 1
            for node in range(b):
                cell[min(_bin(int(d[node])), cell.shape[0] - 1), 1] += probs[node]
            assert oc._state[f"r{i}"] == oc.state_of(a, b)
        np.testing.assert_allclose(oc._cells, want, rtol=1e-12, atol=1e-12)
        assert want[..., 0].sum() == accepted[budgets > 0].sum()

    def test_depths_batch(self):
        got = tree_depths([np.array([-1, 0, -1, 1, 2, 0]), np.zeros(0, int), np.array([-1, 0, 1, 2])])
        assert [g.tolist() for g in got] == [[1, 2, 1, 3, 2, 2], [], [1, 2, 3, 4]]


# ---------------------------------------------------------------- replay on generic JSONL


@pytest.fixture(scope="module")
def verl_texts():
    return ds.load_verl([ds.VERL_SAMPLE])


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    return TextTokenizer(cache_dir=tmp_path_factory.mktemp("tok"))


def generic_fixture(texts, path: Path, problems: int, per_problem: int, step_of) -> Path:
    """The first ``problems`` problems, ``per_problem`` samples each, step ``step_of(j, i)``
    for problem j's sample i; finish_reason "stop" (the dump's outputs ended by EOS)."""
    by_problem: dict[str, list] = {}
    for t in texts:
        by_problem.setdefault(t.problem_id, []).append(t)
    picked = []
    for j, pid in enumerate(list(by_problem)[:problems]):
        for i, t in enumerate(by_problem[pid][:per_problem]):
            picked.append(replace(t, step=step_of(j, i), capped=False))
    return ds.write_generic_jsonl(picked, path)


class _Recording:
    """Wraps a policy; records (proposed, accepted) of every verified row, in order."""

    def __init__(self, inner, log):
        self._inner, self.log = inner, log

    def observe_verify(self, problem_id, proposed, accepted):
        self.log.append((proposed, accepted))
        self._inner.observe_verify(problem_id, proposed, accepted)

    def observe_verify_many(self, problem_ids, proposed, accepted):  # the replay's batch call
        self.log.extend(zip(proposed, accepted))
        self._inner.observe_verify_many(problem_ids, proposed, accepted)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def run_generic(path: Path, tok) -> tuple[dict, list]:
    texts = ds.load_jsonl([path], group_field="group", step_field="step")
    rollouts = ds.tokenize_rollouts(texts, tok)
    assert not any(r.hit_length_cap for r in rollouts)
    # the SGLang worker's default engine: ragged verify, per-request budgets
    contenders = build_contenders(["none", "das", "das-fixed", "das-global"], COST, "ragged")
    log: list = []
    das = contenders[1]
    contenders[1] = replace(das, make_policy=lambda: _Recording(das.make_policy(), log))
    results = replay(rollouts, contenders, COST, "ragged")
    return {r.name: r for r in results}, log


def check_speculates_and_wins(results, log):
    none, das, fixed = (results[n].total("makespan_s") for n in ("none", "das", "das-fixed"))
    assert das <= fixed, (das / none, fixed / none)
    assert das < 0.9 * none
    # DAS proposes, gets rejected, and keeps proposing and getting drafts accepted after that.
    first_reject = next(i for i, (p, a) in enumerate(log) if p > 0 and a == 0)
    later = log[first_reject + 1:]
    assert sum(p for p, _ in later) > 0 and sum(a for _, a in later) > 0
    assert results["das"].total("draft_accepted") > 0


def test_history_fixture_das_speculates_and_beats_fixed(tmp_path, verl_texts, tok):
    """8 problems x 12 samples spread over 3 steps (4 a step): each step has history."""
    path = generic_fixture(verl_texts, tmp_path / "hist.jsonl", 8, 12, lambda j, i: i // 4)
    results, log = run_generic(path, tok)
    check_speculates_and_wins(results, log)


def test_cold_start_fixture_das_speculates_and_beats_fixed(tmp_path, verl_texts, tok):
    """16 problems x 8 samples, each problem in ONE step only (4 problems a step): nothing but
    the live siblings and the request's own text to draft from."""
    path = generic_fixture(verl_texts, tmp_path / "cold.jsonl", 16, 8, lambda j, i: j // 4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    steps_of = {}
    for r in rows:
        steps_of.setdefault(r["group"], set()).add(r["step"])
    assert all(len(s) == 1 for s in steps_of.values()) and len(steps_of) == 16
    results, log = run_generic(path, tok)
    check_speculates_and_wins(results, log)
    # das-global (one index for every problem) speculates too where its statistics say it pays
    glob = results["das-global"]
    assert glob.total("draft_accepted") > 0 and glob.total("makespan_s") < 0.9 * results["none"].total("makespan_s")


def test_prepare_ahead_gives_the_plan_alone():
    """``prepare`` (the draft-free inputs, run while the drafts are made) then ``plan`` of
    the same rows gives what ``plan`` alone gives; an observation in between drops the
    prepared inputs (the plan reads the new statistics); the same rows in another list
    are the prepared rows."""
    from das_sglang.core.budget_rows import BudgetRows
    from das_sglang.core.draft_tree import DraftBatch, DraftTree

    rng = np.random.default_rng(3)

    def policy():
        p = make_policy("length-aware", config=PolicyConfig(max_budget=8))
        for k in range(40):
            p.observe_finished(f"p{k % 4}", int(rng.integers(50, 400)))
            p.observe_verify(f"p{k % 4}", 4, int(rng.integers(0, 5)))
        return p

    def rows(ids, generated):
        k = [1 + i % 7 for i in range(len(ids))]
        trees = [DraftTree(np.arange(n, dtype=np.int32), np.arange(-1, n - 1, dtype=np.int32),
                           np.linspace(0.9, 0.3, n), match_len=i % 5) for i, n in enumerate(k)]
        return BudgetRows(ids, [f"p{i % 4}" for i in range(len(ids))], np.asarray(generated, np.int64),
                          np.full(len(ids), 500, np.int64), np.full(len(ids), 30, np.int64),
                          DraftBatch.from_trees(trees))

    ids = [f"r{i}" for i in range(24)]
    for between in (None, "finished", "verify", "another list"):
        rng = np.random.default_rng(3)
        a = policy()
        rng = np.random.default_rng(3)
        b = policy()
        computed = []
        inner = a._draft_free_inputs
        a._draft_free_inputs = lambda *args: computed.append(1) or inner(*args)
        for step in range(6):
            gen = [10 * step + i for i in range(len(ids))]
            r = rows(ids, gen)
            a.prepare(BudgetRows(r.req_ids, r.problem_ids, r.generated, r.max_new, r.prompt_len,
                                 DraftBatch.empty(len(ids))))
            if between == "finished":
                for p in (a, b):
                    p.observe_finished("p1", 900 + step)
            elif between == "verify":
                for p in (a, b):
                    p.observe_verify_many(["p2", "p3"], [4, 4], [4, 0])
            elif between == "another list":
                r = rows(list(ids), gen)  # equal ids in another list object
            n = len(computed)
            pa, pb = a.plan(r), b.plan(r)
            # the plan reused the prepared inputs unless something they read changed
            assert len(computed) - n == (between in ("finished", "verify"))
            np.testing.assert_array_equal(pa.budgets, pb.budgets)
            assert pa.width == pb.width and a.last.modeled_s == b.last.modeled_s
        assert a._read_ahead is None and a._prepared is None


@pytest.mark.parametrize("name", ["length-aware", "paper"])
def test_a_plans_deferred_bookkeeping_gives_what_doing_it_at_once_gives(name):
    """``plan`` leaves its bookkeeping for ``settle_plan`` (the session runs it during the
    forward); whoever settles it, and whenever, the plans and the statistics are the same
    as settling it right after every plan."""
    rng = np.random.default_rng(5)
    a, b = (make_policy(name, config=PolicyConfig(max_budget=8, probe_every=2)) for _ in range(2))
    gen = {f"r{i}": 10 for i in range(12)}
    for k in range(30):
        rows = [BudgetRow(r, f"p{i % 3}", g, 900, PROBS[: 1 + (i + k) % 8], 40, (i + k) % 9)
                for i, (r, g) in enumerate(gen.items())]
        pa, pb = a.plan(rows), b.plan(rows)
        assert a.plan_pending()
        a.settle_plan()  # at once; b's waits for its next call
        assert not a.plan_pending() and b.plan_pending()
        np.testing.assert_array_equal(pa.budgets, pb.budgets)
        for (r, g), bud in zip(list(gen.items()), pa.budgets.tolist()):
            acc = int(rng.integers(0, bud + 1))
            for p in (a, b):
                p.observe_verify(f"p{list(gen).index(r) % 3}", bud, acc)
            gen[r] = g + acc + 1
    b.settle_plan()
    assert a.probes.total_s == b.probes.total_s and a.probes.spent_s == b.probes.spent_s
    assert a.length_error() == b.length_error()
    for p in (a, b):
        assert p._outcomes._pending_budget.size == len(gen)
    np.testing.assert_array_equal(a._outcomes._pending_budget, b._outcomes._pending_budget)


def _random_flat_rows(rng, n: int, max_nodes: int, prefix: str = "r"):
    """BudgetRows of ``n`` random trees (branching, random probabilities and match lengths;
    some rows empty, some past the plan's max_budget)."""
    from das_sglang.core.budget_rows import BudgetRows
    from das_sglang.core.draft_tree import DraftBatch, DraftTree

    trees = []
    for i in range(n):
        k = int(rng.integers(0, max_nodes + 1))
        parents = np.array([int(rng.integers(-1, j)) for j in range(k)], dtype=np.int32)
        trees.append(DraftTree(rng.integers(0, 50, k).astype(np.int32), parents,
                               np.sort(rng.random(k))[::-1].copy(), match_len=int(rng.integers(-1, 40))))
    ids = [f"{prefix}{i}" for i in range(n)]
    return BudgetRows(ids, [f"p{i % 5}" for i in range(n)], rng.integers(0, 300, n).astype(np.int64),
                      rng.integers(1, 400, n).astype(np.int64), np.full(n, 30, np.int64),
                      DraftBatch.from_trees(trees))


@pytest.mark.parametrize("seed", range(6))
def test_native_online_curves_are_numpys_bit_for_bit(seed):
    """The plan's online curves of flat rows come from one native call
    (OnlineCalibration.curves); numpy (NATIVE_CURVES off) is the reference: the same
    ``base``, ``acc``, node bins and budgets, bit for bit, over plans whose outcomes move
    the table and the rows' states."""
    rng = np.random.default_rng(seed)
    cfg = PolicyConfig(max_budget=int(rng.choice([4, 8, 16])), curve_mode="online")
    native, ref = make_policy("length-aware", config=cfg), make_policy("length-aware", config=cfg)
    ref.NATIVE_CURVES = False
    rows = _random_flat_rows(rng, 40, 2 * cfg.max_budget)
    for k in range(8):
        outs = []
        for p in (native, ref):
            p.settle_plan()
            remaining, (acc, m), kv, _ = p.inputs(rows)
            bins = p._outcomes.node_bins(rows, acc.shape[1] - 1)  # (native: what it read)
            outs.append((acc, m, p._base, bins, p.plan(rows).budgets))
        for x, y in zip(*outs):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert np.array_equal(x, y) and x.tobytes() == y.tobytes()
        # next step: every row advanced by what it "accepted"; fresh trees
        acc_n = rng.integers(0, 3, len(rows))
        nxt = _random_flat_rows(rng, len(rows), 2 * cfg.max_budget)
        nxt.generated = rows.generated + acc_n + 1
        rows = nxt


def test_native_online_curves_refuse_bad_input_naming_it():
    """The native curves check what they index with (no out-of-range read)."""
    from das_sglang.native import online_curves

    table = np.ones((2, 3, 4))
    args = dict(offsets=np.array([0, 2], np.int64), probs=np.array([0.5, 0.4]),
                depths=np.array([1, 2], np.int32), m=np.array([2], np.int64), table=table,
                states=np.array([1], np.int64), match=np.array([2], np.int64), relative=np.ones(1),
                depth_bin=np.arange(5, dtype=np.int64), rank_bin=np.arange(4, dtype=np.int64), max_budget=4)
    base, acc, bins, width = online_curves(**args)
    assert width == 3 and base.tolist() == [0.0, 0.5, 0.9] and acc[:2].tolist() == [0.0, 0.5]
    with pytest.raises(ValueError, match="state 2"):
        online_curves(**{**args, "states": np.array([2], np.int64)})
    with pytest.raises(ValueError, match=r"invalid m\[0\]=3"):
        online_curves(**{**args, "m": np.array([3], np.int64)})
    with pytest.raises(ValueError, match="depths: expected a 1-D contiguous int32"):
        online_curves(**{**args, "depths": np.array([1, 2], np.int64)})
    with pytest.raises(ValueError, match="depth -1"):
        online_curves(**{**args, "depths": np.array([1, -1], np.int32)})


@pytest.mark.parametrize("seed", range(6))
def test_native_online_outcomes_are_numpys_bit_for_bit(seed):
    """A plan's verify outcomes are added to the online cells by one native call
    (``online_add``); numpy (NATIVE_ADD off) is the reference: the same cells, row states
    and budgets, bit for bit, over plans where rows leave, new ones come, one request is in
    the rows twice and some rows get no budget."""
    rng = np.random.default_rng(100 + seed)
    cfg = PolicyConfig(max_budget=int(rng.choice([8, 16])), curve_mode="online")
    native, ref = make_policy("length-aware", config=cfg), make_policy("length-aware", config=cfg)
    ref._outcomes.NATIVE_ADD = False
    rows = _random_flat_rows(rng, 40, 2 * cfg.max_budget)
    added = 0
    for k in range(10):
        plans = [p.plan(rows).budgets for p in (native, ref)]
        assert np.array_equal(plans[0], plans[1])
        for p in (native, ref):
            p.settle_plan()
        # next step: rows advance by what they "accepted"; a few leave, new ones start
        acc_n = rng.integers(0, cfg.max_budget + 2, len(rows))
        nxt = _random_flat_rows(rng, len(rows), 2 * cfg.max_budget, prefix=f"n{k}_")
        keep = rng.random(len(rows)) < 0.85
        ids = [r if kept else f"n{k}_{i}" for i, (r, kept) in enumerate(zip(rows.req_ids, keep))]
        if k % 3 == 1:
            ids[-1] = ids[0]  # the same request twice
        nxt.req_ids = ids
        nxt.generated = np.where(keep, rows.generated + acc_n + 1, 0).astype(np.int64)
        nxt.generated[-1] = nxt.generated[0] if k % 3 == 1 else nxt.generated[-1]
        rows = nxt
        for p in (native, ref):
            p._outcomes.update(rows)
        a, b = native._outcomes, ref._outcomes
        assert a._cells.tobytes() == b._cells.tobytes()
        assert a._row_states[1].tolist() == b._row_states[1].tolist() and a._state == b._state
        added += int(a._cells[..., 1].sum() > 0)
        for p in (native, ref):  # (the plan reads the outcomes itself: start it afresh)
            p._outcomes._pending = {}
    assert added > 0  # (outcomes did land in the cells)


@pytest.mark.parametrize("seed", range(4))
def test_native_online_update_over_decode_steps_is_numpys(seed):
    """The batch's update in one native call (``online_update``) over the per-step pattern:
    plans of the very same rows (the same ``req_ids`` list: decode steps, the states kept as
    an array), then a step where rows finish and start (the per-request dict read and
    written), with outcomes every step; numpy row by row (NATIVE_ADD off) is the reference:
    the same budgets, cells, row states and per-request states, bit for bit."""
    rng = np.random.default_rng(200 + seed)
    cfg = PolicyConfig(max_budget=8, curve_mode="online", outcome_halflife=float(rng.choice([0, 50])))
    native, ref = make_policy("length-aware", config=cfg), make_policy("length-aware", config=cfg)
    ref._outcomes.NATIVE_ADD = False
    rows = _random_flat_rows(rng, 48, 16)
    rows.generated = rows.generated.copy()
    changed_rows = 0
    for k in range(12):
        plans = [p.plan(rows).budgets for p in (native, ref)]
        assert np.array_equal(plans[0], plans[1])
        if k % 4 == 3:  # a few finish, new ones start: other rows (the dict path)
            nxt = _random_flat_rows(rng, len(rows), 16, prefix=f"n{k}_")
            keep = rng.random(len(rows)) < 0.8
            nxt.req_ids = [r if kept else f"n{k}_{i}" for i, (r, kept) in enumerate(zip(rows.req_ids, keep))]
            nxt.generated = np.where(keep, rows.generated + rng.integers(1, 10, len(rows)), 0).astype(np.int64)
            rows = nxt
        else:  # a decode step: the same list, every row advanced by what it "accepted"
            acc = rng.integers(0, cfg.max_budget + 2, len(rows))
            rows = type(rows)(rows.req_ids, rows.problem_ids, rows.generated + acc + 1, rows.max_new,
                              rows.prompt_len, rows.drafts)
        for p in (native, ref):
            p.settle_plan()
            p._outcomes.update(rows)
        a, b = native._outcomes, ref._outcomes
        assert a._cells.tobytes() == b._cells.tobytes()
        assert a._row_states[1].tolist() == b._row_states[1].tolist()
        assert a._state == b._state
        changed_rows += int((a._row_states[1] > 0).sum())
        for p in (native, ref):  # (the plan reads the outcomes again: nothing pending twice)
            p._outcomes._pending = {}
    assert changed_rows > 0 and native._outcomes._cells[..., 1].sum() > 0


def test_native_online_update_refuses_bad_input_naming_it():
    from das_sglang.native import online_update

    cells = np.zeros((3, 2, 4, 2))
    args = dict(cells=cells, decay=1.0, at=None, generated=np.array([5], np.int64), states=np.array([1], np.int64),
                pend_budget=np.array([3], np.int64), pend_generated=np.array([2], np.int64),
                pend_match=np.array([1], np.int64), pend_nodes=np.array([[0.5, 0.25, 0.125]]),
                pend_bins=np.array([[0, 1, 2]], np.int64), bin_before=np.array([0, 1, 2, 4], np.int64),
                bin_size=np.array([1, 1, 2, 4], np.int64))
    before = cells.copy()
    with pytest.raises(ValueError, match=r"invalid at\[0\]=1"):
        online_update(**{**args, "at": np.array([1], np.int64)})
    with pytest.raises(ValueError, match="state 3"):
        online_update(**{**args, "states": np.array([3], np.int64)})
    with pytest.raises(ValueError, match="depth bin 4"):
        online_update(**{**args, "pend_bins": np.array([[0, 1, 4]], np.int64)})
    with pytest.raises(ValueError, match="decay"):
        online_update(**{**args, "decay": 0.0})
    assert cells.tobytes() == before.tobytes()  # (nothing changed on bad input)
    new, added = online_update(**args)
    assert new.tolist() == [3] and added == 1  # (online_add's worked example)
    assert cells[1, 1, :, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    new, added = online_update(**{**args, "at": np.array([-1], np.int64)})
    assert new.tolist() == [1] and added == 0


def test_native_online_outcomes_refuse_bad_input_naming_it():
    """``online_add`` checks what it indexes with and changes nothing on bad input."""
    from das_sglang.native import online_add

    cells = np.zeros((3, 2, 4, 2))
    args = dict(cells=cells, generated=np.array([5], np.int64), pos=np.array([0], np.int64),
                budget=np.array([3], np.int64), states=np.array([1], np.int64),
                pend_generated=np.array([2], np.int64), pend_match=np.array([1], np.int64),
                pend_nodes=np.array([[0.5, 0.25, 0.125]]), pend_bins=np.array([[0, 1, 2]], np.int64),
                bin_before=np.array([0, 1, 2, 4], np.int64), bin_size=np.array([1, 1, 2, 4], np.int64))
    new = online_add(**args)
    # accepted = min(max(5 - 2 - 1, 0), 3) = 2: state 1 + ceil(log2(3)) = 3; hits 1, 1, 0, 0
    assert new.tolist() == [3]
    assert cells[1, 1, :, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert cells[1, 1, :, 1].tolist() == [0.5, 0.25, 0.125, 0.0]
    before = cells.copy()
    with pytest.raises(ValueError, match=r"invalid pos\[0\]=1"):
        online_add(**{**args, "pos": np.array([1], np.int64)})
    with pytest.raises(ValueError, match="state 3"):
        online_add(**{**args, "states": np.array([3], np.int64)})
    with pytest.raises(ValueError, match="depth bin 4"):
        online_add(**{**args, "pend_bins": np.array([[0, 1, 4]], np.int64)})
    with pytest.raises(ValueError, match="generated: expected a 1-D contiguous int64"):
        online_add(**{**args, "generated": np.array([5], np.int32)})
    with pytest.raises(ValueError, match="invalid cells"):
        online_add(**{**args, "cells": np.zeros((3, 2, 4, 3))})
    assert cells.tobytes() == before.tobytes()


def test_same_rows_again_keep_their_states_in_an_array_with_the_dicts_results():
    """Plans of the same rows (a decode step without starts or finishes) carry the rows'
    states in the latest update's array and write the per-request dict only when the rows
    change or it is read: cells, states and ratios are those of the dict path at every
    plan, with rows changing now and then (a finish, a start, a request twice)."""
    rng = np.random.default_rng(5)
    cfg = PolicyConfig(max_budget=8)
    fast, slow = OnlineCalibration(cfg), OnlineCalibration(cfg)
    ids = [f"r{i}" for i in range(12)]
    gen = {r: 0 for r in ids}
    fast_paths = 0
    for plan in range(40):
        if plan % 9 == 8:  # a finish and a start
            gone = ids.pop(int(rng.integers(len(ids))))
            ids = ids + [f"n{plan}"]
            gen[f"n{plan}"] = 0
            del gen[gone]
        rows_ids = ids + [ids[0]] if plan == 20 else list(ids)  # (once: a request twice)
        rows = [BudgetRow(r, f"p{int(r[1:]) % 3}", gen[r], 1000, rng.random(int(rng.integers(0, 9))),
                          0, int(rng.integers(-1, 40))) for r in rows_ids]
        for oc in (fast, slow):
            if oc is slow:
                oc._rows_unique = False  # (never the same-rows path)
            elif oc._row_states is not None and oc._rows_unique and oc._row_states[0] == rows_ids:
                fast_paths += 1
            oc.update(rows)
        np.testing.assert_array_equal(fast._cells, slow._cells)
        assert fast._states_of(rows).tolist() == slow._states_of(rows).tolist()
        np.testing.assert_array_equal(fast.ratios(rows, 8), slow.ratios(rows, 8))
        budgets = rng.integers(0, 9, len(rows))
        base = np.cumsum(rng.random((len(rows), 9)) * 0.5, axis=1) - 0.25
        base[:, 0] = 0.0
        for oc in (fast, slow):
            oc.planned(rows, budgets, base)
        for r in set(rows_ids):
            gen[r] += int(rng.integers(1, 4))
    assert fast_paths > 20 and fast._rows_dirty
    assert fast._state == slow._state and not fast._rows_dirty


def test_match_bin_table_is_the_log2_rule():
    """match_bin (a table lookup) is floor(log2(max(m, 1))) capped at the last bin, for
    unknown (-1), small and long matches, any integer dtype, scalars included."""
    m = np.arange(-3, 5000)
    want = np.minimum(np.floor(np.log2(np.maximum(m, 1))).astype(np.int64), 5)
    for dtype in (np.int64, np.int32):
        got = match_bin(m.astype(dtype))
        assert got.dtype == np.int64 and got.tolist() == want.tolist()
    assert [match_bin(x) for x in (-1, 0, 1, 2, 3, 4, 31, 32, 10**9)] == [0, 0, 0, 1, 1, 2, 4, 5, 5]
    assert match_bin([2.0, 9.0]).tolist() == [1, 3]


@pytest.mark.parametrize("seed", range(8))
def test_native_online_table_is_numpys_bit_for_bit(seed):
    """OnlineCalibration.table natively (online_table) is numpy's table, bit for bit: cells
    of every magnitude, empty cells, nothing accepted anywhere (the states' effect is 1)."""
    rng = np.random.default_rng(seed)
    cfg = PolicyConfig(max_budget=int(rng.choice([4, 8, 16])), curve_mode="online",
                       calibration_prior_tokens=float(rng.choice([8.0, 32.0, 7.5])))
    oc = OnlineCalibration(cfg)
    c = rng.random(oc._cells.shape) * 10 ** rng.uniform(-4, 4, oc._cells.shape)
    c[rng.random(oc._cells.shape[:3]) < 0.3] = 0.0
    if seed == 0:
        c[..., 0] = 0.0  # nothing accepted
    oc._cells[...] = c
    got = oc.table().copy()
    oc._table = None
    oc.NATIVE_ADD = False
    want = oc.table()
    assert got.shape == want.shape and got.tobytes() == want.tobytes()
    assert np.isfinite(got).all() and (got != got.flat[0]).any()


@pytest.mark.parametrize("seed", range(6))
def test_fused_plan_is_the_stepwise_plan(seed):
    """LengthAware.plan of flat rows in one native call (``online_plan``: usable nodes,
    online curves, the lookahead, the min-gain rule, the probe drafts) gives what the
    steps give (FUSED off): the same budgets and width, ``last``, curves and node bins the
    bookkeeping reads, and -- over plans whose outcomes move the statistics, probes due
    and affordable or not -- the same probe record and calibration state."""
    rng = np.random.default_rng(seed)
    cfg = PolicyConfig(max_budget=int(rng.choice([4, 8, 16])), curve_mode="online",
                       probe_every=int(rng.choice([1, 2, 4])), probe_share=float(rng.choice([0.0, 0.02, 0.5])),
                       min_gain=float(rng.choice([0.0, 0.05])))
    fused, ref = make_policy("length-aware", config=cfg), make_policy("length-aware", config=cfg)
    ref.FUSED = False
    calls = []
    inner = fused._plan_fused
    fused._plan_fused = lambda *a: calls.append(inner(*a)) or calls[-1]
    for p in (fused, ref):
        for k in range(30):
            p.observe_finished(f"p{k % 5}", int(200 + 37 * k % 300))
    rows = _random_flat_rows(rng, 48, 2 * cfg.max_budget)
    for k in range(12):
        outs = []
        for p in (fused, ref):
            plan = p.plan(rows)
            outs.append((plan.budgets, np.int64(plan.width), p.last.budgets, np.int64(p.last.width),
                         np.float64(p.last.modeled_s), np.float64(p.last.baseline_s),
                         np.float64(p.last.makespan_steps), p._base, p._outcomes._bins_cache[2]))
            p.settle_plan()
        for x, y in zip(*outs):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes()
        assert fused.probes.spent_s == ref.probes.spent_s and fused.probes.total_s == ref.probes.total_s
        # outcomes: every row accepted part of its budget; some problems finish
        budgets = outs[0][0]
        acc_n = np.array([int(rng.integers(0, b + 1)) for b in budgets.tolist()], np.int64)
        for p in (fused, ref):
            p.observe_verify_many(rows.problem_ids, budgets, acc_n)
        nxt = _random_flat_rows(rng, len(rows), 2 * cfg.max_budget)
        nxt.generated = rows.generated + acc_n + 1
        rows = nxt
    assert len(calls) == 12 and all(c is not None for c in calls)  # (planned by the fused call)
    np.testing.assert_array_equal(fused._outcomes._pending_budget, ref._outcomes._pending_budget)
    assert fused.acceptance.calibration_rows([f"p{i}" for i in range(5)]).tobytes() == \
        ref.acceptance.calibration_rows([f"p{i}" for i in range(5)]).tobytes()


def test_fused_plan_refuses_bad_input_naming_it():
    """online_plan checks its own arguments (and the curves' as online_curves does)."""
    from das_sglang.native import online_plan

    args = dict(offsets=np.array([0, 2], np.int64), probs=np.array([0.5, 0.4]), depths=np.array([1, 2], np.int32),
                table=np.ones((2, 3, 4)), states=np.array([1], np.int64), match=np.array([2], np.int64),
                relative=np.ones(1), depth_bin=np.arange(5, dtype=np.int64), rank_bin=np.arange(4, dtype=np.int64),
                max_budget=4, generated=np.array([3], np.int64), max_new=np.array([100], np.int64),
                remaining=np.array([50.0]), kv_tokens=np.array([80.0]), c_base=0.01, c_tok=1e-5, c_kv=1e-8,
                spread=0.2, free_tokens=0.0, min_gain=0.0, probe_budget=1, due=np.array([True]), probe_spent=0.0,
                probe_limit=1.0)
    got = online_plan(**args)
    assert got[3] == 3 and got[4].tolist() == [2] and got[10].dtype == np.int32
    with pytest.raises(ValueError, match="1 rows .generated. but max_new has 2"):
        online_plan(**{**args, "max_new": np.array([1, 2], np.int64)})
    with pytest.raises(ValueError, match="state 2"):
        online_plan(**{**args, "states": np.array([2], np.int64)})
    with pytest.raises(ValueError, match="1 rows but due has 2"):
        online_plan(**{**args, "due": np.array([True, False])})
    with pytest.raises(ValueError, match="invalid due"):
        online_plan(**{**args, "due": None})
    with pytest.raises(ValueError, match="kv_tokens 2"):
        online_plan(**{**args, "kv_tokens": np.array([1.0, 2.0])})
