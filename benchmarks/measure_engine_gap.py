"""SGLang's own host time between two DAS decode steps, measured on the installed SGLang.

    python benchmarks/measure_engine_gap.py --json out.json [--png out.png] [--batches 32,128,512]

What ``benchmarks/bench_host_path.py`` models as ``--engine-us`` (the engine's Python per
request between two forwards, in which the native pre-draft runs beside it): one real
``sglang.Engine`` with ``--speculative-algorithm DAS`` (CPU development mode, tiny random
Llama, no overlap scheduler as for every speculative algorithm), one batch of ``B``
requests per batch size decoding together (greedy, EOS ignored, ``--new-tokens`` each).
The worker's own clocks (``host_time.py``, stats ``"host"``) give per batch size:

- ``engine_gap_ms_per_step``: from a decode step's return to the next decode step's entry
  with no prefill in between -- SGLang's result processing, output streaming and
  scheduling of the next batch, all of it Python on the scheduler thread;
- ``engine_gap_us_per_row``: the same per request in the batch;
- ``plan_ms_per_step`` / ``feedback_ms_per_step``: DAS's own time (history empty here:
  cold drafts, so these are not the RL-scale figures of bench_host_path).

Then ``fit``: least squares ``gap_ms = fixed_ms + us_per_row * B / 1000`` over the batch
sizes. SGLang's Python is the same code on a GPU host; what differs there is the speed of
the host CPU (this measures this machine, the one bench_host_path runs on) and the
device-side work the CPU mode runs synchronously (none between two steps here: the
non-overlap scheduler has the forward's results on the host before the gap starts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, type=Path)
    ap.add_argument("--png", type=Path, default=None, help="also plot ms per step by batch size")
    ap.add_argument("--batches", default="32,128,512")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2, help="batches per batch size")
    ap.add_argument("--width", type=int, default=8, help="--speculative-num-draft-tokens")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/das-tiny-llama"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
        if min(batches) < 1:
            raise ValueError
    except ValueError:
        print(f"error: invalid --batches={args.batches!r}: comma-separated sizes >= 1", file=sys.stderr)
        return 1
    from das_sglang.sglang import cpu

    cpu.activate()
    import sglang

    from das_sglang.sglang.cpu.tiny_model import make_tiny_model
    from das_sglang.sglang.host_time import delta, summary

    make_tiny_model(args.model_dir)
    stats = Path(tempfile.mkdtemp(prefix="das-gap-")) / "stats.json"
    os.environ["DAS_CONFIG"] = json.dumps({"server": {"stats_path": str(stats)}})
    biggest = max(batches)
    kwargs = dict(cpu.ENGINE_KWARGS, max_total_tokens=max(32768, biggest * (args.new_tokens + 16 + 2 * args.width)))
    engine = sglang.Engine(model_path=str(args.model_dir), log_level="error", random_seed=args.seed,
                           max_running_requests=biggest, speculative_algorithm="DAS",
                           speculative_num_draft_tokens=args.width, disable_overlap_schedule=True,
                           **kwargs)
    rng = np.random.default_rng(args.seed)
    out = {"config": {k: str(v) for k, v in vars(args).items()}, "batches": {}}
    try:
        params = {"temperature": 0.0, "max_new_tokens": args.new_tokens, "ignore_eos": True}
        engine.generate(input_ids=[[5, 6, 7]], sampling_params=dict(params, max_new_tokens=4))
        for b in batches:
            before = json.loads(stats.read_text())["host"]
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                prompts = rng.integers(3, 300, (b, 8)).tolist()
                engine.generate(input_ids=prompts, sampling_params=[dict(params) for _ in prompts])
            wall = time.perf_counter() - t0
            host = delta(json.loads(stats.read_text())["host"], before)
            entry = {**summary(host), "engine_gap_steps": host["engine_gap_steps"],
                     "engine_gap_max_ms": host["engine_gap_max_ms"], "wall_s": wall}
            out["batches"][str(b)] = entry
            print(f"batch {b:4d}: engine gap {entry['engine_gap_ms_per_step']:.2f} ms/step "
                  f"({entry['engine_gap_us_per_row']:.2f} us/request, {host['engine_gap_steps']} steps); "
                  f"DAS plan {entry['plan_ms_per_step']:.2f} feedback {entry['feedback_ms_per_step']:.2f} ms/step",
                  flush=True)
    finally:
        engine.shutdown()
    xs = [int(b) for b, e in out["batches"].items() if e["engine_gap_ms_per_step"] is not None]
    ys = [out["batches"][str(b)]["engine_gap_ms_per_step"] for b in xs]
    if len(set(xs)) >= 2:
        slope, fixed = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
        out["fit"] = {"fixed_ms": float(fixed), "us_per_row": float(slope * 1e3)}
        print(f"fit: gap = {fixed:.3f} ms + {slope * 1e3:.2f} us x requests", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    if args.png:
        _plot(out, args.png)
    return 0


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(b) for b in out["batches"])
    rows = [out["batches"][str(b)] for b in sizes]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("engine_gap_ms_per_step", "SGLang between two decode steps"),
                       ("plan_ms_per_step", "DAS plan + verify inputs (empty history)"),
                       ("feedback_ms_per_step", "DAS feedback")):
        ax.plot(sizes, [r[key] or 0.0 for r in rows], marker="o", label=label)
    ax.set_xlabel("requests decoding together")
    ax.set_ylabel("host ms per decode step")
    ax.set_title("Host time per decode step (SGLang CPU mode, this machine)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
