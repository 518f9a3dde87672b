"""Drafter latency / memory on the bundled SkyThought AIME24 rollouts.

    python benchmarks/bench_drafter.py --json out.json [--png out.png]

Per problem, the native index holds a history of ``--history`` rollouts (the problem's
outputs at other checkpoints of both runs, each cut to ``--max-tokens``), spread over 4
past steps; ``--live`` further checkpoints' outputs are then decoded in lockstep, token by
token: every decode step drafts for every live request (max budget), accepts what the
recorded continuation confirms (+1 bonus token) and appends it. Measured in one process:

- speculate_us_mean / _p99: one ``draft_for_sequence`` call from Python, per request
  (fastest of ``--repeats``; ``*_raw``: the first timing, preemptions included);
- batch_us_per_request: ``draft_batch`` over the whole decode batch / rows (the baseline
  it is compared with is the per-request calls above, same states, same process);
- update_us_per_token / _per_request_step: ``extend`` of the accepted tokens (+ bonus), one
  call per request (even decode steps); update_batch_*: one ``extend_batch`` per decode
  step (odd steps), the batch API's counterpart;
- build_us_per_token, bytes_per_token, nodes_per_token of the full indices;
- remove_us_per_token, bytes_per_token_after_slide, orphan_storages_after_slide: the
  window slides by one step (each problem's oldest history step is removed);
- drafter_us_per_request: ``SuffixDrafter.speculate_batch`` (DraftTree objects included),
  fastest of 200 rounds over the same states;
- oracle ratio: the pure-Python reference index on a small slice (fastest pass of several).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from das_sglang.core.config import DrafterConfig
from das_sglang.core.draft_tree import DraftTree
from das_sglang.core.drafter import SuffixDrafter
from das_sglang.core.tokenize import TextTokenizer
from das_sglang.native import SuffixIndex, draft_batch, extend_batch
from das_sglang.replay.datasets import load_skythought

HISTORY_STEPS = 4  # history rollouts are spread over this many past steps


def load_problems(n_problems: int, max_tokens: int, cache_dir: str | None) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    """problem_id -> (prompt ids, [response ids of every checkpoint of both runs])."""
    rollouts = load_skythought("long") + load_skythought("short")
    pids = sorted({r.problem_id for r in rollouts}, key=lambda p: int(p.split("-")[1]))[:n_problems]
    chosen = [r for r in rollouts if r.problem_id in pids]
    tok = TextTokenizer(cache_dir=cache_dir)
    # Cut the text before tokenising: the long run has 32k-token outputs.
    texts = [r.response[: max_tokens * 6] for r in chosen]
    prompts = tok.encode_many(sorted({r.prompt for r in chosen}))
    prompt_of = dict(zip(sorted({r.prompt for r in chosen}), prompts))
    ids = tok.encode_many(texts)
    out: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}
    for r, resp in zip(chosen, ids):
        entry = out.setdefault(r.problem_id, (prompt_of[r.prompt], []))
        entry[1].append(np.ascontiguousarray(resp[:max_tokens], dtype=np.int32))
    return out


def build(problems, n_history: int, max_depth: int):
    indices, build_s, build_tokens = {}, 0.0, 0
    for pid, (prompt, responses) in problems.items():
        ix = SuffixIndex(max_depth)
        for k, resp in enumerate(responses[:n_history]):
            seq = np.concatenate([prompt, resp])
            t0 = time.perf_counter()
            ix.add_sequence(k, seq, k % HISTORY_STEPS)
            build_s += time.perf_counter() - t0
            build_tokens += len(seq)
        indices[pid] = ix
    return indices, build_s, build_tokens


def decode(problems, indices, cfg: DrafterConfig, n_history: int, n_live: int, max_steps: int, repeats: int):
    """Lockstep decoding of the live requests; returns the timing samples.

    Queries do not mutate, so each is timed ``repeats`` times and the fastest kept (the
    first timing is kept too, as ``raw``): the machine is shared, and scheduler
    preemptions would otherwise dominate the tail. Updates are timed once."""
    step = HISTORY_STEPS
    weights = {s: cfg.step_decay ** (step - s) for s in range(step + 1)}
    w_steps = np.asarray(sorted(weights), np.int64)
    w_vals = np.asarray([weights[s] for s in sorted(weights)])
    live = []  # (index, seq_id, target response, produced)
    for pid, (prompt, responses) in problems.items():
        for k, resp in enumerate(responses[n_history : n_history + n_live]):
            seq_id = 1000 + k
            indices[pid].add_sequence(seq_id, prompt, step)
            live.append([indices[pid], seq_id, resp, 0])
    single_ns, raw_ns, batch_ns, batch_raw_ns, batch_rows = [], [], 0, 0, 0
    update_ns, update_tokens, update_rows, accepted = 0, 0, 0, []
    upd_batch_ns, upd_batch_tokens, upd_batch_rows = 0, 0, 0
    upd_batch_step_us_per_token = []  # per decode step: robust to preemptions via the median
    upd_batch_step_us_per_row = []
    upd_step_us_per_token = []
    for step_no in range(max_steps):
        live = [r for r in live if r[3] < len(r[2])]
        if not live:
            break
        for ix, seq_id, _, _ in live:  # per-request calls: the baseline of the batch API
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter_ns()
                ix.draft_for_sequence(seq_id, cfg.max_budget, cfg.min_token_prob, weights, not cfg.tree, cfg.max_match_len)
                times.append(time.perf_counter_ns() - t0)
            single_ns.append(min(times))
            raw_ns.append(times[0])
        seq_ids = np.asarray([r[1] for r in live], np.int64)
        budgets = np.full(len(live), cfg.max_budget, np.int32)
        rows = [r[0] for r in live]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            toks, parents, probs, offsets, match = draft_batch(
                rows, seq_ids, budgets, cfg.min_token_prob, w_steps, w_vals, not cfg.tree, cfg.max_match_len
            )
            times.append(time.perf_counter_ns() - t0)
        batch_ns += min(times)
        batch_raw_ns += times[0]
        batch_rows += len(live)
        news = []
        for r, row in enumerate(live):
            ix, seq_id, target, pos = row
            a, z = offsets[r], offsets[r + 1]
            tree = DraftTree(toks[a:z], parents[a:z], probs[a:z], int(match[r]))
            n_acc = tree.accept_length(target[pos : pos + cfg.max_budget].tolist())
            news.append(target[pos : pos + n_acc + 1])  # accepted drafts + the bonus token
            accepted.append(n_acc)
            row[3] = pos + len(news[-1])
        if step_no % 2 == 0:  # per-request extend calls: the baseline of extend_batch
            step_ns = 0
            for (ix, seq_id, _, _), new in zip(live, news):
                t0 = time.perf_counter_ns()
                ix.extend(seq_id, new)
                step_ns += time.perf_counter_ns() - t0
            update_ns += step_ns
            update_tokens += sum(len(x) for x in news)
            update_rows += len(live)
            upd_step_us_per_token.append(step_ns / 1e3 / sum(len(x) for x in news))
        else:
            flat = np.concatenate(news)
            offs = np.zeros(len(news) + 1, np.int64)
            np.cumsum([len(x) for x in news], out=offs[1:])
            t0 = time.perf_counter_ns()
            extend_batch(rows, seq_ids, flat, offs)
            dt = time.perf_counter_ns() - t0
            upd_batch_ns += dt
            upd_batch_tokens += len(flat)
            upd_batch_step_us_per_token.append(dt / 1e3 / max(1, len(flat)))
            upd_batch_step_us_per_row.append(dt / 1e3 / len(live))
            upd_batch_rows += len(live)
    return dict(single_ns=np.asarray(single_ns), raw_ns=np.asarray(raw_ns), batch_ns=batch_ns,
                batch_raw_ns=batch_raw_ns, batch_rows=batch_rows,
                update_ns=update_ns, update_tokens=update_tokens, update_rows=update_rows,
                upd_batch_ns=upd_batch_ns, upd_batch_tokens=upd_batch_tokens, upd_batch_rows=upd_batch_rows,
                upd_batch_step_us_per_token=np.asarray(upd_batch_step_us_per_token),
                upd_batch_step_us_per_row=np.asarray(upd_batch_step_us_per_row),
                upd_step_us_per_token=np.asarray(upd_step_us_per_token),
                accepted=np.asarray(accepted))


def slide(indices, n_history: int) -> dict[str, float]:
    """Advance the window by one step: remove every problem's oldest-step history."""
    removed, t_s = 0, 0.0
    for ix in indices.values():
        for k in range(0, n_history, HISTORY_STEPS):  # step 0 = ids k with k % 4 == 0
            removed += len(ix.sequence_tokens(k))
            t0 = time.perf_counter()
            ix.remove_sequence(k)
            t_s += time.perf_counter() - t0
    tokens = sum(ix.num_tokens for ix in indices.values())
    return {
        "remove_us_per_token": t_s / removed * 1e6,
        "bytes_per_token_after_slide": sum(ix.memory_bytes() for ix in indices.values()) / tokens,
        "orphan_storages_after_slide": sum(ix.num_orphans for ix in indices.values()),
    }


def drafter_level(problems, cfg: DrafterConfig, n_history: int, n_live: int, rounds: int) -> float:
    """us per request of SuffixDrafter.speculate_batch (Python objects included), fastest round."""
    d = SuffixDrafter(cfg)
    for s in range(HISTORY_STEPS):
        d.advance_step(s)
    d.advance_step(HISTORY_STEPS)
    rids = []
    for pid, (prompt, responses) in problems.items():
        for k, resp in enumerate(responses[:n_history]):
            d.add_history(pid, k % HISTORY_STEPS, np.concatenate([prompt, resp]))
        for k, resp in enumerate(responses[n_history : n_history + n_live]):
            rid = f"{pid}/{k}"
            d.start_request(rid, pid, np.concatenate([prompt, resp[:200]]))
            rids.append(rid)
    best = float("inf")  # fastest round: the states do not change between rounds
    for _ in range(rounds):
        t0 = time.perf_counter()
        d.speculate_batch(rids)
        best = min(best, time.perf_counter() - t0)
    return best / len(rids) * 1e6


def oracle_ratio(problems, cfg: DrafterConfig) -> dict[str, float]:
    """Native vs the pure-Python reference on a small slice (same queries)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from oracle.reference_index import ReferenceIndex

    prompt, responses = next(iter(problems.values()))
    depth = 16
    nat, ref = SuffixIndex(depth), ReferenceIndex(depth)
    for k, resp in enumerate(responses[:4]):
        nat.add_sequence(k, resp[:1500], 0)
        ref.add_sequence(k, resp[:1500].tolist(), 0)
    queries = [responses[5][:n] for n in range(50, 1050, 50)]
    args = (cfg.max_budget, cfg.min_token_prob, {0: 1.0}, not cfg.tree, min(cfg.max_match_len, depth - 1))

    def fastest_pass(draft, qs, passes: int) -> float:  # seconds per pass, best of `passes`
        best = float("inf")
        for _ in range(passes):
            t0 = time.perf_counter()
            for q in qs:
                draft(q, *args)
            best = min(best, time.perf_counter() - t0)
        return best

    ref_s = fastest_pass(ref.draft, [q.tolist() for q in queries], 3)
    nat_s = fastest_pass(nat.draft, queries, 20)
    return {"oracle_us_per_draft": ref_s / len(queries) * 1e6, "native_us_per_draft": nat_s / len(queries) * 1e6,
            "native_speedup_vs_oracle": ref_s / nat_s}


def plot(single_ns: np.ndarray, out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    us = single_ns / 1e3
    a.hist(np.clip(us, 0, np.percentile(us, 99.9)), bins=80)
    a.axvline(out["speculate_us_mean"], color="k", ls="--", label=f"mean {out['speculate_us_mean']:.2f} us")
    a.axvline(out["speculate_us_p99"], color="r", ls=":", label=f"p99 {out['speculate_us_p99']:.2f} us")
    a.set_xlabel("draft_for_sequence latency per request (us)")
    a.set_ylabel("calls")
    a.legend()
    names = ["speculate\nper-request call", "speculate\ndraft_batch", "update\nextend_batch", "draft_batch +\nextend_batch"]
    vals = [out["speculate_us_mean"], out["batch_us_per_request"], out["update_batch_us_per_request_step_median_step"],
            out["speculate_plus_update_us_per_request_step"]]
    b.bar(names, vals, color=["C0", "C1", "C2", "C3"])
    b.axhline(10, color="r", ls="--", label="10 us target (speculate+update)")
    b.set_ylabel("us")
    b.legend()
    b.set_title("us per request per decode step")
    fig.suptitle(f"SkyThought AIME24: {out['problems']} problems, {out['history_tokens_per_problem']:.0f} history "
                 f"tokens/problem, depth {out['max_depth']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--png", help="also plot latency histogram + bars here")
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--history", type=int, default=16, help="history rollouts per problem")
    ap.add_argument("--live", type=int, default=4, help="live requests per problem")
    ap.add_argument("--max-tokens", type=int, default=6000, help="tokens kept per rollout")
    ap.add_argument("--max-steps", type=int, default=1500, help="decode steps simulated")
    ap.add_argument("--repeats", type=int, default=3, help="timings per query; the fastest is kept")
    ap.add_argument("--max-depth", type=int, default=DrafterConfig().max_depth)
    ap.add_argument("--cache-dir", help="token cache (default: $XDG_CACHE_HOME/das-sglang or ~/.cache/das-sglang)")
    a = ap.parse_args(argv)
    if a.history + a.live > 22:
        print(f"error: --history + --live = {a.history + a.live} > 22 rollouts per problem in the data", file=sys.stderr)
        return 1
    cfg = DrafterConfig(max_depth=a.max_depth)
    problems = load_problems(a.problems, a.max_tokens, a.cache_dir)
    indices, build_s, build_tokens = build(problems, a.history, cfg.max_depth)
    nodes = sum(ix.num_nodes for ix in indices.values())
    mem = sum(ix.memory_bytes() for ix in indices.values())
    orphans = sum(ix.num_orphans for ix in indices.values())
    sim = decode(problems, indices, cfg, a.history, a.live, a.max_steps, a.repeats)
    single = sim["single_ns"]
    steps = len(sim["accepted"])
    out = {
        "problems": len(problems),
        "history_rollouts_per_problem": a.history,
        "history_tokens_per_problem": build_tokens / len(problems),
        "live_requests": a.live * len(problems),
        "request_steps": steps,
        "max_depth": cfg.max_depth,
        "max_budget": cfg.max_budget,
        "timing": f"queries: fastest of {a.repeats} (first timing in *_raw); updates: single timing",
        "speculate_us_mean": float(single.mean() / 1e3),
        "speculate_us_p50": float(np.percentile(single, 50) / 1e3),
        "speculate_us_p99": float(np.percentile(single, 99) / 1e3),
        "speculate_us_mean_raw": float(sim["raw_ns"].mean() / 1e3),
        "speculate_us_p99_raw": float(np.percentile(sim["raw_ns"], 99) / 1e3),
        "batch_us_per_request": sim["batch_ns"] / sim["batch_rows"] / 1e3,
        "batch_us_per_request_raw": sim["batch_raw_ns"] / sim["batch_rows"] / 1e3,
        "update_us_per_token": sim["update_ns"] / sim["update_tokens"] / 1e3,
        "update_us_per_request_step": sim["update_ns"] / sim["update_rows"] / 1e3,
        "update_batch_us_per_token": sim["upd_batch_ns"] / sim["upd_batch_tokens"] / 1e3,
        "update_batch_us_per_request_step": sim["upd_batch_ns"] / sim["upd_batch_rows"] / 1e3,
        "update_us_per_token_median_step": float(np.median(sim["upd_step_us_per_token"])),
        "update_batch_us_per_token_median_step": float(np.median(sim["upd_batch_step_us_per_token"])),
        "update_batch_us_per_request_step_median_step": float(np.median(sim["upd_batch_step_us_per_row"])),
        "build_us_per_token": build_s / build_tokens * 1e6,
        "bytes_per_token": mem / build_tokens,
        "nodes_per_token": nodes / build_tokens,
        "orphan_storages_after_build": orphans,
        "accepted_tokens_per_step_mean": float(sim["accepted"].mean()),
        "drafter_us_per_request": drafter_level(problems, cfg, a.history, a.live, rounds=200),
    }
    # The decode-step cost with the batch APIs (one draft_batch + one extend_batch per step):
    # headline with preemption filtered (fastest-of-N drafts, median decode step of the
    # updates), and the plain means of single timings as *_raw.
    out["speculate_plus_update_us_per_request_step"] = (
        out["batch_us_per_request"] + out["update_batch_us_per_request_step_median_step"])
    out["speculate_plus_update_us_per_request_step_raw"] = (
        out["batch_us_per_request_raw"] + out["update_batch_us_per_request_step"])
    out["batch_speedup_vs_per_request_calls"] = out["speculate_us_mean"] / out["batch_us_per_request"]
    out.update(slide(indices, a.history))
    out.update(oracle_ratio(problems, cfg))
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    if a.png:
        plot(single, out, a.png)
    for k, v in out.items():
        print(f"{k:45s} {v:.3f}" if isinstance(v, float) else f"{k:45s} {v}")
    print(f"batch API vs per-request calls (same states, same process): {out['batch_speedup_vs_per_request_calls']:.2f}x; "
          f"native vs pure-Python oracle: {out['native_speedup_vs_oracle']:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
