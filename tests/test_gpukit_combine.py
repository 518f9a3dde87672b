"""The GPU kit's verdict on greedy identity (benchmarks/gpu/gpukit.py ``combine``): a
mismatch is a near-tie only where the no-speculation reference's top two logprobs at the
first differing position were within ``NEAR_TIE_LOGPROB``; every other mismatch counts as
unexplained (a DAS error until shown otherwise). No engine: the files a run writes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _gpukit():
    spec = importlib.util.spec_from_file_location("gpukit", REPO / "benchmarks/gpu/gpukit.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpukit"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_mismatches_are_split_into_near_ties_and_unexplained(tmp_path):
    kit = _gpukit()
    ref = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9], [1, 1]]
    das = [[1, 2, 3, 4], [5, 6, 0, 8], [9, 0, 9, 9], [1, 1, 1]]
    gaps = [[1.0] * 4, [0.5, 0.5, 1e-5, 0.5], [0.5, 2.0, 0.5, 0.5], [0.3, 0.3]]
    (tmp_path / "greedy_none32.json").write_text(json.dumps(ref))
    (tmp_path / "greedy_das32.json").write_text(json.dumps(das))
    (tmp_path / "greedy_none32_gaps.json").write_text(json.dumps(gaps))
    summary = {"plan": "gpu", "stages": {}, "tokens_per_s": {}}
    kit.combine(tmp_path, summary)
    assert summary["greedy_mismatches"] == 3
    firsts = {m["request"]: m for m in summary["greedy_first_mismatches"]}
    assert firsts[1]["position"] == 2 and firsts[1]["near_tie"] is True
    assert firsts[2]["position"] == 1 and firsts[2]["near_tie"] is False
    # a length difference has no reference logprob at that position: unexplained
    assert firsts[3]["position"] == 2 and firsts[3]["near_tie"] is False
    assert summary["greedy_mismatches_unexplained"] == 2


def test_without_reference_logprobs_every_mismatch_is_unexplained(tmp_path):
    kit = _gpukit()
    (tmp_path / "greedy_none32.json").write_text(json.dumps([[1, 2], [3, 4]]))
    (tmp_path / "greedy_das32.json").write_text(json.dumps([[1, 2], [3, 5]]))
    summary = {"plan": "gpu", "stages": {}, "tokens_per_s": {}}
    kit.combine(tmp_path, summary)
    assert summary["greedy_mismatches"] == 1
    assert summary["greedy_mismatches_unexplained"] == 1


def test_top2_gap_reads_sglang_top_logprobs():
    kit = _gpukit()
    meta = {"output_top_logprobs": [[(-0.1, 7, None), (-2.6, 3, None)],
                                    [(-1.0, 2, None), (-1.0, 9, None)], None]}
    assert kit.top2_gaps(meta) == [2.5, 0.0, None]


def test_a_stage_cut_short_gives_a_verdict_on_the_rounds_both_engines_finished(tmp_path):
    """Greedy results are written after every round: when DAS's time box ended after 1 of
    2 rounds, the verdict covers the first round's requests and says how many were planned."""
    kit = _gpukit()
    ref = [[1, 2], [3, 4], [5, 6], [7, 8]]  # 2 rounds x 2 prompts
    das = [[1, 2], [3, 9]]  # round 0 only, one mismatch
    (tmp_path / "greedy_none32.json").write_text(json.dumps(ref))
    (tmp_path / "greedy_das32.json").write_text(json.dumps(das))
    summary = {"plan": "gpu", "stages": {}, "tokens_per_s": {}}
    kit.combine(tmp_path, summary)
    assert summary["greedy_requests"] == 2 and summary["greedy_mismatches"] == 1
    assert summary["greedy_requests_planned"] == 240
    (tmp_path / "greedy_das32.json").write_text(json.dumps([]))
    fresh = {"plan": "gpu", "stages": {}, "tokens_per_s": {}}
    kit.combine(tmp_path, fresh)
    assert "greedy_mismatches" not in fresh  # nothing to compare: no verdict, not "0"
