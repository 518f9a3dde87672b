"""Lockstep trace replay: what would speculation have done on these recorded rollouts?

With greedy (or seeded) sampling a draft token is accepted iff it equals the token the target
model actually produced, so replaying recorded responses through the real drafter and policy
measures acceptance exactly, on any CPU; only the forward-pass *time* is modelled (by the cost
model, ``t = c_base + c_tok * n_tokens``).

One training step at a time, all its requests decode together, as an RL rollout batch does.
Each decode iteration:

1. the drafter proposes a max-budget tree per active request;
2. the policy turns those trees' node probabilities into per-request budgets;
3. each tree is cut to its budget; accepted = longest tree path equal to the recorded
   continuation, plus the bonus token (never past the end of the recorded response);
4. the accepted tokens are fed back (drafter, policy) and the forward pass is charged
   ``cost.forward_time(tokens)``, where tokens = one per request plus its drafts, padded to
   the batch width for engines that verify one width per batch (``uniform``). Engines:

   - ``ragged`` (default): what the SGLang worker does where its attention backend verifies
     ragged (FlashInfer; torch_native in CPU mode): per-request budgets priced by the
     tokens each request submits (``policy.uniform_width`` false, which the worker sets
     from its layout), each request verifying only its own nodes;
   - ``uniform``: one batch width planned with the padding paid, every request padded to
     it (the worker on backends without ragged verify: Triton, FA3, ...);
   - ``ragged-width``: the batch-width budgets of ``uniform``, verified ragged (the worker
     on a ragged backend with ``policy.uniform_width`` true configured).

Finished requests leave the batch; their rollouts stay in the drafter as history of the step.
Steps before the first replayed step only feed history (start, extend, finish; no verify).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from das_sglang.core.draft_tree import DraftBatch, DraftTree
from das_sglang.replay.datasets import Rollout

ENGINES = ("uniform", "ragged", "ragged-width")
DEFAULT_ENGINE = "ragged"  # what the SGLang worker verifies with where it can (sglang/ragged.py)
# Which verify forwards a cost table charges as CUDA graphs (_Scorer): SGLang 0.5.23 as it
# ships (one captured verify width), or a graph at every bucket width.
GRAPHS = ("stock", "buckets")
DEFAULT_GRAPHS = "stock"
SHARED_PROBLEM = "*all*"  # problem id the "global index" ablation gives every rollout


class Drafter(Protocol):
    def advance_step(self, step: int) -> None: ...
    def start_request(self, req_id: str, problem_id: str, prompt_tokens: np.ndarray) -> None: ...
    def extend_request(self, req_id: str, tokens: np.ndarray) -> None: ...
    def finish_request(self, req_id: str, keep: bool = True) -> None: ...
    def speculate_batch(self, req_ids: Sequence[str], budgets: Sequence[int]) -> list[DraftTree]: ...


class Budget(Protocol):
    """``das_sglang.core.policy.DraftBudget`` (restated so the replay depends on behaviour only)."""

    def plan(self, rows): ...
    def observe_verify(self, problem_id: str, proposed: int, accepted: int) -> None: ...
    def observe_finished(self, problem_id: str, length: int) -> None: ...
    def advance_step(self, step: int) -> None: ...


class ForwardCost(Protocol):
    def forward_time(self, n_tokens: int, kv_tokens: int = 0) -> float: ...


@dataclass(frozen=True)
class Contender:
    """One way of decoding, compared against the others in a replay.

    ``make_drafter=None`` decodes without speculation (and without asking the policy).
    ``shared_problem`` hands the drafter one problem id for every rollout: one global index
    instead of one per problem (an ablation); the policy still sees the real problem ids.
    """

    name: str
    make_policy: Callable[[], Budget]
    make_drafter: Callable[[], Drafter] | None = None
    max_budget: int = 32
    shared_problem: bool = False
    description: str = ""
    # Decode on this engine whatever the run's (``das-graphs``: the uniform layout).
    engine: str | None = None


@dataclass
class StepStats:
    """One training step of one contender. Token counts exclude the bonus token unless named."""

    step: int
    requests: int
    forward_passes: int = 0
    makespan_s: float = 0.0
    generated_tokens: int = 0  # = accepted drafts + one bonus token per verify step
    verify_steps: int = 0  # request-iterations: one per request per forward pass it is in
    draft_proposed: int = 0
    draft_accepted: int = 0
    padded_tokens: int = 0  # padding to the batch width (uniform engine), never accepted
    drafter_us: float = 0.0
    policy_us: float = 0.0
    host_s: float = 0.0  # measured host time of the decode iterations (drafter + policy + feedback)
    batch_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    @property
    def tokens_per_step(self) -> float:
        """Tokens produced per verify step, bonus included: 1.0 without speculation."""
        return self.generated_tokens / max(self.verify_steps, 1)

    @property
    def draft_wasted(self) -> int:
        return self.draft_proposed - self.draft_accepted


@dataclass
class ContenderResult:
    name: str
    description: str
    steps: list[StepStats]

    def total(self, attr: str) -> float:
        return sum(getattr(s, attr) for s in self.steps)

    @property
    def tokens_per_step(self) -> float:
        return self.total("generated_tokens") / max(self.total("verify_steps"), 1)


@dataclass
class _Live:
    """A request being decoded: where it is in its recorded response."""

    rollout: Rollout
    pos: int = 0

    @property
    def remaining(self) -> int:
        return self.rollout.length - self.pos


# ---------------------------------------------------------------------------- public entry


def replay(
    rollouts: Sequence[Rollout],
    contenders: Sequence[Contender],
    cost: ForwardCost,
    engine: str = DEFAULT_ENGINE,
    decode_steps: Iterable[int] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    score: object | None = None,
    host_time: bool = False,
    graphs: str = DEFAULT_GRAPHS,
) -> list[ContenderResult]:
    """Replay ``rollouts`` under every contender; steps not in ``decode_steps`` (default: all)
    that precede a decoded step only feed history. ``on_progress(name, tokens_done, total)``.

    ``score``: what forwards are charged with (default ``cost``): e.g. a
    ``cost_model.CostTable``, so policies planning with a linear model are judged by costs
    they did not choose. ``host_time``: add each decode iteration's measured host time
    (drafter, policy, feedback) to the modeled makespan, so a slow planner pays for it.
    ``graphs``: which verify forwards a cost table charges as CUDA graphs (``_Scorer``)."""
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: choose one of {ENGINES}")
    if not rollouts:
        raise ValueError("nothing to replay: no rollouts")
    by_step = _group_by_step(rollouts)
    decode = sorted(by_step) if decode_steps is None else sorted(set(decode_steps))
    missing = [s for s in decode if s not in by_step]
    if missing:
        raise ValueError(f"steps {missing} have no rollouts (steps present: {sorted(by_step)})")
    scorer = _Scorer(cost if score is None else score, host_time, graphs)
    return [_replay_one(c, by_step, decode, scorer.for_contender(c), c.engine or engine, on_progress)
            for c in contenders]


def plan_with_graph_tiers(policy, scorer: "_Scorer", width: int, batches=(1, 2, 4, 8, 16, 32, 64, 128, 256)):
    """Give ``policy`` the CUDA-graph tiers the SGLang worker measures online
    (``core.graph_tiers.GraphTiers``: graph replays at the captured width, the eager
    forwards' median excess over them), here from the scorer's own times at every batch
    size and width -- the estimate after warm-up, without the exploring steps' cost. A
    no-op where the scorer has no graph / eager split (a linear model, ``--graphs
    buckets``)."""
    from das_sglang.core.graph_tiers import GraphSpec, GraphTiers

    if scorer.graphs != "stock" or scorer._mode is None or not hasattr(policy, "cost") or width < 1:
        return
    tiers = GraphTiers(GraphSpec(width=width, max_bs=max(batches)), min_samples=1,
                       window=len(batches) * (width + 1), spike=None)
    for rows in batches:
        for w in range(width + 1):
            tiers.observe(rows, w, w == width,
                          scorer.verify_time("uniform", rows, w, rows * (1 + w), 0))
    policy.cost = tiers.cost_model(policy.cost)


class _Scorer:
    """Charges a forward: ``step_time(rows, width)`` where the scorer has it (padded uniform
    verify), ``ragged_time(rows, n_tokens)`` where it has that (ragged verify: a cost table),
    else ``forward_time(n_tokens, kv)``.

    ``graphs`` (cost tables only: which verify forwards replay a CUDA graph):

    - ``stock`` (default): what SGLang 0.5.23 does for a speculative target. Its decode
      graph runner captures TARGET_VERIFY graphs at one width, ``speculative_num_draft_tokens``
      (the contender's ``max_budget`` + 1), and replays one only for a batch verifying
      exactly that width; every other verify -- narrower uniform widths, a step without
      drafts (a 1-token verify), ragged steps -- runs eagerly (the table's eager rows). A
      plain decode step (no speculation) replays SGLang's decode graph.
    - ``buckets``: a graph at every width the table has graph rows for, ragged steps from
      graphs per total token count -- a worker that captures per-width graphs, or SGLang's
      compact ragged-verify mode (not used by DAS yet).
    """

    def __init__(self, cost, host_time: bool, graphs: str = DEFAULT_GRAPHS, captured: int | None = None) -> None:
        if graphs not in GRAPHS:
            raise ValueError(f"graphs={graphs!r}: choose one of {GRAPHS}")
        self.cost, self.host_time, self.graphs, self.captured = cost, host_time, graphs, captured
        self._step = getattr(cost, "step_time", None)
        self._ragged = getattr(cost, "ragged_time", None)
        self._mode = getattr(cost, "mode_time", None)

    def for_contender(self, c: "Contender") -> "_Scorer":
        """This scorer for one contender: its captured verify width is its ``max_budget``."""
        return _Scorer(self.cost, self.host_time, self.graphs, int(c.max_budget))

    def forward_time(self, n_tokens, kv_tokens=0):
        return self.cost.forward_time(n_tokens, kv_tokens)

    def verify_time(self, engine: str, rows: int, width: int, n_tokens: int, kv: int) -> float:
        if self.graphs == "stock" and self._mode is not None and self.captured is not None:
            rows = max(int(rows), 1)
            graph = width == self.captured and n_tokens == rows * (1 + width)  # every row full width
            t = float(self._mode(graph, rows, max(n_tokens, rows) / rows))
            if engine == "ragged" and not graph:
                # The worker's ragged layout sends a step to the graph width instead when
                # its measured replay is cheaper (core.graph_tiers.prefer_graph).
                t = min(t, float(self._mode(True, rows, 1 + self.captured)))
            return t
        if engine == "uniform" and self._step is not None:
            return float(self._step(rows, width, kv, host=False))
        if self._ragged is not None and width > 0:
            return float(self._ragged(rows, n_tokens, kv))
        return float(self.cost.forward_time(n_tokens, kv))


def _group_by_step(rollouts: Sequence[Rollout]) -> dict[int, list[Rollout]]:
    out: dict[int, list[Rollout]] = {}
    for r in rollouts:
        out.setdefault(r.step, []).append(r)
    return out


def _replay_one(c: Contender, by_step, decode, cost, engine, on_progress) -> ContenderResult:
    drafter = c.make_drafter() if c.make_drafter is not None else None
    policy = c.make_policy()
    if engine == "uniform":  # as the worker on a uniform layout with CUDA graphs
        plan_with_graph_tiers(policy, cost, int(c.max_budget))
    total = sum(r.length for s in decode for r in by_step[s])
    done = 0
    if on_progress:
        on_progress(c.name, 0, total)
    stats = []
    for step in sorted(s for s in by_step if s <= decode[-1]):
        if drafter is not None:
            drafter.advance_step(step)
        policy.advance_step(step)
        if step not in decode:
            _load_history(by_step[step], drafter, policy, c.shared_problem)
            continue
        if drafter is None:
            stats.append(_decode_plain(step, by_step[step], cost))
        else:
            def tick(n: int, base: int = done) -> None:
                if on_progress:
                    on_progress(c.name, base + n, total)

            stats.append(_decode_step(step, by_step[step], drafter, policy, cost, engine, c, tick))
        done += sum(r.length for r in by_step[step])
        if on_progress:
            on_progress(c.name, done, total)
    return ContenderResult(c.name, c.description, stats)


def _load_history(rollouts: list[Rollout], drafter, policy, shared: bool) -> None:
    """A history-only step goes through the same request lifecycle as a decoded one (minus
    verification), so every drafter ends up holding exactly what decoding would have left."""
    for r in rollouts:
        if drafter is not None:
            drafter.start_request(r.req_id, SHARED_PROBLEM if shared else r.problem_id, r.prompt_ids)
            drafter.extend_request(r.req_id, r.response_ids)
            drafter.finish_request(r.req_id, keep=True)
        policy.observe_finished(r.problem_id, r.length)


# ---------------------------------------------------------------------------- decoding


def _decode_plain(step: int, rollouts: list[Rollout], cost: ForwardCost) -> StepStats:
    """No speculation: one token per request per pass, so the batch shrinks as requests end.
    Closed form of ``_decode_step`` with empty drafts (same numbers, no per-token loop)."""
    lengths = np.sort(np.array([r.length for r in rollouts]))
    iters = int(lengths[-1])
    # active[i] = requests still decoding at iteration i
    active = len(lengths) - np.searchsorted(lengths, np.arange(iters), side="right")
    kv = _plain_kv(rollouts, iters, active)
    t = sum(cost.forward_time(int(n), int(k)) for n, k in zip(active, kv))
    n_tok = int(lengths.sum())
    return StepStats(step, len(rollouts), forward_passes=iters, makespan_s=t, generated_tokens=n_tok,
                     verify_steps=n_tok, batch_sizes=active.astype(np.int32))


def _plain_kv(rollouts: list[Rollout], iters: int, active: np.ndarray) -> np.ndarray:
    """Tokens in the KV cache of the active requests at each iteration without speculation:
    request r holds prompt + i tokens at iteration i < r.length."""
    drop = np.zeros(iters + 1, np.int64)
    for r in rollouts:
        drop[r.length] += len(r.prompt_ids)
    prompts = sum(len(r.prompt_ids) for r in rollouts) - np.cumsum(drop)[:iters]
    return prompts + np.arange(iters, dtype=np.int64) * active


PROGRESS_EVERY = 512  # decode iterations between progress reports


def _decode_step(step, rollouts, drafter, policy, cost, engine, c: Contender, tick=None) -> StepStats:
    from das_sglang.core.budget_rows import BudgetRows

    st = StepStats(step, len(rollouts))
    live = [_Live(r) for r in rollouts]
    t0 = time.perf_counter()
    for lv in live:
        pid = SHARED_PROBLEM if c.shared_problem else lv.rollout.problem_id
        drafter.start_request(lv.rollout.req_id, pid, lv.rollout.prompt_ids)
    st.drafter_us += (time.perf_counter() - t0) * 1e6
    sizes: list[int] = []
    while live:
        sizes.append(len(live))
        t_host = time.perf_counter()
        t0 = t_host
        ids = [lv.rollout.req_id for lv in live]
        flat = getattr(drafter, "speculate_flat", None)
        draft_sizes = getattr(policy, "draft_sizes", None)  # (as the session drafts)
        budget = c.max_budget if draft_sizes is None else draft_sizes(ids, c.max_budget)
        if flat is not None:  # the SGLang worker's host path: flat drafts, rows as columns
            trees = flat(ids, budget)
        else:
            per_row = [budget] * len(live) if isinstance(budget, int) else [int(b) for b in budget]
            trees = DraftBatch.from_trees(drafter.speculate_batch(ids, per_row))
        t1 = time.perf_counter()
        n = len(live)
        plan = policy.plan(BudgetRows(
            ids, [lv.rollout.problem_id for lv in live],
            np.fromiter((lv.pos for lv in live), np.int64, n),
            np.fromiter((lv.rollout.max_new_tokens for lv in live), np.int64, n),
            np.fromiter((len(lv.rollout.prompt_ids) for lv in live), np.int64, n), trees))
        t2 = time.perf_counter()
        st.drafter_us += (t1 - t0) * 1e6
        st.policy_us += (t2 - t1) * 1e6
        live = _verify(st, live, trees, plan, drafter, policy, cost, engine)
        host = time.perf_counter() - t_host
        st.host_s += host
        if cost.host_time:
            st.makespan_s += host
        if tick is not None and len(sizes) % PROGRESS_EVERY == 0:
            tick(st.generated_tokens)
    st.batch_sizes = np.asarray(sizes, np.int32)
    return st


def _verify(st: StepStats, live: list[_Live], trees, plan, drafter, policy, cost, engine) -> list[_Live]:
    """Accept, feed back, charge the forward pass; return the requests still decoding."""
    width = int(plan.width)
    n_tokens = kv = 0
    news = []
    proposed, accepted_n = [], []
    for i, lv in enumerate(live):
        r = lv.rollout
        tree = trees[i].truncate(int(plan.budgets[i])) if width > 0 else DraftTree.empty()
        cont = r.response_ids[lv.pos : lv.pos + len(tree)]
        # the bonus token needs a slot: at most remaining-1 drafts can be used
        accepted = min(tree.accept_length(cont), lv.remaining - 1)
        news.append(r.response_ids[lv.pos : lv.pos + accepted + 1])
        kv += len(r.prompt_ids) + lv.pos
        n_tokens += 1 + len(tree)
        proposed.append(len(tree))
        accepted_n.append(accepted)
        lv.pos += accepted + 1
        st.draft_proposed += len(tree)
        st.draft_accepted += accepted
        st.generated_tokens += accepted + 1
        st.verify_steps += 1
    many = getattr(policy, "observe_verify_many", None)  # one call per batch, as the worker
    if many is not None:
        many([lv.rollout.problem_id for lv in live], proposed, accepted_n)
    else:
        for lv, p, a in zip(live, proposed, accepted_n):
            policy.observe_verify(lv.rollout.problem_id, p, a)
    t0 = time.perf_counter()
    _extend(drafter, [lv.rollout.req_id for lv in live], news)
    done = [lv.rollout for lv in live if lv.remaining == 0]
    for r in done:
        drafter.finish_request(r.req_id, keep=True)
    st.drafter_us += (time.perf_counter() - t0) * 1e6
    for r in done:
        policy.observe_finished(r.problem_id, r.length)
    if engine == "uniform" and width > 0:
        padded = len(live) * (1 + width)
        st.padded_tokens += padded - n_tokens
        n_tokens = padded
    st.forward_passes += 1
    st.makespan_s += cost.verify_time(engine, len(live), width, n_tokens, kv)
    return [lv for lv in live if lv.remaining > 0]


def _extend(drafter, req_ids: list[str], news: list[np.ndarray]) -> None:
    """One update call per batch where the drafter has it (as the SGLang worker does)."""
    batch = getattr(drafter, "extend_batch", None)
    if batch is not None:
        batch(req_ids, news)
        return
    for rid, new in zip(req_ids, news):
        drafter.extend_request(rid, new)
