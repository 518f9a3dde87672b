"""Real SGLang engines on the CPU (CPU development mode) for the end-to-end tests.

Engines are expensive (~15 s each to start), so the tests scope them per module and
keep at most two alive at a time.
"""

from __future__ import annotations

import contextlib
import os

from das_sglang.sglang import cpu


@contextlib.contextmanager
def launch(model: str, algorithm: str | None, env: dict[str, str] | None = None, **kwargs):
    """A started ``sglang.Engine`` (DAS/NGRAM/None) with the CPU settings; shut down after.

    ``env`` is set while the engine starts (its scheduler process reads it then).
    """
    import sglang

    spec = {}
    if algorithm is not None:
        spec = dict(
            speculative_algorithm=algorithm,
            speculative_num_draft_tokens=8,
            disable_overlap_schedule=True,
        )
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        engine = sglang.Engine(**{
            "model_path": model,
            "log_level": "error",
            "max_running_requests": 32,
            "random_seed": 0,
            **cpu.ENGINE_KWARGS,
            **spec,
            **kwargs,
        })
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield engine
    finally:
        engine.shutdown()


def generate(engine, prompts, params, tags=None):
    """Outputs (token lists) and meta_info of one concurrent batch of requests."""
    params = [dict(params) for _ in prompts]
    for p, tag in zip(params, tags or [None] * len(prompts)):
        if tag is not None:
            p["custom_params"] = {"das_problem_id": tag[0], "das_step": tag[1]}
    outs = engine.generate(input_ids=[list(p) for p in prompts], sampling_params=params)
    return [o["output_ids"] for o in outs], [o["meta_info"] for o in outs]
