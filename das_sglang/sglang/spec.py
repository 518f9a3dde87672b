"""The ``DAS`` speculative algorithm as SGLang sees it.

DAS verifies host-built draft trees exactly like NGRAM (tree mask + retrieve indices,
no draft model, no draft KV), so the spec class answers ``is_ngram() -> True``: every
scheduler / attention / KV-sizing branch SGLang has for NGRAM's verify layout applies
unchanged, and FlashInfer's tree verify is used untouched on GPU. Server args are DAS's
own (:func:`handle_das_server_args`, logged), and the DAS options (``DAS_CONFIG``, see
``options.py``) are validated there too: in the launching process, before any weights
load.
"""

from __future__ import annotations

import logging

from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sglang.srt.speculative.spec_registry import CustomSpecAlgo

_log = logging.getLogger(__name__)

# Verify width (root + N-1 draft nodes) when --speculative-num-draft-tokens is not given.
DEFAULT_NUM_DRAFT_TOKENS = 12
# speculative_eagle_topk: > 1 tells SGLang's attention backends the verify rows form a
# tree, not a chain (NGRAM declares its BFS breadth, 10 by default, for the same reason).
TREE_TOPK = 10


class DasSpecAlgo(CustomSpecAlgo):
    def is_ngram(self) -> bool:
        return True

    def has_draft_kv(self) -> bool:
        return False  # drafts live only in the verify mask, as with NGRAM

    # sglang 0.5.23: CustomSpecAlgo lacks these three, and the scheduler calls them.
    def carries_draft_hidden_states(self) -> bool:
        return False

    def need_topk(self) -> bool:
        return False

    def create_future_map(
        self, device, req_to_token_pool, needs_cpu_seq_lens=True, needs_confidence_relay=False
    ):
        from sglang.srt.managers.overlap_utils import FutureMap

        return FutureMap(
            device, self, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay
        )

    def create_worker(self, server_args):
        # CustomSpecAlgo.create_worker logs a deprecation warning for every algorithm
        # registered with supports_overlap=False. DAS verifies synchronously by design;
        # the one requirement behind that flag is checked here, with a clear error.
        from sglang.srt.arg_groups.overrides import resolving_view

        if not resolving_view(server_args).disable_overlap_schedule:
            raise ValueError(
                f"--speculative-algorithm {self.name} verifies synchronously: "
                "pass --disable-overlap-schedule (disable_overlap_schedule=True)"
            )
        return self.factory(server_args)

    def handle_server_args(self, server_args) -> None:
        handle_das_server_args(server_args)


def handle_das_server_args(server_args) -> dict:
    """Set the server args DAS needs, validate the DAS options; return what changed.

    SGLang hands a custom algorithm a recorder of the server args: assignments become
    declared resolutions. Only what DAS's worker really needs is set -- in particular
    ``max_running_requests`` is left as the user gave it (NGRAM's handler caps it at 48).
    """
    if server_args.device not in ("cuda", "cpu"):
        raise ValueError(
            f"invalid device={server_args.device!r}: --speculative-algorithm DAS runs on "
            "cuda (and cpu in das-sglang's CPU development mode)"
        )
    changed = {}

    def declare(field: str, value, why: str) -> None:
        if getattr(server_args, field) != value:
            changed[field] = (getattr(server_args, field), value, why)
            setattr(server_args, field, value)

    declare("disable_overlap_schedule", True, "the DAS worker verifies synchronously")
    declare("enable_mixed_chunk", False, "a verify batch cannot carry prefill chunks")
    if server_args.speculative_num_draft_tokens is None:
        declare("speculative_num_draft_tokens", DEFAULT_NUM_DRAFT_TOKENS, "default verify width")
    n = server_args.speculative_num_draft_tokens
    declare("speculative_eagle_topk", TREE_TOPK, "verify rows form a tree")
    if server_args.speculative_num_steps is None:
        declare("speculative_num_steps", n // TREE_TOPK, "NGRAM's tree-verify sizing")
    _refuse_unverifiable(server_args)
    _validate(server_args)  # now with the resolved verify width
    for field, (old, new, why) in changed.items():
        _log.info("DAS: server arg %s %r -> %r (%s)", field, old, new, why)
    return {field: new for field, (_, new, _) in changed.items()}


def _refuse_unverifiable(server_args) -> None:
    """Settings under which tree verification is not exact (as NGRAM refuses them)."""
    from sglang.srt.runtime_context import attn_dp_enabled_of

    page_size, backend = server_args.page_size, server_args.attention_backend
    if page_size is not None and page_size > 1 and backend not in (None, "flashinfer"):
        raise ValueError(
            f"invalid page_size={page_size!r} with attention_backend={backend!r}: DAS's "
            "tree verify with page_size > 1 is exact only on the flashinfer backend"
        )
    if attn_dp_enabled_of(server_args):
        raise ValueError("--speculative-algorithm DAS does not support DP attention")


def _validate(server_args) -> None:
    """Fail at start-up, in the launching process, on bad DAS options."""
    from das_sglang.sglang.options import load_options, validate_for_server

    validate_for_server(load_options(server_args.speculative_num_draft_tokens))


def _worker_class(server_args):
    from das_sglang.sglang.worker import DasWorker

    return DasWorker


def _cost_probe_worker_class(server_args):
    from das_sglang.sglang.cost_probe import CostProbeWorker

    return CostProbeWorker


def register_das(name: str, worker_class=_worker_class) -> None:
    """Register ``name`` as a DAS algorithm; ``worker_class(server_args)`` picks the worker
    class (the tests register deliberately wrong subclasses as negative controls)."""
    SpeculativeAlgorithm.register(
        name, supports_overlap=False, validate_server_args=_validate, spec_class=DasSpecAlgo
    )(worker_class)


def register_cost_probe(name: str) -> None:
    """``DAS_COST_PROBE``: DAS plus TARGET_VERIFY timing (benchmarks/gpu; cost_probe.py)."""
    register_das(name, _cost_probe_worker_class)
