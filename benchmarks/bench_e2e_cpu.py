"""End-to-end DAS vs NGRAM vs no speculation on real SGLang, CPU development mode.

    python benchmarks/bench_e2e_cpu.py --json out.json [--png out.png]

One workload, three engines with identical settings (tiny random Llama, torch_native
attention, float32; spec engines verify ``--width`` tokens per request): GRPO-style
groups (``--problems`` x ``--siblings`` requests sharing a problem id) over ``--steps``
training steps, greedy, ``--new-tokens`` each (EOS ignored so every request of a batch
runs equally long). Per engine:

- requests, mismatches (outputs differing from the no-speculation engine's);
- accept_length_mean: tokens committed per verify forward (bonus included), mean over
  requests (1.0 for none); accept_length_by_step;
- forward_passes: decode forwards (per batch the longest request's verify count; for
  none, new_tokens - 1), forward_passes_ratio_vs_none;
- step_ms: decode wall time per forward; step_overhead_ms: step_ms - none's step_ms
  (drafting + larger verify forwards - what speculation costs per forward pass).

``--ragged``: DAS with ragged verification (each request verifies its own tree size)
vs DAS with the uniform layout (every request padded to the batch width), plus the
no-speculation engine as the greedy reference, on one workload that mixes GRPO groups
of recurring problems (history drafts them) with fresh prompts (nothing to draft) in
every batch, over ``--steps`` steps, each request with its own response length. Writes exactly::

    {"requests": <requests per engine>,
     "mismatches": <requests whose output differs from none's in any DAS engine>,
     "ragged":  {"verify_tokens_total": ..., "accepted_tokens_total": ...},
     "uniform": {"verify_tokens_total": ..., "accepted_tokens_total": ...},
     "uniform_width": {...same keys...}}

``ragged`` is the worker's default on a ragged backend: per-request budgets (the policy
prices each request's own tokens: ``options.for_layout``), each request verifying its own
tree. ``uniform`` verifies the same per-request budgets padded to the batch's widest tree
(``policy.uniform_width: false`` on the uniform layout): same drafts, accepted tokens
match, and the difference is the padding. ``uniform_width`` is the worker's default on a
backend without ragged verify: one batch width planned with the padding paid (other
drafts, so other accepted tokens). ``verify_tokens_total`` = tokens submitted to the target by TARGET_VERIFY forwards
across the run (roots + draft nodes + padding), ``accepted_tokens_total`` = draft tokens
accepted, both from the worker's counters (``server.stats_path``), warm-up excluded.

A tiny CPU model makes forwards nearly free, so wall-clock speedups here say little
about a GPU; forward-pass ratios and acceptance are the transferable numbers. step_ms
also differs by attention path (CPU mode's tree-verify attention is one batched SDPA,
SGLang's torch_native decode loops over requests) and, on a shared machine, by load:
the engines run one after another (SGLang keeps per-process global state, so one
process cannot hold several engines at once).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from das_sglang.sglang import cpu

ALGORITHMS = ("none", "NGRAM", "DAS")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, type=Path, help="write the results here")
    p.add_argument("--png", type=Path, default=None, help="plot (default: --json with .png)")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/das-tiny-llama"))
    p.add_argument("--problems", type=int, default=8)
    p.add_argument("--siblings", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--width", type=int, default=8, help="--speculative-num-draft-tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ragged", action="store_true",
                   help="ragged vs uniform verify layout (DAS), see the module docstring")
    p.add_argument("--equal-lengths", action="store_true",
                   help="--ragged: every response --new-tokens long (default: varied)")
    p.add_argument("--policy", action="append", default=[], metavar="FIELD=JSON",
                   help="--ragged: a PolicyConfig field for both DAS engines (repeatable), "
                        "e.g. ragged_trim=false")
    p.add_argument("--fresh", type=int, default=24,
                   help="--ragged: fresh (never seen) prompts per batch besides the groups")
    args = p.parse_args(argv)
    if args.ragged and "--problems" not in (argv or sys.argv):
        args.problems = 12  # 3 steps x (12 x 4 + 24) = 216 requests per engine
    args.policy_fields = {}
    for item in args.policy:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError("no '='")
            args.policy_fields[name.strip()] = json.loads(value)
        except ValueError as e:
            p.error(f"--policy {item!r}: expected FIELD=JSON ({e})")
    if args.fresh < 0:
        p.error(f"--fresh must be >= 0, got {args.fresh}")
    for name in ("problems", "siblings", "steps", "new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.width < 2:
        p.error(f"--width must be >= 2, got {args.width}")
    return args


def workload(args):
    """[(step, prompts, tags)] : one batch per training step."""
    rng = np.random.default_rng(args.seed)
    problems = [rng.integers(3, 300, 8).tolist() for _ in range(args.problems)]
    prompts = [p for p in problems for _ in range(args.siblings)]
    return [
        (step, prompts, [(f"p{i}", step) for i in range(args.problems) for _ in range(args.siblings)])
        for step in range(1, args.steps + 1)
    ]


def ragged_workload(args):
    """[(step, prompts, tags, lengths)]: each step's batch is the GRPO groups of the
    recurring problems plus ``--fresh`` prompts never seen before (untagged); every
    request has its own response length (``max_new_tokens`` uniform in
    [new_tokens / 4, new_tokens], as RL rollouts vary in length), the same in every
    engine."""
    rng = np.random.default_rng(args.seed)
    problems = [rng.integers(3, 300, 8).tolist() for _ in range(args.problems)]
    out = []
    for step in range(1, args.steps + 1):
        prompts = [p for p in problems for _ in range(args.siblings)]
        tags = [(f"p{i}", step) for i in range(args.problems) for _ in range(args.siblings)]
        prompts += [rng.integers(3, 300, 8).tolist() for _ in range(args.fresh)]
        tags += [None] * args.fresh
        lengths = rng.integers(max(args.new_tokens // 4, 1), args.new_tokens + 1,
                               len(prompts)).tolist()
        if args.equal_lengths:
            lengths = [args.new_tokens] * len(prompts)
        out.append((step, prompts, tags, lengths))
    return out


def run_engine(algorithm, args, batches, das_config=None, stats_path=None):
    """Outputs per batch; with ``stats_path`` also the DAS worker's counters over the
    workload (warm-up excluded)."""
    import os

    import sglang

    spec = {}
    if algorithm != "none":
        spec = dict(speculative_algorithm=algorithm, speculative_num_draft_tokens=args.width,
                    disable_overlap_schedule=True)
    saved = os.environ.get("DAS_CONFIG")
    if das_config is not None:
        os.environ["DAS_CONFIG"] = json.dumps(das_config)
    try:
        engine = sglang.Engine(model_path=str(args.model_dir), log_level="error",
                               max_running_requests=64, random_seed=args.seed,
                               **cpu.ENGINE_KWARGS, **spec)
    finally:
        if saved is None:
            os.environ.pop("DAS_CONFIG", None)
        else:
            os.environ["DAS_CONFIG"] = saved
    try:
        params = {"temperature": 0.0, "max_new_tokens": args.new_tokens, "ignore_eos": True}
        engine.generate(input_ids=[[5, 6, 7]], sampling_params=dict(params, max_new_tokens=4))
        before = _read_stats(stats_path)
        out = []
        for step, prompts, tags, *lengths in batches:
            sp = [dict(params, custom_params={"das_problem_id": t[0], "das_step": t[1]})
                  if t is not None else dict(params) for t in tags]
            for p, n in zip(sp, lengths[0] if lengths else []):
                p["max_new_tokens"] = n
            t0 = time.perf_counter()
            res = engine.generate(input_ids=prompts, sampling_params=sp)
            out.append((step, time.perf_counter() - t0, res))
        if stats_path is None:
            return out
        after = _read_stats(stats_path)
        return out, {k: after[k] - before.get(k, 0) for k in ("verify_tokens", "accepted")}
    finally:
        engine.shutdown()


def _read_stats(path):
    if path is None or not Path(path).exists():
        return {}
    return json.loads(Path(path).read_text())


def summarize(algorithm, runs, reference, args):
    outputs = [o["output_ids"] for _, _, res in runs for o in res]
    ref = [o["output_ids"] for _, _, res in reference for o in res]
    metas = [[o["meta_info"] for o in res] for _, _, res in runs]
    if algorithm == "none":
        passes = [args.new_tokens - 1 for _ in runs]
        accept = [[1.0] * len(m) for m in metas]
    else:
        passes = [max(x["spec_verify_ct"] for x in m) for m in metas]
        accept = [[x["spec_accept_length"] for x in m] for m in metas]
    wall = sum(t for _, t, _ in runs)
    return {
        "requests": len(outputs),
        "mismatches": int(sum(a != b for a, b in zip(outputs, ref))),
        "accept_length_mean": float(np.mean(np.concatenate(accept))),
        "accept_length_by_step": {str(s): float(np.mean(a)) for (s, _, _), a in zip(runs, accept)},
        "forward_passes": int(sum(passes)),
        "wall_s": wall,
        "step_ms": 1e3 * wall / sum(passes),
    }


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, title in zip(axes, ("forward_passes_ratio_vs_none", "accept_length_mean",
                                     "step_ms"),
                              ("forward passes / none", "tokens per forward", "ms per forward")):
        ax.bar(names, [results[n][key] for n in names], color=["grey", "tab:blue", "tab:green"])
        ax.set_title(title)
    fig.suptitle("SGLang CPU, tiny Llama: DAS vs NGRAM vs no speculation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main_ragged(args):
    """DAS ragged vs DAS uniform (and none as the greedy reference), same requests."""
    import tempfile

    batches = ragged_workload(args)
    ref = run_engine("none", args, batches)
    outputs = {}
    report = {"requests": sum(len(res) for _, _, res in ref), "mismatches": 0}
    engines = {  # name: (verify layout, policy fields beyond --policy)
        "ragged": ("ragged", {}),  # the worker's default there: per-request budgets
        "uniform": ("uniform", {"uniform_width": False}),  # the same budgets, padded
        "uniform_width": ("uniform", {}),  # the worker's default there: one padded width
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, (layout, fields) in engines.items():
            stats = str(Path(tmp) / f"stats-{name}.json")
            cfg = {"server": {"verify_layout": layout, "stats_path": stats},
                   "policy": {**args.policy_fields, **fields}}
            runs, counters = run_engine("DAS", args, batches, cfg, stats)
            outputs[name] = [o["output_ids"] for _, _, res in runs for o in res]
            report[name] = {"verify_tokens_total": int(counters["verify_tokens"]),
                            "accepted_tokens_total": int(counters["accepted"])}
    want = [o["output_ids"] for _, _, res in ref for o in res]
    report["mismatches"] = int(sum(any(o != w for o in got) for *got, w in
                                   zip(*outputs.values(), want)))
    args.json.write_text(json.dumps(report, indent=2))
    plot_ragged(report, args.png or args.json.with_suffix(".png"))
    r, u = report["ragged"], report["uniform"]
    print(f"requests={report['requests']} mismatches={report['mismatches']} "
          f"verify tokens ragged/uniform={r['verify_tokens_total']}/{u['verify_tokens_total']} "
          f"({1 - r['verify_tokens_total'] / max(u['verify_tokens_total'], 1):.1%} fewer), "
          f"accepted {r['accepted_tokens_total']}/{u['accepted_tokens_total']}; "
          f"uniform_width verify {report['uniform_width']['verify_tokens_total']} accepted "
          f"{report['uniform_width']['accepted_tokens_total']}")
    return 0


def plot_ragged(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, title in zip(axes, ("verify_tokens_total", "accepted_tokens_total"),
                              ("tokens verified by the target", "draft tokens accepted")):
        names = ["ragged", "uniform", "uniform_width"]
        ax.bar(names, [report[k][key] for k in names], color=["tab:green", "tab:blue", "tab:grey"])
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(title)
    fig.suptitle(f"DAS on SGLang CPU: ragged vs uniform verify ({report['requests']} requests)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    cpu.activate()
    from das_sglang.sglang.cpu.tiny_model import make_tiny_model

    make_tiny_model(args.model_dir)
    if args.ragged:
        return main_ragged(args)
    batches = workload(args)
    runs = {a: run_engine(a, args, batches) for a in ALGORITHMS}
    results = {a: summarize(a, runs[a], runs["none"], args) for a in ALGORITHMS}
    none = results["none"]
    for r in results.values():
        r["forward_passes_ratio_vs_none"] = r["forward_passes"] / none["forward_passes"]
        r["step_overhead_ms"] = r["step_ms"] - none["step_ms"]
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "results": results}
    args.json.write_text(json.dumps(report, indent=2))
    plot(results, args.png or args.json.with_suffix(".png"))
    for a, r in results.items():
        print(f"{a:6s} requests={r['requests']} mismatches={r['mismatches']} "
              f"accept={r['accept_length_mean']:.2f} passes_ratio="
              f"{r['forward_passes_ratio_vs_none']:.3f} step_overhead_ms={r['step_overhead_ms']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
