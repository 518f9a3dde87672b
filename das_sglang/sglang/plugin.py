"""SGLang plugin entry point (group ``sglang.srt.plugins``, name ``das``).

SGLang calls :func:`register` early in every process (engine, scheduler, detokenizer).
It activates the CPU development mode when ``DAS_SGLANG_CPU=1`` and registers the
``DAS`` speculative algorithm through ``SpeculativeAlgorithm.register``.
"""

from __future__ import annotations

ALGORITHM = "DAS"
COST_PROBE = "DAS_COST_PROBE"  # benchmark-only: DAS + verify-forward timing (cost_probe.py)


def register() -> None:
    from das_sglang.sglang import cpu

    if cpu.requested():
        cpu.activate()
    _register_algorithm()
    _register_meta_info_hook()


def _register_meta_info_hook() -> None:
    from das_sglang.sglang.meta_info import register_hook

    register_hook()


def _register_algorithm() -> None:
    from sglang.srt.speculative.spec_registry import get_spec

    if get_spec(ALGORITHM) is not None:
        return  # already registered in this process
    from das_sglang.sglang.spec import register_cost_probe, register_das

    register_das(ALGORITHM)
    register_cost_probe(COST_PROBE)
