"""DAS's drafter vs its peers on the same targets and the same history (issue 11).

    python benchmarks/bench_peers.py --json peers.json [--png peers.png] [--full]

Peers (each used as a library, never copied):

- ``das``: ``das_sglang.core.drafter.SuffixDrafter`` (max budget 16, otherwise the default
  ``DrafterConfig``), through ``speculate_batch``;
- ``sglang_ngram``: SGLang's own NGRAM corpus (``sglang.srt.speculative.cpp_ngram.ngram_corpus
  .NgramCorpus``, the C++ trie the NGRAM worker uses; it JIT-compiles on first use) with the
  server defaults (BFS match, trie depth 18, BFS breadth 1..10) and
  ``speculative_num_draft_tokens = 17`` = the verified root token + 16 drafts;
- ``arctic``: ArcticInference's suffix cache (``arctic_inference.suffix_decoding``), when the
  ``arctic-inference`` package is installed (optional: ``scripts/install_bench_peers.sh`` builds
  its source release with ``--no-deps``); otherwise skipped with the reason in the JSON. Tree
  speculation, its default ``max_spec_factor`` (1.0) and ``min_token_prob`` (0.1).

Simulation (greedy acceptance against the recorded text). Targets are decoded in groups: a
group is the rollouts of one problem in one training step (SkyThought: one rollout per
checkpoint; verl: the 16 GRPO siblings). Each decode iteration every live member of the group
asks its peer for a draft tree of at most ``--budget`` (16) nodes; the longest tree path equal
to the recorded continuation is accepted, plus one bonus token (never past the end of the
recording); the accepted tokens are fed back; tokens/step = tokens produced / iterations.

History, the same for every peer (what the DAS drafter sees in an RL run):

- the problem's finished rollouts of the ``window_steps`` (4) previous steps, prompt +
  response, inserted oldest first (NGRAM's BFS order is by recency: newest history wins);
- each live member's prompt, inserted when it starts;
- every live member's accepted tokens as they are produced (its own text and its siblings').
  DAS appends them to its index; NGRAM gets exactly what SGLang's NGRAM worker inserts, the
  request's last ``max_trie_depth`` tokens after each verify, widened to
  ``max_trie_depth - 1 + new tokens`` so that no n-gram ending in a new token is lost when more
  than one token was accepted (SGLang's own window would drop some: this favours NGRAM);
  Arctic gets its ``add_active_response``.

Protocol. ``server`` (default): each peer keeps ONE state for the whole dataset, as one
engine serving an RL run does; groups run in training-step order, a group's history is
what the peer has not been given yet (earlier targets went in as they were decoded).
NGRAM is SGLang's one corpus for all requests at its default capacity (10M nodes,
LRU-evicted past it); Arctic keeps its global response cache; DAS its per-problem indexes
and its shared cross-problem index (``DrafterConfig.global_shard``). ``--isolated`` (the
earlier protocol): a fresh state per group holding only that problem's history; NGRAM then
gets one trie per problem sized to hold everything. Its output is a fixed-size BFS tree padded with token 0 under the root; trailing padding
is stripped (a real token-0 root child at the very end would be stripped with it: rare and
against NGRAM only by that one node).

verl slices (the dump is ONE training step: 64 problems x 16 GRPO samples, so a problem's
history of earlier steps is formed from its group, as issue 11's figures were): ``all`` --
leave-one-out, each target decoded alone with its 15 siblings' whole texts as the step
before's history (an RL run's next epoch of the problem), under the run's protocol: server,
one state per fold (fold f: every group's member f is its target) across all groups, so
the other problems' text is there too, as in an engine; ``lockstep`` -- the group decoding
together with no history of the problem (a first epoch; ``sequential`` under
``--sequential``); ``leave_one_out`` -- ``all`` on a fresh state per target holding only
that history (the exact protocol of issue 11's figures). ``verl_gsm8k_slices`` in the JSON
says the same.

``--bound`` adds ``corpus_bound`` (``CorpusBound``): not a drafter, the ceiling of any drafter
that proposes stored text after a match, from the same text (``das_vs_corpus_bound`` per slice).

Timing: ``p50_us``/``p99_us`` are per request-step: one ``speculate_batch`` (DAS) or
``batch_get`` (NGRAM) call over the group's live members, divided by their number. They are
host times on this machine, under whatever else runs on it: ``machine`` in the JSON says
how much (per dataset and peer, the CPU other tasks and DAMON's kdamond took and the steal
while that peer ran; ``machine_load.py``).

Default run: all 30 SkyThought problems, target steps 7-10 (every target has a full 4-step
window of history), plus the whole verl dump in its three slices: ~10 minutes on 2 cores
with every peer, most of it NGRAM's trie inserts (``all`` puts every group's history into
each of its 16 folds' states). ``--full``: SkyThought target steps 1-10 (~6 minutes more). The DAS peer drafts with ``min_token_prob=0`` and
``mix_escape=0.5`` (fixed budget, like NGRAM, which always fills its 16 slots), every other
field at its ``DrafterConfig`` default (the product's: wide tree, recency, match-length
order, step decay); ``--das FIELD=VALUE`` overrides any DrafterConfig field. The parameters
were chosen on every 3rd problem, steps 7-10 (``--problems-every 3 --steps 7-10``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from das_sglang.core.config import DrafterConfig
from das_sglang.core.draft_tree import DraftTree
from das_sglang.core.drafter import SuffixDrafter
from das_sglang.core.tokenize import TextTokenizer
from das_sglang.replay import datasets as ds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_load import MachineLoad, damon  # noqa: E402

NGRAM_DEPTH = 18  # SGLang's speculative_ngram_max_trie_depth default
NGRAM_MIN_BFS, NGRAM_MAX_BFS = 1, 10  # SGLang's defaults
NGRAM_CAPACITY = 10 * 1000 * 1000  # SGLang's speculative_ngram_capacity default

# What each verl_gsm8k slice is (written into the JSON as ``verl_gsm8k_slices``).
VERL_SLICES = {
    "all": "leave-one-out under the run's protocol (server: one state per fold across all groups): each "
           "target decoded alone, its group's other 15 members' whole texts as the problem's history "
           "of the step before (run_leave_one_out)",
    "lockstep": "a group's 16 members decoding together in lockstep, no history of the problem "
                "(a first epoch: live siblings and, server protocol, the other problems)",
    "sequential": "a group's members decoding one after another, each from the earlier ones' whole "
                  "texts, no history of the problem (--sequential)",
    "leave_one_out": "all's leave-one-out on a fresh state per target holding only that history "
                     "(the protocol of issue 11's verl figures)",
}


# ---------------------------------------------------------------------------- peers


class Peer:
    """One drafter under test; state is per group (``begin`` ... ``end``)."""

    name = ""
    server = False  # one state across all groups (a serving engine) vs fresh per group
    needs_truth = False  # shown the recorded continuations (``reveal``) before each propose

    def fresh(self, server: bool | None = None) -> "Peer":
        """A new peer with empty state, configured as this one (``server``: that protocol
        instead of this peer's)."""
        ...

    def begin(self, problem_id: str, step: int, history: list[tuple[int, np.ndarray]],
              members: list[tuple[str, np.ndarray]]) -> None: ...

    def reveal(self, truth: dict[str, np.ndarray]) -> None: ...

    def propose(self, rids: list[str], budget: int) -> list[DraftTree]: ...

    def extend(self, rid: str, context: np.ndarray, new: np.ndarray) -> None: ...

    def turn(self, rid: str, context: np.ndarray, new: np.ndarray) -> None:
        """The environment's turn ``new`` (``--env-prefill``); ``context``: the whole text so
        far, the turn included. A peer whose engine serves each turn as a new request
        overrides it; by default the turn extends the request."""
        self.extend(rid, context, new)

    def end(self) -> None: ...


class DasPeer(Peer):
    name = "das"

    def __init__(self, config: DrafterConfig, server: bool = True, turn_requests: bool = False):
        self.config = config
        self.server = server
        self.turn_requests = turn_requests  # each turn a request of its own (--turn-requests)
        self.d: SuffixDrafter | None = SuffixDrafter(config) if server else None
        self.members: list[str] = []
        self._as: dict[str, str] = {}  # a member's current request (its latest turn's)
        self._problem: str | None = None  # the group's (begin)

    def begin(self, problem_id, step, history, members):
        if not self.server:
            self.d = SuffixDrafter(self.config)
        d = self.d
        if step > d.step:
            d.advance_step(step)
        for s, seq in history:
            d.add_history(problem_id, s, seq)
        for rid, prompt in members:
            d.start_request(rid, problem_id, prompt)
        self.members = [rid for rid, _ in members]
        self._as = {rid: rid for rid in self.members}
        self._problem = problem_id

    def fresh(self, server=None) -> "DasPeer":
        return DasPeer(self.config, self.server if server is None else server, self.turn_requests)

    def propose(self, rids, budget):
        return self.d.speculate_batch([self._as[r] for r in rids], [budget] * len(rids))

    def extend(self, rid, context, new):
        self.d.extend_request(self._as[rid], new)

    def turn(self, rid, context, new):
        if not self.turn_requests:
            return self.extend(rid, context, new)
        # As verl's ToolAgentLoop sends it: the turn so far finishes (kept as history), the
        # next one starts with the whole conversation as its prompt.
        self.d.finish_request(self._as[rid], keep=True)
        self._as[rid] = nxt = f"{rid}#{len(context)}"
        self.d.start_request(nxt, self._problem, np.ascontiguousarray(context, dtype=np.int32))

    def end(self):
        if self.server:  # the finished rollouts stay as history of their step
            for rid in self.members:
                self.d.finish_request(self._as[rid], keep=True)
        else:
            self.d = None


class NgramPeer(Peer):
    name = "sglang_ngram"

    def __init__(self, budget: int, match_type: str = "BFS", server: bool = True):
        from sglang.srt.speculative.cpp_ngram.ngram_corpus import NgramCorpus  # JIT on first use

        self._cls = NgramCorpus
        self.budget = budget
        self.match_type = match_type
        self.server = server
        # Server mode: the NGRAM worker's one corpus for every request, SGLang's default
        # capacity (speculative_ngram_capacity, LRU-evicted past it).
        self.corpus = self._make(NGRAM_CAPACITY) if server else None
        self._lens: dict[str, int] = {}

    def fresh(self, server=None) -> "NgramPeer":
        return NgramPeer(self.budget, self.match_type, self.server if server is None else server)

    def _make(self, capacity: int):
        return self._cls(
            max_trie_depth=NGRAM_DEPTH, min_bfs_breadth=NGRAM_MIN_BFS, max_bfs_breadth=NGRAM_MAX_BFS,
            draft_token_num=self.budget + 1, match_type=self.match_type, capacity=capacity,
        )

    def begin(self, problem_id, step, history, members):
        if not self.server:
            # Capacity: every inserted position creates at most NGRAM_DEPTH nodes; no eviction.
            n_tok = sum(len(s) for _, s in history) + sum(len(p) for _, p in members)
            self.corpus = self._make(NGRAM_DEPTH * (n_tok + self._live_tokens) + 1024)
        rows = [s.tolist() for _, s in sorted(history, key=lambda h: h[0])]
        rows += [p.tolist() for _, p in members]
        if rows:
            self.corpus.batch_put(rows)
        self._lens = {rid: len(p) for rid, p in members}
        self._ctx = {rid: p for rid, p in members}

    _live_tokens = 0  # set by the driver: the group's total response tokens (capacity bound)

    def propose(self, rids, budget):
        self.corpus.synchronize()
        tails = [self._ctx[r][-NGRAM_DEPTH:].tolist() for r in rids]
        ids, mask = self.corpus.batch_get(rids, tails, [self._lens[r] for r in rids])
        return ngram_trees(ids, mask, len(rids), self.budget + 1)

    def extend(self, rid, context, new):
        self._ctx[rid] = context
        self._lens[rid] = len(context)
        window = context[-(NGRAM_DEPTH - 1 + len(new)):]
        self.corpus.batch_put([window.tolist()])

    def end(self):
        if not self.server:
            self.corpus = None


class CorpusBound(Peer):
    """Not a drafter: a ceiling for the drafters here (``--bound``). It sees the same text
    as the peers (history, prompts and accepted tokens, kept for the whole dataset as the
    server protocol's peers keep theirs) and is shown the recorded continuation; it
    proposes the longest prefix of that continuation (at most ``budget`` tokens) that
    occurs somewhere in that text right after the request's last token. Every path of a
    suffix-index or n-gram draft tree is the continuation of a match of at least one token,
    i.e. text that occurs after that token in what the drafter stored, so no such drafter
    gets more accepted at that position. (Its own trajectory runs ahead of the others', so
    its siblings' text lines up with a target a little differently: a ceiling in this
    sense, not to the token.) Stored as the hashes of every n-gram (n <= budget + 1) of
    the text given so far."""

    name = "corpus_bound"
    needs_truth = True

    def __init__(self, budget: int, server: bool = True):
        self.budget = budget
        self.max_n = budget + 1  # the token before + the continuation
        self.server = server
        self.grams: set[int] = set()
        self.seqs: dict[str, list[int]] = {}
        self.truth: dict[str, np.ndarray] = {}

    def fresh(self, server=None) -> "CorpusBound":
        return CorpusBound(self.budget, self.server if server is None else server)

    def _add(self, seq: list[int], start: int) -> None:
        grams, m = self.grams, self.max_n
        for i in range(start, len(seq)):
            for n in range(1, min(m, i + 1) + 1):
                grams.add(hash(tuple(seq[i - n + 1: i + 1])))

    def begin(self, problem_id, step, history, members):
        if not self.server:
            self.grams = set()
        for _, seq in history:
            self._add(seq.tolist(), 0)
        self.seqs = {}
        for rid, prompt in members:
            self.seqs[rid] = prompt.tolist()
            self._add(self.seqs[rid], 0)

    def reveal(self, truth: dict[str, np.ndarray]) -> None:
        self.truth = truth

    def propose(self, rids, budget):
        out = []
        for rid in rids:
            t = self.truth[rid][:budget].tolist()
            c = self.seqs[rid][-1:]  # the token before: every peer drafts after a match >= 1
            k = 0
            while k < len(t) and hash(tuple(c + t[: k + 1])) in self.grams:
                k += 1  # (a prefix of an occurring string occurs: monotone)
            out.append(DraftTree(np.asarray(t[:k], np.int32), np.arange(-1, k - 1, dtype=np.int32),
                                 np.ones(k)))
        return out

    def extend(self, rid, context, new):
        seq = self.seqs[rid]
        start = len(seq)
        seq.extend(new.tolist())
        self._add(seq, start)

    def end(self):
        self.seqs = {}


def ngram_trees(ids: np.ndarray, mask: np.ndarray, bs: int, n: int) -> list[DraftTree]:
    """NGRAM's (root + n-1 nodes, BFS order, ancestor mask) rows as DraftTrees (root dropped)."""
    ids = ids.reshape(bs, n)
    m = mask.reshape(bs, n, n).astype(bool)
    m[:, np.arange(n), np.arange(n)] = False
    has = m.any(axis=2)
    parent = np.where(has, n - 1 - np.argmax(m[:, :, ::-1], axis=2), -1)  # nearest ancestor
    out = []
    for b in range(bs):
        tok, par = ids[b, 1:], parent[b, 1:] - 1  # root (index 0) -> -1
        k = len(tok)
        while k > 0 and tok[k - 1] == 0 and par[k - 1] == -1:
            k -= 1
        out.append(DraftTree(tok[:k].astype(np.int32), par[:k].astype(np.int32), np.ones(k)))
    return out


class ArcticPeer(Peer):
    name = "arctic"

    def __init__(self, budget: int, server: bool = True):
        from arctic_inference.suffix_decoding import SuffixDecodingCache  # optional

        self._cls = SuffixDecodingCache
        self.budget = budget
        self.server = server
        self.cache = self._cls(max_tree_depth=64, max_cached_requests=100000) if server else None
        self._n = 0

    def fresh(self, server=None) -> "ArcticPeer":
        return ArcticPeer(self.budget, self.server if server is None else server)

    def begin(self, problem_id, step, history, members):
        if not self.server:
            self.cache = self._cls(max_tree_depth=64, max_cached_requests=100000)
        for s, seq in sorted(history, key=lambda h: h[0]):
            rid = f"h{self._n}"
            self._n += 1
            self.cache.start_request(rid, seq[:0])
            self.cache.add_active_response(rid, seq)
            self.cache.stop_request(rid)
        self._ctx = {}
        for rid, prompt in members:
            self.cache.start_request(rid, prompt)
            self._ctx[rid] = prompt

    def propose(self, rids, budget):
        out = []
        for r in rids:
            # Arctic's own defaults otherwise (max_spec_factor 1.0, min_token_prob 0.1).
            d = self.cache.speculate(r, self._ctx[r][-64:], max_spec_tokens=budget, use_tree_spec=True)
            out.append(DraftTree(np.asarray(d.token_ids, np.int32), np.asarray(d.parents, np.int32),
                                 np.asarray(d.probs, np.float64)))
        return out

    def extend(self, rid, context, new):
        self._ctx[rid] = context
        self.cache.add_active_response(rid, new)

    def end(self):
        if self.server:  # finished responses stay in the cache (Arctic's global tree)
            for rid in self._ctx:
                self.cache.stop_request(rid)
        else:
            self.cache = None


# ---------------------------------------------------------------------------- simulation


@dataclass
class TargetResult:
    req_id: str
    problem_id: str
    step: int
    capped: bool
    tokens: int = 0
    steps: int = 0
    first_miss: int = 0  # iterations where not even the first drafted token was right
    root_children: int = 0
    nodes: int = 0
    prefilled: int = 0  # environment-turn tokens put in the context, not decoded (--env-prefill)

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / max(self.steps, 1)


@dataclass
class PeerRun:
    targets: list[TargetResult] = field(default_factory=list)
    us_per_request: list[float] = field(default_factory=list)
    machine: dict = field(default_factory=dict)  # what else the machine did meanwhile (machine_load)


def run_group(peer: Peer, problem_id: str, step: int, history, members: Sequence[ds.Rollout],
              budget: int, run: PeerRun, env: dict | None = None) -> None:
    """Decode a GRPO group in lockstep. ``env``: per req_id, the (start, end) token ranges
    of its response that the environment wrote (tool responses, ``--env-prefill``): when a
    member reaches one, the range goes into its context as the next turn's prompt does (the
    peers' extend, no step, not counted as decoded), and no step accepts past its start
    (the model's turn ended there)."""
    if isinstance(peer, NgramPeer):
        NgramPeer._live_tokens = sum(r.length for r in members)
    peer.begin(problem_id, step, history, [(r.req_id, r.prompt_ids) for r in members])
    res = {r.req_id: TargetResult(r.req_id, problem_id, step, r.hit_length_cap) for r in members}
    pos = {r.req_id: 0 for r in members}
    by_id = {r.req_id: r for r in members}
    ctx = {r.req_id: r.prompt_ids for r in members}
    spans = {rid: list(v) for rid, v in (env or {}).items() if rid in by_id and v}

    def grow(rid: str, new: np.ndarray) -> None:  # (the DAS peer keeps its text itself)
        if not isinstance(peer, DasPeer):
            ctx[rid] = np.concatenate([ctx[rid], new])

    def add(rid: str, new: np.ndarray) -> None:
        grow(rid, new)
        peer.extend(rid, ctx[rid], new)

    def prefill(rid: str) -> bool:
        """The environment's turns starting where ``rid`` stands; True while it has more to decode."""
        todo = spans.get(rid)
        while todo and todo[0][0] == pos[rid]:
            s, e = todo.pop(0)
            r = by_id[rid]
            new = r.response_ids[s:e]
            grow(rid, new)
            peer.turn(rid, np.concatenate([r.prompt_ids, r.response_ids[:e]]), new)
            pos[rid] = e
            res[rid].prefilled += e - s
        return pos[rid] < by_id[rid].length

    live = [r.req_id for r in members if prefill(r.req_id)]
    while live:
        if peer.needs_truth:
            peer.reveal({rid: by_id[rid].response_ids[pos[rid]:pos[rid] + budget] for rid in live})
        t0 = time.perf_counter()
        trees = peer.propose(live, budget)
        dt = time.perf_counter() - t0
        run.us_per_request.append(dt * 1e6 / len(live))
        still = []
        for rid, tree in zip(live, trees):
            r, p = by_id[rid], pos[rid]
            acc = tree.accept_length(r.response_ids[p:p + budget].tolist()) if len(tree) else 0
            todo = spans.get(rid)
            n = min(acc + 1, (todo[0][0] if todo else r.length) - p)
            tr = res[rid]
            tr.tokens += n
            tr.steps += 1
            tr.first_miss += acc == 0
            tr.nodes += len(tree)
            tr.root_children += int((tree.parents == -1).sum()) if len(tree) else 0
            new = r.response_ids[p:p + n]
            pos[rid] = p + n
            add(rid, new)
            if prefill(rid):
                still.append(rid)
        live = still
    peer.end()
    run.targets.extend(res.values())


# What the environment writes into a verl multi-turn rollout between two assistant turns:
# the tool's response, framed as the next user turn (the dump strips the special tokens).
ENV_TURN = re.compile(r"user\n<tool_response>.*?</tool_response>\nassistant\n", re.S)


def env_turns(texts: Sequence[ds.TextRollout], rollouts: Sequence[ds.Rollout], tok) -> tuple[list, dict]:
    """``--env-prefill``: each response tokenized turn by turn (the assistant's text and the
    environment's, ``ENV_TURN``, each on its own, as an engine sees them: the environment's
    turn arrives as the next request's prompt) and, per req_id, the token ranges of the
    environment's turns. Same rollouts otherwise."""
    per, parts = [], []  # (per rollout: its parts' (index, is_env)); every part's text
    for t in texts:
        cuts, at = [], 0
        for m in ENV_TURN.finditer(t.response):
            cuts += [(t.response[at:m.start()], False), (m.group(0), True)]
            at = m.end()
        cuts.append((t.response[at:], False))
        per.append([(len(parts) + k, is_env) for k, (_, is_env) in enumerate(c for c in cuts if c[0])])
        parts += [text for text, _ in cuts if text]
    toks = tok.encode_many(parts)  # (one call: one cache entry)
    out, env = [], {}
    for t, r, mine in zip(texts, rollouts, per):
        assert t.req_id == r.req_id
        ids, spans = [], []
        for k, is_env in mine:
            if is_env:
                spans.append((len(ids), len(ids) + len(toks[k])))
            ids.extend(int(x) for x in toks[k])
        env[r.req_id] = spans
        out.append(replace(r, response_ids=np.asarray(ids, np.int32)))
    return out, env


def history_of(by_problem_step: dict, problem_id: str, step: int, window: int) -> list[tuple[int, np.ndarray]]:
    out = []
    for s in range(max(0, step - window), step):
        for r in by_problem_step.get((problem_id, s), []):
            out.append((s, np.concatenate([r.prompt_ids, r.response_ids]).astype(np.int32)))
    return out


def summarize(run: PeerRun, keep) -> dict:
    ts = [t for t in run.targets if keep(t)]
    tok, st = sum(t.tokens for t in ts), sum(t.steps for t in ts)
    us = np.asarray(run.us_per_request) if run.us_per_request else np.zeros(1)
    return {
        "tokens_per_step": round(tok / max(st, 1), 4),
        "tokens_per_step_mean_target": round(float(np.mean([t.tokens_per_step for t in ts])) if ts else 0.0, 4),
        "targets": len(ts),
        "tokens": tok,
        "steps": st,
        "first_token_miss_rate": round(sum(t.first_miss for t in ts) / max(st, 1), 4),
        "root_children_mean": round(sum(t.root_children for t in ts) / max(st, 1), 3),
        "nodes_mean": round(sum(t.nodes for t in ts) / max(st, 1), 3),
        # Latency over every call of the peer's run (all slices of the dataset together).
        "p50_us": round(float(np.percentile(us, 50)), 2),
        "p99_us": round(float(np.percentile(us, 99)), 2),
        "mean_us": round(float(us.mean()), 2),
        "per_target": {"req_id": [t.req_id for t in ts], "tokens": [t.tokens for t in ts],
                       "steps": [t.steps for t in ts],
                       "tokens_per_step": [round(t.tokens_per_step, 4) for t in ts]},
    }


def run_dataset(peers: list[Peer], rollouts: list[ds.Rollout], target_steps: set[int], window: int,
                budget: int, log, sequential: bool = False, env: dict | None = None) -> dict[str, PeerRun]:
    """Every peer over the target groups. ``sequential`` (server protocol only): a group's
    members decode one after another instead of in lockstep, each from what the earlier
    ones wrote whole (their texts went in as they were decoded, then as finished)."""
    by_ps: dict[tuple[str, int], list[ds.Rollout]] = {}
    for r in rollouts:
        by_ps.setdefault((r.problem_id, r.step), []).append(r)
    groups = [(p, s) for (p, s) in by_ps if s in target_steps]
    runs = {}
    for peer in peers:
        run = runs[peer.name] = PeerRun()
        t0 = time.perf_counter()
        load0 = MachineLoad.now()
        if peer.server:
            # One server's state for the whole dataset: groups in step order (training
            # steps only advance); a group's history is what the server has not seen yet
            # (earlier targets already went in as they were decoded).
            peer = peer.fresh()
            seen: set[tuple[str, int]] = set()
            for p, s in sorted(groups, key=lambda g: g[1]):  # stable: dataset order within a step
                hist = []
                for h in range(max(0, s - window), s):
                    if (p, h) not in seen:
                        seen.add((p, h))
                        hist += history_of(by_ps, p, h + 1, 1)
                seen.add((p, s))
                if sequential:
                    for i, member in enumerate(by_ps[(p, s)]):
                        run_group(peer, p, s, hist if i == 0 else [], [member], budget, run, env)
                else:
                    run_group(peer, p, s, hist, by_ps[(p, s)], budget, run, env)
        else:
            for p, s in groups:
                run_group(peer, p, s, history_of(by_ps, p, s, window), by_ps[(p, s)], budget, run, env)
        run.machine = {k: None if v is None else round(v, 3) for k, v in MachineLoad.now().since(load0).items()}
        log(f"  {peer.name}: {len(groups)} groups in {time.perf_counter() - t0:.1f}s")
    return runs


def run_leave_one_out(peers: list[Peer], rollouts: list[ds.Rollout], budget: int, log, server: bool = False,
                      env: dict | None = None) -> dict[str, PeerRun]:
    """Leave-one-out: every target decoded alone with its group's other members' whole texts
    (prompt + response) as the problem's history of the step before -- an RL run's next
    epoch of the same problem, whose earlier samples finished (no live siblings).

    ``server=False`` (``verl_gsm8k.leave_one_out``, the protocol behind issue 11's verl
    figures: DAS without the wide tree, ``--das mixture=false``, scores the issue's 3.123
    tokens per step to the digit, NGRAM 3.26 vs the issue's 3.226): a fresh peer state per
    target, holding that history and nothing else.

    ``server=True`` (``verl_gsm8k.all``): as one engine serving the epoch holds it. In fold
    ``f`` every group's member ``f`` is its target and the other members its history; one
    peer state per fold takes the groups in step order, so the peer also holds every earlier
    group's history and decoded target (other problems: DAS's shared index, NGRAM's one
    corpus, Arctic's global cache), as in the ``server`` protocol of the other slices. No
    target's text is in any state before it is decoded: within a fold a group's history
    never holds its target, and another group's text is another rollout. Results are in
    fold order."""
    by_ps: dict[tuple[str, int], list[ds.Rollout]] = {}
    for r in rollouts:
        by_ps.setdefault((r.problem_id, r.step), []).append(r)
    groups = sorted(by_ps, key=lambda g: g[1])  # (stable: dataset order within a step)
    whole = {g: [np.concatenate([r.prompt_ids, r.response_ids]).astype(np.int32) for r in by_ps[g]]
             for g in groups}
    folds = max((len(m) for m in by_ps.values()), default=0) if server else 1
    runs = {}
    for proto in peers:
        run = runs[proto.name] = PeerRun()
        t0 = time.perf_counter()
        load0 = MachineLoad.now()
        for f in range(folds):
            peer = proto.fresh(server=server)  # an isolated peer resets itself in begin
            for p, s in groups:
                members = by_ps[(p, s)]
                for i, r in enumerate(members):
                    if server and i != f:
                        continue
                    hist = [(s - 1, w) for j, w in enumerate(whole[(p, s)]) if j != i]
                    run_group(peer, p, s, hist, [r], budget, run, env)
        run.machine = {k: None if v is None else round(v, 3) for k, v in MachineLoad.now().since(load0).items()}
        how = f"server state, {folds} folds" if server else "fresh state per target"
        log(f"  {proto.name}: {len(rollouts)} targets leave-one-out ({how}) in {time.perf_counter() - t0:.1f}s")
    return runs


def slice_report(runs: dict[str, PeerRun], keep) -> dict:
    out = {name: summarize(run, keep) for name, run in runs.items()}
    if "das" in out and "sglang_ngram" in out:
        d, g = out["das"], out["sglang_ngram"]
        out["das_vs_sglang_ngram"] = round(d["tokens_per_step"] / max(g["tokens_per_step"], 1e-9), 4)
        pairs = zip(d["per_target"]["tokens_per_step"], g["per_target"]["tokens_per_step"])
        out["das_wins_targets"] = sum(a > b for a, b in pairs)
    if "das" in out and "corpus_bound" in out:
        out["das_vs_corpus_bound"] = round(out["das"]["tokens_per_step"]
                                           / max(out["corpus_bound"]["tokens_per_step"], 1e-9), 4)
    return out


# ---------------------------------------------------------------------------- main


def make_peers(budget: int, cfg: DrafterConfig, skip: set[str], log, server: bool = True,
               bound: bool = False, turn_requests: bool = False) -> tuple[list[Peer], dict]:
    peers: list[Peer] = [DasPeer(cfg, server, turn_requests)]
    status = {"das": {"available": True, "config": {f: getattr(cfg, f) for f in cfg.field_names()}}}
    if "sglang_ngram" not in skip:
        try:
            t0 = time.perf_counter()
            peers.append(NgramPeer(budget, server=server))
            peers[-1]._make(16)  # builds (JIT) now, so a missing toolchain is reported here
            status["sglang_ngram"] = {"available": True, "max_trie_depth": NGRAM_DEPTH,
                                      "capacity": NGRAM_CAPACITY if server else "all history (per group)",
                                      "bfs_breadth": [NGRAM_MIN_BFS, NGRAM_MAX_BFS], "match_type": "BFS",
                                      "draft_token_num": budget + 1,
                                      "load_s": round(time.perf_counter() - t0, 1)}
        except Exception as e:  # noqa: BLE001 - a missing peer is reported, not fatal
            log(f"skipping sglang_ngram: {type(e).__name__}: {e}")
            status["sglang_ngram"] = {"available": False, "reason": f"{type(e).__name__}: {e}"}
    if "arctic" not in skip:
        try:
            peers.append(ArcticPeer(budget, server))
            status["arctic"] = {"available": True, "max_tree_depth": 64, "use_tree_spec": True,
                                "max_spec_factor": 1.0, "min_token_prob": 0.1}
        except Exception as e:  # noqa: BLE001
            log(f"skipping arctic (optional: scripts/install_bench_peers.sh builds arctic-inference "
                f"0.3.0 from source, --no-deps, needs cmake + a C++ toolchain): {type(e).__name__}: {e}")
            status["arctic"] = {"available": False, "reason": f"{type(e).__name__}: {e}"}
    if bound:
        peers.append(CorpusBound(budget, server))
        status["corpus_bound"] = {"available": True, "what": "upper bound, not a drafter: the longest "
                                  "prefix of the recorded continuation that occurs in the text every "
                                  "peer was given (CorpusBound)"}
    return peers, status


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True, help="write results here")
    ap.add_argument("--png", default=None, help="bar chart (default: next to --json)")
    ap.add_argument("--full", action="store_true", help="SkyThought target steps 1-10 (default 7-10)")
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--problems-every", type=int, default=1, help="SkyThought: every k-th problem")
    ap.add_argument("--steps", default="7-10", help="SkyThought target steps (without --full)")
    ap.add_argument("--datasets", default="skythought,verl_gsm8k")
    ap.add_argument("--skip", default="", help="comma list of peers to skip (sglang_ngram, arctic)")
    ap.add_argument("--bound", action="store_true",
                    help="also the corpus bound (CorpusBound: an upper bound, not a drafter; ~1 min more)")
    ap.add_argument("--das", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a DrafterConfig field of the DAS peer (repeatable), e.g. mixture=false")
    ap.add_argument("--isolated", action="store_true",
                    help="the earlier protocol: every group gets fresh peer state holding only its own "
                         "problem's history (default: one server state across all groups)")
    ap.add_argument("--sequential", action="store_true",
                    help="a group's members decode one after another, not in lockstep (each sees "
                         "the earlier siblings' whole text; server protocol only)")
    ap.add_argument("--env-prefill", action="store_true",
                    help="verl: the environment's turns (tool responses) go into the context as the "
                         "next turn's prompt, as an engine serves a multi-turn rollout, instead of being "
                         "decoded as if the model wrote them (the default, the committed runs' protocol)")
    ap.add_argument("--turn-requests", action="store_true",
                    help="with --env-prefill: DAS serves each turn as a request of its own whose prompt "
                         "is the whole conversation so far (as verl's ToolAgentLoop sends it; the "
                         "earlier turn finishes as history), not as one request extended")
    ap.add_argument("--no-leave-one-out", dest="leave_one_out", action="store_false",
                    help="verl: skip the leave_one_out slice (all's leave-one-out on a fresh state per "
                         "target: the protocol of issue 11's verl figures; ~2 min with every peer)")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    if args.budget < 1:
        print(f"error: invalid --budget={args.budget}: must be >= 1", file=sys.stderr)
        return 1
    if args.turn_requests and not args.env_prefill:
        print("error: --turn-requests needs --env-prefill (it is how the environment's turns are served)",
              file=sys.stderr)
        return 1
    if args.sequential and args.isolated:
        print("error: --sequential needs the server protocol (--isolated resets a peer's state "
              "per group, so a later sibling would not see the earlier ones)", file=sys.stderr)
        return 1

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # Fixed budget for every peer (NGRAM always fills its 16 slots): no min_token_prob cut;
    # escape 0.5 discounts continuations seen under little weight (see DrafterConfig).
    overrides: dict = {"max_budget": args.budget, "min_token_prob": 0.0, "mix_escape": 0.5}
    for item in args.das:
        key, eq, val = item.partition("=")
        if not eq or key not in DrafterConfig.field_names():
            print(f"error: invalid --das {item!r}: expected FIELD=VALUE with FIELD one of "
                  f"{', '.join(DrafterConfig.field_names())}", file=sys.stderr)
            return 1
        kind = type(getattr(DrafterConfig(), key))
        overrides[key] = val.lower() in ("1", "true", "yes") if kind is bool else kind(val)
    try:
        cfg = DrafterConfig(**overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    peers, status = make_peers(args.budget, cfg, set(filter(None, args.skip.split(","))), log,
                               server=not args.isolated, bound=args.bound, turn_requests=args.turn_requests)
    tok = TextTokenizer(cache_dir=args.cache_dir)
    out: dict = {"budget": args.budget, "window_steps": cfg.window_steps, "full": args.full,
                 "protocol": "isolated" if args.isolated else "server",
                 "siblings": "sequential" if args.sequential else "lockstep",
                 "env_turns": ("prefilled, DAS: a request per turn" if args.turn_requests else "prefilled")
                 if args.env_prefill else "decoded",
                 "peers": status, "datasets": {}}
    names = set(args.datasets.split(","))
    t_all = time.perf_counter()
    # Per dataset and peer, the seconds other tasks, DAMON's kdamond and steal took while
    # it ran (the latencies above are host times under all of that).
    machine_runs: dict = {}
    out["machine"] = {"cpus": os.cpu_count(), "damon": damon(), "runs": machine_runs}
    if "skythought" in names:
        texts = ds.load_skythought("long")
        rollouts = ds.tokenize_rollouts(texts, tok, ds.SKYTHOUGHT_MAX_NEW_TOKENS)
        pids = ds.problem_ids(rollouts)
        pids = sorted(pids, key=lambda p: int(p.split("-")[1]))
        if args.full:
            steps = set(range(1, max(ds.steps_of(rollouts)) + 1))
        else:
            a, _, b = args.steps.partition("-")
            steps = set(range(int(a), int(b or a) + 1))
        keep_p = set(pids[:: max(1, args.problems_every)])
        rollouts = [r for r in rollouts if r.problem_id in keep_p]
        log(f"skythought: {len({r.problem_id for r in rollouts})} problems, target steps {sorted(steps)}")
        runs = run_dataset(peers, rollouts, steps, cfg.window_steps, args.budget, log, args.sequential)
        out["datasets"]["skythought"] = {
            "target_steps": sorted(steps),
            "uncapped": slice_report(runs, lambda t: not t.capped),
            "capped": slice_report(runs, lambda t: t.capped),
            "all": slice_report(runs, lambda t: True),
        }
        machine_runs["skythought"] = {name: run.machine for name, run in runs.items()}
    if "verl_gsm8k" in names:
        texts = ds.load_verl([ds.VERL_SAMPLE])
        rollouts = ds.tokenize_rollouts(texts, tok)
        env = None
        if args.env_prefill:
            rollouts, env = env_turns(texts, rollouts, tok)
        log(f"verl_gsm8k: {len(ds.problem_ids(rollouts))} groups, {len(rollouts)} rollouts")
        verl: dict = {}
        out["datasets"]["verl_gsm8k"] = verl

        def put(name: str, runs: dict[str, PeerRun]) -> None:
            verl[name] = slice_report(runs, lambda t: True)
            machine_runs["verl_gsm8k" if name == "all" else f"verl_gsm8k_{name}"] = {
                peer: run.machine for peer, run in runs.items()}

        # all: leave-one-out under the run's protocol (the dump is one training step, so a
        # problem's history is formed from its group, as issue 11's figures were)
        proto = "isolated" if args.isolated else "server"
        log(f"verl_gsm8k all: leave-one-out, {proto} protocol")
        runs = run_leave_one_out(peers, rollouts, args.budget, log, server=not args.isolated, env=env)
        put("all", runs)
        if env is not None:  # (the environment's tokens, in every peer's context, decoded by none)
            out["env_prefilled_tokens"] = {"verl_gsm8k": sum(t.prefilled for t in next(iter(runs.values())).targets)}
        # the group decoding together, no history of the problem (a first epoch)
        live = "sequential" if args.sequential else "lockstep"
        log(f"verl_gsm8k {live}: each group's members decoding together, no history of the problem")
        put(live, run_dataset(peers, rollouts, set(ds.steps_of(rollouts)), cfg.window_steps, args.budget, log,
                              args.sequential, env))
        if args.leave_one_out and not args.isolated:
            log("verl_gsm8k leave_one_out: as all, a fresh state per target (issue 11's protocol)")
            put("leave_one_out", run_leave_one_out(peers, rollouts, args.budget, log, server=False, env=env))
        out["verl_gsm8k_slices"] = {k: VERL_SLICES[k] for k in verl}
    out["wall_s"] = round(time.perf_counter() - t_all, 1)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(compact_json(out))
    tmp.replace(path)
    for dname, slices in out["datasets"].items():
        for sname, sl in slices.items():
            if not isinstance(sl, dict):
                continue
            row = "  ".join(f"{p}={sl[p]['tokens_per_step']:.3f} (p50 {sl[p]['p50_us']:.1f}us p99 {sl[p]['p99_us']:.1f}us)"
                            for p in ("das", "sglang_ngram", "arctic", "corpus_bound") if p in sl)
            print(f"{dname}/{sname} [{sl['das']['targets']} targets]: {row}")
    plot(out, Path(args.png) if args.png else path.with_suffix(".png"))
    return 0


def compact_json(out: dict) -> str:
    """Indented JSON with every list of numbers / ids on one line (per-target columns)."""
    text = json.dumps(out, indent=1)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def plot(out: dict, png: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
        return
    labels, vals = [], {}
    for dname, slices in out["datasets"].items():
        for sname, sl in slices.items():
            if isinstance(sl, dict) and sname != "all" or dname == "verl_gsm8k":
                labels.append(f"{dname}\n{sname}")
                for p in ("das", "sglang_ngram", "arctic", "corpus_bound"):
                    vals.setdefault(p, []).append(sl[p]["tokens_per_step"] if p in sl else 0.0)
    vals = {p: v for p, v in vals.items() if any(v)}  # (peers in no slice: no legend entry)
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(labels))
    w = 0.8 / max(len(vals), 1)
    for k, (p, v) in enumerate(vals.items()):
        ax.bar(x + k * w, v, w, label=p)
    ax.set_xticks(x + w * (len(vals) - 1) / 2, labels)
    ax.set_ylabel(f"tokens / step (budget {out['budget']}, bonus incl.)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
