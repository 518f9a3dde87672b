"""Request bookkeeping of the worker (DasSession) with the real drafter (no engine)."""

from __future__ import annotations

import numpy as np
import pytest

from das_sglang.sglang.options import load_options
from das_sglang.sglang.session import DasSession, problem_of

OPTS = load_options(8, '{"server": {"policy": "unlimited"}}')


def test_problem_id_from_custom_params_or_prompt_hash():
    assert problem_of({"das_problem_id": "gsm-1", "das_step": 3}, [1, 2]) == ("gsm-1", 3)
    pid, step = problem_of(None, [1, 2, 3])
    assert pid.startswith("prompt-") and step is None
    assert problem_of({}, [1, 2, 3])[0] == pid != problem_of({}, [1, 2, 4])[0]
    with pytest.raises(ValueError, match="das_step=-1"):
        problem_of({"das_step": -1}, [1])


def test_finished_sibling_drafts_the_next_one_and_is_trimmed():
    s = DasSession(OPTS)
    prompt, text = [5, 6, 7], [10, 11, 12, 13, 14, 15, 16, 17]
    s.start("a", {"das_problem_id": "p", "das_step": 1}, prompt, text[:1], max_new_tokens=6)
    s.committed("a", proposed=6, tokens=text[1:])  # ran 2 tokens past max_new_tokens
    s.finished("a", prompt, text)
    s.start("b", {"das_problem_id": "p", "das_step": 1}, prompt, text[:1], max_new_tokens=6)
    (tree,), width = s.plan(["b"], OPTS.max_nodes)
    # the verify width is the CUDA-graph bucket at or above the tree (padded rows)
    assert width >= len(tree) > 0 and width in OPTS.policy.buckets(OPTS.max_nodes)
    assert tree.tokens[: 5].tolist() == text[1:6]  # only what was returned is history
    assert len(tree) == 5
    assert s.drafter.history()["p"][1][0].tolist() == prompt + text[:6]


def test_newer_step_advances_drafter_and_policy():
    s = DasSession(OPTS)
    s.start("a", {"das_problem_id": "p", "das_step": 4}, [1, 2], [3], max_new_tokens=4)
    assert s.step == 4 and s.drafter.step == 4
    s.start("b", {"das_problem_id": "p"}, [1, 2], [3], max_new_tokens=4)  # no step: current
    assert s.live["b"].step == 4


def test_history_snapshot_round_trip(tmp_path):
    raw = '{"server": {"policy": "unlimited", "history_path": "%s", "snapshot_interval": 1}}'
    opts = load_options(8, raw % tmp_path)
    s = DasSession(opts)
    s.start("a", {"das_problem_id": "p", "das_step": 2}, [1, 2], [3], max_new_tokens=8)
    s.committed("a", 1, [4, 5])
    s.finished("a", [1, 2], [3, 4, 5])  # interval 1: saved now (by the writer thread)
    s.snapshot.wait()
    again = DasSession(opts)
    assert again.step == 2
    assert [t.tolist() for t in again.drafter.history()["p"][2]] == [[1, 2, 3, 4, 5]]
    s.sync()  # (s's finish reached its drafter on the update thread)
    assert np.array_equal(again.drafter.history()["p"][2][0], s.drafter.history()["p"][2][0])


def test_snapshot_mirror_groups_each_problem_step(tmp_path):
    """The history the background writer saves is one TokenGroup per problem-step (one
    array, no Python step per sequence in the writer), equal to the drafter's history,
    after a restart too, and a view taken for a save never changes afterwards."""
    from das_sglang.core.snapshot import TokenGroup

    raw = '{"server": {"policy": "unlimited", "history_path": "%s", "snapshot_interval": 0}}'
    opts = load_options(8, raw % tmp_path)
    s = DasSession(opts)
    for i, text in enumerate(([3, 4], [5], [6, 7, 8])):
        s.start(f"r{i}", {"das_problem_id": "p", "das_step": 2}, [1, 2], text[:1], max_new_tokens=8)
        s.finished(f"r{i}", [1, 2], text)
        if i == 1:
            view = s._history_view()
    group = s._history_view()["p"][2]
    assert type(group) is TokenGroup and [t.tolist() for t in group] == [[1, 2, 3, 4], [1, 2, 5], [1, 2, 6, 7, 8]]
    assert [t.tolist() for t in view["p"][2]] == [[1, 2, 3, 4], [1, 2, 5]]  # the earlier view
    s.snapshot.save()
    s.snapshot.wait()
    again = DasSession(opts)
    g2 = again._history_view()["p"][2]
    assert type(g2) is TokenGroup and [t.tolist() for t in g2] == [t.tolist() for t in group]
    assert [t.tolist() for t in again.drafter.history()["p"][2]] == [t.tolist() for t in group]


def test_corrupt_snapshot_starts_empty_unless_strict(tmp_path):
    raw = '{"server": {"history_path": "%s"%s}}'
    s = DasSession(load_options(8, raw % (tmp_path, ', "snapshot_interval": 1')))
    s.start("a", {"das_problem_id": "p", "das_step": 1}, [1, 2], [3], max_new_tokens=8)
    s.finished("a", [1, 2], [3, 4])
    s.snapshot.wait()
    for f in tmp_path.iterdir():  # flip one byte of every snapshot file
        if f.is_file():
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
    with pytest.raises(Exception, match=str(tmp_path)):
        DasSession(load_options(8, raw % (tmp_path, ', "strict_snapshot": true')))
    corrupt = (tmp_path / "history.dassnap").read_bytes()
    lenient = DasSession(load_options(8, raw % (tmp_path, "")))  # default: not strict
    assert lenient.drafter.history() == {}
    # the unusable file is kept aside, not overwritten by the next save
    aside = list(tmp_path.glob("history.dassnap.unusable-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == corrupt


@pytest.mark.parametrize("async_updates", [False, True])
def test_heap_trim_waits_until_no_request_is_live(monkeypatch, async_updates):
    # malloc_trim holds the allocator's locks while it walks the heap: run beside decoding,
    # every malloc of the step (drafts, layout, tensors) waits for it. So the session trims
    # only while nothing decodes: at a step boundary with no live request, else once the
    # last live request has left; never on a boundary or eviction mid-traffic.
    import das_sglang.sglang.session as session_mod

    trims = []
    monkeypatch.setattr(session_mod, "_trim_heap", lambda: trims.append("now"))
    monkeypatch.setattr(session_mod, "_trim_heap_later", lambda: trims.append("later"))
    raw = '{"server": {"policy": "unlimited", "async_updates": %s}, "drafter": {"window_steps": 1}}'
    s = DasSession(load_options(8, raw % str(async_updates).lower()))
    kind = "later" if async_updates else "now"
    s.weights_updated()  # idle boundary: trimmed at once
    assert trims == [kind]
    for step in range(3):  # history in steps 1..3, a window of 1: the boundaries evict
        for r in "ab":
            rid = f"{r}{step}"
            s.start(rid, {"das_problem_id": "p"}, [1, 2], [3], max_new_tokens=8)
            s.committed_batch([rid], [1], [[4 + step, 5]])
        s.finished(f"a{step}", [1, 2], [3, 4 + step, 5])
        s.start("c", {"das_problem_id": "p"}, [1, 2], [3], max_new_tokens=8)  # traffic goes on
        s.weights_updated()  # a boundary mid-traffic: no trim
        s.plan([f"b{step}", "c"], 4)
        s.sync()
        if step == 1:
            s.drain()  # (drain trims by itself: tests, shutdown)
        n = len(trims)
        s.finished(f"b{step}", [1, 2], [3, 4 + step, 5])
        assert len(trims) == n  # "c" still decodes
        s.drop("c")  # the last live request left: the trim that was due runs now
        assert trims[n:] == [kind]
    assert s.drafter.step >= 3


def test_snapshot_restores_the_length_predictor(tmp_path):
    """A restarted worker classifies requests from the finished lengths it saved (not only
    from finishes it sees after the restart)."""
    raw = '{"server": {"history_path": "%s", "snapshot_interval": 1}}' % tmp_path
    opts = load_options(8, raw)
    s = DasSession(opts)
    for i, n in enumerate([3, 5, 40, 41, 42]):
        rid = f"r{i}"
        s.start(rid, {"das_problem_id": "p", "das_step": 1}, [1, 2], [3], max_new_tokens=64)
        s.finished(rid, [1, 2], list(range(3, 3 + n)))
    s.snapshot.wait()
    again = DasSession(opts)
    a, b = s.policy.lengths, again.policy.lengths
    a.sync()
    b.sync()
    assert b.num_lengths == a.num_lengths == 5
    assert b.initial_class("p") == a.initial_class("p") is not None
    g, m = np.array([0, 10]), np.array([64, 64])
    assert [np.asarray(x).tolist() for x in b.predict_many(["p", "p"], g, m)] == \
        [np.asarray(x).tolist() for x in a.predict_many(["p", "p"], g, m)]
    s.close()
    again.close()


def test_bad_saved_lengths_are_ignored_unless_strict(tmp_path):
    from das_sglang.core.snapshot import save_history

    bad = {"step": 1, "problems": ["p"], "columns": [[0], [1], [-3]]}
    save_history(tmp_path, {"p": {1: [np.array([1, 2, 3], np.int32)]}}, {"das_lengths": bad})
    raw = '{"server": {"history_path": "%s"%s}}'
    with pytest.raises(ValueError, match=r"snapshot in .*entry 0 .*\(0, 1, -3\)"):
        DasSession(load_options(8, raw % (tmp_path, ', "strict_snapshot": true')))
    lenient = DasSession(load_options(8, raw % (tmp_path, "")))
    assert [t.tolist() for t in lenient.drafter.history()["p"][1]] == [[1, 2, 3]]  # history loads
    assert lenient.policy.lengths.num_lengths == 0
    lenient.close()  # (its save then holds the history and its own, valid, lengths)


def test_the_snapshot_mirror_keeps_exactly_the_window_across_steps(tmp_path):
    """Step boundaries prune the snapshot mirror through its per-step problem sets: after
    every advance it holds exactly the drafter's history (the window's steps, problems
    without any gone), with problems finishing in some steps only, one forgotten by the
    history cap, and after a restart from a snapshot."""
    raw = ('{"drafter": {"window_steps": 2}, "server": {"policy": "unlimited", "history_path": "%s",'
           ' "snapshot_interval": 0}}')
    opts = load_options(8, raw % tmp_path)
    s = DasSession(opts)
    rng = np.random.default_rng(3)
    n = 0
    for step in range(1, 8):
        for p in range(6):
            if (p + step) % 3:  # each problem skips some steps
                s.start(f"r{n}", {"das_problem_id": f"p{p}", "das_step": step}, [1, 2], [], 8)
                s.finished(f"r{n}", [1, 2], rng.integers(3, 50, 4).tolist())
                n += 1
        s.sync()
        want = {p: {k: [t.tolist() for t in g] for k, g in steps.items()} for p, steps in s.drafter.history().items()}
        got = {p: {k: [t.tolist() for t in g] for k, g in steps.items()} for p, steps in s._history_view().items()}
        if step > 5:  # p1 left the mirror at step 5 (below): only what it finished since
            want["p1"] = {k: v for k, v in want.get("p1", {}).items() if k > 5}
            if not want["p1"]:
                del want["p1"]
        assert got == want and min(k for steps in got.values() for k in steps) >= step - 2
        if step == 5:
            s._mirror.pop("p1")  # (as the history cap forgets a problem's snapshot copy)
    assert len(s._mirror_steps) <= 3  # (the steps in the window, pruned as they leave)
    s.snapshot.save()
    s.snapshot.wait()
    again = DasSession(opts)
    assert again._history_view().keys() == s._history_view().keys()
    assert sorted(again._mirror_steps) == sorted({k for st in again._mirror.values() for k in st})
