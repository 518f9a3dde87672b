"""Host time per decode step, as the worker measures it (its stats' ``"host"`` entry).

Four clocks, all on the scheduler thread:

- ``plan``: from the worker's entry to the verify forward's launch -- DAS's drafting, the
  policy's plan and the verify inputs (what DAS adds before every forward);
- ``feedback``: the stop cut of the accepted runs (``BatchRows.cut``) and the session's
  ``committed_batch`` after the verify (the accepted tokens to the drafter and policy);
  until stop 48 the cut ran inside the ``verify`` clock;
- ``verify``: from the verify forward's launch to the first host sync after its tree walk
  -- the forward's device time plus the walk (not host work of DAS's: the clock that tells
  a slow forward from slow host code, and what the CUDA-graph tiers are measured from);
- ``engine_gap``: from one decode step's return to the next decode step's entry, with no
  prefill in between -- SGLang's own work between two forwards (result processing,
  output streaming, scheduling the next batch). Not DAS's cost: the window in which the
  native pre-draft that the feedback starts runs beside SGLang's Python
  (``benchmarks/bench_host_path.py`` models it as ``--engine-us`` per request; the
  measured per-request cost of the installed SGLang is what that model should use,
  ``benchmarks/measure_engine_gap.py``).

Kept as running sums and maxima (the stats file is rewritten every step, so nothing here
grows with the run): ``steps``, ``rows`` (requests over those steps), ``plan_ms``,
``plan_max_ms``, ``feedback_ms``, ``feedback_max_ms``, ``verify_ms``, ``verify_max_ms``,
``engine_gap_steps``,
``engine_gap_rows``, ``engine_gap_ms``, ``engine_gap_max_ms``. On a GPU the verify's
device work is asynchronous: ``plan`` ends at the launch and ``feedback`` starts after the
accepted tokens reached the host, so neither includes device time.
"""

from __future__ import annotations


def new_host_time() -> dict:
    return {"steps": 0, "rows": 0, "plan_ms": 0.0, "plan_max_ms": 0.0, "feedback_ms": 0.0,
            "feedback_max_ms": 0.0, "verify_ms": 0.0, "verify_max_ms": 0.0,
            "engine_gap_steps": 0, "engine_gap_rows": 0,
            "engine_gap_ms": 0.0, "engine_gap_max_ms": 0.0}


def _add(host: dict, clock: str, seconds: float) -> None:
    ms = seconds * 1e3
    host[f"{clock}_ms"] += ms
    host[f"{clock}_max_ms"] = max(host[f"{clock}_max_ms"], ms)


def add_plan(host: dict, seconds: float, rows: int) -> None:
    host["steps"] += 1
    host["rows"] += rows
    _add(host, "plan", seconds)


def add_feedback(host: dict, seconds: float) -> None:
    _add(host, "feedback", seconds)


def add_verify(host: dict, seconds: float) -> None:
    _add(host, "verify", seconds)


def add_engine_gap(host: dict, seconds: float, rows: int) -> None:
    host["engine_gap_steps"] += 1
    host["engine_gap_rows"] += rows
    _add(host, "engine_gap", seconds)


def summary(host: dict) -> dict:
    """Means per step and per request (None where nothing was measured)."""
    steps, gaps = host.get("steps", 0), host.get("engine_gap_steps", 0)
    return {
        "plan_ms_per_step": host["plan_ms"] / steps if steps else None,
        "feedback_ms_per_step": host["feedback_ms"] / steps if steps else None,
        "verify_ms_per_step": host["verify_ms"] / steps if steps else None,
        "rows_per_step": host["rows"] / steps if steps else None,
        "engine_gap_ms_per_step": host["engine_gap_ms"] / gaps if gaps else None,
        "engine_gap_us_per_row": (host["engine_gap_ms"] * 1e3 / host["engine_gap_rows"]
                                  if host.get("engine_gap_rows") else None),
    }


def delta(after: dict, before: dict) -> dict:
    """The sums of ``after`` minus those of ``before`` (maxima: ``after``'s)."""
    return {k: (v if k.endswith("_max_ms") else v - before.get(k, 0)) for k, v in after.items()}
