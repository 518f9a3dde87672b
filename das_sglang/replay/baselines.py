"""The SuffixDecoding baseline (arXiv 2411.04975, as ArcticInference / vLLM ship it), rebuilt
on das-sglang's native index so the replay compares drafting *strategies*, not index code.

What makes it SuffixDecoding rather than DAS:

- one *global* index over the responses of all problems (no per-problem shards), filled FIFO
  up to ``max_cached_requests`` responses: no training-step window, no step weights;
- live responses enter the global index as they are generated, so siblings see each other;
- a per-request index of the request's own prompt + response;
- the draft comes from whichever of the two scores higher (sum of node probabilities), and
  is at most ``max_spec_factor * match_len + max_spec_offset`` nodes: short matches draft
  little, whatever the batch looks like (no length- or cost-awareness).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from das_sglang.core.config import check_field
from das_sglang.core.draft_tree import DraftTree


# SuffixDecoding has no notion of training steps: every sequence sits in one step slot of
# weight 1, so counts are plain occurrence counts.
_STEP = 0
_STEPS = np.array([_STEP], np.int64)
_WEIGHTS = np.array([1.0])


class _Best:
    """Best-scoring draft per batch row across candidate (index, match length) drafts."""

    def __init__(self, n: int):
        self.score = np.full(n, -1.0)
        self.tree: list[DraftTree] = [DraftTree.empty()] * n

    def consider(self, got, rows: np.ndarray) -> None:
        tokens, parents, probs, offsets, match, count = got
        csum = np.concatenate([[0.0], np.cumsum(probs)])
        start = offsets[:-1]
        score = csum[start + count] - csum[start]
        for j in np.flatnonzero(score > self.score[rows]).tolist():
            a, k, r = int(start[j]), int(count[j]), int(rows[j])
            if k == 0:
                continue
            self.score[r] = score[j]
            self.tree[r] = DraftTree(tokens[a : a + k], parents[a : a + k], probs[a : a + k], int(match[j]))

    def trees(self) -> list[DraftTree]:
        return self.tree


@dataclass(frozen=True, slots=True)
class SuffixDecodingConfig:
    """Defaults = vLLM's ``suffix_decoding_*`` / ArcticInference's speculate() defaults."""

    max_depth: int = 24
    max_budget: int = 32
    min_token_prob: float = 0.1
    max_spec_factor: float = 1.0
    max_spec_offset: float = 0.0
    max_cached_requests: int = 10000  # -1 = unbounded
    tree: bool = True
    match_lengths: tuple[int, ...] | None = None  # None: every length, as ArcticInference

    def __post_init__(self) -> None:
        check_field(2 <= self.max_depth <= 256, "max_depth", self.max_depth, "must be in [2, 256]")
        check_field(0 <= self.max_budget <= 1024, "max_budget", self.max_budget, "must be in [0, 1024]")
        check_field(0.0 <= self.min_token_prob <= 1.0, "min_token_prob", self.min_token_prob, "must be in [0, 1]")
        check_field(self.max_spec_factor >= 0, "max_spec_factor", self.max_spec_factor, "must be >= 0")
        check_field(self.max_cached_requests >= -1, "max_cached_requests", self.max_cached_requests, "must be >= -1")


class SuffixDecodingDrafter:
    """Implements the replay's ``Drafter`` protocol (same calls as ``SuffixDrafter``)."""

    def __init__(self, config: SuffixDecodingConfig = SuffixDecodingConfig()):
        from das_sglang.native import SuffixIndex, draft_batch  # deferred: replay imports without the build

        self._SuffixIndex, self._draft_batch = SuffixIndex, draft_batch
        self.config = config
        self._global = SuffixIndex(config.max_depth)
        self._cached: OrderedDict[str, int] = OrderedDict()  # req_id -> global seq_id, FIFO order
        self._local: dict[str, object] = {}  # live req_id -> its own prompt+response index
        self._next_seq = 0

    # --- history and lifecycle -------------------------------------------------------------

    def advance_step(self, step: int) -> None:
        pass  # FIFO history: nothing is evicted or down-weighted by age

    def start_request(self, req_id: str, problem_id: str, prompt_tokens: np.ndarray) -> None:
        if req_id in self._local:
            raise ValueError(f"request {req_id!r} is already active")
        prompt = np.asarray(prompt_tokens, np.int32)
        local = self._SuffixIndex(self.config.max_depth)
        local.add_sequence(0, prompt, _STEP)
        self._local[req_id] = local
        self._cache(req_id, np.zeros(0, np.int32))

    def extend_request(self, req_id: str, tokens: np.ndarray) -> None:
        toks = np.asarray(tokens, np.int32)
        self._local_of(req_id).extend(0, toks)
        if req_id in self._cached:  # may have been evicted while live
            self._global.extend(self._cached[req_id], toks)

    def finish_request(self, req_id: str, keep: bool = True) -> None:
        self._local_of(req_id)
        del self._local[req_id]
        if not keep and req_id in self._cached:
            self._global.remove_sequence(self._cached.pop(req_id))

    # --- drafting ---------------------------------------------------------------------------

    def speculate(self, req_id: str, budget: int) -> DraftTree:
        return self.speculate_batch([req_id], [budget])[0]

    def speculate_batch(self, req_ids: Sequence[str], budgets: Sequence[int]) -> list[DraftTree]:
        """Like ArcticInference: for each index (own, then global) and each match length from
        the longest down, draft at most ``min(budget, factor * match + offset)`` nodes; keep
        the best score (ties keep the earlier candidate). Batched: one native call per
        (index, match length) for the rows that can still match that long."""
        n = len(req_ids)
        cap = np.minimum(np.asarray(budgets, np.int64), self.config.max_budget).astype(np.int32)
        best = _Best(n)
        self._scan(best, [self._local_of(r) for r in req_ids], np.zeros(n, np.int64), cap, np.arange(n))
        rows = np.array([i for i, r in enumerate(req_ids) if r in self._cached], np.int64)
        if len(rows):
            seqs = np.array([self._cached[req_ids[i]] for i in rows], np.int64)
            self._scan(best, [self._global] * len(rows), seqs, cap[rows], rows)
        return best.trees()

    def _scan(self, best: "_Best", indices: list, seq_ids: np.ndarray, cap: np.ndarray, rows: np.ndarray) -> None:
        """Try the match lengths longest first. A shorter suffix of a match always matches
        too, so after the first call only rows whose longest match exceeds ``m`` are asked
        again (asking the others would return the same draft)."""
        longest = None
        for m in self._match_lengths():
            pick = np.arange(len(rows)) if longest is None else np.flatnonzero(longest > m)
            if len(pick) == 0:
                break
            got = self._draft([indices[i] for i in pick.tolist()], seq_ids[pick], cap[pick], m)
            if longest is None:
                longest = got[4].astype(np.int64)
            best.consider(got, rows[pick])

    def _match_lengths(self) -> list[int]:
        top = self.config.max_depth - 1  # a match as deep as the index leaves nothing to draft
        if self.config.match_lengths is None:
            return list(range(top, 0, -1))
        return [top] + sorted((m for m in set(self.config.match_lengths) if m < top), reverse=True)

    def _draft(self, indices: list, seq_ids: np.ndarray, cap: np.ndarray, max_match: int):
        cfg = self.config
        tokens, parents, probs, offsets, match = self._draft_batch(
            indices, seq_ids, cap, cfg.min_token_prob, _STEPS, _WEIGHTS, not cfg.tree, max_match)
        limit = np.floor(match * cfg.max_spec_factor + cfg.max_spec_offset + 1e-6).astype(np.int64)
        count = np.minimum(np.minimum(np.diff(offsets), limit), cap)
        return tokens, parents, probs, offsets, match, count

    # --- internals --------------------------------------------------------------------------

    def _local_of(self, req_id: str):
        try:
            return self._local[req_id]
        except KeyError:
            raise ValueError(f"request {req_id!r} is not active") from None

    def _cache(self, key: str, tokens: np.ndarray) -> None:
        cap = self.config.max_cached_requests
        if cap == 0:
            return
        seq = self._next_seq
        self._next_seq += 1
        self._global.add_sequence(seq, tokens, _STEP)
        self._cached[key] = seq
        while cap > 0 and len(self._cached) > cap:
            _, old = self._cached.popitem(last=False)
            self._global.remove_sequence(old)

    def stats(self) -> dict[str, int]:
        return {"global_sequences": len(self._cached), "global_nodes": int(self._global.num_nodes)}
