"""SGLang plugin entry point (group ``sglang.srt.plugins``, name ``das``).

SGLang calls :func:`register` early in every process (engine, scheduler, detokenizer).
It activates the CPU development mode when ``DAS_SGLANG_CPU=1`` and registers the
``DAS`` speculative algorithm through ``SpeculativeAlgorithm.register``.
"""

from __future__ import annotations

ALGORITHM = "DAS"


def register() -> None:
    from das_sglang.sglang import cpu

    if cpu.requested():
        cpu.activate()
    _register_algorithm()


def _register_algorithm() -> None:
    from sglang.srt.speculative.spec_registry import get_spec

    if get_spec(ALGORITHM) is not None:
        return  # already registered in this process
    from das_sglang.sglang.spec import register_das

    register_das(ALGORITHM)
