"""Host memory of a DAS worker session over many RL training steps (bounded or not?).

    python benchmarks/bench_memory.py --json out.json [--png out.png]

``--steps`` (100) training steps through ``DasSession`` (what the SGLang worker drives),
each with tagged traffic (``das_problem_id`` + ``das_step``: ``--tagged`` problems x
``--samples`` rollouts, drawn from a pool of ``--pool`` problems so problems come and go)
and untagged traffic (``--untagged`` requests, no custom params: the problem is the
prompt's hash and the step advances only at the cache flush that ends each step, as an
unmodified verl/slime loop sends it). Rollouts are the bundled SkyThought AIME24 outputs cut
to ``--max-tokens``, perturbed per step and problem; each decodes through ``plan`` (every
``--plan-every`` chunk) and ``committed_batch`` in chunks of ``--chunk`` tokens, then
finishes. Each step ends with ``weights_updated()`` (SGLang's flush after
``update_weights_from_*``).

Per step: process RSS (MB, /proc/self/statm after the background updates drain) and the
session's history tokens. ``bytes_per_token`` = the native index's own accounting
(``SuffixDrafter.stats().bytes_per_token``: nodes, child map, token storage, per-sequence
state, at the end); ``rss_bytes_per_token`` = RSS growth over the run's start / tokens stored.

JSON: ``{"rss_mb": [one per step], "bytes_per_token": float, ...}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_drafter import load_problems  # noqa: E402

from das_sglang.sglang.options import load_options  # noqa: E402
from das_sglang.sglang.session import DasSession, _trim_heap  # noqa: E402

VOCAB = 151_000


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--png")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--pool", type=int, default=2048, help="problems tagged traffic draws from")
    ap.add_argument("--tagged", type=int, default=48, help="tagged problems per step")
    ap.add_argument("--samples", type=int, default=16, help="rollouts per tagged problem")
    ap.add_argument("--untagged", type=int, default=128, help="untagged requests per step")
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--max-history-tokens", type=int, default=None,
                    help="DrafterConfig.max_history_tokens (default: the config's)")
    ap.add_argument("--batch", type=int, default=256, help="requests decoding together")
    ap.add_argument("--chunk", type=int, default=64, help="tokens committed per request per call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    base = load_problems(30, args.max_tokens, args.cache_dir)
    keys = sorted(base)
    rng = np.random.default_rng(args.seed)
    drafter = {"window_steps": args.window, "max_budget": 8}
    if args.max_history_tokens is not None:
        drafter["max_history_tokens"] = args.max_history_tokens
    cfg = {"drafter": drafter, "policy": {"length_window_steps": args.window},
           "server": {"policy": "length-aware"}}
    session = DasSession(load_options(9, json.dumps(cfg)))
    gc.collect()
    _trim_heap()  # start from a trimmed heap, as every step's measurement is
    rss0 = rss_mb()
    rss, tokens, seconds = [], [], []
    n = 0

    def pert(a, salt):
        a = (a.astype(np.int64) + salt * 7919) % VOCAB
        hit = rng.random(len(a)) < 0.02
        a[hit] = rng.integers(0, VOCAB, int(hit.sum()))
        return a.astype(np.int32)

    for step in range(args.steps):
        t0 = time.perf_counter()
        jobs = []  # (custom_params, prompt, response)
        for q in rng.choice(args.pool, args.tagged, replace=False).tolist():
            prompt, responses = base[keys[q % len(keys)]]
            for k in range(args.samples):
                resp = responses[(k + step) % len(responses)]
                jobs.append(({"das_problem_id": f"q{q}", "das_step": step}, pert(prompt, q), pert(resp, q + step)))
        for u in range(args.untagged):
            prompt, responses = base[keys[u % len(keys)]]
            salt = 100_000 + step * args.untagged + u  # a new prompt each time: new problems
            jobs.append((None, pert(prompt, salt), pert(responses[step % len(responses)], salt)))
        for lo in range(0, len(jobs), args.batch):
            group = jobs[lo: lo + args.batch]
            rids = []
            for params, prompt, _ in group:
                rid = f"r{n}"
                n += 1
                session.start(rid, params, prompt.tolist(), [], 1 << 30)
                rids.append(rid)
            pos = [0] * len(group)
            while True:
                active = [i for i, (_, _, resp) in enumerate(group) if pos[i] < len(resp)]
                if not active:
                    break
                session.plan([rids[i] for i in active], 8)
                chunks = [group[i][2][pos[i]: pos[i] + args.chunk].tolist() for i in active]
                # as if every chunk but its bonus token had been drafted and accepted
                session.committed_batch([rids[i] for i in active], [len(c) - 1 for c in chunks], chunks)
                for i, c in zip(active, chunks):
                    pos[i] += len(c)
            for rid, (_, prompt, resp) in zip(rids, group):
                session.finished(rid, prompt.tolist(), resp.tolist())
        session.weights_updated()
        session.drain()  # the lazy eviction serving spreads over the next step's forwards
        gc.collect()
        rss.append(rss_mb())
        tokens.append(session.drafter.history_tokens)
        seconds.append(time.perf_counter() - t0)
        print(f"step {step:3d}: rss {rss[-1]:.1f} MB, history {tokens[-1]} tokens, "
              f"{len(session.drafter.history_problems())} problems, "
              f"stats {session.policy.acceptance.num_problems} problems, "
              f"{seconds[-1]:.1f} s", flush=True)
    st = session.drafter.stats()
    g = session.drafter._global
    shared_bytes = g.memory_bytes() if g is not None and st.shared_tokens else 0
    indexed = st.tokens + st.shared_tokens  # every token stored in an index
    last = np.asarray(rss[-50:])
    out = {
        "rss_mb": rss,
        "bytes_per_token": st.bytes_per_token,
        "rss_bytes_per_token": (rss[-1] - rss0) * 2**20 / max(st.tokens, 1),
        "history_tokens": tokens,
        "stored_tokens_final": st.tokens,
        # the shared (cross-problem) index: copies of the newest sequences, capped by
        # DrafterConfig.shared_max_tokens; bytes_per_token above counts its tokens too
        "shared_tokens_final": st.shared_tokens,
        "shared_index_mb": shared_bytes / 2**20,
        "history_bytes_per_token": (st.bytes - shared_bytes) / max(st.tokens, 1),
        "index_nodes_per_token": st.nodes / max(indexed, 1),
        # bytes per token beyond 64 B per live node and 4 B per token: free-list slack,
        # child maps, per-sequence state, capacity not (yet) used
        "index_overhead_bytes_per_token": (st.bytes - 64 * st.nodes - 4 * indexed) / max(indexed, 1),
        "last50_spread": float((last.max() - last.min()) / last.min()) if len(last) else None,
        "rss_start_mb": rss0,
        "config": vars(args),
    }
    session.close()
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"bytes_per_token {out['bytes_per_token']:.1f} (per-problem indexes "
          f"{out['history_bytes_per_token']:.1f}; shared index {out['shared_tokens_final']} tokens, "
          f"{out['shared_index_mb']:.0f} MB; rss {out['rss_bytes_per_token']:.1f}), "
          f"last-50 RSS spread {out['last50_spread']:.3%}")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(rss, label="RSS (MB)")
        ax2 = ax.twinx()
        ax2.plot(np.asarray(tokens) / 1e6, color="tab:orange", label="history tokens (M)")
        ax.set_xlabel("training step")
        ax.set_ylabel("RSS MB")
        ax2.set_ylabel("history tokens (M)")
        ax.set_title(f"DAS session memory, {out['bytes_per_token']:.0f} B per stored token")
        fig.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
