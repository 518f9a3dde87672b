"""The ``DAS`` speculative algorithm as SGLang sees it.

DAS verifies host-built draft trees exactly like NGRAM (tree mask + retrieve indices,
no draft model, no draft KV), so the spec class answers ``is_ngram() -> True``: every
scheduler / attention / KV-sizing branch SGLang has for NGRAM's verify layout applies
unchanged, and FlashInfer's tree verify is used untouched on GPU. Server-args handling
is NGRAM's, plus validation of the DAS options (``DAS_CONFIG``, see ``options.py``).
"""

from __future__ import annotations

from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sglang.srt.speculative.spec_registry import CustomSpecAlgo


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
        from sglang.srt.arg_groups.speculative_hook import _handle_ngram

        _handle_ngram(server_args)


def _validate(server_args) -> None:
    """Fail at start-up, in the launching process, on bad DAS options."""
    from das_sglang.sglang.options import load_options

    load_options(server_args.speculative_num_draft_tokens)


def _worker_class(server_args):
    from das_sglang.sglang.worker import DasWorker

    return DasWorker


def _cost_probe_worker_class(server_args):
    from das_sglang.sglang.cost_probe import CostProbeWorker

    return CostProbeWorker


def register_das(name: str, worker_class=_worker_class) -> None:
    SpeculativeAlgorithm.register(
        name, supports_overlap=False, validate_server_args=_validate, spec_class=DasSpecAlgo
    )(worker_class)


def register_cost_probe(name: str) -> None:
    """``DAS_COST_PROBE``: DAS plus TARGET_VERIFY timing (benchmarks/gpu; cost_probe.py)."""
    register_das(name, _cost_probe_worker_class)
