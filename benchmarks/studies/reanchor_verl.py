"""Re-anchoring study on bench_peers' verl slice (DAS peer only, server protocol).

    python benchmarks/studies/reanchor_verl.py [variant ...]   (default: base B2 B4 B6 A4)

Variants (r = nodes reserved for re-anchoring out of the 16-node budget):
  base       unmodified DAS (instrumented: leaf / exhaustion stats, truth only read for stats)
  B<r>       T = first 16-r nodes of the 16-node tree; among T's leaves with NO continuation in
             either index (exhausted), take the highest-prob one and attach an r-node draft
             drafted from context + its path (fresh longest-suffix match); if none: the 16-node tree
  A<r>       as B but the highest-prob leaf of T is always extended (whether exhausted or not)
  C<r>       as B, but the exhausted leaf chosen is the deepest (ties: prob)
  D<r>       as B, but the exhausted leaf must also be the best-prob leaf of T (else 16-node tree)
  F<r>       only rows whose 16-node tree has < 16 nodes: the unused nodes re-anchor its best
             exhausted leaf (no node of the normal tree is given up; r ignored)
  suffix 'c' (e.g. B4c): the re-anchored draft is a chain instead of a mixture tree
"""
from __future__ import annotations

import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402

import bench_peers as bp  # noqa: E402
from das_sglang.core.config import DrafterConfig  # noqa: E402
from das_sglang.core.draft_tree import DraftTree  # noqa: E402
from das_sglang.core.tokenize import TextTokenizer  # noqa: E402
from das_sglang.replay import datasets as ds  # noqa: E402

TAIL = 96
SHADOW_BUDGET = 256  # context tail kept per request (max_match_len 32 + path <= 16)


def children_of(parents: list[int], n: int) -> list[int]:
    c = [0] * n
    for p in parents:
        if p >= 0:
            c[p] += 1
    return c


def path_of(tree: DraftTree, i: int) -> list[int]:
    toks, par = tree.tokens, tree.parents
    out = []
    while i >= 0:
        out.append(int(toks[i]))
        i = int(par[i])
    return out[::-1]


class ReanchorPeer(bp.DasPeer):
    needs_truth = True  # truth is read only for statistics, never for drafting

    def __init__(self, config, variant: str = "base", server=True):
        super().__init__(config, server)
        self.variant = variant
        self.name = variant
        self.kind = variant[0] if variant != "base" else "base"
        self.chain = variant.endswith("c")
        self.r = int(variant[1:].rstrip("c")) if variant != "base" else 0
        self.ctx: dict[str, np.ndarray] = {}
        self.truth: dict[str, np.ndarray] = {}
        self.st = dict(steps=0, leaf=0, leaf_exh=0, leaf_cut=0, reanchored=0, reanch_nodes=0,
                       reanch_own=0, reanch_shared=0, reanch_empty=0,
                       exh_oracle_tok=0, exh_oracle_any=0, exh_oracle_first=0,
                       reanch_accepted_into=0, reanch_tokens=0, exh_leaf_in_tree=0, exh_leaf_best=0,
                       leaf_exh_own_only=0, sh_prefix_ok=0, sh_has_kids=0, sh_true_kid=0, sh_acc_gain=0, sh_nokid_oracle_tok=0,
                       cut_ctx1=0, cut_ctx2_3=0, cut_ctx4=0)
        self.us = 0.0

    shadow_cfg = None

    def fresh(self):
        p = ReanchorPeer(self.config, self.variant, self.server)
        if self.variant == "base" and self.shadow_cfg is not None:
            p.shadow = bp.DasPeer(self.shadow_cfg, self.server)
        return p

    shadow = None  # base only: a DasPeer with a larger budget fed the same events

    def begin(self, problem_id, step, history, members):
        super().begin(problem_id, step, history, members)
        if self.shadow is not None:
            self.shadow.begin(problem_id, step, history, members)
        for rid, prompt in members:
            self.ctx[rid] = np.asarray(prompt[-TAIL:], np.int32)

    def reveal(self, truth):
        self.truth = truth

    def extend(self, rid, context, new):
        super().extend(rid, context, new)
        if self.shadow is not None:
            self.shadow.extend(rid, context, new)
        self.ctx[rid] = np.concatenate([self.ctx[rid], np.asarray(new, np.int32)])[-TAIL:]

    def end(self):
        super().end()
        if self.shadow is not None:
            self.shadow.end()
        for rid in self.members:
            self.ctx.pop(rid, None)

    # -------------------------------------------------------------- native helpers

    def _wd(self):
        steps, w = self.d._weights
        return dict(zip(steps.tolist(), w.tolist()))

    def _cont(self, rid: str, path: list[int]) -> tuple[bool, bool]:
        """(own index, shared index) have a continuation of some >=1-token anchor + path."""
        d = self.d
        live = d._live[rid]
        c = np.concatenate([self.ctx[rid], np.asarray(path, np.int32)])
        wd = self._wd()
        mml = d.config.max_match_len
        own = d._indices[live.problem_id].draft(c, 1, 0.0, wd, True, mml, None)[3] > len(path)
        sh = False
        if d._global is not None:
            sh = d._global.draft(c, 1, 0.0, wd, True, mml, None)[3] > len(path) + d.config.shared_min_match - 1
        return own, sh

    def _ctxlen(self, rid, path):
        """Context tokens in the longest anchor of context + path that has a continuation."""
        d = self.d
        c = np.concatenate([self.ctx[rid], np.asarray(path, np.int32)])
        wd = self._wd()
        m = d._indices[d._live[rid].problem_id].draft(c, 1, 0.0, wd, True, 63, None)[3]
        if d._global is not None:
            m = max(m, d._global.draft(c, 1, 0.0, wd, True, 63, None)[3])
        return m - len(path)

    def _reanchor(self, rid: str, path: list[int], r: int):
        """An r-node draft from context + path: own index, or the shared one if its fresh
        match is longer (native draft(context) cannot mix both). (tokens, parents, probs, src)."""
        d = self.d
        live = d._live[rid]
        c = np.concatenate([self.ctx[rid], np.asarray(path, np.int32)])
        wd = self._wd()
        mml = d.config.max_match_len
        mix = None if self.chain else d._mix()
        a = d._indices[live.problem_id].draft(c, r, 0.0, wd, self.chain, mml, mix)
        best, src = a, "own"
        if d._global is not None:
            b = d._global.draft(c, r, 0.0, wd, self.chain, mml, mix)
            if len(b[0]) and (not len(a[0]) or b[3] > a[3]):
                best, src = b, "shared"
        return best[0], best[1], best[2], src

    # -------------------------------------------------------------- drafting

    def propose(self, rids, budget):
        t0 = time.perf_counter()
        trees = self.d.speculate_batch(rids, [budget] * len(rids))
        if self.kind != "base":
            trees = [self._modify(rid, t, budget) for rid, t in zip(rids, trees)]
        self.us += time.perf_counter() - t0
        self._stats(rids, trees)
        return trees

    def _modify(self, rid: str, t16: DraftTree, budget: int) -> DraftTree:
        r = self.r
        if len(t16) < budget:  # the index had less than the budget: nothing to trade
            keep = len(t16)
        elif self.kind == "F":  # F: only the budget a short tree leaves unused (free)
            return t16
        else:
            keep = budget - r
        t = t16.truncate(keep) if keep < len(t16) else t16
        n = len(t)
        if n == 0:
            return t16
        ch = children_of(t.parents.tolist(), n)
        leaves = [i for i in range(n) if ch[i] == 0]
        probs = t.probs
        depths = t.depths()
        if self.kind == "A":
            cand = [max(leaves, key=lambda i: probs[i])]
        else:
            order = sorted(leaves, key=(lambda i: (depths[i], probs[i])) if self.kind == "C"
                           else (lambda i: probs[i]), reverse=True)
            if self.kind == "D":
                order = order[:1]
            cand = []
            for i in order:
                own, sh = self._cont(rid, path_of(t, i))
                if not own and not sh:
                    cand = [i]
                    break
        if not cand:
            return t16
        leaf = cand[0]
        room = budget - n
        tok, par, pr, src = self._reanchor(rid, path_of(t, leaf), room)
        if len(tok) == 0:
            self.st["reanch_empty"] += 1
            return t16
        self.st["reanchored"] += 1
        self.st["reanch_nodes"] += len(tok)
        self.st["reanch_" + src] += 1
        par = np.where(par < 0, leaf, par + n).astype(np.int32)
        tokens = np.concatenate([t.tokens, tok.astype(np.int32)])
        parents = np.concatenate([t.parents, par])
        pr_all = np.concatenate([t.probs, probs[leaf] * pr])
        out = DraftTree(tokens, parents, pr_all, t.match_len)
        object.__setattr__(out, "_reanchor_from", n)  # nodes >= n are re-anchored
        return out

    def _stats(self, rids, trees):
        st = self.st
        for rid, t in zip(rids, trees):
            st["steps"] += 1
            if not len(t):
                continue
            truth = self.truth[rid].tolist()
            acc, node = t.accept_path(truth)
            if self.kind != "base":
                start = getattr(t, "_reanchor_from", None)
                if start is not None and node >= start:
                    st["reanch_accepted_into"] += 1
                    # accepted re-anchored tokens on the path
                    k, i = 0, node
                    while i >= start:
                        k += 1
                        i = int(t.parents[i])
                    st["reanch_tokens"] += k
                continue
            if acc == 0 or acc >= len(truth):
                continue
            ch = children_of(t.parents.tolist(), len(t))
            if ch[node]:
                continue
            st["leaf"] += 1
            path = path_of(t, node)
            if self.shadow is not None:
                big = self.shadow.d.speculate(rid, SHADOW_BUDGET)
                st["sh_prefix_ok"] += bool(len(big) >= len(t) and np.array_equal(big.tokens[:len(t)], t.tokens)
                                           and np.array_equal(big.parents[:len(t)], t.parents))
                kids = [i for i in range(len(big)) if int(big.parents[i]) == node]
                st["sh_has_kids"] += bool(kids)
                if not kids:  # no child in the 256-node tree: the broader "exhausted"
                    tok, par, pr, src = self._reanchor(rid, path, 4)
                    if len(tok):
                        sub = DraftTree(tok.astype(np.int32), par.astype(np.int32), pr)
                        st["sh_nokid_oracle_tok"] += sub.accept_length(truth[acc:])
                st["sh_true_kid"] += any(int(big.tokens[i]) == truth[acc] for i in kids)
                a2, _ = big.accept_path(truth)
                st["sh_acc_gain"] += a2 - acc
            own, sh = self._cont(rid, path)
            if own or sh:
                st["leaf_cut"] += 1
                m = self._ctxlen(rid, path)
                st["cut_ctx1" if m <= 1 else "cut_ctx2_3" if m <= 3 else "cut_ctx4"] += 1
                continue
            st["leaf_exh"] += 1
            # oracle: had we re-anchored exactly this leaf with 4 extra nodes (free)
            tok, par, pr, src = self._reanchor(rid, path, 4)
            if len(tok):
                sub = DraftTree(tok.astype(np.int32), par.astype(np.int32), pr)
                a = sub.accept_length(truth[acc:])
                st["exh_oracle_tok"] += a
                st["exh_oracle_any"] += a > 0
            # was that leaf the best-prob leaf of the tree?
            leaves = [i for i in range(len(t)) if ch[i] == 0]
            st["exh_leaf_best"] += node == max(leaves, key=lambda i: t.probs[i])


def main(variants):
    tok = TextTokenizer()
    rollouts = ds.tokenize_rollouts(ds.load_verl([ds.VERL_SAMPLE]), tok)
    overrides = {"max_budget": 16, "min_token_prob": 0.0, "mix_escape": 0.5}
    cfg = DrafterConfig(**overrides)
    for v in variants:
        peer = ReanchorPeer(cfg, v)
        if v == "base" and "--shadow" in sys.argv:
            ReanchorPeer.shadow_cfg = DrafterConfig(**{**overrides, "max_budget": SHADOW_BUDGET})
        holder = {}
        orig_fresh = peer.fresh

        def fresh(orig=orig_fresh):
            p = orig()
            holder["p"] = p
            return p
        peer.fresh = fresh
        t0 = time.perf_counter()
        runs = bp.run_dataset([peer], rollouts, set(ds.steps_of(rollouts)), cfg.window_steps, 16,
                              lambda m: None)
        wall = time.perf_counter() - t0
        s = bp.summarize(runs[v], lambda t: True)
        st = holder["p"].st
        line = (f"{v:6s} tok/step {s['tokens_per_step']:.4f}  first-miss {s['first_token_miss_rate']:.4f}  "
                f"nodes {s['nodes_mean']:.2f}  steps {s['steps']}  wall {wall:.1f}s  propose {holder['p'].us:.1f}s")
        print(line, flush=True)
        n = st["steps"]
        if v == "base":
            L = st["leaf"]
            print(f"   steps {n}; accepted path ends at a leaf (truth goes on): {L} = {L / n:.1%} of steps; "
                  f"of those: no continuation in either index {st['leaf_exh']} ({st['leaf_exh'] / max(L, 1):.1%}), "
                  f"continuation exists (budget cut) {st['leaf_cut']} ({st['leaf_cut'] / max(L, 1):.1%})")
            E = max(st["leaf_exh"], 1)
            print(f"   exhausted leaves: free oracle re-anchor (4 nodes under exactly that leaf) accepts >=1 at "
                  f"{st['exh_oracle_any'] / E:.1%}, {st['exh_oracle_tok'] / E:.3f} tok per such step, "
                  f"= +{st['exh_oracle_tok'] / n:.4f} tok/step overall; the leaf was the tree's best-prob leaf "
                  f"{st['exh_leaf_best'] / E:.1%}")
            print(f"   budget-cut leaves by context tokens in the longest anchor with continuation: 1: {st['cut_ctx1']}, "
                  f"2-3: {st['cut_ctx2_3']}, 4+: {st['cut_ctx4']}")
            if st["sh_prefix_ok"]:
                print(f"   shadow {SHADOW_BUDGET}-node tree at leaf steps: 16-tree is its prefix {st['sh_prefix_ok'] / L:.1%}; "
                      f"leaf has children there {st['sh_has_kids'] / L:.1%}; true next token among them "
                      f"{st['sh_true_kid'] / L:.1%}; extra accepted tokens {st['sh_acc_gain'] / L:.3f} per leaf step "
                      f"(+{st['sh_acc_gain'] / n:.4f} tok/step); leaves with no child there: free 4-node re-anchor oracle "
                      f"+{st['sh_nokid_oracle_tok'] / n:.4f} tok/step")
        else:
            print(f"   re-anchored rows {st['reanchored']} ({st['reanchored'] / n:.1%} of steps), mean nodes "
                  f"{st['reanch_nodes'] / max(st['reanchored'], 1):.2f}, src own/shared {st['reanch_own']}/"
                  f"{st['reanch_shared']}, empty {st['reanch_empty']}; accepted into re-anchored part "
                  f"{st['reanch_accepted_into']} steps, {st['reanch_tokens']} tokens "
                  f"(+{st['reanch_tokens'] / n:.4f} tok/step gross)", flush=True)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--")] or ["base", "B2", "B4", "B6", "A4"])
