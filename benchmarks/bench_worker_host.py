"""Host-side cost of one DAS decode step in the SGLang worker, without a model forward.

    python benchmarks/bench_worker_host.py --json out.json [--png out.png]

What the worker does on the CPU per decode step, on realistic drafts: per problem of the
bundled SkyThought AIME24 rollouts, ``--history`` checkpoints' outputs are history of 4
past steps; ``batch`` live requests (spread over the problems) replay a later
checkpoint's output token by token. Each step runs the worker's host path:

- speculate: ``drafter.speculate_batch`` (max budget, every row);
- plan:      ``policy.plan`` on the rows' node probabilities;
- other:     the rest of ``DasSession.plan`` (BudgetRows, truncation, width);
- layout:    ``tree_inputs.build_layout`` + the torch tensors the worker hands SGLang
             (the GPU-form custom mask included: ``[prefix ones | tree block]`` per row,
             built on the CPU here since this machine may have no GPU);
- feedback:  ``DasSession.committed_batch`` of the accepted tokens (+ bonus); its
             native ``extend_batch`` part is also reported alone (feedback_extend).

Accepted lengths come from ``DraftTree.accept_length`` on the replayed text (not timed).
A request that reaches the end of its text finishes (becomes history) and a new one
starts in its place (not timed). Each configuration runs ``--warmup`` untimed steps, then
``--steps`` timed ones; the median step is reported per phase. The ratio compares each
policy's total with the ``none`` policy (verify the root only), and each phase with the
host path as it was before the optimisation (``code=before``: per-request layout builder
``build_layout_reference``, per-request host mask, validating truncation, one
``committed`` per row), in the same process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.oracle
from bench_drafter import HISTORY_STEPS, load_problems  # noqa: E402

from das_sglang.core.policy import BudgetRow  # noqa: E402
from das_sglang.sglang.options import load_options  # noqa: E402
from das_sglang.sglang.session import DasSession  # noqa: E402
from das_sglang.sglang.tree_inputs import (  # noqa: E402
    build_layout,
    custom_mask,
)
from tests.oracle.layout_reference import build_layout_reference  # noqa: E402

PHASES = ("speculate", "plan", "other", "layout", "feedback")


class _Timed:
    """Wraps a callable, accumulating its wall time into ``acc[name]``."""

    def __init__(self, fn, acc, name):
        self.fn, self.acc, self.name = fn, acc, name

    def __call__(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return self.fn(*a, **k)
        finally:
            self.acc[self.name] += time.perf_counter() - t0


def build_history(session: DasSession, problems, n_history: int) -> None:
    session.drafter.advance_step(HISTORY_STEPS - 1)
    for pid, (prompt, responses) in problems.items():
        for k, resp in enumerate(responses[:n_history]):
            session.drafter.add_history(pid, k % HISTORY_STEPS, np.concatenate([prompt, resp]))
    session.advance_step(HISTORY_STEPS)


class Replay:
    """Live requests replaying recorded outputs; slot ``b`` of the batch is one request."""

    def __init__(self, session, problems, batch, n_history):
        self.session, self.problems = session, problems
        self.pids = sorted(problems)
        self.n_history = n_history
        self.slots = [None] * batch  # (rid, pid, prompt, text, produced)
        self.counter = 0
        for b in range(batch):
            self._start(b)

    def _start(self, b):
        pid = self.pids[self.counter % len(self.pids)]
        prompt, responses = self.problems[pid]
        live = responses[self.n_history :] or responses
        text = live[(self.counter // len(self.pids)) % len(live)]
        rid = f"r{self.counter}"
        self.counter += 1
        self.session.start(rid, {"das_problem_id": pid}, prompt.tolist(), [], 1 << 30)
        self.slots[b] = [rid, pid, prompt, text, 0]

    def recycle(self):
        for b, (rid, _, prompt, text, pos) in enumerate(self.slots):
            if pos + 1 >= len(text):
                self.session.finished(rid, prompt.tolist(), text[:pos].tolist())
                self._start(b)


def _legacy_plan(session, rids, max_nodes):
    """``DasSession.plan`` as it was before the host-path optimisation (validating
    ``DraftTree.truncate``), for the same-process before/after ratio."""
    trees = session.drafter.speculate_batch(list(rids), [max_nodes] * len(rids))
    rows = []
    for rid, tree in zip(rids, trees):
        live = session.live[rid]
        rows.append(BudgetRow(
            req_id=rid, problem_id=live.problem_id, generated_len=live.generated,
            max_new_tokens=live.max_new_tokens, node_probs=tree.probs, prompt_len=live.prompt_len,
        ))
    plan = session.policy.plan(rows)
    trees = [t.truncate(min(int(b), max_nodes)) for t, b in zip(trees, plan.budgets)]
    return trees, max((len(t) for t in trees), default=0)


def _legacy_mask(layout, seq_lens):
    """The worker's former GPU-form mask: one host ``cat`` per request, then one copy."""
    tree = torch.from_numpy(layout.mask)
    return torch.cat([
        torch.cat((torch.ones(layout.n, s, dtype=torch.bool), tree[b]), dim=1).flatten()
        for b, s in enumerate(seq_lens)
    ])


def _legacy_feedback(session, rids, proposed, commits):
    """The worker's former per-row feedback: one ``committed`` (one native extend) per row."""
    for rid, p, c in zip(rids, proposed, commits):
        session.committed(rid, p, c.tolist())


def run_config(problems, policy, batch, args, gpu_mask: bool, legacy: bool):
    session = DasSession(load_options(args.max_nodes + 1, json.dumps(
        {"drafter": {"max_budget": args.max_nodes}, "server": {"policy": policy}})))
    build_history(session, problems, args.history)
    acc = dict.fromkeys(PHASES + ("extend",), 0.0)
    session.drafter.speculate_batch = _Timed(session.drafter.speculate_batch, acc, "speculate")
    session.policy.plan = _Timed(session.policy.plan, acc, "plan")
    # feedback = the drafter's native extend_batch + the policy's observe_verify per row
    session.drafter.extend_batch = _Timed(session.drafter.extend_batch, acc, "extend")
    replay = Replay(session, problems, batch, args.history)
    layout_fn = build_layout_reference if legacy else build_layout
    plan_fn = _legacy_plan if legacy else DasSession.plan
    samples = {p: [] for p in PHASES + ("total", "feedback_extend")}
    widths, accepted = [], []
    for step in range(args.warmup + args.steps):
        replay.recycle()
        for k in acc:
            acc[k] = 0.0
        slots = replay.slots
        rids = [s[0] for s in slots]
        t0 = time.perf_counter()
        trees, width = plan_fn(session, rids, args.max_nodes)
        t1 = time.perf_counter()
        roots, seq_lens = [], []
        for _, _, prompt, text, pos in slots:
            roots.append(int(text[pos - 1]) if pos else int(prompt[-1]))
            seq_lens.append(len(prompt) + pos)
        layout = layout_fn(roots, trees, seq_lens, width)
        tensors = [torch.from_numpy(a) for a in (
            layout.tokens, layout.positions, layout.retrieve_index, layout.next_token,
            layout.next_sibling)]
        if legacy:
            mask = _legacy_mask(layout, seq_lens)
        else:
            mask = custom_mask(layout, seq_lens, "cuda" if gpu_mask else "cpu", target="cpu")
        t2 = time.perf_counter()
        # Not timed: what the GPU verify would accept, from the recorded text.
        commits, proposed = [], []
        for s, tree in zip(slots, trees):
            text, pos = s[3], s[4]
            k = tree.accept_length(text[pos : pos + len(tree) + 1].tolist())
            commits.append(text[pos : pos + k + 1])
            proposed.append(len(tree))
            accepted.append(k)
        t3 = time.perf_counter()
        if legacy:
            _legacy_feedback(session, rids, proposed, commits)
        else:
            session.committed_batch(rids, proposed, [c.tolist() for c in commits])
        t4 = time.perf_counter()
        for s, c in zip(slots, commits):
            s[4] += len(c)
        del tensors, mask
        if step < args.warmup:
            continue
        widths.append(width)
        other = (t1 - t0) - acc["speculate"] - acc["plan"]
        for name, v in (("speculate", acc["speculate"]), ("plan", acc["plan"]), ("other", other),
                        ("layout", t2 - t1), ("feedback", t4 - t3)):
            samples[name].append(v * 1e3)
        samples["feedback_extend"].append(acc["extend"] * 1e3)
        samples["total"].append((t2 - t0 + t4 - t3) * 1e3)
    return {
        "ms_per_step_median": {k: statistics.median(v) for k, v in samples.items()},
        "ms_per_step_mean": {k: statistics.fmean(v) for k, v in samples.items()},
        "width_mean": float(np.mean(widths)),
        "accepted_per_row_mean": float(np.mean(accepted)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--png", help="also plot stacked per-phase bars here")
    ap.add_argument("--batches", default="32,128,512", help="comma-separated batch sizes")
    ap.add_argument("--policies", default="length-aware,fixed,none")
    ap.add_argument("--problems", type=int, default=30)
    ap.add_argument("--history", type=int, default=8, help="history rollouts per problem")
    ap.add_argument("--max-tokens", type=int, default=3000, help="tokens kept per rollout")
    ap.add_argument("--max-nodes", type=int, default=16, help="draft nodes per request (N-1)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--no-legacy", action="store_true", help="skip the before-optimisation runs")
    ap.add_argument("--cache-dir", default=None, help="tokenizer cache (default: the package's)")
    args = ap.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        print(f"error: invalid --batches={args.batches!r}", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    problems = load_problems(args.problems, args.max_tokens, args.cache_dir)
    results = {"config": vars(args), "runs": []}
    for batch in batches:
        for policy in args.policies.split(","):
            modes = (False,) if args.no_legacy or policy == "none" else (False, True)
            for legacy in modes:
                r = run_config(problems, policy, batch, args, gpu_mask=True, legacy=legacy)
                r.update(batch=batch, policy=policy, code="before" if legacy else "after")
                results["runs"].append(r)
                _print(r)
        _ratios(results, batch)
    Path(args.json).write_text(json.dumps(results, indent=2))
    if args.png:
        _plot(results, args.png)
    return 0


def _ratios(results, batch):
    """Same-process ratios: before/after per phase, and each policy vs ``none``."""
    runs = [r for r in results["runs"] if r["batch"] == batch]
    base = next((r for r in runs if r["policy"] == "none"), None)
    for r in runs:
        if base is not None:
            r["total_ratio_vs_none"] = r["ms_per_step_median"]["total"] / base["ms_per_step_median"]["total"]
        if r["code"] != "after":
            continue
        before = next((x for x in runs if x["policy"] == r["policy"] and x["code"] == "before"), None)
        if before is None:
            continue
        r["speedup_vs_before"] = {
            k: before["ms_per_step_median"][k] / max(v, 1e-9) for k, v in r["ms_per_step_median"].items()
        }
        sp = r["speedup_vs_before"]
        print(f"  batch {batch} {r['policy']}: before/after total {sp['total']:.1f}x, "
              f"layout {sp['layout']:.1f}x, feedback {sp['feedback']:.1f}x, other {sp['other']:.1f}x")


def _print(r):
    m = r["ms_per_step_median"]
    phases = " ".join(f"{p}={m[p]:.2f}" for p in PHASES)
    phases += f" [extend {m['feedback_extend']:.2f}]"
    print(f"batch {r['batch']:4d} {r['policy']:13s} {r['code']:6s} total={m['total']:.2f} ms "
          f"({phases}) width={r['width_mean']:.1f} acc={r['accepted_per_row_mean']:.2f}",
          flush=True)


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    labels = [f"{r['batch']}\n{r['policy']}\n{r['code']}" for r in runs]
    fig, ax = plt.subplots(figsize=(max(6, len(runs) * 0.9), 4))
    bottom = np.zeros(len(runs))
    for p in PHASES:
        v = np.array([r["ms_per_step_median"][p] for r in runs])
        ax.bar(labels, v, bottom=bottom, label=p)
        bottom += v
    ax.set_ylabel("host ms per decode step (median)")
    ax.set_title("DAS SGLang worker host path per decode step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
