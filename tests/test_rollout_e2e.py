"""`das rollout` end to end on real SGLang (CPU development mode, tiny random model).

Two CLI runs share one history directory:
1. steps 0-1 with ``--compare none``: step 1 drafts from step 0's rollouts, so it accepts
   more tokens per verify step; greedy outputs equal the non-speculative engine's.
2. a new process (fresh engine) continues at step 2 from the snapshot alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from das_sglang.core.snapshot import load_history
from das_sglang.replay.datasets import read_jsonl

pytestmark = pytest.mark.sglang

PROMPTS = [
    {"problem_id": "a", "prompt": "the sum of the square root of the number"},
    {"problem_id": "b", "prompt": "find the number of ways to count the digit"},
    {"problem_id": "c", "prompt": "let the triangle have equal side length"},
]
N = 2
COMMON = ["--model", "tiny", "--n", str(N), "--max-new-tokens", "32", "--temperature", "0"]


def _das(*args: str) -> subprocess.CompletedProcess:
    pytest.importorskip("sglang")
    exe = Path(sys.executable).with_name("das")
    res = subprocess.run([str(exe), "rollout", *args], capture_output=True, text=True, timeout=900,
                         env=_env())
    print(res.stdout)  # the table: visible with `pytest -s`
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _env() -> dict:
    import os

    return {**os.environ, "COLUMNS": "120"}


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("e2e")
    (d / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return d


@pytest.fixture(scope="module")
def first_run(workdir: Path) -> Path:
    out = workdir / "run1"
    _das(*COMMON, "--prompts", str(workdir / "prompts.jsonl"), "--steps", "2", "--out", str(out),
         "--compare", "none", "--history", str(workdir / "history"))
    return out


class TestFirstRun:
    def test_history_raises_acceptance(self, first_run: Path) -> None:
        das = _summary(first_run)["das"]
        assert [s["step"] for s in das] == [0, 1]
        assert all(s["requests"] == len(PROMPTS) * N for s in das)
        assert das[1]["accepted_per_verify"] > das[0]["accepted_per_verify"]
        assert das[1]["accepted_per_verify"] >= 2.0  # step 0's text drafts step 1 at length

    def test_fewer_forward_passes_than_plain_decoding(self, first_run: Path) -> None:
        summary = _summary(first_run)
        das, none = summary["das"][1], summary["none"][1]
        assert none["verify_steps"] == 0 and none["forward_passes"] == none["completion_tokens"]
        assert das["forward_passes"] < none["forward_passes"]

    def test_greedy_outputs_are_lossless(self, first_run: Path) -> None:
        for step in (0, 1):
            das = {r["request_id"]: r["output"] for _, r in read_jsonl(first_run / f"{step}.jsonl")}
            none = {r["request_id"]: r["output"] for _, r in read_jsonl(first_run / "compare-none" / f"{step}.jsonl")}
            assert das.keys() == none.keys() and len(das) == len(PROMPTS) * N
            assert das == none

    def test_snapshot_holds_both_steps(self, first_run: Path, workdir: Path) -> None:
        history, _ = load_history(workdir / "history")
        assert sorted(history) == ["a", "b", "c"]
        assert all(sorted(steps) == [0, 1] and all(len(v) == N for v in steps.values())
                   for steps in history.values())


def test_history_survives_an_engine_restart(first_run: Path, workdir: Path) -> None:
    out = workdir / "run2"
    _das(*COMMON, "--prompts", str(workdir / "prompts.jsonl"), "--steps", "1", "--start-step", "2",
         "--out", str(out), "--history", str(workdir / "history"))
    fresh_step0 = _summary(first_run)["das"][0]["accepted_per_verify"]
    restarted = _summary(out)["das"][0]
    assert restarted["step"] == 2
    assert restarted["accepted_per_verify"] > fresh_step0
    assert restarted["accepted_per_verify"] >= 2.0
