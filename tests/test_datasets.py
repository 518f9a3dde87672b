"""Loaders and tokenising for trace replay: real bundled data, field mapping, clear errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from das_sglang.core.tokenize import TextTokenizer
from das_sglang.replay import datasets as ds


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    return TextTokenizer(cache_dir=tmp_path_factory.mktemp("cache"))


def write_jsonl(path: Path, rows: list) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


class TestBundledData:
    def test_verl_dump_groups_identical_inputs(self):
        texts = ds.load_verl([ds.VERL_SAMPLE])
        assert len(texts) == 1024
        assert {t.step for t in texts} == {2}
        groups = ds.problem_ids(texts)
        assert len(groups) == 64
        assert all(sum(t.problem_id == g for t in texts) == 16 for g in groups)

    def test_verl_directory_is_expanded(self):
        assert len(ds.load_verl([ds.VERL_SAMPLE.parent])) == 1024

    def test_skythought_short_series(self, tok):
        texts = ds.load_skythought("short")
        assert ds.steps_of(texts) == list(range(11))
        assert len(ds.problem_ids(texts)) == 30
        assert texts[0].prompt.startswith("<|im_start|>system\nYour role as an assistant")
        rollouts = ds.tokenize_rollouts(texts, tok, ds.SKYTHOUGHT_MAX_NEW_TOKENS)
        assert sum(r.hit_length_cap for r in rollouts) == 6  # the README's count
        assert all(r.response_ids.dtype == np.int32 and r.length > 0 for r in rollouts)
        assert all(r.max_new_tokens == ds.SKYTHOUGHT_MAX_NEW_TOKENS for r in rollouts)

    def test_skythought_checkpoints_map_to_steps_in_numeric_order(self):
        texts = ds.load_skythought("short")
        # checkpoint-105 sorts before checkpoint-21 as text; numerically it is step 7
        assert [t.req_id for t in texts if t.step == 7][0].endswith("@ckpt105")
        assert [t.req_id for t in texts if t.step == 0][0].endswith("@ckpt21")

    @pytest.mark.slow
    def test_skythought_long_series_capped_count(self, tok):
        rollouts = ds.tokenize_rollouts(ds.load_skythought("long"), tok, ds.SKYTHOUGHT_MAX_NEW_TOKENS)
        assert sum(r.hit_length_cap for r in rollouts) == 137


class TestGenericJsonl:
    def test_field_mapping_groups_steps_and_sample_lists(self, tmp_path):
        p = write_jsonl(tmp_path / "x.jsonl.gz", [
            {"q": "A", "a": ["a1", "a2"], "g": "g1", "s": 3},
            {"q": "B", "a": "b1", "g": "g2", "s": 4},
        ])
        texts = ds.load_jsonl([p], prompt_field="q", response_field="a", group_field="g", step_field="s")
        assert [(t.problem_id, t.step, t.response) for t in texts] == [
            ("g1", 3, "a1"), ("g1", 3, "a2"), ("g2", 4, "b1")]

    def test_default_group_is_identical_prompt(self, tmp_path):
        p = write_jsonl(tmp_path / "x.jsonl", [
            {"prompt": "A", "response": "1"}, {"prompt": "A", "response": "2"},
            {"prompt": "B", "response": "3"}])
        texts = ds.load_jsonl([p])
        assert texts[0].problem_id == texts[1].problem_id != texts[2].problem_id
        assert {t.step for t in texts} == {0}

    def test_tokenize_flags_capped_responses(self, tmp_path, tok):
        p = write_jsonl(tmp_path / "x.jsonl", [
            {"prompt": "A", "response": "one two three four five six seven"},
            {"prompt": "A", "response": "one"}])
        rollouts = ds.tokenize_rollouts(ds.load_jsonl([p]), tok, max_new_tokens=7)
        assert [r.hit_length_cap for r in rollouts] == [True, False]
        assert [r.hit_length_cap for r in ds.tokenize_rollouts(ds.load_jsonl([p]), tok)] == [False, False]


class TestMalformedInput:
    """Each bad input raises ValueError whose message names the file, line and field."""

    @pytest.mark.parametrize("rows, needle", [
        (['{"prompt": "A", "response": "x"}', "{not json"], ":2: invalid JSON"),
        (['[1, 2]'], ":1: expected a JSON object"),
        ([{"response": "x"}], ":1: missing field 'prompt'"),
        ([{"prompt": 3, "response": "x"}], ":1: field 'prompt' must be str, got int"),
        ([{"prompt": "A", "response": ""}], ":1: field 'response' is empty"),
        ([{"prompt": "A", "response": []}], ":1: field 'response' is an empty list"),
        ([{"prompt": "A", "response": ["x", 5]}], "field 'response'[1] must be str"),
        ([{"prompt": "A", "response": "x", "grp": " "}], ":1: field 'grp' is empty"),
        ([{"prompt": "A", "response": "x", "grp": "g", "st": "1"}], "field 'st' must be int, got str"),
        ([{"prompt": "A", "response": "x", "grp": "g", "st": -1}], "step=-1 must be >= 0"),
    ])
    def test_generic(self, tmp_path, rows, needle):
        p = write_jsonl(tmp_path / "bad.jsonl", rows)
        with pytest.raises(ValueError, match="bad.jsonl") as e:
            ds.load_jsonl([p], group_field="grp" if "grp" in str(rows) else None,
                          step_field="st" if "st" in str(rows) else None)
        assert needle in str(e.value)

    def test_verl_missing_output(self, tmp_path):
        p = write_jsonl(tmp_path / "5.jsonl", [{"input": "A", "output": "x"}, {"input": "A"}])
        with pytest.raises(ValueError, match=r"5.jsonl:2: missing field 'output'"):
            ds.load_verl([p])

    def test_verl_step_falls_back_to_file_name(self, tmp_path):
        p = write_jsonl(tmp_path / "5.jsonl", [{"input": "A", "output": "x"}])
        assert ds.load_verl([p])[0].step == 5

    def test_duplicate_request_ids(self, tmp_path):
        p = write_jsonl(tmp_path / "1.jsonl", [{"input": "A", "output": "x", "request_id": "r"}] * 2)
        with pytest.raises(ValueError, match=r"1.jsonl:2: duplicate request id 'r'"):
            ds.load_verl([p])

    def test_empty_file(self, tmp_path):
        p = write_jsonl(tmp_path / "1.jsonl", [])
        with pytest.raises(ValueError, match="no rollouts found"):
            ds.load_verl([p])

    def test_missing_path(self, tmp_path):
        with pytest.raises(ValueError, match="nope.jsonl: no such file"):
            ds.load_jsonl([tmp_path / "nope.jsonl"])

    def test_directory_without_jsonl(self, tmp_path):
        with pytest.raises(ValueError, match="holds no .jsonl"):
            ds.load_verl([tmp_path])

    def test_corrupt_gzip(self, tmp_path):
        p = tmp_path / "1.jsonl.gz"
        p.write_bytes(b"not gzip at all")
        with pytest.raises(ValueError, match="1.jsonl.gz: cannot read"):
            ds.load_verl([p])

    def test_unknown_skythought_run(self):
        with pytest.raises(ValueError, match="unknown SkyThought run 'medium'"):
            ds.load_skythought("medium")

    def test_bad_tokenizer_file(self, tmp_path):
        bad = tmp_path / "tokenizer.json"
        bad.write_text("{}")
        with pytest.raises(ValueError, match="tokenizer.json"):
            TextTokenizer(bad)
        with pytest.raises(ValueError, match="does not exist"):
            TextTokenizer(tmp_path / "missing.json")


class TestTokenCache:
    def test_cache_round_trip_and_key(self, tmp_path):
        t = TextTokenizer(cache_dir=tmp_path)
        first = t.encode_many(["hello world", "<|im_start|>user"])
        assert len(list((tmp_path / "tokens").glob("*.npz"))) == 1
        again = t.encode_many(["hello world", "<|im_start|>user"])
        assert all(np.array_equal(a, b) for a, b in zip(first, again))
        assert first[1][0] == 151644  # the added special token keeps its real id
        t.encode_many(["hello", " world"])  # same characters, different split: a new entry
        assert len(list((tmp_path / "tokens").glob("*.npz"))) == 2

    def test_unreadable_cache_entry_is_rebuilt(self, tmp_path):
        t = TextTokenizer(cache_dir=tmp_path)
        ids = t.encode_many(["abc"])
        entry = next((tmp_path / "tokens").glob("*.npz"))
        entry.write_bytes(b"garbage")
        assert np.array_equal(t.encode_many(["abc"])[0], ids[0])


class TestSelect:
    def make(self, pid: str, capped: bool) -> ds.Rollout:
        one = np.ones(1, np.int32)
        return ds.Rollout(pid + str(capped), pid, 0, one, one, 10, capped)

    def test_problems_and_capped(self):
        rs = [self.make("b", False), self.make("a", True), self.make("a", False), self.make("c", False)]
        assert [r.problem_id for r in ds.select(rs, problems=2)] == ["b", "a", "a"]
        assert [r.req_id for r in ds.select(rs, exclude_capped=True)] == ["bFalse", "aFalse", "cFalse"]
        with pytest.raises(ValueError, match="problems=0"):
            ds.select(rs, problems=0)
