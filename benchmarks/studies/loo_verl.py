"""DAS on bench_peers' verl leave-one-out slice: side by side with NGRAM, and an alignment pointer.

    python benchmarks/studies/loo_verl.py oracle            # ~2 min: DAS and NGRAM on the same states
    python benchmarks/studies/loo_verl.py pointer [MODE..]  # ~45 s a mode: base, m<c>[k<K>]
    python benchmarks/studies/loo_verl.py affinity          # ~2 min: the siblings most like the target first
    python benchmarks/studies/loo_verl.py rerank            # ~4 min: 16 of 64 nodes by calibrated estimates

Protocol as ``bench_peers.run_leave_one_out(server=False)``: each target alone on fresh state, its
siblings' whole texts as the step before's history (the protocol of issue 11's verl figures).

``oracle``: DAS drafts and drives the decoding; at every step SGLang's NGRAM corpus (fed the
same history and accepted tokens) drafts too, and both trees are scored against the
recording: accepted drafts per step for each, the per-step better of the two (an oracle no
drafter can be), and both by DAS's match length.

``pointer``: an alignment pointer -- the sibling text the request follows, re-synced each
step at the longest backward match of its context (ties: the current sibling, nearest its
expected position); its next 16 tokens are a chain. Scored alone and as an oracle with DAS;
mode ``m<c>[k<K>]`` merges its first c tokens into DAS's tree (DAS redrafted with as many
fewer nodes as the chain adds) where the alignment is at least K tokens long.

``affinity``: an upper bound for weighting siblings by how alike they are. It ranks a
target's siblings by the share of the target's *whole* response's 4-grams each holds (it
knows the future: no drafter can) and puts the top k in the newest step slot, the rest
``gap`` steps older (``step_decay``'s down-weighting).

``rerank``: does a calibrated estimate pick better 16 nodes? DAS drafts 64-node trees on
the leave-one-out states and on the lockstep (server) run; per node, P(accepted | parent
accepted) is fitted by bins of (conditional prob, depth, match length) on one protocol, and
the 16 nodes best by the calibrated path products (best first from the root) are scored
against the recording on the leave-one-out states -- fitted on lockstep, and on the
leave-one-out states themselves (in-sample: a bound for the calibration).
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np  # noqa: E402

import bench_peers as bp  # noqa: E402
from das_sglang.core.config import DrafterConfig  # noqa: E402
from das_sglang.core.draft_tree import DraftTree  # noqa: E402
from das_sglang.core.tokenize import TextTokenizer  # noqa: E402
from das_sglang.replay import datasets as ds  # noqa: E402

CFG = DrafterConfig(max_budget=16, min_token_prob=0.0, mix_escape=0.5)  # bench_peers' DAS peer
MAXK = 12


def accepted(tree: DraftTree, truth: list[int]) -> int:
    return tree.accept_length(truth) if len(tree) else 0


@functools.cache
def verl_rollouts() -> list:
    return ds.tokenize_rollouts(ds.load_verl([ds.VERL_SAMPLE]), TextTokenizer())


def leave_one_out(peer) -> bp.PeerRun:
    """``peer`` over bench_peers' fresh-state leave-one-out (``run_leave_one_out``)."""
    return bp.run_leave_one_out([peer], verl_rollouts(), 16, lambda msg: None)[peer.name]


class SideBySide(bp.Peer):
    name = "side_by_side"
    needs_truth = True
    server = False

    def __init__(self) -> None:
        self.das, self.ngram = bp.DasPeer(CFG, server=False), bp.NgramPeer(16, server=False)
        self.rows: list[tuple[int, int, int]] = []  # (DAS accepted, NGRAM accepted, DAS match length)

    def fresh(self, server=None) -> "SideBySide":
        return self  # (isolated: begin resets both peers' state; the rows accumulate here)

    def begin(self, problem_id, step, history, members):
        self.das.begin(problem_id, step, history, members)
        self.ngram.begin(problem_id, step, history, members)

    def reveal(self, truth):
        self.truth = truth

    def propose(self, rids, budget):
        trees = self.das.propose(rids, budget)
        for r, d, g in zip(rids, trees, self.ngram.propose(rids, budget)):
            t = self.truth[r].tolist()
            self.rows.append((accepted(d, t), accepted(g, t), int(d.match_len) if len(d) else -1))
        return trees

    def extend(self, rid, context, new):
        self.das.extend(rid, context, new)
        self.ngram.extend(rid, context, new)

    def end(self):
        self.das.end()
        self.ngram.end()


def oracle() -> None:
    peer = SideBySide()
    t0 = time.perf_counter()
    run = leave_one_out(peer)
    R = np.asarray(peer.rows, dtype=np.float64)
    d, g, ml = R[:, 0], R[:, 1], R[:, 2]
    s = bp.summarize(run, lambda t: True)
    print(f"DAS tokens/step {s['tokens_per_step']:.4f}; {len(R)} steps ({time.perf_counter() - t0:.0f}s)")
    print(f"accepted drafts/step: DAS {d.mean():.4f}  NGRAM {g.mean():.4f}  better of the two {np.maximum(d, g).mean():.4f}"
          f"  (NGRAM ahead at {np.mean(g > d):.1%} of steps, DAS at {np.mean(d > g):.1%})")
    for lo, hi in [(-1, 0), (0, 1), (1, 2), (2, 3), (3, 5), (5, 9), (9, 17), (17, 10**6)]:  # -1 empty, 0 stand-in
        m = (ml >= lo) & (ml < hi)
        if m.any():
            print(f"  DAS match [{lo},{hi}): {m.mean():.1%} of steps, DAS {d[m].mean():.3f}  NGRAM {g[m].mean():.3f}")


def best_alignment(C: np.ndarray, sources: list[np.ndarray], lead: int | None, expected: int | None):
    """(source, q, k): sources[s][q-k:q] == C[-k:], k maximal (<= MAXK); ties: the lead
    source nearest ``expected``, else the latest position. (None, None, 0) if none."""
    best, best_key = (None, None, 0), None
    for si, S in enumerate(sources):
        if len(S) < 2:
            continue
        qs = np.flatnonzero(S[:-1] == C[-1]) + 1
        if not len(qs):
            continue
        k = np.ones(len(qs), np.int64)
        alive = np.ones(len(qs), bool)
        for j in range(2, min(MAXK, len(C)) + 1):
            ok = alive & (qs - j >= 0)
            ok &= S[np.where(ok, qs - j, 0)] == C[-j]
            k[ok] = j
            alive = ok
            if not alive.any():
                break
        cand = qs[k == k.max()]
        if si == lead and expected is not None:
            dist = np.abs(cand - expected)
            q, pri = int(cand[dist.argmin()]), 2 - min(int(dist.min()), 50) / 100
        else:
            q, pri = int(cand[-1]), 0
        key = (int(k.max()), pri)
        if best_key is None or key > best_key:
            best, best_key = (si, q, int(k.max())), key
    return best


class Pointer(bp.DasPeer):
    needs_truth = True

    def __init__(self, mode: str) -> None:
        super().__init__(CFG, server=False)
        self.mode = mode
        self.stats = {"n": 0, "das": 0, "ptr": 0, "oracle": 0, "merged": 0}

    def fresh(self, server=None) -> "Pointer":
        return self  # (isolated: begin resets the drafter and the texts; the stats accumulate here)

    def begin(self, problem_id, step, history, members):
        super().begin(problem_id, step, history, members)
        self.text = {rid: np.asarray(p, np.int32) for rid, p in members}
        self.hist = [np.asarray(s, np.int32) for _, s in history]
        self.lead: dict[str, tuple | None] = {rid: None for rid, _ in members}

    def reveal(self, truth):
        self.truth = truth

    def chain(self, rid: str) -> tuple[list[int], int]:
        keys = [k for k in self.text if k != rid] + [("h", i) for i in range(len(self.hist))]
        srcs = [self.hist[k[1]] if isinstance(k, tuple) else self.text[k] for k in keys]
        lead = self.lead.get(rid)
        li, exp = (keys.index(lead[0]), lead[1]) if lead is not None and lead[0] in keys else (None, None)
        si, q, k = best_alignment(self.text[rid], srcs, li, exp)
        self.lead[rid] = None if q is None else (keys[si], q)
        return ([], 0) if q is None else (srcs[si][q:q + 16].tolist(), k)

    def merge(self, rid: str, tree: DraftTree, chain: list[int], k: int) -> DraftTree:
        c, _, kmin = self.mode[1:].partition("k")
        chain = chain[:int(c)]
        if not chain or k < int(kmin or 0):
            return tree
        for b in range(16, -1, -1):  # DAS redrafted with fewer nodes until the union fits
            t = tree if b == 16 else (self.d.speculate_batch([self._as[rid]], [b])[0] if b else DraftTree.empty())
            toks, par, probs = t.tokens.tolist(), t.parents.tolist(), t.probs.tolist()
            node = -1
            for x in chain:
                nxt = [i for i, (tk, pp) in enumerate(zip(toks, par)) if pp == node and tk == x]
                if nxt:
                    node = nxt[0]
                    continue
                toks.append(x)
                par.append(node)
                probs.append(0.5)
                node = len(toks) - 1
            if len(toks) <= 16:
                self.stats["merged"] += 1
                return DraftTree(np.asarray(toks, np.int32), np.asarray(par, np.int32),
                                 np.asarray(probs, np.float32), t.match_len)
        return tree

    def propose(self, rids, budget):
        out = []
        for rid, tree in zip(rids, super().propose(rids, budget)):
            chain, k = self.chain(rid)
            truth = self.truth[rid].tolist()
            a_d = accepted(tree, truth)
            a_p = next((i for i, (x, y) in enumerate(zip(chain, truth)) if x != y), min(len(chain), len(truth)))
            st = self.stats
            st["n"] += 1
            st["das"] += a_d
            st["ptr"] += a_p
            st["oracle"] += max(a_d, a_p)
            out.append(tree if self.mode == "base" else self.merge(rid, tree, chain, k))
        return out

    def extend(self, rid, context, new):
        super().extend(rid, context, new)
        self.text[rid] = np.concatenate([self.text[rid], np.asarray(new, np.int32)])


def pointer(modes: list[str]) -> None:
    for mode in modes or ["base"]:
        peer = Pointer(mode)
        t0 = time.perf_counter()
        s = bp.summarize(leave_one_out(peer), lambda t: True)
        st = peer.stats
        n = st["n"]
        print(f"{mode:8s} tokens/step {s['tokens_per_step']:.4f}; accepted drafts/step DAS {st['das'] / n:.4f} "
              f"pointer {st['ptr'] / n:.4f} better of the two {st['oracle'] / n:.4f}; merged {st['merged'] / n:.1%} "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)


def affinity() -> None:
    by_p: dict[str, list] = {}
    for r in verl_rollouts():
        by_p.setdefault(r.problem_id, []).append(r)

    def grams(x: list[int]) -> set:
        return set(zip(x, x[1:], x[2:], x[3:]))

    for k, gap, decay in [(15, 0, 0.7), (3, 1, 0.7), (5, 1, 0.7), (3, 3, 0.7), (5, 2, 0.5), (1, 1, 0.5)]:
        peer = bp.DasPeer(DrafterConfig(max_budget=16, min_token_prob=0.0, mix_escape=0.5, step_decay=decay),
                          server=False)
        run = bp.PeerRun()
        for p, members in by_p.items():
            whole = [np.concatenate([r.prompt_ids, r.response_ids]).astype(np.int32) for r in members]
            g = [grams(r.response_ids.tolist()) for r in members]
            for i, r in enumerate(members):
                sims = sorted(((len(g[i] & g[j]) / max(1, len(g[i])), j) for j in range(len(members)) if j != i),
                              reverse=True)
                hist = [(10 + r.step - 1 - (0 if n < k else gap), whole[j]) for n, (_, j) in enumerate(sims)]
                bp.run_group(peer, p, 10 + r.step, hist, [r], 16, run)
        s = bp.summarize(run, lambda t: True)
        print(f"top {k:2d} newest, the rest {gap} steps older (decay {decay}): tokens/step {s['tokens_per_step']:.4f}",
              flush=True)


class Nodes(bp.DasPeer):
    """Drafts 64 nodes; keeps each step's tree and recording; drives with its first 16."""

    needs_truth = True

    def __init__(self, server: bool) -> None:
        super().__init__(DrafterConfig(max_budget=64, min_token_prob=0.0, mix_escape=0.5), server=server)
        self.rows: list = []

    def fresh(self, server=None) -> "Nodes":
        peer = Nodes(self.server if server is None else server)
        peer.rows = self.rows
        return peer

    def reveal(self, truth):
        self.truth = truth

    def propose(self, rids, budget):
        out = []
        for r, t in zip(rids, self.d.speculate_batch([self._as[r] for r in rids], [64] * len(rids))):
            depth = np.zeros(len(t), np.int64)
            acc = np.zeros(len(t), bool)
            cond = np.zeros(len(t))
            truth = self.truth[r].tolist()
            for i, (x, p) in enumerate(zip(t.tokens.tolist(), t.parents.tolist())):
                depth[i] = 1 if p < 0 else depth[p] + 1
                acc[i] = (p < 0 or acc[p]) and depth[i] <= len(truth) and x == truth[depth[i] - 1]
                pp = 1.0 if p < 0 else t.probs[p]
                cond[i] = t.probs[i] / pp if pp > 0 else 0.0
            self.rows.append((t.parents.copy(), depth, acc, cond, int(t.match_len)))
            out.append(t.truncate(16) if len(t) > 16 else t)
        return out


EDGES = np.arange(1, 20) / 20
L_EDGES = [1, 2, 4, 8, 16]


def node_bin(c: float, d: int, m: int) -> tuple:
    return int(np.searchsorted(EDGES, c, side="right")), min(d, 6), int(np.searchsorted(L_EDGES, m, side="right"))


def fit(rows) -> dict:
    num: dict = {}
    den: dict = {}
    for par, depth, acc, cond, m in rows:
        for i, p in enumerate(par.tolist()):
            if (p < 0 or acc[p]) and depth[i] <= 15:
                b = node_bin(cond[i], depth[i], m)
                num[b] = num.get(b, 0) + int(acc[i])
                den[b] = den.get(b, 0) + 1
    return {b: (num[b] + 1) / (den[b] + 2) for b in den}


def accepted_16(rows, table: dict | None) -> float:
    import heapq

    total = 0
    for par, depth, acc, cond, m in rows:
        if table is None:
            total += int(max((depth[i] for i in range(min(16, len(par))) if acc[i]), default=0))
            continue
        f = [table.get(node_bin(cond[i], depth[i], m), cond[i]) for i in range(len(par))]
        kids: dict = {}
        for i, p in enumerate(par.tolist()):
            kids.setdefault(p, []).append(i)
        heap = [(-f[i], i) for i in kids.get(-1, [])]
        heapq.heapify(heap)
        best = taken = 0
        while heap and taken < 16:
            q, i = heapq.heappop(heap)
            taken += 1
            best = max(best, int(depth[i])) if acc[i] else best
            for j in kids.get(i, []):
                heapq.heappush(heap, (q * f[j], j))
        total += best
    return total / max(len(rows), 1)


def rerank() -> None:
    loo, lock = Nodes(False), Nodes(True)
    leave_one_out(loo)
    rollouts = verl_rollouts()
    bp.run_dataset([lock], rollouts, set(ds.steps_of(rollouts)), 4, 16, lambda m: None)
    print(f"leave-one-out, accepted drafts per step (16 nodes): DAS's order {accepted_16(loo.rows, None):.4f}; "
          f"calibrated on lockstep {accepted_16(loo.rows, fit(lock.rows)):.4f}; "
          f"on itself (in-sample) {accepted_16(loo.rows, fit(loo.rows)):.4f}")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "oracle"
    if what == "oracle":
        oracle()
    elif what == "pointer":
        pointer(sys.argv[2:])
    elif what == "affinity":
        affinity()
    elif what == "rerank":
        rerank()
    else:
        raise SystemExit(f"unknown study {what!r}: oracle, pointer, affinity or rerank")
