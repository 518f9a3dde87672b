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
