"""The honest generic JSONL loader: which generations hit the length cap comes from the
recorded finish reason (or a named field), the cap is inferred when not given, and
`das replay --help` names every policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from das_sglang.cli.app import app
from das_sglang.core.tokenize import TextTokenizer
from das_sglang.replay import datasets as ds
from das_sglang.replay.contenders import CONTENDER_HELP, CONTENDER_NAMES

LONG = "the quick brown fox jumps over the lazy dog " * 6
SHORT = "lorem ipsum dolor"


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> TextTokenizer:
    return TextTokenizer(cache_dir=tmp_path_factory.mktemp("cache"))


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class TestFinishReason:
    def test_finish_reason_decides_capped_and_infers_the_cap(self, tmp_path, tok):
        p = write(tmp_path / "x.jsonl", [
            {"prompt": "A", "response": LONG, "finish_reason": "length"},
            {"prompt": "A", "response": LONG + LONG, "finish_reason": "stop"},  # longer, but ended by EOS
            {"prompt": "B", "response": SHORT, "finish_reason": "stop"},
            {"prompt": "B", "response": SHORT},  # not recorded
        ])
        texts = ds.load_jsonl([p])
        assert [t.capped for t in texts] == [True, False, False, None]
        rollouts = ds.tokenize_rollouts(texts, tok)
        assert [r.hit_length_cap for r in rollouts] == [True, False, False, False]
        cap, how = ds.infer_max_new_tokens(texts, [r.response_ids for r in rollouts])
        assert cap == rollouts[0].length and "marked capped" in how
        # the policy plans with a cap no recorded response exceeds
        assert all(r.max_new_tokens == rollouts[1].length for r in rollouts)

    def test_lists_bools_and_a_named_field(self, tmp_path, tok):
        p = write(tmp_path / "x.jsonl", [
            {"q": "A", "a": [LONG, SHORT], "why": ["max_tokens", "eos"]},
            {"q": "B", "a": [SHORT], "why": [True]},
        ])
        texts = ds.load_jsonl([p], "q", "a", capped_field="why")
        assert [t.capped for t in texts] == [True, False, True]

    def test_without_finish_reason_nothing_is_capped_unless_a_cap_is_given(self, tmp_path, tok):
        p = write(tmp_path / "x.jsonl", [{"prompt": "A", "response": LONG}, {"prompt": "A", "response": SHORT}])
        assert not any(r.hit_length_cap for r in ds.tokenize_rollouts(ds.load_jsonl([p]), tok))
        n = len(tok.encode_many([LONG])[0])
        assert [r.hit_length_cap for r in ds.tokenize_rollouts(ds.load_jsonl([p]), tok, n)] == [True, False]

    @pytest.mark.parametrize("rows, kwargs, needle", [
        ([{"prompt": "A", "response": "x", "finish_reason": 3}], {}, "field 'finish_reason' must be a finish reason"),
        ([{"prompt": "A", "response": ["x", "y"], "finish_reason": ["stop"]}], {}, "holds 1 values for 2 responses"),
        ([{"prompt": "A", "response": "x"}], {"capped_field": "done"}, ":1: missing field 'done'"),
    ])
    def test_bad_values_are_named(self, tmp_path, rows, kwargs, needle):
        p = write(tmp_path / "bad.jsonl", rows)
        with pytest.raises(ValueError, match="bad.jsonl") as e:
            ds.load_jsonl([p], **kwargs)
        assert needle in str(e.value)

    def test_write_generic_jsonl_round_trips(self, tmp_path):
        texts = [ds.TextRollout("r0", "g", 2, "P", LONG, 1.0, "x:1", True),
                 ds.TextRollout("r1", "g", 2, "P", SHORT, None, "x:2", False)]
        p = ds.write_generic_jsonl(texts, tmp_path / "g.jsonl.gz")
        back = ds.load_jsonl([p], group_field="group", step_field="step")
        assert [(t.problem_id, t.step, t.response, t.capped, t.score) for t in back] == [
            ("g", 2, LONG, True, 1.0), ("g", 2, SHORT, False, None)]


def run(*args: str, cache: Path):
    return CliRunner().invoke(app, ["replay", "--cache-dir", str(cache), *args], env={"COLUMNS": "200"})


class TestCli:
    def test_help_lists_every_policy(self):
        res = CliRunner().invoke(app, ["replay", "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0
        for name in CONTENDER_NAMES:
            assert f"{name}: {CONTENDER_HELP[name]}" in res.output, name

    def test_capped_variant_comes_from_finish_reason(self, tmp_path):
        rows = []
        for step in (0, 1):
            rows.append({"prompt": "A", "response": [LONG, LONG + "x"], "finish_reason": ["length", "stop"],
                         "g": "a", "s": step})
            rows.append({"prompt": "B", "response": SHORT * 5, "finish_reason": "stop", "g": "b", "s": step})
        p = write(tmp_path / "r.jsonl", rows)
        out = tmp_path / "r.json"
        res = run("--dataset", "jsonl", "--input", str(p), "--group-field", "g", "--step-field", "s",
                  "--steps", "1", "--policies", "none,das", "--json", str(out), cache=tmp_path / "c")
        assert res.exit_code == 0, res.output
        doc = json.loads(out.read_text())
        assert [(r["variant"], r["rollouts_decoded"], r["capped_decoded"]) for r in doc["runs"]] == [
            ("all outputs", 3, 1), ("without capped outputs", 2, 0)]
        assert "longest output marked capped" in doc["max_new_tokens_source"]

    def test_capped_field_only_with_jsonl(self, tmp_path):
        res = run("--dataset", "verl", "--capped-field", "x", cache=tmp_path / "c")
        assert res.exit_code == 1 and "--capped-field is only read with --dataset jsonl" in res.output
