"""DraftTree -> SGLang tree-verify inputs (host side, numpy).

SGLang verifies ``n = width + 1`` tokens per request: row 0 is the *root* (the last
token the target produced, whose KV is not computed yet) and rows ``1..width`` are draft
nodes. A request whose tree has fewer than ``width`` nodes is padded with nodes that
see only the root and themselves and are *not linked* into the retrieve lists, so the
verify walk can never accept them (SGLang's mask-to-links reconstruction would link
them; that is why the links are built here, from the parents).

Worked example, width 3, root r, tree ``cat(-1) sat(0)`` (one pad row)::

    tokens      [r, cat, sat, pad]     positions   L + [0, 1, 2, 1]
    next_token  [1,   2,  -1,  -1]     next_sibling  [-1, -1, -1, -1]
    mask row 2 (sat): root, cat, sat   mask row 3 (pad): root, pad
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from das_sglang.core.draft_tree import DraftTree


@dataclass(frozen=True)
class VerifyLayout:
    """Tree-verify inputs for a batch; ``n = width + 1`` rows per request."""

    tokens: np.ndarray  # int64 [bs * n]
    mask: np.ndarray  # bool [bs, n, n]: mask[b, i, j] = j is i or an ancestor of i
    positions: np.ndarray  # int64 [bs * n]
    retrieve_index: np.ndarray  # int64 [bs, n]: flat row of (b, i)
    next_token: np.ndarray  # int64 [bs, n]: first child, -1 = none
    next_sibling: np.ndarray  # int64 [bs, n]: next sibling, -1 = none
    n: int


def build_layout(
    roots: Sequence[int], trees: Sequence[DraftTree], seq_lens: Sequence[int], width: int
) -> VerifyLayout:
    """Verify inputs for one batch: ``trees[b]`` (at most ``width`` nodes) below ``roots[b]``."""
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


def accepted_tokens(layout: VerifyLayout, row: int, accept_index: Sequence[int]) -> list[int]:
    """Draft tokens on the accepted path of ``row`` (root and bonus excluded).

    ``accept_index`` holds flat rows: the root first, then one per accepted node.
    """
    flat = layout.tokens
    return [int(flat[i]) for i in accept_index[1:] if i >= 0]
