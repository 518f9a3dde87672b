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
from typing import NamedTuple, Sequence

import numpy as np

from das_sglang.core.draft_tree import DraftBatch, DraftTree


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


def tree_lens(trees: Sequence[DraftTree] | DraftBatch) -> np.ndarray:
    """Draft nodes per row (int64) of a list of trees or a batch."""
    if isinstance(trees, DraftBatch):
        return trees.lens()
    return np.fromiter((len(t) for t in trees), dtype=np.int64, count=len(trees))


def _flat(trees: Sequence[DraftTree] | DraftBatch):
    """(nodes per row, flat tokens, flat row-local parents) of a list of trees or a batch."""
    if isinstance(trees, DraftBatch):
        return trees.lens(), trees.tokens, trees.parents
    lens = tree_lens(trees)
    if int(lens.sum()):
        return (lens, np.concatenate([t.tokens for t in trees]),
                np.concatenate([t.parents for t in trees]))
    return lens, np.zeros(0, np.int64), np.zeros(0, np.int64)


def build_layout(
    roots: Sequence[int], trees: Sequence[DraftTree] | DraftBatch, seq_lens: Sequence[int],
    width: int
) -> VerifyLayout:
    """Verify inputs for one batch: ``trees[b]`` (at most ``width`` nodes) below ``roots[b]``.

    Same result as :func:`build_layout_reference`, vectorised over the batch: the per-node
    loop becomes one loop over the ``width`` columns (a parent precedes its child, so
    column ``i`` only reads finished columns ``< i``), and the child/sibling links come
    from one stable sort of the real nodes by (row, parent)."""
    bs, n = len(trees), width + 1
    if len(roots) != bs or len(seq_lens) != bs:
        raise ValueError(
            f"build_layout: {bs} trees but {len(roots)} roots and {len(seq_lens)} seq_lens"
        )
    lens, flat_tokens, flat_parents = _flat(trees)
    if bs and lens.max(initial=0) > width:
        b = int(np.argmax(lens > width))
        raise ValueError(f"build_layout: row {b} has {int(lens[b])} draft nodes > width={width}")
    total = int(lens.sum())
    # Flat (row, column) of every real node: column = node index + 1 (root = column 0).
    rows = np.repeat(np.arange(bs, dtype=np.int64), lens)
    starts = np.cumsum(lens) - lens
    cols = np.arange(total, dtype=np.int64) - np.repeat(starts, lens) + 1
    flat_parents = flat_parents.astype(np.int64) + 1
    tokens = np.repeat(np.asarray(roots, dtype=np.int64)[:, None], n, axis=1)
    tokens[rows, cols] = flat_tokens  # pad rows keep the root token: never linked
    parents = np.zeros((bs, n), dtype=np.int64)  # pad rows hang below the root
    parents[rows, cols] = flat_parents
    mask = np.zeros((bs, n, n), dtype=bool)
    mask[:, :, 0] = True
    idx = np.arange(n)
    mask[:, idx, idx] = True
    depth = np.zeros((bs, n), dtype=np.int64)
    brange = np.arange(bs)
    for i in range(1, n):
        p = parents[:, i]
        mask[:, i] |= mask[brange, p]
        depth[:, i] = depth[brange, p] + 1
    next_token = np.full((bs, n), -1, dtype=np.int64)
    next_sibling = np.full((bs, n), -1, dtype=np.int64)
    if total:
        # Nodes are in (row, column) order; a stable sort by (row, parent) keeps siblings
        # in column order, so each group's first node is the first child and consecutive
        # nodes of one group are next siblings.
        order = np.lexsort((flat_parents, rows))
        r, p, c = rows[order], flat_parents[order], cols[order]
        first = np.ones(total, dtype=bool)
        first[1:] = (r[1:] != r[:-1]) | (p[1:] != p[:-1])
        next_token[r[first], p[first]] = c[first]
        follows = ~first[1:]
        next_sibling[r[:-1][follows], c[:-1][follows]] = c[1:][follows]
    positions = depth + np.asarray(seq_lens, dtype=np.int64)[:, None]
    retrieve_index = np.arange(bs * n, dtype=np.int64).reshape(bs, n)
    return VerifyLayout(
        tokens.reshape(-1), mask, positions.reshape(-1), retrieve_index, next_token,
        next_sibling, n,
    )


def custom_mask(layout: VerifyLayout, seq_lens: Sequence[int], device, target=None):
    """Flat bool mask in the layout SGLang's backend expects (as NGRAM builds it): tree
    blocks only on CPU, ``[prefix ones | tree block]`` rows per request elsewhere.

    The prefix form is mostly ones (``n * seq_len`` per request), so it is made where it
    is used: a ones tensor on ``target`` into which the small tree blocks are scattered,
    instead of building and copying the whole mask on the host. ``target`` defaults to
    ``device`` (benchmarks build the GPU form on the CPU)."""
    import torch

    target = device if target is None else target
    tree = torch.from_numpy(layout.mask)
    if str(device) == "cpu":
        return tree.flatten().to(target)
    n, bs = layout.n, layout.mask.shape[0]
    lens = torch.as_tensor(np.asarray(seq_lens, dtype=np.int64)).to(target, non_blocking=True)
    row_len = lens + n  # one mask row of request b: seq_len prefix + n tree columns
    start = torch.cumsum(row_len * n, 0) - row_len * n  # where request b's rows begin
    i = torch.arange(n, device=target)
    # flat index of tree column j of row i of request b: start + i * row_len + seq_len + j
    base = start[:, None] + i[None, :] * row_len[:, None] + lens[:, None]  # [bs, n]
    index = (base[:, :, None] + i[None, None, :]).reshape(-1)
    out = torch.ones(int((np.asarray(seq_lens, dtype=np.int64) + n).sum()) * n if bs else 0,
                     dtype=torch.bool, device=target)
    out[index] = tree.reshape(-1).to(target, non_blocking=True)
    return out



# ----------------------------------------------------------------- ragged verification
@dataclass(frozen=True)
class RaggedLayout:
    """Tree-verify inputs with a per-request row count: request ``b`` verifies
    ``verify_lens[b] = len(trees[b]) + 1`` rows (the root plus its own draft nodes; 1 =
    a plain decode step for that request), back to back, with no padding rows.

    Flat per-row arrays (``tokens``, ``positions``) have ``total = verify_lens.sum()``
    entries; request ``b``'s rows start at ``offsets[b]``. The tree links keep SGLang's
    dense ``[bs, n]`` shape (``n`` = the widest request's row count), which is what the
    tree-walk kernel takes: ``candidates``/``next_token``/``next_sibling`` are indexed by
    column, and ``retrieve_index[b, i] = offsets[b] + i`` maps column ``i`` to its flat
    (ragged) row, which is where the kernel reads the target's token and writes
    ``predicts`` / ``accept_index``. Columns past a request's rows are never linked
    (``-1``), so the walk cannot reach them.
    """

    tokens: np.ndarray  # int64 [total]
    positions: np.ndarray  # int64 [total]
    verify_lens: np.ndarray  # int64 [bs]
    offsets: np.ndarray  # int64 [bs]: first flat row of each request
    mask: np.ndarray  # bool [sum n_b^2]: request b's n_b x n_b ancestor mask, back to back
    candidates: np.ndarray  # int64 [bs, n]: tokens by column (0 past a request's rows)
    retrieve_index: np.ndarray  # int64 [bs, n]: flat row of (b, i); -1 past the rows
    next_token: np.ndarray  # int64 [bs, n]
    next_sibling: np.ndarray  # int64 [bs, n]
    n: int  # columns of the dense link arrays: max(verify_lens)
    # The native layout's one int64 buffer holding every integer array above (they are
    # views of it), SGLang's int32 qo_indptr arrays and, built with ``mask_zeros``, the
    # flat mask's False positions; ``starts``: its parts (:data:`RAGGED_PARTS`).
    # None for the numpy layout (:func:`pack_ragged` packs it on demand).
    packed: np.ndarray | None = None
    starts: np.ndarray | None = None
    flat_mask_len: int = -1  # the [seq_len prefix | tree] mask's length (with the zeros)

    @property
    def total(self) -> int:
        return int(self.verify_lens.sum())

    def __len__(self) -> int:  # (requests)
        return len(self.verify_lens)

    def block(self, b: int) -> np.ndarray:
        """Request ``b``'s ``n_b x n_b`` ancestor mask."""
        k = int(self.verify_lens[b])
        start = int((self.verify_lens[:b] ** 2).sum())
        return self.mask[start : start + k * k].reshape(k, k)


def build_ragged_layout(
    roots: Sequence[int], trees: Sequence[DraftTree] | DraftBatch, seq_lens: Sequence[int],
    mask_zeros: bool = False,
) -> RaggedLayout:
    """Ragged verify inputs: request ``b`` verifies its root and its ``len(trees[b])``
    draft nodes, no more. Same rows, masks, positions and links as
    :func:`build_layout` restricted to each request's real rows (the pad rows the uniform
    layout adds are simply not there). A flat :class:`DraftBatch` (the worker's per-step
    form) is laid out by one native call (``native.ragged_layout``, the same arrays:
    tests/sglang/test_ragged_layout.py), all of them in one packed buffer
    (:func:`ragged_device_inputs` moves it with one copy); a list of trees by numpy.
    ``mask_zeros``: also the positions the device mask clears (:func:`ragged_custom_mask`)."""
    if isinstance(trees, DraftBatch):
        from das_sglang.native import ragged_layout

        bs = len(trees)  # (the native call checks roots, seq_lens and offsets agree, naming them)
        buf, starts, mask, n, total, flat_len = ragged_layout(
            np.asarray(roots, dtype=np.int64), np.asarray(seq_lens, dtype=np.int64),
            np.ascontiguousarray(trees.offsets, dtype=np.int64),
            np.ascontiguousarray(trees.tokens, dtype=np.int32),
            np.ascontiguousarray(trees.parents, dtype=np.int32), bool(mask_zeros))
        return PackedRaggedLayout(buf, starts, mask, bs, n, total, flat_len if mask_zeros else -1)
    rag = build_ragged_layout_numpy(roots, trees, seq_lens)
    return pack_ragged(rag, seq_lens) if mask_zeros else rag


# The packed buffer's parts, in order (native.ragged_layout): int64 arrays, the four dense
# link arrays adjacent, then (at an even word: 16-byte aligned) the int32 arrays SGLang's
# layout takes, each padded to 4 entries (16 bytes), then the flat mask's False positions
# (int64; built with mask_zeros). ``starts``: each part's first word, then the length.
RAGGED_PARTS = ("tokens", "positions", "verify_lens", "offsets", "links", "qo", "mask_zeros")
_LINKS = ("candidates", "retrieve_index", "next_token", "next_sibling")


def _round4(x: int) -> int:
    return (x + 3) & ~3


def ragged_starts(bs: int, n: int, total: int, zeros: int) -> np.ndarray:
    """The parts' first words and the buffer's length (``len(RAGGED_PARTS) + 1``)."""
    s = [0, total, 2 * total, 2 * total + bs, 2 * total + 2 * bs]
    s.append((s[4] + 4 * bs * n + 1) & ~1)
    s.append(s[5] + (_round4(bs) + _round4(bs + 1) + _round4(bs)) // 2)
    s.append(s[6] + zeros)
    return np.asarray(s, dtype=np.int64)


class PackedRaggedLayout:
    """A :class:`RaggedLayout` held as the native layout's packed buffer: the same fields,
    each array a view of ``packed`` made when first read. The worker's verify reads only
    the buffer, its parts and the counts (:func:`ragged_device_inputs`), so a step no
    longer makes the eight views and the frozen dataclass's thirteen fields it never reads
    (~20 us at 512 rows, cold), nor sums ``verify_lens`` for every ``total`` read (five a
    step in the worker): ``total`` is the native call's count."""

    __slots__ = ("packed", "starts", "mask", "n", "total", "flat_mask_len", "_bs", "_views")

    def __init__(self, buf: np.ndarray, starts: np.ndarray, mask: np.ndarray, bs: int, n: int, total: int,
                 flat_len: int) -> None:
        self.packed, self.starts, self.mask = buf, starts, mask
        self.n, self.total, self.flat_mask_len = int(n), int(total), int(flat_len)
        self._bs, self._views = int(bs), None

    def _view(self) -> dict:
        views = self._views
        if views is None:
            s, buf, bs, n = self.starts.tolist(), self.packed, self._bs, self.n
            links = buf[s[4]:s[4] + 4 * bs * n].reshape(4, bs, n)
            views = self._views = dict(
                tokens=buf[:self.total], positions=buf[s[1]:s[2]], verify_lens=buf[s[2]:s[3]],
                offsets=buf[s[3]:s[4]], candidates=links[0], retrieve_index=links[1], next_token=links[2],
                next_sibling=links[3])
        return views

    tokens = property(lambda self: self._view()["tokens"])
    positions = property(lambda self: self._view()["positions"])
    verify_lens = property(lambda self: self._view()["verify_lens"])
    offsets = property(lambda self: self._view()["offsets"])
    candidates = property(lambda self: self._view()["candidates"])
    retrieve_index = property(lambda self: self._view()["retrieve_index"])
    next_token = property(lambda self: self._view()["next_token"])
    next_sibling = property(lambda self: self._view()["next_sibling"])

    def __len__(self) -> int:
        return self._bs

    block = RaggedLayout.block


def pack_ragged(layout: RaggedLayout, seq_lens: Sequence[int]) -> RaggedLayout:
    """``layout`` (any form) as the native layout built with ``mask_zeros`` holds it: one
    int64 buffer of every array, SGLang's int32 qo arrays and the mask's False positions
    (numpy; the reference the native buffer is tested against)."""
    from das_sglang.native import ragged_mask_index

    vl = np.ascontiguousarray(layout.verify_lens, dtype=np.int64)
    bs, n, total = len(vl), int(layout.n), int(vl.sum())
    zeros, flat_len = ragged_mask_index(vl, np.asarray(seq_lens, dtype=np.int64),
                                        np.ascontiguousarray(layout.mask, dtype=bool).reshape(-1))
    starts = ragged_starts(bs, n, total, len(zeros))
    s = starts.tolist()
    buf = np.zeros(s[-1], dtype=np.int64)
    for i, name in enumerate(RAGGED_PARTS[:4]):
        buf[s[i]:s[i + 1]] = getattr(layout, name)
    buf[s[4]:s[4] + 4 * bs * n] = np.concatenate([np.asarray(getattr(layout, k), np.int64).reshape(-1)
                                                  for k in _LINKS])
    qo = np.concatenate([[0], np.cumsum(vl)]).astype(np.int32)
    words = buf[s[5]:s[6]].view(np.int32)
    at = 0
    for part in (vl.astype(np.int32), qo, qo[:-1]):
        words[at:at + len(part)] = part
        at += _round4(len(part))
    buf[s[6]:s[7]] = zeros
    return PackedRaggedLayout(buf, starts, layout.mask, bs, n, total, int(flat_len))


class RaggedDeviceInputs(NamedTuple):
    """A ragged verify's inputs where the forward runs (views of one copied buffer)."""

    tokens: object  # torch int64 [total]
    positions: object  # int64 [total]
    verify_lens: object  # int64 [bs]
    offsets: object  # int64 [bs]
    candidates: object  # int64 [bs, n]
    retrieve_index: object
    next_token: object
    next_sibling: object
    verify_lens32: object  # int32 [bs]: SGLang's RaggedVerifyLayout.verify_lens
    qo_indptr: object  # int32 [bs + 1]
    extend_start_loc: object  # int32 [bs]
    custom_mask: object  # bool: ragged_custom_mask's


def ragged_device_inputs(layout: RaggedLayout, seq_lens: Sequence[int], device, target=None) -> RaggedDeviceInputs:
    """Every integer input of a ragged verify on ``device`` from ONE host-to-device copy of
    the layout's packed buffer (views of it; ``target``: where that copy goes instead, as
    in :func:`ragged_custom_mask`), and the custom mask. Until this version each array was
    copied on its own (ten copies a step) and SGLang's qo_indptr was computed by device
    ops from the lengths. The views are taken by two splits (each tensor op's dispatch
    costs the host ~5-50 us a step, cold: ~10 ops here). On the CPU the views are of the
    host buffer itself (no copy) and the mask is the tree blocks (:func:`ragged_custom_mask`)."""
    import torch

    target = device if target is None else target
    cpu = str(device) == "cpu"
    if layout.packed is None or (not cpu and layout.flat_mask_len < 0):
        layout = pack_ragged(layout, seq_lens)  # (the numpy layout, or built without the zeros)
    buf = torch.from_numpy(layout.packed)
    if str(target) != "cpu":
        buf = buf.to(_device(target))
    s = layout.starts.tolist()
    bs, n = len(layout), layout.n
    sizes = [s[i + 1] - s[i] for i in range(len(s) - 1)]
    links, bn = sizes[4], bs * n
    # (the four link arrays, then the odd word before the int32 part)
    sizes[4:5] = [bn, bn, bn, bn, links - 4 * bn]
    # The views: one split of the buffer, one of its int32 part, a shape view of each link
    # array. A step's first call of each tensor op costs the host ~20-60 us in
    # bench_host_path (its second ~3 us: the dispatcher's code and data are cold after the
    # engine's ~10 ms of other work), so these are the fewest distinct ops: split_with_sizes
    # (Tensor.split's Python wrapper calls it), the link arrays by the split and a view each
    # (until stop 58: a view to [4, bs, n] and an unbind, one more distinct op).
    tok, pos, vl, offs, c, r, nt, ns, _, qo, zeros = buf.split_with_sizes(sizes)
    r4 = (_round4(bs), _round4(bs + 1), _round4(bs))
    vl32, _, qo_indptr, _, start, _ = qo.view(torch.int32).split_with_sizes(
        [bs, r4[0] - bs, bs + 1, r4[1] - bs - 1, bs, r4[2] - bs])
    if cpu:
        mask = ragged_custom_mask(layout, seq_lens, device, target)
    else:
        mask = _ones_but(int(layout.flat_mask_len), zeros, target)
    return RaggedDeviceInputs(tok, pos, vl, offs, c.view(bs, n), r.view(bs, n), nt.view(bs, n), ns.view(bs, n),
                              vl32, qo_indptr, start, mask)


def build_ragged_layout_numpy(
    roots: Sequence[int], trees: Sequence[DraftTree] | DraftBatch, seq_lens: Sequence[int]
) -> RaggedLayout:
    """:func:`build_ragged_layout` in numpy, from the uniform layout (any tree form)."""
    bs = len(trees)
    lens = _flat(trees)[0]
    width = int(lens.max(initial=0))
    dense = build_layout(roots, trees, seq_lens, width)
    n = dense.n
    verify_lens = lens + 1
    offsets = np.cumsum(verify_lens) - verify_lens
    cols = np.arange(n, dtype=np.int64)
    real = cols[None, :] < verify_lens[:, None]  # [bs, n]
    candidates = dense.tokens.reshape(bs, n).copy()
    candidates[~real] = 0
    retrieve_index = np.where(real, offsets[:, None] + cols[None, :], -1)
    return RaggedLayout(
        tokens=dense.tokens.reshape(bs, n)[real],
        positions=dense.positions.reshape(bs, n)[real],
        verify_lens=verify_lens,
        offsets=offsets,
        mask=dense.mask[real[:, :, None] & real[:, None, :]],  # (b, i, j) order
        candidates=candidates,
        retrieve_index=retrieve_index,
        next_token=dense.next_token,  # pad columns are never linked in build_layout
        next_sibling=dense.next_sibling,
        n=n,
    )


def ragged_custom_mask(layout: RaggedLayout, seq_lens: Sequence[int], device, target=None):
    """Flat bool mask of a ragged verify in the layout the attention backend reads:
    on CPU the per-request ``n_b x n_b`` tree blocks back to back; elsewhere, per
    request, ``n_b`` rows of ``[seq_len_b prefix ones | n_b tree columns]`` -- the
    ``qo_len x kv_len`` blocks FlashInfer's custom-mask prefill expects (its mask
    offsets are the running sum of ``qo_len_b * kv_len_b``)."""
    import torch

    target = device if target is None else target
    if str(device) == "cpu":
        return torch.from_numpy(layout.mask).to(target)
    # Mostly ones (``n_b * seq_len_b`` prefix entries per request): made where it is used,
    # then the tree blocks' False entries cleared through a host-built index of just those
    # (one host-to-device copy of about half the index: until this version every tree entry
    # was scattered with its value, an index and a value tensor copied over).
    from das_sglang.native import ragged_mask_index

    zeros, length = ragged_mask_index(np.ascontiguousarray(layout.verify_lens, dtype=np.int64),
                                      np.asarray(seq_lens, dtype=np.int64),
                                      np.ascontiguousarray(layout.mask, dtype=bool).reshape(-1))
    return _ones_but(int(length), torch.from_numpy(zeros).to(target), target)


# Per target: its torch.device (a string is parsed again by every op given it) and a
# 0-dim False there for the mask's clearing (see _ones_but).
_DEVICES: dict = {}
_FALSE: dict = {}


def _device(target):
    import torch

    dev = _DEVICES.get(target)
    if dev is None:
        dev = _DEVICES[target] = torch.device(target)
    return dev


def _ones_but(length: int, zeros, target):
    """The GPU-form mask: ``length`` entries on ``target``, True but at ``zeros`` (an int64
    tensor there). The cleared value is a 0-dim bool tensor made once per device: ``out[zeros]
    = False`` wraps the Python scalar in a new CPU tensor every call (and hands a CUDA
    ``index_put_`` a host value), ~15 us of host time a step at 512 rows in bench_host_path;
    ``index_fill_`` costs ~3x the dispatch."""
    import torch

    dev = _device(target)
    false = _FALSE.get(dev)
    if false is None:
        false = _FALSE[dev] = torch.zeros((), dtype=torch.bool, device=dev)
    out = torch.ones(length, dtype=torch.bool, device=dev)
    out.index_put_((zeros,), false)
    return out

