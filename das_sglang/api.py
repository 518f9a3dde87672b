"""Python API for RL frameworks: a stock ``sglang.Engine`` with DAS, and request tags.

    import das_sglang
    engine = das_sglang.engine("Qwen/Qwen2.5-7B-Instruct", mem_fraction_static=0.8)
    params = das_sglang.tagged({"temperature": 1.0, "max_new_tokens": 4096},
                               problem_id="gsm8k-17", step=3)
    out = engine.generate(prompt=prompt, sampling_params=params)
    out["meta_info"]["spec_verify_ct"]  # target forward passes that verified drafts

The engine is SGLang's own; DAS is its speculative algorithm ``"DAS"`` (registered by the
``sglang.srt.plugins`` entry point of this package). The tags tell the DAS worker which
problem's history drafts a request and which training step it belongs to (GRPO siblings
share the problem id). Nothing here imports sglang until an engine is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

ALGORITHM = "DAS"
PROBLEM_KEY = "das_problem_id"  # custom_params keys (docs/design.md, SGLang worker contract)
STEP_KEY = "das_step"
TINY_MODEL = "tiny"


def tag(problem_id: str | int, step: int) -> dict[str, Any]:
    """The ``custom_params`` entries that tag one request for DAS."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"invalid step={step!r}: must be an int >= 0")
    if problem_id == "" or problem_id is None:
        raise ValueError(f"invalid problem_id={problem_id!r}: must be non-empty")
    return {PROBLEM_KEY: str(problem_id), STEP_KEY: step}


def tagged(sampling_params: Mapping[str, Any] | None, problem_id: str | int, step: int) -> dict[str, Any]:
    """A copy of ``sampling_params`` whose ``custom_params`` also carry the DAS tag
    (other custom params are kept)."""
    params = dict(sampling_params or {})
    params["custom_params"] = {**(params.get("custom_params") or {}), **tag(problem_id, step)}
    return params


def engine(model_path: str | os.PathLike[str], *, das_config: Any = None, **sglang_kwargs: Any):
    """A started ``sglang.Engine`` that speculates with DAS.

    ``das_config`` (drafter/policy/snapshot options) reaches the DAS worker in SGLang's
    scheduler process through the documented environment mechanism (docs/sglang.md), so
    it must be set before the engine spawns its processes; ``sglang_kwargs`` are
    ``ServerArgs`` fields and override the defaults set here.
    """
    if das_config is not None:
        os.environ.update(das_env(das_config))
    return _sglang_engine(str(model_path), {"speculative_algorithm": ALGORITHM, **sglang_kwargs})


def das_env(das_config: Any) -> dict[str, str]:
    """Environment variables carrying ``das_config`` to the DAS worker."""
    from das_sglang.sglang import options

    return options.to_env(das_config)


def _sglang_engine(model_path: str, kwargs: dict[str, Any]):
    import sglang

    return sglang.Engine(model_path=model_path, **kwargs)


# ------------------------------------------------------------------ CPU development mode


def tiny_model(path: str | os.PathLike[str] | None = None) -> Path:
    """Build (or reuse) the tiny random CPU test model; default under the user cache."""
    from das_sglang.sglang.cpu.tiny_model import make_tiny_model

    if path is None:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        path = cache / "das-sglang" / "tiny-model"
    return make_tiny_model(path)


def cpu_engine_kwargs() -> dict[str, Any]:
    """Turn on CPU development mode (before sglang is imported) and return the engine
    settings it needs. Never on a GPU machine (it refuses)."""
    from das_sglang.sglang import cpu

    cpu.activate()
    return dict(cpu.ENGINE_KWARGS)


def resolve_model(model: str) -> tuple[str, dict[str, Any]]:
    """``(model_path, extra engine kwargs)``; ``"tiny"`` means the CPU test model."""
    if model == TINY_MODEL:
        extra = cpu_engine_kwargs()
        return str(tiny_model()), extra
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {model}: directory has no config.json (not a Hugging Face model)")
        return str(path), {}
    if model.count("/") != 1 or model.startswith(("/", ".", "~")):
        raise ValueError(f"--model {model}: no such directory, and not a Hugging Face id (org/name)")
    return model, {}  # a hub id: SGLang resolves it (from the local HF cache when offline)


def rollout_engine(model: str, *, speculative: bool, history_dir: Path | None = None,
                   seed: int | None = None, **sglang_kwargs: Any):
    """The engine `das rollout` drives: DAS (with history persisted to ``history_dir``)
    or, for ``--compare none``, the same engine without speculation."""
    model_path, extra = resolve_model(model)
    kwargs = {**extra, **({"random_seed": seed} if seed is not None else {}), **sglang_kwargs}
    if not speculative:
        return _sglang_engine(model_path, kwargs)
    return engine(model_path, das_config=_rollout_das_config(history_dir), **kwargs)


def _rollout_das_config(history_dir: Path | None) -> Any:
    from das_sglang.sglang import options

    return options.DASOptions(history_dir=str(history_dir) if history_dir else None)
