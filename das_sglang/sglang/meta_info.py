"""``spec_verify_ct`` in every DAS request's ``meta_info``, 0 verifies included.

SGLang 0.5.23's tokenizer manager (``TokenizerManager._calculate_spec_decoding_metrics``)
writes the speculative counters into ``meta_info`` only when a request verified at least
once, so a request that finished at prefill (``max_new_tokens=1``, an immediate stop)
has no ``spec_verify_ct`` at all, and code reading it must guess. The plugin registers an
AFTER hook there through SGLang's plugin framework (``sglang.srt.plugins.hook_registry``,
applied by SGLang when it loads plugins) that fills the missing counters with 0 on DAS
engines: one place, every surface (``/generate``, the OpenAI routes, ``sglang.Engine``).
"""

from __future__ import annotations

TARGET = "sglang.srt.managers.tokenizer_manager.TokenizerManager._calculate_spec_decoding_metrics"
DAS_ALGORITHMS = ("DAS", "DAS_COST_PROBE")
ZERO_COUNTERS = ("spec_verify_ct", "spec_num_correct_drafts")


def fill_zero_counters(result, manager, meta_info, recv_obj, i, *args, **kwargs):
    """AFTER hook: ``meta_info`` keeps SGLang's values; absent counters become 0."""
    algorithm = getattr(getattr(manager, "server_args", None), "speculative_algorithm", None)
    if str(algorithm).upper() in DAS_ALGORITHMS and isinstance(meta_info, dict):
        for key in ZERO_COUNTERS:
            meta_info.setdefault(key, 0)
    return result


_registered = False


def register_hook() -> None:
    global _registered
    if _registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, fill_zero_counters, HookType.AFTER)
    _registered = True
