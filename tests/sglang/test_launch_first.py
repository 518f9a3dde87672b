"""Issue 12, launch first (``DasSession.launch_plan`` / ``settle_launch``): a step whose plan
would take the plan the feedback's job made ahead verifies that plan's trees before the plan
runs; the plan itself (and the new requests' registration) runs after the launch, in the
forward's shadow, and checks that its trees are the ones verified."""

import json
import logging

import numpy as np
import pytest

from das_sglang.core.draft_tree import DraftBatch
from das_sglang.native import row_map
from das_sglang.sglang.options import for_layout, load_options
from das_sglang.sglang.session import DasSession
from test_plan_ahead import _verify, cut_job


def _session(launch_first: bool) -> DasSession:
    cfg = {"drafter": {"window_steps": 2}, "server": {"policy": "length-aware", "async_updates": True}}
    s = DasSession(for_layout(load_options(9, json.dumps(cfg)), "ragged"))  # (per-row budgets)
    s.LAUNCH_FIRST = launch_first
    s.ASYNC_MIN_ROWS = 1
    s.DEFER_START_MIN_ROWS = 1  # (starts deferred at any batch size, as at RL scale)
    s.policy.lengths.background = False
    return s


def _drive(session, seed=0, steps=120, flush_every=40, rows=12, root_only=None):
    """A random decode workload with finishes and starts, driven as the worker drives it with
    its forward hook after the launch: the batch's ids (a new list when requests finished or
    started, mapped to the previous one), the plan made ahead verified at once where
    ``launch_plan`` gives it (else the plan before the launch), the new requests registered
    and the plan made after the launch, the hook, the feedback with the stop cut's
    finishing rows, the finishes. Returns every verified step's trees, width and the
    policy's budgets, the cells and table at the end, and per step whether it launched
    first, whether its rows changed and whether the ``root_only`` request (verified at the
    root only) was live at its launch."""
    rng = np.random.default_rng(seed)
    texts = {f"p{i}": rng.integers(0, 5, 300).tolist() for i in range(5)}
    live, out, how, n, prev, pending = {}, [], [], 0, None, []
    for step in range(steps):
        if step and step % flush_every == 0:
            session.weights_updated()
        while len(live) < rows:
            live[f"r{n}"] = (f"p{n % 5}", 0)
            pending.append(f"r{n}")  # (SGLang's new requests: registered by the worker's plan)
            n += 1
        rids = sorted(live, key=lambda r: int(r[1:]))  # (kept rows in order, new ones at the end)
        kept = None
        if prev is not None and rids != prev:
            back, unique = row_map(prev, rids)
            kept = (prev, back, unique)

        def register():
            for rid in pending:
                session.start(rid, {"das_problem_id": live[rid][0]}, [7, 8], [], 250, root_only=rid == root_only)
            pending.clear()

        root_live = root_only in live and root_only not in pending
        fast = session.launch_plan(rids, 8, kept=kept)
        if fast is None:
            register()
            trees, width = session.plan(rids, 8, kept=kept)
        else:
            trees, width = fast
            register()
            session.settle_launch(fast, rids, 8, kept=kept)
        last = session.policy.last
        out.append(([t.tokens.tolist() for t in trees], width,
                    None if last is None else (last.budgets.tolist(), last.modeled_s)))
        how.append((fast is not None, kept is not None, root_live))
        session.before_forward()
        accepted = _verify(live, texts, rids, trees)
        ends = [live[rid][1] >= (30 if n <= 24 else 150) + 7 * (int(rid[1:]) % 4) for rid in rids]
        session.committed_batch(rids, [len(t) for t in trees], accepted, finishing=np.array(ends))
        for rid, end in zip(rids, ends):
            if end:
                pid, pos = live[rid]
                session.finished(rid, [7, 8], texts[pid][:pos])
                del live[rid]
        prev = rids
    session.drain()
    oc = session.policy.outcomes
    out.append((oc._cells.tolist(), oc.table().tolist()))
    return out, how


def test_a_step_verifies_the_plan_made_ahead_first_and_its_plan_is_the_same():
    """With launch first, decode steps and steps whose rows changed (finishes, deferred
    starts) verify the job's trees before their plan runs; every such plan, made after the
    launch, has those trees and width (no mismatch), and the whole run -- every verified
    tree, width, budget, modelled seconds, the cells and table -- is the run that plans every
    step before its launch, bit for bit."""
    a, b = _session(True), _session(False)
    got_a, how_a = _drive(a)
    got_b, how_b = _drive(b)
    assert got_a == got_b
    assert not any(f for f, _, _ in how_b)
    decode = sum(f and not c for f, c, _ in how_a)
    changed = sum(f and c for f, c, _ in how_a)
    assert decode > 30 and changed > 10  # (both kinds of steps launched first)
    # so do the steps right after a boundary (every 40 steps here: the drafter's advance
    # has run by then and its bookkeeping waits for the plan after the launch)
    assert all(how_a[i][0] for i in (41, 81))
    assert a.counters["launched_first"] == decode + changed and a.counters["launch_mismatch"] == 0
    assert b.counters["launched_first"] == 0
    # (it is the plan made ahead that launches: as many as the plans that took it)
    assert a.counters["plans_ahead"] == b.counters["plans_ahead"] >= a.counters["launched_first"]
    a.close()
    b.close()


def test_a_plan_that_drafts_other_trees_than_the_launched_ones_is_counted(caplog):
    """Where the plan made after the launch drafts other trees than the ones verified (here
    the launched trees are forced empty), the session counts it and logs once; the verify
    was of the launched trees (exact all the same) and the run goes on."""
    s = _session(True)
    launch = s.policy.launch_trees
    forced = []

    def empty(*a, **k):
        got = launch(*a, **k)
        if got is None:
            return None
        forced.append(int(got[0].lens().sum()))
        return got[0].truncate(np.zeros(len(got[0]), np.int64)), 0

    s.policy.launch_trees = empty
    with caplog.at_level(logging.WARNING, logger="das_sglang"):
        got, how = _drive(s, steps=60)
    assert sum(f for f, _, _ in how) == len(forced) > 20
    assert s.counters["launch_mismatch"] == sum(k > 0 for k in forced) > 10  # (a plan with nodes)
    assert sum("launch_mismatch" in r.getMessage() for r in caplog.records) == 1
    launched = [g for g, (f, _, _) in zip(got, how) if f]
    assert all(w == 0 and not any(t) for t, w, _ in launched)  # (what was verified: the launched trees)
    s.close()


def test_a_step_with_a_root_only_request_plans_before_its_launch():
    """While a request verified at the root only is live (the plan zeroes its row: not the
    plan made ahead), ``launch_plan`` gives None and the plan runs before the launch; the run
    is still the reference's, bit for bit, and launches first again once it finished."""
    a, b = _session(True), _session(False)
    got_a, how_a = _drive(a, steps=220, root_only="r1")
    got_b, _ = _drive(b, steps=220, root_only="r1")
    assert got_a == got_b
    live = [i for i, (_, _, r) in enumerate(how_a) if r]
    assert len(live) > 5 and not any(how_a[i][0] for i in live)
    assert sum(f for f, _, _ in how_a[live[-1] + 1:]) > 20
    a.close()
    b.close()


def test_plan_ahead_launch_reads_the_cut_without_handing_it_over():
    """``PlanAhead.launch(rows)``: the job's cut trees of the rows (the job's own rows for
    None; -1 an empty row) and the widest budget of those rows; ``cut()`` and ``result()``
    still give everything afterwards; a row out of range is named; nothing without a cut,
    nor where the plan would not take the job's (generated counts, no row kept, a kept row
    the job took for finishing)."""
    def not_run(ahead):
        assert ahead.launch(None) is None  # (not run yet)

    for cap in (5, -1):
        ahead, _ = cut_job(cap, not_run)
        if cap < 0:
            assert ahead.launch(None) is None
            continue
        whole, widest = ahead.launch(None)
        rows = np.array([2, -1, 0, 2], np.int64)
        some, widest_some = ahead.launch(rows)
        with pytest.raises(ValueError, match="row 3 of 3"):
            ahead.launch(np.array([0, 3], np.int64))
        # where the plan would not take the job's: other generated counts for its rows, no
        # row kept, a kept row the job took for finishing (skipped)
        assert ahead.launch(None, np.array([5, 6, 7])) is not None
        assert ahead.launch(None, np.array([5, 6, 8])) is None
        assert ahead.launch(np.array([-1, -1], np.int64)) is None
        assert ahead.launch(rows, None, np.array([False, False, True])) is None
        assert ahead.launch(rows, None, np.array([False, True, False])) is not None  # (row 1 not kept)
        with pytest.raises(ValueError, match="skipped has 2 rows, the job 3"):
            ahead.launch(rows, None, np.array([False, True]))
        budgets = ahead.result()[8][10]
        cut = ahead.cut()
        assert cut is not None
        for got, want in zip(whole, cut):
            assert np.asarray(got).tolist() == np.asarray(want).tolist()
        assert widest == int(budgets.max())
        want = DraftBatch.selected(cut).take_rows(rows)
        got = DraftBatch.selected(some)
        assert got.same_trees(want) and got.lens().tolist() == want.lens().tolist()
        assert widest_some == int(budgets[[2, 0]].max()) and got.width == want.width


def test_a_finish_s_work_waits_for_the_next_call_and_changes_nothing():
    """``DEFER_FINISH_WORK``: ``finished`` takes the request out of the live rows and leaves
    the rest of its work (its text made history, the mirror, the length to learn, the
    snapshot's count) to the session's next call, which runs it first, in finish order.
    With launch first that call is the plan after the launch: the finishes reported before a
    step are still pending when its trees are launched. The run -- every plan, the cells
    and table, the history -- is the one where each finish does its work at once."""
    runs, pending_at_launch = [], []
    for defer in (True, False):
        s = _session(True)
        s.DEFER_FINISH_WORK = defer
        launch = s.launch_plan

        def spy(*a, _s=s, **k):
            pending_at_launch.append((defer, len(_s._finish_work)))
            return launch(*a, **k)

        s.launch_plan = spy
        got, how = _drive(s)
        s.sync()
        runs.append((got, {p: {st: sorted(map(tuple, g)) for st, g in by.items()}
                           for p, by in s.drafter.history().items()}))
        s.close()
    assert runs[0] == runs[1]
    assert sum(n for d, n in pending_at_launch if d) > 20
    assert not any(n for d, n in pending_at_launch if not d)


@pytest.mark.parametrize("live_after", [True, False])
def test_a_finish_with_a_bad_text_is_counted_and_the_rest_go_on(caplog, monkeypatch, live_after):
    """A finished request whose text is bad (a token id out of range) is logged, counted
    (``finish_errors``) and not kept as history, whether its work waited for the next call
    (requests still live) or ran at once (the batch drained): the other finishes are kept
    and the call goes on."""
    from das_sglang.sglang import session as S

    monkeypatch.setattr(S._warn_bad_finish, "_last", float("-inf"))  # (rate-limited: one line per 10 s)
    s = _session(True)
    for r in ("a", "b", "c"):
        s.start(r, {"das_problem_id": "p"}, [7, 8], [], 100)
    with caplog.at_level(logging.WARNING, logger="das_sglang"):
        s.finished("a", [7, 8], [1, 2, -5])
        s.finished("b", [7, 8], [1, 2, 3])
        if not live_after:
            s.finished("c", [7, 8], [4, 5])
        s.start("d", {"das_problem_id": "p"}, [7, 8], [], 100)  # (the next call)
        s.sync()
    assert s.counters["finish_errors"] == 1
    assert any("not kept as history" in r.getMessage() and "-5" in r.getMessage() for r in caplog.records)
    kept = sorted(tuple(map(int, t)) for t in s.drafter.history()["p"][s.step])
    assert kept == ([(7, 8, 1, 2, 3)] if live_after else [(7, 8, 1, 2, 3), (7, 8, 4, 5)])
    s.close()


def test_another_session_s_index_changes_do_not_stop_launch_first():
    """The native epoch counts every index's changes in the process. Another session's
    (here an index changed before every launch, after the job's trees were kept) moves it although none of this drafter's
    indexes changed: the plan made ahead still launches first wherever it did without them
    (the job's rows' index versions decide then, the rule the plan's reuse of the trees
    follows), with no mismatch and the same run, bit for bit. A change of one of the job's
    own rows' indexes does stop it (the plan drafts that row again)."""
    from das_sglang.native import SuffixIndex

    ref = _session(True)
    want, how_ref = _drive(ref)
    ref.close()
    foreign = SuffixIndex(8)
    s = _session(True)
    launch_plan = s.launch_plan

    def after_a_foreign_change(*a, **k):
        s._updates.flush()  # (the job's trees kept first, as at a flush the worker makes)
        foreign.add_sequence(len(foreign_ids), np.array([1, 2, 3], np.int32), 0)
        foreign_ids.append(1)
        return launch_plan(*a, **k)

    foreign_ids: list = []
    s.launch_plan = after_a_foreign_change
    got, how = _drive(s)
    assert foreign_ids and got == want
    assert [f for f, _, _ in how] == [f for f, _, _ in how_ref] and sum(f for f, _, _ in how) > 40
    assert s.counters["launch_mismatch"] == 0
    s.close()

    # one of the job's own rows' indexes changed: not current any more
    s = _session(True)
    launch_plan = s.launch_plan
    changed = []

    def after_an_own_change(rids, *a, **k):
        s._updates.flush()  # (the job done and its trees kept, as launch_plan has them)
        if s.drafter.predraft_current() and len(changed) < 3:
            live = s.drafter._live[rids[0]]
            before = s.drafter.predraft_current()
            live.index.add_sequence(10_000 + len(changed), np.array([4, 4, 4], np.int32), s.drafter._step)
            changed.append((before, s.drafter.predraft_current()))
            assert launch_plan(rids, *a, **k) is None
            return None
        return launch_plan(rids, *a, **k)

    s.launch_plan = after_an_own_change
    _drive(s, steps=60)
    assert changed and all(b and not a for b, a in changed)
    s.close()
