"""Where a 512-row feedback's appends go: per-problem indexes vs the shared index.

    python benchmarks/studies/append_split.py

The state of ``bench_host_path`` (2,048 problems x 16 rollouts of the bundled SkyThought
texts, perturbed; window 4; product drafter defaults incl. the shared index), 512 live
requests in GRPO groups of 16; each step every row gains 1-5 tokens of its held-out text,
and the two halves of ``SuffixDrafter.apply_extend``'s plain path are timed apart, in
alternating order: ``extend_batch`` of the rows' own indexes (split over threads by index)
and of the shared index (one index: one thread). The feedback's job runs the same appends
(the shared index as one task beside the per-problem ones), so the shared task's time is a
floor under the job's append phase whatever the thread count. Prints p50 ms of each.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_host_path as H  # noqa: E402
from das_sglang.core.config import DrafterConfig  # noqa: E402
from das_sglang.core.drafter import SuffixDrafter  # noqa: E402
from das_sglang.native import extend_batch  # noqa: E402


def main() -> None:
    base = H.load_problems(30, 768, None)
    problems = H.make_problems(base, 2048, 16, 0.02, 0)
    d = SuffixDrafter(DrafterConfig(max_budget=16, window_steps=4))
    d.advance_step(4)
    pids = sorted(problems)
    t0 = time.perf_counter()
    d.load_history(H.history_of(problems, 4)[0])
    print("built %.1fs" % (time.perf_counter() - t0), flush=True)
    rng = np.random.default_rng(0)
    rows, texts, pos = [], [], []
    for i in range(512):
        pid = pids[(i // 16) * 37 % len(pids)]
        prompt, _, live = problems[pid]
        rid = f"r{i}"
        d.start_request(rid, pid, prompt)
        rows.append(rid)
        texts.append(live[i % len(live)])
        pos.append(0)
    own_t, sh_t = [], []
    for step in range(80):
        k = rng.integers(1, 6, 512)
        toks = [texts[i][pos[i]:pos[i] + k[i]] for i in range(512)]
        for i in range(512):  # (a text that ends starts over: timing only)
            pos[i] = (pos[i] + k[i]) % max(1, len(texts[i]) - 8)
        idx, seq_ids, flat, offsets = d.prepare_extend(rows, toks, None)
        order = (0, 1) if step % 2 == 0 else (1, 0)
        for which in order:
            t0 = time.perf_counter()
            if which == 0:
                extend_batch(idx, seq_ids, flat, offsets)
            else:
                extend_batch([d._global] * len(idx), seq_ids, flat, offsets)
            (own_t if which == 0 else sh_t).append((time.perf_counter() - t0) * 1e3)
    own, sh = np.array(own_t[10:]), np.array(sh_t[10:])
    print("tokens/step %.0f; own appends p50 %.2f ms, shared p50 %.2f ms (shared share %.0f%%)" % (k.sum(), np.median(own), np.median(sh), 100 * np.median(sh) / (np.median(own) + np.median(sh))))


if __name__ == "__main__":
    main()
