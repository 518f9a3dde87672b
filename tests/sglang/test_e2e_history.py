"""History snapshots carry drafts across engine restarts (real SGLang, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sglang_engines import generate, launch

from das_sglang.core.snapshot import load_history

pytestmark = pytest.mark.sglang

GREEDY = {"temperature": 0.0, "max_new_tokens": 24}
PROBLEMS, SIBLINGS = 4, 4


def group(step: int):
    rng = np.random.default_rng(7)
    problems = [rng.integers(3, 300, 8).tolist() for _ in range(PROBLEMS)]
    prompts = [p for p in problems for _ in range(SIBLINGS)]
    tags = [(f"h{i}", step) for i in range(PROBLEMS) for _ in range(SIBLINGS)]
    return prompts, tags


def test_second_engine_drafts_from_the_first_engines_snapshot(tiny_model, tmp_path):
    env = {"DAS_CONFIG": json.dumps(
        {"server": {"history_path": str(tmp_path), "snapshot_interval": 1}})}
    with launch(tiny_model, "DAS", env=env) as engine:
        first, _ = generate(engine, group(1)[0], GREEDY, group(1)[1])
    history, _ = load_history(tmp_path)
    assert sorted(history) == [f"h{i}" for i in range(PROBLEMS)]
    assert sum(len(seqs) for steps in history.values() for seqs in steps.values()) == 16
    with launch(tiny_model, "DAS", env=env) as engine:
        second, meta = generate(engine, group(2)[0], GREEDY, group(2)[1])
    accept = float(np.mean([m["spec_accept_length"] for m in meta]))
    print(f"restarted engine, step 2: accept length {accept:.2f} tokens/step")
    assert second == first  # greedy: same prompts, same outputs
    assert accept > 1.5  # drafted from the loaded history


def test_policy_none_verifies_the_root_only(tiny_model):
    """Width 0 ("don't speculate this step") every step: plain decoding through verify."""
    env = {"DAS_CONFIG": json.dumps({"server": {"policy": "none"}})}
    prompts, tags = group(1)
    with launch(tiny_model, "DAS", env=env) as engine:
        first, _ = generate(engine, prompts, GREEDY, tags)  # history now exists ...
        outs, meta = generate(engine, prompts[:4], GREEDY, [(t[0], 2) for t in tags[:4]])
    assert outs == first[:4]  # ... yet nothing was drafted: same greedy text
    assert [m["spec_num_correct_drafts"] for m in meta] == [0] * 4
    assert [m["spec_verify_ct"] for m in meta] == [GREEDY["max_new_tokens"] - 1] * 4
