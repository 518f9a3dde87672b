"""Per-request, state-conditioned tree shape on bench_peers' verl slice (DAS only, server protocol).

    python benchmarks/studies/shape_verl.py [--cf] [--sky] VARIANT ...

A request's class is its previous step's outcome (known after verify, read here from the
accepted tokens handed to extend(), never from the recording):
  full     accepted >= 1 token and the accepted path ends at a leaf of the tree
  partial  accepted >= 1 token, the accepted node has children
  miss     first token missed (or empty tree)
  none     first step of the request
Each propose() splits its rows by class and drafts each class with its own DrafterConfig
(the drafter's config is swapped for that sub-batch, budget 16 for every row).

VARIANT: 'base', or '+'-joined class.field=value items, e.g. full.h=1+miss.h=8
  fields: h = mix_match_half, a = mix_alpha, e = mix_escape, r = mix_recency,
          chain (= tree=False: native chain under the longest own match), any DrafterConfig field
--cf   (base policy only) also drafts every row with each counterfactual config in CF and
       scores it against the recording (one step, same state): E[accepted | prev class, config]
--sky  SkyThought slices (uncapped / capped) instead of verl
"""
from __future__ import annotations

import dataclasses
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import numpy as np  # noqa: E402

import bench_peers as bp  # noqa: E402
from das_sglang.core.config import DrafterConfig  # noqa: E402
from das_sglang.core.tokenize import TextTokenizer  # noqa: E402
from das_sglang.replay import datasets as ds  # noqa: E402

CLASSES = ("none", "miss", "partial", "full")
FINE = ("miss2", "full2")  # two consecutive misses / full paths (drafting classes only)
SHORT = {"h": "mix_match_half", "a": "mix_alpha", "e": "mix_escape", "r": "mix_recency",
         "f": "mix_max_fanout", "sw": "shared_weight"}
CF = {"h0": {"mix_match_half": 0.0}, "h1": {"mix_match_half": 1.0}, "h2": {"mix_match_half": 2.0},
      "h8": {"mix_match_half": 8.0}, "h16": {"mix_match_half": 16.0}, "chain": {"tree": False},
      "a2": {"mix_alpha": 2.0}, "a8": {"mix_alpha": 8.0}, "e0": {"mix_escape": 0.0}, "e2": {"mix_escape": 2.0}}


def parse(variant: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if variant == "base":
        return out
    for item in variant.split("+"):
        cls, _, kv = item.partition(".")
        assert cls in CLASSES + FINE, item
        if kv == "chain":
            out.setdefault(cls, {})["tree"] = False
            continue
        k, _, v = kv.partition("=")
        k = SHORT.get(k, k)
        kind = type(getattr(DrafterConfig(), k))
        out.setdefault(cls, {})[k] = (v.lower() in ("1", "true")) if kind is bool else kind(v)
    return out


def outcome(tree, accepted) -> tuple[int, int, bool]:
    """(accepted length, accepted node, that node is a leaf) of ``tree`` against ``accepted``."""
    if not len(tree):
        return 0, -1, True
    n, node = tree.accept_path(accepted)
    return n, node, node not in set(tree.parents.tolist())


class ShapePeer(bp.DasPeer):
    def __init__(self, config, variant="base", server=True, cf=False):
        super().__init__(config, server)
        self.variant = variant
        self.name = variant
        self.cf = cf
        self.needs_truth = cf
        self.cfgs = {c: dataclasses.replace(config, **o) for c, o in parse(variant).items()}
        self.cf_cfgs = {k: dataclasses.replace(config, **o) for k, o in CF.items()} if cf else {}
        self.prev: dict[str, str] = {}
        self.prev2: dict[str, str] = {}
        self.tree: dict[str, object] = {}
        self.truth: dict = {}
        # trajectory stats: trans[prev][cur] counts, acc_by_prev[prev] = (sum accepted, n)
        self.trans = {a: {b: 0 for b in CLASSES[1:]} for a in CLASSES}
        self.acc_by_prev = {a: [0, 0] for a in CLASSES}
        self.rows_by_cls = {a: 0 for a in CLASSES}
        self.cf_acc = {a: {k: 0 for k in ["own"] + list(CF) + ["oracle_h", "oracle_all"]} for a in CLASSES}
        self.cf_n = {a: 0 for a in CLASSES}

    def fresh(self):
        p = ShapePeer(self.config, self.variant, self.server, self.cf)
        ShapePeer.last = p
        return p

    def begin(self, problem_id, step, history, members):
        super().begin(problem_id, step, history, members)
        for rid, _ in members:
            self.prev[rid] = "none"
            self.prev2[rid] = "none"

    def reveal(self, truth):
        self.truth = truth

    def _draft(self, rids, cfg):
        d = self.d
        base = d.config
        if cfg is not None:
            d.config = cfg
        try:
            return d.speculate_batch(rids, [16] * len(rids))
        finally:
            d.config = base

    def propose(self, rids, budget):
        assert budget == 16
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rids):
            c = self.prev[r]
            if c in ("miss", "full") and self.prev2[r] == c and c + "2" in self.cfgs:
                c = c + "2"
            groups.setdefault(c, []).append(i)
        trees = [None] * len(rids)
        for cls, idx in groups.items():
            self.rows_by_cls[cls.rstrip("2")] += len(idx)
            sub = self._draft([rids[i] for i in idx], self.cfgs.get(cls))
            for i, t in zip(idx, sub):
                trees[i] = t
        for r, t in zip(rids, trees):
            self.tree[r] = t
        if self.cf:
            self._counterfactual(rids, trees)
        return trees

    def _counterfactual(self, rids, trees):
        res = {"own": [outcome(t, self.truth[r])[0] for r, t in zip(rids, trees)]}
        for k, cfg in self.cf_cfgs.items():
            res[k] = [outcome(t, self.truth[r])[0] for r, t in zip(rids, self._draft(rids, cfg))]
        hk = ["own"] + [k for k in CF if k.startswith("h")]
        for j, r in enumerate(rids):
            c = self.prev[r]
            self.cf_n[c] += 1
            a = self.cf_acc[c]
            for k, v in res.items():
                a[k] += v[j]
            a["oracle_h"] += max(res[k][j] for k in hk)
            a["oracle_all"] += max(v[j] for v in res.values())

    def extend(self, rid, context, new):
        super().extend(rid, context, new)
        acc, node, leaf = outcome(self.tree.pop(rid), new.tolist())
        cur = "miss" if acc == 0 else ("full" if leaf else "partial")
        p = self.prev[rid]
        self.trans[p][cur] += 1
        self.acc_by_prev[p][0] += acc
        self.acc_by_prev[p][1] += 1
        self.prev2[rid] = p
        self.prev[rid] = cur

    def end(self):
        super().end()
        for rid in self.members:
            self.prev.pop(rid, None)
            self.prev2.pop(rid, None)


def load(sky: bool):
    tok = TextTokenizer()
    if sky:
        texts = ds.load_skythought("long")
        rollouts = ds.tokenize_rollouts(texts, tok, ds.SKYTHOUGHT_MAX_NEW_TOKENS)
        return rollouts, set(range(7, 11))
    rollouts = ds.tokenize_rollouts(ds.load_verl([ds.VERL_SAMPLE]), tok)
    return rollouts, set(ds.steps_of(rollouts))


def report_signal(p: ShapePeer):
    T = p.trans
    # steps that have a previous step (the outcome at a request's later steps)
    tot = {b: sum(T[a][b] for a in CLASSES[1:]) for b in CLASSES[1:]}
    n = sum(tot.values())
    print(f"   signal (steps with a previous step: {n}); unconditional: " +
          ", ".join(f"{b} {tot[b] / n:.1%}" for b in CLASSES[1:]))
    for a in CLASSES:
        m = sum(T[a].values())
        if not m:
            continue
        s, k = p.acc_by_prev[a]
        print(f"   after {a:7s} ({m:6d} steps): next " + ", ".join(f"{b} {T[a][b] / m:.1%}" for b in CLASSES[1:])
              + f"; mean accepted next {s / k:.3f} (+1 bonus)")


def report_cf(p: ShapePeer):
    keys = ["own"] + list(CF) + ["oracle_h", "oracle_all"]
    print("   counterfactual E[accepted] by prev class (same state, one step; 'own' = the tree actually used):")
    print("   " + f"{'class':8s}{'n':>7s}" + "".join(f"{k:>10s}" for k in keys))
    tot = {k: 0 for k in keys}
    N = 0
    for c in CLASSES:
        n = p.cf_n[c]
        if not n:
            continue
        N += n
        for k in keys:
            tot[k] += p.cf_acc[c][k]
        print("   " + f"{c:8s}{n:7d}" + "".join(f"{p.cf_acc[c][k] / n:10.4f}" for k in keys))
    print("   " + f"{'all':8s}{N:7d}" + "".join(f"{tot[k] / N:10.4f}" for k in keys))


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")] or ["base"]
    cf = "--cf" in sys.argv
    sky = "--sky" in sys.argv
    rollouts, steps = load(sky)
    cfg = DrafterConfig(max_budget=16, min_token_prob=0.0, mix_escape=0.5)
    for v in args:
        peer = ShapePeer(cfg, v, cf=cf and v == "base")
        t0 = time.perf_counter()
        runs = bp.run_dataset([peer], rollouts, steps, cfg.window_steps, 16, lambda m: None)
        wall = time.perf_counter() - t0
        p = ShapePeer.last
        slices = [("uncapped", lambda t: not t.capped), ("capped", lambda t: t.capped)] if sky else [("verl", lambda t: True)]
        for sname, keep in slices:
            s = bp.summarize(runs[v], keep)
            print(f"{v:28s} {sname:8s} tok/step {s['tokens_per_step']:.4f}  first-miss {s['first_token_miss_rate']:.4f}  "
                  f"root-ch {s['root_children_mean']:.2f}  nodes {s['nodes_mean']:.2f}  steps {s['steps']}  wall {wall:.1f}s",
                  flush=True)
        if v == "base" or "--signal" in sys.argv:
            report_signal(p)
        if p.cf:
            report_cf(p)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
