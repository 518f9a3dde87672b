"""Draft-budget policies: how many draft nodes each request of a decode batch gets.

The worker and the replay call every policy the same way (``DraftBudget``): once per decode
step ``plan(rows)``; after verification ``observe_verify`` per row; ``observe_finished`` when a
rollout ends; ``advance_step`` when a training step starts.

- ``NoSpeculation``   never drafts (the baseline).
- ``FixedBudget(k)``  ``min(k, nodes found)`` for every row, every step.
- ``UnlimitedBudget`` every node the drafter finds, up to ``max_budget``.
- ``LengthAware``     decides whether to speculate, the width, and each row's budget from
                      predicted remaining lengths, calibrated draft-tree acceptance and the
                      cost model (``core/allocation.py``). Default ``lookahead="marginal"``:
                      this forward's drafts are paid at today's batch size and each accepted
                      token is worth what it saves later (mostly ``c_base`` for the rows likely
                      to finish last); ``"stationary"``: the exact minimiser of the modeled
                      time if the budgets were held until the batch ends.
- ``PaperClosedForm`` the paper's closed form ``p* = -(l/alpha) ln(1 - k (1 - N/l))`` at the
                      optimal ``N``, spread evenly over the ``N`` forwards.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import repeat
from typing import NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np

from das_sglang.core import allocation as _allocation
from das_sglang.core import budget_rows as R
from das_sglang.core.acceptance import (
    GLOBAL,
    AcceptanceTracker,
    OutcomeCalibration,
    forget_finished,
    paper_params,
    plan_rows,
    saturating_accept,
)
from das_sglang.core.allocation import (
    StepAllocation,
    lookahead_step_budgets,
    optimal_step_budgets,
    paper_budget,
    paper_optimal_n,
    step_objective,
)
from das_sglang.core.cost_model import CostModel
from das_sglang.core.draft_tree import DraftBatch
from das_sglang.core.length_predictor import LengthPredictor
from das_sglang.core.online_acceptance import _MATCH_LUT, OnlineCalibration, ProbeSchedule
from das_sglang.core.policy_config import PolicyConfig
from das_sglang.native import ahead_rows, online_plan, plan_ahead

_log = logging.getLogger(__name__)

__all__ = [
    "BudgetRow", "BudgetPlan", "DraftBudget", "NoSpeculation", "FixedBudget", "UnlimitedBudget",
    "LengthAware", "PaperClosedForm", "PolicyConfig", "POLICIES", "make_policy",
]


_MIN, _MAX = np.minimum.reduce, np.maximum.reduce


@dataclass(frozen=True)
class BudgetRow:
    """One request of the decode batch, as the policy sees it."""

    req_id: str
    problem_id: str
    generated_len: int  # response tokens so far
    max_new_tokens: int
    node_probs: np.ndarray = field(default_factory=lambda: np.zeros(0))  # best-first DraftTree.probs
    prompt_len: int = 0  # optional: context the KV term of the cost model counts
    match_len: int = -1  # optional: DraftTree.match_len of the draft (-1 = unknown)
    node_depths: np.ndarray | None = None  # optional: DraftTree.depths() (None: read as a chain)

    def __post_init__(self) -> None:
        if self.generated_len < 0 or self.max_new_tokens < 0 or self.prompt_len < 0:
            raise ValueError(
                f"invalid BudgetRow for request {self.req_id!r}: generated_len="
                f"{self.generated_len!r}, max_new_tokens={self.max_new_tokens!r}, "
                f"prompt_len={self.prompt_len!r} must all be >= 0"
            )
        probs = self.node_probs
        if not (isinstance(probs, np.ndarray) and probs.dtype == np.float64 and probs.ndim == 1):
            probs = np.asarray(probs, dtype=np.float64).reshape(-1)
            object.__setattr__(self, "node_probs", probs)
        # min/max are NaN when any entry is, and NaN fails both comparisons (one row per
        # request per forward: keep this check to two reductions, called as ufunc reduces
        # directly, which skips ndarray.min/max's Python wrappers: about half the cost).
        if probs.size and not (_MIN(probs) >= 0.0 and _MAX(probs) <= 1.0):
            raise ValueError(f"invalid node_probs for request {self.req_id!r}: must lie in [0, 1]")


@dataclass(frozen=True)
class BudgetPlan:
    budgets: np.ndarray  # int32 per row; 0 = no drafts for that row
    width: int  # batch draft width (max budget; 0 = don't speculate this step)

    @classmethod
    def none(cls, n_rows: int) -> "BudgetPlan":
        return cls(np.zeros(n_rows, dtype=np.int32), 0)


@runtime_checkable
class DraftBudget(Protocol):
    def plan(self, rows: Sequence[BudgetRow]) -> BudgetPlan: ...
    def observe_verify(self, problem_id: str, proposed: int, accepted: int) -> None: ...
    def observe_finished(self, problem_id: str, length: int) -> None: ...
    def advance_step(self, step: int) -> None: ...


class _Observing:
    """Shared bookkeeping: every policy keeps length history and acceptance statistics, so a
    replay can report them whatever policy drives the batch."""

    name = "base"

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self.lengths = LengthPredictor(self.config)
        self.acceptance = AcceptanceTracker(self.config)

    def observe_verify(self, problem_id: str, proposed: int, accepted: int) -> None:
        self.acceptance.observe(problem_id, proposed, accepted)

    def observe_verify_many(self, problem_ids: Sequence[str], proposed, accepted) -> None:
        """``observe_verify`` for a whole batch, in row order (same statistics)."""
        self.acceptance.observe_many(problem_ids, proposed, accepted)

    def observe_finished(self, problem_id: str, length: int) -> None:
        self.lengths.observe_finished(problem_id, length)

    def observe_finished_many(self, problem_ids: Sequence[str], lengths: Sequence[int]) -> None:
        """``observe_finished`` of each, in order."""
        for p, n in zip(problem_ids, lengths):
            self.observe_finished(p, n)

    def advance_step(self, step: int) -> None:
        self.lengths.advance_step(step)

    def forget_problems(self, problem_ids) -> None:
        """Memory cap: drop what is kept per problem for problems without history."""
        problem_ids = list(problem_ids)
        self.acceptance.forget(problem_ids)
        self.lengths.evict_problems(problem_ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoSpeculation(_Observing):
    name = "none"

    def plan(self, rows: Sequence[BudgetRow]) -> BudgetPlan:
        return BudgetPlan.none(len(rows))


class FixedBudget(_Observing):
    name = "fixed"

    def __init__(self, k: int | None = None, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self.k = self.config.fixed_budget if k is None else int(k)
        if self.k < 0:
            raise ValueError(f"invalid FixedBudget k={k!r}: must be >= 0")

    def plan(self, rows: Sequence[BudgetRow]) -> BudgetPlan:
        budgets = np.minimum(R.found(rows), self.k).astype(np.int32)
        return BudgetPlan(budgets, int(budgets.max(initial=0)))

    def __repr__(self) -> str:
        return f"FixedBudget(k={self.k})"


class UnlimitedBudget(FixedBudget):
    """Every draft node the drafter finds (up to ``config.max_budget``)."""

    name = "unlimited"

    def __init__(self, config: PolicyConfig | None = None) -> None:
        cfg = config or PolicyConfig()
        super().__init__(cfg.max_budget, cfg)


class _Factors(Mapping):
    """Problem id -> calibration factor of a plan's rows (the rows of a problem share one),
    made into a dict only when read: the length-aware plan never reads it (~30 us at 512
    rows per plan)."""

    __slots__ = ("_pids", "_values", "_dict")

    def __init__(self, pids, values: np.ndarray) -> None:
        self._pids, self._values, self._dict = pids, values, None

    def _get(self) -> dict:
        if self._dict is None:
            self._dict = dict(zip(self._pids, self._values.tolist()))
        return self._dict

    def __getitem__(self, pid):
        return self._get()[pid]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


class _Ahead(NamedTuple):
    """A plan made ahead (``LengthAware.plan_ahead``): its native inputs and results, and
    what must be unchanged for the next plan to use them."""

    native: object  # native.PlanAhead
    ids: list  # the rows' request ids
    generated: np.ndarray  # their generated counts
    epoch: int
    cells: np.ndarray  # OnlineCalibration._cells (the object)
    row_states: tuple  # OnlineCalibration._row_states (the object)
    wait: object  # waits for the job (before the length index changes), or None
    skipped: np.ndarray | None = None  # the rows whose outcomes the job left out (finishing), or None
    cut_cap: int = -1  # the job also cut its trees to min(budget, cut_cap) nodes (-1: not)


class _ModelBased(_Observing):
    """Policies that plan with predicted lengths, acceptance estimates and a cost model."""

    NATIVE_CURVES = True  # inputs: online curves of flat rows natively (False: numpy, the reference)

    def __init__(self, cost_model: CostModel | str | None = None,
                 config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        if cost_model is None:  # the preset plus any measured coefficients (DAS_CONFIG)
            cost_model = self.config.cost_model()
        self.cost = CostModel.preset(cost_model) if isinstance(cost_model, str) else cost_model
        self.last: StepAllocation | None = None  # the latest plan's modeled numbers
        online = self.config.curve_mode == "online"
        self._outcomes = OnlineCalibration(self.config) if online else OutcomeCalibration(self.config)
        self._probes = ProbeSchedule(self.config)
        # The latest plan's bookkeeping (what later plans and observations read), not done
        # yet: see settle_plan. The lock makes whoever does it the only one.
        self._post: tuple | None = None
        self._post_lock = threading.Lock()
        # How far off the length predictions are (online): per problem, the total length
        # predicted for its fresh requests, compared with each finished length.
        self._predicted_total: dict[str, float] = {}
        self._log_err = [self.config.length_error_prior ** 2, 1.0]  # sum of squares, weight
        # prepare(): the rows whose outcomes were read ahead (their req_ids list), and the
        # generated counts and draft-independent inputs computed then (None once anything
        # they read changed)
        self._read_ahead: list | None = None
        self._prepared: tuple | None = None
        # the latest plan's budgets (req_id -> row, budgets) for draft_sizes, and the cap it
        # was last asked for (the plan's bookkeeping makes the sizes for it)
        self._latest: tuple[dict, np.ndarray] | None = None
        self._sizes_cap: int | None = None
        # plan_ahead: the next plan of a feedback's rows, computed by its native job (an
        # _Ahead); prepare adopts what it computed, plan its online_plan (_ahead_plan) when
        # the drafts are that job's (ahead_drafts). _epoch counts what changes the inputs.
        self._ahead: _Ahead | None = None
        self._ahead_pre: tuple | None = None  # prepare_ahead's PlanAhead, for plan_ahead
        self._planned_rows = None  # the latest plan's rows
        self._ahead_plan: tuple | None = None
        self._ahead_trees = None
        # _adopt_kept: the new rows' draft-free inputs, not computed yet (LAZY_BOOKKEEPING): a
        # callable that writes them into the prepared arrays, or None
        self._fill_new_rows = None
        # _adopt_ahead: where the job cut its trees to its budgets (cut_at): (cap, its PlanAhead)
        self._ahead_cut = None
        self._epoch = 0
        self.ahead_used = False  # the latest plan was the job's (plan_ahead)
        self.ahead_kept = False  # ... for the rows kept since its feedback (_plan_kept)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cost={self.cost.name}, uniform_width={self.config.uniform_width})"

    # ---- the plan's bookkeeping, deferred ------------------------------------------------
    @property
    def outcomes(self):
        """The outcome calibration (``OnlineCalibration`` / ``OutcomeCalibration``), as of
        every plan so far."""
        self.settle_plan()
        return self._outcomes

    @property
    def probes(self) -> ProbeSchedule:
        self.settle_plan()
        return self._probes

    def plan_pending(self) -> bool:
        """The latest plan's bookkeeping is still to do (:meth:`settle_plan`)."""
        return self._post is not None

    def settle_plan(self) -> None:
        """Do the latest plan's bookkeeping now, if not yet done: its probe record, the
        outcome calibration's and the tracker's view of what it drafted, its length
        predictions and the budgets ``draft_sizes`` reads. A plan leaves this for later:
        nothing reads it before the verify outcomes come, so the session runs it on its
        update thread during the verify forward (the scheduler thread then waits on the
        device) instead of on the path from the drafts to the forward (~0.5 ms at 512
        rows). Every call that reads or changes what it writes (the next ``prepare`` or
        ``plan``, ``draft_sizes``, an observation, a step, ``forget_problems``, the
        ``outcomes`` / ``probes`` properties) settles first, under a lock, so the results
        are the same whoever does it and whenever: bit for bit those of doing it inline."""
        with self._post_lock:
            post, self._post = self._post, None
            if post is not None:
                self._epoch += 1
                self._bookkeep(*post)

    def inputs(self, rows: Sequence[BudgetRow], prepared: tuple | None = None):
        """Per row: predicted remaining tokens, acceptance curves (``pad_curves`` form: row x
        budget matrix of expected accepted tokens E(b), usable budget per row), KV tokens per
        forward, and per-problem node-probability calibration factors. ``prepared``: the
        draft-independent part (factors, predictions) from :meth:`prepare`."""
        pids = R.problem_ids(rows)
        generated = R.generated(rows)
        max_new = R.max_new(rows)
        found = R.found(rows)
        if prepared is None:
            prepared = self._draft_free_inputs(rows, generated, max_new)
        factors, remaining, calibration, kv = prepared
        # Most drafts worth proposing: nodes found, the budget cap, and the tokens left
        # (accepted drafts plus the bonus token cannot exceed max_new_tokens).
        m = np.minimum(np.minimum(found, self.config.max_budget), np.maximum(max_new - generated - 1, 0))
        if self.config.curve_mode == "online" and type(rows) is R.BudgetRows and self.NATIVE_CURVES:
            # The per-step case (the session's flat rows): one native call, the same arrays.
            relative = calibration / self.acceptance.calibration(GLOBAL)
            self._base, acc = self._outcomes.curves(rows, m, relative)
            return remaining, (acc, m), kv, factors
        probs = np.zeros((len(rows), int(m.max(initial=0)) + 1))
        if probs.shape[1] > 1:
            # Row i's first m[i] node probabilities into columns 1..m[i]: one masked store
            # (row-major, the order the slices are concatenated in), not one per row.
            cols = np.arange(1, probs.shape[1])
            probs[:, 1:][cols[None, :] <= m[:, None]] = R.leading_probs(rows, m)
        budgets = np.arange(probs.shape[1], dtype=np.float64)
        base = np.cumsum(probs, axis=1)  # the drafter's expected accepted tokens
        if self.config.curve_mode in ("capped", "blend"):
            # The plan extrapolates this step's curve over the rest of the request; one lucky
            # tree must not decide a whole batch's width, so temper it with the problem's
            # fitted mean curve (calibration below then corrects the level of the result).
            fitted = {pid: saturating_accept(budgets, *self._alpha_k(pid)) for pid in factors}
            problem = np.array([fitted[p] for p in pids]).reshape(base.shape)
            if self.config.curve_mode == "capped":
                mixed = np.minimum(base, problem)
            else:
                mixed = 0.5 * (base + problem)
            base = np.maximum.accumulate(np.where(budgets[None, :] <= m[:, None], mixed, 0.0), axis=1)
        self._base = base  # what calibration compares outcomes with (see _remember)
        acc = base * calibration[:, None]
        if self.config.curve_mode == "outcome":
            # Each node's probability times the calibration of its rank bin in the row's
            # current stretch (its last verify outcome): see acceptance.OutcomeCalibration.
            shape = self._outcomes.ratios(R.req_ids(rows), len(budgets) - 1)
            # The per-problem factor (AcceptanceTracker) sets each row's level, the table its
            # shape: relative to what the table has seen, prior_alpha before any outcome.
            nodes = np.diff(acc, axis=1) * shape / self._outcomes.pooled(1.0)
            acc = np.concatenate([np.zeros((len(rows), 1)), np.cumsum(nodes, axis=1)], axis=1)
        elif self.config.curve_mode == "online":
            # The table (state x match length x rank) sets each node's level; the problem's
            # factor only says how it compares with all problems (1 with no own outcomes),
            # so rejections pooled over problems never pin a problem's level at zero.
            shape = self._outcomes.ratios(rows, len(budgets) - 1)
            relative = calibration / self.acceptance.calibration(GLOBAL)
            nodes = np.diff(base, axis=1) * shape * relative[:, None]
            acc = np.concatenate([np.zeros((len(rows), 1)), np.cumsum(nodes, axis=1)], axis=1)
        elif self.config.budget_calibration:
            acc = np.maximum.accumulate(acc * self.acceptance.budget_shape(len(budgets) - 1)[None, :], axis=1)
        acc = np.minimum(acc, budgets[None, :])  # never more than drafted
        return remaining, (acc, m), kv, factors

    def _draft_free_inputs(self, rows, generated, max_new) -> tuple:
        """What :meth:`inputs` reads that the drafts do not change: per-problem calibration
        factors (and per row), predicted remaining tokens, KV tokens per forward."""
        pids = R.problem_ids(rows)
        calibration, remaining, kv = self._row_inputs(pids, generated, max_new, R.prompt_len(rows))
        return _Factors(pids, calibration), remaining, calibration, kv

    # Up to this many rows, _row_inputs reads the calibration factors per problem.
    FEW_ROWS = 16

    def _row_inputs(self, pids: list, generated: np.ndarray, max_new: np.ndarray, prompt_len: np.ndarray) -> tuple:
        """Per row of these columns: its problem's calibration factor, predicted remaining
        tokens and KV tokens per forward (:meth:`_draft_free_inputs`' arrays)."""
        if len(pids) <= self.FEW_ROWS:
            # (a few rows -- a step's new requests, a small batch --: the per-problem floats
            # read one by one, the same floats as calibration_rows' gather, without its
            # batch memo and ~10 numpy calls)
            few = self.acceptance.calibration_many(pids)
            calibration = np.fromiter(map(few.__getitem__, pids), np.float64, len(pids))
        else:
            calibration = self.acceptance.calibration_rows(pids)
        remaining, _, _ = self.lengths.predict_many(pids, generated, max_new)
        kv = prompt_len.astype(np.float64) + generated
        kv += 0.5 * remaining  # mean context over the rest of the request
        return calibration, remaining, kv

    def prepare(self, rows: Sequence[BudgetRow]) -> None:
        """The part of the next :meth:`plan` of these rows that does not read their drafts:
        the previous plan's outcomes, the calibration factors and the length predictions.
        The session calls it while the drafts are still being made (on native threads), so
        this Python runs beside them; ``plan`` of the same rows -- the same ``req_ids``
        list, the same generated counts -- then starts from it and gives what it would have
        given alone. ``rows`` may carry empty drafts. Anything that changes what the inputs
        read in between (an observation, a step, forgotten problems) drops the inputs, and
        ``plan`` computes them again."""
        self.settle_plan()
        self._ahead_plan = self._fill_new_rows = self._ahead_cut = None
        if self._ahead is not None and self._adopt_ahead(rows):
            return
        self._read_outcomes(rows)
        if self.config.curve_mode == "online":
            self._outcomes.table()  # (cached until the next plan's outcomes: made now, off the wait)
        ids, generated = R.req_ids(rows), R.generated(rows)
        self._read_ahead = ids
        self._prepared = (generated.copy(), self._draft_free_inputs(rows, generated, R.max_new(rows)))

    def _start_plan(self, rows: Sequence[BudgetRow]) -> tuple | None:
        """Read the previous plan's outcomes unless :meth:`prepare` did for these rows;
        the prepared inputs when they are still these rows' (else None)."""
        self._ahead = None  # (a plan not prepared from it: the job only read copies)
        ids = R.req_ids(rows)
        read, prepared = self._read_ahead, self._prepared
        self._read_ahead = self._prepared = None
        if read is None or (read is not ids and read != ids):
            if read is not None:  # (the session never does this: it plans what it prepared)
                _log.warning("DAS policy: plan of other rows than prepared; the previous plan's "
                             "outcomes were read for both")
            self._read_outcomes(rows)
            return None
        if prepared is None or not R.same_ints(prepared[0], R.generated(rows)):
            return None
        return prepared[1]

    def _inputs_changed(self) -> None:
        self.drop_ahead()  # (first: its job may still read the length index)
        self.settle_plan()  # (before what the latest plan's bookkeeping reads changes)
        self._prepared = None
        self._epoch += 1

    # ---- the next plan, ahead (LengthAware.plan_ahead) -------------------------------------
    def drop_ahead(self) -> None:
        """Forget the plan made ahead, if any, once its job no longer runs (it reads the
        length index, which the caller may be about to change)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.wait is not None:
            ahead.wait()

    def ahead_drafts(self, drafts) -> None:
        """The drafts of the job that planned ahead, when they are the next plan's trees (the
        session: the drafter reused every tree that job drafted), or ``(drafts, rows)`` when
        the rows changed since and ``drafts`` are its trees gathered by row (``rows``: each
        row's row in the job's, -1 an empty placeholder: a deferred start); else None."""
        self._ahead_trees = drafts

    def take_ahead_cut(self, cap: int) -> DraftBatch | None:
        """Where the latest plan was the job's plan of its own trees (``ahead_used``, the rows
        unchanged) and the job cut them at ``cap`` (``plan_ahead``'s ``cut``): those trees cut
        to min(budget, ``cap``) nodes per row -- what ``truncate`` of the plan's drafts to its
        budgets capped at ``cap`` gives (tests/sglang/test_plan_ahead.py) --, else None. Once."""
        got, self._ahead_cut = self._ahead_cut, None
        if got is None or got[0] != cap or not self.ahead_used or self.ahead_kept:
            return None
        got = got[1].cut()  # (its nodes are the job's checked trees')
        return None if got is None else DraftBatch.selected(got, probs_ok=True)

    def launch_trees(self, ids: list, at: np.ndarray | None, cap: int, generated: np.ndarray | None = None,
                     prev: list | None = None) -> tuple[DraftBatch, int] | None:
        """What the next plan of these rows gives when it takes the job's plan (the trees cut
        to its budgets, at most ``cap`` nodes a row, and the widest budget), read before that
        plan runs and without changing anything it reads: the session verifies these trees at
        once and makes the plan itself in the forward's shadow (``DasSession.launch_plan``).
        ``at``: each row's row in the job's (-1: a new row, no tree), or None for the job's
        rows themselves, whose ``generated`` counts must be the job's (``prev``: the rows
        ``at`` maps from, the job's). None where the plan
        would not take the job's plan for a reason known here (the job did not plan or cut
        at ``cap``, an observation or a step since, a row the job took for finishing kept)."""
        ahead = self._ahead
        if ahead is None or ahead.cut_cap != cap:
            return None
        oc = self._outcomes
        if ahead.epoch != self._epoch or oc._cells is not ahead.cells or oc._row_states is not ahead.row_states:
            return None
        if at is None:
            if ahead.skipped is not None or generated is None or not (ahead.ids is ids or ahead.ids == ids):
                return None
            # (its generated counts the job's: checked in the native call)
            got = ahead.native.launch(None, np.ascontiguousarray(generated, dtype=np.int64))
        else:
            if not self.AHEAD_KEPT or prev is None or not (ahead.ids is prev or ahead.ids == prev):
                return None
            # (some row kept, none the job took for finishing: checked in the native call)
            got = ahead.native.launch(at, None, ahead.skipped)
        if got is None:
            return None
        cut, widest = got
        return DraftBatch.selected(cut, probs_ok=True), int(widest)

    # A plan whose rows changed since the feedback (finishes; starts, still without a tree)
    # takes the job's plan for the rows it kept (_adopt_kept); False: such a plan computes
    # everything itself (the reference: the same plans as without the job).
    AHEAD_KEPT = True

    def _adopt_ahead(self, rows) -> bool:
        """:meth:`prepare` from what the job computed ahead for these rows, if nothing it read
        changed since (the same rows, generated counts, outcome state and epoch): the same
        cells, states, table and draft-free inputs as :meth:`prepare` computes, bit for bit
        (tests/sglang/test_plan_ahead.py). Rows that changed since the feedback -- some
        finished, new ones started -- adopt it through the row map (:meth:`_adopt_kept`)."""
        ahead, self._ahead = self._ahead, None
        oc = self._outcomes
        ids = R.req_ids(rows)
        if ahead.epoch != self._epoch or oc._cells is not ahead.cells or oc._row_states is not ahead.row_states:
            return False
        generated = R.generated(rows)
        if not (ahead.ids is ids or ahead.ids == ids):
            return self.AHEAD_KEPT and self._adopt_kept(ahead, rows, ids, generated)
        if ahead.skipped is not None or not R.same_ints(ahead.generated, generated):
            return False  # (a row the job took for finishing is still here: its outcome counts)
        got = ahead.native.result()
        if got is None:  # (the job did not plan: PlanAhead.error)
            return False
        cells, states, added, table, calibration, relative, remaining, kv, plan = got
        np.copyto(oc._cells, cells)  # (OnlineCalibration.update, then table(): see _update_native)
        oc._table = table
        oc._bins_cache = None
        if added:
            oc._rows_dirty = True
        oc._row_states = (ids, states)
        self._adopted(ids, generated, (_Factors(R.problem_ids(rows), calibration), remaining, calibration, kv),
                      plan, None)
        self._fill_new_rows = None
        self._ahead_cut = (ahead.cut_cap, ahead.native) if ahead.cut_cap >= 0 else None
        return True

    def _adopt_kept(self, ahead: _Ahead, rows, ids: list, generated: np.ndarray) -> bool:
        """:meth:`_adopt_ahead` for rows that changed since the feedback: requests finished
        (their rows left) and new ones started. The job counted every planned row's outcome,
        a finished request's last one too, which the plan of the new rows does not read (the
        request is gone): its cells are taken less those rows' part, each kept row its state,
        calibration factor, predicted remaining tokens and KV tokens through the row map; a
        new row gets its state and draft-free inputs here (a handful of rows). The
        plan then takes the job's budgets for the kept rows (:meth:`_plan_fused`): made at
        the feedback, with the finished requests still in the batch and the new ones not
        yet. It applies only where every row is there once, each kept row's generated count
        is the job's and a new row has no tree (a deferred start: the plan checks that the
        trees are the job's, gathered through the same map)."""
        n = len(ids)
        if type(ids) is not list or type(ahead.ids) is not list:
            return False
        at, unique = R.shared_row_map(ahead.ids, ids)
        if not unique:
            return False
        # (one pass: src = max(at, 0), the new rows, the job's rows that left; not ok where
        # no row is kept, a kept row's generated count is not the job's, or a kept row is
        # one the job took for finishing -- its outcome counts)
        skipped = ahead.skipped
        ok, src, fresh, left = ahead_rows(at, ahead.generated, np.asarray(generated, dtype=np.int64), skipped)
        if not ok:
            return False
        got = ahead.native.result()
        if got is None:
            return False
        cells, states, added, table, calibration, relative, remaining, kv, plan = got
        oc = self._outcomes
        old = ahead.ids
        before = ahead.row_states[1]  # (the rows' states before the job's update)
        # A request that left since takes its last outcome with it, as in a plan made
        # without the job. The job left out the rows the feedback said finish (finishing);
        # the part of any other row that left (a finish the stop rules could not tell, an
        # abort) is taken out here (the same cells up to rounding: sums in another order).
        # So the policy learns what it learns without the job. (A finished request's last
        # run is cut short by its stop -- drafts past its end are never accepted --: counted,
        # it would read as a rejection.)
        counted = left if skipped is None else left[~skipped[left]]
        part = oc.outcomes_of(counted, ahead.generated[counted], before[counted]) if counted.size else None
        np.copyto(oc._cells, cells)
        if part is None:
            oc._table = table
        else:
            oc._cells -= part
            oc._table = None  # (made from these cells when next read)
        oc._bins_cache = None
        # Row states: the kept rows' from the job; the rows that left go to the dict as they
        # were before it (a request that comes back -- a retracted one -- reads it there); a
        # new row reads the dict (never in the feedback's rows, whose states the dict may
        # lack: no flush needed).
        left = left[before[left] != 0].tolist()
        if left:
            oc._states.update(zip([old[i] for i in left], before[left].tolist()))
        new_states = states[src]
        pids = R.problem_ids(rows)
        calibration, remaining, kv = calibration[src], remaining[src], kv[src]
        fill = None
        if fresh.size:
            fl = fresh.tolist()
            get = oc._states.get
            new_states[fresh] = [get(ids[i], 0) for i in fl]

            def fill() -> None:  # (the new rows' draft-free inputs: see _fill_new_rows)
                calibration[fresh], remaining[fresh], kv[fresh] = self._row_inputs(
                    [pids[i] for i in fl], generated[fresh], R.max_new(rows)[fresh], R.prompt_len(rows)[fresh])

            if not self.LAZY_BOOKKEEPING:
                fill()
                fill = None
        oc._row_states = (ids, new_states)
        oc._rows_dirty = True
        oc._rows_unique = True
        forget_finished(oc, ids, n_live=n, size=len(oc._states))
        self._adopted(ids, generated, (_Factors(pids, calibration), remaining, calibration, kv), plan, at,
                      (src, fresh))
        self._fill_new_rows = fill
        return True

    # What only a plan's bookkeeping reads is made by that bookkeeping (settle_plan: in the
    # verify forward's shadow), not on the path to the forward: the probe record's forward
    # (the fused plans); for a plan that takes the job's plan for the rows kept
    # (_plan_kept), which gives a new row no budget, also the new rows' draft-free inputs
    # and the curves' base and node bins gathered by row. False: made by the plan itself
    # (the reference: the same plans and bookkeeping bit for bit, tests/sglang/
    # test_plan_ahead.py, tests/test_policy_online.py).
    LAZY_BOOKKEEPING = True

    def _adopted(self, ids: list, generated: np.ndarray, prepared: tuple, plan, at, kept=None) -> None:
        """What :meth:`prepare` leaves for :meth:`plan` once it took the job's results:
        the rows read, their draft-free inputs, and the job's plan with its row map (and,
        for rows kept since the feedback, ``kept``: the map's ``max(at, 0)`` and new rows)."""
        self._read_ahead = ids
        self._prepared = (generated.copy(), prepared)
        self._ahead_plan = (prepared, plan, at, kept)

    def observe_verify(self, problem_id: str, proposed: int, accepted: int) -> None:
        self._inputs_changed()
        super().observe_verify(problem_id, proposed, accepted)

    def observe_verify_many(self, problem_ids: Sequence[str], proposed, accepted) -> None:
        self._inputs_changed()
        super().observe_verify_many(problem_ids, proposed, accepted)

    def advance_step(self, step: int) -> None:
        self._inputs_changed()
        super().advance_step(step)

    def forget_problems(self, problem_ids) -> None:
        self._inputs_changed()
        super().forget_problems(problem_ids)

    def observe_finished(self, problem_id: str, length: int) -> None:
        self._inputs_changed()
        super().observe_finished(problem_id, length)
        self._note_length_error(problem_id, length)

    def observe_finished_many(self, problem_ids: Sequence[str], lengths: Sequence[int]) -> None:
        """``observe_finished`` of each, in order (the same statistics), the lengths in one
        call (``LengthPredictor.observe_finished_many``)."""
        many = getattr(self.lengths, "observe_finished_many", None)
        if type(self).observe_finished is not _ModelBased.observe_finished or many is None:
            super().observe_finished_many(problem_ids, lengths)  # (a subclass's own, one by one)
            return
        self._inputs_changed()
        many(problem_ids, lengths)
        for p, n in zip(problem_ids, lengths):
            self._note_length_error(p, n)

    def _note_length_error(self, problem_id: str, length: int) -> None:
        predicted = self._predicted_total.get(problem_id)
        if predicted is not None:
            err = float(np.log(max(length, 1) / max(predicted, 1.0)))
            keep = 1.0 - 1.0 / self.config.length_error_memory
            self._log_err = [self._log_err[0] * keep + err * err, self._log_err[1] * keep + 1.0]

    def length_error(self) -> float:
        """RMS relative (log) error of the length predictions so far (prior: length_error_prior)."""
        self.settle_plan()
        return float(np.sqrt(self._log_err[0] / self._log_err[1]))

    def spread(self) -> float:
        """Uncertainty of "which row ends last" as a share of the makespan: at least
        ``critical_spread``, wider while the length predictions are observed to be off."""
        return max(self.config.critical_spread, self.length_error())

    def _note_predictions(self, rows: Sequence[BudgetRow], remaining: np.ndarray) -> None:
        fresh = np.flatnonzero(R.generated(rows) == 0)
        if fresh.size:
            pids = R.problem_ids(rows)
            for i in fresh.tolist():  # a request's first plan only
                self._predicted_total[pids[i]] = float(remaining[i])

    def _alpha_k(self, problem_id: str) -> tuple[float, float]:
        est = self.acceptance.estimate(problem_id)
        return est.alpha, est.k

    def expected_time(self, rows: Sequence[BudgetRow], budgets: np.ndarray) -> float:
        """Modeled seconds to finish the batch keeping ``budgets`` (the LengthAware objective),
        used to compare any policy's plan on equal terms."""
        self.settle_plan()
        remaining, curves, kv, _ = self.inputs(rows)
        clipped = np.minimum(np.asarray(budgets), curves[1])
        return step_objective(remaining, curves, clipped, kv, self.cost, self.config.uniform_width)[0]

    def _read_outcomes(self, rows: Sequence[BudgetRow]) -> None:
        """What the previous plan's drafts got (call once per plan, before ``inputs``)."""
        if self.config.curve_mode in ("outcome", "online"):
            self._outcomes.update(rows)

    def _probe(self, rows: Sequence[BudgetRow], budgets: np.ndarray, m: np.ndarray,
               kv: np.ndarray) -> tuple[np.ndarray, tuple]:
        """Give due rows without a budget a small probe draft while the probes' modeled cost
        stays within ``probe_share`` of all forwards' (``ProbeSchedule``). Returns the budgets
        and what the plan's probe record takes (its forward's and its probes' modeled
        seconds; recorded by the plan's bookkeeping)."""
        cfg, cost = self.config, self.cost
        budgets = np.asarray(budgets, dtype=np.int32).copy()
        width = int(budgets.max(initial=0))
        probe_s = 0.0
        if cfg.probe_budget > 0:
            due = self._probes.due(rows) & (budgets == 0) & (m > 0)
            if due.any():
                if cfg.uniform_width and width > 0:
                    extra = np.minimum(width, m)  # padded to the width anyway: free
                    budgets = np.where(due, extra, budgets).astype(np.int32)
                else:
                    # Uniform and nothing drafted: the probe width pads every row, so every
                    # row with nodes probes (more evidence for the same price).
                    pick = (m > 0) & (budgets == 0) if cfg.uniform_width else due
                    probe = np.where(pick, np.minimum(cfg.probe_budget, m), 0).astype(np.int32)
                    tokens = len(rows) * int(probe.max(initial=0)) if cfg.uniform_width else int(probe.sum())
                    probe_s = cost.c_tok_s * tokens
                    if self._probes.affordable(probe_s):
                        budgets = np.maximum(budgets, probe)
                    else:
                        probe_s = 0.0
        width = int(budgets.max(initial=0))
        tokens = len(rows) * (1 + width) if cfg.uniform_width else len(rows) + int(budgets.sum())
        return budgets, (cost.forward_time(tokens, int(kv.sum())), probe_s)

    def _defer(self, rows: Sequence[BudgetRow], budgets: np.ndarray, remaining: np.ndarray | None = None,
               probe_record: tuple | None = None, later=None) -> np.ndarray:
        """Leave the plan's bookkeeping for :meth:`settle_plan`; returns the budgets the
        caller gets (a copy: what the bookkeeping keeps cannot change under it). ``later``:
        what makes the curves' base and the probe record when the bookkeeping runs (it reads
        nothing a plan, an observation or a step changes before that: each settles first)."""
        self._post = (rows, budgets, self._base, remaining, probe_record, later)
        self._planned_rows = rows  # (prepare_ahead's rows)
        return budgets.copy()

    def _bookkeep(self, rows, budgets: np.ndarray, base: np.ndarray, remaining, probe_record, later=None) -> None:
        """A plan's bookkeeping (:meth:`settle_plan`), in the order the plan once did it."""
        if later is not None:
            base, probe_record = later()
        if remaining is not None:
            self._note_predictions(rows, remaining)
        if probe_record is not None:
            self._probes.record(rows, budgets, *probe_record)
        self._remember(rows, budgets, base)

    def _remember(self, rows: Sequence[BudgetRow], budgets: np.ndarray, base: np.ndarray) -> None:
        """Register each planned row's uncalibrated expectation (``base``: the plan's
        ``inputs``) and its budget (``draft_sizes``)."""
        pos = None  # the rows' plan_rows: built once for both users
        if self.config.draft_headroom > 0 and hasattr(self, "draft_sizes"):
            pos = plan_rows(rows)
            b = np.asarray(budgets, dtype=np.int64).reshape(-1).copy()
            cap = self._sizes_cap
            self._latest = (R.req_ids(rows), pos, b, {} if cap is None else {cap: self._same_sizes(b, cap)})
        if self.config.curve_mode in ("outcome", "online"):
            self._outcomes.planned(rows, budgets, base, pos)
        budgets = np.asarray(budgets)
        drafted = np.flatnonzero(budgets > 0)
        if drafted.size:
            b = budgets[drafted].astype(np.int64)
            expected = base[drafted, np.minimum(b, base.shape[1] - 1)]
            # (recorded with the next observation: the per-row Python leaves the plan)
            self.acceptance.expect_many_later(R.problem_ids(rows), drafted, b, expected)


def _padded_width(width: int, buckets) -> int:
    """The verify width a plan's widest row is padded to (the next bucket; any width
    without buckets)."""
    if buckets is None or width in buckets:
        return int(width)
    return int(next((b for b in buckets if b >= width), width))


class LengthAware(_ModelBased):
    name = "length-aware"

    def draft_sizes(self, req_ids: Sequence[str], cap: int) -> np.ndarray | int:
        """How many nodes to draft for each of these requests' next plan: at most
        ``ceil(draft_headroom * latest budget)``, at least ``max(1, probe_budget)`` (so a
        row without a budget still shows its drafter's confidence and can be probed), at
        most ``cap``; ``cap`` for a request not in the latest plan. A plan never gives a row
        more nodes than its tree has, so a budget can grow by ``draft_headroom`` per step.
        ``cap`` itself (an int) with ``draft_headroom`` 0, before any plan, or for fewer
        than ``draft_headroom_min_rows`` rows (small batches: drafting is cheap there)."""
        cfg = self.config
        self.settle_plan()
        latest = self._latest
        if cfg.draft_headroom <= 0 or latest is None or len(req_ids) < cfg.draft_headroom_min_rows:
            return int(cap)
        ids, pos, budgets, same = latest
        n = len(req_ids)
        floor = min(max(1, cfg.probe_budget), cap)
        self._sizes_cap = cap
        if len(pos) == n and ids == req_ids:  # the plan's rows (the feedback after it; a step without finishes)
            # Asked twice or more per plan (the feedback's pre-draft, the next plan while no
            # request starts or ends): made once per plan and cap, read-only (~0.15 ms at 512
            # rows cold, per call) -- by the plan's bookkeeping for the latest cap asked
            # (_remember: off the path, during the verify forward; ~40 us at 512 rows).
            sizes = same.get(cap)
            if sizes is None:
                sizes = same[cap] = self._same_sizes(budgets, cap)
            return sizes
        if type(req_ids) is list and n >= R.ROWMAP_MIN_ROWS:
            at = R.shared_row_map(ids, req_ids)[0]  # (the later row of a request twice, as pos has it)
        else:
            at = np.fromiter(map(pos.get, req_ids, repeat(-1, n)), np.int64, n)
        # (a plan has rows: budgets is never empty; rows not in it read row 0, then get cap)
        sizes = np.ceil(cfg.draft_headroom * budgets[np.maximum(at, 0)]).astype(np.int64)
        # (the same values as np.clip, whose dispatch costs ~2x: 3.2 vs 1.5 us at 512 rows)
        np.minimum(np.maximum(sizes, floor, out=sizes), cap, out=sizes)
        sizes[at < 0] = cap
        return sizes

    def _same_sizes(self, budgets: np.ndarray, cap: int) -> np.ndarray:
        """:meth:`draft_sizes` of the latest plan's own rows (read-only)."""
        cfg = self.config
        sizes = np.ceil(cfg.draft_headroom * budgets).astype(np.int64)
        np.minimum(np.maximum(sizes, min(max(1, cfg.probe_budget), cap), out=sizes), cap, out=sizes)
        sizes.flags.writeable = False
        return sizes

    # The per-step case (flat rows, online curves, per-row widths, the marginal lookahead)
    # in one native call (native.online_plan); False: the steps below, the reference it
    # is tested against (tests/test_policy_online.py: the same plans and bookkeeping).
    FUSED = True

    def plan(self, rows: Sequence[BudgetRow]) -> BudgetPlan:
        self.settle_plan()
        self.ahead_used = self.ahead_kept = False
        if not rows:
            return BudgetPlan.none(0)
        prepared = self._start_plan(rows)
        fused = self._plan_fused(rows, prepared)
        if fused is not None:
            return fused
        remaining, curves, kv, _ = self.inputs(rows, prepared)
        buckets = self.config.buckets() if self.config.uniform_width else None
        if self.config.lookahead == "stationary":
            alloc = optimal_step_budgets(remaining, curves, kv, self.cost, self.config.uniform_width,
                                         buckets)
        else:
            alloc = lookahead_step_budgets(remaining, curves, kv, self.cost, self.config.uniform_width,
                                           self.spread(), buckets)
        self.last = alloc
        budgets = alloc.budgets
        if alloc.width == 0 or alloc.modeled_s > (1.0 - self.config.min_gain) * alloc.baseline_s:
            budgets = np.zeros(len(rows), dtype=np.int32)
        budgets, probe_record = self._probe(rows, budgets, curves[1], kv)
        budgets = self._defer(rows, budgets, remaining, probe_record)
        width = _padded_width(int(budgets.max(initial=0)), buckets)
        if self.config.uniform_width and alloc.width > width and self.cost.is_graph_width(alloc.width):
            width = alloc.width  # padded out to a CUDA-graph width: cheaper than eager
        return BudgetPlan(budgets, width)

    def _plan_fused(self, rows, prepared: tuple | None) -> BudgetPlan | None:
        """:meth:`plan` of flat rows in one native call (``native.online_plan``: the usable
        nodes, the online curves, ``lookahead_per_row``, the min-gain rule and ``_probe``'s
        probe drafts), with what the steps leave behind (``last``, the curves and node bins
        the bookkeeping reads, the probe record) set as they set it: the same plan. At 512
        rows it leaves out ~35 numpy calls of Python between the native ones, each cold on
        every step. None where it does not apply (or the lookahead defers to numpy)."""
        cfg, cost = self.config, self.cost
        if not (self.FUSED and cfg.curve_mode == "online" and self.NATIVE_CURVES and type(rows) is R.BudgetRows
                and not cfg.uniform_width and cfg.lookahead != "stationary" and _allocation.NATIVE):
            return None
        ahead, self._ahead_plan = self._ahead_plan, None
        trees, self._ahead_trees = self._ahead_trees, None
        fill, self._fill_new_rows = self._fill_new_rows, None
        if ahead is None or ahead[0] is not prepared:
            fill = None  # (its arrays are not the ones read here)
        generated, max_new = R.generated(rows), R.max_new(rows)
        if prepared is None:
            prepared = self._draft_free_inputs(rows, generated, max_new)
        _, remaining, calibration, kv = prepared
        n = len(rows)
        outcomes, probes = self._outcomes, self._probes
        d = rows.drafts
        at = None if ahead is None else ahead[2]
        if at is None:  # (the job's rows: its trees themselves)
            self.ahead_used = ahead is not None and ahead[0] is prepared and d is trees and trees is not None
        else:  # (rows kept since the feedback: its trees gathered through the same row map)
            self.ahead_used = (ahead[0] is prepared and type(trees) is tuple and trees[0] is d
                               and R.same_ints(trees[1], at))
        if self.ahead_used and ahead[1] is not None and at is not None:
            self.ahead_kept = True
            return self._plan_kept(rows, ahead[1], at, ahead[3], remaining, kv, fill)
        if fill is not None:
            fill()
        if self.ahead_used:
            got = ahead[1]  # (online_plan of these inputs and drafts, by the job: plan_ahead)
        else:
            table, states, match, depth_bin, rank_bin, max_budget = outcomes.curve_inputs(rows)
            probing = cfg.probe_budget > 0
            got = online_plan(
                np.ascontiguousarray(d.offsets, dtype=np.int64), np.ascontiguousarray(d.probs, dtype=np.float64),
                np.ascontiguousarray(d.depths, dtype=np.int32), table, states, match,
                np.ascontiguousarray(calibration / self.acceptance.calibration(GLOBAL), dtype=np.float64),
                depth_bin, rank_bin, max_budget, np.ascontiguousarray(generated, dtype=np.int64),
                np.ascontiguousarray(max_new, dtype=np.int64), np.ascontiguousarray(remaining, dtype=np.float64),
                np.ascontiguousarray(kv, dtype=np.float64), cost.c_base_s, cost.c_tok_s, cost.c_kv_s, self.spread(),
                max(cost.free_tokens - n, 0.0), float(cfg.min_gain), int(cfg.probe_budget),
                probes.due(rows) if probing else None, probes.spent_s, cfg.probe_share * probes.total_s)
        if got is None:
            return None
        base, _, bins, width, _, alloc_budgets, alloc_width, modeled, baseline, makespan, budgets, probe_s = got
        self._base = base = base.reshape(n, width)
        outcomes.keep_bins(rows, bins, width)
        self.last = StepAllocation(alloc_budgets, int(alloc_width), modeled, baseline, makespan)
        def record() -> tuple:  # (the probe record)
            return cost.forward_time(n + int(budgets.sum()), int(kv.sum())), probe_s

        if self.LAZY_BOOKKEEPING:  # (the probe record's forward: made by the bookkeeping)
            out = self._defer(rows, budgets, remaining, later=lambda: (base, record()))
        else:
            out = self._defer(rows, budgets, remaining, record())
        return BudgetPlan(out, int(out.max(initial=0)))

    def _plan_kept(self, rows, got: tuple, at: np.ndarray, kept: tuple, remaining: np.ndarray,
                   kv: np.ndarray, fill=None) -> BudgetPlan:
        """:meth:`_plan_fused` for rows that changed since the feedback (``at``: each row's row
        there, -1 for a new one; ``kept``: ``_adopt_kept``'s ``max(at, 0)`` and new rows): the job's plan of the feedback's rows (``got``, its
        ``online_plan`` tuple) for the rows kept, no budget for the new ones (they have no
        tree yet), and what the plan's bookkeeping reads gathered the same way -- the
        curves' base, their node bins, the allocation -- with the probe record of these
        rows (their forward, and the probes among the kept rows' budgets). ``fill``: what
        writes the new rows' draft-free inputs into ``remaining`` and ``kv`` (None: they
        are). With ``LAZY_BOOKKEEPING`` what only the plan's bookkeeping reads -- those inputs,
        the base and bins gathered by row, the probe record's forward -- is made by it."""
        cfg, cost = self.config, self.cost
        base, _, bins, width, _, alloc_budgets, alloc_width, modeled, baseline, makespan, budgets, _ = got
        n, n_old = len(at), len(base) // max(width, 1)
        src, fresh = kept
        budgets = budgets[src].astype(np.int32)
        budgets[fresh] = 0
        alloc_budgets = alloc_budgets[src].astype(np.int32)
        alloc_budgets[fresh] = 0
        self.last = StepAllocation(alloc_budgets, int(alloc_width), modeled, baseline, makespan)
        # (the probes: budgets above the allocation's, or any budget where the min-gain rule
        # left none -- final_budgets' rule)
        none = alloc_width == 0 or modeled > (1.0 - cfg.min_gain) * baseline
        probed = budgets > (0 if none else alloc_budgets)
        probe_s = cost.c_tok_s * float(budgets[probed].sum()) if cfg.probe_budget > 0 else 0.0

        def later() -> tuple:
            """(the curves' base gathered by row, the probe record); the node bins kept."""
            if fill is not None:
                fill()
            b = base.reshape(n_old, width)[src]
            b[fresh] = 0.0
            self._base = b
            self._outcomes.keep_bins(rows, bins.reshape(n_old, width - 1)[src], width)
            return b, (cost.forward_time(n + int(budgets.sum()), int(kv.sum())), probe_s)

        if self.LAZY_BOOKKEEPING:
            out = self._defer(rows, budgets, remaining, later=later)
        else:
            out = self._defer(rows, budgets, remaining, later()[1])
        return BudgetPlan(out, int(out.max(initial=0)))

    # The next plan of a feedback's rows, made by its native job (prepare_ahead, plan_ahead);
    # False: the plan makes it (the reference: the same plans, tests/sglang/test_plan_ahead.py).
    AHEAD = True

    def prepare_ahead(self) -> None:
        """During the verify forward (the session's recording job, after the recording):
        the next plan's inputs of the latest plan's rows that the verify outcomes do not
        change -- the outcome calibration's cells and pending arrays, the rows' calibration
        factors, the length index (brought up to date), the probe schedule and the cost
        model -- copied into a ``native.PlanAhead``, which waits for the feedback's
        generated counts (:meth:`plan_ahead`). Built here, in the forward's shadow, so the
        feedback only adds those counts. Nothing where the plan would not take the fused
        path or the rows are not the planned ones (their outcomes read with no row map)."""
        self._ahead_pre = None
        rows = self._planned_rows
        cfg, cost = self.config, self.cost
        if (rows is None or not (self.AHEAD and self.FUSED and cfg.curve_mode == "online" and self.NATIVE_CURVES
                                 and type(rows) is R.BudgetRows and not cfg.uniform_width
                                 and cfg.lookahead != "stationary" and _allocation.NATIVE and len(rows))):
            return
        oc = self._outcomes
        if type(oc) is not OnlineCalibration or not oc.NATIVE_ADD:
            return
        self.settle_plan()
        ids = R.req_ids(rows)
        n = len(ids)
        prev = oc._row_states
        # (OnlineCalibration._update_native's "same rows" case: the planned rows, each once)
        if (prev is None or not oc._rows_unique or not (prev[0] is ids or prev[0] == ids)
                or len(oc._pending) != n or oc._pending_ids != ids):
            return
        pids = R.problem_ids(rows)
        query = getattr(self.lengths, "query_inputs", None)
        lengths = query(pids) if query is not None else None
        if lengths is None:
            return
        w, prior = self.acceptance.calibration_prior()
        sums, slots = self.acceptance.calibration_inputs(pids)
        probes = self._probes
        native = plan_ahead(
            oc._cells, oc._decay, np.ascontiguousarray(R.generated(rows), dtype=np.int64), prev[1],
            np.ascontiguousarray(oc._pending_budget, dtype=np.int64),
            np.ascontiguousarray(oc._pending_generated, dtype=np.int64),
            np.ascontiguousarray(oc._pending_match, dtype=np.int64),
            np.ascontiguousarray(oc._pending_nodes, dtype=np.float64),
            np.ascontiguousarray(oc._pending_bins, dtype=np.int64), oc._bin_before, oc._bin_size,
            float(cfg.calibration_prior_tokens), float(cfg.prior_alpha), oc._depth_bin, oc._rank_bin,
            int(cfg.max_budget), _MATCH_LUT, sums, slots, float(w), float(w * prior), float(prior), *lengths[:2],
            lengths[2], np.ascontiguousarray(R.max_new(rows), dtype=np.int64),
            np.ascontiguousarray(R.prompt_len(rows), dtype=np.int64), cost.c_base_s, cost.c_tok_s, cost.c_kv_s,
            self.spread(), max(cost.free_tokens - n, 0.0), float(cfg.min_gain), int(cfg.probe_budget),
            probes.due(rows) if cfg.probe_budget > 0 else None, probes.spent_s, cfg.probe_share * probes.total_s)
        self._ahead_pre = (native, ids, self._epoch, oc._cells, prev)

    def plan_ahead(self, req_ids: list, generated: np.ndarray, wait=None, finishing: np.ndarray | None = None,
                   cut: int = -1):
        """At a feedback of the rows :meth:`prepare_ahead` prepared (``req_ids``, their
        generated counts after it, int64): the ``native.PlanAhead`` to hand the feedback's
        extend + draft job (``SuffixDrafter.start_extend(..., ahead=)``). The job runs what
        the next :meth:`prepare` and :meth:`plan` of these rows would compute --
        ``OnlineCalibration.update`` and ``table``, the calibration factors, the length
        predictions, ``online_plan`` -- on its drafts, without the GIL, while the engine
        processes the step's results. The next plan uses the results if nothing they read
        has changed: the same rows and generated counts, no observation, step or
        bookkeeping since, its drafts the job's (:meth:`ahead_drafts`); otherwise it
        computes them itself. ``wait`` waits for the job: called before anything changes
        the length index the job reads. ``finishing``: the rows whose requests finish with
        this step (bool per row, or None): the job leaves their outcomes out of its
        calibration update -- the next plan, without those requests, does not read them
        either (a finished request's last run is cut by its stop) -- and a plan of rows that
        still hold one of them does not use it. ``cut`` >= 0: the job also cuts its trees to
        the plan's budgets, at most ``cut`` nodes a row (:meth:`take_ahead_cut`). None when
        nothing was prepared for these rows (or anything changed since)."""
        pre, self._ahead_pre = self._ahead_pre, None
        self.drop_ahead()
        if pre is None:
            return None
        native, ids, epoch, cells, row_states = pre
        oc = self._outcomes
        if (epoch != self._epoch or oc._cells is not cells or oc._row_states is not row_states
                or not (ids is req_ids or ids == req_ids)):
            return None
        native.set_generated(generated)
        skipped = None
        if finishing is not None and finishing.any():
            skipped = finishing.copy()
            native.skip_outcomes(finishing.nonzero()[0])
        if cut >= 0:
            native.cut_at(cut)
        self._ahead = _Ahead(native, ids, generated, epoch, cells, row_states, wait, skipped, int(cut))
        return native


class PaperClosedForm(_ModelBased):
    name = "paper"

    def plan(self, rows: Sequence[BudgetRow]) -> BudgetPlan:
        self.settle_plan()
        if not rows:
            return BudgetPlan.none(0)
        prepared = self._start_plan(rows)
        remaining, (_, caps), _, factors = self.inputs(rows, prepared)
        params = {}
        for pid in factors:
            est = self.acceptance.estimate(pid)
            params[pid] = paper_params(est.alpha, est.k)
        pids = R.problem_ids(rows)
        alpha_p = np.array([params[p][0] for p in pids])
        k_p = np.array([params[p][1] for p in pids])
        n_star = max(paper_optimal_n(remaining, alpha_p, k_p, self.cost), 1.0)
        total = paper_budget(remaining, n_star, alpha_p, k_p)
        per_step = np.where(np.isfinite(total), total / n_star, np.inf)
        budgets = np.minimum(np.round(np.minimum(per_step, 1e9)), caps).astype(np.int32)
        budgets = self._defer(rows, budgets)
        return BudgetPlan(budgets, int(budgets.max(initial=0)))


POLICIES = {
    "none": NoSpeculation,
    "fixed": FixedBudget,
    "unlimited": UnlimitedBudget,
    "length-aware": LengthAware,
    "paper": PaperClosedForm,
}


def make_policy(name: str, cost_model: CostModel | str | None = None,
                config: PolicyConfig | None = None) -> DraftBudget:
    """Build a policy by its CLI name (``POLICIES``); cost models only matter to the
    model-based ones."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: choose one of {sorted(POLICIES)}")
    cls = POLICIES[name]
    if issubclass(cls, _ModelBased):
        return cls(cost_model, config)
    return cls(config=config)
