"""Replay results as plain data: the JSON the CLI writes and the rows of its summary table.

Ratios are against the ``none`` contender of the same run (same rollouts, same cost model),
so every number in a report is comparable only within that report.
"""

from __future__ import annotations

from typing import Any, Sequence

from das_sglang.replay.simulator import ContenderResult, StepStats

BASELINE = "none"


def step_summary(s: StepStats) -> dict[str, Any]:
    return {
        "step": s.step,
        "requests": s.requests,
        "forward_passes": s.forward_passes,
        "makespan_s": s.makespan_s,
        "generated_tokens": s.generated_tokens,
        "verify_steps": s.verify_steps,
        "tokens_per_step": s.tokens_per_step,
        "accepted_drafts_per_step": s.draft_accepted / max(s.verify_steps, 1),
        "draft_tokens_proposed": s.draft_proposed,
        "draft_tokens_accepted": s.draft_accepted,
        "draft_tokens_wasted": s.draft_wasted,
        "padded_tokens": s.padded_tokens,
        "drafter_us": s.drafter_us,
        "drafter_us_per_forward": s.drafter_us / max(s.forward_passes, 1),
        "policy_us": s.policy_us,
    }


def contender_summary(r: ContenderResult, baseline: ContenderResult | None) -> dict[str, Any]:
    """Totals over the replayed steps, plus the ratios to the baseline run."""
    makespan = r.total("makespan_s")
    passes = int(r.total("forward_passes"))
    out: dict[str, Any] = {
        "description": r.description,
        "tokens_per_step": r.tokens_per_step,  # bonus token included: 1.0 without speculation
        "accepted_drafts_per_step": r.total("draft_accepted") / max(r.total("verify_steps"), 1),
        "forward_passes": passes,
        "makespan_s": makespan,
        "makespan_ratio_vs_none": None,
        "forward_passes_ratio_vs_none": None,
        "generated_tokens": int(r.total("generated_tokens")),
        "draft_tokens_proposed": int(r.total("draft_proposed")),
        "draft_tokens_accepted": int(r.total("draft_accepted")),
        "draft_tokens_wasted": int(r.total("draft_proposed") - r.total("draft_accepted")),
        "padded_tokens": int(r.total("padded_tokens")),
        "drafter_us": r.total("drafter_us"),
        "drafter_us_per_forward": r.total("drafter_us") / max(passes, 1),
        "policy_us": r.total("policy_us"),
        "steps": [step_summary(s) for s in r.steps],
    }
    if baseline is not None and baseline.total("makespan_s") > 0:
        out["makespan_ratio_vs_none"] = makespan / baseline.total("makespan_s")
        out["forward_passes_ratio_vs_none"] = passes / max(baseline.total("forward_passes"), 1)
    return out


def run_summary(results: Sequence[ContenderResult], info: dict[str, Any]) -> dict[str, Any]:
    """One replay run (one rollout selection): ``info`` says which (steps, problems, ...)."""
    base = next((r for r in results if r.name == BASELINE), None)
    return {**info, "policies": {r.name: contender_summary(r, base) for r in results}}


def table_rows(run: dict[str, Any]) -> list[list[str]]:
    """Summary-table cells per policy: name, tok/step, passes, makespan, ratio, waste, drafter µs."""
    rows = []
    for name, p in run["policies"].items():
        ratio = p["makespan_ratio_vs_none"]
        rows.append([
            name,
            f"{p['tokens_per_step']:.2f}",
            f"{p['forward_passes']:,}",
            f"{p['makespan_s']:.1f}",
            "-" if ratio is None else f"{ratio:.3f}",
            f"{p['draft_tokens_wasted']:,}",
            f"{p['drafter_us_per_forward']:.0f}",
        ])
    return rows


TABLE_HEADER = ["policy", "tok/step", "fwd passes", "makespan s", "vs none", "drafts wasted", "drafter µs/fwd"]

