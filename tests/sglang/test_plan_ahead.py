"""Issue 12, the next plan made ahead (``LengthAware.plan_ahead``): the feedback's native job
computes the policy's next plan of its rows on its own trees; the plan uses it only when
nothing it read has changed, and then plans exactly what the policy plans itself."""

import json

import numpy as np
import pytest

from das_sglang.core import policy as P
from das_sglang.core.drafter import TokenRows
from das_sglang.native import extend_draft_rows_start, plan_ahead
from das_sglang.sglang.options import for_layout, load_options
from das_sglang.sglang.session import DasSession
from text_runs import accepted_runs


def _session(plan_ahead_on: bool, kept: bool = False) -> DasSession:
    """``kept``: plans whose rows changed since the feedback take the job's plan for the rows
    kept (``AHEAD_KEPT``; off: such plans are made as without the job, bit for bit)."""
    cfg = {"drafter": {"window_steps": 2}, "server": {"policy": "length-aware", "async_updates": True}}
    s = DasSession(for_layout(load_options(9, json.dumps(cfg)), "ragged"))  # (per-row budgets)
    s.PLAN_AHEAD = plan_ahead_on
    s.policy.AHEAD_KEPT = kept
    s.ASYNC_MIN_ROWS = 1
    s.policy.lengths.background = False
    return s


def _verify(live: dict, texts: dict, rids: list, trees) -> TokenRows:
    """What verification accepts of each row's tree against its request's text (``live``:
    request -> (problem, position), advanced here), in the form the worker feeds back."""
    commits = accepted_runs(texts, live, rids, trees)
    padded = np.full((len(commits), 9), -1)
    for i, c in enumerate(commits):
        padded[i, :len(c)] = c
    return TokenRows.from_padded(padded, [len(c) for c in commits])


def _drive(session, seed=0, steps=120, flush_every=40, rows=12, observe_at=(), tell_finishing=False):
    """A random decode workload fed back as the worker does (TokenRows, the forward hook);
    ``observe_at``: steps after whose feedback an outcome is observed directly (an input of
    the plan made ahead changes); ``tell_finishing``: the feedback says which requests
    finish with it (the worker's stop cut). Returns every plan's trees, width and budgets."""
    rng = np.random.default_rng(seed)
    texts = {f"p{i}": rng.integers(0, 5, 300).tolist() for i in range(5)}
    live, out, n = {}, [], 0
    for step in range(steps):
        if step and step % flush_every == 0:
            session.weights_updated()
        while len(live) < rows:
            pid = f"p{n % 5}"
            session.start(f"r{n}", {"das_problem_id": pid}, [7, 8], [], 250)
            live[f"r{n}"] = (pid, 0)
            n += 1
        rids = sorted(live)
        trees, width = session.plan(rids, 8)
        last = session.policy.last
        out.append(([t.tokens.tolist() for t in trees], width,
                    None if last is None else (last.budgets.tolist(), last.modeled_s)))
        session.before_forward()
        accepted = _verify(live, texts, rids, trees)
        ends = [live[rid][1] >= (30 if n <= 24 else 150) + 7 * (int(rid[1:]) % 4) for rid in rids]  # (the first
        session.committed_batch(rids, [len(t) for t in trees], accepted,  # two waves short)
                                finishing=np.array(ends) if tell_finishing else None)
        if step in observe_at:
            session.policy.observe_verify("p1", 4, 2)
        for rid, end in zip(rids, ends):
            if end:
                pid, pos = live[rid]
                session.finished(rid, [7, 8], texts[pid][:pos])
                del live[rid]
    session.drain()
    oc = session.policy.outcomes
    out.append((oc._cells.tolist(), oc.table().tolist()))
    return out


def _count(monkeypatch):
    used = []
    fused = P.LengthAware._plan_fused

    def spy(self, rows, prepared):
        a, t = self._ahead_plan, self._ahead_trees
        used.append(a is not None and a[0] is prepared and rows.drafts is t and t is not None)
        return fused(self, rows, prepared)

    monkeypatch.setattr(P.LengthAware, "_plan_fused", spy)
    return used


@pytest.mark.parametrize("observe_at", [(), (60, 61, 90, 91, 92)])
def test_plans_made_ahead_are_the_plans_the_policy_makes(monkeypatch, observe_at):
    used = _count(monkeypatch)
    a, b = _session(True), _session(False)
    got_a = _drive(a, observe_at=observe_at)
    n_a = len(used)
    got_b = _drive(b, observe_at=observe_at)
    assert got_a == got_b  # trees, widths, budgets, modeled seconds, cells and table: bit for bit
    assert sum(used[:n_a]) > 40  # (the job's plan was used on many steps ...)
    assert not any(used[n_a:])  # (... and never without it)
    assert a.counters["plans_ahead"] == sum(used[:n_a]) and b.counters["plans_ahead"] == 0
    for step in observe_at:  # an observation after a feedback: the next plan makes its own
        assert not used[step + 1]
    a.close()
    b.close()


def test_an_observation_waits_for_the_job_and_drops_its_plan():
    s = _session(True)
    _drive(s, steps=30)
    waited = []
    pol = s.policy
    pol._ahead = P._Ahead(None, [], np.zeros(0, np.int64), pol._epoch, None, None, lambda: waited.append(1))
    pol.observe_verify("p0", 3, 1)
    assert waited == [1] and pol._ahead is None
    s.close()


def _ahead_args(**change):
    cells = np.zeros((12, 6, 5, 2))
    n = 3
    args = dict(
        cells=cells, decay=0.9, generated=np.array([5, 6, 7]), states=np.zeros(n, np.int64),
        pend_budget=np.zeros(n, np.int64), pend_generated=np.zeros(n, np.int64), pend_match=np.zeros(n, np.int64),
        pend_nodes=np.zeros((n, 2)), pend_bins=np.zeros((n, 2), np.int64), bin_before=np.zeros(5, np.int64),
        bin_size=np.ones(5, np.int64), table_w=8.0, table_prior=0.5, depth_bin=np.zeros(9, np.int64),
        rank_bin=np.zeros(8, np.int64), max_budget=8, match_lut=np.zeros(4, np.int64), sums=np.zeros((4, 2)),
        slots=np.array([0, -1, 1]), cal_w=8.0, cal_wp=4.0, cal_prior=0.5, lengths=None,
        problem_rows=np.zeros(n, np.int64), tail_factor=1.0, max_new=np.full(n, 100), prompt_len=np.full(n, 4),
        c_base=0.01, c_tok=1e-4, c_kv=0.0, spread=0.1, free_tokens=0.0, min_gain=0.0, probe_budget=0, due=None,
        probe_spent=0.0, probe_limit=0.0)
    args.update(change)
    return args


def test_plan_ahead_checks_its_inputs_naming_the_bad_one():
    from das_sglang.native import LengthIndex

    lengths = LengthIndex(False, 0.33, 0.67)
    lengths.add(0, 40)
    ok = plan_ahead(**_ahead_args(lengths=lengths))
    assert ok.result() is None and ok.error == ""  # (made, not run: no job took it)
    with pytest.raises(ValueError, match="2 counts for 3 rows"):
        ok.set_generated(np.array([1, 2], np.int64))
    with pytest.raises(ValueError, match="generated"):
        ok.set_generated(np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="skip_outcomes: row 3 of 3"):
        ok.skip_outcomes(np.array([0, 3], np.int64))
    with pytest.raises(ValueError, match="skip_outcomes: row -1 of 3"):
        ok.skip_outcomes(np.array([-1], np.int64))
    with pytest.raises(ValueError, match="rows"):
        ok.skip_outcomes(np.array([0], np.int32))
    ok.skip_outcomes(np.array([0, 2], np.int64))
    with pytest.raises(ValueError, match="generated"):
        plan_ahead(**_ahead_args(lengths=lengths, generated=np.array([5, 6, 7], np.int32)))
    with pytest.raises(ValueError, match="slots"):
        plan_ahead(**_ahead_args(lengths=lengths, slots=np.array([0, -1, 9])))
    with pytest.raises(ValueError, match="state 12"):
        plan_ahead(**_ahead_args(lengths=lengths, states=np.array([0, 12, 0])))
    with pytest.raises(ValueError, match="no lengths"):
        plan_ahead(**_ahead_args(lengths=LengthIndex(False, 0.33, 0.67)))
    with pytest.raises(ValueError, match="match_lut"):
        plan_ahead(**_ahead_args(lengths=lengths, match_lut=np.array([0, 6])))


def test_a_job_refuses_a_plan_ahead_of_other_rows():
    from das_sglang.native import LengthIndex, SuffixIndex

    lengths = LengthIndex(False, 0.33, 0.67)
    lengths.add(0, 40)
    ahead = plan_ahead(**_ahead_args(lengths=lengths))  # 3 rows
    idx = SuffixIndex()
    idx.add_sequence(1, np.array([1, 2, 3], np.int32), 0)
    with pytest.raises(ValueError, match="ahead is for 3 rows"):
        extend_draft_rows_start([idx], np.array([1]), np.array([4], np.int32), np.array([0, 1]),
                                np.array([4], np.int32), 0.0, np.array([0]), np.array([1.0]), False, 16,
                                ahead=ahead)


def test_a_failing_plan_ahead_is_switched_off_and_the_plans_go_on(monkeypatch):
    def broken(self):
        raise RuntimeError("broken prepare_ahead")

    monkeypatch.setattr(P.LengthAware, "prepare_ahead", broken)
    a, b = _session(True), _session(False)
    got_a, got_b = _drive(a, steps=40), _drive(b, steps=40)
    assert got_a == got_b
    assert a.counters["plan_ahead_errors"] == 1 and a.counters["plans_ahead"] == 0
    assert not a.PLAN_AHEAD
    a.close()
    b.close()


@pytest.mark.parametrize("tell_finishing", [False, True])
def test_a_plan_of_changed_rows_takes_the_jobs_plan_for_the_rows_kept(monkeypatch, tell_finishing):
    """Finishes and (deferred) starts between a feedback and the next plan: the plan takes
    the job's cells without the outcomes of the rows that left -- left out by the job where
    the feedback said they finish, else taken out -- (the cells the plan's own update gives,
    up to rounding), each kept row's state and budget through the row map, and no budget for
    a new row (it has no tree yet)."""
    import copy

    from das_sglang.core import budget_rows as R
    from das_sglang.core.draft_tree import DraftBatch

    checked = {"cells": 0, "plans": 0, "left": 0}
    adopt, plan_kept = P._ModelBased._adopt_kept, P.LengthAware._plan_kept

    def spy_adopt(self, ahead, rows, ids, generated):
        # the reference: the update a plan of these rows makes itself (the rows that left
        # since take their last outcome with them)
        ref = copy.deepcopy(self._outcomes)
        n = len(ids)
        ref.update(R.BudgetRows(ids, ["p"] * n, generated, np.zeros(n, np.int64), np.zeros(n, np.int64),
                                DraftBatch.empty(n)))
        ok = adopt(self, ahead, rows, ids, generated)
        if ok:
            oc = self._outcomes
            assert np.allclose(oc._cells, ref._cells, rtol=1e-12, atol=1e-12)  # (sums in another order)
            assert np.allclose(oc.table(), ref.table(), rtol=1e-9, atol=1e-12)
            assert oc._row_states[0] is ids
            assert np.array_equal(oc._row_states[1], ref._row_states[1])
            checked["cells"] += 1
            checked["left"] += len(set(ahead.ids) - set(ids))
        return ok

    def spy_plan(self, rows, got, at, read, remaining, kv, fill=None):
        out = plan_kept(self, rows, got, at, read, remaining, kv, fill)
        job_budgets = got[10]
        kept = at >= 0
        # (the adoption's reading of the map: max(at, 0) and the new rows)
        assert read[0].tolist() == np.maximum(at, 0).tolist() and read[1].tolist() == np.flatnonzero(~kept).tolist()
        assert np.array_equal(out.budgets[kept], job_budgets[at[kept]])
        assert (out.budgets[~kept] == 0).all() and (~kept).any()
        assert (rows.drafts.lens()[~kept] == 0).all()  # (a deferred start: no tree)
        checked["plans"] += 1
        return out

    skips = []
    made = P.LengthAware.plan_ahead

    def spy_made(self, *a, **k):  # (told: the job leaves those rows' outcomes out itself)
        out = made(self, *a, **k)
        if out is not None and self._ahead.skipped is not None:
            skips.append(int(self._ahead.skipped.sum()))
        return out

    monkeypatch.setattr(P.LengthAware, "plan_ahead", spy_made)
    monkeypatch.setattr(P._ModelBased, "_adopt_kept", spy_adopt)
    monkeypatch.setattr(P.LengthAware, "_plan_kept", spy_plan)
    s = _session(True, kept=True)
    s.DEFER_START_MIN_ROWS = 1  # (starts deferred at any batch size: their first plan has no tree)
    _drive(s, steps=120, tell_finishing=tell_finishing)
    assert (len(skips) >= 10) == tell_finishing
    assert checked["plans"] >= 10 and checked["cells"] >= checked["plans"] and checked["left"] >= 10
    assert s.counters["plans_ahead"] > 60 and s.counters["plans_ahead_kept"] == checked["plans"]
    s.close()


def test_a_new_row_with_a_tree_is_planned_by_the_plan_itself(monkeypatch):
    """Starts not deferred (drafted at their first plan): the job has no plan of those rows,
    so the plan is made as usual (on the cells the job updated)."""
    called = []
    plan_kept = P.LengthAware._plan_kept
    monkeypatch.setattr(P.LengthAware, "_plan_kept", lambda *a: called.append(1) or plan_kept(*a))
    s = _session(True, kept=True)  # (12 rows: below DEFER_START_MIN_ROWS, starts drafted at once)
    got = _drive(s, steps=80)
    assert not called and s.counters["plans_ahead"] > 20 and s.counters["plans_ahead_kept"] == 0
    assert len(got) == 81
    s.close()



def test_a_bad_finishing_mask_switches_the_plan_made_ahead_off_not_the_step(caplog):
    s = _session(True, kept=True)
    _drive(s, steps=10)
    rids = sorted(s.live)
    trees, _ = s.plan(rids, 8)
    s.before_forward()
    padded = np.zeros((len(rids), 9), np.int64)
    with caplog.at_level("ERROR"):
        s.committed_batch(rids, [len(t) for t in trees], TokenRows.from_padded(padded, [1] * len(rids)),
                          finishing=np.zeros(len(rids) + 1, bool))
    assert s.counters["plan_ahead_errors"] == 1 and not s.PLAN_AHEAD
    assert "invalid finishing=" in caplog.text
    trees, _ = s.plan(rids, 8)  # (the plans go on, made the usual way)
    assert len(trees) == len(rids)
    s.close()


def test_a_kept_plans_bookkeeping_only_parts_are_made_by_the_bookkeeping(monkeypatch):
    """``LAZY_BOOKKEEPING``: a plan that takes the job's plan for the rows kept leaves the new
    rows' draft-free inputs, the base and node bins gathered by row and the probe record's
    forward to its bookkeeping (settle_plan, in the forward's shadow). The same plans and
    the same bookkeeping -- length predictions, probe totals, cells, table -- bit for bit
    as making them in the plan (the reference)."""
    lazy_plans = []
    defer = P._ModelBased._defer

    def spy_defer(self, rows, budgets, remaining=None, probe_record=None, later=None):
        lazy_plans.append((bool(getattr(self, "ahead_kept", False)), later is not None and probe_record is None))
        return defer(self, rows, budgets, remaining, probe_record, later)

    monkeypatch.setattr(P._ModelBased, "_defer", spy_defer)
    runs = []
    for lazy in (True, False):
        monkeypatch.setattr(P._ModelBased, "LAZY_BOOKKEEPING", lazy)
        s = _session(True, kept=True)
        s.DEFER_START_MIN_ROWS = 1  # (starts deferred: their first plan takes the job's plan)
        got = _drive(s, steps=120, tell_finishing=True)
        pol = s.policy
        pol.settle_plan()
        runs.append((got, sorted(pol._predicted_total.items()), list(pol._log_err), pol.probes.spent_s,
                     pol.probes.total_s, s.counters["plans_ahead_kept"]))
        s.close()
    n_lazy = len(lazy_plans) // 2
    assert runs[0] == runs[1]
    assert runs[0][-1] >= 10 and runs[0][1]  # (kept plans made, first-plan predictions noted)
    lazy, ref = lazy_plans[:n_lazy], lazy_plans[n_lazy:]
    assert all(later for kept, later in lazy if kept) and not any(later for _, later in ref)
    assert sum(later for kept, later in lazy if not kept) >= 60  # (the other fused plans' probe record too)


def test_a_kept_plan_whose_trees_are_not_the_jobs_fills_the_new_rows_first(monkeypatch):
    """The new rows' inputs are only left for later where the plan takes the job's plan:
    a plan that makes its own on the adopted inputs (here the job's trees, gathered by row,
    are said not to be the job's) reads them complete -- the same plans as the reference."""
    real = P._ModelBased.ahead_drafts
    monkeypatch.setattr(P._ModelBased, "ahead_drafts",
                        lambda self, drafts: real(self, None if type(drafts) is tuple else drafts))
    kept_plans = []
    plan_kept = P.LengthAware._plan_kept
    monkeypatch.setattr(P.LengthAware, "_plan_kept", lambda *a: kept_plans.append(1) or plan_kept(*a))
    fills = []
    adopt = P._ModelBased._adopt_kept

    def spy_adopt(self, *a):
        ok = adopt(self, *a)
        fills.append(ok and self._fill_new_rows is not None)
        return ok

    monkeypatch.setattr(P._ModelBased, "_adopt_kept", spy_adopt)
    runs = []
    for lazy in (True, False):
        monkeypatch.setattr(P._ModelBased, "LAZY_BOOKKEEPING", lazy)
        s = _session(True, kept=True)
        s.DEFER_START_MIN_ROWS = 1
        runs.append(_drive(s, steps=80, tell_finishing=True))
        s.close()
    assert runs[0] == runs[1]
    assert not kept_plans and sum(fills) >= 5  # (adopted with the new rows left to fill, then planned itself)


def test_the_job_cuts_its_trees_to_the_plan_it_made(monkeypatch):
    """``JOB_CUTS``: the feedback's job also cuts its trees to the plan it made (at most the
    plan's ``max_nodes`` a row), and a plan that takes that plan for the same rows uses the
    cut trees instead of truncating: the same trees, widths and budgets as the plan's own
    truncate (the reference), on every step; a cap other than the plan's is not used."""
    from das_sglang.core.draft_tree import DraftBatch

    used, compared, capped = [], [], []
    take = P._ModelBased.take_ahead_cut
    truncate = DraftBatch.truncate

    def spy(self, cap):
        out = take(self, cap)
        used.append(out is not None)
        if out is not None:  # (the plan's drafts are the job's trees: the cut is their truncate)
            capped.append(bool((np.asarray(self.last_budgets) > cap).any()))
            want = truncate(self._ahead_cut_check, np.minimum(np.asarray(self.last_budgets, np.int64), cap))
            compared.append(out.offsets.tolist() == want.offsets.tolist()
                            and out.tokens.tolist() == want.tokens.tolist()
                            and out.probs.tolist() == want.probs.tolist()
                            and out.lens().tolist() == want.lens().tolist() and out.width == want.width)
        return out

    plan_fused = P.LengthAware._plan_fused

    def keep_inputs(self, rows, prepared):  # (what the spy compares against)
        self._ahead_cut_check = rows.drafts
        out = plan_fused(self, rows, prepared)
        self.last_budgets = None if out is None else out.budgets
        return out

    monkeypatch.setattr(P._ModelBased, "take_ahead_cut", spy)
    monkeypatch.setattr(P.LengthAware, "_plan_fused", keep_inputs)
    runs = []
    for cuts in (True, False):
        s = _session(True)
        s.JOB_CUTS = cuts
        runs.append(_drive(s, steps=120))
        s.close()
    assert runs[0] == runs[1]  # trees, widths, budgets, modeled seconds, cells, table
    assert sum(used) > 40 and all(compared) and len(compared) == sum(used)
    # (the session's cap is the plan's max_nodes, which its pre-drafts are drafted at: it
    # binds only at the native level, test_plan_ahead_cut_is_the_truncate_of_its_trees_at_the_cap)
    assert not any(capped)
    s = _session(True)
    _drive(s, steps=30)
    pol = s.policy
    assert pol.take_ahead_cut(8) is None  # (consumed by the last plan)
    s.close()


def cut_job(cap: int, before_run=None) -> tuple:
    """A ``PlanAhead`` (its trees cut at ``cap``; -1: not) run by a feedback's extend + draft
    job over three small indexes: (the PlanAhead, the job's trees). ``before_run``: called
    with the PlanAhead before the job starts."""
    from das_sglang.native import LengthIndex, SuffixIndex

    lengths = LengthIndex(False, 0.33, 0.67)
    lengths.add(0, 400)
    ahead = plan_ahead(**_ahead_args(lengths=lengths, max_new=np.full(3, 400), rank_bin=np.zeros(16, np.int64),
                                     depth_bin=np.zeros(17, np.int64)))
    if cap >= 0:
        ahead.cut_at(cap)
    if before_run is not None:
        before_run(ahead)
    idxs = []
    for r in range(3):
        ix = SuffixIndex()
        ix.add_sequence(1, np.tile(np.arange(1, 6 + r, dtype=np.int32), 20), 0)
        ix.add_sequence(2, np.array([1, 2], np.int32), 0)
        idxs.append(ix)
    job = extend_draft_rows_start(idxs, np.array([2, 2, 2]), np.array([3, 4, 5], np.int32), np.array([0, 1, 2, 3]),
                                  np.array([8, 3, 8], np.int32), 0.0, np.array([0]), np.array([1.0]), False, 16,
                                  ahead=ahead)
    *trees, _, _ = job.wait()
    return ahead, trees


def test_plan_ahead_cut_is_the_truncate_of_its_trees_at_the_cap():
    """``PlanAhead.cut_at(cap)``: the job's trees cut to min(budget, cap) nodes a row --
    DraftBatch.truncate of them, with the rows' counts and the widest --; none without it;
    refused once the job ran."""
    from das_sglang.core.draft_tree import DraftBatch

    for cap in (2, 5, -1):
        ahead, trees = cut_job(cap)
        if cap >= 0:
            with pytest.raises(ValueError, match="already ran"):
                ahead.cut_at(1)
        got = ahead.result()
        budgets, cut = got[8][10], ahead.cut()
        assert ahead.cut() is None  # (once)
        assert (budgets > 2).any()
        if cap < 0:
            assert cut is None
            continue
        want = DraftBatch(*trees).truncate(np.minimum(budgets.astype(np.int64), cap))
        *arrays, lens, width = cut
        for a, b in zip(arrays, (want.tokens, want.parents, want.probs, want.depths, want.offsets, want.match_len)):
            assert a.tolist() == b.tolist()
        assert lens.tolist() == want.lens().tolist() and width == want.width and width <= cap


@pytest.mark.parametrize("defer", [True, False])
def test_the_plan_after_a_boundary_forgets_stale_problems_in_the_forwards_shadow(monkeypatch, defer):
    """The plan after a boundary mid-batch (its deferred advance has run) finds the problems
    with neither history nor a live request and leaves forgetting them to the next recording
    of the verify outcomes (``DEFER_FORGET``): that plan is then the plan made ahead, the
    problems are still tracked while it runs and gone once the feedback after it settled;
    forgotten inline (the reference), the finished lengths are recorded first and the plan
    ahead is dropped. Either way the tracked problems stay within history + live."""
    import das_sglang.sglang.session as S

    s = _session(True, kept=True)
    s.DEFER_FORGET = defer
    events = []
    after, forget_now = S.DasSession._after_advance, S.DasSession._forget_now

    def spy_after(self, deferred=False):
        after(self, deferred)
        events.append(("after", deferred, set(self.policy.acceptance.problem_ids())))

    def spy_forget(self, stale):
        events.append(("forget", frozenset(stale)))
        forget_now(self, stale)

    monkeypatch.setattr(S.DasSession, "_after_advance", spy_after)
    monkeypatch.setattr(S.DasSession, "_forget_now", spy_forget)
    rng = np.random.default_rng(3)
    texts = {f"{c}{i}": rng.integers(0, 5, 400).tolist() for c in "pq" for i in range(6)}
    live, n, checked = {}, 0, 0
    for step in range(150):
        if step and step % 15 == 0:
            s.weights_updated()
        while len(live) < 10:  # the p problems first; from step 30 on only q problems start
            pid = f"{'p' if step < 30 else 'q'}{n % 6}"
            s.start(f"r{n}", {"das_problem_id": pid}, [7, 8], [], 60)
            live[f"r{n}"] = (pid, 0)
            n += 1
        rids = sorted(live)
        ahead_before, before = s.counters["plans_ahead"], len(events)
        trees, _ = s.plan(rids, 8)
        mine = [e for e in events[before:] if e[0] == "after"]
        if mine and mine[0][1]:  # this plan ran a deferred advance's follow-up
            stale = [e[1] for e in events[before:] if e[0] == "forget"]
            pending = [o for o in s._outcomes if type(o) is S._Forget]
            if defer and pending:
                checked += 1
                assert s.counters["plans_ahead"] == ahead_before + 1  # the plan made ahead
                assert not stale and pending[0].problem_ids <= mine[0][2]  # still tracked
                gone = pending[0].problem_ids
            elif not defer and stale:
                checked += 1
                assert s.counters["plans_ahead"] == ahead_before  # inline: dropped
                gone = stale[0]
            else:
                gone = None
        else:
            gone = None
        s.before_forward()
        s.committed_batch(rids, [len(t) for t in trees], _verify(live, texts, rids, trees))
        if gone is not None:  # settled by the feedback: forgotten
            assert gone and not gone & set(s.policy.acceptance.problem_ids())
        for rid in rids:
            pid, pos = live[rid]
            if pos >= 40 + 3 * (int(rid[1:]) % 5):
                s.finished(rid, [7, 8], texts[pid][:pos])
                del live[rid]
    s.drain()
    assert checked >= 1  # (a boundary found stale problems)
    tracked = set(s.policy.acceptance.problem_ids())
    assert tracked <= s.drafter.history_problems() | {lv.problem_id for lv in s.live.values()}
    s.close()


@pytest.mark.parametrize("defer", [True, False])
def test_a_boundary_s_snapshot_saved_in_its_forward_keeps_the_plan_made_ahead(tmp_path, defer):
    """A step boundary mid-batch with a history snapshot has the snapshot saved by its
    forward hook (``DEFER_BOUNDARY_SAVE``), so the finished lengths it records do not
    change the policy's inputs before the plan right after the boundary: that plan is the
    plan made ahead (saved at the boundary -- the reference -- it never is where a request
    finished since the last forward). The boundary's save still has those lengths."""
    from das_sglang.core.snapshot import load_history

    cfg = {"drafter": {"window_steps": 2},
           "server": {"policy": "length-aware", "async_updates": True, "history_path": str(tmp_path),
                      "snapshot_interval": 0}}
    s = DasSession(for_layout(load_options(9, json.dumps(cfg)), "ragged"))
    s.ASYNC_MIN_ROWS = 1
    s.policy.lengths.background = False
    s.policy.AHEAD_KEPT = True
    s.DEFER_BOUNDARY_SAVE = defer
    s.DEFER_START_MIN_ROWS = 1  # (a new request's first plan is the root: the worker's case at scale)
    rng = np.random.default_rng(5)
    texts = {f"p{i}": rng.integers(0, 5, 600).tolist() for i in range(4)}
    live, n, after, saved = {}, 0, [], []
    for step in range(80):
        boundary = step and step % 10 == 0
        if boundary:
            s.weights_updated()
        while len(live) < 12:
            pid = f"p{n % 4}"
            s.start(f"r{n}", {"das_problem_id": pid}, [7, 8], [], 400)
            live[f"r{n}"] = (pid, 0)
            n += 1
        rids = list(live)  # (the oldest first: SGLang's order, new requests at the end)
        before = s.counters["plans_ahead"]
        trees, _ = s.plan(rids, 8)
        if boundary:
            after.append(s.counters["plans_ahead"] - before)
        s.before_forward()
        if boundary:
            s.snapshot.wait()
            cols = load_history(tmp_path)[1]["das_lengths"]["columns"]
            saved.append((int(cols[1].max()), int((cols[1] == s.step - 1).sum()), s.step))
        s.committed_batch(rids, [len(t) for t in trees], _verify(live, texts, rids, trees),
                          finishing=np.arange(len(rids)) == 0)
        pid, pos = live.pop(rids[0])  # the oldest request finishes with every step
        s.finished(rids[0], [7, 8], texts[pid][:pos])
    assert len(after) == 7
    assert sum(after) == (7 if defer else 0)
    # every boundary's save has the lengths of the requests finished before it (one a step:
    # ten of the step that ends), none after it
    assert all(top == step - 1 and ended == 10 for top, ended, step in saved[1:]), saved
    s.close()
