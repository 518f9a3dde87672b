"""CPU dry run of the one-shot GPU kit (``pytest -m gpukit_dry``): the same scripts as
the GPU run (benchmarks/gpu/run.sh -> gpukit.py), CPU development mode, tiny sizes, so
the GPU minutes are never spent discovering a typo. Starts two real SGLang engines (no
speculation; DAS with the cost probe) and checks every stage's output.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpukit_dry, pytest.mark.sglang]


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpukit")
    env = dict(os.environ, DAS_SGLANG_CPU="1", GPUKIT_MODEL_DIR=str(out.parent / "gpukit-model"))
    env.pop("DAS_CONFIG", None)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), str(out / "kit")],
                          env=env, capture_output=True, text=True, timeout=600)
    return out / "kit", proc


def test_run_writes_few_files_and_every_stage_succeeds(kit):
    out, proc = kit
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in out.iterdir()} <= {
        "summary.json", "cost_table.csv", "coefficients.json", "decode_table.csv",
        "score_table.csv", "details.tgz"}
    assert len(list(out.iterdir())) <= 8  # the device tool returns at most 8 files
    summary = json.loads((out / "summary.json").read_text())
    failed = {k: v.get("error", v.get("stages")) for k, v in summary["stages"].items()
              if not v.get("ok", True)}
    assert not failed, failed
    with tarfile.open(out / "details.tgz") as tar:
        names = tar.getnames()
    assert "role_das32.log" in names and "greedy_none32.json" in names


def test_greedy_identity_and_sampled_check(kit):
    summary = json.loads((kit[0] / "summary.json").read_text())
    assert summary["greedy_mismatches"] == 0
    assert summary["greedy_requests"] == 12
    assert summary["greedy_mismatches_unexplained"] == 0
    das = summary["stages"]["das32"]["stages"]["greedy"]
    assert das["verify_forwards"] > 0  # DAS really verified drafts
    assert len(das["round_seconds"]) == 2
    # the worker's own counters for the stage: every verify, none a CUDA graph on the CPU
    worker = das["worker"]
    assert worker["verify_steps"] > 0 and worker["graph_steps"] == 0
    # no captured graphs on the CPU: no graph tiers to estimate (a GPU run reads both)
    assert worker["graph_width"] is None and worker["graph_tiers"] is None
    assert worker["host"]["plan_ms_per_step"] > 0
    assert isinstance(summary["sampled_ok"], bool) and summary["sampled"]["pvalues"]
    assert summary["sampled"]["distributions_match"]


def test_cost_table_covers_the_grid_and_is_fitted(kit):
    out, _ = kit
    with open(out / "cost_table.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["batch", "tokens_per_request", "cuda_graph", "ms"]
    cells = {(int(b), int(t)) for b, t, g, ms in rows[1:] if float(ms) > 0}
    assert cells == {(b, t) for b in (1, 2, 4) for t in (1, 2, 5)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["fit"]["ok"], summary["stages"]["fit"]
    assert "cost_c_tok_us" in summary["coefficients"]["policy"]
    # the probe's forwards (3 batches x 3 widths x (1 warm-up + 2 timed)) are counted as
    # such, not as the engine's verifies
    worker = summary["stages"]["das32"]["stages"]["cost"]["worker"]
    assert worker["probe_forwards"] == 27
    assert worker["verify_steps"] < 27


def test_plain_decode_rows_join_the_verify_table_for_replay(kit):
    """The no-speculation engine's decode step per batch (decode_table.csv) and the
    table `das replay --score` reads: the verify rows plus those (its `none` baseline)."""
    from das_sglang.core.cost_model import CostTable

    out, _ = kit
    with open(out / "decode_table.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["batch", "tokens_per_request", "cuda_graph", "ms"]
    assert [(int(b), int(t), int(g)) for b, t, g, _ in rows[1:]] == [(1, 1, 0), (2, 1, 0), (4, 1, 0)]
    assert all(float(ms) > 0 for *_, ms in rows[1:])
    summary = json.loads((out / "summary.json").read_text())
    score = CostTable.from_csv(summary["score_table"])
    with open(out / "cost_table.csv", newline="") as f:
        verify_rows = len(list(csv.reader(f))) - 1
    with open(summary["score_table"], newline="") as f:
        assert len(list(csv.reader(f))) - 1 == verify_rows + 3
    assert score.forward_time(2) > 0


def test_end_to_end_tokens_per_second_per_mode(kit):
    summary = json.loads((kit[0] / "summary.json").read_text())
    assert set(summary["tokens_per_s"]) == {"none", "das"}
    assert all(v > 0 for v in summary["tokens_per_s"].values())
