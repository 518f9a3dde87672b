"""Wide (mixture) draft trees: several match lengths merged (docs/design.md "Wide tree").
The random differential runs against the oracle live in test_native_differential.py."""

from __future__ import annotations

import numpy as np
import pytest

from das_sglang.core.config import DrafterConfig
from das_sglang.core.drafter import SuffixDrafter
from das_sglang.native import SuffixIndex
from oracle.reference_index import ReferenceIndex

MIX = (2.0, 0.0, 1, 64)


def arr(tokens) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32)


def both(seqs, ctx, budget, mix, depth=8):
    ix, ref = SuffixIndex(depth), ReferenceIndex(depth)
    for k, s in enumerate(seqs):
        ix.add_sequence(k, arr(s), 0)
        ref.add_sequence(k, list(s), 0)
    n = ix.draft(arr(ctx), budget, 0.0, {0: 1.0}, False, 7, mix)
    r = ref.draft(list(ctx), budget, 0.0, {0: 1.0}, False, 7, mix)
    assert n[0].tolist() == r[0] and n[1].tolist() == r[1] and n[3] == r[3]
    np.testing.assert_allclose(n[2], r[2], rtol=0, atol=1e-12)
    return n


def test_shorter_match_adds_a_root_alternative():
    # "5 1 2" continues with 3 once; "2" alone continues with 3 once and with 9 twice.
    seqs = [[5, 1, 2, 3, 4], [7, 2, 9, 8], [6, 2, 9, 8]]
    tokens, parents, probs, m = both(seqs, [5, 1, 2], 4, None)
    assert m == 3 and parents.tolist().count(-1) == 1 and tokens[0] == 3
    tokens, parents, probs, m = both(seqs, [5, 1, 2], 4, MIX)
    assert m == 3
    roots = {int(t): float(p) for t, p, q in zip(tokens, probs, parents) if q == -1}
    assert set(roots) == {3, 9}
    # lambda: m=3 -> 9, m=2 ("1 2": same occurrences, merged) -> 4, m=1 -> 1; total 14.
    # P(3) = 13/14 * 1 + 1/14 * 1/3, P(9) = 1/14 * 2/3.
    assert roots[3] == pytest.approx(13 / 14 + 1 / 42)
    assert roots[9] == pytest.approx(2 / 42)
    assert probs[0] >= probs[1] >= probs[-1]  # best first


def test_probs_are_path_probabilities_non_increasing_along_paths():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 4, 60).tolist() for _ in range(5)]
    tokens, parents, probs, _ = both(seqs, seqs[0][:20], 16, (4.0, 0.5, 1, 64))
    assert len(tokens) == 16
    for i, p in enumerate(parents.tolist()):
        assert 0.0 < probs[i] <= 1.0
        if p >= 0:
            assert probs[i] <= probs[p] + 1e-15


def test_escape_lowers_estimates_and_fanout_limit_stops_short_matches():
    seqs = [[5, 1, 2, 3, 4], [7, 2, 9, 8], [6, 2, 9, 8]]
    plain = both(seqs, [5, 1, 2], 4, MIX)
    esc = both(seqs, [5, 1, 2], 4, (2.0, 1.0, 1, 64))
    assert esc[2][0] < plain[2][0]
    # "2" has 2 continuations: max_fanout=1 keeps only the long anchors -> no 9.
    narrow = both(seqs, [5, 1, 2], 4, (2.0, 0.0, 1, 1))
    assert 9 not in narrow[0][narrow[1] == -1].tolist()


def test_bad_mix_is_rejected_naming_it():
    ix = SuffixIndex(8)
    ix.add_sequence(0, arr([1, 2, 3]), 0)
    with pytest.raises(ValueError, match="mix"):
        ix.draft(arr([1]), 2, 0.0, {0: 1.0}, False, 3, (1.0, -1.0, 1, 4))
    with pytest.raises(ValueError, match="mix"):
        ix.draft(arr([1]), 2, 0.0, {0: 1.0}, False, 3, (1.0, 0.0))
    with pytest.raises(ValueError, match="mix_escape"):
        DrafterConfig(mix_escape=-1.0)


def test_drafter_uses_the_wide_tree_by_default_and_can_turn_it_off():
    def drafter(**kw):
        d = SuffixDrafter(DrafterConfig(window_steps=1, min_token_prob=0.0, **kw))
        d.advance_step(0)
        d.add_history("p", 0, [5, 1, 2, 3, 4])
        d.add_history("p", 0, [7, 2, 9, 8])
        d.add_history("p", 0, [6, 2, 9, 8])
        d.start_request("r", "p", [5, 1, 2])
        return d.speculate("r", budget=4)

    wide, narrow = drafter(), drafter(mixture=False)
    assert set(wide.tokens[wide.parents == -1].tolist()) == {3, 9}
    assert narrow.tokens[narrow.parents == -1].tolist() == [3]


def test_recency_puts_the_newest_of_equal_continuations_first():
    # "1 2" continues with 3 (sequence 0) and with 4 (sequence 1, added later): equal counts.
    seqs = [[1, 2, 3], [1, 2, 4]]
    plain = both(seqs, [1, 2], 1, (2.0, 0.0, 1, 64, 0.0, 0.0))
    recent = both(seqs, [1, 2], 2, (2.0, 0.0, 1, 64, 1.0, 0.0))
    assert plain[0].tolist() == [3]  # tie: the smaller token
    assert recent[0].tolist() == [4, 3]
    # newest gets W + 1.0 * C over C + 1.0 * C: (1 + 2) / 4 at every anchor
    assert recent[2][0] == pytest.approx(3 / 4) and recent[2][1] == pytest.approx(1 / 4)
    # Own text counts as it is appended: sequence 0 repeating "1 2 3" makes 3 the newest again.
    ix, ref = SuffixIndex(8), ReferenceIndex(8)
    for k, s in enumerate(seqs):
        ix.add_sequence(k, arr(s), 0)
        ref.add_sequence(k, list(s), 0)
    ix.extend(0, arr([1, 2, 3, 1, 2]))
    ref.extend(0, [1, 2, 3, 1, 2])
    mix = (2.0, 0.0, 1, 64, 1.0, 0.0)
    n = ix.draft_for_sequence(0, 1, 0.0, {0: 1.0}, False, 2, mix)
    assert n[0].tolist() == [3] == ref.draft_for_sequence(0, 1, 0.0, {0: 1.0}, False, 2, mix)[0]


def test_match_half_drafts_wider_under_a_short_match_with_the_same_probs():
    # "1" continues with 2 (then 3 4 5, certain) twice and with 7 once.
    seqs = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 7]]
    by_prob = both(seqs, [9, 1], 3, (0.0, 0.0, 1, 64, 0.0, 0.0))
    by_score = both(seqs, [9, 1], 3, (0.0, 0.0, 1, 64, 0.0, 4.0))
    assert by_prob[0].tolist() == [2, 3, 4]  # best first by prob: the certain path
    # score: 2 -> 2/3 * 1/5, 7 -> 1/3 * 1/5, 3 -> 2/15 * 2/6 < 1/15: the alternative root first
    assert by_score[0].tolist() == [2, 7, 3] and by_score[1].tolist() == [-1, -1, 0]
    probs = dict(zip(by_score[0].tolist(), by_score[2].tolist()))
    assert probs == pytest.approx({2: 2 / 3, 7: 1 / 3, 3: 2 / 3})
    # Under a long match the same setting keeps the deep path: "1 2 3" has one continuation.
    long = both(seqs, [1, 2, 3], 2, (0.0, 0.0, 1, 64, 0.0, 4.0))
    assert long[0].tolist() == [4, 5] and long[1].tolist() == [-1, 0]


def test_recency_and_order_agree_with_the_oracle_on_live_siblings():
    # Siblings appended chunk by chunk (as in decoding), no removals: recency is exact.
    rng = np.random.default_rng(5)
    ix, ref = SuffixIndex(8), ReferenceIndex(8)
    for k in range(3):  # history
        s = rng.integers(0, 5, 40).tolist()
        ix.add_sequence(k, arr(s), 0)
        ref.add_sequence(k, s, 0)
    for k in range(3, 7):  # live siblings: a shared prompt
        ix.add_sequence(k, arr([1, 2, 3]), 1)
        ref.add_sequence(k, [1, 2, 3], 1)
    changed = 0
    weights = {0: 0.5, 1: 1.0}
    for _ in range(60):
        k = int(rng.integers(3, 7))
        chunk = rng.integers(0, 5, int(rng.integers(1, 4))).tolist()
        ix.extend(k, arr(chunk))
        ref.extend(k, chunk)
        for mix in ((4.0, 0.5, 1, 64, 0.0, 4.0), (4.0, 0.5, 1, 64, 1.0, 4.0), (2.0, 0.0, 1, 3, 0.25, 1.0)):
            n = ix.draft_for_sequence(k, 8, 0.0, weights, False, 6, mix)
            r = ref.draft_for_sequence(k, 8, 0.0, weights, False, 6, mix)
            assert n[0].tolist() == r[0] and n[1].tolist() == r[1] and n[3] == r[3]
            np.testing.assert_allclose(n[2], r[2], rtol=0, atol=1e-9)
        a = ix.draft_for_sequence(k, 8, 0.0, weights, False, 6, (4.0, 0.5, 1, 64, 0.0, 4.0))
        b = ix.draft_for_sequence(k, 8, 0.0, weights, False, 6, (4.0, 0.5, 1, 64, 1.0, 4.0))
        changed += a[0].tolist() != b[0].tolist()
    assert changed > 0  # recency did reorder some drafts


def test_bad_recency_or_match_half_is_rejected_naming_it():
    ix = SuffixIndex(8)
    ix.add_sequence(0, arr([1, 2, 3]), 0)
    with pytest.raises(ValueError, match="recency"):
        ix.draft(arr([1]), 2, 0.0, {0: 1.0}, False, 3, (1.0, 0.0, 1, 4, -1.0, 0.0))
    with pytest.raises(ValueError, match="match_half"):
        ix.draft(arr([1]), 2, 0.0, {0: 1.0}, False, 3, (1.0, 0.0, 1, 4, 0.0, -2.0))
    with pytest.raises(ValueError, match="mix_recency"):
        DrafterConfig(mix_recency=-0.1)
    with pytest.raises(ValueError, match="mix_match_half"):
        DrafterConfig(mix_match_half=-1.0)


def test_min_ratio_drops_anchors_far_shorter_than_the_match():
    # "5 1 2" matches 3 tokens: the anchors are m = 3 and 2 (merged: "5 1 2" and "1 2" have
    # the same continuations) and m = 1 ("2": 3 once, 9 twice), which alone knows 9.
    seqs = [[5, 1, 2, 3, 4], [7, 2, 9, 8], [6, 2, 9, 8]]

    def roots(draft):
        return {int(t): float(p) for t, p, q in zip(draft[0], draft[2], draft[1]) if q == -1}

    full = both(seqs, [5, 1, 2], 4, (*MIX, 0.0, 0.0, 0.0))
    assert set(roots(full)) == {3, 9}
    # ceil(0.5 * 3) = 2: the 1-token anchor is not taken, so 9 is unknown and 3 is certain
    cut = both(seqs, [5, 1, 2], 4, (*MIX, 0.0, 0.0, 0.5))
    assert roots(cut) == {3: 1.0}
    # ceil(0.3 * 3) = 1: every anchor stays, the same tree as without the ratio
    kept = both(seqs, [5, 1, 2], 4, (*MIX, 0.0, 0.0, 0.3))
    for x, y in zip(kept[:3], full[:3]):
        np.testing.assert_array_equal(x, y)
    # the drafter passes DrafterConfig.mix_min_ratio to the native draft
    def drafter(ratio):
        d = SuffixDrafter(DrafterConfig(window_steps=1, min_token_prob=0.0, mix_min_ratio=ratio))
        d.advance_step(0)
        for s in seqs:
            d.add_history("p", 0, s)
        d.start_request("r", "p", [5, 1, 2])
        return d.speculate("r", budget=4)

    wide, cut = drafter(0.0), drafter(0.5)
    assert 9 in wide.tokens[wide.parents == -1].tolist()
    assert cut.tokens[cut.parents == -1].tolist() == [3]


def test_bad_min_ratio_is_rejected_naming_it():
    ix = SuffixIndex(8)
    ix.add_sequence(0, arr([1, 2, 3]), 0)
    with pytest.raises(ValueError, match="min_ratio"):
        ix.draft(arr([1]), 2, 0.0, {0: 1.0}, False, 3, (*MIX, 0.0, 0.0, 1.0))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="mix_min_ratio"):
            DrafterConfig(mix_min_ratio=bad)


SKIP = (2.0, 0.0, 1, 64, 0.0, 0.0, 0.0, True)  # skip_unseen on


def test_unseen_last_token_drafts_what_followed_its_context_with_another_token_there():
    # "= 24 ." / "= 15 ." / "= 15 x": after "= 99" (99 never seen) the context without 99
    # ("=") went on with 24 (once) and 15 (twice): anchors after them, raw 1 and 2.
    seqs = [[3, 7, 24, 8], [4, 7, 15, 8], [5, 7, 15, 6]]
    tokens, parents, probs, m = both(seqs, [2, 7, 99], 4, SKIP)
    assert m == 0  # no match of the context itself
    roots = {int(t): float(p) for t, p, q in zip(tokens, probs, parents) if q == -1}
    # P(8) = 1/3 * 1 + 2/3 * 1/2, P(6) = 2/3 * 1/2
    assert roots == pytest.approx({8: 2 / 3, 6: 1 / 3})
    # off: nothing, as before
    assert both(seqs, [2, 7, 99], 4, SKIP[:7])[0].tolist() == []
    assert both(seqs, [2, 7, 99], 4, (*SKIP[:7], False))[0].tolist() == []
    # a context with a match drafts as without the flag
    with_match = both(seqs, [2, 7, 15], 4, SKIP)
    assert with_match[0].tolist() == both(seqs, [2, 7, 15], 4, SKIP[:7])[0].tolist() and with_match[3] == 2


def test_unseen_last_token_takes_the_longest_context_also_for_a_stored_sequence():
    # "1 2 ?" went on with 5 after 9, "2 ?" also with 6 after 8: the longest suffix of the
    # context without x ("1 2") wins. Stored as a sequence of the index (the drafter's
    # rows), the context's own "1 2 3" (x then its end) is no anchor: the same tree.
    seqs = [[1, 2, 9, 5, 5], [0, 2, 8, 6, 6]]
    tokens, parents, probs, m = both(seqs, [1, 2, 3], 3, SKIP)
    assert tokens.tolist() == [5, 5] and m == 0
    ix, ref = SuffixIndex(8), ReferenceIndex(8)
    for k, seq in enumerate(seqs + [[7, 1, 2, 3]]):
        ix.add_sequence(k, arr(seq), 0)
        ref.add_sequence(k, seq, 0)
    n = ix.draft_for_sequence(2, 3, 0.0, {0: 1.0}, False, 7, SKIP)
    r = ref.draft_for_sequence(2, 3, 0.0, {0: 1.0}, False, 7, SKIP)
    assert n[0].tolist() == r[0] == [5, 5] and n[3] == r[3] == 0
    # nothing went on after any suffix of the context without x: nothing drafted
    assert both([[2, 3]], [1, 2, 4], 3, SKIP)[0].tolist() == []


def unseen_last_token_draft(other_problem=None, **config):
    """A drafter's tree for a request whose last token (99) its problem's history never
    had ("7" went on with 24 there); ``other_problem``: another problem's history."""
    d = SuffixDrafter(DrafterConfig(window_steps=1, min_token_prob=0.0, **config))
    d.advance_step(0)
    d.add_history("p", 0, [3, 7, 24, 8, 1])
    if other_problem is not None:
        d.add_history("q", 0, other_problem)
    d.start_request("r", "p", [5, 7, 99])
    return d.speculate("r", budget=4)


def test_drafter_skips_an_unseen_token_by_default_and_the_flag_turns_it_off():
    on, off = unseen_last_token_draft(), unseen_last_token_draft(skip_unseen=False)
    assert on.tokens.tolist()[:2] == [8, 1] and on.match_len == 0
    assert len(off) == 0


def test_fallback_only_shared_index_still_fills_a_row_with_no_own_match():
    # shared_weight 0: the shared index drafts only rows whose own tree is empty; an unseen
    # last token in the own index must leave the row to it (another problem's text went on
    # after 99), not to the own index's stand-in tree.
    q = [99, 40, 41]
    fallback = unseen_last_token_draft(q, shared_weight=0.0)
    assert fallback.tokens.tolist()[:2] == [40, 41]
    mixed = unseen_last_token_draft(q)  # mixed in: the shared index's match is a match, no stand-in either
    assert mixed.tokens.tolist()[:2] == [40, 41] and mixed.match_len == 1
    alone = unseen_last_token_draft(q, global_shard=False)  # no shared index: the stand-in
    assert alone.tokens.tolist()[:2] == [8, 1] and alone.match_len == 0


def test_stand_in_probs_are_scaled_and_cut_after_scaling():
    seqs = [[3, 7, 24, 8], [4, 7, 15, 8], [5, 7, 15, 6]]
    half = (*SKIP[:7], 0.5)
    tokens, parents, probs, m = both(seqs, [2, 7, 99], 4, half)
    assert dict(zip(tokens.tolist(), probs.tolist())) == pytest.approx({8: 1 / 3, 6: 1 / 6})
    # min_prob reads the scaled probs: 0.2 keeps 8 (1/3), drops 6 (1/6; 1/3 unscaled)
    ix = SuffixIndex(8)
    for k, s in enumerate(seqs):
        ix.add_sequence(k, arr(s), 0)
    assert ix.draft(arr([2, 7, 99]), 4, 0.2, {0: 1.0}, False, 7, half)[0].tolist() == [8]
    for bad in (-0.5, 1.5):
        with pytest.raises(ValueError, match="skip_unseen"):
            ix.draft(arr([2, 7, 99]), 4, 0.0, {0: 1.0}, False, 7, (*SKIP[:7], bad))
    with pytest.raises(ValueError, match="skip_discount"):
        DrafterConfig(skip_discount=0.0)
    # the drafter scales by DrafterConfig.skip_discount
    full, half = unseen_last_token_draft(skip_discount=1.0), unseen_last_token_draft(skip_discount=0.5)
    assert half.tokens.tolist() == full.tokens.tolist() == [8, 1]
    np.testing.assert_allclose(half.probs, 0.5 * full.probs, rtol=1e-6)
