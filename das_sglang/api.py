"""Python API for RL frameworks: a stock ``sglang.Engine`` with DAS, and request tags.

    import das_sglang

    if __name__ == "__main__":  # the engine spawns processes: guard the entry point
        engine = das_sglang.engine("Qwen/Qwen2.5-7B-Instruct", mem_fraction_static=0.8)
        params = das_sglang.tagged({"temperature": 1.0, "max_new_tokens": 4096},
                                   problem_id="gsm8k-17", step=3)
        out = engine.generate(prompt=prompt, sampling_params=params)
        out["meta_info"]["spec_verify_ct"]  # verify forwards (0 if it never verified)

The engine is SGLang's own; DAS is its speculative algorithm ``"DAS"`` (registered by the
``sglang.srt.plugins`` entry point of this package). The tags tell the DAS worker which
problem's history drafts a request and which training step it belongs to (GRPO siblings
share the problem id). Nothing here imports sglang until an engine is built.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping

from das_sglang.replay.datasets import prompt_key  # noqa: F401  (re-exported: the API's problem ids)

ALGORITHM = "DAS"
PROBLEM_KEY = "das_problem_id"  # custom_params keys (docs/design.md, SGLang worker contract)
STEP_KEY = "das_step"
TINY_MODEL = "tiny"


def tag(problem_id: str | int, step: int) -> dict[str, Any]:
    """The ``custom_params`` entries that tag one request for DAS."""
    from das_sglang.sglang.request_params import parse_tag

    if problem_id == "" or problem_id is None:
        raise ValueError(f"invalid problem_id={problem_id!r}: must be non-empty")
    pid, step = parse_tag({PROBLEM_KEY: problem_id, STEP_KEY: step})  # names a bad value
    return {PROBLEM_KEY: pid, STEP_KEY: step}


# Scale-out (many engines behind the SMG router, launch/scaleout.md): the router's
# consistent hashing reads this header, so every sample of a problem, across steps, goes
# to the engine that holds the problem's history.
ROUTING_KEY_HEADER = "x-smg-routing-key"


def routing_headers(problem_id: str | int) -> dict[str, str]:
    """HTTP headers that route a request of ``problem_id`` to its engine via the router."""
    if problem_id == "" or problem_id is None:
        raise ValueError(f"invalid problem_id={problem_id!r}: must be non-empty")
    value = str(problem_id)
    if any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        # HTTP header values are visible ASCII; hash anything else to a stable key.
        import hashlib

        value = "h-" + hashlib.blake2b(value.encode(), digest_size=12).hexdigest()
    return {ROUTING_KEY_HEADER: value}


def tagged(sampling_params: Mapping[str, Any] | None, problem_id: str | int, step: int) -> dict[str, Any]:
    """A copy of ``sampling_params`` whose ``custom_params`` also carry the DAS tag
    (other custom params are kept)."""
    params = dict(sampling_params or {})
    custom = params.get("custom_params") or {}
    if not isinstance(custom, dict):
        raise ValueError(
            f"invalid custom_params={custom!r:.80}: must be a dict (got {type(custom).__name__})"
        )
    params["custom_params"] = {**custom, **tag(problem_id, step)}
    return params


def engine(model_path: str | os.PathLike[str], *, das_config: DasConfig = None, **sglang_kwargs: Any):
    """A started ``sglang.Engine`` that speculates with DAS.

    ``das_config`` is what the env variable ``DAS_CONFIG`` holds (docs/sglang.md): a
    mapping with sections ``drafter`` / ``policy`` / ``server`` (values: dicts or the
    config dataclasses themselves), a JSON string, or a path to a JSON file. It is
    validated here, then exported so SGLang's scheduler processes see it; None keeps
    whatever ``DAS_CONFIG`` already holds. ``sglang_kwargs`` are ``ServerArgs`` fields
    (e.g. ``speculative_num_draft_tokens``: verify width = 1 + most draft nodes).
    """
    if das_config is not None:
        os.environ.update(das_env(das_config))
    return _sglang_engine(str(model_path), {"speculative_algorithm": ALGORITHM, **sglang_kwargs})


DasConfig = Mapping[str, Any] | str | os.PathLike[str] | None


def das_env(das_config: DasConfig) -> dict[str, str]:
    """``{"DAS_CONFIG": ...}`` for ``das_config``; ValueError (naming the field) if invalid."""
    from das_sglang.sglang.options import ENV, load_options

    if isinstance(das_config, Mapping):
        raw = json.dumps({name: _section(name, value) for name, value in das_config.items()})
    else:
        raw = os.fspath(das_config)
    load_options(None, raw)  # fail here, in the caller, not in a scheduler subprocess
    return {ENV: raw}


def _section(name: str, value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"invalid das_config section {name}={value!r}: must be a mapping or a config dataclass")
    return dict(value)


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
    """``(model_path, extra engine kwargs)``; ``"tiny"`` means the CPU test model. With
    ``DAS_SGLANG_CPU=1`` any model runs with the CPU development mode's engine settings."""
    if model == TINY_MODEL:
        extra = cpu_engine_kwargs()
        return str(tiny_model()), extra
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {model}: directory has no config.json (not a Hugging Face model)")
        return str(path), _cpu_kwargs_if_requested()
    if model.count("/") != 1 or model.startswith(("/", ".", "~")):
        raise ValueError(f"--model {model}: no such directory, and not a Hugging Face id (org/name)")
    # a hub id: SGLang resolves it (from the local HF cache when offline)
    return model, _cpu_kwargs_if_requested()


def _cpu_kwargs_if_requested() -> dict[str, Any]:
    from das_sglang.sglang import cpu

    return cpu_engine_kwargs() if cpu.requested() else {}


# Both engines of a `das rollout --compare none` run get the same concurrency (SGLang's
# speculative set-up would otherwise lower only the DAS engine's to 48).
ROLLOUT_MAX_RUNNING_REQUESTS = 48


def rollout_engine(model: str, *, speculative: bool, history_dir: Path | None = None,
                   strict_history: bool = False, snapshot_interval: int | None = None,
                   seed: int | None = None, **sglang_kwargs: Any):
    """The engine `das rollout` drives: DAS (with history persisted to ``history_dir``
    every ``snapshot_interval`` finished requests) or, for ``--compare none``, the same
    engine without speculation."""
    model_path, extra = resolve_model(model)
    kwargs = {**extra, "max_running_requests": ROLLOUT_MAX_RUNNING_REQUESTS,
              **({"random_seed": seed} if seed is not None else {}), **sglang_kwargs}
    if not speculative:
        return _sglang_engine(model_path, kwargs)
    das_config = rollout_das_config(history_dir, strict_history, snapshot_interval)
    return engine(model_path, das_config=das_config, **kwargs)


def rollout_das_config(history_dir: Path | None, strict_history: bool = False,
                       snapshot_interval: int | None = None) -> DasConfig:
    """`das rollout`'s DAS settings: ``DAS_CONFIG`` as the user set it (or the documented
    defaults), with ``server.history_path`` set to ``history_dir`` when given (loaded at
    start and saved periodically). An unusable snapshot is logged and
    ignored unless ``strict_history``. ``snapshot_interval`` (finished requests between
    saves) overrides the configured one: ``sglang.Engine.shutdown()`` SIGKILLs the
    scheduler, so the worker's exit-time save never runs and the periodic save is what
    persists history."""
    from das_sglang.sglang.options import ENV, parse_config

    raw = os.environ.get(ENV, "").strip()
    if history_dir is None:
        return raw or {}
    config = parse_config(raw)
    config["server"] = {**config.get("server", {}), "history_path": str(history_dir),
                        "strict_snapshot": strict_history}
    if snapshot_interval is not None:
        config["server"]["snapshot_interval"] = snapshot_interval
    return config
