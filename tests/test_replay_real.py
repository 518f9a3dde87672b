"""Trace replay with the real drafters (native index) and policies, on hand-made rollouts
whose answers are known: unique tokens everywhere, so a draft is right only when it copies
an identical earlier rollout."""

from __future__ import annotations

import math

import numpy as np
import pytest

from das_sglang.core.config import DrafterConfig
from das_sglang.core.cost_model import CostModel
from das_sglang.core.drafter import SuffixDrafter
from das_sglang.core.policy import FixedBudget
from das_sglang.replay.baselines import SuffixDecodingConfig, SuffixDecodingDrafter
from das_sglang.replay.contenders import CONTENDER_NAMES, _das_drafter, build_contenders
from das_sglang.replay.datasets import Rollout
from das_sglang.replay.report import run_summary
from das_sglang.replay.simulator import Contender, replay

COST = CostModel(c_base_s=0.01, c_tok_s=1e-4)
L = 30


def text(problem: int, n: int = L) -> np.ndarray:
    """Problem ``problem``'s response: tokens no other problem (or prompt) uses."""
    return np.arange(1000 * (problem + 1), 1000 * (problem + 1) + n, dtype=np.int32)


def rollout(rid: str, problem: int, step: int, n: int = L) -> Rollout:
    prompt = np.array([10 * problem + 1, 10 * problem + 2, 10 * problem + 3], np.int32)
    return Rollout(rid, f"p{problem}", step, prompt, text(problem, n), 4096, False)


def fixed(name: str, k: int, make_drafter) -> Contender:
    return Contender(name, lambda: FixedBudget(k), make_drafter, max_budget=k)


class TestNoHistory:
    def test_every_contender_produces_one_token_per_step(self):
        rs = [rollout("a", 0, 0), rollout("b", 1, 0, 12)]
        results = replay(rs, build_contenders(CONTENDER_NAMES, COST, "uniform"), COST, "uniform")
        for r in results:
            assert r.tokens_per_step == 1.0, r.name
            assert r.total("forward_passes") == L, r.name
        p = run_summary(results, {})["policies"]
        assert all(v["makespan_ratio_vs_none"] == pytest.approx(1.0) for v in p.values())


class TestIdenticalSiblings:
    """Step 0 holds one rollout; step 1 decodes three identical siblings of it."""

    def rollouts(self):
        return [rollout("h", 0, 0)] + [rollout(f"s{i}", 0, 1) for i in range(3)]

    @pytest.mark.parametrize("k", [1, 4, 9])
    def test_das_drafter_accepts_every_draft(self, k):
        (res,) = replay(self.rollouts(), [fixed("das", k, SuffixDrafter)], COST, "ragged", [1])
        (s,) = res.steps
        passes = math.ceil(L / (k + 1))  # the shared prompt already matches history
        assert s.forward_passes == passes
        assert s.draft_accepted == 3 * (L - passes)
        assert s.draft_proposed == s.draft_accepted  # exact history: nothing wasted
        assert s.tokens_per_step == pytest.approx(L / passes)

    def test_suffix_decoding_drafts_grow_with_the_match(self):
        """Global index = responses only; draft <= match length and match + draft <= 24.
        Passes produce 1, 2, 4, 8, 13 (12 drafts at match 12: the best score), then the last 2."""
        (res,) = replay(self.rollouts(), [fixed("sd", 32, SuffixDecodingDrafter)], COST, "ragged", [1])
        (s,) = res.steps
        assert s.forward_passes == 6
        assert s.batch_sizes.tolist() == [3] * 6
        assert s.draft_accepted == 3 * (L - 6)

    def test_history_of_another_problem_helps_only_a_shared_index(self):
        rs = [rollout("h", 0, 0), rollout("t", 0, 1)]
        rs[1] = Rollout("t", "other", 1, rs[1].prompt_ids, rs[1].response_ids, 4096, False)
        per = fixed("per", 4, lambda: SuffixDrafter(DrafterConfig(global_shard=False)))
        glob = Contender("glob", lambda: FixedBudget(4), SuffixDrafter, 4, shared_problem=True)
        mixed = fixed("mixed", 4, SuffixDrafter)  # the default: own index + the shared index
        r_per, r_glob, r_mixed = replay(rs, [per, glob, mixed], COST, "ragged", [1])
        assert r_per.tokens_per_step == 1.0
        assert r_glob.tokens_per_step == pytest.approx(5.0)
        assert r_mixed.tokens_per_step == pytest.approx(5.0)


class TestWindow:
    def test_history_older_than_the_window_is_forgotten_unless_no_window(self):
        window = DrafterConfig().window_steps
        rs = [rollout("old", 0, 0), rollout("new", 0, window + 2)]
        das = fixed("das", 4, _das_drafter(DrafterConfig()))
        keep_all = fixed("all", 4, _das_drafter(DrafterConfig(), all_history=True))
        r_das, r_all = replay(rs, [das, keep_all], COST, "ragged", [window + 2])
        assert r_das.tokens_per_step == 1.0
        assert r_all.tokens_per_step == pytest.approx(5.0)


class TestSuffixDecodingDrafter:
    def test_fifo_keeps_the_newest_responses(self):
        d = SuffixDecodingDrafter(SuffixDecodingConfig(max_cached_requests=2))
        for i in range(3):
            d.start_request(f"r{i}", "p", np.array([1, 2], np.int32))
            d.extend_request(f"r{i}", text(i, 5))
            d.finish_request(f"r{i}")
        assert d.stats()["global_sequences"] == 2
        d.start_request("q", "p", np.array([7], np.int32))
        d.extend_request("q", text(0, 2))  # r0 was evicted: nothing to copy
        assert len(d.speculate("q", 8)) == 0
        d.extend_request("q", text(2, 2))
        assert d.speculate("q", 8).tokens.tolist() == text(2, 4)[2:4].tolist()  # match 2 -> 2 drafts

    def test_unknown_request_and_bad_config(self):
        d = SuffixDecodingDrafter()
        with pytest.raises(ValueError, match="request 'nope' is not active"):
            d.speculate("nope", 4)
        with pytest.raises(ValueError, match="min_token_prob"):
            SuffixDecodingConfig(min_token_prob=2.0)

    def test_unknown_contender_name(self):
        with pytest.raises(ValueError, match=r"unknown policies \['fast'\]"):
            build_contenders(["none", "fast"], COST)
