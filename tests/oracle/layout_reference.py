"""Per-request reference of ``das_sglang.sglang.tree_inputs.build_layout``.

The slow, obvious implementation (one loop over every request and node) that the
vectorised production function is tested against (tests/sglang/test_layout_batch.py)
and benchmarked against (benchmarks/bench_worker_host.py --legacy).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from das_sglang.core.draft_tree import DraftTree
from das_sglang.sglang.tree_inputs import VerifyLayout


def build_layout_reference(
    roots: Sequence[int], trees: Sequence[DraftTree], seq_lens: Sequence[int], width: int
) -> VerifyLayout:
    """Per-request reference of :func:`build_layout` (the test oracle and the benchmark's
    baseline): verify inputs for ``trees[b]`` (at most ``width`` nodes) below ``roots[b]``."""
    bs, n = len(trees), width + 1
    if len(roots) != bs or len(seq_lens) != bs:
        raise ValueError(
            f"build_layout: {bs} trees but {len(roots)} roots and {len(seq_lens)} seq_lens"
        )
    tokens = np.zeros((bs, n), dtype=np.int64)
    mask = np.zeros((bs, n, n), dtype=bool)
    depth = np.zeros((bs, n), dtype=np.int64)
    next_token = np.full((bs, n), -1, dtype=np.int64)
    next_sibling = np.full((bs, n), -1, dtype=np.int64)
    idx = np.arange(n)
    mask[:, idx, idx] = True
    mask[:, :, 0] = True
    for b, tree in enumerate(trees):
        k = len(tree)
        if k > width:
            raise ValueError(f"build_layout: row {b} has {k} draft nodes > width={width}")
        tokens[b, 0] = roots[b]
        tokens[b, 1:] = roots[b]  # pad rows: any token, they are never linked
        tokens[b, 1 : k + 1] = tree.tokens
        depth[b, 1:] = 1
        parents = tree.parents.astype(np.int64) + 1  # SGLang rows: root = 0
        last_child: dict[int, int] = {}
        for i in range(1, k + 1):
            p = int(parents[i - 1])
            mask[b, i] |= mask[b, p]
            depth[b, i] = depth[b, p] + 1
            if p in last_child:
                next_sibling[b, last_child[p]] = i
            else:
                next_token[b, p] = i
            last_child[p] = i
    positions = depth + np.asarray(seq_lens, dtype=np.int64)[:, None]
    retrieve_index = np.arange(bs * n, dtype=np.int64).reshape(bs, n)
    return VerifyLayout(
        tokens.reshape(-1), mask, positions.reshape(-1), retrieve_index, next_token,
        next_sibling, n,
    )
