"""Settings of the draft-budget policies. Every policy default lives here, once."""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

from das_sglang.core.config import DrafterConfig, check_field
from das_sglang.core.cost_model import DEFAULT_PRESET, PRESETS, CostModel


CURVE_MODES = ("online", "outcome", "tree", "capped", "blend")


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Draft-budget policy settings.

    max_budget          most draft nodes one request gets in one step (UnlimitedBudget uses
                        all of them); the drafter's own cap by default.
    fixed_budget        FixedBudget's per-request budget.
    uniform_width       the engine pads every row to the batch width (a uniform verify
                        layout): the policy plans one width and the cost model charges
                        ``rows * (1 + width)`` tokens per forward; false: per-request budgets,
                        each request charged its own tokens (ragged verify). The SGLang
                        worker sets it from its verify layout unless configured.
    cost_preset         CostModel preset used when a policy is built without a cost model.
    length_window_steps training steps of finished lengths kept per problem for prediction.
    class_quantiles     Short/Medium/Long boundaries as quantiles of the pooled window ...
    class_thresholds    ... or fixed boundaries in tokens (overrides the quantiles).
    prior_length        expected length of a rollout when no history exists at all.
    tail_factor         a request longer than all its history is predicted to run
                        ``tail_factor * generated_len`` more tokens (heavy-tail rule).
    prior_alpha/prior_k acceptance model (see core/acceptance.py) assumed with no outcomes;
    prior_weight        ... worth this many outcomes when mixed with real ones.
    calibration_prior_tokens  drafter-expected tokens of pseudo-evidence for "calibration 1".
    budget_calibration  scale each budget's calibrated curve by how that budget's own
                        outcomes compare (``AcceptanceTracker.budget_shape``).
    acceptance_memory   recent verify outcomes kept per problem for the (alpha, k) fit.
    refit_every         refit (alpha, k) after this many new outcomes.
    min_gain            speculate only when the modeled time saving is at least this share.
    curve_mode          LengthAware's acceptance curve per row: "online" (the default: as
                        "outcome", also conditioned on the draft's match length, forgetting,
                        unseen cells start from the prior: core/online_acceptance.py),
                        "outcome" (this step's node
                        probabilities calibrated per node-rank bin and the request's last
                        verify outcome, acceptance.OutcomeCalibration), "tree" (calibrated by
                        one factor per problem), "capped" (that, capped by the problem's
                        fitted mean curve), "blend" (tree and fitted curve averaged).
    lookahead           "stationary": LengthAware keeps the budgets that minimise the modeled
                        time if held until the batch ends; "marginal": pays this forward's
                        drafts at today's batch size against what each accepted token saves
                        later (see allocation.lookahead_step_budgets).
    critical_spread     how uncertain "which row ends last" is, as a share of the makespan.
    cost_c_base_ms ...  measured cost-model coefficients replacing the preset's (None keeps
    cost_c_tok_us       the preset's): per-forward ms, per processed token us, per KV token
    cost_c_kv_ns        ns. ``benchmarks/fit_cost_model.py`` writes them from a timing table.
    cost_free_tokens    tokens per forward that cost no ``c_tok`` (they fit in the weight-read
                        time: the roofline ridge point; the GPU presets derive it, a fit
                        measures it; 0 = every token pays).
    cost_graph_widths   draft widths (tokens per request - 1) SGLang runs as CUDA graphs, and
    cost_graph_ms       the extra ms per forward at each of them (may be < 0: a graph replay
                        is cheaper than the linear model's eager launch overhead);
    cost_eager_widths   widths with a measured eager extra cost, and that cost in ms
    cost_eager_ms       (interpolated between them; 0 when none are given).
    cost_host_us_per_request  DAS host time per request and decode step (us) the policy and
                        the replay charge on top of each forward.
    width_buckets       verify widths the worker may use (e.g. 0,1,2,4,8,16: CUDA-graph
                        friendly); the policy picks the cheapest bucket, padding included,
                        and ``max_budget`` is always allowed. None (default; the SGLang
                        worker defaults to GRAPH_BUCKETS): any width.
    length_error_prior  RMS log error of the length predictions assumed before any finish ...
    length_error_memory ... and how many finished requests the observed error averages over;
                        LengthAware widens critical_spread to the observed error.
    outcome_halflife    curve_mode "online": plans (forward passes) after which a verify
                        outcome weighs half as much (0 = never forget).
    probe_every         a request not drafted for this many plans is due a probe draft ...
    probe_budget        ... of this many nodes (LengthAware; 0 = never probe) ...
    probe_share         ... while all probes cost at most this share of the modeled time of
                        every forward so far (so a budget of 0 is never final).
    draft_headroom      LengthAware, batches of at least ``draft_headroom_min_rows`` rows: a
                        request's next draft tree has at most ``ceil(draft_headroom * its
                        latest budget)`` nodes, and at least ``max(1, probe_budget)`` (its
                        first one: ``max_budget``), so a large batch whose budgets are small
                        drafts small trees (drafting is per-row host work) while a row's
                        budget can still grow by that factor per step. 0 = every draft has
                        ``max_budget`` nodes.
    draft_headroom_min_rows  (see draft_headroom; smaller batches draft full trees)
    """

    max_budget: int = DrafterConfig().max_budget
    fixed_budget: int = 8
    uniform_width: bool = False
    cost_preset: str = DEFAULT_PRESET
    length_window_steps: int = 4
    class_quantiles: tuple[float, float] = (1.0 / 3.0, 2.0 / 3.0)
    class_thresholds: tuple[int, int] | None = None
    prior_length: int = 2048
    tail_factor: float = 0.5
    prior_alpha: float = 0.5
    prior_k: float = 4.0
    prior_weight: float = 8.0
    calibration_prior_tokens: float = 8.0
    budget_calibration: bool = False
    acceptance_memory: int = 256
    refit_every: int = 16
    min_gain: float = 0.0
    curve_mode: str = "online"
    lookahead: str = "marginal"
    critical_spread: float = 0.2
    cost_c_base_ms: float | None = None
    cost_c_tok_us: float | None = None
    cost_c_kv_ns: float | None = None
    cost_free_tokens: float | None = None
    cost_graph_widths: tuple[int, ...] = ()
    cost_graph_ms: tuple[float, ...] = ()
    cost_eager_widths: tuple[int, ...] = ()
    cost_eager_ms: tuple[float, ...] = ()
    cost_host_us_per_request: float = 0.0
    width_buckets: tuple[int, ...] | None = None
    length_error_prior: float = 0.05
    length_error_memory: float = 256.0
    outcome_halflife: float = 256.0
    probe_every: int = 8
    probe_budget: int = 2
    probe_share: float = 0.03
    draft_headroom: float = 2.0
    draft_headroom_min_rows: int = 64

    def __post_init__(self) -> None:
        check_field(0 <= self.max_budget <= 1024, "max_budget", self.max_budget, "must be in [0, 1024]")
        check_field(0 <= self.fixed_budget <= self.max_budget, "fixed_budget", self.fixed_budget,
               f"must be in [0, max_budget={self.max_budget}]")
        check_field(self.cost_preset in PRESETS, "cost_preset", self.cost_preset,
               f"must be one of {sorted(PRESETS)}")
        check_field(self.length_window_steps >= 0, "length_window_steps", self.length_window_steps,
               "must be >= 0")
        q1, q2 = self.class_quantiles
        check_field(0.0 < q1 < q2 < 1.0, "class_quantiles", self.class_quantiles,
               "must satisfy 0 < q1 < q2 < 1")
        if self.class_thresholds is not None:
            t1, t2 = self.class_thresholds
            check_field(0 < t1 < t2, "class_thresholds", self.class_thresholds,
                   "must satisfy 0 < short/medium < medium/long")
        check_field(self.prior_length >= 1, "prior_length", self.prior_length, "must be >= 1")
        check_field(self.tail_factor > 0.0, "tail_factor", self.tail_factor, "must be > 0")
        check_field(0.0 <= self.prior_alpha <= 1.0, "prior_alpha", self.prior_alpha, "must be in [0, 1]")
        check_field(self.prior_k >= 0.0, "prior_k", self.prior_k, "must be >= 0")
        check_field(self.prior_weight > 0.0, "prior_weight", self.prior_weight, "must be > 0")
        check_field(self.calibration_prior_tokens > 0.0, "calibration_prior_tokens",
               self.calibration_prior_tokens, "must be > 0")
        check_field(self.acceptance_memory >= 1, "acceptance_memory", self.acceptance_memory, "must be >= 1")
        check_field(self.refit_every >= 1, "refit_every", self.refit_every, "must be >= 1")
        check_field(0.0 <= self.min_gain < 1.0, "min_gain", self.min_gain, "must be in [0, 1)")
        check_field(self.lookahead in ("stationary", "marginal"), "lookahead", self.lookahead,
               "must be stationary or marginal")
        check_field(self.critical_spread > 0.0, "critical_spread", self.critical_spread, "must be > 0")
        check_field(self.curve_mode in CURVE_MODES, "curve_mode", self.curve_mode,
               f"must be one of {', '.join(CURVE_MODES)}")
        check_field(self.length_error_prior >= 0.0, "length_error_prior", self.length_error_prior, "must be >= 0")
        check_field(self.length_error_memory >= 1.0, "length_error_memory", self.length_error_memory, "must be >= 1")
        check_field(self.outcome_halflife >= 0.0, "outcome_halflife", self.outcome_halflife, "must be >= 0")
        check_field(self.probe_every >= 1, "probe_every", self.probe_every, "must be >= 1")
        check_field(0 <= self.probe_budget <= self.max_budget, "probe_budget", self.probe_budget,
                    f"must be in [0, max_budget={self.max_budget}]")
        check_field(0.0 <= self.probe_share < 1.0, "probe_share", self.probe_share, "must be in [0, 1)")
        check_field(isinstance(self.draft_headroom, (int, float)) and not isinstance(self.draft_headroom, bool)
                    and (self.draft_headroom == 0 or 1.0 <= self.draft_headroom <= 1024.0),
                    "draft_headroom", self.draft_headroom, "must be 0 (off) or in [1, 1024]")
        check_field(isinstance(self.draft_headroom_min_rows, int) and not isinstance(self.draft_headroom_min_rows, bool)
                    and self.draft_headroom_min_rows >= 0, "draft_headroom_min_rows",
                    self.draft_headroom_min_rows, "must be an int >= 0")
        for name in ("cost_c_base_ms", "cost_c_tok_us", "cost_c_kv_ns", "cost_host_us_per_request",
                     "cost_free_tokens"):
            v = getattr(self, name)
            check_field(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and v >= 0 and v == v and v != float("inf")),
                        name, v, "must be a finite number >= 0")
        if self.width_buckets is not None:
            wb = self.width_buckets
            check_field(isinstance(wb, tuple) and len(wb) > 0 and all(
                isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in wb)
                and list(wb) == sorted(set(wb)) and wb[0] == 0,
                "width_buckets", wb, "must be increasing ints >= 0 starting with 0")
        try:
            self.cost_model()
        except ValueError as e:
            raise ValueError(f"invalid cost_* coefficients: {e}") from None

    def cost_model(self, base: CostModel | None = None) -> CostModel:
        """``base`` (default: the ``cost_preset``) with the measured ``cost_*`` coefficients."""
        base = PRESETS[self.cost_preset] if base is None else base
        changes = {}
        for name, attr, scale in (("cost_c_base_ms", "c_base_s", 1e-3), ("cost_c_tok_us", "c_tok_s", 1e-6),
                                  ("cost_c_kv_ns", "c_kv_s", 1e-9)):
            if getattr(self, name) is not None:
                changes[attr] = float(getattr(self, name)) * scale
        if self.cost_graph_widths or self.cost_graph_ms:
            changes.update(graph_widths=tuple(self.cost_graph_widths),
                           graph_extra_s=tuple(x * 1e-3 for x in self.cost_graph_ms))
        if self.cost_eager_widths or self.cost_eager_ms:
            changes.update(eager_widths=tuple(self.cost_eager_widths),
                           eager_extra_s=tuple(x * 1e-3 for x in self.cost_eager_ms))
        if self.cost_free_tokens is not None:
            changes["free_tokens"] = float(self.cost_free_tokens)
        if self.cost_host_us_per_request:
            changes["host_s_per_request"] = self.cost_host_us_per_request * 1e-6
        return base.with_coefficients(**changes) if changes else base

    def buckets(self, max_width: int | None = None) -> tuple[int, ...] | None:
        """Allowed verify widths up to ``max_width`` (default ``max_budget``), which is
        always one of them (SGLang captures its graphs at the full width); None: any."""
        if self.width_buckets is None:
            return None
        return _buckets(self.width_buckets, self.max_budget if max_width is None else int(max_width))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@lru_cache(maxsize=64)
def _buckets(width_buckets: tuple[int, ...], top: int) -> tuple[int, ...]:
    """:meth:`PolicyConfig.buckets` (asked twice a plan: made once per buckets and width)."""
    return tuple(sorted({w for w in width_buckets if w <= top} | {top}))
