"""Fit the cost model's measured coefficients from a forward timing table -> DAS_CONFIG JSON.

    python benchmarks/fit_cost_model.py --table timings.csv --json das_config.json

``--table``: CSV with header ``batch,tokens_per_request,cuda_graph,ms``: one row per timed
verify forward (or the median of several) of ``batch`` requests each processing
``tokens_per_request`` tokens (1 = plain decode, ``1 + w`` = the root plus ``w`` draft tokens),
``cuda_graph`` 1 when SGLang replayed a captured CUDA graph, 0 for an eager forward, ``ms`` the
forward's wall time. A GPU run (benchmarks/gpu/) produces it.

Fit (core/cost_model.py's model): ``ms = c_base + c_tok * max(batch * tokens_per_request -
free_tokens, 0) + extra(mode, width)``: least squares with one intercept per measured (mode,
width) and one shared ``c_tok`` (>= 0), ``free_tokens`` (the ridge point below which a
forward is memory-bound) the best of 0 and every token count in the table; ``c_base`` = the least intercept of the production mode (graph rows
when there are any), each (mode, width)'s extra = its intercept - c_base (graph widths: the
captured ones; eager widths: interpolated between). Each (mode, width) needs >= 2 batch sizes. Context-length (KV) cost is folded into
c_base / c_tok at the table's context, so ``cost_c_kv_ns`` is written as 0.

``--json``: a DAS_CONFIG object ``{"policy": {"cost_c_base_ms", "cost_c_tok_us",
"cost_c_kv_ns", "cost_free_tokens", "cost_graph_widths", "cost_graph_ms", "cost_eager_widths", "cost_eager_ms"
[, "cost_host_us_per_request"]}}``, loadable as is (``DAS_CONFIG=das_config.json``);
``--host-json`` (a ``bench_host_path.py`` result) adds the measured host time per request.
The fit's error (RMSE, relative errors, R^2) is printed and, with ``--report``, written.
Exit code 1 with a message naming the bad row for a malformed table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

from das_sglang.core.cost_model import CostModel

HEADER = ("batch", "tokens_per_request", "cuda_graph", "ms")


class TableError(ValueError):
    pass


def read_table(path: Path) -> np.ndarray:
    """Rows (batch, tokens_per_request, cuda_graph, ms) as a float array; TableError names
    the bad line."""
    try:
        f = open(path, newline="")
    except OSError as e:
        raise TableError(f"cannot read --table {str(path)!r}: {e.strerror}") from None
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != HEADER:
            raise TableError(f"{path}: header must be {','.join(HEADER)}, got {header!r}")
        rows = []
        for line, rec in enumerate(reader, start=2):
            if not rec or all(not c.strip() for c in rec):
                continue
            if len(rec) != 4:
                raise TableError(f"{path}:{line}: expected 4 columns, got {rec!r}")
            try:
                batch, tpr, graph, ms = int(rec[0]), int(rec[1]), int(rec[2]), float(rec[3])
            except ValueError:
                raise TableError(f"{path}:{line}: not numbers: {rec!r}") from None
            if batch < 1 or tpr < 1 or graph not in (0, 1) or not (math.isfinite(ms) and ms > 0):
                raise TableError(f"{path}:{line}: need batch >= 1, tokens_per_request >= 1, "
                                 f"cuda_graph 0/1, ms > 0; got {rec!r}")
            rows.append((batch, tpr, graph, ms))
    if len(rows) < 2:
        raise TableError(f"{path}: need at least 2 timing rows, got {len(rows)}")
    return np.asarray(rows, dtype=np.float64)


def fit(table: np.ndarray) -> tuple[dict, dict]:
    """-> (DAS_CONFIG policy fields, fit report)."""
    batch, tpr, graph, ms = table.T
    tokens = batch * tpr
    width = (tpr - 1).astype(np.int64)
    # One intercept per (mode, width) and a shared slope: least squares with fixed effects,
    # so tiers that differ per width do not leak into c_tok.
    groups = sorted(set(zip(graph.astype(int).tolist(), width.tolist())))
    gidx = np.array([groups.index(g) for g in zip(graph.astype(int).tolist(), width.tolist())])
    x = np.zeros((len(ms), 1 + len(groups)))
    x[:, 0] = tokens
    x[np.arange(len(ms)), 1 + gidx] = 1.0
    if np.linalg.matrix_rank(x) < x.shape[1]:
        raise TableError("the table cannot separate c_tok from the per-width costs: time at least "
                         "one (cuda_graph, tokens_per_request) at two or more batch sizes")
    ss_tot = float(np.sum((ms - ms.mean()) ** 2))
    # The ridge point: a hinge in tokens. Hinges at or below the least token count are the
    # plain line shifted (same fit), so only larger ones are candidates; one is taken only
    # when it fits clearly better (ties: no hinge). The plain line (free 0, full rank: checked
    # above) is the fallback when no fit has a slope >= 0.
    tol = 1e-9 * max(ss_tot, 1e-12)
    fallback = best = None
    for free in [0.0] + sorted(t for t in set(tokens.tolist()) if t > tokens.min()):
        x[:, 0] = np.maximum(tokens - free, 0.0)
        if np.linalg.matrix_rank(x) < x.shape[1]:
            continue
        c, *_ = np.linalg.lstsq(x, ms, rcond=None)
        sse = float(np.sum((x @ c - ms) ** 2))
        fallback = fallback or (sse, free, c)
        if c[0] >= 0 and (best is None or sse < best[0] - tol):
            best = (sse, free, c)
    _, free_tokens, coef = best or fallback
    c_tok = float(coef[0])
    if c_tok < 0:  # noise on a flat table: no per-token cost, intercepts are the means
        c_tok = 0.0
        coef[1:] = [float(np.mean(ms[gidx == k])) for k in range(len(groups))]
    intercept = dict(zip(groups, coef[1:].tolist()))
    prod = 1 if any(g == 1 for g, _ in groups) else 0
    c_base = max(0.0, min(v for (g, _), v in intercept.items() if g == prod))
    fields: dict = {
        "cost_c_base_ms": round(c_base, 6),
        "cost_c_tok_us": round(c_tok * 1e3, 6),
        "cost_c_kv_ns": 0.0,
        "cost_free_tokens": round(float(free_tokens), 3),
    }
    for mode, key in ((1, "graph"), (0, "eager")):
        ws = [w for g, w in groups if g == mode]
        fields[f"cost_{key}_widths"] = ws
        fields[f"cost_{key}_ms"] = [round(intercept[(mode, w)] - c_base, 6) for w in ws]
    pred = c_tok * np.maximum(tokens - free_tokens, 0.0) + np.array([intercept[g] for g in zip(graph.astype(int).tolist(), width.tolist())])
    linear = CostModel.fit(zip(tokens, ms * 1e-3))
    lin_err = np.abs(linear.forward_time(tokens) * 1e3 - ms) / ms
    err = pred - ms
    rel = np.abs(err) / ms
    report = {
        "n_samples": int(len(ms)),
        "linear_only": {"c_base_ms": linear.c_base_s * 1e3, "c_tok_us": linear.c_tok_s * 1e6,
                        "mean_rel_err": float(np.mean(lin_err)), "max_rel_err": float(np.max(lin_err))},
        "rmse_ms": float(np.sqrt(np.mean(err ** 2))),
        "mean_rel_err": float(np.mean(rel)),
        "max_rel_err": float(np.max(rel)),
        "r2": 1.0 - float(np.sum(err ** 2)) / ss_tot if ss_tot > 0 else 1.0,
    }
    return fields, report


def host_us_per_request(path: Path) -> float:
    """Host time per request from a bench_host_path.py result: p50 at the largest batch."""
    try:
        data = json.loads(path.read_text())
        batches = data["batches"]
        b = max(batches, key=int)
        return round(float(batches[b]["p50_ms"]) * 1e3 / int(b), 6)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TableError(f"invalid --host-json {str(path)!r}: {e}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", required=True, help="CSV: batch,tokens_per_request,cuda_graph,ms")
    ap.add_argument("--json", required=True, help="write the DAS_CONFIG JSON here")
    ap.add_argument("--host-json", help="bench_host_path.py result: adds cost_host_us_per_request")
    ap.add_argument("--report", help="also write the fit's error report (JSON) here")
    args = ap.parse_args(argv)
    try:
        fields, report = fit(read_table(Path(args.table)))
        if args.host_json:
            fields["cost_host_us_per_request"] = host_us_per_request(Path(args.host_json))
        # The output must load: the same check the worker runs on DAS_CONFIG.
        from das_sglang.sglang.options import load_options  # noqa: PLC0415 (keeps --help light)

        config = {"policy": fields}
        load_options(None, json.dumps(config))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    Path(args.json).write_text(json.dumps(config, indent=2) + "\n")
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(f"c_base {fields['cost_c_base_ms']:.4f} ms, c_tok {fields['cost_c_tok_us']:.3f} us; "
          f"graph widths {fields['cost_graph_widths']}, eager widths {fields['cost_eager_widths']}; "
          f"fit mean rel err {report['mean_rel_err']:.3f} (linear alone "
          f"{report['linear_only']['mean_rel_err']:.3f}), R^2 {report['r2']:.4f} -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
