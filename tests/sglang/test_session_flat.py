"""Issue 12 flat host path, session side: ``DasSession.plan`` (one native call for the
batch, policy on columns, vectorised truncation) and the batched feedback give exactly
the trees, widths and statistics of the row-by-row path they replaced, and the verify
layout built from the flat drafts equals the one built from tree objects."""

import json

import numpy as np
import pytest

from das_sglang.core.drafter import truncate_trusted
from das_sglang.core.online_acceptance import tree_depths
from das_sglang.core.policy import BudgetRow
from das_sglang.sglang.options import load_options
from das_sglang.sglang.session import DasSession
from das_sglang.sglang.tree_inputs import build_layout, build_ragged_layout
from text_runs import accepted_runs


def _legacy_plan(session, req_ids, max_nodes):
    """DasSession.plan as it was before the flat path: a DraftTree and a BudgetRow per row
    (drafted at the policy's per-row sizes, as the flat path drafts)."""
    session.sync()
    session._check_cap()
    sizes = session._draft_sizes(req_ids, max_nodes)  # the policy's draft sizes, as plan's
    trees = session.drafter.speculate_batch(list(req_ids), sizes)  # (an int or one per row)
    pre = getattr(session, "_legacy_pre", None)
    if getattr(session, "_legacy_boundary", False) and pre is not None:
        # The first plan after a step boundary takes the trees drafted at the feedback
        # before it, for the rows whose index is unchanged since (REUSE_ACROSS_BOUNDARY).
        kept, versions, kept_sizes = pre
        b = np.broadcast_to(np.asarray(sizes), (len(req_ids),))
        for i, r in enumerate(req_ids):
            if r in kept and kept_sizes[r] == b[i] and versions[r] == _version(session, r):
                trees[i] = kept[r]
    session._legacy_boundary = False
    if session._evicting and session._updates is not None:
        session._updates.submit(session._evict_chunk)
    live = session.live
    depths = tree_depths([t.parents for t in trees])
    rows = [BudgetRow(r, live[r].problem_id, live[r].generated, live[r].max_new_tokens, t.probs,
                      live[r].prompt_len, t.match_len, d) for r, t, d in zip(req_ids, trees, depths)]
    plan = session.policy.plan(rows)
    keep = np.minimum(np.asarray(plan.budgets, dtype=np.int64), max_nodes)
    for i, r in enumerate(req_ids):
        if live[r].root_only:
            keep[i] = 0
    trees = [truncate_trusted(t, int(k)) for t, k in zip(trees, keep)]
    width = max((len(t) for t in trees), default=0)
    buckets = session.options.policy.buckets(max_nodes)
    if buckets is not None and width not in buckets:
        width = next(b for b in buckets if b >= width)
    return trees, width


def _version(session, rid):
    return session.drafter._indices[session.live[rid].problem_id].version


def _legacy_committed(session, req_ids, proposed, tokens):
    session.sync()
    # The previous feedback's outcomes reach the policy now: one step late, as the session
    # records them (DasSession.committed_batch keeps them), one observe_verify per row.
    for pid, p, a in getattr(session, "_legacy_outcomes", []):
        session.policy.observe_verify(pid, p, a)
    session._legacy_outcomes = []
    # ... and so do the lengths of the requests that finished since (DasSession.finished
    # queues them after those outcomes) and a step boundary's advance of the policy, in
    # order (nothing else is queued on this path)
    for f in session._outcomes:
        if hasattr(f, "problem_id"):
            session.policy.observe_finished(f.problem_id, f.length)
        else:
            session.policy.advance_step(f.step)
    session._outcomes = []
    session.drafter.extend_batch(req_ids, tokens)
    for rid, p, t in zip(req_ids, proposed, tokens):
        lv = session.live[rid]
        lv.generated += len(t)
        if p or len(t) != 1:
            session._legacy_outcomes.append((lv.problem_id, p, len(t) - 1))
    # what the flat path pre-drafts here (the next plan's trees, kept across a boundary)
    if not session.drafter._can_predraft():  # (a fallback-only shared index: no pre-draft)
        return
    sizes = np.broadcast_to(np.asarray(session._draft_sizes(req_ids, 8)), (len(req_ids),))
    trees = session.drafter.speculate_batch(list(req_ids), sizes.tolist())
    session._legacy_pre = (dict(zip(req_ids, trees)), {r: _version(session, r) for r in req_ids},
                           dict(zip(req_ids, sizes.tolist())))


def _drive(session, legacy, seed=0, steps=70):
    """Random decode traffic (GRPO siblings, finishes, weight updates, a root-only request);
    returns every plan's trees (tokens, parents, probs, match) and width."""
    plan = (lambda r, m: _legacy_plan(session, r, m)) if legacy else session.plan
    feed = (lambda *a: _legacy_committed(session, *a)) if legacy else session.committed_batch
    rng = np.random.default_rng(seed)
    texts = {f"p{i}": rng.integers(0, 8, 120).tolist() for i in range(5)}
    live, out, n = {}, [], 0
    for step in range(steps):
        if step and step % 25 == 0:
            session.weights_updated()
            session._legacy_boundary = legacy
        while len(live) < 12:
            pid = f"p{n % 5}"
            session.start(f"r{n}", {"das_problem_id": pid}, [9, 9, n % 3], [], 100, root_only=n == 3)
            live[f"r{n}"] = (pid, 0)
            n += 1
        rids = sorted(live)
        trees, width = plan(rids, 8)
        out.append(([(t.tokens.tolist(), t.parents.tolist(), t.probs.tolist(), t.match_len) for t in trees],
                     width))
        feed(rids, [len(t) for t in trees], accepted_runs(texts, live, rids, trees))
        for rid in rids:
            pid, pos = live[rid]
            if pos >= 60 + 7 * (int(rid[1:]) % 4):
                session.finished(rid, [9, 9, int(rid[1:]) % 3], texts[pid][:pos])
                del live[rid]
    return out


@pytest.mark.parametrize("cfg", [
    {"server": {"policy": "length-aware"}},
    {"server": {"policy": "length-aware"}, "policy": {"draft_headroom_min_rows": 0}},  # sized drafts
    {"server": {"policy": "length-aware", "async_updates": False},
     "policy": {"uniform_width": True, "width_buckets": [0, 1, 2, 4, 8]}},
    {"server": {"policy": "unlimited"}},
    {"server": {"policy": "paper"}, "drafter": {"global_shard": True, "shared_weight": 0.0}},
    # a history cap: evictions (and forgotten statistics) between the policy's prepare and plan
    {"server": {"policy": "length-aware"}, "drafter": {"max_history_tokens": 700}},
])
def test_flat_plan_equals_the_row_by_row_plan(cfg):
    # Per-problem indexes (or the fallback-only shared index): the flat path then equals
    # fresh row-by-row drafts exactly. (With the shared index mixed in, a pre-drafted tree's
    # shared part is as of the pre-draft: tests/sglang/test_session_host.py compares that
    # path with the inline one.)
    cfg = {**cfg, "drafter": {"window_steps": 2, "global_shard": False, **cfg.get("drafter", {})}}
    a = DasSession(load_options(9, json.dumps(cfg)))
    b = DasSession(load_options(9, json.dumps(cfg)))
    for s in (a, b):
        if s.policy.lengths is not None:
            s.policy.lengths.background = False  # the same predictions at every plan
        s.ASYNC_MIN_ROWS = 1
    new, old = _drive(a, legacy=False), _drive(b, legacy=True)
    assert sum(len(t[0]) for trees, _ in new for t in trees) > 100  # real drafts compared
    assert any(w for _, w in new)
    assert new == old
    acc_a, acc_b = a.policy.acceptance, b.policy.acceptance
    np.testing.assert_array_equal(acc_a._by_budget, acc_b._by_budget)
    assert {p: s.n_obs for p, s in acc_a._stats.items()} == {p: s.n_obs for p, s in acc_b._stats.items()}
    assert {r: lv.generated for r, lv in a.live.items()} == {r: lv.generated for r, lv in b.live.items()}
    a.close()
    b.close()


def test_layout_from_flat_drafts_equals_layout_from_trees():
    cfg = {"drafter": {"window_steps": 2}, "server": {"policy": "unlimited"}}
    s = DasSession(load_options(9, json.dumps(cfg)))
    rng = np.random.default_rng(1)
    text = rng.integers(0, 5, 300).tolist()
    s.start("h", {"das_problem_id": "p"}, [1], text, 400)
    s.finished("h", [1], text)
    for i in range(6):
        s.start(f"r{i}", {"das_problem_id": "p"}, [1], text[: 10 * i + 3], 400)
    rids = [f"r{i}" for i in range(6)]
    drafts, width = s.plan(rids, 8)
    trees = list(drafts)
    assert width == max(len(t) for t in trees) > 0
    roots, seq_lens = [3] * 6, [10 + i for i in range(6)]
    flat, ref = build_layout(roots, drafts, seq_lens, width), build_layout(roots, trees, seq_lens, width)
    for f in ("tokens", "mask", "positions", "retrieve_index", "next_token", "next_sibling"):
        np.testing.assert_array_equal(getattr(flat, f), getattr(ref, f))
    rf, rr = build_ragged_layout(roots, drafts, seq_lens), build_ragged_layout(roots, trees, seq_lens)
    for f in ("tokens", "mask", "positions", "verify_lens", "candidates", "next_token"):
        np.testing.assert_array_equal(getattr(rf, f), getattr(rr, f))
    s.close()


def test_start_off_thread_checks_on_the_scheduler_thread():
    """With the update thread, a start is registered there (after a sibling's pending
    finish), but a duplicate id or a bad token still raises at the call, naming it."""
    s = DasSession(load_options(9, json.dumps({"server": {"policy": "unlimited"}})))
    s.start("a", {"das_problem_id": "p"}, [1, 2, 3], [4], 50)
    with pytest.raises(ValueError, match="duplicate req_id='a'"):
        s.start("a", {"das_problem_id": "p"}, [1, 2, 3], [], 50)
    with pytest.raises(ValueError, match="prompt_tokens of req_id='b'"):
        s.start("b", {"das_problem_id": "p"}, [1, -2], [], 50)
    s.finished("a", [1, 2, 3], [4, 1, 2, 3, 4])
    s.start("c", {"das_problem_id": "p"}, [1, 2, 3], [4], 50)  # queued behind a's finish
    (tree,), _ = s.plan(["c"], 8)
    assert tree.tokens.tolist()[:4] == [1, 2, 3, 4]  # drafts from a's history
    assert "b" not in s.live
    s.close()


def _drive_shuffled(session, seed, steps=40, batch=80):
    """Decode traffic at a batch past ROWMAP_MIN_ROWS whose rows move between steps (SGLang
    filters finished requests out and appends new ones; here the rows are also rotated),
    with finishes, a drop, a finished id started again as another request, GRPO siblings
    and a weight update; returns every plan's trees and width."""
    rng = np.random.default_rng(seed)
    texts = {f"p{i}": rng.integers(0, 8, 150).tolist() for i in range(9)}
    live, out, n = {}, [], 0
    order: list[str] = []
    ended: list[str] = []
    for step in range(steps):
        if step == 20:
            session.weights_updated()
        ended = ended[-1:] if step % 2 == 0 else []  # (one that ended in the previous step)
        while len(live) < batch:
            # (every 2nd step an id that ended in the step before comes back as another
            # problem's request, before the next plan)
            again = bool(step % 2 == 0 and ended)
            rid = ended.pop() if again else f"r{n}"
            pid = f"p{(n // 8 + 4 * again) % 9}"  # (groups of 8 siblings)
            session.start(rid, {"das_problem_id": pid}, [9, 9, n % 3], [], 100)
            live[rid] = (pid, 0, n % 3)
            order.append(rid)
            n += 1
        if step % 3 == 1:
            k = int(rng.integers(1, len(order)))
            order = order[k:] + order[:k]
        trees, width = session.plan(list(order), 8)
        out.append(([(t.tokens.tolist(), t.parents.tolist(), t.probs.tolist(), t.match_len) for t in trees],
                    width))
        session.committed_batch(list(order), [len(t) for t in trees], accepted_runs(texts, live, order, trees))
        for rid in list(order):
            pid, pos, p = live[rid]
            if pos >= 30 + 9 * (int(rid[1:]) % 5) or (step == 7 and rid == order[3]):
                if step == 7 and rid == order[3]:
                    session.drop(rid)
                else:
                    session.finished(rid, [9, 9, p], texts[pid][:pos])
                del live[rid]
                order.remove(rid)
                ended.append(rid)
    return out


def test_rows_gathered_through_row_map_equal_rows_looked_up(monkeypatch):
    """The per-step parts that keep the latest rows' values (the session's and the
    drafter's rows, the online calibration's states, the probe schedule, the length rows,
    the calibration slots, the draft sizes) gather them through ``native.row_map`` when a
    start or a finish changed the rows; the plans are those of looking every row up."""
    from das_sglang.core import budget_rows
    from das_sglang.core.drafter import SuffixDrafter

    cfg = json.dumps({"server": {"policy": "length-aware"}, "policy": {"draft_headroom_min_rows": 0},
                      "drafter": {"window_steps": 2}})
    runs = []
    for threshold in (10**9, 64):
        monkeypatch.setattr(budget_rows, "ROWMAP_MIN_ROWS", threshold)
        monkeypatch.setattr(DasSession, "ROWMAP_MIN_ROWS", threshold)
        monkeypatch.setattr(SuffixDrafter, "ROWMAP_MIN_ROWS", threshold)
        s = DasSession(load_options(9, cfg))
        if s.policy.lengths is not None:
            s.policy.lengths.background = False
        gathered = []
        if threshold == 64:  # (the row map does run)
            for cls, name in ((DasSession, "_rows_from"), (SuffixDrafter, "_rows_from")):
                orig = getattr(cls, name)
                monkeypatch.setattr(cls, name, lambda self, *a, _o=orig, _n=name: (gathered.append(_n), _o(self, *a))[1])
        orig_start = s.start
        restarted = [0]

        def start(rid, *a, _seen=set(), **k):
            restarted[0] += rid in _seen
            _seen.add(rid)
            return orig_start(rid, *a, **k)

        s.start = start
        plans = _drive_shuffled(s, seed=3)
        runs.append((plans, s.policy.outcomes._state, dict(s.policy.probes._last), gathered))
        s.close()
    (a, state_a, last_a, _), (b, state_b, last_b, gathered) = runs
    assert len(gathered) > 20 and sum(len(t[0]) for trees, _ in a for t in trees) > 500
    assert restarted[0] >= 3  # (ids did come back)
    assert a == b and state_a == state_b and last_a == last_b


def test_rows_after_an_empty_batch_are_looked_up():
    """A plan of no rows leaves an empty memo: the next batch (past ROWMAP_MIN_ROWS) is
    resolved row by row, and the parts with per-row caches answer for every row."""
    s = DasSession(load_options(9, json.dumps({"server": {"policy": "length-aware"}})))
    s.plan([], 8)
    rids = [f"r{i}" for i in range(80)]
    for i, r in enumerate(rids):
        s.start(r, {"das_problem_id": f"p{i % 5}"}, [1, 2, i % 3], [], 50)
    trees, _ = s.plan(list(rids), 8)
    assert len(trees) == 80 and s._rows(list(rids))[0][7] is s.live["r7"]
    probes = s.policy.probes
    never = -probes.config.probe_every
    got = probes._last_of(list(rids), ([], np.zeros(0, np.int64), True))  # (an empty recorded plan)
    assert got.tolist() == [probes._last.get(r, never) for r in rids]
    s.close()


def test_feedback_outcomes_are_picked_natively_and_a_bad_one_is_refused_naming_its_request():
    """``committed_batch`` keeps the rows with a verify outcome (something drafted, or more
    than the bonus token) with their proposed and accepted counts (``native.outcome_rows``,
    one pass), and refuses an outcome where more was accepted than proposed, naming the
    request -- before it is kept for the policy."""
    from das_sglang.native import outcome_rows

    rows, p, a, bad = outcome_rows(np.array([0, 3, 0, 2, 4]), np.array([1, 2, 1, 1, 5]))
    assert rows.tolist() == [1, 3, 4] and p.tolist() == [3, 2, 4] and a.tolist() == [1, 0, 4] and bad == -1
    assert outcome_rows(np.array([0, 3, 0]), np.array([1, 2, 3]))[3] == 1  # (row 2: 2 accepted of 0)
    assert outcome_rows(np.array([-1]), np.array([1]))[3] == 0
    with pytest.raises(ValueError, match="2 proposed counts but 1 committed"):
        outcome_rows(np.array([1, 2]), np.array([1]))

    cfg = {"server": {"policy": "length-aware", "async_updates": True}}
    s = DasSession(load_options(9, json.dumps(cfg)))
    for r in ("a", "b", "c"):
        s.start(r, {"das_problem_id": "p"}, [1, 2, 3], [], 100)
    s.plan(["a", "b", "c"], 8)
    s.committed_batch(["a", "b", "c"], [2, 0, 3], [[5, 6], [7], [8]])
    kept = s._outcomes[-1]
    assert kept[3].tolist() == [0, 2] and kept[1].tolist() == [2, 3] and kept[2].tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"req_id='b': proposed=0, accepted=1"):
        s.committed_batch(["a", "b", "c"], [2, 0, 3], [[5], [7, 7], [8]])
    assert s._outcomes == []  # (the earlier ones recorded by this feedback first; the bad one not kept)
    s.close()
