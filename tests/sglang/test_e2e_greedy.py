"""Greedy DAS on real SGLang is token-identical to no speculation (CPU, tiny model).

One workload of 223 requests: untagged batches of 1..32 requests, then GRPO-style
groups (6 siblings x 8 problems) tagged with a problem id in step 1 and again in step 2,
where the step-1 rollouts are history that drafts the step-2 siblings. A negative
control (draft-node ancestors dropped from the tree mask) must break the identity.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from sglang_engines import generate, launch

pytestmark = pytest.mark.sglang

GREEDY = {"temperature": 0.0, "max_new_tokens": 32}
PLAIN_SIZES = (1, 2, 4, 8, 16, 32, 32, 32)
PROBLEMS, SIBLINGS = 8, 6


def workload(seed: int = 0):
    """[(label, prompts, tags)]; tags None = untagged (prompt-hash problem ids)."""
    rng = np.random.default_rng(seed)

    def prompt(n):
        return rng.integers(3, 300, n).tolist()

    batches = [(f"plain-{i}-{s}", [prompt(int(rng.integers(4, 12))) for _ in range(s)], None)
               for i, s in enumerate(PLAIN_SIZES)]
    problems = [prompt(8) for _ in range(PROBLEMS)]
    for step in (1, 2):
        prompts = [p for p in problems for _ in range(SIBLINGS)]
        tags = [(f"p{i}", step) for i in range(PROBLEMS) for _ in range(SIBLINGS)]
        batches.append((f"grpo-step{step}", prompts, tags))
    return batches


def run(engine, batches):
    return {label: generate(engine, prompts, GREEDY, tags) for label, prompts, tags in batches}


@pytest.fixture(scope="module")
def reference(tiny_model):
    with launch(tiny_model, None) as engine:
        return run(engine, workload())


@pytest.fixture(scope="module")
def das_stats(tmp_path_factory):
    """Where the DAS engine's worker writes its counters (server.stats_path)."""
    return tmp_path_factory.mktemp("das-stats") / "stats.json"


@pytest.fixture(scope="module")
def das(tiny_model, das_stats):
    """DAS outputs; then a weight update + cache flush (what an RL trainer does between
    steps; the flush reaches the worker's clear_cache_pool) and a step-3 group.
    Default verify layout: ragged on this backend (torch_native in CPU mode)."""
    env = {"DAS_CONFIG": json.dumps({"server": {"stats_path": str(das_stats)}})}
    with launch(tiny_model, "DAS", env=env) as engine:
        results = run(engine, workload())
        engine.update_weights_from_disk(tiny_model)
        flush_when_idle(engine)
        step3 = [(label.replace("2", "3"), p, [(pid, 3) for pid, _ in tags])
                 for label, p, tags in workload() if label == "grpo-step2"]
        results.update(run(engine, step3))
        # finished at prefill: no verify at all (spec counters must still be reported)
        results["one-token"] = generate(engine, [[5, 6, 7]], dict(GREEDY, max_new_tokens=1))
        return results


def flush_when_idle(engine) -> None:
    for _ in range(40):  # the scheduler may still be retiring the last batch
        if engine.flush_cache().success:
            return
        time.sleep(0.25)
    pytest.fail("flush_cache never succeeded")


def mismatches(ref, got) -> int:
    return sum(a != b for a, b in zip(ref, got))


def accept_length(meta) -> float:
    return float(np.mean([m["spec_accept_length"] for m in meta]))


class TestGreedyIdentity:
    def test_covers_200_requests_and_batch_sizes_1_to_32(self, das):
        n = sum(len(outs) for label, (outs, _) in das.items() if label != "grpo-step3")
        assert n >= 200
        sizes = {len(outs) for label, (outs, _) in das.items() if label.startswith("plain")}
        assert sizes == {1, 2, 4, 8, 16, 32}

    def test_spec_counters_present_at_zero_verifies(self, das):
        (meta,) = das["one-token"][1]
        assert meta["spec_verify_ct"] == 0 and meta["spec_num_correct_drafts"] == 0

    def test_every_output_token_identical(self, reference, das):
        for label, (ref, _) in reference.items():
            outs, _ = das[label]
            assert mismatches(ref, outs) == 0, label

    def test_grpo_step2_accepts_more_than_one_token_per_step(self, das):
        for label in ("plain-7-32", "grpo-step1", "grpo-step2"):
            print(f"{label}: accept length {accept_length(das[label][1]):.2f} tokens/step")
        assert accept_length(das["grpo-step2"][1]) > 1.5

    def test_history_survives_weight_update(self, reference, das):
        outs, meta = das["grpo-step3"]
        print(f"grpo-step3 after weight update + flush: {accept_length(meta):.2f} tokens/step")
        assert mismatches(reference["grpo-step2"][0], outs) == 0
        assert accept_length(meta) > 1.5


    def test_batches_were_verified_ragged(self, das, das_stats):
        stats = json.loads(das_stats.read_text())
        print(f"worker counters: {stats}")
        assert stats["layout"] == "ragged"
        assert stats["budgets"] == "per-request"  # budgets follow the layout (for_layout)
        # steps where requests verified different tree sizes in one forward
        assert 0 < stats["ragged_steps"] <= stats["verify_steps"]
        # CPU mode runs without CUDA graphs: no verify can have replayed one
        assert stats["graph_steps"] == 0
        # batches of 8 and more: some plans were made ahead by the feedback's job (and the
        # outputs above are identical all the same)
        assert 0 < stats["plans_ahead"] < stats["verify_steps"]
        # of them some on steps where requests had finished since the feedback (the job's
        # plan for the rows kept)
        assert 0 < stats["plans_ahead_kept"] < stats["plans_ahead"]

    def test_host_time_counts_every_decode_step_and_the_engine_gaps(self, das, das_stats):
        host = json.loads(das_stats.read_text())["host"]
        # every verify step was planned (the stats are rewritten after each feedback)
        assert host["steps"] == json.loads(das_stats.read_text())["verify_steps"]
        assert host["rows"] >= host["steps"] and host["plan_ms"] > 0 and host["feedback_ms"] > 0
        # every verify's forward + tree walk timed (ragged and uniform steps alike)
        assert host["verify_ms"] > 0 and host["verify_max_ms"] * host["steps"] >= host["verify_ms"]
        assert host["plan_max_ms"] * host["steps"] >= host["plan_ms"]
        # consecutive decode steps of one batch: SGLang's time between them was measured;
        # a step after a prefill is not a gap (fewer gaps than steps)
        assert 0 < host["engine_gap_steps"] < host["steps"]
        assert host["engine_gap_ms"] > 0 and host["engine_gap_rows"] >= host["engine_gap_steps"]


def test_uniform_layout_is_identical_too(tiny_model, reference):
    """The padded layout (kept for backends without ragged verify) stays lossless."""
    batches = [b for b in workload() if b[0].startswith("grpo")]
    env = {"DAS_CONFIG": json.dumps({"server": {"verify_layout": "uniform"}})}
    with launch(tiny_model, "DAS", env=env) as engine:
        got = run(engine, batches)
    for label, _, _ in batches:
        assert mismatches(reference[label][0], got[label][0]) == 0, label
    assert accept_length(got["grpo-step2"][1]) > 1.5


def test_uniform_verifies_padded_to_a_graph_width_are_identical(tiny_model, reference, tmp_path):
    """Tiers saying the full width (7 drafts) replays a CUDA graph and every other width
    runs eagerly at +1 s (DAS_CONFIG, as a GPU calibration sets them): the policy plans
    the graph width and the worker pads every verify out to it, even past the trees
    (the padding is never linked) -- and the outputs stay those of no speculation."""
    batches = [b for b in workload() if b[0].startswith("grpo")]
    stats_path = tmp_path / "stats.json"
    cfg = {"server": {"verify_layout": "uniform", "stats_path": str(stats_path)},
           "policy": {"cost_graph_widths": [7], "cost_graph_ms": [0.0],
                      "cost_eager_widths": [0], "cost_eager_ms": [1000.0]}}
    with launch(tiny_model, "DAS", env={"DAS_CONFIG": json.dumps(cfg)}) as engine:
        got = run(engine, batches)
    for label, _, _ in batches:
        assert mismatches(reference[label][0], got[label][0]) == 0, label
    stats = json.loads(stats_path.read_text())
    print(f"worker counters: {stats}")
    assert stats["layout"] == "uniform" and stats["graph_width"] is None  # (CPU: no graphs)
    # every verify row carried the root + 7 draft slots, drafted or padding
    assert stats["verify_tokens"] == 8 * stats["host"]["rows"] > 0
    assert stats["proposed"] < 7 * stats["host"]["rows"]  # some of them were padding
    assert accept_length(got["grpo-step2"][1]) > 1.5


def test_ragged_steps_sent_to_the_graph_width_are_identical(tiny_model, reference, tmp_path):
    """A worker that believes SGLang captured verify graphs (the DAS_FAKE_GRAPHS double):
    its graph tiers explore, verifying some steps padded to the full width instead of
    ragged -- what a GPU does when the replay is cheaper. Still token-identical."""
    from das_test_doubles import FAKE_GRAPHS

    batches = [b for b in workload() if b[0].startswith("grpo")]
    stats_path = tmp_path / "stats.json"
    env = {"DAS_CONFIG": json.dumps({"server": {"stats_path": str(stats_path)}})}
    with launch(tiny_model, FAKE_GRAPHS, env=env) as engine:
        got = run(engine, batches)
    for label, _, _ in batches:
        assert mismatches(reference[label][0], got[label][0]) == 0, label
    stats = json.loads(stats_path.read_text())
    tiers = stats["graph_tiers"]
    print(f"worker counters: {stats}")
    assert stats["layout"] == "ragged" and stats["graph_width"] == 7
    assert tiers["explored_steps"] > 0 and stats["ragged_steps"] > 0
    # nothing replays on the CPU: every verify was timed as an eager one
    assert tiers["graph_samples"] == 0 and tiers["eager_samples"] > 0
    assert tiers["eager_extra_ms"] is None
    assert accept_length(got["grpo-step2"][1]) > 1.5


def test_negative_control_corrupted_tree_mask_breaks_identity(tiny_model, reference):
    batches = [b for b in workload() if b[0].startswith("grpo")]
    from das_test_doubles import CORRUPT_MASK  # the test plugin's wrong worker

    with launch(tiny_model, CORRUPT_MASK) as engine:
        bad = run(engine, batches)
    wrong = sum(mismatches(reference[label][0], bad[label][0]) for label, _, _ in batches)
    print(f"corrupted mask: {wrong} of {PROBLEMS * SIBLINGS * 2} outputs differ")
    assert wrong > 0


def test_background_work_started_after_the_launch_is_identical_too(tiny_model, reference, tmp_path):
    """``server.forward_hook`` ``after_launch`` (what ``auto`` picks on a CUDA device, where
    the launch returns while the forward runs): the step's background work starts after
    the verify forward is launched instead of before. Forced here on the CPU, whose
    forward is synchronous, so that work starts once the forward is done. Nothing drafts
    between the hook and the feedback, so the drafts are the same, and the outputs are
    still those of no speculation."""
    batches = [b for b in workload() if b[0].startswith("grpo")]
    stats_path = tmp_path / "stats.json"
    cfg = {"server": {"forward_hook": "after_launch", "stats_path": str(stats_path)}}
    with launch(tiny_model, "DAS", env={"DAS_CONFIG": json.dumps(cfg)}) as engine:
        got = run(engine, batches)
    for label, _, _ in batches:
        assert mismatches(reference[label][0], got[label][0]) == 0, label
    stats = json.loads(stats_path.read_text())
    assert stats["forward_hook"] == "after_launch" and stats["ragged_steps"] > 0
    assert accept_length(got["grpo-step2"][1]) > 1.5
    # (48 requests: below DEFER_START_MIN_ROWS every plan runs before its launch)
    assert stats["launched_first"] == 0


def test_steps_that_verify_the_plan_made_ahead_first_are_identical_too(tiny_model, reference, tmp_path):
    """With the hook after the launch and a batch of 96 (above ``DEFER_START_MIN_ROWS``: starts
    deferred, as at RL scale), steps whose plan is the one the feedback's job made ahead verify
    its trees before the plan runs, and the plan is made after the launch
    (``DasSession.launch_plan``): through the real scheduler -- its batch lists changing as
    requests finish and new ones are merged -- the outputs are still those of no
    speculation, and every such plan drafted the trees that were verified."""
    step1 = next(b for b in workload() if b[0] == "grpo-step1")
    prompts, tags = step1[1] * 2, [(pid, 1) for pid, _ in step1[2]] * 2
    stats_path = tmp_path / "stats.json"
    cfg = {"server": {"forward_hook": "after_launch", "stats_path": str(stats_path)}}
    with launch(tiny_model, "DAS", env={"DAS_CONFIG": json.dumps(cfg)}, max_running_requests=96) as engine:
        got = generate(engine, prompts, GREEDY, tags)
    want = reference["grpo-step1"][0] * 2
    assert mismatches(want, got[0]) == 0
    stats = json.loads(stats_path.read_text())
    assert stats["launched_first"] >= 3 and stats["launch_mismatch"] == 0
    assert stats["plans_ahead"] >= stats["launched_first"]
