"""The rollout driver's pure parts: counting from meta_info, scoring, records, seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from das_sglang.core.records import RolloutRecord, step_file, write_step
from das_sglang.api import tag
from das_sglang.rollout import (
    Prompt, RequestStats, Sampling, StepStats, final_answer, read_prompts, sampling_seed, score,
)


class TestCounting:
    def test_speculative_meta_uses_correct_drafts(self) -> None:
        r = RequestStats.from_meta({"completion_tokens": 40, "spec_verify_ct": 12, "spec_num_correct_drafts": 25})
        assert (r.accepted_tokens, r.forward_passes) == (25, 13)

    def test_fallback_solves_for_accepted(self) -> None:
        # 1 prefill token + 12 verifies x (accepted + bonus) = 40  ->  accepted = 27
        r = RequestStats.from_meta({"completion_tokens": 40, "spec_verify_ct": 12})
        assert r.accepted_tokens == 27

    def test_plain_decoding_is_one_forward_per_token(self) -> None:
        r = RequestStats.from_meta({"completion_tokens": 40})
        assert (r.verify_steps, r.accepted_tokens, r.forward_passes) == (0, 0, 40)

    def test_aggregate(self) -> None:
        reqs = [RequestStats(10, 4, 5), RequestStats(20, 6, 9)]
        s = StepStats.aggregate(3, reqs, makespan_s=2.0)
        assert (s.requests, s.completion_tokens, s.forward_passes, s.max_forward_passes) == (2, 30, 12, 7)
        assert s.tokens_per_s == 15.0 and s.accepted_per_verify == 1.4 and s.tokens_per_forward == 2.5
        assert s.as_dict()["accepted_per_verify"] == 1.4

    def test_empty_step_has_no_division_by_zero(self) -> None:
        s = StepStats.aggregate(0, [], makespan_s=0.0)
        assert (s.tokens_per_s, s.accepted_per_verify, s.tokens_per_forward) == (0.0, 0.0, 0.0)


class TestScore:
    @pytest.mark.parametrize(
        "text, want",
        [("so #### 1,234.", "1,234."), (r"thus \boxed{12} or \boxed{13}", "13"), ("no answer", None), ("####", "")],
    )
    def test_final_answer(self, text: str, want: str | None) -> None:
        assert final_answer(text) == want

    def test_score(self) -> None:
        assert score("#### 1,234.", "1234") == 1.0
        assert score("#### 12", "13") == 0.0
        assert score("nothing", "13") == 0.0
        assert score("#### 12", None) is None


class TestRequests:
    def test_tag(self) -> None:
        assert tag(7, 3) == {"das_problem_id": "7", "das_step": 3}

    def test_seed_is_stable_and_per_request(self) -> None:
        assert sampling_seed(0, "a/s0/0") == sampling_seed(0, "a/s0/0")
        assert sampling_seed(0, "a/s0/0") != sampling_seed(0, "a/s0/1") != sampling_seed(1, "a/s0/1")
        assert 0 <= sampling_seed(5, "x") < 2**63

    def test_sampling_params(self) -> None:
        p = Sampling(16, 0.0, seed=None).params("q", 2, "q/s2/0")
        assert p == {"max_new_tokens": 16, "temperature": 0.0, "custom_params": tag("q", 2)}

    @pytest.mark.parametrize("kw, match", [({"max_new_tokens": 0}, "max_new_tokens=0"), ({"temperature": -0.5}, "temperature=-0.5")])
    def test_bad_sampling(self, kw: dict, match: str) -> None:
        args = {"max_new_tokens": 8, "temperature": 1.0} | kw
        with pytest.raises(ValueError, match=match):
            Sampling(**args)


class TestReadPrompts:
    def test_bundled_verl_dump_reads_as_64_prompts(self) -> None:
        from das_sglang.api import prompt_key
        from das_sglang.replay.datasets import VERL_SAMPLE

        prompts = read_prompts(VERL_SAMPLE)  # 1024 rows = 64 prompts x 16 samples
        assert len(prompts) == 64 and len({p.problem_id for p in prompts}) == 64
        assert prompts[0].problem_id == prompt_key(prompts[0].text) and prompts[0].answer is None

    def test_fields_and_defaults(self, tmp_path: Path) -> None:
        f = tmp_path / "p.jsonl"
        f.write_text('{"prompt": "a", "id": 3, "answer": 12}\n\n{"input": "b", "problem_id": "x"}\n')
        assert read_prompts(f) == [Prompt("3", "a", "12"), Prompt("x", "b", None)]

    @pytest.mark.parametrize(
        "line, match",
        [
            ("[1, 2]", r"p.jsonl:1: expected a JSON object, got list"),
            ('{"prompt": ""}', r"field 'prompt' must be a non-empty string"),
            ('{"prompt": "a", "id": true}', r"field 'problem_id' must be a non-empty string or int, got True"),
            ('{"prompt": "a", "answer": [1]}', r"field 'answer' must be a string or number"),
        ],
    )
    def test_bad_lines(self, tmp_path: Path, line: str, match: str) -> None:
        f = tmp_path / "p.jsonl"
        f.write_text(line + "\n")
        with pytest.raises(ValueError, match=match):
            read_prompts(f)


class TestRecords:
    def test_write_step_is_verl_format(self, tmp_path: Path) -> None:
        recs = [RolloutRecord("p", "o\nü", 1.0, 4, "a/s4/0"), RolloutRecord("p", "x", None, 4, "a/s4/1")]
        path = write_step(tmp_path / "d", 4, recs)
        assert path == step_file(tmp_path / "d", 4) and path.name == "4.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert rows == [
            {"input": "p", "output": "o\nü", "score": 1.0, "step": 4, "request_id": "a/s4/0"},
            {"input": "p", "output": "x", "score": None, "step": 4, "request_id": "a/s4/1"},
        ]
        assert [p.name for p in (tmp_path / "d").iterdir()] == ["4.jsonl"]  # no temp files left

    def test_step_mismatch(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"'r' has step=1, writing step 2"):
            write_step(tmp_path, 2, [RolloutRecord("p", "o", None, 1, "r")])
        assert not step_file(tmp_path, 2).exists()

    @pytest.mark.parametrize("kw, match", [({"step": -1}, "step=-1"), ({"request_id": ""}, "request_id=''")])
    def test_bad_record(self, kw: dict, match: str) -> None:
        args = {"input": "p", "output": "o", "score": None, "step": 0, "request_id": "r"} | kw
        with pytest.raises(ValueError, match=match):
            RolloutRecord(**args)

    def test_replay_loader_reads_what_we_write(self, tmp_path: Path) -> None:
        from das_sglang.replay.datasets import load_verl

        write_step(tmp_path, 0, [RolloutRecord("prompt", "out #### 3", 1.0, 0, "q/s0/0")])
        write_step(tmp_path, 1, [RolloutRecord("prompt", "again", None, 1, "q/s1/0")])
        got = load_verl([tmp_path])
        assert [(r.req_id, r.step, r.response, r.score) for r in got] == [
            ("q/s0/0", 0, "out #### 3", 1.0),
            ("q/s1/0", 1, "again", None),
        ]
        assert got[0].problem_id == got[1].problem_id  # same prompt -> same group
