"""The batch-vectorised layout/mask builders equal their per-request references."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from das_sglang.sglang.tree_inputs import build_layout, custom_mask
from tests.oracle.layout_reference import build_layout_reference
from tests.sglang.test_tree_inputs import trees


def _prefix_mask_reference(layout, seq_lens):
    """The worker's former per-request GPU-form mask: [prefix ones | tree block] rows."""
    tree = torch.from_numpy(layout.mask)
    parts = [torch.cat((torch.ones(layout.n, s, dtype=torch.bool), tree[b]), dim=1).flatten()
             for b, s in enumerate(seq_lens)]
    return torch.cat(parts)


@settings(max_examples=150, deadline=None)
@given(st.lists(trees(), min_size=1, max_size=5), st.integers(0, 3),
       st.lists(st.integers(0, 40), min_size=5, max_size=5))
def test_vectorised_layout_and_mask_equal_the_references(ts, pad, lens):
    width = max(len(t) for t in ts) + pad
    roots = list(range(100, 100 + len(ts)))
    seq_lens = lens[: len(ts)]
    got = build_layout(roots, ts, seq_lens, width)
    want = build_layout_reference(roots, ts, seq_lens, width)
    for name in ("tokens", "mask", "positions", "retrieve_index", "next_token", "next_sibling"):
        assert np.array_equal(getattr(got, name), getattr(want, name)), name
    assert got.n == want.n
    assert torch.equal(custom_mask(got, seq_lens, "cuda", target="cpu"),
                       _prefix_mask_reference(want, seq_lens))
    assert torch.equal(custom_mask(got, seq_lens, "cpu"), torch.from_numpy(want.mask).flatten())


def test_empty_batch_and_width_zero():
    lay = build_layout([], [], [], 0)
    assert lay.tokens.shape == (0,) and lay.mask.shape == (0, 1, 1)
    lay = build_layout([7, 8], [trees_empty(), trees_empty()], [3, 4], 0)
    assert lay.tokens.tolist() == [7, 8] and lay.positions.tolist() == [3, 4]
    assert custom_mask(lay, [3, 4], "cuda", target="cpu").tolist() == [True] * 9


def trees_empty():
    from das_sglang.core.draft_tree import DraftTree

    return DraftTree.empty()
