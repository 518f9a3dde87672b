"""LengthPredictor: classes from the window, re-classification as a request grows."""

import numpy as np
import pytest

from das_sglang.core.length_predictor import LONG, MEDIUM, SHORT, LengthPredictor
from das_sglang.core.policy_config import PolicyConfig

FIXED = PolicyConfig(class_thresholds=(100, 1000))


def _predictor(lengths, config=FIXED, problem="q"):
    p = LengthPredictor(config)
    for n in lengths:
        p.observe_finished(problem, n)
    return p


class TestWorkedExample:
    """The module docstring's example: history 50, 60, 500, 5000 with thresholds 100/1000."""

    def test_initial_class_is_the_median_class(self):
        assert _predictor([50, 60, 500, 5000]).initial_class("q") == MEDIUM

    @pytest.mark.parametrize(
        "generated, cls, remaining",
        [(0, SHORT, 55.0), (70, MEDIUM, 430.0), (600, LONG, 4400.0), (4999, LONG, 1.0)],
    )
    def test_reclassified_as_the_request_grows(self, generated, cls, remaining):
        pred = _predictor([50, 60, 500, 5000]).predict("q", generated, 10**6)
        assert pred.length_class == cls
        assert pred.remaining == pytest.approx(remaining)
        assert pred.initial_class == MEDIUM

    def test_longer_than_everything_uses_the_tail_rule(self):
        pred = _predictor([50, 60, 500, 5000]).predict("q", 6000, 10**6)
        assert pred.remaining == pytest.approx(0.5 * 6000)  # tail_factor * g
        assert pred.length_class == LONG


class TestFallbacks:
    def test_no_history_uses_the_prior(self):
        p = LengthPredictor(PolicyConfig(prior_length=2048))
        assert p.predict("q", 0, 10**6).remaining == 2048
        assert p.predict("q", 2000, 10**6).remaining == 1000  # max(48, 0.5 * 2000)
        assert p.predict("q", 0, 300).remaining == 300  # capped by max_new_tokens
        assert p.predict("q", 300, 300).remaining == 1  # at the cap: one more token at most
        assert p.predict("q", 0, 10**6).length_class is None

    def test_unknown_problem_uses_all_problems(self):
        p = _predictor([200, 300, 400], problem="a")
        pred = p.predict("never-seen", 0, 10**6)
        assert pred.initial_class is None and pred.remaining == pytest.approx(300.0)

    def test_group_of_the_initial_class_is_used(self):
        p = LengthPredictor(FIXED)
        for n in (20, 30, 40):
            p.observe_finished("short-problem", n)
        for n in (3000, 4000, 5000):
            p.observe_finished("long-problem", n)
        assert p.predict("short-problem", 0, 10**6).remaining == pytest.approx(30.0)
        assert p.predict("long-problem", 0, 10**6).remaining == pytest.approx(4000.0)
        # a short problem's request past 40 tokens: its group has nothing longer -> all pooled
        assert p.predict("short-problem", 50, 10**6).remaining == pytest.approx(3950.0)


class TestWindowAndQuantiles:
    def test_quantile_thresholds(self):
        p = _predictor(range(1, 301), config=PolicyConfig())
        t = p.thresholds()
        assert t[0] == pytest.approx(100.67, abs=0.01) and t[1] == pytest.approx(200.33, abs=0.01)

    def test_window_evicts_old_steps(self):
        p = LengthPredictor(PolicyConfig(length_window_steps=1, class_thresholds=(100, 1000)))
        p.observe_finished("q", 5000)
        p.advance_step(1)
        p.observe_finished("q", 50)
        assert p.predict("q", 0, 10**6).remaining == pytest.approx(50.0)  # 50 is SHORT, argmax
        p.advance_step(2)  # step 0 leaves the window
        assert p.predict("q", 60, 10**6).remaining == pytest.approx(30.0)  # tail rule: 5000 gone
        p.advance_step(3)
        assert p.thresholds() is None

    def test_bad_input(self):
        p = LengthPredictor()
        with pytest.raises(ValueError, match="-3"):
            p.observe_finished("q", -3)
        p.advance_step(5)
        with pytest.raises(ValueError, match="step=4"):
            p.advance_step(4)


@pytest.mark.parametrize("huge", [0, 1 << 33])
def test_per_problem_medians_with_and_without_the_one_key_sort(huge):
    # The medians' (problem, length) order comes from one sort of problem * 2**32 + length;
    # a length past 2**32 falls back to the two-key sort: either way the median class.
    p = LengthPredictor(FIXED)
    for prob, lengths in {"a": [50, 900, 60], "b": [2000, 30, 500, 700], "c": [10, 20]}.items():
        for n in lengths:
            p.observe_finished(prob, n)
    p.observe_finished("d", huge or 3000)
    assert [p.initial_class(q) for q in "abcd"] == [SHORT, MEDIUM, SHORT, LONG]


def test_numpy_ma_is_imported_with_the_predictor_not_in_a_serving_step():
    """np.quantile's lazy numpy.ma import (tens of ms holding the GIL) happens when the
    predictor module loads, not at the first non-empty length-index rebuild."""
    import subprocess
    import sys

    code = ("import sys; import das_sglang.core.length_predictor as lp; "
            "print('numpy.ma' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def _stepped(config=None):
    """Lengths of three problems over steps 0-5 (window: the config's)."""
    import numpy as np

    p = LengthPredictor(config or PolicyConfig(length_window_steps=3))
    rng = np.random.default_rng(5)
    for step in range(6):
        p.advance_step(step)
        for q in ("a", "b", "c"):
            for n in rng.integers(10, 3000, 4).tolist():
                p.observe_finished(q, n)
    return p


def _predictions(p):
    import numpy as np

    pids = ["a", "b", "c", "new"]
    out = p.predict_many(pids, np.array([0, 50, 400, 0]), np.array([4096] * 4))
    return [np.asarray(x).tolist() for x in out], [p.initial_class(q) for q in pids]


def test_restored_lengths_predict_what_the_saved_predictor_did():
    import json

    import numpy as np

    saved = _stepped()
    state = saved.state()
    state = json.loads(json.dumps(state, default=lambda a: a.tolist()))  # as a snapshot holds it
    fresh = LengthPredictor(PolicyConfig(length_window_steps=3))
    assert fresh.restore(state) == saved.num_lengths == 48  # steps 2-5 of 0-5, window 3
    assert fresh.num_lengths == saved.num_lengths
    assert _predictions(fresh) == _predictions(saved)
    # the window goes on as for lengths observed here
    fresh.advance_step(7)
    saved.advance_step(7)
    assert fresh.num_lengths == saved.num_lengths == 24
    assert np.array_equal(fresh.state()["columns"], saved.state()["columns"])


def test_restore_into_a_later_step_keeps_only_the_window():
    saved = _stepped()
    later = LengthPredictor(PolicyConfig(length_window_steps=3))
    later.advance_step(7)
    later.observe_finished("a", 77)
    assert later.restore(saved.state()) == 24  # steps 4 and 5 are in step 7's window
    assert later.num_lengths == 25 and later.state()["step"] == 7


def test_restore_at_an_earlier_caller_step_files_later_lengths_at_it():
    """A worker restored at step 3 (its newest history) from a predictor saved at step 5:
    the predictor stays at 3, so the worker's next steps never fall behind it."""
    saved = _stepped()
    p = LengthPredictor(PolicyConfig(length_window_steps=3))
    assert p.restore(saved.state(), at=3) == 48
    st = p.state()
    assert st["step"] == 3 and int(st["columns"][1].max()) == 3
    p.advance_step(4)  # the worker's next step: no "steps only advance" error
    assert p.num_lengths == 48


@pytest.mark.parametrize("bad, match", [
    ([], "expected a dict"),
    ({"step": 1, "problems": ["a"], "columns": [[0], [1]]}, "3 rows of ints"),
    ({"step": 1, "problems": ["a"], "columns": [[0], [1], [-5]]}, r"entry 0 .*\(0, 1, -5\)"),
    ({"step": 1, "problems": ["a"], "columns": [[1], [1], [5]]}, r"entry 0 .*\(1, 1, 5\)"),
    ({"step": 1, "problems": ["a"], "columns": [[0], [2], [5]]}, r"0 <= step <= 1"),
    ({"step": -1, "problems": [], "columns": [[], [], []]}, "step=-1"),
    ({"step": 1, "problems": [3], "columns": [[0], [1], [5]]}, "problem ids"),
    ({"step": 1, "problems": ["a"], "columns": [[0.5], [1], [5]]}, "3 rows of ints"),
])
def test_bad_length_state_is_named_and_adds_nothing(bad, match):
    p = _stepped()
    before = p.state()
    with pytest.raises(ValueError, match=match):
        p.restore(bad)
    after = p.state()
    assert after["problems"] == before["problems"] and after["step"] == before["step"]
    assert after["columns"].tolist() == before["columns"].tolist()


@pytest.mark.parametrize("incremental", [True, False])
def test_a_batchs_problem_list_is_looked_up_once_per_index(monkeypatch, incremental):
    """predict_many keeps what it looked up for the latest problem-id list (the session
    hands the same list while a batch's rows stay): the rebuilt index its initial classes,
    until the index is rebuilt; the incremental one the rows' problem indices, until a
    problem is added or renumbered. New lengths are read again, and an equal list
    elsewhere gives the same."""
    monkeypatch.setattr(LengthPredictor, "INCREMENTAL", incremental)
    p = _predictor([50, 60])  # q: short
    p.observe_finished("r", 5000)
    ids = ["q", "r", "q", "x"]
    _, _, c0 = p.predict_many(ids, [0] * 4, [10**6] * 4)
    assert c0.tolist() == [SHORT, LONG, SHORT, -1]
    if incremental:
        assert p._problem_rows(ids) is p._problem_rows(ids)  # the same list: kept
        assert p._problem_rows(ids).tolist() == [0, 1, 0, -1]
        p.observe_finished("x", 70)  # a new problem: looked up again
        assert p._problem_rows(ids).tolist() == [0, 1, 0, 2]
        assert p.predict_many(ids, [0] * 4, [10**6] * 4)[2].tolist() == [SHORT, LONG, SHORT, SHORT]
    else:
        assert p.predict_many(ids, [0] * 4, [10**6] * 4)[2] is c0  # the same list: kept
    for n in (5000, 6000, 7000):
        p.observe_finished("q", n)  # q's median is long now
    _, _, again = p.predict_many(ids, [0] * 4, [10**6] * 4)
    assert again.tolist() == [LONG, LONG, LONG, SHORT if incremental else -1]
    assert p.predict_many(list(ids), [0] * 4, [10**6] * 4)[2].tolist() == again.tolist()


@pytest.mark.parametrize("seed", range(5))
def test_native_group_queries_are_numpys_bit_for_bit(seed):
    """``predict_many``'s per-row group queries run natively (``length_remaining``);
    numpy (``NATIVE`` off) is the reference: the same remaining lengths, classes and
    initial classes, bit for bit -- for rows of every initial class, unknown problems,
    ``g`` past every rollout (the heavy-tail rule), caps below the prediction, and
    histories where some class groups are missing."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cfg = PolicyConfig(length_window_steps=3)
    lp = LengthPredictor(cfg)
    n_problems = int(rng.integers(3, 60))
    for step in range(3):
        lp.advance_step(step)
        for p in range(n_problems):
            for _ in range(int(rng.integers(1, 6))):
                lp.observe_finished(f"p{p}", int(rng.lognormal(5 + (p % 3), 0.8)))
    rows = 300
    pids = [f"p{int(i)}" for i in rng.integers(0, n_problems + 5, rows)]  # (some unknown)
    g = rng.integers(0, 8000, rows)
    g[:5] = 0
    max_new = rng.integers(1, 9000, rows)
    _, _, groups = lp._index()
    assert _ALL_KEY in groups
    lp._inc = None  # (the rebuilt index's queries: native, then numpy)
    native = lp.predict_many(pids, g, max_new)
    lp.NATIVE = False
    ref = lp.predict_many(pids, g, max_new)
    for x, y in zip(native, ref):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    assert (native[1] == LONG).any() and (native[1] != LONG).any()


_ALL_KEY = -1


def test_native_group_queries_refuse_bad_blocks():
    import numpy as np

    from das_sglang.native import length_remaining

    one = np.ones(1)
    args = dict(g=one, cap=one * 10, c0=np.zeros(1, np.int64), present=np.array([1, 0, 0, 0], np.int64),
                sorted=np.array([5.0]), sorted_off=np.array([0] + [1] * 12, np.int64),
                suffix=np.array([5.0, 0.0] + [0.0] * 11), suffix_off=np.array([0] + list(range(2, 14)), np.int64),
                tail_factor=1.0)
    rem, cls = length_remaining(**args)
    assert rem.tolist() == [4.0] and cls.tolist() == [0]  # (5 - 1), class short
    with pytest.raises(ValueError, match="block 0"):
        length_remaining(**{**args, "suffix_off": np.array([0] + list(range(1, 13)), np.int64),
                            "suffix": np.zeros(12)})
    with pytest.raises(ValueError, match="c0: expected a 1-D contiguous int64"):
        length_remaining(**{**args, "c0": np.zeros(1, np.int32)})


# ---- the incremental index (native LengthIndex) vs the rebuilt one -----------------------


def _same_answers(inc, ref, rng, n_problems):
    import numpy as np

    rows = 64
    pids = [f"p{int(i)}" for i in rng.integers(0, n_problems + 3, rows)]  # (some unknown)
    g = rng.integers(0, 9000, rows)
    g[:4] = 0
    max_new = rng.integers(1, 12000, rows)
    got, want = inc.predict_many(pids, g, max_new), ref.predict_many(pids, g, max_new)
    for x, y in zip(got, want):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    t_inc, t_ref = inc.thresholds(), ref.thresholds()
    assert (t_inc is None) == (t_ref is None)
    if t_ref is not None:
        assert t_inc.tobytes() == np.asarray(t_ref, np.float64).tobytes()
    for p in set(pids):
        assert inc.initial_class(p) == ref.initial_class(p)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thresholds", [None, (150, 900)])
def test_incremental_index_answers_as_a_full_rebuild_does(monkeypatch, seed, thresholds):
    """Every query of the incremental index -- after each finish, window steps that drop
    lengths, an eviction, a restore, lengths that grow its trees -- is what a full rebuild
    of the same lengths answers (``INCREMENTAL`` off, the reference), bit for bit:
    remaining lengths, classes, initial classes, thresholds."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cfg = PolicyConfig(length_window_steps=2, class_thresholds=thresholds)
    inc = LengthPredictor(cfg)
    monkeypatch.setattr(LengthPredictor, "INCREMENTAL", False)
    ref = LengthPredictor(cfg)
    assert inc._inc is not None and ref._inc is None
    n_problems = int(rng.integers(2, 40))
    _same_answers(inc, ref, rng, n_problems)  # (no lengths yet: the prior)
    for step in range(6):
        for p in (inc, ref):
            p.advance_step(step)
        for k in range(int(rng.integers(20, 120))):
            pid = f"p{int(rng.integers(n_problems))}"
            n = int(rng.choice([rng.integers(0, 80), rng.lognormal(6, 1), rng.integers(0, 40_000)]))
            inc.observe_finished(pid, n)
            ref.observe_finished(pid, n)
            if k % 7 == 0:
                _same_answers(inc, ref, rng, n_problems)
        if step == 3:
            gone = [f"p{i}" for i in range(0, n_problems, 3)]
            assert inc.evict_problems(gone) == ref.evict_problems(gone)
            _same_answers(inc, ref, rng, n_problems)
        _same_answers(inc, ref, rng, n_problems)
    restored, restored_ref = LengthPredictor(cfg), LengthPredictor(cfg)
    monkeypatch.setattr(LengthPredictor, "INCREMENTAL", True)
    restored = LengthPredictor(cfg)
    assert restored._inc is not None and restored_ref._inc is None
    assert restored.restore(inc.state()) == restored_ref.restore(ref.state())
    _same_answers(restored, restored_ref, rng, n_problems)


def test_a_finish_is_read_by_the_next_query_without_a_rebuild(monkeypatch):
    """Background or not, the incremental index never rebuilds on a finish: the next query
    already reads it (the rebuilt index lagged it by up to 1% of the lengths / 0.5 s)."""
    p = LengthPredictor(FIXED, background=True)

    def no_rebuild(*a, **k):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(p, "_build_index", no_rebuild)
    monkeypatch.setattr(p, "_start_rebuild", no_rebuild)
    p.observe_finished("a", 50)
    assert p.predict("a", 0, 10_000).length_class == SHORT
    p.observe_finished("a", 5000)
    p.observe_finished("a", 6000)
    assert p.initial_class("a") == LONG  # median 5000, at once
    assert p.predict("a", 0, 10_000) == p.predict("a", 0, 10_000)
    assert not p.rebuild_if_stale() and p._building is None
    p.sync()  # (nothing to wait for)


def test_lengths_past_the_trees_fall_back_to_rebuilds():
    """A length the incremental index's trees do not cover (``LengthIndex.MAX_LENGTH``
    tokens) switches the predictor to the rebuilt index for good; answers stay right."""
    from das_sglang.native import LengthIndex

    p = _predictor([50, 60])
    assert p._inc is not None
    huge = LengthIndex.MAX_LENGTH
    p.observe_finished("q", huge)
    p.observe_finished("q", huge + 1)
    assert p._inc is None
    assert p.initial_class("q") == LONG  # median huge
    assert p.predict("q", 100, 10 * huge).remaining == pytest.approx(huge + 0.5 - 100)
    restored = LengthPredictor(FIXED)
    restored.restore(p.state())  # (a restore past the trees: the rebuilt index too)
    assert restored._inc is None and restored.initial_class("q") == LONG


def test_length_index_refuses_bad_input_naming_it():
    import numpy as np

    from das_sglang.native import LengthIndex

    ix = LengthIndex(True, 100.0, 1000.0)
    with pytest.raises(ValueError, match="invalid length -3"):
        ix.add(0, -3)
    with pytest.raises(ValueError, match="invalid problem index -1"):
        ix.add(-1, 5)
    with pytest.raises(ValueError, match="no lengths"):
        ix.query(np.zeros(1), np.ones(1), np.zeros(1, np.int64), 1.0)
    ix.add(0, 5)
    with pytest.raises(ValueError, match="problems: expected a 1-D contiguous int64"):
        ix.query(np.zeros(1), np.ones(1), np.zeros(1, np.int32), 1.0)
    with pytest.raises(ValueError, match="1 rows .g. but cap has 2"):
        ix.query(np.zeros(1), np.ones(2), np.zeros(1, np.int64), 1.0)
    with pytest.raises(ValueError, match="invalid problem index 4 of 2"):
        ix.build(np.array([0, 4], np.int64), np.array([1, 2], np.int64), 2)
    assert ix.num_lengths == 1  # (a refused build changed nothing)
    rem, cls, c0 = ix.query(np.zeros(1), np.full(1, 99.0), np.zeros(1, np.int64), 1.0)
    assert rem.tolist() == [5.0] and cls.tolist() == [SHORT] and c0.tolist() == [SHORT]


def test_a_state_s_columns_never_change_after_it_is_taken():
    """``state()`` hands out a read-only view of the columns (no copy on the snapshot's
    path): a window step, an eviction, a renumbering and the appends after them rewrite a
    copy, never what a snapshot writer may still be encoding."""
    lp = LengthPredictor(PolicyConfig(length_window_steps=2))
    for step in range(4):
        lp.advance_step(step)
        for j in range(6):
            lp.observe_finished(f"p{j % 3}", 10 * step + j)
    state = lp.state()
    before = state["columns"].copy()
    assert not state["columns"].flags.writeable
    lp.advance_step(5)  # drops steps 1-2 in place ...
    lp.evict_problems(["p0"])  # ... and a problem (renumbered)
    for j in range(40):  # ... then appends where the dropped entries were
        lp.observe_finished("p1", 1000 + j)
    assert np.array_equal(state["columns"], before)
    assert state["problems"] == ["p0", "p1", "p2"]
    # the predictor itself kept step 3's lengths of p1 and p2, then the new ones
    now = lp.state()["columns"]
    assert now[2].tolist() == [31, 32, 34, 35] + list(range(1000, 1040))
    fresh = LengthPredictor(PolicyConfig(length_window_steps=2))
    assert fresh.restore(state, at=5) == 6  # (step 3's: the rest is older than the window)


def test_growing_past_a_state_view_keeps_both_and_copies_only_the_held_lengths():
    """The columns double as they fill: the lengths held move to a fresh array (a state()
    view taken before keeps the old one, unchanged), and the fresh array is the
    predictor's own -- an eviction right after rewrites it in place, no second copy --
    with the same lengths as a predictor that never shared a view."""
    lp = LengthPredictor(PolicyConfig(length_window_steps=2))
    ref = LengthPredictor(PolicyConfig(length_window_steps=2))
    for p in (lp, ref):
        p.advance_step(0)
        for j in range(1000):
            p.observe_finished(f"p{j % 7}", 10 + j)
    state = lp.state()
    before = state["columns"].copy()
    for p in (lp, ref):
        for j in range(100):  # past the first 1,024 columns: they double
            p.observe_finished(f"p{j % 5}", 3000 + j)
    assert lp._cols.shape[1] == 2048
    assert np.array_equal(state["columns"], before)
    grown = lp._cols
    for p in (lp, ref):
        p.evict_problems(["p6"])  # drops and renumbers in place
    assert lp._cols is grown
    assert np.array_equal(state["columns"], before)
    assert np.array_equal(lp.state()["columns"], ref.state()["columns"])
    assert lp.num_lengths == 1100 - 1000 // 7
    assert lp.predict_many(["p1", "p5"], [0, 0], [10**6] * 2)[0].tolist() == \
        ref.predict_many(["p1", "p5"], [0, 0], [10**6] * 2)[0].tolist()


def test_a_step_leaves_room_for_as_many_lengths_again():
    """After a step the columns hold twice the lengths kept: the finishes of the next step
    (a window's share of them) never grow the columns on whichever thread records them."""
    lp = LengthPredictor(PolicyConfig(length_window_steps=4))
    for step in range(6):
        lp.advance_step(step)
        assert lp._cols.shape[1] >= 2 * lp.num_lengths
        cols = lp._cols
        for j in range(lp.num_lengths + 700):  # up to twice what it holds
            if lp.num_lengths >= cols.shape[1] // 2 + 300:
                break
            lp.observe_finished(f"p{j % 9}", 100 + j)
        assert lp._cols is cols


@pytest.mark.parametrize("too_long", [False, True])
def test_many_finishes_at_once_are_the_finishes_one_by_one(too_long):
    """``observe_finished_many`` (a boundary's wave of finishes in one call) leaves the
    columns, the version and every answer as the same finishes one by one -- new problems
    numbered in order, and a length past the incremental index's trees switching to
    rebuilds at the same point; a negative length is named and adds nothing."""
    from das_sglang.native import LengthIndex

    one, many = (LengthPredictor(PolicyConfig(length_window_steps=3)) for _ in range(2))
    for p in (one, many):
        p.advance_step(2)
        for j in range(30):
            p.observe_finished(f"p{j % 4}", 50 + 7 * j)
        p.advance_step(3)
    pids = ["p1", "new", "p3", "p1", "other", "new"]
    lens = [40, 900, 12, 3000, 77, 5]
    if too_long:
        lens[3] = LengthIndex.MAX_LENGTH + 5
    for pid, n in zip(pids, lens):
        one.observe_finished(pid, n)
    many.observe_finished_many(pids, lens)
    assert many.state()["problems"] == one.state()["problems"]
    assert np.array_equal(many.state()["columns"], one.state()["columns"])
    assert many._version == one._version and (many._inc is None) == (one._inc is None) == too_long
    ids = ["p0", "p1", "p2", "p3", "new", "other", "unseen"]
    g, cap = [0, 10, 100, 0, 5, 0, 0], [10**6] * 7
    for a, b in zip(one.predict_many(ids, g, cap), many.predict_many(ids, g, cap)):
        assert np.array_equal(a, b)
    before = many.state()["columns"].copy()
    with pytest.raises(ValueError, match="invalid finished length -3 for problem 'q'"):
        many.observe_finished_many(["p0", "q"], [5, -3])
    assert np.array_equal(many.state()["columns"], before)
