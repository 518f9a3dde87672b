"""Per-problem prediction of how many tokens a running rollout still has to generate.

Following the paper: finished lengths of the last ``length_window_steps`` training steps are
pooled; class boundaries (Short / Medium / Long) are the pooled lengths' quantiles (or fixed
thresholds). A problem's *initial class* is the class of its own median length. A request of
problem ``q`` that has generated ``g`` tokens is re-classified as

    c* = argmax_c P(class = c | length > g, initial class of q)

estimated by counting the pooled rollouts of problems sharing ``q``'s initial class (add-one
smoothing over the classes still possible), and its predicted remaining length is the mean of
``length - g`` over those rollouts in class ``c*`` longer than ``g``.

Fallbacks, in order: all problems pooled when the initial class is unknown (no own history)
or none of its group runs longer than ``g``; ``tail_factor * g`` when nothing in the window
ran longer than ``g`` (heavy tail: the longer it has run, the longer it keeps running); with no
history at all, ``max(prior_length - g, tail_factor * g)``. Always clipped to
``[1, max_new_tokens - g]``.

Worked example (fixed thresholds 100/1000): history lengths 50, 60, 500, 5000, all one
problem (initial class Medium, median 280). At g = 0, P(S) = P(M) = P(L) shares 3:2:2 with
smoothing -> Short, remaining mean(50, 60) = 55. At g = 70 only 500 and 5000 remain -> tie
M:L 2:2 broken towards the shorter class -> Medium, remaining 430. At g = 600 -> Long,
remaining 4400.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat

import numpy as np
# np.quantile (the class thresholds) imports numpy.ma on its first call, holding the GIL:
# 10 ms on a quiet core, ~70 ms measured under load at RL scale, in whichever step first
# rebuilds a non-empty length index (the scheduler thread stalls for it even when the
# rebuild runs in the background). Imported here, it is paid at start-up instead.
import numpy.ma  # noqa: F401

from das_sglang.core.policy_config import PolicyConfig
from das_sglang.core.budget_rows import ROWMAP_MIN_ROWS, gather_map, regather
from das_sglang.native import LengthIndex, length_remaining

SHORT, MEDIUM, LONG = 0, 1, 2
CLASS_NAMES = ("short", "medium", "long")
_ALL = -1  # group key: every problem pooled


@dataclass(frozen=True)
class LengthPrediction:
    remaining: float  # predicted tokens still to generate (>= 1)
    length_class: int | None  # SHORT / MEDIUM / LONG after re-classification; None = no data
    initial_class: int | None  # the problem's class from its own history; None = unknown


class _Group:
    """Sorted finished lengths per class with suffix sums: O(log n) conditional queries."""

    def __init__(self, lengths: np.ndarray, classes: np.ndarray) -> None:
        self.sorted = []
        self.suffix = []
        for c in (SHORT, MEDIUM, LONG):
            s = np.sort(lengths[classes == c]).astype(np.float64)
            self.sorted.append(s)
            self.suffix.append(np.concatenate([np.cumsum(s[::-1])[::-1], [0.0]]))

    def longer_than(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per query and class: count and sum of lengths strictly greater than ``g``."""
        counts, sums = np.zeros((len(g), 3)), np.zeros((len(g), 3))
        for c in range(3):
            i = np.searchsorted(self.sorted[c], g, side="right")
            counts[:, c] = len(self.sorted[c]) - i
            sums[:, c] = self.suffix[c][i]
        return counts, sums


class _LengthQueries:
    """The queries of a length predictor, over what its ``_index()`` returns: (class
    thresholds or None, initial class per problem, per-class ``_Group``s)."""

    config: PolicyConfig

    def _index(self):  # each predictor builds (and caches) its own
        raise NotImplementedError

    _c0_memo: tuple | None = None  # (problem_ids list, initial-class dict, their classes)

    def _initial_classes(self, problem_ids, initial: dict) -> np.ndarray:
        """The initial class (-1: unknown) of each problem, as an int64 array. A decode
        batch's problem ids come as one list object while its rows stay the same (the
        session's resolved rows): the answer for that list and index is kept, not looked up
        per row again (the caller must not change the array)."""
        memo = self._c0_memo
        if memo is not None and memo[0] is problem_ids and memo[1] is initial:
            return memo[2]
        c0 = np.fromiter(map(initial.get, problem_ids, repeat(-1)), np.int64, len(problem_ids))
        if type(problem_ids) is list:
            self._c0_memo = (problem_ids, initial, c0)
        return c0

    def thresholds(self) -> np.ndarray | None:
        """Short/Medium and Medium/Long boundaries (lengths <= t1 are Short), or None."""
        return self._index()[0]

    def initial_class(self, problem_id: str) -> int | None:
        return self._index()[1].get(problem_id)

    def predict(self, problem_id: str, generated_len: int, max_new_tokens: int) -> LengthPrediction:
        remaining, cls, c0 = self.predict_many([problem_id], [generated_len], [max_new_tokens])
        return LengthPrediction(
            float(remaining[0]),
            None if cls[0] < 0 else int(cls[0]),
            None if c0[0] < 0 else int(c0[0]),
        )

    def predict_many(self, problem_ids, generated_lens, max_new_tokens):
        """Vectorised ``predict``: (remaining, class or -1, initial class or -1) arrays."""
        cfg = self.config
        g = np.maximum(np.asarray(generated_lens, dtype=np.float64), 0.0)
        cap = np.maximum(1.0, np.asarray(max_new_tokens, dtype=np.float64) - g)
        n = len(g)
        thresholds, initial, groups = self._index()
        c0 = self._initial_classes(problem_ids, initial)
        if thresholds is None:  # no history anywhere
            guess = np.maximum(cfg.prior_length - g, cfg.tail_factor * g)
            return np.clip(guess, 1.0, cap), np.full(n, -1), c0
        if self.NATIVE:
            remaining, cls = length_remaining(g, cap, c0, *self._packed(groups), float(cfg.tail_factor))
            return remaining, cls, c0
        remaining = cfg.tail_factor * g  # heavy-tail rule unless a group has longer rollouts
        cls = np.full(n, LONG, dtype=np.int64)
        todo = np.ones(n, dtype=bool)
        for key, rows in ((c, c0 == c) for c in (SHORT, MEDIUM, LONG, _ALL)):
            sel = todo & (rows if key != _ALL else True)
            if key not in groups or not sel.any():
                continue
            counts, sums = groups[key].longer_than(g[sel])
            found = counts.sum(axis=1) > 0
            # Add-one smoothing over the classes that still contain longer rollouts; argmax
            # ties go to the shorter class (first index), which is the cautious choice.
            c_star = np.argmax(np.where(counts > 0, counts + 1.0, -1.0), axis=1)
            pick = np.arange(len(c_star))
            mean_len = sums[pick, c_star] / np.maximum(counts[pick, c_star], 1.0)
            idx = np.flatnonzero(sel)[found]
            remaining[idx] = mean_len[found] - g[idx]
            cls[idx] = c_star[found]
            todo[idx] = False
        return np.clip(remaining, 1.0, cap), cls, c0

    # The per-row group queries in one native call (``length_remaining``, a binary search
    # per row and class); False: numpy, the reference it is tested against
    # (tests/test_length_predictor.py), the same arrays bit for bit.
    NATIVE = True
    _packed_memo: tuple | None = None  # (groups dict, its packed arrays)

    def _packed(self, groups: dict) -> tuple:
        """The groups' sorted lengths and suffix sums as flat arrays (block ``slot * 3 +
        class``, slots short / medium / long / all pooled) for ``length_remaining``; kept
        for the index they came from."""
        memo = self._packed_memo
        if memo is not None and memo[0] is groups:
            return memo[1]
        present = np.zeros(4, np.int64)
        sorted_parts, suffix_parts = [], []
        for slot, key in enumerate((SHORT, MEDIUM, LONG, _ALL)):
            grp = groups.get(key)
            present[slot] = grp is not None
            for c in range(3):
                sorted_parts.append(grp.sorted[c] if grp is not None else np.zeros(0))
                suffix_parts.append(grp.suffix[c] if grp is not None else np.zeros(1))
        offsets = lambda parts: np.concatenate([[0], np.cumsum([len(x) for x in parts])]).astype(np.int64)  # noqa: E731
        packed = (present, np.concatenate(sorted_parts).astype(np.float64), offsets(sorted_parts),
                  np.concatenate(suffix_parts).astype(np.float64), offsets(suffix_parts))
        self._packed_memo = (groups, packed)
        return packed


class LengthPredictor(_LengthQueries):
    """Finished lengths kept columnar (problem index, step, length: O(1) per finish), and
    an incremental query index (native ``LengthIndex``, src/length_index.h): a finish is
    one insertion into its problem's sorted lengths and a few Fenwick-tree updates, never a
    rebuild; thresholds and initial classes are brought up to date at the next query, so
    every query answers from every finish so far -- what a full rebuild of the columns
    (``_build_index``, kept as the reference and tested against bit for bit) would answer.
    Lengths that leave (the window's step, an eviction) are removed from it, O(log V) each;
    only a restore builds it from the columns. Lengths of ``LengthIndex.MAX_LENGTH`` tokens
    and more fall back to the rebuilds described next (once seen, for good).

    The fallback (and ``INCREMENTAL = False``): the query index is rebuilt lazily with
    whole-array numpy (no per-problem Python loop), and with ``background=True`` off the
    caller's thread: queries then read the latest built index (double-buffered) and never
    wait for a rebuild once the first one exists; a rebuild starts once 1% of the lengths changed or 0.5 s after the previous one, so the
    index lags the newest finishes by at most that. A rebuild starts on a query, or, with
    ``rebuild_on_query`` False, only when the owner calls :meth:`rebuild_if_stale` (the
    session does at each verify forward: the rebuild's Python then runs while the
    scheduler thread waits on the device, not beside the policy's plan)."""

    def __init__(self, config: PolicyConfig | None = None, background: bool = False) -> None:
        self.config = config or PolicyConfig()
        self._pid_index: dict[str, int] = {}
        self._pids: list[str] = []
        self._cols = np.zeros((3, 1024), dtype=np.int64)  # rows: problem index, step, length
        self._cols_shared = False  # a state() view of _cols is out: copy before rewriting it
        self._n = 0
        self._step = 0
        self._version = 0  # bumped by every change
        self._cache = None  # (version, index)
        self.background = background
        self._building = None  # threading.Thread of a background rebuild
        self._last_start = 0.0
        self.rebuild_on_query = True  # background: a query starts a due rebuild
        self._inc = None  # the incremental index (None: rebuilds)
        self._numbering = 0  # bumped when problem indices are renumbered
        self._rows_memo = None  # (problem_ids list, numbering, problems known, their indices)
        if self.INCREMENTAL:
            cfg = self.config
            fixed = cfg.class_thresholds is not None
            a, b = cfg.class_thresholds if fixed else cfg.class_quantiles
            self._inc = LengthIndex(fixed, float(a), float(b))

    INCREMENTAL = True  # False: the rebuilt index only (the reference)

    # ---- updates ---------------------------------------------------------------------
    def observe_finished(self, problem_id: str, length: int) -> None:
        if length < 0:
            raise ValueError(f"invalid finished length {length!r} for problem {problem_id!r}: must be >= 0")
        i = self._problem_index(problem_id)
        self._reserve(1)
        length = int(length)
        self._cols[:, self._n] = (i, self._step, length)
        self._n += 1
        self._version += 1
        if self._inc is not None:
            if length < LengthIndex.MAX_LENGTH:
                self._inc.add(i, length)
            else:
                self._inc = None  # (longer than its trees cover: rebuilds from now on)

    def _problem_index(self, problem_id: str) -> int:
        """The problem's index in the columns, a new one for a problem not seen before."""
        i = self._pid_index.get(problem_id)
        if i is None:
            i = self._pid_index[problem_id] = len(self._pids)
            self._pids.append(problem_id)
        return i

    def observe_finished_many(self, problem_ids, lengths) -> None:
        """:meth:`observe_finished` of each (problem, length) in order -- the same columns
        and index -- with one column write for all of them (a step boundary records a
        wave of finishes on the scheduler thread). A negative length raises naming it,
        before anything is added."""
        lengths = [int(n) for n in lengths]
        problem_ids = list(problem_ids)
        if len(problem_ids) != len(lengths):
            raise ValueError(f"observe_finished_many: {len(problem_ids)} problem ids but {len(lengths)} lengths")
        for p, n in zip(problem_ids, lengths):
            if n < 0:
                raise ValueError(f"invalid finished length {n!r} for problem {p!r}: must be >= 0")
        k = len(lengths)
        if k == 0:
            return
        rows = [self._problem_index(p) for p in problem_ids]
        self._reserve(k)
        n = self._n
        self._cols[0, n: n + k] = rows
        self._cols[1, n: n + k] = self._step
        self._cols[2, n: n + k] = lengths
        self._n += k
        self._version += k
        inc = self._inc
        if inc is not None:
            for i, length in zip(rows, lengths):
                if length >= LengthIndex.MAX_LENGTH:
                    self._inc = None  # (longer than its trees cover: rebuilds from now on)
                    break
                inc.add(i, length)

    def advance_step(self, step: int) -> None:
        if step < self._step:
            raise ValueError(f"invalid step={step!r}: steps only advance (current {self._step})")
        self._step = step
        oldest = step - self.config.length_window_steps
        cols = self._cols[:, : self._n]
        keep = cols[1] >= oldest
        if not keep.all():
            self._drop_columns(keep)
        # Room for as many lengths again as it holds: a step's finishes then never grow the
        # columns (the growth's ~0.5 ms of fresh pages ran on the scheduler thread when the
        # plan after a boundary recorded the finishes before it); this call runs on the
        # policy thread when the session defers a boundary. (_compact_pids shrinks past 4x.)
        self._reserve(self._n)
        self._version += 1

    # ---- snapshots -------------------------------------------------------------------
    def state(self) -> dict:
        """The finished lengths for a history snapshot's meta (the snapshot writer encodes
        the array): ``{"step", "problems", "columns"}``, columns = (problem index into
        ``problems``, step, length) per finished request. It may be handed to another
        thread: the columns are a read-only view that never changes -- the predictor
        copies its columns before it next rewrites any it holds (copy-on-write; new
        lengths go past them). Copying them here took ~0.25 ms of a step boundary's
        snapshot at 2,048 x 16 lengths, on the scheduler thread."""
        view = self._cols[:, : self._n].view()
        view.flags.writeable = False
        self._cols_shared = True
        return {"step": int(self._step), "problems": list(self._pids), "columns": view}

    def _own_columns(self) -> None:
        """Before rewriting columns in place: a copy of them if a state() view holds them."""
        if self._cols_shared:
            self._move_columns(self._cols.shape[1])

    def _move_columns(self, capacity: int) -> None:
        """The lengths held, copied into a fresh array of ``capacity`` columns that is the
        predictor's own (a state() view keeps the old one)."""
        cols = np.empty((3, capacity), dtype=np.int64)
        cols[:, : self._n] = self._cols[:, : self._n]
        self._cols = cols
        self._cols_shared = False

    def restore(self, state: dict, at: int | None = None) -> int:
        """Add the lengths of another predictor's :meth:`state` (a snapshot written by an
        earlier process), so a restarted server predicts from them at once. ``at``: the
        caller's current step (default: the state's); the predictor moves up to it, a length
        filed at a later step counts as of it (the caller's steps, which only advance, then
        never fall behind the predictor's), and lengths older than the window are dropped as
        ``advance_step`` drops them. Returns how many lengths it now holds from ``state``.
        Raises ValueError naming the defect, adding nothing."""
        if not isinstance(state, dict):
            raise ValueError(f"invalid length state: expected a dict, got {type(state).__name__}")
        problems, columns, step = state.get("problems"), state.get("columns"), state.get("step")
        if not isinstance(problems, list) or not all(isinstance(p, str) for p in problems):
            raise ValueError("invalid length state: 'problems' must be a list of problem ids (str)")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"invalid length state: step={step!r} must be an int >= 0")
        try:
            cols = np.asarray(columns if columns is not None else [[], [], []])
        except (TypeError, ValueError):
            raise ValueError("invalid length state: 'columns' must be 3 rows of ints") from None
        if cols.ndim != 2 or cols.shape[0] != 3 or (cols.size and cols.dtype.kind not in "iu"):
            raise ValueError(f"invalid length state: 'columns' must be 3 rows of ints, got shape "
                             f"{cols.shape} of {cols.dtype}")
        cols = cols.astype(np.int64)
        if cols.shape[1]:
            bad = (cols[0] < 0) | (cols[0] >= len(problems)) | (cols[1] < 0) | (cols[1] > step) | (cols[2] < 0)
            if bad.any():
                j = int(np.argmax(bad))
                raise ValueError(f"invalid length state: entry {j} (problem index, step, length) = "
                                 f"{tuple(int(v) for v in cols[:, j])} (need a listed problem, "
                                 f"0 <= step <= {int(step)}, length >= 0)")
        now = int(step) if at is None else int(at)
        if now > self._step:
            self.advance_step(now)
        cols[1] = np.minimum(cols[1], self._step)
        remap = np.fromiter(map(self._problem_index, problems), np.int64, len(problems))
        n = cols.shape[1]
        self._reserve(n)
        if n:
            self._cols[:, self._n: self._n + n] = np.stack([remap[cols[0]], cols[1], cols[2]])
            self._n += n
        before = self._n
        self.advance_step(self._step)  # the window, as for lengths observed here (bumps the version)
        self._build_incremental()
        return n - (before - self._n)

    def _reserve(self, n: int) -> None:
        """Room for ``n`` more lengths (the columns double as they fill). Only the lengths
        held are copied, into fresh memory (a concatenate with zeros wrote the doubled
        array twice: 0.7-1.5 ms at 32-64k lengths, on the scheduler thread when a step
        boundary records its finishes there); a state() view keeps the old array, so the
        new one is the predictor's own."""
        cap = self._cols.shape[1]
        if self._n + n <= cap:
            return
        while self._n + n > cap:
            cap *= 2
        self._move_columns(cap)

    def evict_problems(self, problem_ids) -> int:
        """Forget every finished length of ``problem_ids`` (memory cap); returns how many."""
        drop = [self._pid_index[p] for p in problem_ids if p in self._pid_index]
        if not drop:
            return 0
        cols = self._cols[:, : self._n]
        keep = ~np.isin(cols[0], np.asarray(drop))
        removed = int((~keep).sum())
        self._drop_columns(keep)
        self._version += 1
        return removed

    def _compact_pids(self) -> np.ndarray | None:
        """Renumber the problems that still have lengths (bounded memory); the renumbering
        (old index -> new, -1: gone), None when every problem still has lengths."""
        # (which problems still have a length: a count per problem, not np.unique's sort of
        # every length -- 1-3 ms at 2,048 x 16 lengths on the step boundary's path)
        used = np.flatnonzero(np.bincount(self._cols[0, : self._n], minlength=len(self._pids)))
        if len(used) == len(self._pids):
            return None
        self._own_columns()
        self._numbering += 1
        remap = np.full(len(self._pids), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        self._cols[0, : self._n] = remap[self._cols[0, : self._n]]
        self._pids = [self._pids[i] for i in used.tolist()]
        self._pid_index = {p: i for i, p in enumerate(self._pids)}
        if self._cols.shape[1] > 4 * max(self._n, 256):
            self._cols = self._cols[:, : 2 * max(self._n, 256)].copy()
        return remap

    @property
    def num_lengths(self) -> int:
        return self._n

    def memory_bytes(self) -> int:
        inc = self._inc.memory_bytes() if self._inc is not None else 0
        return int(self._cols.nbytes) + 100 * len(self._pids) + inc

    # ---- the incremental index -------------------------------------------------------
    def _build_incremental(self) -> None:
        """The incremental index from the columns (a restore)."""
        if self._inc is None:
            return
        cols = self._cols[:, : self._n]
        if self._n and int(cols[2].max()) >= LengthIndex.MAX_LENGTH:
            self._inc = None
            return
        self._inc.build(np.ascontiguousarray(cols[0]), np.ascontiguousarray(cols[2]), len(self._pids))

    def _drop_columns(self, keep: np.ndarray) -> None:
        """Keep the columns where ``keep``; the lengths that leave, leave the incremental
        index too -- O(log V) each, not a rebuild (a window step drops ~1/window of every
        length: at RL scale a rebuild's trees took ~5 ms of the boundary) -- and the problems
        are renumbered in both. (Row by row: numpy's boolean selection of a 2-D array's
        columns took 1.9 ms at 40k lengths, the rows' 0.3.)"""
        self._own_columns()
        n = self._n
        rows = [self._cols[r, :n] for r in range(3)]
        gone_p, gone_len = rows[0][~keep], rows[2][~keep]
        kept = [r[keep] for r in rows]
        m = len(kept[0])
        for r in range(3):
            self._cols[r, :m] = kept[r]
        self._n = m
        remap = self._compact_pids()
        if self._inc is None:
            return
        try:
            self._inc.remove(gone_p, gone_len)  # (old numbering)
            if remap is not None:
                self._inc.renumber(remap, len(self._pids))
        except ValueError:  # (never expected: the columns are the truth, so build from them)
            self._build_incremental()

    def _problem_rows(self, problem_ids) -> np.ndarray:
        """Each row's problem index (-1: no lengths). A decode batch's problem ids come as
        one list object while its rows stay the same: the answer for that list is kept while
        no problem is added or renumbered (the caller must not change the array)."""
        memo = self._rows_memo
        known = len(self._pids)
        if memo is not None and memo[0] is problem_ids and memo[1] == self._numbering and memo[2] == known:
            return memo[3]
        n = len(problem_ids)
        if (memo is not None and memo[1] == self._numbering and memo[2] == known
                and type(problem_ids) is list and n >= ROWMAP_MIN_ROWS):
            # Another list (a start or a finish changed the rows): the problems the memo's
            # list has read their index from it (one C pass), only the others are looked up.
            rows = regather(memo[0], memo[3], problem_ids, self._pid_index.get, -1,
                            gather_map(memo[0], problem_ids))
        else:
            rows = np.fromiter(map(self._pid_index.get, problem_ids, repeat(-1)), np.int64, n)
        if type(problem_ids) is list:
            self._rows_memo = (problem_ids, self._numbering, known, rows)
        return rows

    def predict_many(self, problem_ids, generated_lens, max_new_tokens):
        inc = self._inc
        if inc is None or not inc.num_lengths:
            return super().predict_many(problem_ids, generated_lens, max_new_tokens)
        cfg = self.config
        g = np.maximum(np.asarray(generated_lens, dtype=np.float64), 0.0)
        cap = np.maximum(1.0, np.asarray(max_new_tokens, dtype=np.float64) - g)
        if g.ndim != 1 or cap.shape != g.shape or len(problem_ids) != len(g):
            raise ValueError(f"predict_many: {len(problem_ids)} problem ids, generated lengths of shape "
                             f"{g.shape} and max_new_tokens of shape {cap.shape} must be one per row")
        return inc.query(g, cap, self._problem_rows(problem_ids), float(cfg.tail_factor))

    def query_inputs(self, problem_ids):
        """What :meth:`predict_many` reads natively, for a query made off this thread
        (``native.plan_ahead``): (the incremental index, each row's problem index,
        tail_factor), its lazy update done now (so that query only reads it); None where
        :meth:`predict_many` would not query the index."""
        inc = self._inc
        if inc is None or not inc.num_lengths:
            return None
        inc.thresholds()  # (brings the index up to date: the query then changes nothing)
        return inc, self._problem_rows(problem_ids), float(self.config.tail_factor)

    def thresholds(self) -> np.ndarray | None:
        if self._inc is None:
            return super().thresholds()
        return self._inc.thresholds()

    def initial_class(self, problem_id: str) -> int | None:
        if self._inc is None:
            return super().initial_class(problem_id)
        i = self._pid_index.get(problem_id)
        c = -1 if i is None else self._inc.initial_class(i)
        return None if c < 0 else int(c)

    def _index(self):
        cache = self._cache
        if cache is not None and cache[0] == self._version:
            return cache[1]
        if not self.background or cache is None:
            self._wait()
            cache = self._cache = (self._version, self._build_index(*self._columns()))
            return cache[1]
        if self.rebuild_on_query:
            self.rebuild_if_stale()
        return cache[1]  # the previous index: at most one rebuild behind

    def rebuild_if_stale(self) -> bool:
        """Background: start a rebuild now if one is due (the rule above); whether it did."""
        cache = self._cache
        if (self._inc is not None or not self.background or cache is None or cache[0] == self._version or self._busy()
                or not self._stale_enough(cache[0])):
            return False
        self._start_rebuild()
        return True

    REBUILD_SHARE = 0.01  # background: rebuild once 1% of the lengths changed ...
    REBUILD_EVERY_S = 0.5  # ... or this long after the last rebuild started

    def _stale_enough(self, built_version: int) -> bool:
        import time

        now = time.monotonic()
        if (self._version - built_version >= max(1, int(self.REBUILD_SHARE * self._n))
                or now - self._last_start >= self.REBUILD_EVERY_S):
            self._last_start = now
            return True
        return False

    def _columns(self):
        return self._cols[:, : self._n].copy(), list(self._pids), self._version

    def _start_rebuild(self) -> None:
        """Hand the current columns to the rebuild thread (started once: starting a thread
        per rebuild costs the caller a GIL round trip)."""
        import threading

        if self._building is None:
            self._job = None
            self._job_cv = threading.Condition()
            self._idle = True
            self._building = threading.Thread(target=self._rebuild_loop, name="das-length-index",
                                              daemon=True)
            self._building.start()
        with self._job_cv:
            self._job = self._columns()
            self._idle = False
            self._job_cv.notify_all()

    def _rebuild_loop(self) -> None:
        while True:
            with self._job_cv:
                while self._job is None:
                    self._idle = True
                    self._job_cv.notify_all()
                    self._job_cv.wait()
                cols, pids, version = self._job
                self._job = None
            built = self._build_index(cols, pids, version)
            cur = self._cache
            if cur is None or cur[0] < version:
                self._cache = (version, built)
            cols = pids = built = None

    def _busy(self) -> bool:
        return self._building is not None and not self._idle

    def _wait(self) -> None:
        if self._building is not None:
            with self._job_cv:
                while self._job is not None or not self._idle:
                    self._job_cv.wait()

    def sync(self) -> None:
        """Wait for a background rebuild and bring the index up to date (the incremental
        index always is)."""
        if self._inc is not None:
            return
        self._wait()
        if self._cache is None or self._cache[0] != self._version:
            self._cache = (self._version, self._build_index(*self._columns()))

    def _build_index(self, cols: np.ndarray, pids: list[str], version: int = 0):
        if cols.shape[1] == 0:
            return None, {}, {}
        pid_idx, lengths = cols[0], cols[2].astype(np.float64)
        if self.config.class_thresholds is not None:
            thresholds = np.asarray(self.config.class_thresholds, dtype=np.float64)
        else:
            thresholds = np.quantile(lengths, self.config.class_quantiles)
        # Per-problem median without a Python loop: sort by (problem, length), then the one
        # or two middle entries of each problem's run. Lengths are token counts (>= 0,
        # checked on the way in), so one sort of the key problem * 2**32 + length gives
        # that order ~30x faster than a two-key lexsort (4.7 vs 0.15 ms at 32k lengths:
        # the rebuild thread then takes a core for ~5 ms less every rebuild).
        raw = cols[2]
        if int(raw.max()) < (1 << 32):  # (cols is not empty here)
            key = np.sort(pid_idx.astype(np.int64) * (1 << 32) + raw.astype(np.int64))
            sorted_len = (key & ((1 << 32) - 1)).astype(np.float64)
        else:
            sorted_len = lengths[np.lexsort((lengths, pid_idx))]
        counts = np.bincount(pid_idx, minlength=len(pids))
        present = np.flatnonzero(counts)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[present]
        c = counts[present]
        median = (sorted_len[starts + (c - 1) // 2] + sorted_len[starts + c // 2]) / 2.0
        init_of = np.full(len(pids), -1, dtype=np.int64)
        init_of[present] = _classify_array(median, thresholds)
        initial = {pids[i]: int(k) for i, k in zip(present.tolist(), init_of[present].tolist())}
        group_of = init_of[pid_idx]
        classes = _classify_array(lengths, thresholds)
        groups = {_ALL: _Group(lengths, classes)}
        for k in (SHORT, MEDIUM, LONG):
            mask = group_of == k
            if mask.any():
                groups[k] = _Group(lengths[mask], classes[mask])
        return thresholds, initial, groups


def _classify_array(lengths: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return np.searchsorted(thresholds, lengths, side="left").astype(np.int64)


def _classify(length: float, thresholds: np.ndarray) -> int:
    return int(np.searchsorted(thresholds, length, side="left"))
