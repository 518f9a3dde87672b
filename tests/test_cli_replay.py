"""`das replay` through typer's CliRunner: outputs on small real and hand-made data, and
bad input -> one-line error + exit 1, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from das_sglang.cli.app import app
from das_sglang.cli.replay import parse_steps

REQUIRED = {"tokens_per_step", "forward_passes", "makespan_s", "makespan_ratio_vs_none"}


def run(*args: str, cache: Path):
    return CliRunner().invoke(app, ["replay", "--cache-dir", str(cache), *args], env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One token cache for the module: the bundled series is tokenised once, not per test."""
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture
def jsonl(tmp_path) -> Path:
    """Two problems x two steps; step 1 repeats step 0, so drafting from history pays."""
    rows = []
    for step in (0, 1):
        for g, text in (("a", "the quick brown fox jumps over the lazy dog " * 8),
                        ("b", "lorem ipsum dolor sit amet consectetur " * 6)):
            rows.append({"q": f"question {g}", "ans": [text, text], "grp": g, "st": step})
    p = tmp_path / "roll.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def no_traceback(result) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().startswith("error:")


class TestHappyPath:
    def test_jsonl_json_and_plots(self, tmp_path, jsonl):
        out, plots = tmp_path / "r.json", tmp_path / "plots"
        res = run("--dataset", "jsonl", "--input", str(jsonl), "--prompt-field", "q", "--response-field", "ans",
                  "--group-field", "grp", "--step-field", "st", "--steps", "1", "--capped", "include",
                  "--policies", "none,suffix-decoding,das,das-fixed", "--json", str(out), "--plots", str(plots),
                  cache=tmp_path / "c")
        assert res.exit_code == 0, res.output
        doc = json.loads(out.read_text())
        assert doc["decoded_steps"] == [1] and doc["history_steps"] == [0]
        # scored with the roofline table, verify graphs as stock SGLang captures them
        assert doc["scored_with"].startswith("roofline-table") and doc["graphs"] == "stock"
        assert set(doc["policies"]) == {"none", "suffix-decoding", "das", "das-fixed"}
        for name, p in doc["policies"].items():
            assert REQUIRED <= set(p), name
        assert doc["policies"]["none"]["tokens_per_step"] == 1.0
        assert doc["policies"]["das-fixed"]["tokens_per_step"] > 2.0  # step 1 copies step 0
        assert doc["policies"]["das-fixed"]["makespan_ratio_vs_none"] < 1.0
        assert sorted(p.name for p in plots.glob("*.png")) == [
            "batch_size_all-outputs.png", "makespan_all-outputs.png", "tokens_per_step_all-outputs.png"]
        assert "das replay" in res.output and "vs none" in res.output

    def test_bundled_short_series_both_variants(self, tmp_path, shared_cache):
        out = tmp_path / "r.json"
        res = run("--dataset", "skythought-short", "--problems", "2", "--steps", "9-10",
                  "--policies", "none,das", "--json", str(out), cache=shared_cache)
        assert res.exit_code == 0, res.output
        doc = json.loads(out.read_text())
        assert [r["variant"] for r in doc["runs"]] == ["all outputs", "without capped outputs"]
        assert doc["problems"] == 2 and doc["history_steps"] == list(range(9))
        assert doc["policies"]["das"]["tokens_per_step"] > 1.0

    def test_verl_dump_directory(self, tmp_path):
        d = tmp_path / "dump"
        d.mkdir()
        rows = [{"input": "q1", "output": "a b c d e f g " * 5, "score": 1.0, "step": 3, "request_id": f"r{i}"}
                for i in range(3)]
        (d / "3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path / "r.json"
        res = run("--dataset", "verl", "--input", str(d), "--policies", "none,das-fixed", "--json", str(out),
                  cache=tmp_path / "c")
        assert res.exit_code == 0, res.output
        doc = json.loads(out.read_text())
        assert doc["rollouts_decoded"] == 3 and doc["policies"]["none"]["forward_passes"] > 0
        assert len(doc["runs"]) == 1  # nothing hit a length cap: no second, identical run
        assert "no output hit the length cap" in res.output

    def test_verl_defaults_to_the_bundled_dump(self, tmp_path):
        out = tmp_path / "r.json"
        res = run("--dataset", "verl", "--problems", "2", "--policies", "none,das-fixed", "--json", str(out),
                  cache=tmp_path / "c")
        assert res.exit_code == 0, res.output
        doc = json.loads(out.read_text())
        assert doc["rollouts_decoded"] == 32 and doc["decoded_steps"] == [2]  # 2 prompts x 16 samples

    def test_app_lists_commands(self):
        res = CliRunner().invoke(app, ["--help"])
        assert res.exit_code == 0 and "replay" in res.output and "rollout" in res.output


class TestBadInput:
    @pytest.mark.parametrize("args, needle", [
        (["--dataset", "jsonl"], "needs --input"),
        (["--dataset", "verl", "--input", "/nonexistent/dump"], "no such file or directory"),
        (["--dataset", "skythought", "--input", "x.jsonl"], "--input is not used"),
        (["--policies", "none,turbo"], "unknown policies ['turbo']"),
        (["--cost-preset", "tpu-1t"], "unknown cost-model preset 'tpu-1t'"),
        (["--engine", "gpu"], "--engine 'gpu'"),
        (["--graphs", "all"], "--graphs 'all'"),
        (["--dataset", "skythought-short", "--steps", "12"], "steps [12] are not in the data"),
        (["--dataset", "skythought-short", "--steps", "x"], "'x' is not a step number"),
        (["--dataset", "skythought-short", "--problems", "0"], "problems=0"),
        (["--tokenizer", "/nonexistent/tokenizer.json"], "does not exist"),
    ])
    def test_flags(self, shared_cache, args, needle):
        res = run(*args, cache=shared_cache)
        no_traceback(res)
        assert needle in res.output

    def test_malformed_jsonl_names_file_line_field(self, tmp_path):
        p = tmp_path / "bad.jsonl"
        p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
        res = run("--dataset", "jsonl", "--input", str(p), cache=tmp_path / "c")
        no_traceback(res)
        assert "bad.jsonl:2: missing field 'response'" in res.output


def test_parse_steps():
    present = [0, 1, 2, 5, 6]
    assert parse_steps("all", present) == present
    assert parse_steps("last:2", present) == [5, 6]
    assert parse_steps("0,5-6", present) == [0, 5, 6]
    with pytest.raises(ValueError, match="range '6-5' is empty"):
        parse_steps("6-5", present)
