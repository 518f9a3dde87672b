"""`das rollout` through typer's CliRunner, with a stand-in engine (no SGLang here)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from das_sglang.cli import rollout as cli_rollout
from das_sglang.replay.datasets import read_jsonl


class FakeEngine:
    """Answers every request with ``#### <problem_id>``; speculation accepts 2 per verify."""

    def __init__(self, speculative: bool) -> None:
        self.loop = asyncio.new_event_loop()
        self.speculative = speculative
        self.requests: list[tuple[str, dict, str]] = []
        self.closed = False

    async def async_generate(self, *, prompt: str, sampling_params: dict, rid: str) -> dict:
        self.requests.append((prompt, sampling_params, rid))
        await asyncio.sleep(0)
        tokens = 31
        meta = {"id": rid, "completion_tokens": tokens}
        if self.speculative:
            meta |= {"spec_verify_ct": 10, "spec_num_correct_drafts": 20}
        return {"text": f"work #### {sampling_params['custom_params']['das_problem_id']}", "meta_info": meta}

    def get_server_info(self) -> dict:
        self.synced = True
        return {}

    def shutdown(self) -> None:
        self.closed = True
        self.loop.close()


@pytest.fixture
def engines(monkeypatch: pytest.MonkeyPatch) -> list[tuple[FakeEngine, tuple]]:
    made: list[tuple[FakeEngine, tuple]] = []

    def make(spec, speculative):
        eng = FakeEngine(speculative)
        made.append((eng, (spec.model, speculative, spec.history, spec.seed, spec.strict_history,
                           spec.requests_per_step)))
        return eng

    monkeypatch.setattr(cli_rollout, "make_engine", make)
    return made


def _app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so the command is invoked by name as in `das`
    app.command("rollout")(cli_rollout.rollout)
    return app


def _invoke(*args: str):
    # Wide terminal: rich must not wrap the table or the messages the tests look for.
    return CliRunner().invoke(_app(), ["rollout", *args], env={"COLUMNS": "200"})


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.jsonl"
    rows = [{"problem_id": "a", "prompt": "1+1?", "answer": "a"}, {"id": 7, "prompt": "2+2?", "answer": "5"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _base(prompts: Path, out: Path) -> list[str]:
    return ["--model", "tiny", "--prompts", str(prompts), "--out", str(out)]


class TestHappyPath:
    def test_writes_verl_steps_and_summary(self, engines, prompts: Path, tmp_path: Path) -> None:
        out = tmp_path / "out"
        res = _invoke(*_base(prompts, out), "--n", "3", "--steps", "2", "--start-step", "5")
        assert res.exit_code == 0, res.output
        assert sorted(p.name for p in out.iterdir()) == ["5.jsonl", "6.jsonl", "summary.json"]
        rows = [obj for _, obj in read_jsonl(out / "6.jsonl")]
        assert len(rows) == 2 * 3
        assert set(rows[0]) == {"input", "output", "score", "step", "request_id"}
        assert {r["step"] for r in rows} == {6}
        assert rows[0]["request_id"] == "a/s6/0" and rows[3]["request_id"] == "7/s6/0"
        assert rows[0]["input"] == "1+1?" and rows[0]["output"] == "work #### a"
        assert [r["score"] for r in rows] == [1.0] * 3 + [0.0] * 3  # "#### 7" vs answer "5"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["none"] is None
        s = summary["das"][1]
        assert (s["step"], s["requests"], s["completion_tokens"]) == (6, 6, 6 * 31)
        assert s["accepted_per_verify"] == 2.0
        assert s["forward_passes"] == 6 * 11  # prefill + 10 verifies per request
        assert "acc/verify" in res.output and "2.00" in res.output

    def test_requests_are_tagged_and_seeded(self, engines, prompts: Path, tmp_path: Path) -> None:
        res = _invoke(*_base(prompts, tmp_path / "o"), "--n", "2", "--steps", "1", "--temperature", "0.7",
                      "--max-new-tokens", "9")
        assert res.exit_code == 0, res.output
        (eng, args), = engines
        assert args == ("tiny", True, None, 0, False, 4) and eng.closed and eng.synced
        _, params, rid = eng.requests[0]
        assert params["custom_params"] == {"das_problem_id": "a", "das_step": 0}
        assert (params["max_new_tokens"], params["temperature"]) == (9, 0.7)
        seeds = {p["sampling_seed"] for _, p, _ in eng.requests}
        assert len(seeds) == 4  # one stable seed per request, all distinct

    def test_compare_none_reports_ratio(self, engines, prompts: Path, tmp_path: Path) -> None:
        out = tmp_path / "out"
        res = _invoke(*_base(prompts, out), "--n", "2", "--steps", "1", "--compare", "none")
        assert res.exit_code == 0, res.output
        assert [a[1] for _, a in engines] == [True, False]
        assert (out / "compare-none" / "0.jsonl").is_file()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["none"][0]["forward_passes"] == 4 * 31 and summary["none"][0]["verify_steps"] == 0
        assert "das/none" in res.output and "0.35x" in res.output  # 44 / 124 forward passes

    def test_history_dir_is_passed_to_the_engine(self, engines, prompts: Path, tmp_path: Path) -> None:
        res = _invoke(*_base(prompts, tmp_path / "o"), "--steps", "1", "--n", "1", "--history", str(tmp_path / "h"),
                      "--strict-history")
        assert res.exit_code == 0, res.output
        assert engines[0][1][2] == tmp_path / "h" and engines[0][1][4] is True


class TestHistorySnapshot:
    @pytest.fixture
    def corrupt(self, tmp_path: Path) -> Path:
        from das_sglang.core.snapshot import save_history, snapshot_file

        h = tmp_path / "hist"
        save_history(h, {"a": {0: [[1, 2, 3]]}})
        raw = bytearray(snapshot_file(h).read_bytes())
        raw[-1] ^= 0xFF
        snapshot_file(h).write_bytes(bytes(raw))
        return h

    def test_corrupt_snapshot_warns_and_runs(self, engines, prompts: Path, tmp_path: Path, corrupt: Path) -> None:
        res = _invoke(*_base(prompts, tmp_path / "o"), "--n", "1", "--steps", "1", "--history", str(corrupt))
        assert res.exit_code == 0, res.output
        assert "warning:" in res.output and "checksum mismatch" in res.output and "empty history" in res.output
        assert len(engines) == 1

    def test_corrupt_snapshot_with_strict_fails_before_the_engine(self, engines, prompts: Path, tmp_path: Path,
                                                                  corrupt: Path) -> None:
        res = _invoke(*_base(prompts, tmp_path / "o"), "--history", str(corrupt), "--strict-history")
        assert res.exit_code == 1 and "error:" in res.output and "history.dassnap: checksum mismatch" in res.output
        assert engines == []

    def test_missing_snapshot_is_a_first_run(self, engines, prompts: Path, tmp_path: Path) -> None:
        res = _invoke(*_base(prompts, tmp_path / "o"), "--n", "1", "--steps", "1", "--history", str(tmp_path / "new"),
                      "--strict-history")
        assert res.exit_code == 0 and "warning" not in res.output


class TestHelp:
    def test_help_lists_every_option(self) -> None:
        res = _invoke("--help")
        assert res.exit_code == 0
        for flag in ("--model", "--prompts", "--n", "--steps", "--out", "--compare", "--max-new-tokens",
                     "--temperature", "--history", "tiny"):
            assert flag in res.output


class TestBadInput:
    def _fails(self, *args: str, match: str) -> None:
        res = _invoke(*args)
        assert res.exit_code == 1, res.output
        assert match in res.output
        assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)

    def test_missing_prompts_file(self, engines, tmp_path: Path) -> None:
        self._fails(*_base(tmp_path / "nope.jsonl", tmp_path / "o"), match="nope.jsonl: no such file")
        assert engines == []  # fails before starting an engine

    def test_bad_json_line(self, engines, tmp_path: Path) -> None:
        p = tmp_path / "p.jsonl"
        p.write_text('{"prompt": "x"}\n{"prompt": \n')
        self._fails(*_base(p, tmp_path / "o"), match="p.jsonl:2: invalid JSON")

    def test_missing_prompt_field(self, engines, tmp_path: Path) -> None:
        p = tmp_path / "p.jsonl"
        p.write_text('{"question": "x"}\n')
        self._fails(*_base(p, tmp_path / "o"), match="p.jsonl:1: field 'prompt'")

    def test_prompt_without_id_is_keyed_by_its_text(self, engines, tmp_path: Path) -> None:
        from das_sglang.api import prompt_key

        p = tmp_path / "p.jsonl"
        p.write_text('{"prompt": "x"}\n')
        res = _invoke(*_base(p, tmp_path / "o"), "--n", "1", "--steps", "1")
        assert res.exit_code == 0, res.output
        assert engines[0][0].requests[0][1]["custom_params"]["das_problem_id"] == prompt_key("x")

    def test_duplicate_problem_id(self, engines, tmp_path: Path) -> None:
        p = tmp_path / "p.jsonl"
        p.write_text('{"prompt": "x", "id": "q"}\n{"prompt": "y", "id": "q"}\n')
        self._fails(*_base(p, tmp_path / "o"), match="p.jsonl:2: duplicate problem_id 'q' with a different prompt")

    def test_empty_file(self, engines, tmp_path: Path) -> None:
        p = tmp_path / "p.jsonl"
        p.write_text("\n")
        self._fails(*_base(p, tmp_path / "o"), match="no prompts")

    @pytest.mark.parametrize(
        "flag, value, match",
        [
            ("--n", "0", "--n 0"),
            ("--steps", "0", "--steps 0"),
            ("--start-step", "-1", "--start-step -1"),
            ("--max-new-tokens", "0", "max_new_tokens=0"),
            ("--temperature", "-1", "temperature=-1.0"),
        ],
    )
    def test_bad_numbers(self, engines, prompts: Path, tmp_path: Path, flag: str, value: str, match: str) -> None:
        self._fails(*_base(prompts, tmp_path / "o"), flag, value, match=match)
        assert engines == []

    def test_out_is_a_file(self, engines, prompts: Path, tmp_path: Path) -> None:
        f = tmp_path / "file"
        f.write_text("x")
        self._fails(*_base(prompts, f), match="exists and is not a directory")

    def test_engine_start_error_is_reported(self, monkeypatch, prompts: Path, tmp_path: Path) -> None:
        def make(*a):
            raise ValueError("--model /no/such: not a local model directory")

        monkeypatch.setattr(cli_rollout, "make_engine", make)
        self._fails(*_base(prompts, tmp_path / "o"), match="/no/such: not a local model directory")

    def test_engine_crash_is_reported(self, monkeypatch, prompts: Path, tmp_path: Path) -> None:
        def make(*a):
            raise RuntimeError("Rank 0 scheduler died during initialization (exit code: 1)")

        monkeypatch.setattr(cli_rollout, "make_engine", make)
        self._fails(*_base(prompts, tmp_path / "o"), match="SGLang engine failed: Rank 0 scheduler died")

    def test_non_number_is_a_usage_error(self, prompts: Path, tmp_path: Path) -> None:
        # Unparseable values are click usage errors (exit 2 by click's convention), still no traceback.
        res = _invoke(*_base(prompts, tmp_path / "o"), "--n", "many")
        assert res.exit_code == 2 and "Invalid value for '--n'" in res.output


def test_unparseable_number_exits_1_naming_the_option():
    from typer.testing import CliRunner

    from das_sglang.cli.app import app

    res = CliRunner().invoke(app, ["rollout", "--model", "tiny", "--prompts", "p.jsonl", "--n", "many"])
    assert res.exit_code == 1, res.output
    assert "--n" in res.output and "integer" in res.output
    assert "Traceback" not in res.output
