"""The rows of one plan as columns: what the per-step host path hands the policy.

A policy reads a decode batch as ``Sequence[BudgetRow]`` (``policy.BudgetRow``). Building
one Python object per request per forward, and reading it back field by field in a dozen
places, costs milliseconds at batch 512. :class:`BudgetRows` holds the same rows as
arrays (the drafter's flat :class:`~das_sglang.core.draft_tree.DraftBatch` for the node
probabilities and depths); it is still a sequence of ``BudgetRow`` (built on access), so
every policy takes it, and the policy code reads its columns through the accessors below,
which take either form and give the same values.
"""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter
from typing import Sequence

import numpy as np

from das_sglang.core.draft_tree import DraftBatch
from das_sglang.native import row_map

# The per-step parts keep per-row values for the latest rows they were asked about. When
# a start or a finish changes the rows, from this many rows on they gather the values of
# the rows they already had through ``native.row_map`` (one C pass) and look up only the
# others; below it looking every row up costs about as much.
ROWMAP_MIN_ROWS = 64


# shared_row_map's latest results: (copy of prev, copy of new, back, unique), newest last.
_ROW_MAPS: list = []
_ROW_MAPS_KEPT = 8  # (a step's maps: request ids, problem ids, the ended ids, the pending ids)


def shared_row_map(prev: list, new: list) -> tuple[np.ndarray, bool]:
    """``native.row_map(prev, new)`` (``back`` read-only), computed once for the parts that
    ask it of the same rows: in a step where requests start or finish, the session, the
    drafter, the outcome calibration, the probe schedule and ``draft_sizes`` each map the
    previous plan's rows to the new ones (~14 us a map at 512 rows, eight maps a step).
    The latest few results are kept with copies of their lists and reused for lists equal
    to them (``==``: the same ids; ~2 us a compare when the ids are the same objects, as
    the parts' copies of the session's lists hold), so a list changed in place since is
    never answered from the memo."""
    m = _kept_for(_ROW_MAPS, prev, new)
    if m is not None:
        return m[2], m[3]
    back, unique = row_map(prev, new)
    back.flags.writeable = False
    _keep_row_map(prev, new, back, unique)
    return back, unique


def _kept_for(maps: list, prev: list, new: list) -> tuple | None:
    """The newest of ``maps`` (``(copy of prev, copy of new, back, ...)``) kept for lists
    equal to ``prev`` and ``new``, else None."""
    np_, nn = len(prev), len(new)
    for m in reversed(maps):
        if len(m[0]) == np_ and len(m[1]) == nn and m[1] == new and m[0] == prev:
            return m
    return None


def _keep_row_map(prev: list, new: list, back: np.ndarray, unique: bool) -> None:
    _ROW_MAPS.append((list(prev), list(new), back, unique))
    if len(_ROW_MAPS) > _ROW_MAPS_KEPT:
        del _ROW_MAPS[0]


def seed_row_map(prev: list, new: list, back: np.ndarray, unique: bool) -> None:
    """Keep ``back`` as :func:`shared_row_map`'s answer for ``(prev, new)``: a caller that
    knows the map another way (the worker maps SGLang's batch lists by object identity,
    the same rows as by id) saves the parts that ask for it the map of the ids."""
    if back.flags.writeable:
        back = back.copy()
        back.flags.writeable = False
    _keep_row_map(prev, new, back, unique)


# Maps seeded for lists of per-row keys whose values are a function of the key (problem
# ids): (copy of prev, copy of new, back), newest last. See gather_map.
_GATHER_MAPS: list = []
_GATHER_MAPS_KEPT = 2


def seed_gather_map(prev: list, new: list, back: np.ndarray) -> None:
    """Keep ``back`` (each row of ``new``: a row of ``prev`` with the same key, -1 for
    none known) as :func:`gather_map`'s answer for ``(prev, new)``. The session seeds it
    for the plan's problem ids from its map of the request rows (a kept request keeps its
    problem), so after a start or a finish the policy's parts that read per-problem values
    (the calibration factors, the length index rows) gather them without hashing 512
    problem ids again (~50-80 us a finish step, cold)."""
    if len(back) != len(new):
        raise ValueError(f"seed_gather_map: {len(back)} rows mapped for {len(new)} keys")
    if back.flags.writeable:
        back = back.copy()
        back.flags.writeable = False
    _GATHER_MAPS.append((list(prev), list(new), back))
    if len(_GATHER_MAPS) > _GATHER_MAPS_KEPT:
        del _GATHER_MAPS[0]


def gather_map(prev: list, new: list) -> np.ndarray:
    """For :func:`regather` of values that are a function of the key: each row of ``new``
    with a row of ``prev`` holding the same key (-1: look it up). A seeded map
    (:func:`seed_gather_map`) where one is kept for equal lists, else
    :func:`shared_row_map`'s (the last such row)."""
    m = _kept_for(_GATHER_MAPS, prev, new)
    return m[2] if m is not None else shared_row_map(prev, new)[0]


def same_ints(a: np.ndarray, b: np.ndarray) -> bool:
    """``np.array_equal(a, b)`` for integer arrays of one dtype (another dtype, or a float
    array, reads as different: the caller's exact path then runs): one byte compare. The
    per-step checks that the plan made ahead still holds ran ``np.array_equal``'s Python,
    ~20 us cold for 512 counts (the first call of a step)."""
    return (a.dtype == b.dtype and a.dtype.kind in "iu" and a.shape == b.shape
            and a.tobytes() == b.tobytes())


def kept_back(kept: tuple, memo_ids: list, req_ids: list, skip: set | None = None) -> np.ndarray | None:
    """``kept``'s map (``(previous req_ids, back, ...)``: rows of the caller's previous
    batch, by the caller's identity of its requests, -1 for new ones) when it maps the rows
    a memo resolved (``memo_ids`` equal to the previous ids) to ``req_ids``, and no row it
    keeps is in ``skip`` (the placeholders of deferred starts are new rows); else None. A
    kept row is the same live request, so no request that ended since can be among them
    (the session's and the drafter's rows, ``DasSession.plan``'s ``kept``)."""
    prev, back = kept[0], kept[1]
    if len(back) != len(req_ids) or len(prev) != len(memo_ids) or prev != memo_ids:
        return None
    if skip:
        fresh = {req_ids[i] for i in (back < 0).nonzero()[0].tolist()}
        if not skip <= fresh:
            return None
    return back


def kept_rows(prev_ids: list, ids: list, drop=None) -> tuple[np.ndarray, bool]:
    """``native.row_map(prev_ids, ids)`` -- each row's (last) row in ``prev_ids``, -1 where
    new, and whether ``ids`` holds each id once -- with the rows whose id is in ``drop``
    marked new as well (ids that ended since ``prev_ids`` was resolved: one may come back
    as another request; or rows that must be looked up afresh)."""
    back, unique = shared_row_map(prev_ids, ids)
    if drop:
        back = back.copy()
        # (the session and the drafter drop the same ended ids from the same rows: one map)
        back[shared_row_map(list(drop), ids)[0] >= 0] = -1
    return back, unique


def regather(prev_ids: list, prev_values: np.ndarray, ids: list, get, default, back=None) -> np.ndarray:
    """Per entry of ``ids``: ``prev_values`` at its (last) row in ``prev_ids``, or
    ``get(id, default)`` where ``prev_ids`` lacks it -- a lookup for every entry, when
    ``prev_values`` holds what ``get`` gives for ``prev_ids``, with only the new entries
    looked up (``native.row_map``: one C pass; ``back``: its rows, if at hand)."""
    if not len(prev_values):
        return np.fromiter(map(get, ids, repeat(default, len(ids))), prev_values.dtype, len(ids))
    if back is None:
        back = shared_row_map(prev_ids, ids)[0]
    out = prev_values[np.maximum(back, 0)]
    for i in (back < 0).nonzero()[0].tolist():
        out[i] = get(ids[i], default)
    return out


class BudgetRows:
    """Columns of a plan's rows: ``req_ids``/``problem_ids`` (lists), ``generated``,
    ``max_new``, ``prompt_len`` (int64 arrays) and ``drafts`` (node probabilities, depths
    and match length per row). Row ``i`` is ``BudgetRow(req_ids[i], problem_ids[i],
    generated[i], max_new[i], drafts[i].probs, prompt_len[i], drafts.match_len[i],
    drafts depths of row i)``."""

    __slots__ = ("req_ids", "problem_ids", "generated", "max_new", "prompt_len", "drafts")

    def __init__(self, req_ids: list, problem_ids: list, generated: np.ndarray, max_new: np.ndarray,
                 prompt_len: np.ndarray, drafts: DraftBatch) -> None:
        n = len(req_ids)
        if not (len(problem_ids) == len(generated) == len(max_new) == len(prompt_len) == len(drafts) == n):
            raise ValueError(
                f"BudgetRows columns differ in length: req_ids={n}, problem_ids={len(problem_ids)}, "
                f"generated={len(generated)}, max_new={len(max_new)}, prompt_len={len(prompt_len)}, "
                f"drafts={len(drafts)}")
        self.req_ids = req_ids
        self.problem_ids = problem_ids
        self.generated = generated
        self.max_new = max_new
        self.prompt_len = prompt_len
        self.drafts = drafts

    def __len__(self) -> int:
        return len(self.req_ids)

    def __getitem__(self, i: int):
        from das_sglang.core.policy import BudgetRow  # (policy imports this module)

        d = self.drafts
        a, z = int(d.offsets[i]), int(d.offsets[i + 1])
        return BudgetRow(self.req_ids[i], self.problem_ids[i], int(self.generated[i]),
                         int(self.max_new[i]), d.probs[a:z], int(self.prompt_len[i]),
                         int(d.match_len[i]), d.depths[a:z].astype(np.int64))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def take(self, rows: Sequence[int]) -> "BudgetRows":
        rows = np.asarray(rows, dtype=np.int64)
        ids, pids = self.req_ids, self.problem_ids
        return BudgetRows([ids[i] for i in rows.tolist()], [pids[i] for i in rows.tolist()],
                          self.generated[rows], self.max_new[rows], self.prompt_len[rows],
                          self.drafts.take(rows))


# ---- accessors: one column of either form (a list of BudgetRow or BudgetRows) ----------
def req_ids(rows) -> list:
    return rows.req_ids if type(rows) is BudgetRows else [r.req_id for r in rows]


def problem_ids(rows) -> list:
    return rows.problem_ids if type(rows) is BudgetRows else [r.problem_id for r in rows]


def _ints(rows, column: str, field: str) -> np.ndarray:
    """BudgetRows' int64 ``column``, or the BudgetRow ``field`` of each row as one."""
    if type(rows) is BudgetRows:
        return getattr(rows, column)
    return np.fromiter(map(attrgetter(field), rows), np.int64, len(rows))


def generated(rows) -> np.ndarray:
    return _ints(rows, "generated", "generated_len")


def max_new(rows) -> np.ndarray:
    return _ints(rows, "max_new", "max_new_tokens")


def prompt_len(rows) -> np.ndarray:
    return _ints(rows, "prompt_len", "prompt_len")


def found(rows) -> np.ndarray:
    """Draft nodes per row."""
    if type(rows) is BudgetRows:
        return rows.drafts.lens()
    return np.fromiter((len(r.node_probs) for r in rows), np.int64, len(rows))


def match_lens(rows) -> np.ndarray:
    if type(rows) is BudgetRows:
        return np.asarray(rows.drafts.match_len, dtype=np.int64)
    return np.fromiter((r.match_len for r in rows), np.int64, len(rows))


def leading_probs(rows, m: np.ndarray) -> np.ndarray:
    """Row ``i``'s first ``m[i]`` node probabilities, concatenated in row order."""
    if type(rows) is BudgetRows:
        d = rows.drafts
        lens = d.lens()
        rank = np.arange(len(d.probs), dtype=np.int64) - np.repeat(d.offsets[:-1], lens)
        return d.probs[rank < np.repeat(np.asarray(m, dtype=np.int64), lens)]
    return np.concatenate([r.node_probs[:k] for r, k in zip(rows, np.asarray(m).tolist())])
