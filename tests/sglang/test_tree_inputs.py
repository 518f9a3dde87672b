"""DraftTree -> SGLang tree-verify layout, against DraftTree's own oracles (no engine)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from das_sglang.core.draft_tree import DraftTree
from das_sglang.sglang.tree_inputs import build_layout


def walk(layout, b: int, continuation: list[int]) -> int:
    """Greedy walk over the layout's links (what SGLang's verify kernel does)."""
    n, node, accepted = layout.n, 0, 0
    tokens = layout.tokens.reshape(-1, n)[b]
    for t in continuation:
        child = layout.next_token[b, node]
        while child != -1 and tokens[child] != t:
            child = layout.next_sibling[b, child]
        if child == -1:
            break
        node, accepted = child, accepted + 1
    return accepted


@st.composite
def trees(draw, max_nodes=8):
    n = draw(st.integers(0, max_nodes))
    parents, tokens = [], []
    for i in range(n):
        p = draw(st.integers(-1, i - 1))
        siblings = {tokens[j] for j in range(i) if parents[j] == p}
        t = draw(st.integers(0, 20).filter(lambda x: x not in siblings))
        parents.append(p)
        tokens.append(t)
    return DraftTree(np.array(tokens, np.int32), np.array(parents, np.int32),
                     np.linspace(1, 0.1, n) if n else np.zeros(0))


class TestWorkedExample:
    def test_module_docstring_example(self):
        tree = DraftTree(np.array([10, 11], np.int32), np.array([-1, 0], np.int32),
                         np.array([.6, .5]))
        lay = build_layout([5], [tree], [100], width=3)
        assert lay.tokens.tolist() == [5, 10, 11, 5]
        assert lay.positions.tolist() == [100, 101, 102, 101]
        assert lay.next_token.tolist() == [[1, 2, -1, -1]]
        assert lay.next_sibling.tolist() == [[-1, -1, -1, -1]]
        assert lay.mask[0, 3].tolist() == [True, False, False, True]

    def test_too_many_nodes_is_rejected_naming_the_row(self):
        with pytest.raises(ValueError, match="row 0 has 2 draft nodes > width=1"):
            build_layout([1], [DraftTree.chain([2, 3])], [4], width=1)


class TestAgainstDraftTree:
    @settings(max_examples=150, deadline=None)
    @given(st.lists(trees(), min_size=1, max_size=4),
           st.lists(st.integers(0, 20), min_size=0, max_size=10))
    def test_walk_accepts_what_the_tree_oracle_accepts(self, ts, continuation):
        width = max(len(t) for t in ts)
        lay = build_layout([0] * len(ts), ts, [7] * len(ts), width)
        for b, t in enumerate(ts):
            assert walk(lay, b, continuation) == t.accept_length(continuation)

    @settings(max_examples=100, deadline=None)
    @given(trees(), st.integers(0, 3))
    def test_mask_and_positions_follow_ancestry_and_padding_is_unreachable(self, t, pad):
        width = len(t) + pad
        lay = build_layout([9], [t], [50], width)
        k = len(t)
        assert np.array_equal(lay.mask[0, 1:k + 1, 1:k + 1], t.ancestor_mask())
        assert lay.mask[0, :, 0].all()
        assert lay.positions[1:k + 1].tolist() == (50 + t.depths()).tolist()
        linked = set(lay.next_token[0].tolist()) | set(lay.next_sibling[0].tolist())
        assert not linked & set(range(k + 1, width + 1))  # pad rows never reachable
