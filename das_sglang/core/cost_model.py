"""Forward-pass cost model: ``t = c_base + c_tok * n_tokens + c_kv * kv_tokens``.

``n_tokens`` counts every token the target model processes in one decode forward (one per
request plus its draft nodes; engines that pad rows to one width count the padding), and
``kv_tokens`` the context tokens whose KV cache the forward reads. The three constants are

- ``c_base_s``: per-forward cost independent of the batch: reading the weights once from HBM
  (decode is memory-bound) plus launch / scheduler overhead;
- ``c_tok_s``: per processed token: its share of the matmul FLOPs (``2 * params``);
- ``c_kv_s``: per context token read by attention (KV bytes / HBM bandwidth).

``free_tokens`` (the roofline's ridge point, 0 = a plain sum): a decode forward is
memory-bound until its matmuls take as long as reading the weights, so the first
``free_tokens`` tokens of a forward ride inside ``c_base`` and only tokens past them cost
``c_tok``: ``t = c_base + c_tok * max(n_tokens - free_tokens, 0) + c_kv * kv_tokens``
(the max, not the sum, of the memory and compute terms). Without it a 10-request batch on
an H100 would pay 17 ms for 160 draft tokens its forward processes in the weight-read time
anyway. Presets are derived in ``docs/cost_model.md``; ``CostModel.fit`` / ``calibrate``
replace them with measurements.

Width tiers (optional, measured by ``benchmarks/fit_cost_model.py``): SGLang replays a CUDA
graph only for the verify widths it captured, and runs every other width eagerly. A forward
whose rows are padded to ``width`` draft tokens costs the linear model plus
``width_extra_s(width)``: ``graph_extra_s`` at a captured width (``graph_widths``), else
``eager_extra_s`` of the nearest measured eager width (linear interpolation). ``host_s_per_request``
is the host (CPU) time DAS spends per request and step; ``step_time`` adds it.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class FitInfo:
    """How well a fitted ``CostModel`` reproduces its samples (seconds and relative)."""

    n_samples: int
    rmse_s: float
    max_abs_err_s: float
    mean_rel_err: float
    max_rel_err: float
    r2: float


_SCALARS = (int, float)


@dataclass(frozen=True)
class CostModel:
    c_base_s: float
    c_tok_s: float
    c_kv_s: float = 0.0
    name: str = "custom"
    fit_info: FitInfo | None = field(default=None, compare=False)
    graph_widths: tuple[int, ...] = ()  # draft widths with a captured CUDA graph
    graph_extra_s: tuple[float, ...] = ()  # extra seconds per forward at each graph width
    eager_widths: tuple[int, ...] = ()  # draft widths with a measured eager extra cost
    eager_extra_s: tuple[float, ...] = ()  # extra seconds per eager forward at each of them
    host_s_per_request: float = 0.0  # DAS host time per request per decode step
    free_tokens: float = 0.0  # tokens per forward inside the weight-read time (ridge point)

    def __post_init__(self) -> None:
        for attr in ("c_base_s", "c_tok_s", "c_kv_s", "host_s_per_request", "free_tokens"):
            v = getattr(self, attr)
            if not (np.isfinite(v) and v >= 0.0):
                raise ValueError(f"invalid CostModel {attr}={v!r}: must be a finite number >= 0")
        for widths, extra in (("graph_widths", "graph_extra_s"), ("eager_widths", "eager_extra_s")):
            w, e = tuple(getattr(self, widths)), tuple(getattr(self, extra))
            object.__setattr__(self, widths, tuple(int(x) for x in w))
            object.__setattr__(self, extra, tuple(float(x) for x in e))
            if len(w) != len(e):
                raise ValueError(f"invalid CostModel {widths}={w!r} / {extra}={e!r}: must have equal lengths")
            if any(x < 0 for x in w) or list(w) != sorted(set(w)):
                raise ValueError(f"invalid CostModel {widths}={w!r}: must be increasing widths >= 0")
            if not all(np.isfinite(x) for x in e):
                raise ValueError(f"invalid CostModel {extra}={e!r}: must be finite")

    @property
    def has_tiers(self) -> bool:
        return bool(self.graph_widths or self.eager_widths)

    def width_extra_s(self, width):
        """Extra seconds per forward of a batch padded to ``width`` draft tokens per row
        (graph replay at a captured width, an eager forward otherwise); 0 without tiers.
        Accepts an int or an int array."""
        w = np.asarray(width, dtype=np.int64)
        out = np.zeros(w.shape, dtype=np.float64)
        if self.eager_widths:
            out = np.interp(w, self.eager_widths, self.eager_extra_s).astype(np.float64)
        if self.graph_widths:
            gw = np.asarray(self.graph_widths)
            pos = np.clip(np.searchsorted(gw, w), 0, len(gw) - 1)
            hit = gw[pos] == w
            out = np.where(hit, np.asarray(self.graph_extra_s)[pos], out)
        return float(out) if out.ndim == 0 else out

    def is_graph_width(self, width: int) -> bool:
        return int(width) in self.graph_widths

    def step_time(self, rows: int, width: int, kv_tokens=0, host: bool = True) -> float:
        """Seconds of one verify step: ``rows`` requests padded to ``width`` draft tokens
        (tiers included) plus, with ``host``, DAS's host time for the rows."""
        t = self.forward_time(rows * (1 + width), kv_tokens) + self.width_extra_s(width)
        return float(t + (self.host_s_per_request * rows if host else 0.0))

    def with_coefficients(self, **changes) -> "CostModel":
        """A copy with measured coefficients replacing this model's (``DAS_CONFIG``)."""
        from dataclasses import replace

        name = changes.pop("name", f"{self.name}+measured")
        return replace(self, name=name, fit_info=None, **changes)

    def forward_time(self, n_tokens, kv_tokens=0):
        """Seconds for one forward over ``n_tokens`` tokens reading ``kv_tokens`` KV entries.

        Accepts scalars or numpy arrays (broadcast); returns a float for scalar input.
        """
        if type(n_tokens) in _SCALARS and type(kv_tokens) in _SCALARS:
            # (one forward, as a plan asks: float arithmetic in the numpy path's order, the
            # same float, without six array round trips)
            n = float(n_tokens)
            paid = max(n - self.free_tokens, 0.0) if self.free_tokens else n
            return self.c_base_s + self.c_tok_s * paid + self.c_kv_s * float(kv_tokens)
        n = np.asarray(n_tokens, dtype=np.float64)
        t = self.c_base_s + self.c_tok_s * self.paid_tokens(n)
        t = t + self.c_kv_s * np.asarray(kv_tokens, dtype=np.float64)
        return float(t) if t.ndim == 0 else t

    def paid_tokens(self, n_tokens):
        """Tokens of a forward that cost ``c_tok``: those past ``free_tokens``."""
        n = np.asarray(n_tokens, dtype=np.float64)
        return np.maximum(n - self.free_tokens, 0.0) if self.free_tokens else n

    def verify_time(self, budgets, kv_tokens=0, uniform_width: bool = False) -> float:
        """Seconds for one decode forward verifying ``budgets[i]`` draft tokens of request
        ``i`` (0 = plain decode): ``forward_time(verify_tokens(budgets, uniform_width),
        sum(kv_tokens))``. Ragged (the default) charges each request its own tokens."""
        kv = float(np.sum(np.asarray(kv_tokens, dtype=np.float64)))
        return self.forward_time(verify_tokens(budgets, uniform_width), kv)

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "CostModel":
        if name not in PRESETS:
            raise ValueError(f"unknown cost-model preset {name!r}: choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    @staticmethod
    def preset_names() -> tuple[str, ...]:
        return tuple(sorted(PRESETS))

    # ---- fitting -------------------------------------------------------------------------
    @classmethod
    def fit(cls, samples: Iterable[Sequence[float]], name: str = "fitted") -> "CostModel":
        """Non-negative least squares fit of the constants to measured forwards.

        ``samples`` holds ``(n_tokens, seconds)`` or ``(n_tokens, kv_tokens, seconds)`` rows.
        With only 2-column rows ``c_kv_s`` is 0. The result's ``fit_info`` reports the error.
        """
        x, y = _as_samples(samples)
        coef = _nnls_small(x, y)
        pred = x @ coef
        model = cls(float(coef[0]), float(coef[1]), float(coef[2]) if x.shape[1] > 2 else 0.0,
                    name=name, fit_info=_fit_info(pred, y))
        return model


def verify_tokens(budgets, uniform_width: bool = False) -> int:
    """Tokens one decode forward submits to the target for per-request draft ``budgets``.

    Ragged verification (each request verifies its root plus its own drafts) costs what
    it verifies: ``sum(1 + b_i)``. A uniform layout pads every request to the batch's
    widest tree: ``bs * (1 + max b_i)``. This is the ``n_tokens`` of :meth:`CostModel.
    forward_time`, so the cost follows total tokens, not batch x max width, exactly when
    the engine verifies ragged (the SGLang worker's ``verify_layout``)."""
    b = np.asarray(budgets, dtype=np.int64).reshape(-1)
    if b.size and int(b.min()) < 0:
        raise ValueError(f"verify_tokens: budgets must be >= 0, got {int(b.min())}")
    if uniform_width:
        return int(b.size * (1 + int(b.max(initial=0))))
    return int(b.size + b.sum())


def _as_samples(samples: Iterable[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    rows = [tuple(float(v) for v in s) for s in samples]
    if len(rows) < 2:
        raise ValueError(f"CostModel.fit needs at least 2 samples, got {len(rows)}")
    widths = {len(r) for r in rows}
    if widths not in ({2}, {3}):
        raise ValueError(
            f"CostModel.fit samples must all be (n_tokens, seconds) or (n_tokens, kv_tokens, "
            f"seconds); got row lengths {sorted(widths)}"
        )
    a = np.asarray(rows)
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        bad = a[~np.all(np.isfinite(a) & (a >= 0), axis=1)][0]
        raise ValueError(f"CostModel.fit sample {tuple(bad)} is negative or not finite")
    if np.ptp(a[:, 0]) == 0:
        raise ValueError(f"CostModel.fit needs at least two distinct n_tokens, got only {a[0, 0]}")
    x = np.column_stack([np.ones(len(a)), a[:, :-1]])
    return x, a[:, -1]


def _nnls_small(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact non-negative least squares for a handful of columns by trying every support.

    With at most 3 unknowns there are at most 7 supports, so enumeration is both exact and
    simpler than an active-set solver (and keeps scipy out of the core).
    """
    n = x.shape[1]
    best, best_err = np.zeros(n), float(np.sum(y * y))
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            cols = list(support)
            sol, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if np.any(sol < 0):
                continue
            coef = np.zeros(n)
            coef[cols] = sol
            err = float(np.sum((x @ coef - y) ** 2))
            if err < best_err:
                best, best_err = coef, err
    return best


def _fit_info(pred: np.ndarray, y: np.ndarray) -> FitInfo:
    err = pred - y
    rel = np.abs(err) / np.maximum(np.abs(y), 1e-12)
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else 1.0
    return FitInfo(
        n_samples=len(y),
        rmse_s=float(np.sqrt(np.mean(err**2))),
        max_abs_err_s=float(np.max(np.abs(err))),
        mean_rel_err=float(np.mean(rel)),
        max_rel_err=float(np.max(rel)),
        r2=r2,
    )


def calibrate(
    forward: Callable[..., object],
    token_grid: Sequence[int],
    kv_grid: Sequence[int] | None = None,
    repeats: int = 5,
    warmup: int = 2,
    timer: Callable[[], float] = time.perf_counter,
    name: str = "calibrated",
) -> tuple[CostModel, list[tuple[float, ...]]]:
    """Time ``forward(n_tokens)`` (or ``forward(n_tokens, kv_tokens)``) over a grid and fit.

    ``token_grid`` holds token counts (crossed with ``kv_grid`` when given) or explicit
    ``(n_tokens, kv_tokens)`` pairs (when the two are tied, e.g. kv = batch * context).

    ``forward`` must block until its work is done (on a GPU: synchronise inside it). Each grid
    point is the median of ``repeats`` timed calls after ``warmup`` untimed ones, which drops
    one-off stalls. Returns the fitted model and the ``(n_tokens[, kv_tokens], seconds)`` rows.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"invalid repeats={repeats!r}/warmup={warmup!r}: need repeats >= 1, warmup >= 0")
    if kv_grid is not None:
        points = [(int(n), int(kv)) for n in token_grid for kv in kv_grid]
    else:  # plain token counts, or explicit (n_tokens, kv_tokens) pairs
        points = [tuple(int(v) for v in p) if np.ndim(p) else (int(p),) for p in token_grid]
    samples = []
    for point in points:
        for _ in range(warmup):
            forward(*point)
        times = []
        for _ in range(repeats):
            t0 = timer()
            forward(*point)
            times.append(timer() - t0)
        samples.append((*map(float, point), float(np.median(times))))
    return CostModel.fit(samples, name=name), samples


# ---- roofline presets --------------------------------------------------------------------
# Peak numbers from the vendors' datasheets (dense bf16, SXM parts); efficiencies are what
# decode kernels typically reach (see docs/cost_model.md for the arithmetic).
_GPUS = {  # name: (HBM bytes/s, dense bf16 FLOP/s)
    "a100": (2.039e12, 312e12),
    "h100": (3.35e12, 989e12),
    "h200": (4.8e12, 989e12),
}
_MODELS = {  # name: (parameters, layers, kv heads, head dim) -- Qwen2.5-7B, Llama-3.1-8B, Qwen2.5-32B
    "7b": (7.62e9, 28, 4, 128),
    "8b": (8.03e9, 32, 8, 128),
    "32b": (32.8e9, 64, 8, 128),
}
MEM_EFFICIENCY = 0.8  # fraction of peak HBM bandwidth a decode GEMV / attention kernel sustains
FLOP_EFFICIENCY = 0.6  # fraction of peak tensor-core FLOPs at decode-sized (<= ~1k rows) GEMMs
FIXED_OVERHEAD_S = 1.0e-3  # per-forward launch + scheduler + sampling time (CUDA graphs on)
BYTES_PER_PARAM = 2  # bf16


def roofline(gpu: str, model: str) -> CostModel:
    """Linearised roofline decode cost of ``model`` on one ``gpu`` (bf16 weights and KV)."""
    if gpu not in _GPUS or model not in _MODELS:
        raise ValueError(f"no roofline data for gpu={gpu!r} model={model!r}: "
                         f"gpus {sorted(_GPUS)}, models {sorted(_MODELS)}")
    bandwidth, flops = _GPUS[gpu]
    params, layers, kv_heads, head_dim = _MODELS[model]
    mem_bw = bandwidth * MEM_EFFICIENCY
    kv_bytes_per_token = 2 * layers * kv_heads * head_dim * BYTES_PER_PARAM  # K and V
    weights_s = params * BYTES_PER_PARAM / mem_bw
    c_tok = 2.0 * params / (flops * FLOP_EFFICIENCY)
    return CostModel(
        c_base_s=weights_s + FIXED_OVERHEAD_S,
        c_tok_s=c_tok,
        c_kv_s=kv_bytes_per_token / mem_bw,
        name=f"{gpu}-{model}",
        free_tokens=weights_s / c_tok,  # the ridge point: matmuls as long as the weight read
    )


# cpu-tiny: the 2-layer test Llama's forward (fp32, one thread, 256-token context) timed by
# benchmarks/calibrate_cost_model.py on the shared 2-core dev machine while other jobs ran
# (mean relative fit error 69%: rough). Excludes SGLang's own per-step overhead.
_CPU_TINY = CostModel(c_base_s=1.4e-3, c_tok_s=4.0e-5, c_kv_s=7.0e-7, name="cpu-tiny")

PRESETS: dict[str, CostModel] = {
    **{f"{g}-{m}": roofline(g, m) for g in _GPUS for m in _MODELS},
    "cpu-tiny": _CPU_TINY,
}
DEFAULT_PRESET = "h100-7b"


# ---- cost tables: what replays score with ------------------------------------------------
class CostTable:
    """Measured (or published) forward times ``ms[batch, tokens_per_request]`` per mode
    (CUDA graph / eager), read from the same CSV ``benchmarks/fit_cost_model.py`` fits
    (header ``batch,tokens_per_request,cuda_graph,ms``). Nonlinear: piecewise-linear
    interpolation in batch, then in tokens per request (linear extrapolation past the
    grid). A verify step at a width SGLang captured (``graph_widths``: the graph rows'
    widths) uses the graph times, any other width the eager ones. ``das replay`` scores
    with a table so a policy is judged by costs it did not plan with."""

    def __init__(self, rows, name: str = "table") -> None:
        a = np.asarray(rows, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != 4 or len(a) < 2:
            raise ValueError(f"CostTable {name!r}: need rows (batch, tokens_per_request, cuda_graph, ms), >= 2")
        if not np.all(np.isfinite(a)) or np.any(a[:, [0, 1, 3]] <= 0) or not np.isin(a[:, 2], (0, 1)).all():
            raise ValueError(f"CostTable {name!r}: batch, tokens_per_request, ms must be > 0, cuda_graph 0/1")
        self.name = name
        self._modes = {}
        for g in (0, 1):
            sel = a[a[:, 2] == g]
            if len(sel):
                self._modes[g] = self._grid(sel)
        self.graph_widths = tuple(int(t) - 1 for t in self._modes[1][1]) if 1 in self._modes else ()

    @staticmethod
    def _grid(sel):
        batches = np.unique(sel[:, 0])
        tprs = np.unique(sel[:, 1])
        cols = {}
        for t in tprs:
            s = sel[sel[:, 1] == t]
            order = np.argsort(s[:, 0])
            cols[t] = (s[order, 0], s[order, 3])
        return batches, tprs, cols

    @classmethod
    def from_csv(cls, path) -> "CostTable":
        import csv

        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        head = [h.strip() for h in rows[0]] if rows else []
        if head != ["batch", "tokens_per_request", "cuda_graph", "ms"]:
            raise ValueError(f"cost table {str(path)!r}: header must be batch,tokens_per_request,cuda_graph,ms")
        try:
            data = [[float(x) for x in r] for r in rows[1:] if r]
        except ValueError as e:
            raise ValueError(f"cost table {str(path)!r}: {e}") from None
        return cls(data, name=f"table:{path}")

    @staticmethod
    def _interp(x, xs, ys) -> float:
        if len(xs) == 1:
            return float(ys[0])
        if x <= xs[0] or x >= xs[-1]:  # linear extrapolation from the nearest two points
            i = 0 if x <= xs[0] else len(xs) - 2
            return float(ys[i] + (ys[i + 1] - ys[i]) * (x - xs[i]) / (xs[i + 1] - xs[i]))
        return float(np.interp(x, xs, ys))

    def _ms(self, mode: int, batch: float, tpr: float) -> float:
        _, tprs, cols = self._modes[mode]
        per_t = [self._interp(batch, *cols[t]) for t in tprs]
        return max(self._interp(tpr, tprs, per_t), 1e-6)

    def step_time(self, rows: int, width: int, kv_tokens=0, host: bool = False) -> float:
        """Seconds of a verify forward of ``rows`` requests padded to ``width`` drafts."""
        mode = 1 if (int(width) in self.graph_widths or 0 not in self._modes) else 0
        return self._ms(mode, rows, 1 + width) * 1e-3

    def mode_time(self, graph: bool, rows: int, tokens_per_request: float) -> float:
        """Seconds of a forward of ``rows`` requests x ``tokens_per_request`` tokens, from
        the CUDA-graph times (``graph``) or the eager ones (the other mode's where the table
        has only one)."""
        mode = 1 if graph else 0
        if mode not in self._modes:
            mode = 1 - mode
        return self._ms(mode, max(int(rows), 1), max(float(tokens_per_request), 1.0)) * 1e-3

    def ragged_time(self, rows: int, n_tokens: int, kv_tokens=0) -> float:
        """Seconds of a ragged verify forward: ``rows`` requests submitting ``n_tokens``
        tokens in all (each its root plus its own drafts), from the graph times, read at the
        batch's mean tokens per request: weights and each request's KV are read once per
        forward, the matmuls follow the total tokens. (Not ``forward_time(n_tokens)``: that
        would read the KV of every draft token as if it were a request of its own.) Graph
        times: what SGLang's compact ragged-verify mode gives (graphs per total token count,
        ``ragged_verify.round_up_grid``; ``SGLANG_RAGGED_VERIFY_MODE=compact`` and an
        algorithm declaring ``supports_ragged_verify``, which DAS does not yet) -- the
        replay's ``--graphs buckets``; its default ``stock`` charges ragged steps eagerly
        (:meth:`mode_time`)."""
        rows = max(int(rows), 1)
        return self.mode_time(True, rows, max(float(n_tokens), rows) / rows)

    def forward_time(self, n_tokens, kv_tokens=0):
        """A forward over ``n_tokens`` single-token rows (plain decode)."""
        n = np.asarray(n_tokens, dtype=np.float64)
        out = np.array([self.step_time(max(int(x), 1), 0) for x in n.reshape(-1)]).reshape(n.shape)
        return float(out) if out.ndim == 0 else out

    @classmethod
    def roofline(cls, gpu: str = "h100", model: str = "7b") -> "CostTable":
        """The default scoring table: the roofline of ``docs/cost_model.md`` in its nonlinear
        form -- max(weight + KV reads, matmul FLOPs) instead of their sum -- at a 2k-token
        context, plus per-forward overhead: 1 ms with a CUDA graph (as the presets), and
        for an eager forward 1 ms + 5 us of launch per kernel x 10 kernels per layer. Graph
        rows at widths 0, 1, 2, 4, 8, 16, 32: what a worker with a graph per bucket width
        would replay. Stock SGLang 0.5.23 captures a speculative target's verify graphs at
        one width only (``speculative_num_draft_tokens``); ``das replay``'s default
        ``--graphs stock`` charges every other verify from the eager rows
        (``replay.simulator._Scorer``). Derived, not measured: replace it with a GPU run's
        table (``--score PATH``)."""
        bandwidth, flops = _GPUS[gpu]
        params, layers, kv_heads, head_dim = _MODELS[model]
        mem_bw, fl = bandwidth * MEM_EFFICIENCY, flops * FLOP_EFFICIENCY
        kv_bytes = 2 * layers * kv_heads * head_dim * BYTES_PER_PARAM * 2048
        rows = []
        for batch in (1, 8, 32, 64, 128, 256, 512, 1024):
            for w in (0, 1, 2, 4, 8, 16, 32):
                tokens = batch * (1 + w)
                t = max((params * BYTES_PER_PARAM + batch * kv_bytes) / mem_bw, 2 * params * tokens / fl)
                rows.append((batch, 1 + w, 1, (t + FIXED_OVERHEAD_S) * 1e3))
                rows.append((batch, 1 + w, 0, (t + FIXED_OVERHEAD_S + layers * 10 * 5e-6) * 1e3))
        return cls(rows, name=f"roofline-table:{gpu}-{model}")
