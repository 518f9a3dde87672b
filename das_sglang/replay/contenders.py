"""The contenders a replay compares: no speculation, the SuffixDecoding baseline, DAS, and
DAS ablations, each a (drafter, policy) pair built fresh per run.

| name             | drafter                                   | policy          |
|------------------|-------------------------------------------|-----------------|
| none             | -                                         | NoSpeculation   |
| suffix-decoding  | SuffixDecodingDrafter (global FIFO + own) | FixedBudget(32) |
| das              | SuffixDrafter (per problem, window)       | LengthAware     |
| das-no-window    | all history, no step decay                | LengthAware     |
| das-fixed        | SuffixDrafter                             | FixedBudget(8)  |
| das-unlimited    | SuffixDrafter                             | UnlimitedBudget |
| das-chain        | chains instead of trees                   | LengthAware     |
| das-global       | one index for all problems                | LengthAware     |
| das-paper        | SuffixDrafter                             | PaperClosedForm |
| das-graphs       | SuffixDrafter, uniform verify             | LengthAware + CUDA-graph tiers |

``das-graphs`` is the SGLang worker on a uniform-verify backend with CUDA graphs (the
Triton backend; FlashInfer with ``verify_layout=uniform``): its policy plans with the
measured price of an eager verify beside the one width SGLang replays as a graph
(``core.graph_tiers``), so it pads the batch out to that width when that is cheaper.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

from das_sglang.core.config import DrafterConfig
from das_sglang.core.cost_model import CostModel
from das_sglang.replay.baselines import SuffixDecodingConfig, SuffixDecodingDrafter
from das_sglang.replay.simulator import Contender


def _das_drafter(cfg: DrafterConfig, all_history: bool = False) -> Callable[[], object]:
    def make():
        from das_sglang.core.drafter import SuffixDrafter

        drafter = SuffixDrafter(cfg)
        return _AllHistory(drafter) if all_history else drafter

    return make


class _AllHistory:
    """"No window" ablation: the wrapped drafter never leaves step 0, so nothing is evicted
    and every rollout weighs 1 (the native index holds only a few step slots, so a window
    spanning all steps is not an option)."""

    def __init__(self, inner):
        self._inner = inner

    def advance_step(self, step: int) -> None:
        pass

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _make_policy(kind: str, cost: CostModel, uniform: bool, budget: int, fixed: int | None = None):
    """``fixed`` = FixedBudget's k (default: PolicyConfig's); ``budget`` = the max budget."""

    def make():
        from das_sglang.core.policy import make_policy
        from das_sglang.core.policy_config import PolicyConfig

        k = PolicyConfig().fixed_budget if fixed is None else fixed
        cfg = PolicyConfig(max_budget=budget, fixed_budget=min(k, budget), uniform_width=uniform)
        return make_policy(kind, cost, cfg)

    return make


CONTENDER_NAMES = (
    "none", "suffix-decoding", "das", "das-no-window", "das-fixed", "das-unlimited", "das-chain", "das-global",
    "das-paper", "das-graphs",
)

# One line per contender, for `das replay --help` (the table in the module docstring).
CONTENDER_HELP = {
    "none": "no speculation (the baseline every ratio is against)",
    "suffix-decoding": "SuffixDecoding: global FIFO index + the request's own text, <= 32 drafts capped by match length",
    "das": "DAS: per-problem window index (history, live siblings, own text) + LengthAware budgets",
    "das-no-window": "ablation: all history, no step decay, LengthAware",
    "das-fixed": "ablation: DAS drafter, FixedBudget(8) for every request",
    "das-unlimited": "ablation: DAS drafter, every node found (up to the max budget)",
    "das-chain": "ablation: chain drafts instead of trees, LengthAware",
    "das-global": "ablation: one index for all problems, LengthAware",
    "das-paper": "DAS drafter + the paper's closed-form budget",
    "das-graphs": "DAS on the uniform verify, planning with the CUDA-graph tiers the worker measures "
                  "(pads to the graph width when cheaper than an eager verify)",
}

# What `das replay` compares unless told otherwise: the baselines, DAS, and one ablation per
# DAS ingredient (window, length-awareness, trees, per-problem indexes).
DEFAULT_CONTENDERS = ("none", "suffix-decoding", "das", "das-no-window", "das-fixed", "das-chain", "das-global")


def build_contenders(
    names: Sequence[str],
    cost: CostModel,
    engine: str = "ragged",
    drafter: DrafterConfig = DrafterConfig(),
    suffix: SuffixDecodingConfig = SuffixDecodingConfig(),
) -> list[Contender]:
    unknown = [n for n in names if n not in CONTENDER_NAMES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}: choose from {list(CONTENDER_NAMES)}")
    # As the SGLang worker's policy: per-request budgets priced by their own tokens where
    # the engine verifies ragged, one batch width (padding paid) on the uniform engine;
    # ragged-width verifies the batch-width budgets ragged.
    uniform = engine != "ragged"
    k = drafter.max_budget
    pol = lambda kind, b=k, fixed=None: _make_policy(kind, cost, uniform, b, fixed)  # noqa: E731
    table = {
        "none": lambda: Contender("none", pol("none"), None, 0, description="no speculation"),
        "suffix-decoding": lambda: Contender(
            "suffix-decoding", pol("fixed", suffix.max_budget, suffix.max_budget),
            lambda: SuffixDecodingDrafter(suffix), suffix.max_budget,
            description=f"SuffixDecoding: global FIFO + per-request index, depth {suffix.max_depth}, "
                        f"<= {suffix.max_budget} drafts capped by match length, min prob {suffix.min_token_prob}"),
        "das": lambda: Contender("das", pol("length-aware"), _das_drafter(drafter), k,
                                 description="DAS: per-problem window + LengthAware budgets"),
        "das-no-window": lambda: Contender(
            "das-no-window", pol("length-aware"),
            _das_drafter(drafter, all_history=True), k,
            description="ablation: all history, no step decay"),
        "das-fixed": lambda: Contender("das-fixed", pol("fixed"), _das_drafter(drafter), k,
                                       description="ablation: FixedBudget(PolicyConfig.fixed_budget), no length model"),
        "das-unlimited": lambda: Contender("das-unlimited", pol("unlimited"), _das_drafter(drafter), k,
                                           description="ablation: UnlimitedBudget"),
        "das-chain": lambda: Contender("das-chain", pol("length-aware"), _das_drafter(replace(drafter, tree=False)),
                                       k, description="ablation: chain drafts instead of trees"),
        "das-paper": lambda: Contender("das-paper", pol("paper"), _das_drafter(drafter), k,
                                       description="DAS drafter + the paper's closed-form budget"),
        "das-graphs": lambda: Contender(
            "das-graphs", _make_policy("length-aware", cost, True, k), _das_drafter(drafter), k,
            engine="uniform",
            description="DAS on the uniform verify, planning with the measured CUDA-graph tiers"),
        "das-global": lambda: Contender("das-global", pol("length-aware"), _das_drafter(drafter), k,
                                        shared_problem=True, description="ablation: one index for all problems"),
    }
    return [table[n]() for n in names]
