"""CUDA-graph buckets: LengthAware with uniform widths emits bucket widths only, prices the
padding (and graph vs eager tiers), and loses little modeled time against free widths."""

import numpy as np
import pytest

from das_sglang.core.allocation import bucket_charges, lookahead_step_budgets
from das_sglang.core.config import DrafterConfig
from das_sglang.core.cost_model import CostModel
from das_sglang.core.drafter import SuffixDrafter
from das_sglang.core.policy import LengthAware, PolicyConfig
from das_sglang.replay.datasets import Rollout
from das_sglang.replay.simulator import Contender, replay

BUCKETS = (0, 1, 2, 4, 8, 16)
COST = CostModel.preset("h100-7b")


class Recording(LengthAware):
    widths: list

    def plan(self, rows):
        out = super().plan(rows)
        self.widths.append(out.width)
        return out


def _rollouts(seed=0, problems=6, per_step=8, length=300):
    """Siblings are mutated copies of one text per problem, so drafts are partly right."""
    rng = np.random.default_rng(seed)
    out = []
    for p in range(problems):
        base = rng.integers(0, 500, length)
        for step in (0, 1):
            for k in range(per_step):
                text = base.copy()
                hit = rng.random(length) < 0.08
                text[hit] = rng.integers(0, 500, int(hit.sum()))
                n = int(length * rng.uniform(0.3, 1.0))
                out.append(Rollout(f"s{step}-p{p}-{k}", f"p{p}", step, np.array([7, p], np.int32),
                                   text[:n].astype(np.int32), 4096, False))
    return out


def _contender(buckets, seen):
    cfg = PolicyConfig(max_budget=16, uniform_width=True, width_buckets=buckets)

    def make():
        pol = Recording(COST, cfg)
        pol.widths = seen
        return pol

    # Per-problem indexes: these problems share no text (the shared index would only add
    # other problems' noise); the subject here is the policy's widths, not the drafter.
    return Contender("das", make, lambda: SuffixDrafter(DrafterConfig(max_budget=16, global_shard=False)),
                     max_budget=16)


def test_bucketed_replay_widths_and_makespan_within_3_percent():
    rollouts = _rollouts()
    seen_b, seen_f = [], []
    bucketed, free = replay(rollouts, [_contender(BUCKETS, seen_b), _contender(None, seen_f)], COST,
                            "uniform", decode_steps=[1])
    assert set(seen_b) <= set(BUCKETS) and max(seen_b) > 0
    assert bucketed.total("makespan_s") == pytest.approx(free.total("makespan_s"), rel=0.03)
    if set(seen_f) - set(BUCKETS):  # the free policy did use other widths: buckets bound it
        assert bucketed.total("makespan_s") >= free.total("makespan_s") * 0.97


def test_padding_and_tiers_are_priced():
    charged, extra = bucket_charges(BUCKETS, 18, COST)
    assert charged.tolist() == [0, 1, 2, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 17]
    assert not extra.any()  # no tiers: padding only
    tiers = CostModel(COST.c_base_s, COST.c_tok_s, graph_widths=(0, 4), graph_extra_s=(0.0, 0.0),
                      eager_widths=(0, 16), eager_extra_s=(0.02, 0.02))
    # A row that gains a lot from 5+ tokens: free widths would pick 5, buckets pay for 8
    # (padding) and, with tiers, an eager width pays 20 ms more than the graph width 4.
    acc = np.concatenate([[0.0], np.linspace(0.9, 6.0, 16)])[None, :]
    m = np.array([16])
    args = (np.array([1e5]), (acc, m), np.array([1000.0]))
    free = lookahead_step_budgets(*args, COST, True, 0.05, None)
    bucketed = lookahead_step_budgets(*args, COST, True, 0.05, BUCKETS)
    tiered = lookahead_step_budgets(*args, tiers, True, 0.05, BUCKETS)
    assert free.width == bucketed.width == 16  # worth it, padding or not
    assert tiered.width == 4  # 8 and 16 are eager here: 20 ms a forward


def test_replay_scores_with_a_table_and_adds_host_time(tmp_path):
    from das_sglang.cli.replay import _scorer
    from das_sglang.core.cost_model import CostTable

    rollouts = _rollouts(seed=1, problems=3, per_step=4, length=120)
    table = CostTable.roofline("h100", "7b")
    linear, scored, timed = (
        replay(rollouts, [_contender(BUCKETS, [])], COST, "uniform", decode_steps=[1], score=score,
               host_time=host)[0]
        for score, host in ((None, False), (table, False), (table, True)))
    # same decisions (the policy plans with the linear model either way), other prices
    assert scored.total("forward_passes") == linear.total("forward_passes")
    assert scored.total("makespan_s") != pytest.approx(linear.total("makespan_s"), rel=1e-3)
    assert timed.total("host_s") > 0
    assert timed.total("makespan_s") == pytest.approx(
        scored.total("makespan_s") + timed.total("host_s"), rel=0.05)
    # a measured table (fit_cost_model.py's CSV) scores as written
    csv = tmp_path / "t.csv"
    csv.write_text("batch,tokens_per_request,cuda_graph,ms\n1,1,1,5\n100,1,1,15\n1,3,1,6\n100,3,1,25\n")
    t = _scorer(str(csv), COST)
    assert t.step_time(50, 0) == pytest.approx(0.005 + 0.010 * 49 / 99)
    assert t.step_time(50, 1) == pytest.approx((5 + 10 * 49 / 99 + 6 + 19 * 49 / 99) / 2 * 1e-3)
    assert _scorer("linear", COST) is None and _scorer("table", COST).name.startswith("roofline-table")
    with pytest.raises(ValueError, match="nope.csv"):
        _scorer("nope.csv", COST)


def test_ragged_verify_is_scored_per_request_not_per_token():
    """A cost table scores a ragged verify of R requests submitting T tokens as a graph
    forward at T / R tokens per request: each request's KV is read once (scoring it as T
    one-token decode rows would read the context of every draft token)."""
    from das_sglang.core.cost_model import CostTable

    t = CostTable.roofline("h100", "32b")
    for rows, width in ((8, 4), (64, 8), (256, 16)):
        tokens = rows * (1 + width)
        assert t.ragged_time(rows, tokens) == pytest.approx(t.step_time(rows, width))
        assert t.ragged_time(rows, tokens) < t.forward_time(tokens)
    # between two tiers: between their times; no drafts at all: plain decode
    mid = t.ragged_time(512, 512 * 3 + 256)
    assert t.ragged_time(512, 512 * 3) < mid < t.ragged_time(512, 512 * 5)
    assert t.ragged_time(64, 64) == pytest.approx(t.forward_time(64))


def test_stock_graphs_charge_only_the_captured_width_as_a_graph():
    """``--graphs stock`` (the default): SGLang 0.5.23 captures a speculative target's
    verify graphs at one width (speculative_num_draft_tokens = max budget + 1), so only a
    batch verifying exactly that width replays one; narrower widths, a step without drafts
    and ragged steps run eagerly. ``buckets``: the table's graph rows everywhere."""
    from das_sglang.core.cost_model import CostTable
    from das_sglang.replay.simulator import _Scorer

    t = CostTable.roofline("h100", "7b")
    stock = _Scorer(t, False, "stock", captured=16)
    buckets = _Scorer(t, False, "buckets", captured=16)
    rows = 64
    graph = lambda w: t.mode_time(True, rows, 1 + w)  # noqa: E731
    eager = lambda w: t.mode_time(False, rows, 1 + w)  # noqa: E731
    assert eager(4) > graph(4)  # the table's eager tier costs more
    # uniform engine, full captured width: the graph
    assert stock.verify_time("uniform", rows, 16, rows * 17, 0) == pytest.approx(graph(16))
    # narrower uniform widths and a 1-token verify (no drafts): eager
    assert stock.verify_time("uniform", rows, 4, rows * 5, 0) == pytest.approx(eager(4))
    assert stock.verify_time("uniform", rows, 0, rows, 0) == pytest.approx(eager(0))
    # ragged: eager at the mean tokens per request, unless every row verifies full width
    assert stock.verify_time("ragged", rows, 16, rows * 3, 0) == pytest.approx(t.mode_time(False, rows, 3))
    assert stock.verify_time("ragged", rows, 16, rows * 17, 0) == pytest.approx(graph(16))
    # buckets: as before (graph rows at every bucket width, ragged from graphs)
    assert buckets.verify_time("uniform", rows, 4, rows * 5, 0) == pytest.approx(t.step_time(rows, 4))
    assert buckets.verify_time("ragged", rows, 16, rows * 3, 0) == pytest.approx(t.ragged_time(rows, rows * 3))
    with pytest.raises(ValueError, match="graphs='nope'"):
        _Scorer(t, False, "nope")


def test_replay_stock_graphs_cost_speculation_more_and_plain_decode_the_same():
    from das_sglang.core.cost_model import CostTable

    rollouts = _rollouts(seed=2, problems=3, per_step=4, length=120)
    table = CostTable.roofline("h100", "7b")
    none = Contender("none", lambda: Recording(COST, PolicyConfig()), None, 0)
    res = {g: replay(rollouts, [_contender(BUCKETS, []), none], COST, "ragged", decode_steps=[1],
                     score=table, graphs=g) for g in ("stock", "buckets")}
    das = {g: r[0] for g, r in res.items()}
    plain = {g: r[1] for g, r in res.items()}
    # the same decisions (the policy plans with the linear model), other prices
    assert das["stock"].total("forward_passes") == das["buckets"].total("forward_passes")
    assert das["stock"].total("makespan_s") > das["buckets"].total("makespan_s")
    # no speculation replays SGLang's decode graph either way
    assert plain["stock"].total("makespan_s") == pytest.approx(plain["buckets"].total("makespan_s"))


def test_replay_follows_the_worker_to_the_graph_width_when_eager_verifies_cost_more():
    """Scored with a table like the first GPU kit run's (an eager verify ~35 ms at any
    width, a replayed graph at the full width 4-11 ms): ``das-graphs`` (the worker on the
    uniform layout, planning with the tiers it measures, core.graph_tiers) pads the batch
    out to the captured width, and DAS on the ragged engine sends its steps to the graph
    (the worker's ``prefer_graph``): both pay graph prices, not eager ones."""
    from das_sglang.core.cost_model import CostTable
    from das_sglang.replay.contenders import build_contenders
    from das_sglang.replay.simulator import _Scorer, plan_with_graph_tiers

    rows = [(b, t, 0, 35.0) for b in (1, 8, 64, 256) for t in range(1, 18)]
    rows += [(b, 17, 1, 4.0 + 0.03 * b * 17 / 16) for b in (1, 8, 64, 256)]
    table = CostTable(rows, name="kit-like")
    rollouts = _rollouts(seed=3, problems=4, per_step=6, length=200)
    das, graphs = build_contenders(["das", "das-graphs"], COST,
                                   drafter=DrafterConfig(max_budget=16, global_shard=False))
    assert graphs.engine == "uniform" and das.engine is None
    policy = graphs.make_policy()
    plan_with_graph_tiers(policy, _Scorer(table, False, "stock", captured=16), 16)
    assert policy.cost.graph_widths == (16,)
    assert policy.cost.width_extra_s(4) - policy.cost.width_extra_s(16) > 0.025
    ragged, tiered = replay(rollouts, [das, graphs], COST, "ragged", decode_steps=[1], score=table,
                            graphs="stock")
    assert tiered.total("padded_tokens") > 0
    for r in (ragged, tiered):
        assert r.total("makespan_s") / r.total("forward_passes") < 0.015  # graph, not 35 ms eager
    # without a graph / eager split (a linear scorer) nothing changes: the same run as DAS
    # on the uniform engine
    from dataclasses import replace

    (uniform,) = build_contenders(["das"], COST, engine="uniform",
                                  drafter=DrafterConfig(max_budget=16, global_shard=False))
    lin = replay(rollouts, [replace(uniform, engine="uniform"), graphs], COST, "ragged", decode_steps=[1])
    assert lin[0].total("makespan_s") == pytest.approx(lin[1].total("makespan_s"))
