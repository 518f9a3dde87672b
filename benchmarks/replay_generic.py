"""`das replay --dataset jsonl` on every bundled dataset, handed over as *generic* JSONL.

Each bundled dataset is written in the generic format (``datasets.write_generic_jsonl``:
prompt, response, group, step, finish_reason) and replayed with the exact command a user
with their own rollouts would run:

    das replay --dataset jsonl --input F --group-field group --step-field step [--steps S] ...

so the policy sees the data the way it sees data it was never tuned on (no dataset preset:
cap inferred from finish_reason, default cost preset unless the slice names one). Slices:

- skythought:     the bundled long-trace series, first 10 problems, steps 8-10 decoded (0-7 history)
- skythought-short: the short-trace run, same selection
- verl:           the bundled GSM8K dump, one step, 64 prompts x 16 samples, batch 1024
- verl-history:   the same dump, each problem's 16 samples spread over 4 steps (history)
- verl-cold:      8 samples per problem, 8 problems a step: every problem in ONE step only
- synthetic:      made-up text with other statistics (noisy copies of per-problem templates,
                  long-tailed lengths, some capped), 2 steps: a sanity check off the bundled data

Reports, per slice and variant (all outputs / without capped), the makespan ratio vs none of
every contender, and whether das <= min(das-fixed, suffix-decoding). JSON (+ a markdown table
on stdout). A slice run is one `das replay` process; ``--only`` picks slices.

    .venv/bin/python benchmarks/replay_generic.py --json benchmarks/results/replay_generic/replay_generic.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from das_sglang.core.tokenize import TextTokenizer
from das_sglang.replay import datasets as ds

POLICIES = "none,suffix-decoding,das,das-fixed,das-global"


def _sky(run: str, tok: TextTokenizer) -> list[ds.TextRollout]:
    texts = ds.load_skythought(run)
    keep = set(ds.problem_ids(texts)[:10])
    texts = [t for t in texts if t.problem_id in keep]
    # SkyThought records no finish reason: the harness's cap decides (as `--dataset skythought`).
    rolled = ds.tokenize_rollouts(texts, tok, ds.SKYTHOUGHT_MAX_NEW_TOKENS)
    return [replace(t, capped=r.hit_length_cap) for t, r in zip(texts, rolled)]


def _verl_groups() -> dict[str, list[ds.TextRollout]]:
    out: dict[str, list[ds.TextRollout]] = {}
    for t in ds.load_verl([ds.VERL_SAMPLE]):
        out.setdefault(t.problem_id, []).append(replace(t, capped=False))  # verl: ended by EOS
    return out


def _synthetic(seed: int = 0) -> list[ds.TextRollout]:
    """16 problems x 8 samples x 2 steps of made-up words: each problem has a template; a
    sample copies it with per-problem substitution noise and a long-tailed length; 1 in 10
    loops on its last sentence until a cap of 3000 words (finish_reason "length")."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(3000)]
    out = []
    for p in range(16):
        template = rng.choice(vocab, 4000)
        noise = rng.uniform(0.02, 0.4)
        for step in range(2):
            for i in range(8):
                n = int(min(3000, rng.lognormal(np.log(600), 0.7)))
                words = template[:n].copy()
                flip = rng.random(n) < noise
                words[flip] = rng.choice(vocab, int(flip.sum()))
                capped = rng.random() < 0.1
                if capped:
                    loop = list(words[-12:])
                    words = np.array((list(words) + loop * 3000)[:3000])
                out.append(ds.TextRollout(f"syn{p}-{step}-{i}", f"syn{p}", step, f"problem {p}: continue",
                                          " ".join(words), None, "synthetic", capped))
    return out


def slices(tok: TextTokenizer) -> dict[str, tuple[list[ds.TextRollout], str | None, str | None]]:
    """name -> (rollouts, --steps, --cost-preset)."""
    groups = _verl_groups()
    pids = list(groups)
    history = [replace(t, step=i // 4) for p in pids for i, t in enumerate(groups[p])]
    cold = [replace(t, step=j // 8) for j, p in enumerate(pids) for t in groups[p][:8]]
    return {
        "skythought": (_sky("long", tok), "8-10", "h100-32b"),
        "skythought-short": (_sky("short", tok), "8-10", "h100-32b"),
        "verl": ([t for p in pids for t in groups[p]], None, None),
        "verl-history": (history, "1-3", None),
        "verl-cold": (cold, None, None),
        "synthetic": (_synthetic(), "1", None),
    }


def run_slice(name: str, texts, steps, preset, workdir: Path, das: str, extra=()) -> dict:
    src = ds.write_generic_jsonl(texts, workdir / f"{name}.jsonl.gz")
    out = workdir / f"{name}.json"
    cmd = [das, "replay", "--dataset", "jsonl", "--input", str(src), "--group-field", "group",
           "--step-field", "step", "--policies", POLICIES, "--json", str(out)]
    if steps:
        cmd += ["--steps", steps]
    if preset:
        cmd += ["--cost-preset", preset]
    cmd += list(extra)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{name}: das replay failed:\n{res.stdout}\n{res.stderr}")
    doc = json.loads(out.read_text())
    variants = {}
    for run in doc["runs"]:
        pol = {k: v["makespan_ratio_vs_none"] for k, v in run["policies"].items()}
        tps = {k: v["tokens_per_step"] for k, v in run["policies"].items()}
        best_peer = min(pol["das-fixed"], pol["suffix-decoding"])
        variants[run["variant"]] = {
            "makespan_ratio_vs_none": pol, "tokens_per_step": tps,
            "das_le_best_of_fixed_and_suffix": pol["das"] <= best_peer,
            "rollouts_decoded": run["rollouts_decoded"], "capped_decoded": run["capped_decoded"],
            "max_new_tokens": run.get("max_new_tokens"), "cost_model": run["cost_model"]["name"],
        }
    return {"command": " ".join(cmd[:2] + ["--dataset", "jsonl", "--input", src.name] + cmd[6:-2]),
            "seconds": time.perf_counter() - t0, "variants": variants}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--only", default="", help="comma list of slices (default: all)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the generic JSONL files go")
    ap.add_argument("--no-host-time", action="store_true",
                    help="pass --no-host-time to das replay (modeled forward costs only)")
    args = ap.parse_args()
    das = str(Path(sys.executable).with_name("das"))
    tok = TextTokenizer()
    all_slices = slices(tok)
    names = [n for n in args.only.split(",") if n] or list(all_slices)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in names:
            texts, steps, preset = all_slices[name]
            results[name] = run_slice(name, texts, steps, preset, workdir, das,
                                      ["--no-host-time"] if args.no_host_time else [])
            print(f"{name}: {results[name]['seconds']:.0f} s", file=sys.stderr, flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"policies": POLICIES.split(","), "host_time": not args.no_host_time,
                                     "slices": results}, indent=2))
    cols = POLICIES.split(",")
    print("| slice | variant | " + " | ".join(cols) + " | das <= best peer |")
    print("|---|---|" + "---:|" * len(cols) + "---|")
    for name, r in results.items():
        for variant, v in r["variants"].items():
            cells = " | ".join(f"{v['makespan_ratio_vs_none'][c]:.3f}" for c in cols)
            print(f"| {name} | {variant} | {cells} | {'yes' if v['das_le_best_of_fixed_and_suffix'] else 'NO'} |")


if __name__ == "__main__":
    main()
