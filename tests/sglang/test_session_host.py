"""Issue 12, session side: background updates give the same drafts as inline ones, the
RL step advances on cache flushes, the history cap evicts statistics too, widths snap to
buckets, snapshots are written off the scheduler thread."""

import json
import threading

import numpy as np
import pytest

from das_sglang.core.drafter import TokenRows
from das_sglang.core.snapshot import load_history
from das_sglang.sglang.options import GRAPH_BUCKETS, load_options
from das_sglang.sglang.session import DasSession


def _opts(**server):
    cfg = {"drafter": {"window_steps": 2}, "server": {"policy": "length-aware", **server}}
    return load_options(9, json.dumps(cfg))


def _drive(session, seed=0, steps=60, flush_every=20, hook=False, flat=False, rows=6):
    """A random decode workload; returns every plan's (tree tokens, width). ``hook``: call
    ``before_forward`` after each plan, as the worker does; ``flat``: feed the accepted
    tokens back as the worker does (TokenRows from a padded array), else as lists."""
    rng = np.random.default_rng(seed)
    texts = {f"p{i}": rng.integers(0, 6, 80).tolist() for i in range(4)}
    live, out, n = {}, [], 0
    for step in range(steps):
        if step and step % flush_every == 0:
            session.weights_updated()
        while len(live) < rows:
            pid = f"p{n % 4}"
            session.start(f"r{n}", {"das_problem_id": pid}, [7, 8], [], 60)
            live[f"r{n}"] = (pid, 0)
            n += 1
        rids = sorted(live)
        trees, width = session.plan(rids, 8)
        out.append(([t.tokens.tolist() for t in trees], width))
        if hook:
            session.before_forward()
        commits = []
        for rid, tree in zip(rids, trees):
            pid, pos = live[rid]
            text = texts[pid]
            k = tree.accept_length(text[pos: pos + len(tree) + 1])
            commits.append(text[pos: pos + k + 1])
            live[rid] = (pid, pos + k + 1)
        if flat:
            padded = np.full((len(commits), 9), -1)  # (padding past a row's count: never read)
            for i, c in enumerate(commits):
                padded[i, :len(c)] = c
            commits = TokenRows.from_padded(padded, [len(c) for c in commits])
        session.committed_batch(rids, [len(t) for t in trees], commits)
        for rid in rids:
            pid, pos = live[rid]
            if pos >= 40 + 5 * (int(rid[1:]) % 3):
                session.finished(rid, [7, 8], texts[pid][:pos])
                del live[rid]
    return out


def test_background_updates_draft_exactly_like_inline_ones():
    a = DasSession(_opts(async_updates=True))
    b = DasSession(_opts(async_updates=False))
    assert a.drafter.lazy_eviction and not b.drafter.lazy_eviction
    a.policy.lengths.background = False  # compare drafts and plans with the same predictions
    a.ASYNC_MIN_ROWS = 1  # every batch's extend on the update thread
    a.EVICT_CHUNK_TOKENS = 1  # evictions in the smallest chunks (a rollout): many plans see them pending
    reused = []  # plans that took trees pre-drafted on the update thread (exact, see below)
    reuse = a.drafter._reuse_predrafted
    a.drafter._reuse_predrafted = lambda *x: (lambda out: reused.append(out is not None) or out)(reuse(*x))
    assert _drive(a) == _drive(b)
    assert sum(reused) > 30
    a.sync()
    assert a.drafter.history() .keys() == b.drafter.history().keys()
    a.close()
    b.close()


def test_cache_flush_advances_untagged_step_not_tagged():
    s = DasSession(_opts())
    s.weights_updated()
    assert s.step == 1 and s.drafter.step == 1
    s.start("a", {"das_problem_id": "p", "das_step": 5}, [1, 2], [3], 8)
    s.weights_updated()  # tagged traffic advanced the step since the last flush
    assert s.step == 5
    s.weights_updated()
    assert s.step == 6
    s.close()


def test_untagged_history_slides_and_stats_are_forgotten():
    s = DasSession(_opts())
    for step in range(6):
        rid = f"r{step}"
        s.start(rid, None, [step + 10, 1, 2], [3], 8)  # untagged: problem = prompt hash
        s.committed_batch([rid], [0], [[4]])
        s.policy.observe_verify(s.live[rid].problem_id, 2, 1)
        s.finished(rid, [step + 10, 1, 2], [3, 4])
        s.weights_updated()
    s.sync()
    # window 2: only the last steps' problems keep history, statistics and lengths
    assert len(s.drafter.history()) <= 3
    assert s.policy.acceptance.num_problems <= 3
    s.close()


def test_history_cap_evicts_oldest_and_their_statistics():
    cfg = {"drafter": {"window_steps": 4, "max_history_tokens": 20}, "server": {"policy": "length-aware"}}
    s = DasSession(load_options(9, json.dumps(cfg)))
    for i in range(5):
        s.start(f"r{i}", {"das_problem_id": f"p{i}"}, [1, 2, 3], [4], 8)
        s.policy.observe_verify(f"p{i}", 2, 1)
        s.finished(f"r{i}", [1, 2, 3], [4, 5, 6, 7])  # 7 tokens each
        s.weights_updated()
    s.sync()
    assert s.drafter.history_tokens <= 20
    kept = set(s.drafter.history())
    assert kept == {"p3", "p4"}
    assert set(s.policy.acceptance.problem_ids()) <= kept
    s.close()


@pytest.mark.parametrize("policy", ["length-aware", "fixed", "unlimited", "paper"])
def test_widths_are_always_in_the_bucket_set(policy):
    cfg = {"drafter": {"window_steps": 2}, "server": {"policy": policy}}
    s = DasSession(load_options(13, json.dumps(cfg)))
    buckets = s.options.policy.buckets(12)
    assert buckets == tuple(sorted({b for b in GRAPH_BUCKETS if b <= 12} | {12}))
    widths = {w for _, w in _drive(s, seed=3)}
    assert widths <= set(buckets) and len(widths) >= 1
    s.close()


def test_snapshot_written_off_thread_is_complete_and_atomic(tmp_path):
    s = DasSession(_opts(history_path=str(tmp_path), snapshot_interval=2))
    assert s.snapshot.background
    _drive(s, steps=40)
    s.snapshot.wait()
    history, _ = load_history(tmp_path)  # checksummed: a torn file would raise
    assert history and all(isinstance(p, str) for p in history)
    s.close()
    final, _ = load_history(tmp_path)
    s2 = DasSession(_opts())
    assert set(final) == set(history) | set(final)
    assert not list(tmp_path.glob(".history-*.tmp"))
    s2.close()


def test_snapshot_requested_between_forwards_is_written_from_the_next_forward(tmp_path):
    """Under the worker's forward hook, a save requested while requests decode (a step
    boundary, every ``snapshot_interval`` finishes) is encoded from the next
    ``before_forward`` on; without requests, or without the hook, at once."""
    s = DasSession(_opts(history_path=str(tmp_path), snapshot_interval=0))
    _drive(s, steps=40, hook=True)
    s.start("extra", {"das_problem_id": "p0"}, [7, 8], [], 60)  # a request decodes
    assert s._hold_snapshot()
    s.snapshot.wait()
    s.weights_updated()  # a boundary under traffic: saved by its forward hook, held
    writer = s.snapshot._writer
    assert s._boundary_save and writer._pending is None
    s.before_forward()
    assert writer._held and writer._pending is not None
    s.before_forward()
    s.snapshot.wait()
    assert not writer._held
    history, meta = load_history(tmp_path)
    assert history and "das_counters" in meta
    s.close()
    # without the hook (a caller that never calls before_forward): written at once
    s2 = DasSession(_opts(history_path=str(tmp_path), snapshot_interval=0))
    s2.start("r", {"das_problem_id": "p0"}, [7, 8], [], 60)
    assert not s2._hold_snapshot()
    s2.weights_updated()
    assert not s2.snapshot._writer._held
    s2.close()


@pytest.mark.parametrize("async_updates", [True, False])
def test_flat_feedback_rows_give_what_lists_give(async_updates):
    """The worker's form of a feedback (TokenRows: one flat array, validated once) gives the
    same drafts, plans and statistics as one list per request, on both paths."""
    runs = []
    for flat in (True, False):
        s = DasSession(_opts(async_updates=async_updates))
        s.policy.lengths.background = False
        s.ASYNC_MIN_ROWS = 1
        plans = _drive(s, hook=True, flat=flat)
        s.drain()
        runs.append((plans, _stats(s), {r: s.live[r].generated for r in s.live}))
        s.close()
    assert runs[0][1][1] and any(w for _, w in runs[0][0])  # it recorded and speculated
    assert runs[0] == runs[1]


def test_token_rows_check_their_input_naming_the_row():
    rows = TokenRows.from_padded(np.array([[5, 6, -1], [7, -1, -1], [0, 0, 0]]), [2, 1, 0])
    assert [r.tolist() for r in rows] == [[5, 6], [7], []]
    assert rows.flat.dtype == np.int32 and rows.lens().tolist() == [2, 1, 0] and len(rows) == 3
    with pytest.raises(ValueError, match="invalid token id -3 in row 1"):
        TokenRows.from_padded(np.array([[5, 6], [7, -3]]), [1, 2])
    with pytest.raises(ValueError, match=r"invalid token id 2147483648 in row 0: token ids must be in \[0, 2\*\*31\)"):
        TokenRows.from_padded(np.array([[2**31, 0]]), [1])
    with pytest.raises(ValueError, match=r"invalid length 3 in row 1: must be in \[0, 2\]"):
        TokenRows.from_padded(np.zeros((2, 2), np.int64), [1, 3])
    with pytest.raises(ValueError, match="2-D integer tokens array"):
        TokenRows.from_padded(np.zeros((2, 2)), [1, 1])
    with pytest.raises(ValueError, match="invalid token id -1 in row 1"):
        TokenRows(np.array([1, -1], np.int32), np.array([0, 1, 2], np.int64))
    with pytest.raises(ValueError, match="offsets must rise from 0 to 2"):
        TokenRows(np.array([1, 2], np.int32), np.array([0, 1], np.int64))
    # a bad row in the worker's form never reaches the session: nothing is half-applied
    s = DasSession(_opts())
    s.start("a", {"das_problem_id": "p"}, [1, 2], [3], 8)
    s.committed_batch(["a"], [0], TokenRows.from_padded(np.array([[4, 9]]), [1]))
    s.sync()
    assert s.drafter._indices["p"].sequence_tokens(s.drafter._live["a"].seq_id).tolist() == [1, 2, 3, 4]
    s.close()


def test_bad_feedback_row_raises_at_once_naming_it():
    s = DasSession(_opts())
    s.ASYNC_MIN_ROWS = 1
    s.start("a", {"das_problem_id": "p"}, [1, 2], [3], 8)
    with pytest.raises(ValueError, match="req_id='a'"):
        s.committed_batch(["a"], [0], [[-5]])
    s.committed_batch(["a"], [0], [[4]])  # the session goes on
    s.sync()
    assert s.drafter._indices["p"].sequence_tokens(s.drafter._live["a"].seq_id).tolist() == [1, 2, 3, 4]
    s.close()


def test_pre_drafted_trees_have_the_policy_sizes_and_are_reused():
    """The pre-draft job drafts each row at the policy's ``draft_sizes`` (small trees for
    rows with small budgets), the plan asks the same sizes, so it reuses those trees, and
    never gives a row more nodes than its size."""
    cfg = {"drafter": {"window_steps": 2}, "policy": {"draft_headroom_min_rows": 0},
           "server": {"policy": "length-aware", "async_updates": True}}
    s = DasSession(load_options(9, json.dumps(cfg)))
    s.policy.lengths.background = False
    s.ASYNC_MIN_ROWS = 1
    seen, reused = [], []
    draft = s.drafter.speculate_flat

    def spy(req_ids, budget, threads=None):
        seen.append((list(req_ids), np.broadcast_to(np.asarray(budget), (len(req_ids),)).copy()))
        return draft(req_ids, budget, threads)

    s.drafter.speculate_flat = spy
    reuse = s.drafter._reuse_predrafted
    s.drafter._reuse_predrafted = lambda *x: (lambda out: reused.append(out is not None) or out)(reuse(*x))
    plan = s.plan

    def checked(rids, max_nodes):
        trees, width = plan(rids, max_nodes)
        sizes = seen[-1][1]
        assert all(len(t) <= k for t, k in zip(trees, sizes.tolist()))
        return trees, width

    s.plan = checked
    _drive(s)
    sized = [b for _, b in seen[1:]]
    assert any(len(set(b.tolist())) > 1 for b in sized)  # per-row sizes, not one for all
    assert any((b < 8).any() for b in sized)  # smaller trees than the cap
    assert sum(reused) > 30  # the job's trees (drafted at those sizes) were the plan's
    s.close()


def test_eviction_chunks_wait_for_the_forward_hook_and_still_finish():
    # With the worker's before_forward hook, plan leaves the step's eviction chunk due and
    # the hook submits it (after the verify inputs are built); the drafts are the same as
    # without the hook, and the out-of-window history still leaves the index.
    hooked, plain = DasSession(_opts()), DasSession(_opts())
    for s in (hooked, plain):
        s.EVICT_CHUNK_TOKENS = 1  # the smallest chunks (a rollout): many plans see evictions pending
        s.policy.lengths.background = False
    submitted = []
    submit, submit_each = hooked._updates.submit, hooked._updates.submit_each
    hooked._updates.submit = lambda fn, *a, **kw: (submitted.append(getattr(fn, "__name__", "")),
                                                   submit(fn, *a, **kw))
    hooked._updates.submit_each = lambda items: (submitted.extend(getattr(fn, "__name__", "") for fn, _ in items),
                                                 submit_each(items))
    orig_plan = hooked.plan
    chunks_in_plan = []

    def plan(rids, n):
        before = submitted.count("_evict_chunk")
        out = orig_plan(rids, n)
        chunks_in_plan.append(submitted.count("_evict_chunk") - before)
        hooked.before_forward()
        return out

    hooked.plan = plan
    assert _drive(hooked, steps=80) == _drive(plain, steps=80)
    assert submitted.count("_evict_chunk") > 0  # the hook submitted them ...
    assert sum(chunks_in_plan[1:]) == 0  # ... and no plan after the first hook call did
    for s in (hooked, plain):
        s.sync()
        while s._evicting:  # what the next forwards' chunks would do
            s._evict_chunk()
    assert hooked.drafter.history().keys() == plain.drafter.history().keys()
    assert not hooked.drafter._evicting
    hooked.close()
    plain.close()


def _shared_cap_opts():
    cfg = {"drafter": {"window_steps": 2, "shared_max_tokens": 150}, "server": {"policy": "length-aware"}}
    return load_options(9, json.dumps(cfg))


def test_shared_copies_past_the_cap_leave_during_the_forward_with_the_hook():
    # Finished rollouts past shared_max_tokens leave the shared index: with the worker's
    # before_forward hook the removal is submitted there (it runs during the forward), so
    # the next feedback's extend job removes nothing; the drafts are the same as without
    # the hook (nothing drafts in between), and the shared index ends the same.
    hooked, plain = DasSession(_shared_cap_opts()), DasSession(_shared_cap_opts())
    for s in (hooked, plain):
        s.ASYNC_MIN_ROWS = 1  # the background path, where the extend job runs
        s.policy.lengths.background = False
    removed_in_hook = []
    take = hooked.drafter.take_unshare

    def take_spy():
        ids = take()
        removed_in_hook.append(0 if ids is None else len(ids))
        return ids

    hooked.drafter.take_unshare = take_spy
    orig_plan = hooked.plan
    pending_at_feedback = []
    orig_fb = hooked.committed_batch

    def plan(rids, n):
        out = orig_plan(rids, n)
        hooked.before_forward()
        return out

    def feedback(*a):
        pending_at_feedback.append(len(hooked.drafter._unshare_pending))
        return orig_fb(*a)

    hooked.plan, hooked.committed_batch = plan, feedback
    assert _drive(hooked, steps=80) == _drive(plain, steps=80)
    assert sum(removed_in_hook) > 0  # the hook took the copies past the cap ...
    assert not any(pending_at_feedback)  # ... so no extend job had any left to remove
    for s in (hooked, plain):
        s.sync()
        s.drafter._apply_unshare()  # (plain: what its next extend would remove)
        assert s.drafter.shared_tokens <= 150
    assert hooked.drafter._global.num_tokens == plain.drafter._global.num_tokens
    assert hooked.drafter._global.num_sequences == plain.drafter._global.num_sequences
    hooked.close()
    plain.close()


def _stats(session):
    acc = session.policy.acceptance
    return (acc._by_budget.tolist(), {p: (st.n_obs, st.sum_accepted, st.sum_expected, st.sum_matched)
                                      for p, st in acc._stats.items()})


@pytest.mark.parametrize("async_updates", [True, False])
def test_verify_outcomes_are_recorded_one_step_late_on_every_path(async_updates):
    """With the worker's before_forward hook the previous feedback's outcomes are recorded on
    the update thread during the forward; without it (or without the thread) the next
    feedback records them first: the same plans and statistics either way."""
    runs = []
    for hook in (True, False):
        s = DasSession(_opts(async_updates=async_updates))
        s.policy.lengths.background = False
        s.ASYNC_MIN_ROWS = 1
        plans = _drive(s, hook=hook)
        s.drain()  # records what the last feedback left
        runs.append((plans, _stats(s)))
        s.close()
    assert runs[0][1][1]  # statistics were recorded
    assert runs[0] == runs[1]


def test_outcomes_reach_the_policy_at_the_next_forward_not_at_the_feedback():
    s = DasSession(_opts(async_updates=True))
    s.start("r0", {"das_problem_id": "p"}, [7, 8, 9], [], 60)
    for _ in range(2):
        s.plan(["r0"], 8)
        s.before_forward()
        s.committed_batch(["r0"], [3], [[1, 2]])  # 3 proposed, 1 accepted
    # the first feedback's outcome went in during the second forward; the second's waits
    assert s.policy.acceptance._stats["p"].n_obs == 1
    s.plan(["r0"], 8)
    s.before_forward()
    s._settle_outcomes()  # (the recording on the update thread has finished)
    assert s.policy.acceptance._stats["p"].n_obs == 2
    s.close()
    assert s.policy.acceptance._stats["p"].n_obs == 2  # close records nothing twice


def test_a_bad_outcome_raises_at_the_feedback_naming_the_request():
    s = DasSession(_opts(async_updates=True))
    s.start("r0", {"das_problem_id": "p"}, [7, 8, 9], [], 60)
    s.plan(["r0"], 8)
    with pytest.raises(ValueError, match="req_id='r0'.*proposed=1, accepted=2"):
        s.committed_batch(["r0"], [1], [[1, 2, 3]])
    with pytest.raises(ValueError, match="req_id='r0'.*proposed=0, accepted=1"):
        s.committed("r0", 0, [1, 2])
    s.close()


def test_the_forward_hook_starts_due_length_rebuilds_not_the_plan(monkeypatch):
    # (the rebuild path of the length predictor: the incremental index never rebuilds on a
    # finish, see tests/test_length_predictor.py)
    from das_sglang.core.length_predictor import LengthPredictor

    monkeypatch.setattr(LengthPredictor, "INCREMENTAL", False)
    s = DasSession(_opts(async_updates=True))
    lengths = s.policy.lengths
    assert lengths.background and lengths.rebuild_on_query
    started = []
    lengths._start_rebuild = lambda: started.append(lengths._version)  # (record, do not run)
    s.start("r0", {"das_problem_id": "p"}, [7, 8, 9], [], 60)
    s.plan(["r0"], 8)
    s.before_forward()
    assert not lengths.rebuild_on_query  # queries leave rebuilds to the hook from now on
    lengths.observe_finished("p", 40)
    lengths._last_start = 0.0  # (due: the last rebuild was long ago)
    s.committed_batch(["r0"], [0], [[5]])
    s.plan(["r0"], 8)  # a query of a stale index: starts nothing
    assert started == []
    s.before_forward()
    assert started == [lengths._version]
    s.close()


def test_shared_removals_that_yield_to_a_feedback_leave_the_rest_to_its_extend():
    # A feedback waiting for the update thread makes the forward's shared-index removals
    # stop after their first native call; the rest leave with the feedback's extend job
    # (before its appends): the drafts and the final shared index are the same.
    yielding, plain = DasSession(_shared_cap_opts()), DasSession(_shared_cap_opts())
    for s in (yielding, plain):
        s.ASYNC_MIN_ROWS = 1
        s.policy.lengths.background = False
    yielding.UNSHARE_CHUNK = 1
    yielding._yield_updates.set = lambda: None  # (the feedback's own set/clear: no-ops)
    yielding._yield_updates.clear = lambda: None
    yielding._yield_updates.is_set = lambda: True  # every removal job yields after one call
    deferred = []
    defer = yielding.drafter.defer_unshare
    yielding.drafter.defer_unshare = lambda ids: (deferred.append(len(ids)), defer(ids))
    orig_plan = yielding.plan

    def plan(rids, n):
        out = orig_plan(rids, n)
        yielding.before_forward()
        return out

    yielding.plan = plan
    assert _drive(yielding, steps=80) == _drive(plain, steps=80)
    assert sum(deferred) > 0  # some copies were left to the next extend
    for s in (yielding, plain):
        s.sync()
        s.drafter._apply_unshare()
        assert s.drafter.shared_tokens <= 150
    assert yielding.drafter._global.num_tokens == plain.drafter._global.num_tokens
    assert yielding.drafter._global.num_sequences == plain.drafter._global.num_sequences
    yielding.close()
    plain.close()


def test_the_session_sets_the_background_nice_of_its_native_jobs():
    from das_sglang.native import background_nice, set_background_nice

    before = background_nice()
    try:
        s = DasSession(_opts(background_nice=5))
        assert background_nice() == 5
        s.close()
        inline = DasSession(_opts(async_updates=False, background_nice=3))  # no started jobs
        assert background_nice() == 5
        inline.close()
    finally:
        set_background_nice(before)


def test_the_plans_bookkeeping_runs_during_the_forward_on_the_policy_thread():
    """A plan leaves its bookkeeping (probe record, what the calibration remembers of it,
    draft sizes) for later; with the worker's hook the policy's own thread does it during
    the verify forward, before the previous feedback's outcomes are recorded (beside the
    update thread's native registrations, not queued before them)."""
    import threading

    s = DasSession(_opts(async_updates=True))
    s.policy.lengths.background = False
    ran = []
    bookkeep = s.policy._bookkeep
    s.policy._bookkeep = lambda *a: ran.append(threading.current_thread()) or bookkeep(*a)
    s.start("r0", {"das_problem_id": "p"}, [7, 8, 9], [], 60)
    for k in range(3):
        s.plan(["r0"], 8)
        assert s.policy.plan_pending() and len(ran) == k  # left for later
        s.before_forward()
        s._settle_outcomes()  # (what the feedback does first)
        assert not s.policy.plan_pending() and len(ran) == k + 1
        assert ran[-1].name == "das-policy-updates"
        s.committed_batch(["r0"], [0], [[1]])
    s.close()


def test_the_policy_recording_runs_while_the_update_thread_is_busy():
    """The verify outcomes are recorded during the forward even while the update thread
    still registers the step's new requests (before: queued behind them, one thread)."""
    import threading

    s = DasSession(_opts(async_updates=True))
    s.policy.lengths.background = False
    s.start("r0", {"das_problem_id": "p"}, [7, 8, 9], [], 60)
    s.plan(["r0"], 8)
    s.before_forward()
    s.committed_batch(["r0"], [3], [[1, 2]])  # an outcome to record at the next forward
    s.plan(["r0"], 8)
    gate, recorded = threading.Event(), threading.Event()
    s._updates.submit(gate.wait)  # the update thread: busy until the gate opens
    observe = s.policy.observe_verify_many
    s.policy.observe_verify_many = lambda *a: (observe(*a), recorded.set())
    s.before_forward()
    assert recorded.wait(10)  # recorded with the update thread still blocked
    assert s._updates.busy()
    gate.set()
    s._settle_outcomes()
    assert s.policy.acceptance._stats["p"].n_obs == 1
    s.close()


def test_a_failed_policy_recording_raises_at_the_next_plan_and_the_session_goes_on():
    s = DasSession(_opts(async_updates=True))
    s.policy.lengths.background = False
    s.start("r0", {"das_problem_id": "p"}, [7, 8, 9], [], 60)
    s.plan(["r0"], 8)
    s.before_forward()
    s.committed_batch(["r0"], [3], [[1, 2]])
    s.plan(["r0"], 8)
    observe = s.policy.observe_verify_many

    def boom(*a):
        raise KeyError("broken statistics")

    s.policy.observe_verify_many = boom
    s.before_forward()
    with pytest.raises(RuntimeError, match="background policy recording failed.*broken statistics"):
        s.plan(["r0"], 8)
    s.policy.observe_verify_many = observe
    s.committed_batch(["r0"], [0], [[4]])
    trees, _ = s.plan(["r0"], 8)  # the error was raised once; the session goes on
    assert len(trees) == 1
    s.close()


def test_rows_resolved_once_per_batch_never_outlive_a_start_or_finish():
    """The plan and the feedback of a step resolve the batch's rows once (session and
    drafter memo); a request that ends and a new one under the same req_id is looked up
    again: its own problem, budget cap and index, not the old one's."""
    s = DasSession(_opts(async_updates=True))
    s.policy.lengths.background = False
    d = s.drafter
    s.start("r0", {"das_problem_id": "p"}, [7, 8, 9], [], 60)
    s.start("r1", {"das_problem_id": "q"}, [5, 6], [], 60)
    rids = ["r0", "r1"]
    for _ in range(3):
        s.plan(list(rids), 8)
        memo, dmemo = s._rows_memo, d._rows_memo
        s.committed_batch(list(rids), [0, 0], [[1], [2]])
        s.sync()
        assert s._rows_memo is memo and d._rows_memo is dmemo  # the same rows: reused
    s.finished("r1", [5, 6], [2, 2, 2])
    s.start("r1", {"das_problem_id": "z"}, [4], [], 3)  # the id again: another request
    s.plan(list(rids), 8)
    lives, pids, max_new, *_ = s._rows(list(rids))
    assert pids == ["p", "z"] and max_new.tolist() == [60, 3] and lives[1] is s.live["r1"]
    s.sync()
    _, idx, seq_ids = d._rows(list(rids))
    assert idx[1] is d._live["r1"].index and seq_ids[1] == d._live["r1"].seq_id
    assert d._live["r1"].problem_id == "z"
    with pytest.raises(ValueError, match="unknown req_id='r9'"):
        s.plan(["r0", "r9"], 8)
    s.close()


@pytest.mark.parametrize("same_prompt", [True, False])
def test_a_finished_request_keeps_the_text_it_returned(same_prompt, tmp_path, caplog, monkeypatch):
    """A finish reuses the prompt checked at the start (only the output is converted) when
    the caller passes the same prompt; a different one is taken as given. Either way the
    history holds exactly prompt + output, and a bad output token still names the request
    (logged and counted, not raised: that request is not kept, nothing else changes)."""
    s = DasSession(_opts(history_path=str(tmp_path), snapshot_interval=0))
    s.start("a", {"das_problem_id": "p"}, [5, 6, 7], [], 50)
    s.plan(["a"], 8)
    s.committed_batch(["a"], [0], [[1]])
    prompt = [5, 6, 7] if same_prompt else [9, 6, 4]
    s.finished("a", prompt, [1, 2, 3])
    s.sync()
    assert [list(map(int, t)) for t in s.drafter.history()["p"][s.step]] == [prompt + [1, 2, 3]]
    group = s._mirror["p"][s.step]
    assert [list(map(int, g)) for g in group] == [prompt + [1, 2, 3]]
    s.start("b", {"das_problem_id": "p"}, [5, 6, 7], [], 50)
    _bad_finish_is_named(s, lambda: s.finished("b", [5, 6, 7], [1, -4]), caplog, monkeypatch)
    s.close()


def _bad_finish_is_named(s, finish, caplog, monkeypatch) -> None:
    """A finish with a bad output id: logged naming the request, counted, not kept, nothing
    raised (that request only, DasSession._finish_one)."""
    import logging

    from das_sglang.sglang import session as S

    monkeypatch.setattr(S._warn_bad_finish, "_last", float("-inf"))  # (rate-limited: one line per 10 s)
    kept = len(s.drafter.history().get("p", {}).get(s.step, []))
    with caplog.at_level(logging.WARNING, logger="das_sglang"):
        finish()
        s.sync()
    assert s.counters["finish_errors"] == 1
    assert any("text of req_id='b'" in r.getMessage() for r in caplog.records)
    assert len(s.drafter.history()["p"][s.step]) == kept


@pytest.mark.parametrize("form", ["array", "ndarray", "tuple", "iterator"])
def test_a_finish_takes_the_output_as_sglang_keeps_it(form, tmp_path, caplog, monkeypatch):
    """The worker hands a finish the output as SGLang keeps it (``delivered_output``: a
    slice of its ``array("q")``, no Python list); any sequence or iterable of ids gives
    the same history, cut at max_new_tokens, and a bad id still names the request (logged,
    counted, not kept)."""
    from array import array

    make = {"array": lambda t: array("q", t), "ndarray": lambda t: np.asarray(t, dtype=np.int64),
            "tuple": tuple, "iterator": iter}[form]
    s = DasSession(_opts(history_path=str(tmp_path), snapshot_interval=0))
    s.start("a", {"das_problem_id": "p"}, [5, 6, 7], [], 4)
    s.finished("a", [5, 6, 7], make([1, 2, 3, 4, 99]))  # (one past max_new_tokens)
    s.start("e", {"das_problem_id": "p"}, [5, 6, 7], [], 4)
    s.finished("e", [5, 6, 7], make([]))
    s.sync()
    assert [list(map(int, t)) for t in s.drafter.history()["p"][s.step]] == [[5, 6, 7, 1, 2, 3, 4], [5, 6, 7]]
    s.start("b", {"das_problem_id": "p"}, [5, 6, 7], [], 50)
    _bad_finish_is_named(s, lambda: s.finished("b", [5, 6, 7], make([1, -4])), caplog, monkeypatch)
    s.close()


def test_large_batches_register_new_requests_during_the_forward():
    """At DEFER_START_MIN_ROWS rows and more, requests started since the previous plan are
    registered with the drafter after the plan (at before_forward): their first tree is
    empty, the drafter knows them during the forward, and they draft from their second plan
    on; below it they draft at once. Inline and background updates still draft alike."""
    def session(async_updates=True):
        s = DasSession(_opts(async_updates=async_updates))
        s.policy.lengths.background = False
        return s

    for n, deferred in ((70, True), (20, False)):
        s = session()
        hist = [1, 2, 3, 4, 5, 6] * 10
        for k in range(3):
            s.start(f"h{k}", {"das_problem_id": "p"}, [7, 8], [], 100)
            s.finished(f"h{k}", [7, 8], hist)
        s.before_forward()  # (a worker's earlier step: plans leave registrations to the hook)
        ids = [f"r{i}" for i in range(n)]
        for r in ids:
            s.start(r, {"das_problem_id": "p"}, [7, 8], [1, 2, 3], 100)
        trees, _ = s.plan(ids, 8)
        assert (sum(len(t) for t in trees) == 0) is deferred
        assert (s._deferred_ids == set(ids)) is deferred
        s.before_forward()
        s.sync()
        assert not s._deferred and all(r in s.drafter._live for r in ids)
        s.committed_batch(ids, [len(t) for t in trees], [[4]] * n)
        trees, _ = s.plan(ids, 8)
        assert sum(len(t) for t in trees) > 0
        s.close()
    a, b = session(True), session(False)
    a.ASYNC_MIN_ROWS = 1
    assert _drive(a, steps=40, rows=70, hook=True) == _drive(b, steps=40, rows=70, hook=True)
    a.close()
    b.close()


def test_a_deferred_start_finished_before_any_plan_is_history():
    """A request that starts and finishes before a plan (its start still deferred) is
    registered first, then finished: its text is history like any other."""
    s = DasSession(_opts())
    s.start("a", {"das_problem_id": "p"}, [7, 8], [], 50)
    assert s._deferred_ids == {"a"}
    s.finished("a", [7, 8], [1, 2, 3])
    s.sync()
    assert [list(map(int, t)) for t in s.drafter.history()["p"][s.step]] == [[7, 8, 1, 2, 3]]
    s.close()


def test_large_batches_hand_finishes_to_the_drafter_during_the_forward():
    """At DEFER_START_MIN_ROWS rows and more a finish waits with the deferred starts, in
    event order, until the next plan's verify inputs are built (before_forward): the plan's
    drafts are those of handing it over at once (the finished text is already indexed), and
    afterwards the text is history. Below it, and once the batch drains, it is handed over
    by the next plan / at once."""
    hist = [1, 2, 3, 4, 5, 6] * 10
    plans = {}
    for defer in (True, False):
        for n in (70, 20):
            s = DasSession(_opts(async_updates=True))
            s.policy.lengths.background = False
            s.DEFER_FINISHES = defer
            for k in range(3):
                s.start(f"h{k}", {"das_problem_id": "p"}, [7, 8], [], 100)
                s.finished(f"h{k}", [7, 8], hist)
            ids = [f"r{i}" for i in range(n)]
            for r in ids:
                s.start(r, {"das_problem_id": "p"}, [7, 8], [1, 2, 3], 100)
            s.plan(ids, 8)
            s.before_forward()
            s.committed_batch(ids, [0] * n, [[4]] * n)
            s.finished("r0", [7, 8], [1, 2, 3, 4])
            assert s._finish_work and not s._deferred  # (its work waits for the next call ...)
            s._settle_finishes()  # (... which runs it first)
            assert bool(s._deferred) is defer  # (queued: the next plan applies the rule)
            deferred = defer and n >= s.DEFER_START_MIN_ROWS
            trees, _ = s.plan(ids[1:], 8)
            plans[defer, n] = [t.tokens.tolist() for t in trees]
            s._updates.flush()
            assert ("r0" in s.drafter._live) is deferred  # not yet handed over: the plan drafted
            s.before_forward()
            s.sync()
            assert "r0" not in s.drafter._live and not s._deferred
            assert [7, 8, 1, 2, 3, 4] in [list(map(int, t)) for t in s.drafter.history()["p"][s.step]]
            # the batch drains: its last finish is handed over without another plan
            for r in ids[1:]:
                s.finished(r, [7, 8], [1, 2, 3, 4])
            assert not s._deferred
            s.sync()
            assert not s.drafter._live and len(s.drafter.history()["p"][s.step]) == n + 3
            s.close()
    assert plans[True, 70] == plans[False, 70] and plans[True, 20] == plans[False, 20]
    assert sum(map(len, plans[True, 70])) > 0


def test_generated_counts_live_in_slots_that_finished_requests_hand_back():
    """Each live request's generated count is a slot of one array (read by the plan with
    one gather, added to by the feedback with one scatter): slots grow past the initial
    capacity, are reused after a finish or a drop, and a request twice in a batch counts
    both rows' tokens."""
    s = DasSession(_opts(async_updates=False))
    ids = [f"r{i}" for i in range(100)]  # past the first 64 slots
    for i, r in enumerate(ids):
        s.start(r, {"das_problem_id": f"p{i % 3}"}, [7, 8], [1] * (i % 4), 50)
    assert len({s.live[r].slot for r in ids}) == 100
    assert [s.live[r].generated for r in ids] == [i % 4 for i in range(100)]
    _, _, max_new, prompt_len, *_ = s._rows(ids)
    assert max_new.tolist() == [50] * 100 and prompt_len.tolist() == [2] * 100
    s.plan(ids, 8)
    s.committed_batch(ids, [0] * 100, [[5] * 1 for _ in ids])
    assert [s.live[r].generated for r in ids] == [i % 4 + 1 for i in range(100)]
    freed = {s.live["r3"].slot, s.live["r7"].slot}
    s.finished("r3", [7, 8], [1, 1, 1, 5])
    s.drop("r7")
    s.start("n1", {"das_problem_id": "p0"}, [7, 8], [], 50)
    s.start("n2", {"das_problem_id": "p0"}, [7, 8], [2, 2], 50)
    assert {s.live["n1"].slot, s.live["n2"].slot} == freed
    assert (s.live["n1"].generated, s.live["n2"].generated) == (0, 2)
    s.start("n3", {"das_problem_id": "p0"}, [7, 8, 9, 10], [], 7)
    _, _, max_new, prompt_len, *_ = s._rows(["n3", "n1", "r0"])
    assert max_new.tolist() == [7, 50, 50] and prompt_len.tolist() == [4, 2, 2]
    rows = ["r0", "n2", "r0"]
    s.committed_batch(rows, [0, 0, 0], [[5], [5], [5]])
    assert (s.live["r0"].generated, s.live["n2"].generated) == (3, 3)
    s.close()


def test_boundary_mid_batch_queues_the_drafter_advance_behind_the_steps_starts():
    """A step boundary while a large batch decodes (deferred starts: >= DEFER_START_MIN_ROWS
    rows) does not wait for the update thread: the drafter's advance is queued behind the
    step's deferred starts and finishes and runs with them at the next before_forward. A
    request started before the boundary is history of the old step, one started after it
    of the new one; the plan right after the boundary drafts from the drafter as it was
    (the new request a placeholder); the plan after that sees the advanced drafter, and the
    boundary's follow-up (stale problems forgotten) has run. Idle boundaries apply at once."""
    s = DasSession(_opts(async_updates=True))
    rng = np.random.default_rng(0)
    text = rng.integers(0, 6, 400).tolist()
    n = s.DEFER_START_MIN_ROWS + 8
    rids = [f"r{i}" for i in range(n)]
    s.weights_updated()  # nothing decodes: at once
    assert s.step == 1 and s.drafter.step == 1
    for i, r in enumerate(rids):
        s.start(r, {"das_problem_id": f"p{i % 5}"}, [7, 8, i % 5], [], 300)
    pos = dict.fromkeys(rids, 0)

    def step(rows):
        trees, _ = s.plan(rows, 8)
        s.before_forward()
        commits = []
        for r, t in zip(rows, trees):
            k = t.accept_length(text[pos[r]: pos[r] + len(t) + 1])
            commits.append(text[pos[r]: pos[r] + k + 1])
            pos[r] += k + 1
        s.committed_batch(rows, [len(t) for t in trees], commits)
        return trees

    for _ in range(3):
        step(rids)
    s.finished(rids[0], [7, 8, 0], text[: pos[rids[0]]])  # history of step 1
    s.start("old", {"das_problem_id": "p1"}, [7, 8, 1], [], 300)  # (deferred: step 1)
    rows = rids[1:] + ["old"]
    pos["old"] = 0
    s.weights_updated()  # mid-batch: the drafter's advance waits in the queue
    assert s.step == 2 and s.drafter.step == 1 and s._deferred
    s.start("new", {"das_problem_id": "p2"}, [7, 8, 2], [], 300)  # after the boundary: step 2
    rows.append("new")
    pos["new"] = 0
    trees = step(rows)
    assert len(trees[-1]) == 0 and len(trees[-2]) == 0  # placeholders: registered at before_forward
    s.sync()
    assert s.drafter.step == 2 and not s._advance_due
    assert s.drafter._live["old"].step == 1 and s.drafter._live["new"].step == 2
    step(rows)
    assert s.drafter.history()["p0"].keys() == {1}
    tracked = set(s.policy.acceptance.problem_ids())
    assert tracked <= s.drafter.history_problems() | {lv.problem_id for lv in s.live.values()}
    s.close()


def test_a_finish_given_the_start_s_prompt_tuple_skips_the_compare_and_keeps_the_text(monkeypatch):
    """The worker starts and finishes a request with one tuple of its prompt: the finish
    does not compare it with the start's tokens (tuples are immutable), and the history is
    the prompt + output either way. Any other prompt object is compared: a changed prompt
    makes the returned text the history."""
    import das_sglang.sglang.session as S

    def histories(session):
        session.drain()
        return {p: [t.tolist() for t in seqs] for p, steps in session.drafter.history().items()
                for seqs in steps.values()}

    compared = []
    same = S._same_tokens
    monkeypatch.setattr(S, "_same_tokens", lambda a, b: (compared.append(1), same(a, b))[1])
    s = DasSession(_opts(async_updates=True))
    prompt = (7, 8, 9, 10)
    s.start("r0", {"das_problem_id": "p"}, prompt, [], 60)
    s.committed_batch(["r0"], [0], [[1]])
    s.committed_batch(["r0"], [0], [[2]])
    s.finished("r0", prompt, [1, 2])
    assert compared == []  # the very tuple: no compare
    assert histories(s) == {"p": [[7, 8, 9, 10, 1, 2]]}
    s.start("r1", {"das_problem_id": "q"}, prompt, [], 60)
    s.committed_batch(["r1"], [0], [[3]])
    s.finished("r1", list(prompt), [3])  # an equal list: compared, the same text kept
    assert compared == [1]
    s.start("r2", {"das_problem_id": "u"}, prompt, [], 60)
    s.committed_batch(["r2"], [0], [[4]])
    s.finished("r2", (7, 8, 9, 11), [4])  # another tuple, another prompt: its text is the history
    assert compared == [1, 1]
    h = histories(s)
    assert h["q"] == [[7, 8, 9, 10, 3]] and h["u"] == [[7, 8, 9, 11, 4]]
    s.close()


def test_update_items_queued_together_each_run_and_an_error_is_raised_once():
    """``_Updates.submit_each``: one queue item for several updates; each runs in order even
    when one before it fails, and the next flush raises that failure, once."""
    from das_sglang.sglang.session import _Updates

    u = _Updates()
    ran = []

    def boom():
        ran.append("boom")
        raise KeyError("bad update")

    u.submit_each([(ran.append, ("a",)), (boom, ()), (ran.append, ("b",))])
    with pytest.raises(RuntimeError, match="bad update"):
        u.flush()
    assert ran == ["a", "boom", "b"]
    u.flush()  # raised once
    u.close()


def test_update_thread_busy_and_flush_cover_every_queued_item_not_only_the_latest():
    """``_Updates`` keeps one done-signal per item (the latest): the thread runs items in
    order, so the latest done means all done. While the first of three items blocks, the
    thread is busy and a flush waits; once it returns every item has run, in order, and
    each item's signal is set (``submit`` returns it, the session waits on it)."""
    import threading

    from das_sglang.sglang.session import _Updates

    u = _Updates()
    gate, ran = threading.Event(), []
    first = u.submit(lambda: (gate.wait(5), ran.append(1)))
    u.submit(ran.append, 2)
    last = u.submit(ran.append, 3)
    assert u.busy() and not first.is_set() and not last.is_set()
    flushed = threading.Event()
    t = threading.Thread(target=lambda: (u.flush(), flushed.set()))
    t.start()
    assert not flushed.wait(0.05)  # (the first item still blocks)
    gate.set()
    t.join(5)
    assert flushed.is_set() and ran == [1, 2, 3]
    assert first.is_set() and last.is_set() and not u.busy()
    first.wait()  # (a set signal: any number of waits return at once)
    last.wait()
    u.close()


def test_a_finished_length_reaches_the_policy_one_step_late_and_before_a_boundary_or_a_snapshot(tmp_path):
    """A finish queues its length with the verify outcomes: the policy records it during
    the next forward (or by the next feedback), off the finish's path; a step boundary, a
    snapshot's meta and forgetting problems record the pending ones first, so a length
    belongs to the step it finished in and every saved rollout has its length."""
    s = DasSession(_opts(async_updates=True, history_path=str(tmp_path)))
    s.policy.lengths.background = False
    lengths = s.policy.lengths
    for r in ("r0", "r1", "r2"):
        s.start(r, {"das_problem_id": "p", "das_step": 3}, [7, 8, 9], [], 60)
    s.plan(["r0", "r1", "r2"], 8)
    s.before_forward()
    s.committed_batch(["r0", "r1", "r2"], [0, 0, 0], [[1], [2], [3]])
    s.finished("r0", [7, 8, 9], [1])
    assert lengths.num_lengths == 0  # pending: not on the finish's path
    s.plan(["r1", "r2"], 8)  # (this plan does not see it either: one step late)
    s.before_forward()  # handed to the policy thread with the outcomes
    s._settle_outcomes()
    assert lengths.num_lengths == 1
    s.committed_batch(["r1", "r2"], [0, 0], [[4], [5]])
    s.finished("r1", [7, 8, 9], [2, 4])
    meta = s._snapshot_meta()  # a snapshot's meta records it first
    assert meta["das_lengths"]["columns"][2].tolist() == [1, 2]
    s.finished("r2", [7, 8, 9], [3, 5])
    s.start("r3", {"das_problem_id": "p", "das_step": 4}, [7, 8, 9], [], 60)  # a new step
    cols = lengths.state()["columns"]
    assert cols[1].tolist() == [3, 3, 3] and cols[2].tolist() == [1, 2, 2]  # at the step it finished in
    s.close()


def test_the_last_finish_of_a_drained_batch_reaches_the_policy_at_once():
    """No forward or feedback follows the last finish of a batch: its length is recorded
    then, not left pending until the next batch's first feedback."""
    s = DasSession(_opts(async_updates=True))
    s.policy.lengths.background = False
    for r in ("r0", "r1"):
        s.start(r, {"das_problem_id": "p"}, [7, 8, 9], [], 60)
    s.plan(["r0", "r1"], 8)
    s.before_forward()
    s.committed_batch(["r0", "r1"], [0, 0], [[1], [2]])
    s.finished("r0", [7, 8, 9], [1])
    assert s.policy.lengths.num_lengths == 0  # r1 still decodes: pending
    s.finished("r1", [7, 8, 9], [2])
    assert s.policy.lengths.num_lengths == 2
    s.close()


def test_the_length_rebuild_copies_the_lengths_before_the_forward_s_recording_adds_any():
    """The background length-index rebuild (the predictor's fallback once a length past
    LengthIndex.MAX_LENGTH was seen) copies the finished lengths at before_forward; the
    recording started there adds the step's finished lengths on the policy thread, so the
    copy must be taken first, with no recording running."""
    s = DasSession(_opts(async_updates=True))
    lengths = s.policy.lengths
    lengths._inc = None  # the fallback: rebuilt from the columns, in the background
    lengths.REBUILD_EVERY_S = 0.0  # a rebuild at every forward
    copies = []
    columns = lengths._columns
    lengths._columns = lambda: (copies.append(s._outcomes_job is None and not s._outcomes), columns())[1]
    for r in ("r0", "r1", "r2"):
        s.start(r, {"das_problem_id": "p"}, [7, 8, 9], [], 60)
    s.plan(["r0", "r1", "r2"], 8)  # (the first query builds the index inline)
    s.before_forward()
    s.committed_batch(["r0", "r1", "r2"], [0, 0, 0], [[1], [2], [3]])
    s.finished("r0", [7, 8, 9], [1])  # pending: recorded during the next forward
    s.plan(["r1", "r2"], 8)
    s.before_forward()  # records it: the lengths changed
    s.committed_batch(["r1", "r2"], [0, 0], [[4], [5]])
    s.plan(["r1", "r2"], 8)
    copies.clear()
    s.before_forward()  # a rebuild is due, and so is this plan's recording
    s._settle_outcomes()
    assert lengths.num_lengths == 1
    assert copies == [True]  # copied with no recording running or handed over
    del lengths._columns  # (the spy holds the session; the rebuild thread holds the predictor)
    s.close()


def test_a_boundary_mid_batch_reaches_the_policy_one_step_late_in_order_with_the_finishes(tmp_path):
    """A step boundary while requests decode queues the policy's advance (its length
    window) with the verify outcomes: the plan right after it reads the lengths as they
    were, the next forward records it. A finish after the boundary is filed under the new
    step whoever records it (a snapshot's meta records the advance before it); an advance
    after the last finish stays pending there; a drained batch, or an idle boundary after
    the batch was dropped, records the pending ones first, in order."""
    s = DasSession(_opts(async_updates=True, history_path=str(tmp_path)))
    s.policy.lengths.background = False
    lengths = s.policy.lengths
    rows = ["r0", "r1", "r2", "r3", "r4"]
    for r in rows:
        s.start(r, {"das_problem_id": "p"}, [7, 8, 9], [], 60)
    s.plan(rows, 8)
    s.before_forward()
    s.committed_batch(rows, [0] * 5, [[1], [2], [3], [4], [5]])
    s.finished("r0", [7, 8, 9], [1])
    first = s.step
    s.weights_updated()  # r1..r4 still decode
    assert s.step == first + 1
    assert lengths._step == first  # pending with the outcomes, behind the finish before it
    assert lengths.state()["columns"][1].tolist() == []  # (its save is made by its forward hook)
    s.plan(rows[1:], 8)  # reads the lengths as before the boundary
    assert lengths._step == first
    s.before_forward()  # the boundary's save records the finish; the job, the advance
    s._settle_outcomes()
    assert lengths.state()["columns"][1].tolist() == [first]  # filed under the step it finished in
    assert lengths._step == first + 1  # recorded during the forward
    s.committed_batch(rows[1:], [0] * 4, [[6], [7], [8], [9]])
    s.weights_updated()
    s.finished("r1", [7, 8, 9], [2, 6])  # after the second boundary
    meta = s._snapshot_meta()  # records the advance, then the finish
    assert lengths._step == first + 2
    assert meta["das_lengths"]["columns"][1].tolist() == [first, first + 2]
    s.weights_updated()  # nothing finishes after this one
    s._snapshot_meta()
    assert lengths._step == first + 2  # pending still: the snapshot's lengths are restored up to s.step
    s.finished("r2", [7, 8, 9], [3, 7])
    s.finished("r3", [7, 8, 9], [4, 8])  # (pending, after the third boundary's advance)
    s.weights_updated()  # queued behind both finishes (its save waits for its forward)
    assert lengths.state()["columns"][1].tolist() == [first, first + 2]
    s.drop("r4")  # the batch ends without a finish: the boundary's save now ...
    assert lengths.state()["columns"][1].tolist() == [first, first + 2, first + 3, first + 3]
    assert lengths._step == first + 3  # ... which records both finishes at their step; the advance pending
    s.weights_updated()  # idle: the pending advance first, then this one
    assert lengths._step == first + 5 == s.step
    s.start("r5", {"das_problem_id": "p"}, [7, 8, 9], [], 60)
    s.weights_updated()
    s.finished("r5", [7, 8, 9], [1, 2, 3])  # the batch drained: every pending advance too
    assert lengths._step == first + 6
    assert lengths.state()["columns"][1].tolist()[-1] == first + 6
    s.close()


def test_the_forward_s_recording_job_pauses_for_the_gil_between_its_heavy_items(tmp_path, monkeypatch):
    """The verify outcomes and a step advance, recorded on the policy thread during the
    forward, are separated by a GIL pause each (the scheduler thread waiting for the GIL
    after the forward gets it within one item, not at the 5 ms forced switch); a finished
    length is too small to need one. The policy ends as recorded inline."""
    from das_sglang.sglang import session as session_mod

    pauses = []
    monkeypatch.setattr(session_mod, "gil_pause", lambda: pauses.append(threading.current_thread().name))
    states = []
    for background in (True, False):
        s = DasSession(_opts(async_updates=background, history_path=str(tmp_path / str(background))))
        s.policy.lengths.background = False
        rows = ["r0", "r1", "r2"]
        for r in rows:
            s.start(r, {"das_problem_id": "p"}, [7, 8, 9], [], 60)
        s.plan(rows, 8)
        s.before_forward()
        s.committed_batch(rows, [1] * 3, [[1], [2], [3]])  # one outcome item
        s.finished("r0", [7, 8, 9], [1])  # a length
        s.weights_updated()  # an advance (r1, r2 decode: queued)
        s.plan(rows[1:], 8)
        before = len(pauses)
        s.before_forward()  # the job: outcomes, length, advance
        s._settle_outcomes(record_pending=True)  # (inline: recorded here)
        if background:
            assert len(pauses) - before == 2
            assert all(name != threading.main_thread().name for name in pauses[before:])
        else:
            assert len(pauses) == before  # inline: no pause
        lengths = s.policy.lengths
        states.append((lengths._step, lengths.state()["columns"].tolist(), s.policy.acceptance.num_problems))
        s.close()
    assert states[0] == states[1]


def test_a_boundary_s_snapshot_is_encoded_from_the_forward_after_the_boundary_s(tmp_path):
    """A step boundary while requests decode has its snapshot saved by its own forward hook
    (DEFER_BOUNDARY_SAVE: the view and lengths as at the boundary; the plan between
    changes neither) and held: that forward carries the deferred advance, registrations and
    the policy's window step, so the writer starts on it one forward later. A periodic save
    (no boundary) starts at the next forward, as before."""
    s = DasSession(_opts(async_updates=True, history_path=str(tmp_path), snapshot_interval=0))
    s.policy.lengths.background = False
    rows = ["r0", "r1", "r2"]
    for r in rows:
        s.start(r, {"das_problem_id": "p"}, [7, 8, 9], [], 60)
    s.plan(rows, 8)
    s.before_forward()  # (the worker's forward hook is on from here)
    s.committed_batch(rows, [0] * 3, [[1], [2], [3]])
    writer = s.snapshot._writer
    s.weights_updated()  # mid-batch: deferred, its save made by the boundary's forward hook
    assert writer._pending is None and s._boundary_save
    s.plan(rows, 8)
    s.before_forward()  # the boundary's forward: saved, held
    assert writer._pending is not None and writer._held
    s.committed_batch(rows, [0] * 3, [[4], [5], [6]])
    s.plan(rows, 8)
    s.before_forward()  # the next one: the writer starts
    assert not writer._held
    s.snapshot.wait()
    meta = load_history(tmp_path)[1]
    assert meta["das_lengths"]["step"] == s.step - 1  # (the view as of the boundary: the advance pending)
    s.finished("r0", [7, 8, 9], [1, 4])
    s.snapshot.save(s._hold_snapshot())  # a periodic save: held until the next forward only
    assert writer._held
    s.plan(rows[1:], 8)
    s.before_forward()
    assert not writer._held
    # A boundary's save whose batch drains before the next forward is written then; a
    # periodic save of the next batch still starts at its next forward.
    s.weights_updated()
    assert s._boundary_save and not writer._held  # (saved by the boundary's forward hook)
    s.finished("r1", [7, 8, 9], [2, 5])
    s.finished("r2", [7, 8, 9], [3, 6])  # (drained: written now)
    assert not writer._held and writer._pending is None
    s.start("r9", {"das_problem_id": "p"}, [7, 8, 9], [], 60)
    s.snapshot.save(s._hold_snapshot())  # (a periodic save, before the batch's first forward)
    assert writer._held
    s.plan(["r9"], 8)
    s.before_forward()
    assert not writer._held
    s.close()


def test_a_run_of_finished_lengths_is_recorded_in_one_call_with_the_same_statistics(tmp_path, monkeypatch):
    """Consecutive finished lengths pending with the verify outcomes (a boundary's save
    records a wave of them on the scheduler thread) reach the policy in one ``observe_finished_many``
    call; its length statistics and length-error estimate end as one call per length."""
    from das_sglang.core.policy import _ModelBased, _Observing

    ends = []
    for batched in (True, False):
        if not batched:  # one observe_finished per length
            monkeypatch.setattr(_ModelBased, "observe_finished_many", _Observing.observe_finished_many)
        calls = []
        s = DasSession(_opts(async_updates=True, history_path=str(tmp_path / str(batched))))
        s.policy.lengths.background = False
        if batched:
            orig = s.policy.observe_finished_many
            monkeypatch.setattr(s.policy, "observe_finished_many",
                                lambda p, n: (calls.append(len(n)), orig(p, n))[1])
        rows = [f"r{i}" for i in range(6)]
        for i, r in enumerate(rows):
            s.start(r, {"das_problem_id": f"p{i % 2}"}, [7, 8, 9], [], 60)
        s.plan(rows, 8)  # (predicted totals: the length error is updated by the finishes)
        s.before_forward()
        s.committed_batch(rows, [1] * 6, [[1], [2], [3], [4], [5], [6]])
        for i, r in enumerate(rows[:4]):
            s.finished(r, [7, 8, 9], list(range(1, 3 + 5 * i)))
        s.weights_updated()  # mid-batch: the advance queued behind the four lengths
        s.plan(rows[4:], 8)
        s.before_forward()  # the boundary's save records the four lengths (then the job, the advance)
        s._settle_outcomes()
        if batched:
            assert calls == [4]
        lengths = s.policy.lengths
        ends.append((lengths.state()["columns"].tolist(), lengths.state()["problems"], s.policy._log_err))
        s.close()
    assert ends[0] == ends[1]


def test_a_snapshot_s_history_view_never_changes_after_it_is_taken(tmp_path):
    """The history view handed to the snapshot writer shares the mirror's per-problem
    dicts (no copy per problem on the scheduler thread): a later finish of the same problem
    and step, a new problem and a window step leave every dict it holds as it was."""
    s = DasSession(_opts(async_updates=True, history_path=str(tmp_path)))
    s.policy.lengths.background = False
    for i, r in enumerate(["a", "b", "c"]):
        s.start(r, {"das_problem_id": "p"}, [7, 8, 9], [], 60)
    s.finished("a", [7, 8, 9], [1, 2])
    view = s._history_view()
    frozen = {p: {k: (len(g), g.flat.tolist()) for k, g in steps.items()} for p, steps in view.items()}
    s.finished("b", [7, 8, 9], [3, 4, 5])  # same problem and step: a new group in a new dict
    s.start("d", {"das_problem_id": "q"}, [6], [], 60)
    s.finished("d", [6], [9])  # a new problem
    s.finished("c", [7, 8, 9], [1])
    for _ in range(s.drafter.config.window_steps + 1):
        s.weights_updated()  # the window moves past the step: the mirror drops it
    assert {p: {k: (len(g), g.flat.tolist()) for k, g in steps.items()} for p, steps in view.items()} == frozen
    assert len(view["p"][min(view["p"])]) == 1 and "q" not in view
    assert s._history_view() == {}
    s.close()
