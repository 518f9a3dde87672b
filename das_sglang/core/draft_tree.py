"""The one draft-tree encoding used everywhere in das-sglang.

A draft is a tree of proposed tokens hanging below the *root*, which is the last token the
target model already produced (the root itself is not part of the tree). Nodes are stored
flat in best-first order:

- ``tokens[i]``  proposed token id of node ``i``;
- ``parents[i]`` index of node ``i``'s parent, ``-1`` when the parent is the root, and
  always ``parents[i] < i`` (a parent precedes its children);
- ``probs[i]``   estimated probability that node ``i`` is accepted, i.e. the product of the
  conditional continuation frequencies along its path (non-increasing along every path).

Because nodes are emitted best-first, the first ``k`` nodes of a tree are themselves a
valid tree (every parent precedes its child) and the best ``k``-node subtree under the
drafter's estimates; ``truncate(k)`` is therefore just a slice. A chain is the tree whose
``parents`` are ``[-1, 0, 1, ...]``. Conversions to SGLang's retrieve-index form live only
in ``das_sglang.sglang``.

Worked example: root "the", drafts "cat sat" (p .6, .5) and "dog" (p .3)::

    tokens  = [cat, sat, dog]
    parents = [ -1,   0,  -1]
    probs   = [ .6,  .5,  .3]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

_EMPTY_I = np.zeros(0, dtype=np.int32)
_EMPTY_F = np.zeros(0, dtype=np.float64)


@dataclass(frozen=True)
class DraftTree:
    tokens: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    parents: np.ndarray = field(default_factory=lambda: _EMPTY_I)
    probs: np.ndarray = field(default_factory=lambda: _EMPTY_F)
    match_len: int = 0  # length of the context suffix the draft was found under

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if len(self.parents) != n or len(self.probs) != n:
            raise ValueError(
                f"DraftTree arrays differ in length: tokens={n}, parents={len(self.parents)}, "
                f"probs={len(self.probs)}"
            )
        for i, p in enumerate(self.parents.tolist()):
            if not -1 <= p < i:
                raise ValueError(f"DraftTree parents[{i}]={p}: must satisfy -1 <= parent < {i}")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def score(self) -> float:
        """Expected number of accepted draft tokens (bonus token not included)."""
        return float(self.probs.sum())

    @classmethod
    def empty(cls) -> "DraftTree":
        return cls()

    @classmethod
    def chain(cls, tokens: Sequence[int], probs: Sequence[float] | None = None) -> "DraftTree":
        n = len(tokens)
        return cls(
            tokens=np.asarray(tokens, dtype=np.int32),
            parents=np.arange(-1, n - 1, dtype=np.int32),
            probs=np.ones(n) if probs is None else np.asarray(probs, dtype=np.float64),
        )

    def truncate(self, k: int) -> "DraftTree":
        """The first ``k`` nodes: the best k-node subtree (see module docstring)."""
        if k >= len(self):
            return self
        k = max(k, 0)
        return DraftTree(self.tokens[:k], self.parents[:k], self.probs[:k], self.match_len)

    def depths(self) -> np.ndarray:
        """Depth of each node; children of the root have depth 1."""
        d = np.zeros(len(self), dtype=np.int32)
        for i, p in enumerate(self.parents.tolist()):
            d[i] = 1 if p < 0 else d[p] + 1
        return d

    def ancestor_mask(self) -> np.ndarray:
        """``mask[i, j]`` is True iff node ``j`` is node ``i`` or one of its ancestors."""
        n = len(self)
        mask = np.zeros((n, n), dtype=bool)
        for i, p in enumerate(self.parents.tolist()):
            if p >= 0:
                mask[i] = mask[p]
            mask[i, i] = True
        return mask

    def accept_length(self, continuation: Sequence[int]) -> int:
        """Longest root path whose tokens equal ``continuation``'s prefix.

        This is exactly what greedy verification accepts when the target model's true
        continuation is ``continuation`` (bonus token not included).
        """
        children: dict[int, dict[int, int]] = {}
        for i, (p, t) in enumerate(zip(self.parents.tolist(), self.tokens.tolist())):
            children.setdefault(p, {}).setdefault(t, i)
        node, n = -1, 0
        for t in continuation:
            nxt = children.get(node, {}).get(int(t))
            if nxt is None:
                break
            node, n = nxt, n + 1
        return n
