"""DAS options of the SGLang integration: one documented place, validated up front.

SGLang's own flags are used where they fit: ``--speculative-num-draft-tokens N`` is the
verify width (root + ``N - 1`` draft nodes), so the most draft nodes a request gets in
one step is ``N - 1``. Everything else comes from the environment variable
``DAS_CONFIG``: a JSON object, or a path to a JSON file, with up to three sections that
map one to one onto frozen config dataclasses::

    {"drafter": {<DrafterConfig fields>},   # das_sglang/core/config.py
     "policy":  {<PolicyConfig fields>},    # das_sglang/core/policy_config.py
     "server":  {<ServerConfig fields>}}    # below

Unknown sections or fields, and values a dataclass rejects, raise ValueError naming them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from das_sglang.core.config import DrafterConfig
from das_sglang.core.policy import POLICIES
from das_sglang.core.policy_config import PolicyConfig

ENV = "DAS_CONFIG"
VERIFY_LAYOUTS = ("auto", "ragged", "uniform")
FORWARD_HOOKS = ("auto", "before_launch", "after_launch")
# Verify widths (draft tokens per request) the worker uses by default; the largest is always
# max_nodes (PolicyConfig.buckets). Few, so that few shapes reach the attention kernels and a
# graph per width could be captured; stock SGLang 0.5.23 captures a speculative target's
# verify graphs at max_nodes + 1 tokens only, every other width runs eagerly (what
# `das replay --graphs stock` charges; docs/cost_model.md).
GRAPH_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Settings of the SGLang worker itself.

    policy            draft-budget policy, by its ``das`` CLI name (core/policy.py
                      POLICIES): length-aware (default), paper, fixed
                      (PolicyConfig.fixed_budget per request), unlimited (max_budget for
                      every request), none (verify the root only: no speculation).
    history_path      directory of the history snapshot: loaded at worker start when it
                      holds one, saved every ``snapshot_interval`` finished requests and at
                      shutdown; it holds the history window and the length predictor's
                      finished lengths. None keeps history in memory only.
    snapshot_interval finished requests between two snapshot saves (0 = only at shutdown).
    strict_snapshot   a snapshot that cannot be loaded stops the worker (True) or is
                      logged and ignored, the worker starting with empty history (False,
                      the default: losing history costs speed, never correctness); the
                      ignored file is renamed ``history.dassnap.unusable-<time>-<pid>``,
                      not overwritten (e.g. a newer format after a downgrade).
    verify_layout     how a decode batch is verified (sglang/ragged.py): ``auto`` (the
                      default) verifies each request's own tree size in one ragged
                      forward where the TARGET_VERIFY backend supports it (FlashInfer;
                      torch_native in CPU development mode) and pads every request to
                      the batch width elsewhere; ``ragged`` requires ragged support
                      (start-up fails without it); ``uniform`` always pads. Budgets
                      follow the layout unless ``policy.uniform_width`` is set: per
                      request, priced by its own tokens, where verify is ragged; one
                      batch width, padding priced, where it pads (``for_layout``).
    stats_path        file the worker rewrites (atomically) after every verify step with
                      its counters (verify steps, of them ragged (``ragged_steps``) and
                      replayed as a CUDA graph (``graph_steps``), verify tokens submitted
                      to the target,
                      draft tokens proposed and accepted, layout, budget form,
                      ``host``: DAS's plan and feedback ms, the verify's forward + tree
                      walk ms and SGLang's own ms between two decode steps,
                      ``sglang/host_time.py``; and the captured verify graph's width and
                      the measured CUDA-graph tiers, ``graph_width`` / ``graph_tiers``,
                      ``core/graph_tiers.py``); None = off. For benchmarks and debugging.
    async_updates     history updates (the drafter's batch extend, GIL-free), the length
                      index rebuild and snapshot writes run off the scheduler thread; reads
                      wait for pending updates first (True, default). False: all inline.
    forward_hook      where the worker starts the step's background work
                      (``DasSession.before_forward``: the policy's recording, the eviction
                      chunk, the plan's new requests' registration): ``after_launch`` once
                      the verify forward is launched (its ~0.05-0.1 ms at 512 rows then
                      overlaps the device's forward instead of delaying its start),
                      ``before_launch`` just before it (the forward is synchronous there:
                      started after it, that work would run beside the host work that
                      follows instead of beside the forward). ``auto`` (default):
                      ``after_launch`` on a CUDA device, ``before_launch`` elsewhere.
                      With ``after_launch`` a step whose plan is the one the feedback's
                      job made ahead (at least 64 rows) also verifies that plan's trees
                      at once and registers the step's new requests and makes the plan
                      itself after the launch (``DasSession.launch_plan``; worker stats
                      ``launched_first``, ``launch_mismatch``: docs/design.md "Launch
                      first, plan after").
    background_nice   nice value (0-19) of the native threads the feedback's extend +
                      pre-draft job runs on beside SGLang's own result processing (Linux:
                      per thread). On a host with spare cores it changes nothing; where
                      cores are short the job yields them to the scheduler thread, whose
                      Python it would otherwise slow (2-core VM, 512 rows: that slowdown
                      was ~6 ms a step at 0, none at 10; the job has the engine's whole
                      gap to finish). 0 = the scheduler thread's priority.
    shard_path        shared directory of per-problem history shards (scale-out: many
                      engines behind a router, core/shards.py): a problem this engine
                      does not hold is loaded from it lazily, and this engine's rollouts
                      of a problem are written to it when the problem's requests finish.
                      None = off.
    engine_id         this engine's name in ``shard_path`` (its shard files and stats);
                      must be unique among live engines and stable across restarts.
                      None = ``<hostname>-<port>``.
    """

    policy: str = "length-aware"
    history_path: str | None = None
    snapshot_interval: int = 256
    strict_snapshot: bool = False
    verify_layout: str = "auto"
    stats_path: str | None = None
    async_updates: bool = True
    forward_hook: str = "auto"
    background_nice: int = 10
    shard_path: str | None = None
    engine_id: str | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"invalid policy={self.policy!r}: must be one of {sorted(POLICIES)}")
        if self.snapshot_interval < 0:
            raise ValueError(f"invalid snapshot_interval={self.snapshot_interval!r}: must be >= 0")
        if (isinstance(self.background_nice, bool) or not isinstance(self.background_nice, int)
                or not 0 <= self.background_nice <= 19):
            raise ValueError(f"invalid background_nice={self.background_nice!r}: must be an int in [0, 19]")
        if self.forward_hook not in FORWARD_HOOKS:
            raise ValueError(f"invalid forward_hook={self.forward_hook!r}: must be one of {FORWARD_HOOKS}")
        if self.verify_layout not in VERIFY_LAYOUTS:
            raise ValueError(
                f"invalid verify_layout={self.verify_layout!r}: must be one of {VERIFY_LAYOUTS}"
            )
        if self.shard_path is not None and (not isinstance(self.shard_path, str) or not self.shard_path):
            raise ValueError(f"invalid shard_path={self.shard_path!r}: must be a non-empty path")
        if self.engine_id is not None:
            from das_sglang.core.shards import check_engine_id

            check_engine_id(self.engine_id)


@dataclass(frozen=True, slots=True)
class DasOptions:
    drafter: DrafterConfig
    policy: PolicyConfig
    server: ServerConfig
    max_nodes: int  # draft nodes per request per step: speculative_num_draft_tokens - 1
    # policy.uniform_width was not configured: the worker sets it from its verify layout
    # (for_layout): per-request budgets where it verifies ragged, one padded width elsewhere.
    width_from_layout: bool = False
    # policy.width_buckets was not configured: GRAPH_BUCKETS until the worker knows which
    # widths its engine replays as CUDA graphs (for_engine_graphs).
    buckets_from_engine: bool = False


_SECTIONS = {"drafter": DrafterConfig, "policy": PolicyConfig, "server": ServerConfig}


def hook_after_launch(forward_hook: str, device) -> bool:
    """Whether the worker starts the step's background work after launching the verify
    forward (``server.forward_hook``; ``auto``: where ``device`` is a CUDA device, whose
    launch returns before the forward ends)."""
    if forward_hook not in FORWARD_HOOKS:
        raise ValueError(f"invalid forward_hook={forward_hook!r}: must be one of {FORWARD_HOOKS}")
    if forward_hook == "auto":
        return str(device).split(":")[0] == "cuda"
    return forward_hook == "after_launch"


def load_options(num_draft_tokens: int | None, raw: str | None = None) -> DasOptions:
    """Options from ``raw`` (default: env ``DAS_CONFIG``) and SGLang's verify width.

    ``num_draft_tokens`` None (not resolved yet) skips the width checks.
    """
    text = os.environ.get(ENV, "") if raw is None else raw
    sections = parse_config(text)
    built = {name: _build(name, cls, sections.get(name, {})) for name, cls in _SECTIONS.items()}
    if num_draft_tokens is None:
        return DasOptions(**built, max_nodes=built["drafter"].max_budget)
    if num_draft_tokens < 2:
        raise ValueError(
            f"invalid speculative_num_draft_tokens={num_draft_tokens!r}: DAS needs >= 2 "
            "(the root plus at least one draft node)"
        )
    max_nodes = num_draft_tokens - 1
    drafter = _fit_budget("drafter", built["drafter"], sections.get("drafter", {}), max_nodes)
    policy = _fit_budget("policy", built["policy"], sections.get("policy", {}), max_nodes)
    auto_width = "uniform_width" not in sections.get("policy", {})
    if auto_width:
        # Until the worker knows its verify layout (for_layout): the padded layout's pricing.
        policy = replace(policy, uniform_width=True)
    auto_buckets = "width_buckets" not in sections.get("policy", {})
    if auto_buckets:
        # A graph per bucket width assumed until the worker knows its engine's graphs
        # (for_engine_graphs); sessions without a worker (benchmarks) keep them.
        policy = replace(policy, width_buckets=GRAPH_BUCKETS)
    return DasOptions(drafter=drafter, policy=policy, server=built["server"], max_nodes=max_nodes,
                      width_from_layout=auto_width, buckets_from_engine=auto_buckets)


def for_layout(options: DasOptions, layout: str) -> DasOptions:
    """``options`` for a worker that verifies with ``layout`` (``ragged`` / ``uniform``).

    Unless ``policy.uniform_width`` was configured, budgets follow the layout: a ragged
    verify submits each request's own tree, so the policy plans per-request budgets priced
    by total tokens (large for requests predicted to finish last, none for short ones); a
    uniform one pads every row to the batch width, so the policy plans that one width and
    pays the padding."""
    if not options.width_from_layout:
        return options
    if layout not in ("ragged", "uniform"):
        raise ValueError(f"invalid verify layout {layout!r}: choose ragged or uniform")
    return replace(options, policy=replace(options.policy, uniform_width=layout == "uniform"))


def for_engine_graphs(options: DasOptions) -> DasOptions:
    """``options`` for a worker on stock SGLang, which captures verify graphs at one width
    (the full one) or none: unless ``policy.width_buckets`` was configured, no buckets --
    a bucket-padded verify narrower than the full width runs eagerly anyway, so its padding
    would only add rows (the full width is priced by the CUDA-graph tiers instead)."""
    if not options.buckets_from_engine:
        return options
    return replace(options, policy=replace(options.policy, width_buckets=None),
                   buckets_from_engine=False)


def parse_config(text: str) -> dict[str, dict[str, Any]]:
    """``DAS_CONFIG``'s text (a JSON object or a path to one) -> its sections, unbuilt."""
    text = text.strip()
    if not text:
        return {}
    if not text.startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"invalid {ENV}={text!r}: neither a JSON object nor a file")
        text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid {ENV}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"invalid {ENV}={data!r}: must be a JSON object")
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"invalid {ENV} section(s) {unknown}: known are {sorted(_SECTIONS)}")
    for name, value in data.items():
        if not isinstance(value, dict):
            raise ValueError(f"invalid {ENV} section {name}={value!r}: must be a JSON object")
    return data


def _build(section: str, cls: type, values: dict[str, Any]):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"invalid {ENV} field(s) {section}.{unknown}: {cls.__name__} has {sorted(known)}"
        )
    # JSON has no tuples; the dataclasses use them for pairs.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid {ENV} section {section}: {e}") from None


def _fit_budget(section: str, cfg, given: dict[str, Any], max_nodes: int):
    """Default ``max_budget`` (and fixed_budget) to fit the verify width; reject an
    explicit ``max_budget`` above it."""
    if "max_budget" not in given:
        changes = {"max_budget": min(cfg.max_budget, max_nodes)}
        if "fixed_budget" in (f.name for f in fields(cfg)) and "fixed_budget" not in given:
            changes["fixed_budget"] = min(cfg.fixed_budget, max_nodes)
        return replace(cfg, **changes)
    if cfg.max_budget > max_nodes:
        raise ValueError(
            f"invalid {ENV} {section}.max_budget={cfg.max_budget!r}: exceeds "
            f"speculative_num_draft_tokens - 1 = {max_nodes}"
        )
    return cfg


def validate_for_server(options: DasOptions) -> DasOptions:
    """Checks that need the file system, run in the launching process before any weights
    load: ``history_path`` must be a directory (or creatable as one), and with
    ``strict_snapshot`` an existing snapshot must load."""
    path = options.server.history_path
    if path is None:
        return options
    where = Path(path)
    if where.exists() and not where.is_dir():
        raise ValueError(f"invalid {ENV} server.history_path={path!r}: not a directory")
    probe = where if where.exists() else next((p for p in where.parents if p.exists()), None)
    if probe is None or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(
            f"invalid {ENV} server.history_path={path!r}: {probe} is not writable"
        )
    if options.server.strict_snapshot:
        from das_sglang.core.snapshot import load_history, snapshot_file

        if snapshot_file(where).exists():
            try:
                _, meta = load_history(where)
                lengths = (meta or {}).get("das_lengths")
                if lengths is not None:  # the length predictor's part must restore too
                    from das_sglang.core.length_predictor import LengthPredictor

                    LengthPredictor(options.policy).restore(lengths)
            except ValueError as e:
                raise ValueError(f"invalid {ENV} server.history_path={path!r}: {e}") from None
    return options


# ------------------------------------------------------------------ options table

TABLE_BEGIN = "<!-- options-table: generated by das_sglang.sglang.options.options_table() -->"
TABLE_END = "<!-- /options-table -->"


def options_table() -> str:
    """The markdown table of every ``DAS_CONFIG`` field, generated from the dataclasses
    (defaults and the field descriptions of their docstrings): docs/sglang.md embeds it
    between TABLE_BEGIN and TABLE_END, and a test keeps the two equal."""
    lines = ["| `DAS_CONFIG` field | default | meaning |", "|---|---|---|"]
    for section, cls in _SECTIONS.items():
        docs = _field_docs(cls)
        for f in fields(cls):
            default = json.dumps(getattr(cls(), f.name))
            text = docs.get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{section}.{f.name}` | `{default}` | {text} |")
    return "\n".join(lines)


def _field_docs(cls) -> dict[str, str]:
    """``name  description`` paragraphs of a config docstring (``a/b`` documents both)."""
    import inspect

    names = {f.name for f in fields(cls)}
    docs: dict[str, list[str]] = {}
    current: list[str] = []
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines()[1:]:
        head, _, rest = line.strip().partition(" ")
        keys = head.split("/")
        if line[:1] not in (" ", "") and rest.strip() and all(k in names for k in keys):
            current = [rest.strip()]
            for k in keys:
                docs[k] = current
        elif current and line.strip():
            current.append(line.strip())
    return {k: " ".join(v) for k, v in docs.items()}


if __name__ == "__main__":
    print(options_table())
