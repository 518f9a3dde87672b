"""Acceptance statistics: how many draft tokens verification accepts, per problem.

Saturating model (one verify step, bonus token not counted): drafting ``b`` tokens accepts on
average

    A(b; alpha, k) = k * (1 - exp(-alpha * b / k))

``alpha`` (0..1) is the acceptance rate of the first draft token (the slope at ``b = 0``) and
``k`` the saturation: however much is drafted, no more than ``k`` tokens get accepted per step
(text stops matching the history). ``A(b) <= alpha * b <= b`` always. ``alpha = 0`` or
``k = 0`` means drafts are never accepted.

The paper's closed form uses a *lifetime* parametrisation (``paper_params`` converts): over a
whole request of ``l`` tokens, drafting ``p`` tokens in total saves
``(l / k_p) * (1 - exp(-alpha_p * p / l))`` forward steps. Matching the small-draft slope
(``alpha_p / k_p = alpha``) and the saturated share of accepted tokens
(``1 / k_p = k / (1 + k)``) gives ``k_p = (1 + k) / k`` and ``alpha_p = alpha * k_p``.

Two estimates are kept per problem, both online from ``observe(proposed, accepted)``:

- ``(alpha, k)`` least-squares fitted (grid search) to the recent outcomes, shrunk to
  a prior by pseudo-observations so few outcomes give a defined, cautious answer;
- ``calibration``: observed accepted / expected accepted under the drafter's own node
  probabilities, for the rows the policy planned (``expect``), shrunk to the pooled value.

Both shrink towards the same statistics pooled over all problems (which shrink towards the
fixed prior), so a new problem starts from what the others showed.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from itertools import repeat
from typing import Sequence

import numpy as np

from das_sglang.core import budget_rows as R
from das_sglang.core.policy_config import PolicyConfig


def saturating_accept(budget, alpha: float, k: float):
    """Expected accepted draft tokens ``A(b) = k (1 - exp(-alpha b / k))`` (0 when k = 0)."""
    b = np.asarray(budget, dtype=np.float64)
    if k <= 0.0 or alpha <= 0.0:
        out = np.zeros_like(b)
    else:
        out = k * -np.expm1(-alpha * b / k)
    return float(out) if out.ndim == 0 else out


def paper_params(alpha: float, k: float) -> tuple[float, float]:
    """Per-step ``(alpha, k)`` -> the paper's lifetime ``(alpha_p, k_p)`` (module docstring).

    ``k = 0`` maps to ``k_p = inf`` (nothing can be saved), ``alpha = 0`` to ``alpha_p = 0``.
    """
    if k <= 0.0 or alpha <= 0.0:
        return 0.0, float("inf")
    k_p = (1.0 + k) / k
    return alpha * k_p, k_p


@dataclass(frozen=True)
class AcceptanceEstimate:
    alpha: float
    k: float
    calibration: float  # multiply the drafter's expected accepted tokens by this
    n_obs: int
    mean_accepted: float  # per verify step with drafts, observed (prior mean with no data)


# Grids for the robust fit: alpha linear on [0, 1], k geometric up to the largest budget.
_ALPHA_GRID = np.linspace(0.0, 1.0, 41)


def fit_saturating(
    budgets: np.ndarray,
    accepted: np.ndarray,
    prior_alpha: float,
    prior_k: float,
    prior_weight: float,
    k_max: float,
) -> tuple[float, float]:
    """Least-squares fit of ``(alpha, k)`` to outcomes ``accepted[j]`` of ``budgets[j]``.

    The allocator needs the *mean* accepted count, so squared loss is the right target; it
    is computed from per-budget means (the same loss, far fewer terms), weighted by outcomes
    / variance (long drafts scatter more). Outcomes are bounded (0 <= a <= b), so one odd
    outcome moves a mean by at most b / n. ``prior_weight`` pseudo-outcomes of the prior
    model at budgets 1, 4 and 16 keep few outcomes from giving a wild answer (each worth a
    quarter token^2 of variance).
    Grid search with two zooms: never diverges.
    """
    b = np.asarray(budgets, dtype=np.int64)
    a = np.asarray(accepted, dtype=np.float64)
    values, inverse, counts = np.unique(b, return_inverse=True, return_counts=True)
    means = np.bincount(inverse, weights=a) / counts
    # Weight = outcomes / variance: long drafts' accepted counts scatter far more than short
    # ones', so plain counts would let their noise drag alpha around. The variance floor
    # (a quarter token^2) keeps a budget seen once or always-identical from dominating.
    var = np.bincount(inverse, weights=(a - means[inverse]) ** 2) / counts
    xb, xa, w = values.astype(np.float64), means, counts / np.maximum(var, 0.25)
    pb = np.array([1.0, 4.0, 16.0])
    xb = np.concatenate([xb, pb])
    xa = np.concatenate([xa, saturating_accept(pb, prior_alpha, prior_k)])
    w = np.concatenate([w, np.full(3, prior_weight / 3.0 / 0.25)])
    k_hi = max(k_max, 1.0)
    alphas, ks = _ALPHA_GRID, np.geomspace(0.05, k_hi, 40)
    for _ in range(3):  # coarse grid, then two zooms around the best cell
        loss = _squared_loss(alphas, ks, xb, xa, w)
        i, j = np.unravel_index(int(np.argmin(loss)), loss.shape)
        best_alpha, best_k = float(alphas[i]), float(ks[j])
        da = alphas[1] - alphas[0]
        alphas = np.clip(np.linspace(best_alpha - da, best_alpha + da, 21), 0.0, 1.0)
        kr = ks[min(j + 1, len(ks) - 1)] / ks[max(j - 1, 0)]
        ks = np.clip(np.geomspace(best_k / np.sqrt(kr), best_k * np.sqrt(kr), 21), 0.05, k_hi)
    return best_alpha, best_k


def _squared_loss(alphas, ks, b, a, w) -> np.ndarray:
    al = alphas[:, None, None]
    kk = ks[None, :, None]
    pred = kk * -np.expm1(-al * b[None, None, :] / kk)
    return (w * (pred - a[None, None, :]) ** 2).sum(axis=2)


class _Sums:
    """Every problem's calibration sums, one row per problem (``slot``): column 0 the
    accepted tokens of outcomes with a planned expectation (``sum_matched``), column 1
    those expectations (``sum_expected``). Arrays, so a plan reads its rows' factors in one
    gather (``AcceptanceTracker.calibration_rows``), not one attribute read per problem."""

    __slots__ = ("arr", "free", "next")

    def __init__(self) -> None:
        self.arr = np.zeros((64, 2))
        self.free: list[int] = []
        self.next = 0

    def take(self) -> int:
        if self.free:
            return self.free.pop()
        if self.next == len(self.arr):
            self.arr = np.concatenate([self.arr, np.zeros_like(self.arr)])
        self.next += 1
        return self.next - 1

    def release(self, slot: int) -> None:
        self.arr[slot] = 0.0
        self.free.append(slot)


class _SumColumn:
    """A _ProblemStats field stored in column ``col`` of its tracker's _Sums row."""

    def __init__(self, col: int) -> None:
        self.col = col

    def __get__(self, st, owner=None):
        return self if st is None else float(st.sums.arr[st.slot, self.col])

    def __set__(self, st, value: float) -> None:
        st.sums.arr[st.slot, self.col] = value


class _ProblemStats:
    __slots__ = ("recent", "n_obs", "sum_accepted", "fit", "dirty", "sums", "slot")

    def __init__(self, memory: int, sums: _Sums) -> None:
        self.recent: deque[tuple[int, int]] = deque(maxlen=memory)
        self.n_obs = 0
        self.sum_accepted = 0.0
        self.fit: tuple[float, float] | None = None
        self.dirty = 0
        self.sums = sums
        self.slot = sums.take()

    # the accepted tokens of outcomes with a planned expectation, and those expectations:
    # kept in the tracker's _Sums (Python floats out, the same IEEE additions in)
    sum_matched = _SumColumn(0)
    sum_expected = _SumColumn(1)


def _bin(budget):
    """Budget bin: 0 for 1, 1 for 2, 2 for 3-4, 3 for 5-8, ... (geometric)."""
    b = np.maximum(np.asarray(budget, dtype=np.int64), 1)
    out = np.ceil(np.log2(b)).astype(np.int64)
    return int(out) if out.ndim == 0 else out


def _n_bins(max_budget: int) -> int:
    return _bin(max(max_budget, 1)) + 1


GLOBAL = "*"  # key of the statistics pooled over every problem


class AcceptanceTracker:
    """Per-problem acceptance estimates, updated from verification outcomes.

    Two levels: every outcome also feeds statistics pooled over all problems, and a
    problem's estimates shrink towards the pooled ones (not towards the fixed prior), so a
    problem seen for the first time starts from what the other problems showed.
    """

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._sums = _Sums()
        self._stats: dict[str, _ProblemStats] = {GLOBAL: _ProblemStats(4 * config.acceptance_memory, self._sums)}
        # problem -> its _Sums row (the pooled statistics' is not here), and the slots of
        # the latest problem list calibration_rows read (that list, the table's version)
        self._slot: dict[str, int] = {}
        self._slot_version = 0
        self._slots_memo: tuple | None = None
        # Calibration by budget: per budget bin (1, 2, 3-4, 5-8, ...), pooled over problems,
        # accepted and drafter-expected tokens. Deep draft nodes are far more overconfident
        # than shallow ones (a single history continuation gets probability 1), so one
        # factor for all budgets overstates wide drafts and understates narrow ones.
        self._by_budget = np.zeros((_n_bins(config.max_budget), 2))
        # (problem_id, budget) -> expected accepted tokens of planned rows awaiting outcome.
        self._pending: dict[tuple[str, int], deque[float]] = defaultdict(deque)
        # expect_many_later batches not yet in _pending (see there)
        self._later: list[tuple] = []

    def _get(self, problem_id: str) -> _ProblemStats:
        st = self._stats.get(problem_id)
        if st is None:
            st = self._stats[problem_id] = _ProblemStats(self.config.acceptance_memory, self._sums)
            if problem_id != GLOBAL:
                self._slot[problem_id] = st.slot
                self._slot_version += 1
        return st

    def forget(self, problem_ids) -> None:
        """Drop the statistics of problems that left the history (bounded memory); the
        pooled statistics keep what they taught."""
        self._flush_later()
        gone = set(problem_ids) - {GLOBAL}
        for pid in gone:
            st = self._stats.pop(pid, None)
            if st is not None:
                del self._slot[pid]
                self._sums.release(st.slot)
                self._slot_version += 1
        if gone and self._pending:
            for key in [k for k in self._pending if k[0] in gone]:
                del self._pending[key]

    @property
    def num_problems(self) -> int:
        return len(self._stats) - 1

    def problem_ids(self) -> list[str]:
        return [p for p in self._stats if p != GLOBAL]

    def problem_id_set(self) -> set[str]:
        """:meth:`problem_ids` as a set (one C pass over the statistics' keys)."""
        out = set(self._stats)
        out.discard(GLOBAL)
        return out

    def expect(self, problem_id: str, budget: int, expected: float) -> None:
        """Record the drafter's expected accepted tokens for a planned row (for calibration)."""
        self._flush_later()
        q = self._pending[(problem_id, int(budget))]
        q.append(float(expected))
        if len(q) > self.config.acceptance_memory:  # rows the engine never reported
            q.popleft()

    def expect_many(self, problem_ids: Sequence[str], budgets: Sequence[int],
                    expected: Sequence[float]) -> None:
        """:meth:`expect` for many planned rows, in row order (ints and floats)."""
        self._flush_later()
        self._expect_rows(problem_ids, budgets, expected)

    def expect_many_later(self, problem_ids: Sequence[str], rows: np.ndarray, budgets: np.ndarray,
                          expected: np.ndarray) -> None:
        """:meth:`expect_many` of ``problem_ids[i] for i in rows`` (int and float arrays),
        recorded when the next call that reads or changes the expectations comes (an
        observation, ``forget``, another ``expect``): the same statistics, bit for bit, but
        the per-row Python runs with the batch's feedback, not in the plan. At most one
        batch waits (a second plan without an observation in between records the first)."""
        self._flush_later()
        self._later.append((problem_ids, rows, budgets, expected))

    def _flush_later(self) -> None:
        if self._later:
            later, self._later = self._later, []
            for pids, rows, budgets, expected in later:
                self._expect_rows([pids[i] for i in rows.tolist()], budgets.tolist(), expected.tolist())

    def _expect_rows(self, problem_ids, budgets, expected) -> None:
        pending, memory = self._pending, self.config.acceptance_memory
        for key, e in zip(zip(problem_ids, budgets), expected):
            q = pending[key]
            q.append(e)
            if len(q) > memory:
                q.popleft()

    def observe(self, problem_id: str, proposed: int, accepted: int) -> None:
        if proposed < 0 or accepted < 0 or accepted > proposed:
            raise ValueError(
                f"invalid verify outcome for problem {problem_id!r}: proposed={proposed!r}, "
                f"accepted={accepted!r} (need 0 <= accepted <= proposed)"
            )
        if proposed == 0:
            return  # nothing was drafted: says nothing about acceptance
        self._flush_later()
        self._record(problem_id, int(proposed), int(accepted), self._by_budget[self._bin_of(proposed)])

    def _record(self, problem_id: str, proposed: int, accepted: int, budget_cell) -> None:
        """One drafted row's outcome (``proposed`` > 0): matched with the plan's expectation,
        added to its budget bin's ``budget_cell`` (accepted, expected) and to the problem's
        and the pooled statistics."""
        q = self._pending.get((problem_id, proposed))
        expected = q.popleft() if q else None
        if expected is not None:
            budget_cell[0] += accepted
            budget_cell[1] += expected
        for st in (self._get(problem_id), self._stats[GLOBAL]):
            st.recent.append((proposed, accepted))
            st.n_obs += 1
            st.sum_accepted += accepted
            st.dirty += 1
            if expected is not None:
                st.sum_expected += expected
                st.sum_matched += accepted

    def _bin_of(self, proposed: int) -> int:
        """The budget bin of ``proposed`` drafts; more than max_budget counts in the last bin."""
        return min(_bin(proposed), len(self._by_budget) - 1)

    def observe_many(self, problem_ids: Sequence[str], proposed, accepted) -> None:
        """:meth:`observe` for many rows, in row order (the same statistics, bit for bit);
        every row is validated before any is recorded."""
        p = np.asarray(proposed, dtype=np.int64).reshape(-1)
        a = np.asarray(accepted, dtype=np.int64).reshape(-1)
        if not len(problem_ids) == len(p) == len(a):
            raise ValueError(f"observe_many: {len(problem_ids)} problem_ids, {len(p)} proposed, "
                             f"{len(a)} accepted")
        bad = (p < 0) | (a < 0) | (a > p)
        if bad.any():
            i = int(np.argmax(bad))
            self.observe(problem_ids[i], int(p[i]), int(a[i]))  # raises, naming the row
        sel = np.flatnonzero(p > 0)
        if not sel.size:
            return
        self._flush_later()
        bins = np.minimum(_bin(p[sel]), len(self._by_budget) - 1).tolist()
        by_budget = self._by_budget.tolist()  # Python floats: the same IEEE additions
        if GLOBAL in problem_ids:  # (a problem named like the pooled key: row by row)
            record = self._record
            for i, k, pi, ai in zip(sel.tolist(), bins, p[sel].tolist(), a[sel].tolist()):
                record(problem_ids[i], pi, ai, by_budget[k])
            self._by_budget[:] = by_budget
            return
        # _record per row, inlined; the pooled statistics once for the batch: its recent
        # outcomes extended in row order, its expected sum added in row order, and its
        # integer-valued sums (exact in a float below 2**53) by their batch totals.
        # The calibration sums (_Sums rows): each matched row's expectation and accepted
        # tokens are added to its problem's row, and the expectation to the pooled row, in
        # row order (np.add.at adds in index order: the same additions as one by one).
        pending, get = self._pending.get, self._stats.get
        pooled = self._stats[GLOBAL]
        outcomes = list(zip(p[sel].tolist(), a[sel].tolist()))
        matched = 0
        slots, expect, got = [], [], []
        g = pooled.slot
        for i, k, pa in zip(sel.tolist(), bins, outcomes):
            pid = problem_ids[i]
            proposed, accepted = pa
            q = pending((pid, proposed))
            st = get(pid) or self._get(pid)
            st.recent.append(pa)
            st.n_obs += 1
            st.sum_accepted += accepted
            st.dirty += 1
            if q:
                expected = q.popleft()
                cell = by_budget[k]
                cell[0] += accepted
                cell[1] += expected
                slots += (st.slot, g)
                expect += (expected, expected)
                got += (accepted, 0)
                matched += accepted
        if slots:
            arr = self._sums.arr
            at = np.asarray(slots, np.int64)
            np.add.at(arr[:, 1], at, np.asarray(expect, np.float64))
            np.add.at(arr[:, 0], at, np.asarray(got, np.float64))
        pooled.recent.extend(outcomes)
        pooled.n_obs += len(outcomes)
        pooled.sum_accepted += sum(a for _, a in outcomes)
        pooled.dirty += len(outcomes)
        pooled.sum_matched += matched
        self._by_budget[:] = by_budget

    def calibration(self, problem_id: str) -> float:
        """Observed / drafter-expected accepted tokens, shrunk to the pooled ratio, which is
        shrunk to 1 (cheap: no fit)."""
        w = self.config.calibration_prior_tokens
        pooled = self._stats[GLOBAL]
        prior = (w + pooled.sum_matched) / (w + pooled.sum_expected)
        st = self._stats.get(problem_id)
        if st is None or problem_id == GLOBAL:
            return prior
        return (w * prior + st.sum_matched) / (w + st.sum_expected)

    def calibration_rows(self, problem_ids: list) -> np.ndarray:
        """:meth:`calibration` of each entry of ``problem_ids`` (the same floats), as one
        float64 array: a gather from the sums' table. The slots of the latest list are kept
        while no problem comes or goes (a plan's rows pass equal lists step after step)."""
        w, prior = self.calibration_prior()
        slots, known = self.calibration_slots(problem_ids)
        sums = self._sums.arr[slots]
        wp = w * prior
        out = (wp + sums[:, 0]) / (w + sums[:, 1])
        out[~known] = prior
        return out

    def calibration_prior(self) -> tuple:
        """(w, prior): the shrinkage weight and the pooled factor (:meth:`calibration` of a
        problem without outcomes, and of GLOBAL)."""
        w = self.config.calibration_prior_tokens
        pooled = self._stats[GLOBAL]
        return w, (w + pooled.sum_matched) / (w + pooled.sum_expected)

    def calibration_inputs(self, problem_ids: list) -> tuple:
        """What :meth:`calibration_rows` reads, for the native plan-ahead (``native.plan_ahead``):
        (the sums' table, each row's slot in it, -1 for GLOBAL and unknown problems)."""
        slots, _ = self.calibration_slots(problem_ids)
        return self._sums.arr, slots

    def calibration_slots(self, problem_ids: list) -> tuple:
        """(slots, known) of ``problem_ids`` in the sums' table (-1 / False: GLOBAL and
        unknown problems): kept for the latest list while no problem comes or goes."""
        memo = self._slots_memo
        if memo is not None and memo[1] == self._slot_version and memo[0] == problem_ids:
            slots, known = memo[2], memo[3]
        else:  # (GLOBAL and unknown problems: -1, the prior)
            get = self._slot.get
            n = len(problem_ids)
            if (memo is not None and memo[1] == self._slot_version and type(problem_ids) is list
                    and n >= R.ROWMAP_MIN_ROWS):
                # the memo's problems read their slot from it, only the others are looked up
                slots = R.regather(memo[0], memo[2], problem_ids, get, -1,
                                   R.gather_map(memo[0], problem_ids))
            else:
                slots = np.fromiter(map(get, problem_ids, repeat(-1, n)), np.int64, n)
            known = slots >= 0
            self._slots_memo = (list(problem_ids), self._slot_version, slots, known)
        return slots, known

    def calibration_many(self, problem_ids) -> dict[str, float]:
        """:meth:`calibration` of each problem (the same floats), the pooled prior once."""
        w = self.config.calibration_prior_tokens
        pooled = self._stats[GLOBAL]
        prior = (w + pooled.sum_matched) / (w + pooled.sum_expected)
        stats = self._stats
        out = {}
        for pid in problem_ids:
            st = stats.get(pid)
            out[pid] = prior if st is None or pid == GLOBAL else (
                (w * prior + st.sum_matched) / (w + st.sum_expected))
        return out

    def budget_shape(self, max_budget: int) -> np.ndarray:
        """Per budget ``b = 0..max_budget``: how the calibration at ``b`` compares with the
        pooled calibration (1 with no outcomes). A bin with few outcomes shrinks towards the
        bin below it, so budgets wider than any seen so far keep the widest measured ratio."""
        w = self.config.calibration_prior_tokens
        pooled = self._stats[GLOBAL]
        ratio = (w + pooled.sum_matched) / (w + pooled.sum_expected)
        per_bin = np.empty(len(self._by_budget))
        prior = ratio
        for k, (matched, expected) in enumerate(self._by_budget):
            prior = per_bin[k] = (w * prior + matched) / (w + expected)
        b = np.arange(max_budget + 1)
        shape = per_bin[np.minimum(_bin(np.maximum(b, 1)), len(per_bin) - 1)] / ratio
        shape[0] = 1.0
        return shape

    def estimate(self, problem_id: str) -> AcceptanceEstimate:
        cfg = self.config
        pooled = self._fit(GLOBAL, (cfg.prior_alpha, cfg.prior_k))
        st = self._stats.get(problem_id)
        if st is None or st.n_obs == 0:
            mean = saturating_accept(cfg.fixed_budget, *pooled)
            return AcceptanceEstimate(*pooled, self.calibration(problem_id), 0, mean)
        alpha, k = pooled if problem_id == GLOBAL else self._fit(problem_id, pooled)
        return AcceptanceEstimate(alpha, k, self.calibration(problem_id), st.n_obs,
                                  st.sum_accepted / st.n_obs)

    def _fit(self, key: str, prior: tuple[float, float]) -> tuple[float, float]:
        st = self._stats.get(key)
        if st is None or st.n_obs == 0:
            return prior
        # Refit after refit_every new outcomes, or a quarter of the memory once it is full,
        # so the fit's cost per outcome stays flat however often plan() asks.
        if st.fit is None or st.dirty >= max(self.config.refit_every, len(st.recent) // 4):
            arr = np.asarray(st.recent, dtype=np.float64)
            st.fit = fit_saturating(arr[:, 0], arr[:, 1], prior[0], prior[1],
                                    self.config.prior_weight, k_max=float(self.config.max_budget))
            st.dirty = 0
        return st.fit


def plan_rows(rows) -> dict:
    """Request -> its row in a plan (the same request twice: the later row, as a dict keyed
    by request has it). Read only: one plan's map serves every part that remembers it."""
    return dict(zip(R.req_ids(rows), range(len(rows))))


def remember_plan(calibration, rows, budgets: np.ndarray, base: np.ndarray, pos: dict | None = None) -> None:
    """Keep each row's budget, progress and uncalibrated per-node expectation (``base``:
    cumulative, best first) until :func:`read_pending` sees its outcome. ``pos``: the
    rows' :func:`plan_rows`, if at hand."""
    nodes = np.diff(base, axis=1)  # expected acceptance of each node, best first
    calibration._pending = plan_rows(rows) if pos is None else pos
    calibration._pending_ids = R.req_ids(rows)
    calibration._pending_generated = R.generated(rows)
    calibration._pending_budget = np.minimum(np.asarray(budgets, dtype=np.int64).reshape(-1),
                                             nodes.shape[1])
    calibration._pending_nodes = nodes


def read_pending(calibration, rows, add) -> None:
    """The previous plan's outcomes, for a calibration that remembered it (``_pending``:
    request -> planned row, ``_pending_budget``): ``add(req_ids, generated, pos, budget)``
    gets the rows planned with a budget > 0 (their request ids and generated tokens), their
    planned rows and budgets; then the per-request ``_state`` of finished requests is
    forgotten."""
    ids = R.req_ids(rows)
    got = pending_rows(calibration, rows)
    if got is not None:
        j, pos, budget = got
        add([ids[i] for i in j.tolist()], R.generated(rows)[j], pos, budget)
    forget_finished(calibration, ids)


def pending_rows(calibration, rows) -> tuple | None:
    """:func:`read_pending`'s rows: ``(j, pos, budget)`` -- the rows (indices into
    ``rows``) of the previous plan's with a budget > 0, their planned rows and budgets --
    or None when there is none."""
    index = calibration._pending
    ids = R.req_ids(rows)
    if len(index) == len(ids) and calibration._pending_ids == ids:  # the planned rows again, in order
        at = np.arange(len(ids), dtype=np.int64)
    else:
        at = np.fromiter(map(index.get, ids, repeat(-1, len(ids))), np.int64, len(ids))
    j = np.flatnonzero(at >= 0)
    if not j.size:
        return None
    pos = at[j]
    budget = calibration._pending_budget[pos]
    keep = budget > 0
    if not keep.any():
        return None
    return j[keep], pos[keep], budget[keep]


def forget_finished(calibration, ids: list, live: set | None = None, n_live: int | None = None,
                    size: int | None = None) -> None:
    """Drop the per-request ``_state`` of requests not in ``ids`` once it holds four times
    as many (``live``: ``set(ids)``, if at hand; ``n_live``: its size, when known without
    it -- the set is then made only when something is dropped; ``size``: how many states
    it holds, when known without reading it)."""
    if n_live is None:
        if live is None:
            live = set(ids)
        n_live = len(live)
    if (len(calibration._state) if size is None else size) > 4 * max(n_live, 1):  # forget finished requests
        if live is None:
            live = set(ids)
        calibration._state = {k: v for k, v in calibration._state.items() if k in live}


def read_outcomes(calibration, generated: np.ndarray, pos: np.ndarray, budget: np.ndarray, n_bins: int):
    """What :func:`read_pending` hands an ``add``: per row (``generated`` tokens now,
    planned rows ``pos``, budgets ``budget`` > 0) the drafts accepted (``generated`` grew by accepted + 1), the planned
    per-rank expectations (rows x ranks), the ranks, the accepted nodes per rank bin (the
    accepted path has one node at each depth 1..accepted) and the row's next state
    (``OutcomeCalibration.state_of``)."""
    accepted = np.minimum(np.maximum(generated - calibration._pending_generated[pos] - 1, 0), budget)
    nodes = calibration._pending_nodes[pos]
    ranks = np.arange(nodes.shape[1])
    # 0/1 counts: exact in any summation order
    one_hot = (calibration._rank_bin[:len(ranks), None] == np.arange(n_bins)[None, :]).astype(np.float64)
    hit = (ranks[None, :] < accepted[:, None]).astype(np.float64) @ one_hot
    states = 1 + np.minimum(_bin(accepted + 1), 5) + np.where(accepted == budget, 6, 0)
    return accepted, nodes, ranks, hit, states


class OutcomeCalibration:
    """Calibration conditioned on the request's previous verify outcome.

    Acceptance runs in stretches: text that copies history (a repeated derivation, the
    opening of a response the previous checkpoint also wrote) keeps matching, novel text
    keeps failing. The tokens a request's last drafts got accepted are the best cheap signal
    of which stretch it is in (on SkyThought, a request that just accepted 16+ tokens accepts
    13 of 32 next, one that accepted none 1.5). The policy sees that outcome without extra
    plumbing: ``generated_len`` grew by accepted + 1 since its last plan.

    States: 0 = no drafted outcome yet, then 1 + bin(accepted + 1) for the latest outcome
    with drafts (accepted 0, 1, 2-3, 4-7, 8-15, 16+). Per state and node-rank bin
    (``_bin``: rank 1, 2, 3-4, ...; deep nodes are far more overconfident than shallow ones)
    it keeps accepted nodes (chain reading: the best ``accepted`` nodes) and their
    drafter-expected acceptance, pooled over problems; the ratio shrinks to the bin below (the first bin to the state's ratio, which
    shrinks to the pooled ratio), ``calibration_prior_tokens`` of pseudo-evidence each.
    """

    N_STATES = 13

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._cells = np.zeros((self.N_STATES, _n_bins(config.max_budget), 2))  # accepted, expected
        self._state: dict[str, int] = {}
        # The latest plan, as arrays (one row per planned request): req -> row, generated
        # tokens, budget and per-node expected acceptance (rows x ranks, best first).
        self._pending: dict[str, int] = {}
        self._pending_ids: list = []  # the planned rows' req_ids (read_pending)
        self._pending_generated = np.zeros(0, dtype=np.int64)
        self._pending_budget = np.zeros(0, dtype=np.int64)
        self._pending_nodes = np.zeros((0, 0))
        self._ranks = np.arange(1, config.max_budget + 1)
        self._rank_bin = _bin(self._ranks)

    @classmethod
    def state_of(cls, accepted: int, budget: int = 0) -> int:
        level = min(_bin(accepted + 1), 5)
        return 1 + level + (6 if accepted == budget else 0)

    def planned(self, rows, budgets: np.ndarray, base: np.ndarray, pos: dict | None = None) -> None:
        """Remember each row's budget and uncalibrated expectation until its outcome shows."""
        remember_plan(self, rows, budgets, base, pos)

    def update(self, rows) -> None:
        """Read the previous plan's outcomes off the rows' progress (one vectorised update
        for the whole batch: per-row work here runs once per decode step)."""
        read_pending(self, rows, self._add_outcomes)

    def _add_outcomes(self, req_ids, generated, pos: np.ndarray, budget: np.ndarray) -> None:
        """Add the outcomes of rows ``req_ids`` (``generated`` tokens now; planned rows ``pos``
        with budgets > 0) to the cells."""
        n_bins = self._cells.shape[1]
        # Chain reading of the outcome: the best ``accepted`` nodes were the right ones.
        # Per row and rank bin, accepted nodes and the sum of expected acceptance over the
        # first ``budget`` ranks, summed rank by rank in order (the sums a per-row bincount
        # gives, bit for bit; ranks past a row's budget add exact zeros).
        _, nodes, ranks, hit, new_states = read_outcomes(self, generated, pos, budget, n_bins)
        expected = np.zeros((len(req_ids), n_bins))
        nodes = np.where(ranks[None, :] < budget[:, None], nodes, 0.0)
        for r, k in enumerate(self._rank_bin[:len(ranks)].tolist()):
            expected[:, k] += nodes[:, r]
        states = np.empty(len(req_ids), dtype=np.int64)
        for i, (rid, new) in enumerate(zip(req_ids, new_states.tolist())):
            states[i] = self._state.get(rid, 0)  # in order: a repeated request sees its update
            self._state[rid] = new
        # Unbuffered, in row order: the same sequence of additions per cell as row by row.
        cell_bins = np.arange(n_bins)[None, :]
        np.add.at(self._cells[:, :, 0], (states[:, None], cell_bins), hit)
        np.add.at(self._cells[:, :, 1], (states[:, None], cell_bins), expected)

    def pooled(self, prior: float) -> float:
        """Accepted / expected over every outcome seen, ``prior`` with none."""
        w = self.config.calibration_prior_tokens
        total = self._cells.sum(axis=(0, 1))
        return (w * prior + total[0]) / (w + total[1])

    def table(self) -> np.ndarray:
        """(state, rank bin) -> accepted / expected, shrunk as the class docstring says."""
        w = self.config.calibration_prior_tokens
        # No outcomes yet: a drafted node counts as accepted prior_alpha times as often as
        # the drafter claims (its probabilities ignore that text may leave all history).
        pooled = self.pooled(self.config.prior_alpha)
        out = np.empty(self._cells.shape[:2])
        for s in range(self.N_STATES):
            a, e = self._cells[s].sum(axis=0)
            prior = (w * pooled + a) / (w + e)
            for k in range(out.shape[1]):
                prior = out[s, k] = (w * prior + self._cells[s, k, 0]) / (w + self._cells[s, k, 1])
        return out

    def ratios(self, req_ids, max_budget: int) -> np.ndarray:
        """Rows x node ranks ``1..max_budget``: calibration factor of each row's nodes."""
        table = self.table()
        cols = np.minimum(_bin(np.arange(1, max_budget + 1)), table.shape[1] - 1)
        states = np.array([self._state.get(r, 0) for r in req_ids], dtype=np.int64)
        return table[states][:, cols]
