"""The lockstep simulator's bookkeeping, with a transparent drafter and policy whose answers
are known by hand (the real drafter and policies are exercised in test_replay_real.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from das_sglang.core.draft_tree import DraftTree
from das_sglang.replay.datasets import Rollout
from das_sglang.replay.report import run_summary
from das_sglang.replay.simulator import Contender, replay



class LinearCost:
    """``t = 1 + 0.1 * tokens``: easy to add up by hand (same form as core.cost_model)."""

    def forward_time(self, n_tokens, kv_tokens=0):
        return 1.0 + 0.1 * np.asarray(n_tokens, np.float64)


COST = LinearCost()
PROMPT = np.array([1, 2, 3], np.int32)


def rollout(rid: str, pid: str, step: int, response, cap: bool = False) -> Rollout:
    resp = np.asarray(response, np.int32)
    return Rollout(rid, pid, step, PROMPT, resp, 1000, cap)


class ExactDrafter:
    """Finished sequences of the same problem; drafts the chain that followed the longest
    earlier occurrence of the request's last token (tokens in tests are unique per text)."""

    def __init__(self):
        self.done: dict[str, list[np.ndarray]] = {}
        self.live: dict[str, tuple[str, list[int]]] = {}
        self.calls: list[tuple[str, ...]] = []

    def advance_step(self, step):
        self.calls.append(("advance", step))

    def start_request(self, req_id, problem_id, prompt_tokens):
        self.live[req_id] = (problem_id, list(prompt_tokens))

    def extend_request(self, req_id, tokens):
        self.live[req_id][1].extend(int(t) for t in tokens)

    def finish_request(self, req_id, keep=True):
        pid, seq = self.live.pop(req_id)
        if keep:
            self.done.setdefault(pid, []).append(np.array(seq))

    def speculate_batch(self, req_ids, budgets):
        return [self._one(r, b) for r, b in zip(req_ids, budgets)]

    def _one(self, req_id, budget):
        pid, seq = self.live[req_id]
        for hist in self.done.get(pid, []):
            where = np.flatnonzero(hist == seq[-1])
            if len(where) and len(seq) >= 2 and where[-1] > 0 and hist[where[-1] - 1] == seq[-2]:
                return DraftTree.chain(hist[where[-1] + 1 : where[-1] + 1 + budget].tolist())
        return DraftTree.empty()


@dataclass(frozen=True)
class Plan:
    budgets: np.ndarray
    width: int


class Fixed:
    """FixedBudget stand-in: every row gets ``k`` (capped by its tree), width = max budget."""

    def __init__(self, k: int):
        self.k, self.verified, self.finished = k, [], []

    def plan(self, rows):
        b = np.array([min(self.k, len(r.node_probs)) for r in rows], np.int32)
        return Plan(b, int(b.max(initial=0)))

    def observe_verify(self, problem_id, proposed, accepted):
        self.verified.append((problem_id, proposed, accepted))

    def observe_finished(self, problem_id, length):
        self.finished.append((problem_id, length))

    def advance_step(self, step):
        pass


def contender(name: str, k: int, drafter=ExactDrafter) -> Contender:
    return Contender(name, lambda: Fixed(k), drafter, max_budget=k)


NONE = Contender("none", lambda: Fixed(0), None, max_budget=0)
UNIQUE = list(range(100, 130))  # 30 tokens, none repeated


class TestNoHistory:
    def test_tokens_per_step_is_one(self):
        rs = [rollout("a", "p", 0, UNIQUE), rollout("b", "q", 0, UNIQUE[:10])]
        none, spec = replay(rs, [NONE, contender("spec", 4)], COST, "ragged")
        for res in (none, spec):
            (s,) = res.steps
            assert s.tokens_per_step == 1.0
            assert s.forward_passes == 30 and s.generated_tokens == 40
        assert spec.steps[0].makespan_s == pytest.approx(none.steps[0].makespan_s)

    def test_plain_closed_form_matches_hand_count(self):
        rs = [rollout("a", "p", 0, UNIQUE), rollout("b", "q", 0, UNIQUE[:10])]
        (res,) = replay(rs, [NONE], COST, "uniform")
        s = res.steps[0]
        # 10 passes with 2 rows, 20 with 1 row
        assert s.makespan_s == pytest.approx(10 * (1 + 0.2) + 20 * (1 + 0.1))
        assert s.batch_sizes.tolist() == [2] * 10 + [1] * 20

    def test_closed_form_equals_the_loop_with_kv_cost(self):
        """``none`` skips the per-iteration loop; with zero budgets the loop must agree,
        KV-cache term included (prompt + tokens so far of every active request)."""

        class KvCost:
            def forward_time(self, n_tokens, kv_tokens=0):
                return 1.0 + 0.1 * n_tokens + 0.01 * kv_tokens

        rs = [rollout("a", "p", 0, UNIQUE), rollout("b", "q", 0, UNIQUE[:7]), rollout("c", "q", 0, UNIQUE[:1])]
        plain, loop = replay(rs, [NONE, contender("zero", 0)], KvCost(), "uniform")
        assert loop.steps[0].draft_proposed == 0
        assert plain.steps[0].makespan_s == pytest.approx(loop.steps[0].makespan_s)
        assert plain.steps[0].batch_sizes.tolist() == loop.steps[0].batch_sizes.tolist()
        kv0 = 3 * len(PROMPT)
        assert plain.steps[0].makespan_s > 30 + 0.1 * 38 + 0.01 * kv0  # the KV term is charged


class TestIdenticalSiblingHistory:
    """Step 0 = history; step 1 repeats it exactly, so every draft of budget k is accepted."""

    @pytest.mark.parametrize("k", [1, 4, 7])
    def test_known_accepted_lengths(self, k):
        rs = [rollout("h", "p", 0, UNIQUE)] + [rollout(f"s{i}", "p", 1, UNIQUE) for i in range(3)]
        (res,) = replay(rs, [contender("spec", k)], COST, "ragged", decode_steps=[1])
        (s,) = res.steps
        # the shared prompt matches history, so every pass yields k drafts + the bonus token
        passes = math.ceil(len(UNIQUE) / (k + 1))
        assert s.forward_passes == passes
        assert s.generated_tokens == 3 * len(UNIQUE)
        assert s.draft_accepted == 3 * (len(UNIQUE) - passes)
        assert s.tokens_per_step == pytest.approx(len(UNIQUE) / passes)

    def test_bonus_token_never_runs_past_the_response(self):
        rs = [rollout("h", "p", 0, UNIQUE), rollout("s", "p", 1, UNIQUE[:5])]
        (res,) = replay(rs, [contender("spec", 8)], COST, "ragged", decode_steps=[1])
        s = res.steps[0]
        assert s.generated_tokens == 5
        assert s.forward_passes == 1  # 8 drafts all match, but only 4 + the bonus token fit
        assert (s.draft_proposed, s.draft_accepted, s.draft_wasted) == (8, 4, 4)

    def test_uniform_engine_pays_for_padding(self):
        rs = [rollout("h", "p", 0, UNIQUE), rollout("s", "p", 1, UNIQUE), rollout("t", "q", 1, UNIQUE)]
        ragged, = replay(rs, [contender("spec", 4)], COST, "ragged", decode_steps=[1])
        uniform, = replay(rs, [contender("spec", 4)], COST, "uniform", decode_steps=[1])
        r, u = ragged.steps[0], uniform.steps[0]
        assert r.forward_passes == u.forward_passes  # same acceptance...
        assert u.padded_tokens > 0 == r.padded_tokens
        assert u.makespan_s == pytest.approx(r.makespan_s + 0.1 * u.padded_tokens)  # ...more tokens

    def test_default_engine_is_ragged_like_the_worker(self):
        rs = [rollout("h", "p", 0, UNIQUE), rollout("s", "p", 1, UNIQUE), rollout("t", "q", 1, UNIQUE)]
        default, = replay(rs, [contender("spec", 4)], COST, decode_steps=[1])
        ragged, = replay(rs, [contender("spec", 4)], COST, "ragged", decode_steps=[1])
        assert default.steps[0].padded_tokens == 0
        assert default.steps[0].makespan_s == pytest.approx(ragged.steps[0].makespan_s)


class TestLifecycle:
    def test_history_steps_only_feed_history(self):
        d = ExactDrafter()
        rs = [rollout("h", "p", 0, UNIQUE), rollout("s", "p", 1, UNIQUE[:4]), rollout("x", "p", 2, UNIQUE[:3])]
        (res,) = replay(rs, [Contender("spec", lambda: Fixed(2), lambda: d, 2)], COST, decode_steps=[1])
        assert [s.step for s in res.steps] == [1]  # step 2 comes after the last decoded step
        assert ("advance", 0) in d.calls and ("advance", 2) not in d.calls
        assert [len(x) for x in d.done["p"]] == [33, 7]  # prompt + response, both kept
        assert not d.live

    def test_policy_hears_every_verify_and_finish(self):
        pol = Fixed(3)
        rs = [rollout("h", "p", 0, UNIQUE), rollout("s", "p", 1, UNIQUE)]
        (res,) = replay(rs, [Contender("spec", lambda: pol, ExactDrafter, 3)], COST, decode_steps=[1])
        assert len(pol.verified) == res.steps[0].verify_steps
        assert sum(a for _, _, a in pol.verified) == res.steps[0].draft_accepted
        assert pol.finished == [("p", 30), ("p", 30)]  # history rollout, then the decoded one

    def test_shared_problem_pools_all_problems(self):
        rs = [rollout("h", "p", 0, UNIQUE), rollout("s", "q", 1, UNIQUE)]
        per, = replay(rs, [contender("per", 4)], COST, decode_steps=[1])
        glob, = replay(rs, [Contender("glob", lambda: Fixed(4), ExactDrafter, 4, shared_problem=True)],
                       COST, decode_steps=[1])
        assert per.tokens_per_step == 1.0 < glob.tokens_per_step


class TestInputsAndReport:
    def test_bad_engine_and_steps(self):
        rs = [rollout("a", "p", 0, UNIQUE)]
        with pytest.raises(ValueError, match="engine='gpu'"):
            replay(rs, [NONE], COST, "gpu")
        with pytest.raises(ValueError, match=r"steps \[3\] have no rollouts"):
            replay(rs, [NONE], COST, decode_steps=[3])
        with pytest.raises(ValueError, match="no rollouts"):
            replay([], [NONE], COST)

    def test_progress_starts_at_zero_and_ends_at_the_total(self):
        calls = []
        rs = [rollout("h", "p", 0, UNIQUE), rollout("s", "p", 1, UNIQUE), rollout("t", "p", 2, UNIQUE[:9])]
        replay(rs, [NONE, contender("spec", 1)], COST, decode_steps=[1, 2], on_progress=lambda *a: calls.append(a))
        for name in ("none", "spec"):
            done = [d for n, d, _ in calls if n == name]
            assert done[0] == 0 and done[-1] == 39 and done == sorted(done)

    def test_summary_ratios(self):
        rs = [rollout("h", "p", 0, UNIQUE), rollout("s", "p", 1, UNIQUE)]
        results = replay(rs, [NONE, contender("spec", 4)], COST, "ragged", decode_steps=[1])
        run = run_summary(results, {"variant": "x"})
        p = run["policies"]
        assert p["none"]["makespan_ratio_vs_none"] == 1.0
        assert p["spec"]["makespan_ratio_vs_none"] == pytest.approx(
            p["spec"]["makespan_s"] / p["none"]["makespan_s"])
        assert p["spec"]["makespan_ratio_vs_none"] < 1.0
        assert set(p["spec"]) >= {"tokens_per_step", "forward_passes", "makespan_s", "makespan_ratio_vs_none"}
        # every verify step yields exactly one bonus token on top of the accepted drafts
        assert p["spec"]["accepted_drafts_per_step"] == pytest.approx(p["spec"]["tokens_per_step"] - 1)


@pytest.mark.parametrize("engine,uniform_width", [("ragged", False), ("uniform", True),
                                                  ("ragged-width", True)])
def test_engines_plan_budgets_like_the_worker(engine, uniform_width):
    """As the SGLang worker (options.for_layout): ragged plans per-request budgets priced
    by their own tokens, uniform one padded batch width; ragged-width verifies the
    batch-width budgets ragged."""
    from das_sglang.core.cost_model import CostModel
    from das_sglang.replay.contenders import build_contenders

    (das,) = build_contenders(["das"], CostModel.preset("h100-7b"), engine)
    assert das.make_policy().config.uniform_width is uniform_width
