"""What a CUDA-graph replay saves, measured online from the verify forwards themselves.

Stock SGLang (0.5.23) captures a speculative target's TARGET_VERIFY graphs at one width
only -- ``speculative_num_draft_tokens`` tokens per request, for batch sizes up to its
largest captured one -- and runs every other verify eagerly (``can_run_graph`` checks
``num_tokens_per_req == captured_req_width``). How much dearer an eager forward is depends
on the model, the GPU and the kernels installed: on the first GPU kit run (H200, a 0.6B
Llama, SGLang without ``sgl_kernel``) an eager verify cost 30-57 ms at every batch size and
width, a replayed graph at the full width 4.5 ms (batch 1) to 28.5 ms (batch 256), so a
worker that verified at the trees' own width (2..15) paid up to 8x for it.

:class:`GraphTiers` learns that price where the worker runs: it is fed each verify
forward's measured seconds (rows, width, whether SGLang replayed a graph), fits the graph
replays as ``a + b * tokens`` and takes the median of the eager forwards' excess over that
line as the eager extra. The policy then plans with a cost model whose tiers say so
(``CostModel.graph_widths`` = the captured width, ``eager_extra_s`` = the excess), and
picks the full, graph-replayed width when its padding is cheaper than an eager forward.
Padding never changes what is accepted (padded rows are never linked), so the choice is
pure cost, and lossless either way.

On the ragged layout (per-request verify rows; SGLang replays no graph for them) the same
estimates decide, step by step, whether the batch goes to the graph instead, every row
padded to the full width (``prefer_graph``): the same trees, one cheaper forward.

Until both kinds have been seen the tiers stay off (the linear model alone); a batch that
has not replayed a graph for ``explore_every`` steps (an eighth of that until the graph
line has ``min_samples``) is verified at the graph width once (``explore``), and after as
many graph replays in a row one step is planned without the tiers (``explore_eager``), so
the estimate can start, and follows prices that change. Forwards 20x their kind's median
(first-time kernel compiles) are left out.
Pure Python + numpy: no torch, no SGLang.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from das_sglang.core.cost_model import CostModel


# A forward taking this many times its kind's median is not a price (a first-time Triton
# compile, an allocator stall): left out of the estimate.
SPIKE = 20.0


@dataclass(frozen=True)
class GraphSpec:
    """The verify graphs SGLang captured: draft width (tokens per request - 1) and the
    largest batch size that replays one (0: none captured)."""

    width: int
    max_bs: int

    def covers(self, rows: int) -> bool:
        return 0 < rows <= self.max_bs


class _Samples:
    """The latest ``size`` (tokens, seconds) forwards of one kind, kept as two numpy ring
    buffers (fits and medians do not depend on the order), and its ``a + b * tokens`` line
    computed once per new sample (the worker reads it every step: a fit per read was
    ~100 us of the scheduler thread's time)."""

    def __init__(self, size: int) -> None:
        self.t = np.empty(size, dtype=np.float64)
        self.s = np.empty(size, dtype=np.float64)
        self.n = self.pos = self.version = 0
        self._line_at, self._line = -1, None

    def __len__(self) -> int:
        return self.n

    def append(self, tokens: float, seconds: float) -> None:
        self.t[self.pos], self.s[self.pos] = tokens, seconds
        self.pos = (self.pos + 1) % len(self.t)
        self.n = min(self.n + 1, len(self.t))
        self.version += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.t[: self.n], self.s[: self.n]

    def line(self, min_samples: int) -> tuple[float, float] | None:
        """Least-squares ``seconds = a + b * tokens`` (b >= 0; the median with b = 0 where the
        samples share one token count or the slope comes out negative); None below
        ``min_samples``."""
        if self._line_at != self.version:
            self._line_at, self._line = self.version, None
            if self.n >= min_samples:
                t, s = self.arrays()
                dt = t - t.mean()
                var = float(dt @ dt)
                if var > 0:
                    b = float(dt @ (s - s.mean())) / var
                    if b >= 0:
                        self._line = (float(s.mean()) - b * float(t.mean()), b)
                if self._line is None:
                    self._line = (float(np.median(s)), 0.0)
        return self._line


class GraphTiers:
    """Online estimate of the eager forward's extra cost over a graph replay."""

    def __init__(self, spec: GraphSpec, min_samples: int = 4, window: int = 256,
                 explore_every: int = 64, spike: float | None = SPIKE) -> None:
        if spec.width < 0 or spec.max_bs < 0:
            raise ValueError(f"invalid GraphSpec {spec!r}: width and max_bs must be >= 0")
        if min_samples < 1 or window < min_samples or explore_every < 1:
            raise ValueError(
                f"invalid GraphTiers min_samples={min_samples!r}, window={window!r}, "
                f"explore_every={explore_every!r}: need 1 <= min_samples <= window, explore_every >= 1")
        self.spec = spec
        self.spike = spike  # None: keep every sample (a table's exact times)
        self.min_samples = min_samples
        self.explore_every = explore_every
        self._graph = _Samples(window)
        self._eager = _Samples(window)
        self._since_graph = 0  # graph-coverable steps since the last graph replay
        self._since_eager = 0  # graph replays since the last graph-coverable eager step
        self._cached: tuple[tuple[int, int], float | None] | None = None
        self._observed = 0
        self.explored = 0
        self.explored_eager = 0
        self.spikes = 0

    # ------------------------------------------------------------------ feeding
    def observe(self, rows: int, width: int, graph: bool, seconds: float,
                tokens: int | None = None) -> None:
        """One verify forward: ``rows`` requests at ``width`` draft tokens each (``tokens``
        in all when the rows differ: a ragged verify), replayed as a CUDA graph or not,
        taking ``seconds`` (launch to the first host sync after it)."""
        if rows <= 0 or not np.isfinite(seconds) or seconds <= 0.0:
            return
        tokens = rows * (width + 1) if tokens is None else int(tokens)
        if not graph and not self.spec.covers(rows):
            return  # (the eager price is compared with the graph line only where a graph
            #          could have served the batch, not extrapolated past the captured ones)
        kind = self._graph if graph else self._eager
        if (self.spike is not None and len(kind) >= self.min_samples
                and seconds > self.spike * float(np.median(kind.arrays()[1]))):
            self.spikes += 1  # a first-time kernel compile or a stall, not a price
            return
        self._observed += 1
        kind.append(tokens, float(seconds))
        if graph:
            self._since_graph = 0
            self._since_eager += 1
        else:
            self._since_graph += 1
            self._since_eager = 0

    def explore(self, rows: int) -> bool:
        """Verify this step at the graph width regardless of the plan (a measurement)?"""
        # (every ``explore_every // 8`` steps until the graph line has its samples)
        every = self.explore_every if len(self._graph) >= self.min_samples else max(1, self.explore_every // 8)
        if not self.spec.covers(rows) or self._since_graph < every:
            return False
        self._since_graph = 0
        self.explored += 1
        return True

    def explore_eager(self, rows: int) -> bool:
        """Plan this step without the tiers (the policy's own width, eager unless it is the
        graph width) after ``explore_every`` graph replays in a row, so the eager price
        stays measured while the graph is always chosen (it may have been overestimated,
        or may drop)."""
        if not self.spec.covers(rows) or self._since_eager < self.explore_every:
            return False
        self._since_eager = 0
        self.explored_eager += 1
        return True

    @property
    def samples(self) -> int:
        """Forwards observed so far (both kinds; the window keeps the latest)."""
        return self._observed

    # ------------------------------------------------------------------ estimate
    def _graph_line(self) -> tuple[float, float] | None:
        """``seconds = a + b * tokens`` through the recent graph replays (b >= 0)."""
        return self._graph.line(self.min_samples)

    def eager_extra_s(self) -> float | None:
        """Median excess of the recent eager forwards over the graph line at their token
        count (>= 0); None until both kinds have ``min_samples``."""
        key = (self._graph.version, self._eager.version)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        line = self._graph_line()
        out = None
        if line is not None and len(self._eager) >= self.min_samples:
            t, s = self._eager.arrays()
            out = max(float(np.median(s - (line[0] + line[1] * t))), 0.0)
        self._cached = (key, out)
        return out

    def prefer_graph(self, rows: int, eager_tokens: int) -> bool:
        """Would a graph replay at the full width (``rows`` padded requests) be faster than
        an eager forward over ``eager_tokens`` (a ragged verify's rows)? From the recent
        forwards' lines; False until both kinds have ``min_samples``."""
        if not self.spec.covers(rows):
            return False
        graph, eager = self._graph_line(), self._eager.line(self.min_samples)
        if graph is None or eager is None:
            return False
        full = rows * (self.spec.width + 1)
        return graph[0] + graph[1] * full < eager[0] + eager[1] * eager_tokens

    def cost_model(self, base: CostModel) -> CostModel:
        """``base`` with this engine's tiers: the graph width at no extra, every other
        width at the measured eager extra (``base`` itself until both are measured)."""
        extra = self.eager_extra_s()
        if extra is None:
            return base
        return base.with_coefficients(graph_widths=(self.spec.width,), graph_extra_s=(0.0,),
                                      eager_widths=(0,), eager_extra_s=(extra,))

    def stats(self) -> dict:
        extra = self.eager_extra_s()
        line = self._graph_line()
        return {"graph_width": self.spec.width, "graph_max_bs": self.spec.max_bs,
                "graph_samples": len(self._graph), "eager_samples": len(self._eager),
                "eager_extra_ms": None if extra is None else extra * 1e3,
                "graph_ms_per_token": None if line is None else line[1] * 1e3,
                "explored_steps": self.explored, "explored_eager_steps": self.explored_eager,
                "spikes": self.spikes}
