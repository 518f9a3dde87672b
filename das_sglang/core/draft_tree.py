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
        return self.accept_path(continuation)[0]

    def accept_path(self, continuation: Sequence[int]) -> tuple[int, int]:
        """:meth:`accept_length` and the index of the last accepted node (-1: none)."""
        children: dict[int, dict[int, int]] = {}
        for i, (p, t) in enumerate(zip(self.parents.tolist(), self.tokens.tolist())):
            children.setdefault(p, {}).setdefault(t, i)
        node, n = -1, 0
        for t in continuation:
            nxt = children.get(node, {}).get(int(t))
            if nxt is None:
                break
            node, n = nxt, n + 1
        return n, node


class DraftBatch:
    """The draft trees of a decode batch, flat (what the native drafter returns): row
    ``r``'s tree is nodes ``offsets[r]:offsets[r + 1]`` of ``tokens``, ``parents`` (row-local
    indices, as in :class:`DraftTree`), ``probs`` and ``depths`` (root children: 1), found
    under a context suffix of ``match_len[r]`` tokens.

    A sequence of :class:`DraftTree` (``batch[r]``, ``len(batch)``, iteration), so code
    written for a list of trees takes it; the per-step host path reads the flat arrays
    instead (one numpy operation per batch, not one Python call per row).
    """

    __slots__ = ("tokens", "parents", "probs", "depths", "offsets", "match_len", "_lens", "_width", "probs_ok")

    def __init__(self, tokens, parents, probs, depths, offsets, match_len, probs_ok: bool | None = None) -> None:
        self.tokens = tokens
        self.parents = parents
        self.probs = probs
        self.depths = depths
        self.offsets = offsets  # int64 [rows + 1]
        self.match_len = match_len  # int [rows]
        self._lens = self._width = None
        # whether every node probability is in [0, 1], where whoever made the arrays checked
        # (the native pre-draft job: its trees are checked there); None: not known yet
        self.probs_ok = probs_ok

    def probs_in_range(self) -> bool:
        """Every node probability is in [0, 1] (a NaN is not)."""
        if self.probs_ok is None:
            p = self.probs
            self.probs_ok = bool(not p.size or (p.min() >= 0.0 and p.max() <= 1.0))
        return self.probs_ok

    @classmethod
    def from_trees(cls, trees: Sequence[DraftTree]) -> "DraftBatch":
        """The flat form of a list of trees (validated trees: depths from their parents)."""
        lens = np.fromiter((len(t) for t in trees), np.int64, len(trees))
        offsets = np.zeros(len(trees) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])

        def cat(arrays, dtype):
            return np.concatenate(arrays).astype(dtype, copy=False) if len(arrays) else np.zeros(0, dtype)

        return cls(cat([t.tokens for t in trees], np.int32), cat([t.parents for t in trees], np.int32),
                   cat([t.probs for t in trees], np.float64),
                   cat([t.depths() for t in trees], np.int32), offsets,
                   np.fromiter((t.match_len for t in trees), np.int32, len(trees)))

    @classmethod
    def selected(cls, out: tuple, probs_ok: bool | None = None) -> "DraftBatch":
        """A batch from a native row selection's result (``draft_select``, the plan made
        ahead's cut: the six arrays, then the rows' node counts and the widest, kept)."""
        tokens, parents, probs, depths, offsets, match, lens, width = out
        batch = cls(tokens, parents, probs, depths, offsets, match, probs_ok)
        batch._lens, batch._width = lens, width
        return batch

    @classmethod
    def empty(cls, rows: int) -> "DraftBatch":
        """``rows`` rows without nodes."""
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float64),
                   np.zeros(0, np.int32), np.zeros(rows + 1, np.int64), np.zeros(rows, np.int32))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def same_trees(self, other: "DraftBatch") -> bool:
        """Whether ``other`` holds the same rows, nodes and node values."""
        return len(self) == len(other) and all(
            np.array_equal(a, b) for a, b in (
                (self.offsets, other.offsets), (self.tokens, other.tokens), (self.parents, other.parents),
                (self.depths, other.depths), (self.probs, other.probs), (self.match_len, other.match_len)))

    def lens(self) -> np.ndarray:
        """Nodes per row (int64)."""
        if self._lens is None:
            o = self.offsets
            self._lens = o[1:] - o[:-1]  # (np.diff's values, without its Python)
        return self._lens

    @property
    def width(self) -> int:
        """The widest row's node count."""
        if self._width is None:
            self._width = int(self.lens().max(initial=0))
        return self._width

    def __getitem__(self, r: int) -> DraftTree:
        if not -len(self) <= r < len(self):
            raise IndexError(f"DraftBatch row {r} out of range for {len(self)} rows")
        r %= len(self)
        a, z = int(self.offsets[r]), int(self.offsets[r + 1])
        # Trusted: native output and prefixes of it keep -1 <= parent < index.
        tree = object.__new__(DraftTree)
        tree.__dict__.update(tokens=self.tokens[a:z], parents=self.parents[a:z],
                             probs=self.probs[a:z], match_len=int(self.match_len[r]))
        return tree

    def __iter__(self):
        return (self[r] for r in range(len(self)))

    def trees(self) -> list[DraftTree]:
        return list(self)

    def _select(self, keep: np.ndarray, offsets: np.ndarray, match_len) -> "DraftBatch":
        return DraftBatch(self.tokens[keep], self.parents[keep], self.probs[keep], self.depths[keep],
                          offsets, match_len)

    # take / take_rows / truncate of the standard dtypes (what the native drafter returns)
    # in one native pass (``native.draft_select``, ~10 numpy operations each otherwise);
    # False: numpy, the reference they are tested against (tests/test_host_path_flat.py).
    NATIVE = True

    def _native_ok(self) -> bool:
        m = self.match_len
        return (DraftBatch.NATIVE and type(m) is np.ndarray and m.dtype == np.int32
                and self.tokens.dtype == np.int32 and self.parents.dtype == np.int32
                and self.depths.dtype == np.int32 and self.probs.dtype == np.float64
                and self.offsets.dtype == np.int64)

    def _native_select(self, rows, keep) -> "DraftBatch | None":
        from das_sglang.native import draft_select

        out = draft_select(np.ascontiguousarray(self.offsets), rows, keep, np.ascontiguousarray(self.tokens),
                           np.ascontiguousarray(self.parents), np.ascontiguousarray(self.probs),
                           np.ascontiguousarray(self.depths), np.ascontiguousarray(self.match_len))
        if not out:
            return None
        return DraftBatch.selected(out)

    def truncate(self, budgets) -> "DraftBatch":
        """Row ``r`` cut to its first ``budgets[r]`` nodes (``DraftTree.truncate`` per row,
        in one pass): the best ``k``-node subtrees."""
        if self._native_ok():
            keep = np.ascontiguousarray(budgets, dtype=np.int64)
            if keep.shape != (len(self),):  # (numpy's broadcasting, as the reference path)
                keep = np.ascontiguousarray(np.broadcast_to(keep, (len(self),)))
            out = self._native_select(None, keep)
            return self if out is None else out
        lens = self.lens()
        new = np.minimum(lens, np.maximum(np.asarray(budgets, dtype=np.int64), 0))
        if np.array_equal(new, lens):
            return self
        offsets = np.zeros(len(new) + 1, np.int64)
        np.cumsum(new, out=offsets[1:])
        rank = np.arange(len(self.tokens), dtype=np.int64) - np.repeat(self.offsets[:-1], lens)
        return self._select(rank < np.repeat(new, lens), offsets, self.match_len)

    def spread(self, rows: np.ndarray, n: int) -> "DraftBatch":
        """An ``n``-row batch whose rows ``rows`` (increasing) are this batch's rows, in
        order, and every other row is empty (no nodes, match length 0): ``concat([self,
        empty(1)]).take(...)`` without copying a node -- the node arrays are this batch's."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) != len(self):
            raise ValueError(f"spread: {len(rows)} target rows for a batch of {len(self)}")
        if len(rows) and (rows[0] < 0 or rows[-1] >= n or (np.diff(rows) <= 0).any()):
            raise ValueError(f"spread: target rows must increase within [0, {n})")
        lens = np.zeros(n, np.int64)
        lens[rows] = self.lens()
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        match = np.zeros(n, np.asarray(self.match_len).dtype)
        match[rows] = self.match_len
        return DraftBatch(self.tokens, self.parents, self.probs, self.depths, offsets, match)

    def take(self, rows) -> "DraftBatch":
        """The rows ``rows`` (any order, repeats allowed) as a new batch."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._native_ok() and rows.ndim == 1 and (not len(rows) or rows.min() >= 0):
            return self._native_select(np.ascontiguousarray(rows), None)
        return self._gather(rows)

    def _gather(self, rows: np.ndarray, hole: np.ndarray | None = None) -> "DraftBatch":
        """The numpy gather of :meth:`take` (and of :meth:`take_rows`: rows where ``hole``
        are emptied, match length 0)."""
        lens = self.lens()[rows]
        if hole is not None:
            lens = np.where(hole, 0, lens)
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        src = np.arange(int(offsets[-1]), dtype=np.int64) + np.repeat(self.offsets[:-1][rows] - offsets[:-1], lens)
        match = np.asarray(self.match_len)[rows]
        if hole is not None:
            match = np.where(hole, 0, match).astype(match.dtype, copy=False)
        return self._select(src, offsets, match)

    def take_rows(self, rows) -> "DraftBatch":
        """:meth:`take` where a row ``-1`` is an empty row (no nodes, match length 0):
        a plan's placeholders (deferred starts) in the same gather, without the
        ``take`` + ``spread`` pair of passes."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._native_ok() and rows.ndim == 1 and (not len(rows) or rows.min() >= -1):
            return self._native_select(np.ascontiguousarray(rows), None)
        hole = rows < 0
        if not hole.any():
            return self.take(rows)
        if not len(self):
            return DraftBatch.empty(len(rows))
        return self._gather(np.where(hole, 0, rows), hole)

    @staticmethod
    def concat(batches: Sequence["DraftBatch"]) -> "DraftBatch":
        """The rows of every batch, in order."""
        offsets = [np.zeros(1, np.int64)]
        base = 0
        for b in batches:
            offsets.append(b.offsets[1:] + base)
            base += int(b.offsets[-1])
        return DraftBatch(*(np.concatenate([getattr(b, f) for b in batches])
                            for f in ("tokens", "parents", "probs", "depths")),
                          np.concatenate(offsets), np.concatenate([np.asarray(b.match_len) for b in batches]))


_ARRAYS = frozenset(("tokens", "parents", "probs", "depths", "offsets", "match_len", "_lens", "_width"))


class RowsOf(DraftBatch):
    """``src.take_rows(rows)``, made when first read (an array, ``lens``, a row: any
    :class:`DraftBatch` use). What a plan truncates before it reads it -- the pre-drafted
    trees of the rows kept since the feedback, whose budgets the plan made ahead gives --
    is cut in one pass from ``src`` (``truncate``: native ``draft_select`` with the rows
    and the budgets), not gathered and then cut: at 512 rows two copies of every node,
    ~50 + ~30 us cold. The same trees either way (tests/test_host_path_flat.py)."""

    __slots__ = ("_src", "_rows", "_made")

    def __init__(self, src: DraftBatch, rows: np.ndarray) -> None:  # (no arrays yet)
        self._src, self._rows, self._made = src, rows, False

    def __len__(self) -> int:
        return len(self._rows)

    def _make(self) -> None:
        out = self._src.take_rows(self._rows)
        DraftBatch.__init__(self, out.tokens, out.parents, out.probs, out.depths, out.offsets, out.match_len)
        self._made = True

    def __getattr__(self, name: str):  # (only for what is not set: the arrays before _make)
        if name in _ARRAYS and not object.__getattribute__(self, "_made"):
            self._make()
            return object.__getattribute__(self, name)
        raise AttributeError(name)

    def probs_in_range(self) -> bool:  # (not made: its source's nodes, which hold them)
        return DraftBatch.probs_in_range(self) if self._made else self._src.probs_in_range()

    def truncate(self, budgets) -> DraftBatch:
        src = self._src
        if self._made or not src._native_ok():
            return DraftBatch.truncate(self, budgets)
        keep = np.ascontiguousarray(budgets, dtype=np.int64)
        if keep.shape != (len(self),):  # (numpy's broadcasting, as DraftBatch.truncate)
            keep = np.ascontiguousarray(np.broadcast_to(keep, (len(self),)))
        return src._native_select(np.ascontiguousarray(self._rows, dtype=np.int64), keep)
