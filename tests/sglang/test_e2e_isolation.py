"""Per-request isolation on real SGLang (CPU, tiny model): bad tags, constrained
requests, stop strings, history of what the user received.

One DAS engine and one engine without speculation (module-scoped). Step 1: GRPO groups
(identical greedy siblings) become history, so step-2 requests of those problems get
long drafts accepted -- which is where inexact verification would show.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sglang_engines import launch

from das_sglang.core.snapshot import load_history

pytestmark = pytest.mark.sglang

PROBLEMS, SIBLINGS, NEW = 6, 3, 32
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW}
PROCESSOR_KW = dict(enable_custom_logit_processor=True)


def _prompts():
    rng = np.random.default_rng(11)
    return [rng.integers(3, 300, 8).tolist() for _ in range(PROBLEMS)]


def _gen(engine, prompts, params, tags=None, processors=None):
    params = [dict(p) for p in params]
    for p, tag in zip(params, tags or [None] * len(params)):
        if tag is not None:
            p["custom_params"] = tag
    return engine.generate(input_ids=[list(p) for p in prompts], sampling_params=params,
                           custom_logit_processor=processors)


def _step1(engine):
    prompts = [p for p in _prompts() for _ in range(SIBLINGS)]
    tags = [{"das_problem_id": f"q{i}", "das_step": 1}
            for i in range(PROBLEMS) for _ in range(SIBLINGS)]
    return _gen(engine, prompts, [GREEDY] * len(prompts), tags)


def _constrained_params(ban):
    return [
        {**GREEDY, "frequency_penalty": 1.5},
        {**GREEDY, "presence_penalty": 1.5},
        {**GREEDY, "repetition_penalty": 1.8},
        {**GREEDY, "min_new_tokens": 20, "frequency_penalty": 0.7},
        {**GREEDY, "regex": "[a-z ]{8,30}"},
        {**GREEDY, "logit_bias": {"5": 3.0, "7": -2.0}},
        {**GREEDY, "custom_params": {"token_ids": ban}},
    ]


def _processor() -> str:
    from sglang.srt.sampling.custom_logit_processor import DisallowedTokensLogitsProcessor

    return DisallowedTokensLogitsProcessor().to_str()


def _stop_cases(reference_texts):
    """(prompt index, stop list) where the later stop is listed first: list order and
    text order disagree, so ending at the first-listed stop would return more text."""
    cases = []
    for i, text in enumerate(reference_texts):
        for a in range(2, len(text) - 12):
            early = text[a:a + 2]
            if early.strip() != early or early in text[:a + 1]:
                continue
            late = next((text[b:b + 2] for b in range(a + 3, min(a + 10, len(text) - 2))
                         if text[b:b + 2] not in text[:b + 1] and early not in text[b:b + 2]), None)
            if late:
                cases.append((i, [late, early]))
                break
    return cases


HOSTILE = [
    {"das_step": "x"}, {"das_step": -1}, {"das_step": -5}, {"das_step": 1.5},
    {"das_step": True}, {"das_problem_id": {"nested": [1, {"a": 2}]}, "das_step": 2},
    {"das_problem_id": "z" * 50_000}, {"das_step": [1, 2]},
]


def _workload(engine, history_dir=None):
    out = {"step1": _step1(engine)}
    prompts = _prompts()
    cons = _constrained_params(ban=[])
    cons_prompts = [prompts[i % PROBLEMS] for i in range(len(cons))]
    # The processor bans tokens the unconstrained text would produce (from step 1).
    cons[-1]["custom_params"]["token_ids"] = sorted(set(
        out["step1"][(len(cons) - 1) % PROBLEMS * SIBLINGS]["output_ids"][2:8]))
    tags = [{"das_problem_id": f"q{i % PROBLEMS}", "das_step": 2} for i in range(len(cons))]
    for p, t in zip(cons, tags):
        p["custom_params"] = {**p.get("custom_params", {}), **t}
    processors = [None] * (len(cons) - 1) + [_processor()]
    out["constrained"] = _gen(engine, cons_prompts, cons, processors=processors)
    # Free-running step-2 text (the same greedy text the siblings produced) -> stops.
    out["free"] = _gen(engine, prompts, [GREEDY] * PROBLEMS,
                       [{"das_problem_id": f"q{i}", "das_step": 2} for i in range(PROBLEMS)])
    cases = _stop_cases([o["text"] for o in out["free"]])
    out["stop_cases"] = cases
    out["stops"] = _gen(engine, [prompts[i] for i, _ in cases],
                        [{**GREEDY, "stop": stops} for _, stops in cases],
                        [{"das_problem_id": f"q{i}", "das_step": 2} for i, _ in cases])
    hostile_prompts = [prompts[i % PROBLEMS] for i in range(len(HOSTILE))]
    out["hostile"] = _gen(engine, hostile_prompts, [GREEDY] * len(HOSTILE), HOSTILE)
    out["non_dict"] = _gen(engine, prompts[:1], [{**GREEDY, "custom_params": [1, 2]}])
    out["after"] = _gen(engine, prompts[:2], [GREEDY] * 2)  # the engine still serves
    return out


@pytest.fixture(scope="module")
def results(tiny_model, tmp_path_factory):
    history = tmp_path_factory.mktemp("history")
    env = {"DAS_CONFIG": json.dumps({"server": {
        "policy": "unlimited", "history_path": str(history), "snapshot_interval": 1}})}
    with launch(tiny_model, "DAS", env=env, **PROCESSOR_KW) as engine:
        das = _workload(engine)
    # Reference: SGLang without speculation, scheduled like the DAS engine (no overlap:
    # SGLang's overlap scheduler cumulates penalties from output_ids that lag a step).
    with launch(tiny_model, None, disable_overlap_schedule=True, **PROCESSOR_KW) as engine:
        ref = _workload(engine)
    return das, ref, history


def _ids(outs):
    return [o["output_ids"] for o in outs]


def test_hostile_custom_params_are_served_and_the_engine_survives(results):
    das, ref, history = results
    assert _ids(das["hostile"]) == _ids(ref["hostile"])  # served, untagged, same text
    assert _ids(das["non_dict"]) == _ids(ref["non_dict"])
    assert _ids(das["after"]) == _ids(ref["after"])
    _, meta = load_history(history)
    assert meta["das_counters"]["bad_params"] == len(HOSTILE) + 1  # + the non-dict one
    assert not any(len(pid) > 1024 for pid in load_history(history)[0])


def test_constrained_requests_match_no_speculation(results):
    das, ref, _ = results
    accepted = [o["meta_info"]["spec_verify_ct"] for o in das["free"]]
    assert min(accepted) < NEW // 2  # the unconstrained siblings did get long drafts
    for d, r, p in zip(das["constrained"], ref["constrained"], _constrained_params([])):
        assert d["output_ids"] == r["output_ids"], sorted(k for k in p if k not in GREEDY)
    bias = das["constrained"][5]["meta_info"]
    assert bias["spec_verify_ct"] < NEW - 1  # logit bias is exact per row: still drafted


def test_stop_strings_end_at_the_earliest_match(results):
    das, ref, _ = results
    assert das["stop_cases"] == ref["stop_cases"] and len(das["stop_cases"]) >= 3
    assert [o["text"] for o in das["stops"]] == [o["text"] for o in ref["stops"]]
    assert _ids(das["stops"]) == _ids(ref["stops"])


def test_history_holds_what_the_user_received(results):
    das, _, history = results
    stored, _ = load_history(history)
    prompts = _prompts()
    for (i, _stops), out in zip(das["stop_cases"], das["stops"]):
        rollouts = [t.tolist() for t in stored[f"q{i}"][2]]
        assert prompts[i] + out["output_ids"] in rollouts
        full = das["free"][i]["output_ids"]
        assert len(out["output_ids"]) < len(full)  # the stop did cut the text
