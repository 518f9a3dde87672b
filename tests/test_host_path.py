"""Issue 12 host path, core side: threaded batch extend, incremental (columnar) length
predictor vs the former full-rebuild one, lazy window eviction, the history-token cap."""

import sys
from pathlib import Path

import numpy as np
import pytest

from das_sglang.core.config import DrafterConfig
from das_sglang.core.drafter import SuffixDrafter
from das_sglang.core.length_predictor import LengthPredictor
from das_sglang.core.policy_config import PolicyConfig
from das_sglang.native import SuffixIndex, extend_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from legacy_length_predictor import LegacyLengthPredictor  # noqa: E402


def test_threaded_extend_batch_equals_row_by_row():
    rng = np.random.default_rng(0)
    n_idx, rows = 24, 400  # >= 64 rows: split over threads by index
    a = [SuffixIndex(16) for _ in range(n_idx)]
    b = [SuffixIndex(16) for _ in range(n_idx)]
    owner = rng.integers(0, n_idx, rows)
    for r in range(rows):
        seed = rng.integers(0, 9, 5).astype(np.int32)
        a[owner[r]].add_sequence(r, seed, 0)
        b[owner[r]].add_sequence(r, seed, 0)
    for _ in range(5):
        lens = rng.integers(0, 4, rows)
        flat = rng.integers(0, 9, int(lens.sum())).astype(np.int32)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        extend_batch([a[o] for o in owner], np.arange(rows, dtype=np.int64), flat, offsets)
        for r in range(rows):
            b[owner[r]].extend(r, flat[offsets[r]:offsets[r + 1]])
    for x, y in zip(a, b):
        x.check_integrity()
        assert x.num_nodes == y.num_nodes and x.num_tokens == y.num_tokens
        for q in y.sequence_ids():
            assert np.array_equal(x.sequence_tokens(q), y.sequence_tokens(q))


@pytest.mark.parametrize("thresholds", [None, (100, 1000)])
def test_columnar_predictor_matches_the_full_rebuild_one(thresholds):
    cfg = PolicyConfig(length_window_steps=2, class_thresholds=thresholds)
    new, old = LengthPredictor(cfg), LegacyLengthPredictor(cfg)
    rng = np.random.default_rng(1)
    pids = [f"p{i}" for i in range(40)]
    for step in range(5):
        for p in (new, old):
            p.advance_step(step)
        for _ in range(150):
            pid, n = pids[int(rng.integers(40))], int(rng.lognormal(6, 1))
            new.observe_finished(pid, n)
            old.observe_finished(pid, n)
        q = [pids[int(i)] for i in rng.integers(0, 40, 64)] + ["unseen"]
        g = rng.integers(0, 3000, len(q))
        for a, b in zip(new.predict_many(q, g, [8000] * len(q)), old.predict_many(q, g, [8000] * len(q))):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(new.thresholds(), old.thresholds())


def test_background_predictor_reads_the_previous_index_then_catches_up(monkeypatch):
    # (the rebuild path: lengths past the incremental index's trees, or INCREMENTAL off)
    monkeypatch.setattr(LengthPredictor, "INCREMENTAL", False)
    p = LengthPredictor(PolicyConfig(class_thresholds=(100, 1000)), background=True)
    p.observe_finished("a", 50)
    assert p.predict("a", 0, 10_000).length_class == 0  # first index: built inline
    p.observe_finished("a", 5000)
    p.observe_finished("a", 6000)
    p.predict("a", 0, 10_000)  # starts a rebuild, answers from the previous index
    p.sync()
    assert p.initial_class("a") == 2  # median 5000: Long, once rebuilt


def test_background_rebuild_starts_only_when_asked_once_queries_may_not_start_it(monkeypatch):
    monkeypatch.setattr(LengthPredictor, "INCREMENTAL", False)  # (the rebuild path)
    p = LengthPredictor(PolicyConfig(class_thresholds=(100, 1000)), background=True)
    p.observe_finished("a", 50)
    p.predict("a", 0, 10_000)  # first index: built inline
    p.rebuild_on_query = False  # (the session's before_forward hook)
    p.observe_finished("a", 5000)
    p.observe_finished("a", 6000)
    p.predict("a", 0, 10_000)
    assert p._building is None and p.initial_class("a") == 0  # the query started nothing
    assert p.rebuild_if_stale()
    p._wait()
    assert p.initial_class("a") == 2  # rebuilt in the background (median 5000: Long)
    assert not p.rebuild_if_stale()  # up to date: nothing due
    inline = LengthPredictor(PolicyConfig(class_thresholds=(100, 1000)))  # background off
    inline.observe_finished("a", 50)
    assert not inline.rebuild_if_stale()


def test_predictor_evicts_problems_and_stays_bounded():
    p = LengthPredictor(PolicyConfig(length_window_steps=1))
    for step in range(50):
        p.advance_step(step)
        for i in range(100):
            p.observe_finished(f"s{step}-{i}", 100 + i)
    assert p.num_lengths == 200 and len(p._pids) == 200  # two steps' problems, no more
    assert p.evict_problems(["s49-0", "s49-1", "nope"]) == 2
    assert p.num_lengths == 198 and p.initial_class("s49-0") is None


def _drafter(**kw):
    d = SuffixDrafter(DrafterConfig(window_steps=1, **kw))
    return d


def test_lazy_eviction_ignores_then_removes_out_of_window_history():
    eager, lazy = _drafter(), _drafter()
    lazy.lazy_eviction = True
    for d in (eager, lazy):
        d.add_history("p", 0, [1, 2, 3, 4])
        d.advance_step(1)
        d.add_history("p", 1, [1, 2, 9, 9])
        d.advance_step(2)  # step 0 leaves the window
        d.start_request("r", "p", [1, 2])
    # step 0's rollout still sits in the lazy index, at weight 0: same drafts
    assert lazy.stats().sequences == eager.stats().sequences + 1
    assert lazy.speculate("r", 4).tokens.tolist() == eager.speculate("r", 4).tokens.tolist() == [9, 9]
    assert list(lazy.history()["p"]) == [1] and list(eager.history()["p"]) == [1]
    assert not lazy.evict_pending(0) and lazy.evict_pending(None)
    assert lazy.stats().sequences == eager.stats().sequences


def test_lazy_eviction_with_a_stop_removes_one_rollout_per_call_and_ends_like_a_full_one():
    eager, lazy = _drafter(), _drafter()
    lazy.lazy_eviction = True
    for d in (eager, lazy):
        for k in range(3):  # one problem-step group of 3 rollouts, and a second problem
            d.add_history("p", 0, [1, 2, 3, 4 + k])
        d.add_history("q", 0, [5, 6, 7])
        d.advance_step(1)
        d.add_history("p", 1, [1, 2, 9, 9])
        d.advance_step(2)  # step 0 leaves the window
        d.start_request("r", "p", [1, 2])
    before = lazy.stats().sequences
    asked = []

    def stop():
        asked.append(1)
        return True  # always: each call still removes one rollout (progress)

    calls = 0
    while not lazy.evict_pending(None, stop):
        calls += 1
        assert lazy.stats().sequences == before - calls  # one rollout per call
        assert lazy.speculate("r", 4).tokens.tolist() == eager.speculate("r", 4).tokens.tolist()
    assert calls == 3 and asked  # 4 rollouts: 3 calls stopped early, the 4th finished
    assert lazy.stats().sequences == eager.stats().sequences
    assert lazy.history_tokens == eager.history_tokens and lazy.history().keys() == eager.history().keys()


def test_history_cap_evicts_oldest_step_first():
    d = SuffixDrafter(DrafterConfig(window_steps=4, max_history_tokens=10))
    d.add_history("old", 0, [1, 2, 3, 4])
    d.advance_step(1)
    d.add_history("a", 1, [5, 6, 7, 8])
    d.add_history("b", 1, [5, 6, 7, 9])
    assert d.history_tokens == 12
    assert d.enforce_cap() == ["old"]
    assert d.history_tokens == 8 and set(d.history()) == {"a", "b"}
    assert d.enforce_cap(4) == ["a"] and set(d.history()) == {"b"}


def test_lazy_eviction_never_runs_out_of_native_step_slots():
    from das_sglang.native import MAX_STEPS

    d = _drafter()
    d.lazy_eviction = True
    for step in range(20):
        d.advance_step(step)
        d.add_history("p", step, [1, 2, 3, step])
        assert len(set(d._step_seqs)) <= MAX_STEPS
    assert d.evict_pending(None)
    assert sorted(d.history()["p"]) == [18, 19]


def test_lazy_eviction_makes_room_per_problem_not_for_all():
    """A step boundary never removes every problem's old history at once: a problem's
    index evicts its own out-of-window steps when a new step's sequence needs its slot."""
    from das_sglang.native import MAX_STEPS

    d = _drafter()
    d.lazy_eviction = True
    for step in range(MAX_STEPS + 2):
        d.advance_step(step)
        for p in ("a", "b"):
            d.add_history(p, step, [1, 2, 3, step])
    # b got no sequence since its window moved on: its out-of-window steps are all pending;
    # a's index made room for each new step by evicting only its own oldest ones.
    d.advance_step(MAX_STEPS + 2)
    before = len(d._indices["b"].steps())
    d.add_history("a", MAX_STEPS + 2, [4, 5])
    assert len(d._indices["b"].steps()) == before  # b untouched
    assert len(d._indices["a"].steps()) <= MAX_STEPS
    assert d.evict_pending(None)
    assert sorted(d.history()["a"]) == [MAX_STEPS + 1, MAX_STEPS + 2]
    assert sorted(d.history()["b"]) == [MAX_STEPS + 1]


def test_history_problems_leave_out_problems_whose_history_is_all_evicting():
    """history_problems() while out-of-window steps await removal: exactly the problems with
    a finished rollout of a step still in the window (the per-step union equals the
    per-problem definition), also after part of the eviction ran."""
    d = _drafter()  # window 1
    d.lazy_eviction = True
    rng = np.random.default_rng(3)
    steps_of = {}
    for step in range(3):
        d.advance_step(step)
        for p in rng.choice(12, size=6, replace=False).tolist():
            d.add_history(f"p{p}", step, [1, 2, 3, step, p])
            steps_of.setdefault(f"p{p}", set()).add(step)
    d.advance_step(3)  # steps 0-2 leave the window except 2 (window 1)

    def reference():
        return {p for p, steps in d._finished.items() if any(s not in d._evicting for s in steps)}

    assert d._evicting
    expect = {p for p, steps in steps_of.items() if 2 in steps}
    assert d.history_problems() == reference() == expect
    assert expect != set(d._finished)  # some problems hold only evicting history
    d.evict_pending(4)  # part of it
    assert d.history_problems() == reference() == expect
    assert d.evict_pending(None)
    assert d.history_problems() == expect == set(d._finished)


def test_without_history_is_the_candidates_minus_history_problems():
    """without_history(c) == c - history_problems() (what the session forgets at a step
    boundary), with evictions pending, part-run and done, for candidates in and out of the
    history; the candidates' set is never changed."""
    d = _drafter()  # window 1
    d.lazy_eviction = True
    rng = np.random.default_rng(5)
    for step in range(4):
        d.advance_step(step)
        for p in rng.choice(12, size=6, replace=False).tolist():
            d.add_history(f"p{p}", step, [1, 2, 3, step, p])
    d.advance_step(4)
    checked = 0
    for stage in ("pending", "part", "done"):
        if stage == "part":
            d.evict_pending(3)
        elif stage == "done":
            assert d.evict_pending(None)
        assert bool(d._evicting) == (stage != "done")
        for k in range(20):
            cand = {f"p{p}" for p in rng.choice(16, size=int(rng.integers(0, 16)), replace=False).tolist()}
            before = set(cand)
            got = d.without_history(cand)
            assert got == cand - d.history_problems()
            assert cand == before
            checked += bool(got) and got != cand
    assert checked  # some candidates were partly in the history
