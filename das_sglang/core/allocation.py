"""Draft-budget allocation math: the paper's closed form and the exact per-step allocator.

Both minimise the modeled time to finish the current decode batch,

    T = sum over forwards of cost.forward_time(tokens of the forward)
      = c_base * N  +  c_tok * (tokens processed by all requests)  [+ c_kv * KV tokens read]

where ``N`` (the makespan in forwards) is set by the request that needs the most forwards.
Drafting for a request that finishes before the makespan anyway only adds tokens; drafting for
a critical one shortens ``N``. Hence: short requests get nothing, and budgets shrink as the
batch grows (``c_base`` is shared, every draft token costs ``c_tok`` per row).

Paper (lifetime) model, request ``i`` of ``l_i`` tokens drafting ``p_i`` tokens in total needs
``N_i = l_i - (l_i / k_i) (1 - exp(-alpha_i p_i / l_i))`` forwards. For a target ``N`` the
cheapest budget is the closed form ``paper_budget``; ``paper_optimal_n`` solves
``dT/dN = 0``:  c_base + c_tok * sum_{l_i > N} (1 - k_i / (alpha_i (1 - k_i (1 - N / l_i)))) = 0.

Per-step model (``optimal_step_budgets``): the batch keeps this step's budgets until it ends
(stationary plan). Request ``i`` with budget ``b`` accepts ``E_i(b)`` tokens per forward (its
calibrated draft-tree curve), so it needs ``r_i / (1 + E_i(b))`` more forwards. The optimum
over integer budgets is found exactly by sweeping the makespan target ``N`` over every
breakpoint ``r_i / (1 + E_i(b))``, each row taking the least budget that meets ``N``.

One-step lookahead (``lookahead_step_budgets``, LengthAware's default): the stationary plan
averages a width over the batch's whole future, so a width that pays in the short tail also
looks good while the batch is full. Instead pay this forward's drafts at today's batch size
and value each accepted token of row ``i`` by ``dT*/dr_i`` of the stationary optimum
(``token_values``): ``c_base`` shared by the rows likely to finish last, plus the row's own
per-forward cost, per ``1 + E_i`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from das_sglang.core.cost_model import CostModel
from das_sglang.native import best_per_row as _native_best_per_row
from das_sglang.native import lookahead_per_row as _native_lookahead_per_row

# The per-row allocators below run natively (native/src/allocation.cpp: the same math in
# numpy's order, bitwise the same results, ~5x faster at batch 512); the numpy functions
# stay as the reference (tests/test_native_allocation.py). False: numpy everywhere.
NATIVE = True


# ---- the paper's closed form ---------------------------------------------------------------
def paper_steps(p, length, alpha_p, k_p):
    """Forwards a request of ``length`` tokens needs when drafting ``p`` tokens in total."""
    length = np.asarray(length, dtype=np.float64)
    alpha_p = np.asarray(alpha_p, dtype=np.float64)
    k_p = np.asarray(k_p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        saved = (length / k_p) * -np.expm1(-alpha_p * np.asarray(p, dtype=np.float64) / length)
    return length - np.nan_to_num(saved, nan=0.0, posinf=0.0)


def paper_budget(length, n_steps, alpha_p, k_p):
    """Closed form ``p* = -(l / alpha) ln(1 - k (1 - N / l))``: least total drafts to finish
    ``length`` tokens in ``n_steps`` forwards.

    0 when ``N >= l`` (the request is not on the critical path); ``inf`` when ``N`` is below
    what any budget reaches (``N <= l (1 - 1/k)``) or nothing is ever accepted (alpha = 0).
    """
    length = np.asarray(length, dtype=np.float64)
    n = np.asarray(n_steps, dtype=np.float64)
    alpha_p = np.asarray(alpha_p, dtype=np.float64)
    k_p = np.asarray(k_p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = 1.0 - k_p * (1.0 - n / np.maximum(length, 1e-300))
        p = -(length / alpha_p) * np.log(inner)
    p = np.where((inner <= 0.0) | (alpha_p <= 0.0) | ~np.isfinite(k_p), np.inf, p)
    p = np.where(n >= length, 0.0, p)
    return float(p) if p.ndim == 0 else p


def paper_objective_n(n_steps: float, length, alpha_p, k_p, cost: CostModel) -> float:
    """Modeled time ``c_base N + c_tok sum_i (min(l_i, N) + p_i(N))`` for a makespan target N."""
    length = np.asarray(length, dtype=np.float64)
    p = paper_budget(length, n_steps, alpha_p, k_p)
    drafts = float(np.sum(p)) if cost.c_tok_s > 0 else 0.0  # free drafts: any budget costs 0
    return float(cost.c_base_s * n_steps + cost.c_tok_s * (np.sum(np.minimum(length, n_steps)) + drafts))


def paper_objective(p, length, alpha_p, k_p, cost: CostModel) -> float:
    """Modeled time of total draft budgets ``p`` (one per request): the brute-force target."""
    steps = paper_steps(p, length, alpha_p, k_p)
    return float(cost.c_base_s * np.max(steps) + cost.c_tok_s * np.sum(steps + np.asarray(p)))


def paper_min_steps(length, alpha_p, k_p) -> float:
    """Least makespan any budget reaches: ``max_i l_i (1 - 1/k_i)`` (``l_i`` if alpha_i = 0)."""
    length = np.asarray(length, dtype=np.float64)
    alpha_p = np.broadcast_to(np.asarray(alpha_p, dtype=np.float64), length.shape)
    k_p = np.broadcast_to(np.asarray(k_p, dtype=np.float64), length.shape)
    with np.errstate(divide="ignore"):
        lb = np.where(alpha_p > 0.0, length * (1.0 - 1.0 / k_p), length)
    return float(np.max(lb)) if len(lb) else 0.0


def paper_optimal_n(length, alpha_p, k_p, cost: CostModel, iters: int = 60) -> float:
    """Makespan target ``N*`` solving the paper's optimality condition by bisection.

    ``T(N)`` is convex on its feasible range when ``alpha_p <= k_p`` (a draft token saves at
    most one forward), so ``dT/dN`` is increasing and bisection finds its root. Returns the
    no-speculation makespan ``max l`` when speculation cannot pay off.
    """
    length = np.asarray(length, dtype=np.float64)
    if length.size == 0:
        return 0.0
    alpha_p = np.broadcast_to(np.asarray(alpha_p, dtype=np.float64), length.shape)
    k_p = np.broadcast_to(np.asarray(k_p, dtype=np.float64), length.shape)
    top = float(np.max(length))
    lo = paper_min_steps(length, alpha_p, k_p)
    if lo >= top or cost.c_base_s <= 0.0:
        return top

    def slope(n: float) -> float:
        on = (length > n) & (alpha_p > 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            inner = 1.0 - k_p[on] * (1.0 - n / length[on])
            dp = np.where(inner > 0, -k_p[on] / (alpha_p[on] * inner), -np.inf)
        return cost.c_base_s + cost.c_tok_s * float(np.sum(1.0 + dp))

    a, b = lo, top
    for _ in range(iters):
        mid = 0.5 * (a + b)
        if slope(mid) < 0.0:
            a = mid
        else:
            b = mid
    n_star = b
    # Guard against a non-convex input (alpha_p > k_p): never worse than not speculating.
    t_star = paper_objective_n(n_star, length, alpha_p, k_p, cost)
    if t_star > paper_objective_n(top, length, alpha_p, k_p, cost):
        return top
    return n_star


# ---- exact per-step allocator ---------------------------------------------------------------
def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique(a)`` of an array that is (normally) sorted already: no second sort."""
    if len(a) < 2:
        return np.unique(a)
    step = a[1:] >= a[:-1]
    if not step.all():  # not sorted (or NaN): numpy's way
        return np.unique(a)
    keep = np.empty(len(a), dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def stable_argsort(a: np.ndarray) -> np.ndarray:
    """``np.argsort(a, kind="stable")`` of a 1-D float array, computed faster (per-step
    path: the numpy stable sort of floats is a merge sort, ~5x slower than its default
    sort): the default sort ranks the values, ties share a rank, and the (rank, index) keys,
    all distinct, sort to the one stable order. NaN (no total order) takes numpy's path."""
    n = len(a)
    if n < 512 or np.isnan(a).any():
        return np.argsort(a, kind="stable")
    perm = np.argsort(a)
    s = a[perm]
    new = np.empty(n, dtype=np.int64)
    new[0] = 0
    np.not_equal(s[1:], s[:-1], out=new[1:], casting="unsafe")
    rank = np.empty(n, dtype=np.int64)
    rank[perm] = np.cumsum(new)
    rank *= n
    rank += np.arange(n)
    return np.argsort(rank)


@dataclass(frozen=True)
class StepAllocation:
    budgets: np.ndarray  # int32 per row
    width: int  # max budget (0 = no speculation)
    modeled_s: float  # modeled time to finish the batch with this plan
    baseline_s: float  # modeled time without speculation
    makespan_steps: float  # modeled forwards until the last request finishes


def pad_curves(curves: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """List of per-row curves -> (rows x (max_len) matrix, edge-padded; usable budget per row)."""
    m = np.array([len(c) - 1 for c in curves], dtype=np.int64)
    width = int(m.max(initial=0))
    acc = np.zeros((len(curves), width + 1))
    for i, c in enumerate(curves):
        acc[i, : len(c)] = c
        acc[i, len(c):] = c[-1]
    return acc, m


def step_objective(
    remaining: np.ndarray,
    curves: Sequence[np.ndarray] | tuple[np.ndarray, np.ndarray],
    budgets: np.ndarray,
    kv_tokens: np.ndarray,
    cost: CostModel,
    uniform_width: bool,
) -> tuple[float, float]:
    """(modeled seconds, makespan in forwards) of keeping ``budgets`` until the batch ends.

    ``curves[i][b]`` = expected accepted tokens per forward of row ``i`` with budget ``b``
    (budgets beyond the curve accept no more); or the ``pad_curves`` pair. ``kv_tokens[i]`` =
    KV entries row ``i`` reads per forward. With ``uniform_width`` every row is charged
    ``1 + max(budgets)`` tokens.
    """
    if len(remaining) == 0:
        return 0.0, 0.0
    acc, m = curves if isinstance(curves, tuple) else pad_curves(curves)
    budgets = np.asarray(budgets, dtype=np.int64)
    got = acc[np.arange(len(budgets)), np.minimum(budgets, m)]
    steps = np.asarray(remaining, dtype=np.float64) / (1.0 + got)
    width = int(budgets.max(initial=0))
    tokens = 1.0 + (width if uniform_width else budgets)
    per_row = steps * (cost.c_tok_s * tokens + cost.c_kv_s * np.asarray(kv_tokens, dtype=np.float64))
    makespan = float(steps.max())
    return float(cost.c_base_s * makespan + per_row.sum()), makespan


def optimal_step_budgets(
    remaining: np.ndarray,
    curves: Sequence[np.ndarray] | tuple[np.ndarray, np.ndarray],
    kv_tokens: np.ndarray,
    cost: CostModel,
    uniform_width: bool = False,
    buckets: Sequence[int] | None = None,
) -> StepAllocation:
    """Exact minimiser of ``step_objective`` over integer budgets ``0 <= b_i <= m_i``
    (with ``uniform_width`` and ``buckets``: each width charged as its padded bucket)."""
    remaining = np.asarray(remaining, dtype=np.float64)
    kv_tokens = np.asarray(kv_tokens, dtype=np.float64)
    if len(remaining) == 0:
        return StepAllocation(np.zeros(0, dtype=np.int32), 0, 0.0, 0.0, 0.0)
    acc, m = curves if isinstance(curves, tuple) else pad_curves(curves)
    if uniform_width:
        return _best_uniform(remaining, acc, m, kv_tokens, cost, buckets)
    return _best_per_row(remaining, acc, m, kv_tokens, cost)


def _native_args(remaining, acc, m, kv_tokens) -> tuple:
    return (np.ascontiguousarray(remaining, dtype=np.float64), np.ascontiguousarray(acc, dtype=np.float64),
            np.ascontiguousarray(m, dtype=np.int64), np.ascontiguousarray(kv_tokens, dtype=np.float64))


def _best_per_row(remaining, acc, m, kv_tokens, cost) -> StepAllocation:
    if NATIVE:
        budgets, width, modeled, baseline, makespan = _native_best_per_row(
            *_native_args(remaining, acc, m, kv_tokens), cost.c_base_s, cost.c_tok_s, cost.c_kv_s)
        return StepAllocation(budgets, int(width), modeled, baseline, makespan)
    return _best_per_row_numpy(remaining, acc, m, kv_tokens, cost)


def _best_per_row_numpy(remaining, acc, m, kv_tokens, cost) -> StepAllocation:
    b = np.arange(acc.shape[1])
    usable = b[None, :] <= m[:, None]
    steps = remaining[:, None] / (1.0 + acc)  # rows x budgets, non-increasing along budgets
    row_cost = steps * (cost.c_tok_s * (1.0 + b)[None, :] + cost.c_kv_s * kv_tokens[:, None])
    row_cost = np.where(usable, row_cost, np.inf)
    # A row may take more than the least budget meeting N when that is cheaper (drafts
    # that save KV reads), so its cost at least budget b is the suffix minimum.
    best_cost = np.minimum.accumulate(row_cost[:, ::-1], axis=1)[:, ::-1]
    # Event (i, b): when the target N drops below steps[i, b], row i's least budget -> b + 1.
    ev = usable[:, 1:]
    rows_a = np.nonzero(ev)[0]
    vals_a = steps[:, :-1][ev]
    with np.errstate(invalid="ignore"):  # inf - inf beyond a row's usable budgets
        deltas_a = np.diff(best_cost, axis=1)[ev]
    n_lo = float(steps[np.arange(len(m)), m].max())
    top = float(remaining.max())
    baseline = cost.c_base_s * top + float(row_cost[:, 0].sum())
    base = float(best_cost[:, 0].sum())
    # Every candidate N is >= n_lo: an event at or below n_lo has fired for all of them (its
    # delta is in every t alike), so only the events above it are ranked and summed -- ~2 %
    # of them at batch 512 (bench_host_path's plans), the rows shorter than the longest.
    high = vals_a > n_lo
    v_high = vals_a[high]
    order = stable_argsort(v_high)
    v_sorted = v_high[order]
    prefix = np.concatenate([[0.0], np.cumsum(deltas_a[high][order])])
    cand = _sorted_unique(np.concatenate([[n_lo], v_sorted[v_sorted < top], [top]]))
    idx = np.searchsorted(v_sorted, cand, side="right")  # events with value > cand have fired
    t = cost.c_base_s * cand + base + (prefix[-1] - prefix[idx])
    best = int(np.flatnonzero(t <= t.min() * (1 + 1e-12))[-1])  # ties: least speculation
    n_star = float(cand[best])
    least = np.bincount(rows_a[vals_a > n_star], minlength=len(m))
    budgets = np.argmin(np.where(b[None, :] >= least[:, None], row_cost, np.inf), axis=1).astype(np.int32)
    # Rows that took more than their least budget may finish before N*: report the plan's
    # own time (<= t[best], and optimal: any plan's makespan is one of the candidates).
    modeled, makespan = step_objective(remaining, (acc, m), budgets, kv_tokens, cost, False)
    return StepAllocation(budgets, int(budgets.max(initial=0)), modeled, baseline, makespan)


def _to_graph_widths(acc: np.ndarray, cost: CostModel) -> np.ndarray:
    """``acc`` edge-padded out to the cost model's widest CUDA-graph width: a uniform
    forward may be padded past every row's tree when the graph replay is cheaper than an
    eager forward at the trees' own width (``CostModel.graph_widths``; the padding is never
    accepted, so the acceptance stays the rows' last)."""
    top = max(cost.graph_widths, default=-1)
    if top < acc.shape[1]:
        return acc
    return np.concatenate([acc, np.repeat(acc[:, -1:], top + 1 - acc.shape[1], axis=1)], axis=1)


def _best_uniform(remaining, acc, m, kv_tokens, cost, buckets=None) -> StepAllocation:
    acc = _to_graph_widths(acc, cost)
    steps = remaining[:, None] / (1.0 + acc)  # rows x widths (acc is edge-padded)
    w = np.arange(acc.shape[1], dtype=np.float64)
    charged, extra = bucket_charges(buckets, acc.shape[1], cost)
    paid = w if charged is None else charged.astype(np.float64)
    per_row = steps * (cost.c_tok_s * (1.0 + paid)[None, :] + cost.c_kv_s * kv_tokens[:, None])
    makespan = steps.max(axis=0)
    t = cost.c_base_s * makespan + per_row.sum(axis=0)
    if extra is not None:
        t = t + extra * makespan
    best = int(np.argmin(t))  # ties: the smallest width
    budgets = np.minimum(best, m).astype(np.int32)
    # (the forward's width: past every tree only when a graph width made that cheaper)
    width = best if cost.is_graph_width(best) else int(budgets.max(initial=0))
    return StepAllocation(budgets, width, float(t[best]), float(t[0]), float(makespan[best]))


# ---- one-step lookahead allocator -----------------------------------------------------------
def token_values(
    remaining: np.ndarray,
    curves: tuple[np.ndarray, np.ndarray],
    kv_tokens: np.ndarray,
    cost: CostModel,
    uniform_width: bool,
    spread: float,
) -> tuple[np.ndarray, StepAllocation]:
    """Seconds one accepted token of each row saves later (``dT/dr_i`` of the stationary plan).

    A token of row ``i`` saves ``1 / (1 + E_i(b_i*))`` of its future forwards: its own share
    of them (``c_tok`` per processed token, ``c_kv`` per KV entry) and, when the row may be the
    last to finish, ``c_base``. Which row ends last is uncertain, so ``c_base`` is split by a
    softmax over the rows' modeled forwards-to-go (temperature ``spread * N*``).
    """
    future = optimal_step_budgets(remaining, curves, kv_tokens, cost, uniform_width)
    acc, m = curves
    rows = np.arange(len(remaining))
    got = acc[rows, np.minimum(future.budgets, m)]
    steps = remaining / (1.0 + got)
    n_star = max(float(steps.max()), 1e-9)
    weight = np.exp((steps - n_star) / (max(spread, 1e-9) * n_star))
    critical = weight / weight.sum()
    tokens = 1.0 + (future.width if uniform_width else future.budgets)
    per_row = cost.c_tok_s * tokens + cost.c_kv_s * kv_tokens
    return (critical * cost.c_base_s + per_row) / (1.0 + got), future


def bucket_charges(buckets: Sequence[int] | None, n_widths: int, cost: CostModel):
    """Per candidate width ``0..n_widths-1``: the width the forward is padded to (the
    smallest bucket >= it; the largest bucket caps) and that forward's extra seconds
    (CUDA graph vs eager tier, ``cost.width_extra_s``, relative to width 0). None, None
    without buckets and tiers."""
    w = np.arange(n_widths)
    if buckets is None and not cost.has_tiers:
        return None, None
    if buckets is None:
        charged = w
    else:
        b = np.asarray(sorted(buckets), dtype=np.int64)
        charged = b[np.minimum(np.searchsorted(b, w), len(b) - 1)]
        charged = np.maximum(charged, w)  # beyond the largest bucket: the width itself
    extra = np.asarray(cost.width_extra_s(charged), dtype=np.float64) - float(cost.width_extra_s(0))
    return charged, extra


def lookahead_step_budgets(
    remaining: np.ndarray,
    curves: Sequence[np.ndarray] | tuple[np.ndarray, np.ndarray],
    kv_tokens: np.ndarray,
    cost: CostModel,
    uniform_width: bool = False,
    spread: float = 0.05,
    buckets: Sequence[int] | None = None,
) -> StepAllocation:
    """Budgets for *this* forward only: maximise ``sum_i value_i * E_i(b_i) - c_tok * tokens``.

    The stationary plan prices a draft token by averaging over the batch's whole future, so
    a width that pays in the short tail also looks good while the batch is still full. Here
    the draft tokens are paid now, at today's batch size, and each accepted token is worth
    what it saves later (``token_values``): speculation starts when the batch has shrunk
    enough, and goes to the rows likely to finish last.
    """
    remaining = np.asarray(remaining, dtype=np.float64)
    kv_tokens = np.asarray(kv_tokens, dtype=np.float64)
    if len(remaining) == 0:
        return StepAllocation(np.zeros(0, dtype=np.int32), 0, 0.0, 0.0, 0.0)
    acc, m = curves if isinstance(curves, tuple) else pad_curves(curves)
    n = len(m)
    if NATIVE and not uniform_width:
        free = max(cost.free_tokens - n, 0.0)
        got = _native_lookahead_per_row(*_native_args(remaining, acc, m, kv_tokens), cost.c_base_s,
                                        cost.c_tok_s, cost.c_kv_s, spread, free)
        if got is not None:  # (None: a NaN or negative gain, numpy ranks every node below)
            budgets, width, modeled, baseline, makespan = got
            return StepAllocation(budgets, int(width), modeled, baseline, makespan)
    value, future = token_values(remaining, (acc, m), kv_tokens, cost, uniform_width, spread)
    if uniform_width:
        acc = _to_graph_widths(acc, cost)
    b = np.arange(acc.shape[1], dtype=np.float64)
    # Draft tokens paid this forward: those past the rows' own tokens and the cost model's
    # free_tokens (the roofline ridge point; 0 = every draft token costs c_tok).
    if uniform_width:
        roots_paid = float(cost.paid_tokens(n))
        rows = np.arange(n)
        capped = np.minimum(b[None, :].astype(np.int64), m[:, None])
        charged, extra = bucket_charges(buckets, len(b), cost)
        paid = b if charged is None else charged.astype(np.float64)
        # the forward is padded to the bucket: its tokens and tier are what is paid
        gain = ((value[:, None] * acc[rows[:, None], capped]).sum(axis=0)
                - cost.c_tok_s * (cost.paid_tokens(n * (1.0 + paid)) - roots_paid))
        if extra is not None:
            gain = gain - extra
        width = int(np.argmax(gain))  # ties: the smallest width
        budgets = np.minimum(width, m).astype(np.int32)
        best_gain = float(gain[width])
        if not cost.is_graph_width(width):  # (a graph width stays the forward's width)
            width = int(budgets.max(initial=0))
    else:
        budgets, best_gain = _fill_nodes(value, acc, m, cost.c_tok_s, max(cost.free_tokens - n, 0.0))
        width = int(budgets.max(initial=0))
    return StepAllocation(budgets, width, future.baseline_s - best_gain,
                          future.baseline_s, future.makespan_steps)


FREE_TOKEN_SHARE = 0.1  # what a token below the roofline ridge still costs, in c_tok


def _fill_nodes(value: np.ndarray, acc: np.ndarray, m: np.ndarray, c_tok: float,
                free: float) -> tuple[np.ndarray, float]:
    """Per-row budgets maximising ``sum_i value_i * E_i(b_i) - c_tok * max(sum_i b_i - free, 0)``.

    Node ``b`` of row ``i`` gains ``value_i * (E_i(b) - E_i(b-1))`` (made non-increasing along
    the row, so the chosen nodes of a row are a prefix of its tree). The first ``free``
    nodes of the whole batch fit in the forward's weight-read time, so the best-gaining
    ones are taken there as long as they gain ``FREE_TOKEN_SHARE * c_tok`` (the attention,
    sampling and host work a verified token still costs); past them a node is taken only
    when it gains more than ``c_tok``. Without free tokens this is each row's own best
    budget."""
    rows, width = acc.shape
    if width <= 1 or rows == 0:
        return np.zeros(rows, dtype=np.int32), 0.0
    b = np.arange(1, width)
    delta = np.where(b[None, :] <= m[:, None], np.diff(acc, axis=1), -np.inf)
    delta = np.minimum.accumulate(delta, axis=1)
    gain = value[:, None] * delta
    flat = gain.reshape(-1)
    if c_tok >= 0.0 and not np.isnan(flat).any():
        return _take_best(flat, rows, width, c_tok, free)
    order = stable_argsort(-flat)  # row-major among ties: prefixes stay prefixes
    ranked = flat[order]
    positive = int(np.count_nonzero(ranked > FREE_TOKEN_SHARE * c_tok))
    k_free = min(int(free), positive)
    k_paid = int(np.count_nonzero(ranked[k_free:positive] > c_tok))
    take = order[: k_free + k_paid]
    budgets = np.bincount(take // (width - 1), minlength=rows).astype(np.int32)
    return budgets, float(ranked[: k_free + k_paid].sum() - c_tok * k_paid)


def _take_best(flat: np.ndarray, rows: int, width: int, c_tok: float, free: float) -> tuple[np.ndarray, float]:
    """``_fill_nodes``' selection without sorting every node (``c_tok >= 0``, no NaN): in
    the stable descending order the nodes gaining more than ``c_tok`` come first, so the
    taken ones are the best ``max(k_free, count > c_tok)``, ties taken row-major (lower
    flat index first, as the stable sort ranks them); only those are sorted, for the sum
    the sorted path adds in the same (descending) order."""
    positive = int(np.count_nonzero(flat > FREE_TOKEN_SHARE * c_tok))
    above_c = int(np.count_nonzero(flat > c_tok))
    k_free = min(int(free), positive)
    k_paid = max(0, above_c - k_free)
    k = k_free + k_paid
    if k == 0:
        return np.zeros(rows, dtype=np.int32), float(flat[:0].sum() - c_tok * 0)
    kth = np.partition(flat, len(flat) - k)[len(flat) - k]  # the k-th largest gain
    above = np.flatnonzero(flat > kth)
    take = np.concatenate([above, np.flatnonzero(flat == kth)[: k - len(above)]])
    budgets = np.bincount(take // (width - 1), minlength=rows).astype(np.int32)
    ranked = -np.sort(-flat[take])  # descending, contiguous
    return budgets, float(ranked.sum() - c_tok * k_paid)
