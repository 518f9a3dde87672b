"""Scale-out: many SGLang engines behind the SMG router act as one DAS drafter.

    python benchmarks/bench_scaleout.py --engines 2 --json out.json [--png out.png]

Real SGLang engines (tiny random Llama, CPU development mode) with DAS, behind the real
SMG router (pip ``smg``), a multi-step GRPO-style rollout of the bundled GSM8K prompts
(``das_sglang/data/verl_gsm8k_multiturn``): ``--problems`` prompts x ``--siblings``
samples for ``--steps`` training steps, greedy, ``--new-tokens`` each (EOS ignored).
The same requests run four ways, each with fresh per-problem history (own problem-id
namespace and training steps):

- single       one engine serves everything (the reference acceptance);
- affinity     ``--engines`` engines behind the router, consistent hashing on the
               ``x-smg-routing-key`` header = problem id (what das_sglang.api sets);
- round_robin  the same engines behind a round-robin router;
- restart      affinity, and after step ``--restart-after`` the last engine is crashed
               (SIGKILL, once its shard writes have landed) and started again: it must
               reload its problems lazily from the shared shard directory.

Greedy decoding would make the GRPO siblings of a problem identical, so each sibling's
prompt (the problem's tokens) ends with one extra token of its own (distinct across all
requests): siblings differ, and a sibling at step s+1 repeats what it produced at step
s -- a deterministic stand-in for "this step's samples resemble earlier samples of the
same problem", with exact outputs (greedy) so every DAS output is checked token for
token against a no-speculation engine (mismatches). (The tiny random model's text
depends mostly on the last token, so a shared suffix such as "Sample k:" would make
the siblings identical again.)

Reported (JSON): accept_length_mean = tokens committed per verify forward (bonus
included; completion_tokens / spec_verify_ct), mean over requests, per mode and by step;
restart.accept_length_mean is the step after the restart, next to affinity's same step;
restart.lazy_loads = lazy loads on the restarted engine that found history
(lookups and sequences loaded too); per-engine DAS stats from the shard directory and
from each engine's /metrics. CPU wall-clock says nothing about GPU speed: acceptance is
the transferable number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "das_sglang" / "data" / "verl_gsm8k_multiturn" / "2.jsonl.gz"
MODES = ("single", "affinity", "round_robin", "restart")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--json", required=True, type=Path)
    p.add_argument("--png", type=Path, default=None, help="plot (default: --json with .png)")
    p.add_argument("--problems", type=int, default=12)
    p.add_argument("--siblings", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--restart-after", type=int, default=2, help="restart after this step (restart mode)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--width", type=int, default=8, help="--speculative-num-draft-tokens")
    p.add_argument("--policy", default="unlimited",
                   help="DAS budget policy (server.policy); 'unlimited' isolates the effect of history")
    p.add_argument("--port", type=int, default=41200, help="router port (engines: port+1..)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/das-bench-scaleout"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("engines", "problems", "siblings", "steps", "new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.engines < 2:
        p.error(f"--engines must be >= 2 (scale-out), got {args.engines}")
    if not 1 <= args.restart_after < args.steps:
        p.error(f"--restart-after must be in [1, --steps - 1], got {args.restart_after}")
    return args


# ---------------------------------------------------------------- workload


def workload(args, model_path):
    """(problem_id, sibling, input_ids) for every request of one step."""
    import transformers

    from das_sglang.rollout import read_prompts

    prompts = read_prompts(PROMPTS)
    if args.problems > len(prompts):
        raise SystemExit(f"--problems {args.problems}: the bundled file has {len(prompts)}")
    tok = transformers.AutoTokenizer.from_pretrained(str(model_path))
    vocab = len(tok)
    n = args.problems * args.siblings
    if n > vocab - 3:
        raise SystemExit(f"--problems x --siblings = {n}: needs that many distinct tail tokens (< {vocab - 3})")
    tails = np.random.default_rng(args.seed).choice(np.arange(3, vocab), n, replace=False).tolist()
    jobs = []
    for i, p in enumerate(prompts[: args.problems]):
        ids = tok(p.text).input_ids
        jobs += [(p.problem_id, k, ids + [tails[i * args.siblings + k]]) for k in range(args.siblings)]
    return jobs


def run_step(engine, jobs, namespace, step, args, rng):
    """Submit one step's requests at once, in shuffled arrival order (as an RL trainer's
    asynchronous workers would); returns one record per request."""
    order = list(jobs)
    rng.shuffle(order)
    params = {"temperature": 0.0, "max_new_tokens": args.new_tokens, "ignore_eos": True}

    async def one(pid, k, ids):
        sp = dict(params, custom_params={"das_problem_id": f"{namespace}/{pid}", "das_step": step})
        out = await engine.async_generate(input_ids=ids, sampling_params=sp, rid=f"{namespace}/{pid}/{step}/{k}")
        meta = out["meta_info"]
        verify = int(meta.get("spec_verify_ct") or 0)
        completion = int(meta["completion_tokens"])
        return {"pid": pid, "k": k, "step": step, "output": out.get("output_ids") or out["text"],
                "completion_tokens": completion, "verify": verify,
                "accept_length": completion / verify if verify else 1.0}

    async def all_jobs():
        return await asyncio.gather(*(one(*j) for j in order))

    return engine.loop.run_until_complete(all_jobs())


# ---------------------------------------------------------------- runs


def reference_outputs(args, jobs, cluster_mod, router_client):
    """Greedy outputs without speculation, one per distinct prompt."""
    ref = cluster_mod.start_cluster("tiny", 1, port=args.port + 50, router=False, speculative=False,
                                    log_dir=args.workdir / "logs-none")
    engine = router_client.RouterEngine(ref.engine_urls[0])
    try:
        recs = run_step(engine, jobs, "none", 1, args, random.Random(args.seed))
    finally:
        engine.shutdown()
        ref.stop()
    return {(r["pid"], r["k"]): r["output"] for r in recs}


def settle(cluster, timeout_s=120.0):
    """Wait until every engine's shard writes have landed: called once all responses are
    back (so every request has finished in its scheduler), it waits for the engines'
    stats files (written by the same writer thread, after the shards) to show no pending
    write and no change over one poll interval."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        stats = cluster.engine_stats()
        state = tuple((k, s.get("requests_finished"), s.get("shard_writes")) for k, s in sorted(stats.items()))
        quiet = all(s.get("shard_pending", 1) == 0 for s in stats.values())
        if quiet and state == last:
            return stats
        last = state
        time.sleep(1.5)
    raise RuntimeError(f"engines did not settle: {cluster.engine_stats()}")


def run_mode(mode, url, cluster, jobs, args, base_step, router_client):
    engine = router_client.RouterEngine(url)
    rng = random.Random(f"{args.seed}-{mode}")
    records, events = [], {}
    try:
        for s in range(1, args.steps + 1):
            t0 = time.perf_counter()
            recs = run_step(engine, jobs, mode, base_step + s, args, rng)
            for r in recs:
                r["step"] = s
            records += recs
            print(f"  {mode:11s} step {s}: accept {np.mean([r['accept_length'] for r in recs]):.2f} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
            if mode == "restart" and s == args.restart_after:
                victim = len(cluster.engines) - 1
                events["before"] = settle(cluster)
                t0 = time.perf_counter()
                cluster.restart_engine(victim, crash=True)
                events["restart_s"] = time.perf_counter() - t0
                events["victim"] = f"engine{victim}"
                print(f"  restarted engine{victim} in {events['restart_s']:.0f} s", flush=True)
        events["after"] = settle(cluster)
    finally:
        engine.shutdown()
    return records, events


def summarize(records, ref, steps):
    acc = [r["accept_length"] for r in records]
    by_step = {str(s): float(np.mean([r["accept_length"] for r in records if r["step"] == s]))
               for s in range(1, steps + 1)}
    return {
        "requests": len(records),
        "mismatches": int(sum(r["output"] != ref[(r["pid"], r["k"])] for r in records)),
        "accept_length_mean": float(np.mean(acc)),
        "accept_length_by_step": by_step,
        "verify_forwards": int(sum(r["verify"] for r in records)),
        "completion_tokens": int(sum(r["completion_tokens"] for r in records)),
    }


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    names = ["single", "affinity", "round_robin"]
    ax1.bar(names, [report[n]["accept_length_mean"] for n in names], color=["grey", "tab:blue", "tab:red"])
    ax1.set_title("tokens per verify forward (mean over requests)")
    for n, c in zip(names + ["restart"], ["grey", "tab:blue", "tab:red", "tab:green"]):
        by = report[n]["accept_length_by_step"]
        ax2.plot([int(s) for s in by], list(by.values()), marker="o", color=c, label=n)
    ax2.axvline(report["restart"]["after_step"] - 0.5, color="tab:green", ls=":", lw=1)
    ax2.set_xlabel("training step")
    ax2.set_xticks(range(1, int(max(report["single"]["accept_length_by_step"], key=int)) + 1))
    ax2.set_title("by step (dotted: engine restart)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"DAS on {report['settings']['engines']} SGLang CPU engines behind the SMG router")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    from das_sglang import api, cluster as cluster_mod, router_client

    model_path = api.tiny_model()  # build once, before engines race to
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    jobs = workload(args, model_path)
    t_start = time.perf_counter()
    print(f"reference (no speculation): {len(jobs)} prompts", flush=True)
    ref = reference_outputs(args, jobs, cluster_mod, router_client)

    cluster = cluster_mod.start_cluster(
        "tiny", args.engines, port=args.port, shard_dir=args.workdir / "shards", width=args.width,
        das_config={"server": {"policy": args.policy}}, log_dir=args.workdir / "logs")
    rr = None
    results, events = {}, {}
    try:
        rr = cluster_mod.start_router(cluster.engine_urls, args.port + 100, policy="round_robin",
                                      log=args.workdir / "logs" / "router-rr.log")
        urls = {"single": cluster.engine_urls[0], "affinity": cluster.url, "round_robin": rr.url,
                "restart": cluster.url}
        prev = settle(cluster)
        for i, mode in enumerate(MODES):
            records, events[mode] = run_mode(mode, urls[mode], cluster, jobs, args, 100 * (i + 1),
                                             router_client)
            results[mode] = summarize(records, ref, args.steps)
            if mode != "restart":  # (the restarted engine's counters start again at 0)
                now = events[mode]["after"]
                for key in ("lazy_loads", "lazy_load_hits"):
                    results[mode][key.replace("lazy_loads", "lazy_load_lookups")] = int(
                        sum(now[e].get(key, 0) - prev.get(e, {}).get(key, 0) for e in now))
                prev = now
        metrics = cluster_mod.metrics_by_engine(cluster.engine_urls)
    finally:
        if rr is not None:
            rr.stop()
        cluster.stop()

    after = args.restart_after + 1
    victim = events["restart"]["victim"]
    before_v = events["restart"]["before"].get(victim, {})
    after_v = events["restart"]["after"].get(victim, {})
    # The restarted engine's counters start from zero: its lazy loads are all post-restart.
    restart = {
        "after_step": after,
        "accept_length_mean": results["restart"]["accept_length_by_step"][str(after)],
        "affinity_same_step": results["affinity"]["accept_length_by_step"][str(after)],
        "lazy_loads": int(after_v.get("lazy_load_hits", 0)),
        "lazy_load_lookups": int(after_v.get("lazy_load_lookups", after_v.get("lazy_loads", 0))),
        "lazy_load_sequences": int(after_v.get("lazy_load_sequences", 0)),
        "victim": victim,
        "victim_started_at_before": before_v.get("started_at"),
        "victim_started_at_after": after_v.get("started_at"),
        "restart_s": events["restart"]["restart_s"],
        **{k: v for k, v in results["restart"].items() if k != "accept_length_mean"},
        "accept_length_mean_all_steps": results["restart"]["accept_length_mean"],
    }
    restart["ratio_vs_affinity"] = restart["accept_length_mean"] / restart["affinity_same_step"]
    single = results["single"]["accept_length_mean"]
    report = {
        "mismatches": int(sum(r["mismatches"] for r in results.values())),
        "single": results["single"],
        "affinity": dict(results["affinity"], ratio_vs_single=results["affinity"]["accept_length_mean"] / single),
        "round_robin": dict(results["round_robin"],
                            ratio_vs_single=results["round_robin"]["accept_length_mean"] / single),
        "restart": restart,
        "engines": {"stats_files": events["restart"]["after"], "metrics": metrics},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "wall_s": time.perf_counter() - t_start,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    plot(report, args.png or args.json.with_suffix(".png"))
    print(f"mismatches={report['mismatches']}  accept_length_mean: single={single:.3f} "
          f"affinity={report['affinity']['accept_length_mean']:.3f} "
          f"({report['affinity']['ratio_vs_single']:.3f}x) round_robin="
          f"{report['round_robin']['accept_length_mean']:.3f} ({report['round_robin']['ratio_vs_single']:.3f}x)")
    print(f"restart: step {after} accept {restart['accept_length_mean']:.3f} vs affinity "
          f"{restart['affinity_same_step']:.3f} ({restart['ratio_vs_affinity']:.3f}x), lazy_loads="
          f"{restart['lazy_loads']} (lookups {restart['lazy_load_lookups']}, sequences "
          f"{restart['lazy_load_sequences']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
