"""SuffixDrafter behaviour: window eviction, siblings, own text, validation, snapshots."""

from __future__ import annotations

import numpy as np
import pytest

from das_sglang.core.config import DrafterConfig
from das_sglang.core.draft_tree import DraftTree
from das_sglang.core.drafter import SuffixDrafter

ROLLOUT = [7, 8, 9, 10, 11, 12, 13, 14]


def drafter(**kw) -> SuffixDrafter:
    d = SuffixDrafter(DrafterConfig(**kw))
    d.advance_step(0)
    return d


class TestHistory:
    def test_history_drafts_the_rest_of_a_rollout(self):
        d = drafter(window_steps=1)
        d.add_history("p", 0, [1, 2] + ROLLOUT)
        d.advance_step(1)
        d.start_request("r", "p", [1, 2])
        tree = d.speculate("r", budget=4)
        assert tree.tokens.tolist() == ROLLOUT[:4]
        assert tree.parents.tolist() == [-1, 0, 1, 2]
        assert tree.match_len == 2

    def test_window_evicts_old_steps(self):
        d = drafter(window_steps=1)
        d.add_history("p", 0, [1, 2] + ROLLOUT)
        d.advance_step(1)
        assert d.stats().sequences == 1
        d.advance_step(2)  # step 0 is now 2 steps old: outside a 1-step window
        assert d.stats().sequences == 0 and d.stats().nodes == 0
        assert d.history() == {}

    def test_history_outside_window_is_not_stored(self):
        d = drafter(window_steps=1)
        d.advance_step(5)
        assert d.add_history("p", 3, [1, 2, 3]) is False
        assert d.add_history("p", 4, [1, 2, 3]) is True

    def test_older_steps_weigh_less(self):
        # counts only (recency would add to the newest continuation, 4: test_wide_tree.py)
        # (the per-problem index alone: the shared index weighs its copies by recency of
        # insertion, not by step)
        d = drafter(window_steps=2, step_decay=0.5, min_token_prob=0.0, mix_recency=0.0, global_shard=False)
        d.add_history("p", 0, [1, 2, 3])  # old: continuation 3
        d.add_history("p", 0, [1, 2, 3])
        d.advance_step(2)
        d.add_history("p", 2, [1, 2, 4])  # current: continuation 4, weight 1 vs 2 * 0.25
        d.start_request("r", "p", [1, 2])
        tree = d.speculate("r", budget=2)
        assert tree.tokens.tolist() == [4, 3]
        assert tree.probs.tolist() == pytest.approx([1 / 1.5, 0.5 / 1.5])


class TestSiblings:
    def test_siblings_feed_each_other(self):
        d = drafter()
        d.start_request("a", "p", [1, 2])
        d.start_request("b", "p", [1, 2])
        d.extend_request("a", ROLLOUT)
        tree = d.speculate("b", budget=8)
        assert tree.tokens.tolist() == ROLLOUT

    def test_identical_sibling_is_fully_accepted(self):
        d = drafter(max_budget=16)
        d.start_request("a", "p", [1, 2])
        d.extend_request("a", ROLLOUT)
        d.finish_request("a")
        d.start_request("b", "p", [1, 2])
        produced = 0
        while produced < len(ROLLOUT):
            tree = d.speculate("b")
            accepted = tree.accept_length(ROLLOUT[produced:])
            assert accepted == len(ROLLOUT) - produced  # the whole remainder, first try
            d.extend_request("b", np.asarray(ROLLOUT[produced : produced + accepted], np.int32))
            produced += accepted

    def test_own_text_drafts_its_repetition(self):
        d = drafter()
        d.start_request("r", "p", [5, 6, 7, 8, 5, 6])
        assert d.speculate("r", budget=2).tokens.tolist() == [7, 8]

    def test_problems_do_not_mix_without_the_shared_index(self):
        d = drafter(global_shard=False)
        d.add_history("p", 0, [1, 2, 3])
        d.start_request("r", "q", [1, 2])
        assert len(d.speculate("r")) == 0

    def test_global_shard_helps_unseen_problems(self):
        d = drafter(global_shard=True)
        d.add_history("p", 0, [1, 2, 3])
        d.start_request("r", "q", [1, 2])
        assert d.speculate("r").tokens.tolist() == [3]

    def test_finish_without_keep_drops_the_sequence(self):
        d = drafter()
        d.start_request("r", "p", [1, 2, 3])
        d.finish_request("r", keep=False)
        assert d.stats().sequences == 0 and d.history() == {}


class TestBatch:
    def test_batch_equals_single_calls(self):
        d = drafter(min_token_prob=0.0)
        for k in range(3):
            d.add_history("p", 0, [1, 2, 3 + k, 9, 9])
        d.start_request("a", "p", [1, 2])
        d.start_request("b", "p", [2, 3])
        batch = d.speculate_batch(["a", "b"], [3, 5])
        for tree, (rid, budget) in zip(batch, [("a", 3), ("b", 5)]):
            single = d.speculate(rid, budget)
            assert tree.tokens.tolist() == single.tokens.tolist()
            assert tree.parents.tolist() == single.parents.tolist()
            assert tree.probs.tolist() == single.probs.tolist()

    def test_small_budget_lists_match_the_array_path_and_bad_ones_name_their_request(self):
        d = drafter(min_token_prob=0.0, max_budget=8)
        for k in range(3):
            d.add_history("p", 0, [1, 2, 3 + k, 9, 9, 4, 5])
        d.start_request("a", "p", [1, 2])
        d.start_request("b", "p", [2, 3])
        # a few Python ints (checked in Python) vs the same budgets as an array, one capped
        fast = d.speculate_batch(["a", "b"], [3, 50])
        slow = d.speculate_batch(["a", "b"], np.array([3, 50]))
        assert d._budget_array(["a", "b"], [3, 50]).tolist() == [3, 8]
        assert d._budget_array(["a", "b"], [3, 50]).dtype == np.int32
        # an int64 array (the policy's sizes): one native pass, the numpy path's array
        sizes = np.array([0, 7, 8, 9, 2**40], np.int64)
        ids5 = ["a", "b", "c", "d", "e"]
        got = d._budget_array(ids5, sizes)
        assert got.dtype == np.int32 and got.tolist() == [0, 7, 8, 8, 8]
        assert d._budget_array(ids5[:4], sizes[:4].astype(np.int32)).tolist() == got[:4].tolist()  # (numpy path)
        with pytest.raises(ValueError, match=r"invalid budget=-3 for req_id='c'"):
            d._budget_array(ids5, np.array([1, 2, -3, 4, -5], np.int64))
        for x, y in zip(fast, slow):
            assert x.tokens.tolist() == y.tokens.tolist() and x.probs.tolist() == y.probs.tolist()
        # one row: the index's own one-row call, the same tree as the batch call's
        for rid, budget in (("a", 5), ("b", 5), ("b", 50), ("b", 0)):
            one = d.speculate_batch([rid], [budget])[0]
            via_batch = d.speculate_batch([rid], np.array([budget]))[0]
            for f in ("tokens", "parents", "probs"):
                assert getattr(one, f).tolist() == getattr(via_batch, f).tolist()
            assert one.match_len == via_batch.match_len and len(one) == min(len(via_batch), 8)
        assert d.speculate("a").tokens.tolist() == d.speculate_batch(["a"], np.array([8]))[0].tokens.tolist()
        with pytest.raises(ValueError, match=r"invalid budget=-2 for req_id='a'"):
            d.speculate_batch(["a"], [-2])
        with pytest.raises(ValueError, match=r"unknown req_id='zz'"):
            d.speculate_batch(["zz"], [2])
        with pytest.raises(ValueError, match=r"invalid budget=-1 for req_id='b'"):
            d.speculate_batch(["a", "b"], [2, -1])
        with pytest.raises(ValueError, match=r"budgets has 1 entries for 2 req_ids"):
            d.speculate_batch(["a", "b"], [2])
        with pytest.raises(ValueError, match=r"unknown req_id='zz'"):
            d.speculate_batch(["a", "zz"], [2, 2])

    def test_native_trees_pass_the_validating_constructor(self):
        d = drafter(min_token_prob=0.0, max_budget=24)
        for k in range(5):
            d.add_history("p", 0, [1, 2, k % 3, 9, k, 1, 2, 4, k % 2])
        d.start_request("r", "p", [1, 2])
        tree = d.speculate("r")
        assert len(tree) > 5 and (tree.parents >= 0).any()
        checked = DraftTree(tree.tokens, tree.parents, tree.probs, tree.match_len)
        assert checked.parents.tolist() == tree.parents.tolist()
        assert all(-1 <= p < i for i, p in enumerate(tree.parents.tolist()))

    def test_extend_batch_equals_per_request_extends(self):
        a, b = drafter(global_shard=True), drafter(global_shard=True)
        for d in (a, b):
            d.start_request("x", "p", [1, 2])
            d.start_request("y", "q", [3])
        a.extend_batch(["x", "y"], [[5, 6], np.asarray([7], np.int32)])
        b.extend_request("x", [5, 6])
        b.extend_request("y", 7)
        assert a.history() == b.history() and a.stats() == b.stats()
        a.finish_request("x")
        b.finish_request("x")
        assert [t.tolist() for t in a.history()["p"][0]] == [[1, 2, 5, 6]]
        assert [t.tolist() for t in b.history()["p"][0]] == [[1, 2, 5, 6]]

    def test_extend_batch_validates_every_row_first(self):
        d = drafter()
        d.start_request("x", "p", [1, 2])
        with pytest.raises(ValueError, match="unknown req_id='nope'"):
            d.extend_batch(["x", "nope"], [[5], [6]])
        with pytest.raises(ValueError, match="1 rows for 2 req_ids"):
            d.extend_batch(["x", "x"], [[5]])
        d.finish_request("x")
        assert [t.tolist() for t in d.history()["p"][0]] == [[1, 2]]

    def test_extend_batch_of_plain_lists_takes_the_flat_path_and_names_bad_rows(self):
        a, b = drafter(), drafter()
        for d in (a, b):
            d.start_request("x", "p", [1, 2])
            d.start_request("y", "p", [3])
        a.extend_batch(["x", "y"], [[5, 6], (7,)])  # list + tuple rows
        b.extend_request("x", [5, 6])
        b.extend_request("y", [7])
        assert a.stats() == b.stats()
        a.finish_request("x")
        assert [t.tolist() for t in a.history()["p"][0]] == [[1, 2, 5, 6]]
        with pytest.raises(ValueError, match="req_id='y'.*got -3"):
            a.extend_batch(["y", "y"], [[1], [-3]])
        with pytest.raises(ValueError, match="req_id='y'.*dtype=float64"):
            a.extend_batch(["y", "y"], [[1], [2.5]])
        a.finish_request("y")
        assert [t.tolist() for t in a.history()["p"][0]][1] == [3, 7]  # nothing half-applied

    def test_chain_mode(self):
        d = drafter(tree=False, min_token_prob=0.0)
        d.add_history("p", 0, [1, 2, 3, 4])
        d.add_history("p", 0, [1, 2, 5, 6])
        d.start_request("r", "p", [1, 2])
        tree = d.speculate("r", 4)
        assert tree.tokens.tolist() == [3, 4] and tree.parents.tolist() == [-1, 0]

    def test_budget_zero_and_none(self):
        d = drafter(max_budget=3, min_token_prob=0.0)
        d.add_history("p", 0, [1] + ROLLOUT)
        d.start_request("r", "p", [1])
        assert len(d.speculate("r", 0)) == 0
        assert len(d.speculate("r")) == 3
        assert isinstance(d.speculate("r"), DraftTree)


class TestValidation:
    def test_unknown_req_id(self):
        d = drafter()
        with pytest.raises(ValueError, match="unknown req_id='x'"):
            d.speculate("x")
        with pytest.raises(ValueError, match="unknown req_id='x'"):
            d.extend_request("x", [1])

    def test_duplicate_req_id(self):
        d = drafter()
        d.start_request("r", "p", [1])
        with pytest.raises(ValueError, match="duplicate req_id='r'"):
            d.start_request("r", "p", [1])

    def test_negative_budget(self):
        d = drafter()
        d.start_request("r", "p", [1])
        with pytest.raises(ValueError, match="budget=-1"):
            d.speculate("r", -1)

    def test_bad_tokens(self):
        d = drafter()
        with pytest.raises(ValueError, match="dtype=float64"):
            d.start_request("r", "p", [1.5, 2.0])
        with pytest.raises(ValueError, match=r"-3"):
            d.start_request("r", "p", [-3])

    def test_steps_only_advance(self):
        d = drafter()
        d.advance_step(3)
        with pytest.raises(ValueError, match="step=2"):
            d.advance_step(2)

    def test_window_larger_than_native_slots(self):
        with pytest.raises(ValueError, match="window_steps=9"):
            SuffixDrafter(DrafterConfig(window_steps=9))


class TestSnapshots:
    def test_history_round_trip(self):
        d = drafter(window_steps=2)
        d.add_history("p", 0, [1, 2, 3])
        d.advance_step(1)
        d.start_request("r", "p", [4, 5])
        d.extend_request("r", [6])
        d.finish_request("r")
        d.start_request("live", "p", [9])  # live requests are not history
        snap = d.history()
        assert {s: [t.tolist() for t in ts] for s, ts in snap["p"].items()} == {0: [[1, 2, 3]], 1: [[4, 5, 6]]}
        e = drafter(window_steps=2)
        e.advance_step(1)
        assert e.load_history(snap) == 2
        assert {s: [t.tolist() for t in ts] for s, ts in e.history()["p"].items()} == {0: [[1, 2, 3]], 1: [[4, 5, 6]]}

    def test_stats(self):
        d = drafter()
        d.add_history("p", 0, list(range(100)))
        st = d.stats()
        assert st.tokens == 100 and st.sequences == 1 and st.nodes > 0
        assert 0 < st.bytes_per_token < 2000


def test_finish_as_keeps_the_live_copy_where_it_is_the_returned_text():
    """A finished request's live copy becomes history in place when it is the returned text
    or a prefix of it (the rest appended); one that ran past it is replaced. Either way the
    history and the drafts are those of adding the returned text as history."""
    text = np.asarray([1, 2] + ROLLOUT, np.int32)
    for live_len, returned in ((10, text), (6, text), (10, text[:7])):
        d = drafter(window_steps=1)
        d.start_request("r", "p", text[:live_len])
        seq = d._live["r"].seq_id
        d.finish_as("r", "p", 0, returned)
        ref = drafter(window_steps=1)
        ref.add_history("p", 0, returned)
        assert [t.tolist() for t in d.history()["p"][0]] == [returned.tolist()]
        kept = d._finished["p"][0] == [seq]
        assert kept == (live_len <= len(returned)), (live_len, len(returned))
        assert d.history_tokens == len(returned) and d.shared_tokens == len(returned)
        for x in (d, ref):
            x.start_request("q", "p", [1, 2])
        a, b = d.speculate("q", budget=6), ref.speculate("q", budget=6)
        assert a.tokens.tolist() == b.tokens.tolist() and a.tokens.tolist()[:2] == ROLLOUT[:2]
    d = drafter()
    d.start_request("r", "p", text)
    d.finish_as("r", "other", 0, text)  # another problem: moved there
    assert "p" not in d.history() and len(d.history()["other"][0]) == 1
