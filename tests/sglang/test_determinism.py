"""Drafts depend on the order of events, never on timing: with ``--tp N`` every rank runs its
own session and must draft the same trees (only the target tokens are agreed, tp.py), and a
rerun of the same events must plan the same steps. The out-of-window history is removed
lazily, a chunk per forward on the update thread (``DasSession._evict_chunk``): a fixed
amount, so how far that removal got at a plan is a function of the events; and text of
weight 0 (out of the window, not removed yet) never lengthens a draft's match or blocks
an anchor by its fanout (native ``weighted_match`` / ``weighted_fanout``)."""

import time

import numpy as np
import pytest

from das_sglang.core.config import DrafterConfig
from das_sglang.core.drafter import SuffixDrafter
from das_sglang.sglang.session import DasSession
from test_launch_first import _drive, _session


@pytest.mark.parametrize("launch_first", [False, True])
def test_the_same_events_plan_the_same_steps_whatever_the_update_threads_speed(monkeypatch, launch_first):
    """220 steps with finishes, starts and five step boundaries (so lazy evictions pending
    at many plans), run three times: as is, and with every eviction chunk or every removal
    on the update thread slowed down. Every plan -- trees, widths, budgets, modelled
    seconds -- and the final cells and table are the same. (Before the fixed-size chunks a
    time-bounded chunk removed more or less history before a plan depending on the
    machine's speed at that moment: the same run drafted differently from step ~120 on in
    about half of the runs.)"""
    runs = []
    evict = SuffixDrafter.evict_pending
    for slow in (0.0, 0.002, 0.0):
        def slowed(self, *a, _slow=slow, **k):
            time.sleep(_slow)
            return evict(self, *a, **k)

        monkeypatch.setattr(SuffixDrafter, "evict_pending", slowed)
        s = _session(launch_first)
        s.EVICT_CHUNK_TOKENS = 1  # (a rollout a chunk: evictions pending at many plans)
        chunks = []
        chunk = s._evict_chunk
        s._evict_chunk = lambda: chunks.append(1) or chunk()
        got, _ = _drive(s, steps=220)
        assert len(chunks) > 20  # (evictions were pending at many plans)
        runs.append(got)
        s.close()
    assert runs[0] == runs[1] == runs[2]


def _history_then_draft(lazy: bool, **cfg):
    """A problem whose step-0 history holds a long match that step 2's window leaves out,
    and in-window text of step 1; the draft of a live request at step 2 (evictions left
    pending where ``lazy``)."""
    d = SuffixDrafter(DrafterConfig(window_steps=1, global_shard=False, **cfg))
    d.lazy_eviction = lazy
    d.advance_step(0)
    d.add_history("p", 0, [9, 1, 2, 3, 4, 5, 6, 7])  # "1 2 3 4" then "5": out of the window at step 2
    for tail in (8, 7, 6, 5):
        d.add_history("p", 0, [3, 4, tail])  # (step 0 only: more continuations after "3 4")
    d.advance_step(1)
    d.add_history("p", 1, [3, 4, 11, 12])  # in the window: "3 4" -> 11
    d.add_history("p", 1, [4, 13])
    d.advance_step(2)
    d.start_request("r", "p", [1, 2, 3, 4])
    return d, d.speculate_flat(["r"], 6)


def test_out_of_window_text_never_lengthens_a_match_nor_blocks_an_anchor():
    """The step-0 rollout matches the live context "1 2 3 4" by 4 tokens, but weighs 0 once
    out of the window: the draft's match is the longest suffix with a weighted continuation
    ("3 4", 2 tokens), as with that history already removed, and the tree is the same;
    with a fanout limit of 2, the node after "3 4" has 5 continuations of which one weighs
    more than 0, so that anchor is kept, as after the removal."""
    for cfg in ({}, {"mix_max_fanout": 2}):
        lazy, got = _history_then_draft(True, **cfg)
        eager, want = _history_then_draft(False, **cfg)
        assert lazy.history_tokens > eager.history_tokens  # (the step-0 rollouts still stored)
        assert got.match_len.tolist() == want.match_len.tolist() == [2]
        assert got.tokens.tolist() == want.tokens.tolist() and got.tokens[0] == 11
        assert np.allclose(got.probs, want.probs)
        assert got.parents.tolist() == want.parents.tolist()


def test_an_eviction_chunk_removes_a_fixed_amount_however_long_it_takes(monkeypatch):
    """``_evict_chunk`` removes rollouts until ``EVICT_CHUNK_TOKENS`` tokens left (a rollout
    at least), whatever the clock says and whether a feedback waits: a machine slow at that
    moment (here every clock read 1 s later than the last) and a waiting feedback leave the
    same history as a fast one. (A time budget stopped after the first rollout here.)"""
    left = []
    for slow in (False, True):
        s = DasSession(_session(False).options)
        s.policy.lengths.background = False
        d = s.drafter
        d.advance_step(0)
        for p in range(8):
            for k in range(4):
                d.add_history(f"p{p}", 0, list(range(k, k + 100)))
        s.step = s.clock.current = 0
        d.advance_step(3)  # step 0 out of the window (2 steps): evictions pending
        s._evicting = True
        s.EVICT_CHUNK_TOKENS = 1000
        before = d.history_tokens
        if slow:
            clock = [0.0]

            def later():
                clock[0] += 1.0
                return clock[0]

            monkeypatch.setattr(time, "perf_counter", later)
            s._yield_updates.set()
        s._evict_chunk()
        monkeypatch.undo()
        left.append(before - d.history_tokens)
        s.close()
    assert left[0] == left[1] >= 1000 and left[0] < 3200

