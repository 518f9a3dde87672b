"""Shared (cross-problem) index mixed into every draft (docs/design.md "Shared index")."""

from __future__ import annotations

import numpy as np
import pytest

from das_sglang.core.config import DrafterConfig
from das_sglang.core.drafter import SuffixDrafter
from das_sglang.native import SuffixIndex, draft_rows
from oracle.reference_index import ReferenceIndex

MIX = (4.0, 0.5, 1, 64, 0.3, 4.0)


def arr(tokens) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32)


def test_shared_anchors_agree_with_the_oracle():
    # Three problems, each with its own index; every sequence is also in the shared index.
    # Problems share a "format" vocabulary (0-3) and have their own tokens: the shared
    # index knows continuations a problem's own text has not shown yet.
    rng = np.random.default_rng(11)
    own = {p: (SuffixIndex(8), ReferenceIndex(8)) for p in range(3)}
    sh, sh_ref = SuffixIndex(8), ReferenceIndex(8)
    seq_problem, live = {}, []
    for k in range(12):
        p = k % 3
        s = rng.choice(np.r_[0:4, 4 + 4 * p: 8 + 4 * p], int(rng.integers(5, 30))).tolist()
        step = 0 if k < 9 else 1
        for ix, ref in (own[p], (sh, sh_ref)):
            ix.add_sequence(k, arr(s), step)
            ref.add_sequence(k, s, step)
        seq_problem[k] = p
        if k >= 9:
            live.append(k)
    weights = {0: 0.5, 1: 1.0}
    differs = 0
    for it in range(80):
        k = live[it % len(live)]
        p = seq_problem[k]
        chunk = rng.choice(np.r_[0:4, 4 + 4 * p: 8 + 4 * p], int(rng.integers(1, 4))).tolist()
        for ix, ref in (own[p], (sh, sh_ref)):
            ix.extend(k, arr(chunk))
            ref.extend(k, chunk)
        ix, ref = own[p]
        for w in (0.03, 1.0):
            n = ix.draft_for_sequence(k, 8, 0.0, weights, False, 6, MIX, sh, w)
            r = ref.draft_for_sequence(k, 8, 0.0, weights, False, 6, MIX, sh_ref, w)
            assert n[0].tolist() == r[0] and n[1].tolist() == r[1] and n[3] == r[3]
            np.testing.assert_allclose(n[2], r[2], rtol=0, atol=1e-9)
        alone = ix.draft_for_sequence(k, 8, 0.0, weights, False, 6, MIX)
        differs += alone[0].tolist() != n[0].tolist()
        # the batch call drafts the same rows as the single one
        b = draft_rows([ix], np.array([k], np.int64), np.array([8], np.int32), 0.0,
                       np.array([0, 1], np.int64), np.array([0.5, 1.0]), False, 6, MIX, 1, sh, 1.0)
        assert b[0].tolist() == n[0].tolist() and b[1].tolist() == n[1].tolist()
    assert differs > 0  # the shared anchors did change drafts


def test_shared_index_drafts_where_the_own_index_has_no_match():
    ix, sh = SuffixIndex(8), SuffixIndex(8)
    sh.add_sequence(0, arr([7, 8, 9, 10]), 0)  # another problem's text
    for x in (ix, sh):
        x.add_sequence(1, arr([5, 7, 8]), 0)  # the live request: its own index knows nothing after 8
    alone = ix.draft_for_sequence(1, 4, 0.0, {0: 1.0}, False, 6, MIX)
    assert alone[0].tolist() == [] and alone[3] == 0
    mixed = ix.draft_for_sequence(1, 4, 0.0, {0: 1.0}, False, 6, MIX, sh, 0.03)
    assert mixed[0].tolist()[:2] == [9, 10] and mixed[3] == 2
    # shared matches shorter than shared_min_match are not used
    assert ix.draft_for_sequence(1, 4, 0.0, {0: 1.0}, False, 6, MIX, sh, 0.03, 2)[0].tolist()[:2] == [9, 10]
    assert ix.draft_for_sequence(1, 4, 0.0, {0: 1.0}, False, 6, MIX, sh, 0.03, 3)[0].tolist() == []


def test_bad_shared_weight_is_rejected_naming_it():
    ix = SuffixIndex(8)
    ix.add_sequence(0, arr([1, 2, 3]), 0)
    with pytest.raises(ValueError, match="shared_weight"):
        draft_rows([ix], np.array([0], np.int64), np.array([2], np.int32), 0.0, np.array([0], np.int64),
                   np.array([1.0]), False, 3, MIX, 1, ix, -1.0)
    with pytest.raises(ValueError, match="shared_weight"):
        DrafterConfig(shared_weight=-0.5)
    with pytest.raises(ValueError, match="shared_min_match"):
        DrafterConfig(shared_min_match=0)
    with pytest.raises(ValueError, match="shared_max_tokens"):
        DrafterConfig(shared_max_tokens=-1)


def test_drafter_mixes_other_problems_text_and_caps_the_shared_index():
    cfg = DrafterConfig(global_shard=True, shared_weight=0.03, shared_max_tokens=40, min_token_prob=0.0)
    d = SuffixDrafter(cfg)
    fmt = [90, 91, 92, 93, 94, 95]  # a tool-call template every problem ends with
    for k in range(3):
        d.start_request(f"a{k}", f"p{k}", [k + 1, k + 2, 90, 91, 92, 93, 94, 95])
        d.finish_request(f"a{k}")
    assert d.shared_tokens <= 40 and d.stats().sequences == 3  # own histories all kept
    d.start_request("new", "cold", [50, 51, 90, 91])  # a problem never seen before
    tree = d.speculate("new", 4)
    assert tree.tokens.tolist()[:2] == fmt[2:4]
    off = SuffixDrafter(DrafterConfig(global_shard=False, min_token_prob=0.0))
    off.start_request("new", "cold", [50, 51, 90, 91])
    assert len(off.speculate("new", 4)) == 0
    # the cap removed the oldest finished sequence from the shared index only
    before = d.shared_tokens
    d.start_request("b", "p0", list(range(200, 230)))
    d.finish_request("b")
    assert d.shared_tokens <= 40 and d.shared_tokens != before
    assert d.history()["p0"]  # the problem's own history is untouched


def test_shared_index_never_runs_out_of_step_slots_nor_forces_evictions():
    # Lazy eviction (the server's): out-of-window steps are removed later, in chunks. The
    # shared index files every sequence under one step, so many step boundaries neither
    # overflow its MAX_STEPS slots nor force every problem's pending eviction at once.
    from das_sglang.core.drafter import SHARED_STEP
    from das_sglang.native import MAX_STEPS

    rng = np.random.default_rng(3)
    d = SuffixDrafter(DrafterConfig(window_steps=2))
    d.lazy_eviction = True
    for step in range(3 * MAX_STEPS):
        d.advance_step(step)
        for p in range(3):
            d.add_history(f"p{p}", step, rng.integers(0, 9, 30))
        d.start_request(f"r{step}", "p0", rng.integers(0, 9, 10))
        d.extend_request(f"r{step}", rng.integers(0, 9, 5))
        assert len(d.speculate_flat([f"r{step}"], 8).tokens) >= 0
        d.finish_request(f"r{step}")
    assert d._global.steps() == [SHARED_STEP]
    assert d._evicting  # out-of-window steps still pending: nothing forced at the boundaries
    assert d.evict_pending(None)
    assert max(s for p in d._finished.values() for s in p) - min(s for p in d._finished.values() for s in p) <= 2


def test_shared_max_depth_bounds_the_shared_index_matches():
    # A cold problem drafts only from the shared index, whose depth bounds the context
    # suffix it can match: shared_max_depth=4 matches at most 3 tokens, the default 24 all 11.
    text = list(range(100, 140))  # another problem's long answer
    for depth, match in ((4, 3), (24, 11)):
        d = SuffixDrafter(DrafterConfig(shared_max_depth=depth, min_token_prob=0.0, max_budget=16))
        d.start_request("a", "p0", [1, 2])
        d.extend_request("a", text)
        d.finish_request("a")
        d.start_request("new", "cold", [7] + list(range(100, 111)))
        tree = d.speculate("new", 8)
        assert tree.match_len == match and tree.tokens.tolist()[:2] == [111, 112]
    for bad in (1, 65):
        with pytest.raises(ValueError, match="shared_max_depth"):
            DrafterConfig(shared_max_depth=bad)
    assert DrafterConfig().shared_max_depth == 24


@pytest.mark.parametrize("path", ["inline", "started"])
def test_copies_past_the_cap_leave_the_shared_index_at_the_next_extend(path):
    # A finish past shared_max_tokens schedules the oldest copies' removal; the next batch
    # extend removes them before its appends (in the pre-draft job when started), so the
    # removal is off the finish's path. Both paths end in the same index and trees.
    def run(mode):
        d = SuffixDrafter(DrafterConfig(shared_max_tokens=60, min_token_prob=0.0))
        for k in range(3):
            d.start_request(f"a{k}", f"p{k}", list(range(100 * k, 100 * k + 30)))
            d.finish_request(f"a{k}")  # 90 tokens > 60: the oldest copy is scheduled to leave
        d.start_request("live", "p9", [1, 2, 3])
        old = d._finished["p0"][0][0]
        assert d.shared_tokens <= 60 and d._global.has_sequence(old)  # still there
        prepared = d.prepare_extend(["live"], [[4, 5]])
        if mode == "inline":
            d.apply_extend(prepared, 8)
        else:
            d.start_extend(prepared, 8)()
        assert not d._global.has_sequence(old) and not d._unshare_pending
        assert d.history()["p0"]  # the problem's own history keeps it
        return d.speculate_flat(["live"], 8)

    want, got = run("inline"), run(path)
    np.testing.assert_array_equal(want.tokens, got.tokens)
    np.testing.assert_array_equal(want.probs, got.probs)


def test_unshare_of_an_unknown_copy_is_refused_naming_it():
    from das_sglang.native import extend_draft_rows

    ix, sh = SuffixIndex(8), SuffixIndex(8)
    for x in (ix, sh):
        x.add_sequence(1, arr([5, 6]), 0)
    args = ([ix], np.array([1], np.int64), arr([7]), np.array([0, 1], np.int64), np.array([2], np.int32), 0.0,
            np.array([0], np.int64), np.array([1.0]), False, 4, MIX, 1, 0, sh, 0.03, 1)
    with pytest.raises(ValueError, match="cannot unshare seq_id=42"):
        extend_draft_rows(*args, np.array([42], np.int64))
    with pytest.raises(ValueError, match="cannot unshare seq_id=1"):  # a row of the call
        extend_draft_rows(*args, np.array([1], np.int64))
    assert ix.sequence_tokens(1).tolist() == [5, 6]  # refused before anything changed


def test_a_prompt_goes_into_the_shared_index_from_its_last_shared_depth_tokens():
    # A live request's shared-index copy starts at its prompt's last shared_index_depth
    # tokens: its cursors there, so its shared anchors, are those of the whole prompt (no
    # suffix it matches is longer); other problems do not find its question there (its
    # own index keeps it); the shared token cap counts the copy as it is.
    rng = np.random.default_rng(5)
    cfg = DrafterConfig(shared_max_depth=6, min_token_prob=0.0, max_budget=16)
    hist = [rng.integers(0, 12, 60) for _ in range(3)]  # other problems' answers
    prompt = list(range(200, 230)) + rng.integers(0, 12, 4).tolist()
    out = rng.integers(0, 12, 3)

    def make(trim: bool) -> SuffixDrafter:
        d = SuffixDrafter(cfg)
        if not trim:
            d._shared_start = lambda n: 0  # the whole prompt in the shared index
        for p, h in enumerate(hist):
            d.add_history(f"h{p}", 0, h)
        d.start_request("r", "p", prompt)
        d.extend_request("r", out)
        return d

    d, whole = make(True), make(False)
    seq = d._live["r"].seq_id
    have = d._global.sequence_tokens(seq).tolist()
    assert have == prompt[len(prompt) - cfg.shared_index_depth:] + out.tolist()
    assert whole._global.sequence_tokens(seq).tolist() == prompt + out.tolist()
    assert d.speculate("r", 16).match_len == whole.speculate("r", 16).match_len > 0
    for x in (d, whole):  # another problem quoting r's question
        x.start_request("other", "p2", list(range(200, 205)))
    assert d.speculate("other", 4).match_len == 0  # not in the shared index
    assert whole.speculate("other", 4).match_len == 5
    before = d.shared_tokens
    d.finish_request("r")
    assert d.shared_tokens - before == len(have)  # the cap counts the copy it holds


@pytest.mark.parametrize("cap", [0, 40, 150, 10_000])
def test_load_history_leaves_the_shared_index_as_one_by_one_adds_without_passing_through(cap):
    # A snapshot bigger than the shared cap: load_history keeps out of the shared index the
    # rollouts that one-by-one adds would put in and take out again, and ends in the same
    # state (after the pending removals): the same copies, counts and drafts.
    rng = np.random.default_rng(11)
    cfg = DrafterConfig(window_steps=2, shared_max_tokens=cap, min_token_prob=0.0, max_budget=8)
    hist = {f"p{p}": {s: [rng.integers(0, 7, int(rng.integers(5, 30))) for _ in range(3)]
                      for s in (0, 1, 2)} for p in range(4)}
    hist["p0"][-5] = [rng.integers(0, 7, 9)]  # out of the window: not stored at all

    def make(bulk: bool) -> SuffixDrafter:
        d = SuffixDrafter(cfg)
        d.advance_step(2)
        d.add_history("old", 2, rng_old.integers(0, 7, 20))  # already there before the load
        if bulk:
            add = d._add
            d._add = lambda pid, t, s, shared_from=0: (kept_out.append(shared_from is None), add(pid, t, s, shared_from))[1]
            assert d.load_history(hist) == 36
        else:
            for pid, by_step in hist.items():
                for s, rows in by_step.items():
                    for t in rows:
                        d.add_history(pid, s, t)
        d.start_request("r", "p1", rng_old.integers(0, 7, 6))
        d.extend_request("r", [1, 2])  # (the next extend removes what is pending)
        return d

    kept_out: list[bool] = []
    rng_old = np.random.default_rng(1)
    one = make(False)
    rng_old = np.random.default_rng(1)
    bulk = make(True)
    for attr in ("shared_tokens", "history_tokens"):
        assert getattr(one, attr) == getattr(bulk, attr)
    assert list(one._shared_len.items()) == list(bulk._shared_len.items())
    assert one._global.num_sequences == bulk._global.num_sequences
    assert one._global.num_tokens == bulk._global.num_tokens
    # the rollouts that would only pass through never went in (with a cap they overflow)
    assert any(kept_out) == (cap in (40, 150))
    a, b = one.speculate("r", 8), bulk.speculate("r", 8)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.probs, b.probs)


def test_load_history_names_a_bad_rollout():
    d = SuffixDrafter(DrafterConfig(shared_max_tokens=10))
    for bad in (5, [1.5, 2]):
        with pytest.raises(ValueError, match="invalid tokens of problem 'p'"):
            d.load_history({"p": {0: [np.arange(20), bad]}})


@pytest.mark.parametrize("shared_weight", [0.0, 0.03])
def test_one_request_draft_equals_the_batch_call_with_either_shared_index_use(shared_weight):
    """``speculate`` of one request takes its index's one-row call; with the fallback-only
    shared index (weight 0) an empty own tree is filled from the shared index as in a batch,
    with the mixed one the shared text is in the tree: the same trees as the batch path."""
    d = SuffixDrafter(DrafterConfig(global_shard=True, shared_weight=shared_weight, min_token_prob=0.0))
    d.advance_step(1)
    d.add_history("other", 0, [7, 8, 9, 10, 11])
    d.add_history("p", 0, [1, 2, 3, 4])
    d.start_request("r", "p", [5, 7, 8])  # p's own index knows nothing after 8
    one = d.speculate("r", 4)
    batch = d.speculate_batch(["r"], np.array([4]))[0]
    assert one.tokens.tolist() == batch.tokens.tolist() and one.probs.tolist() == batch.probs.tolist()
    assert one.tokens.tolist()[:2] == [9, 10]  # (the other problem's text, either way)
