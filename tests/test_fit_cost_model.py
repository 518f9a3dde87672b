"""benchmarks/fit_cost_model.py: recovers known coefficients, output loads as DAS_CONFIG."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from das_sglang.core.cost_model import CostModel
from das_sglang.core.policy import make_policy
from das_sglang.sglang.options import load_options

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import fit_cost_model  # noqa: E402

GRAPH = {0: -0.8, 1: -0.7, 3: -0.6, 7: -0.5}  # ms vs the linear model, per captured width
EAGER = {0: 0.5, 3: 0.9, 7: 1.3, 15: 2.0}


def _write_table(path: Path) -> None:
    lines = ["batch,tokens_per_request,cuda_graph,ms"]
    for b in (1, 8, 32, 128, 512):
        for w in (0, 1, 3, 7, 15):
            lin = 6.0 + 0.025 * b * (1 + w)  # c_base 6 ms, c_tok 25 us
            if w in GRAPH:
                lines.append(f"{b},{1 + w},1,{lin + GRAPH[w]:.6f}")
            if w in EAGER:
                lines.append(f"{b},{1 + w},0,{lin + EAGER[w]:.6f}")
    path.write_text("\n".join(lines) + "\n")


def test_recovers_coefficients_and_writes_loadable_config(tmp_path):
    table, out, report = tmp_path / "t.csv", tmp_path / "cfg.json", tmp_path / "r.json"
    _write_table(table)
    assert fit_cost_model.main(["--table", str(table), "--json", str(out), "--report", str(report)]) == 0
    cfg = json.loads(out.read_text())
    pol = cfg["policy"]
    # One intercept per (mode, width) + a shared slope: c_tok exact, c_base = the least graph
    # intercept, the tiers the rest.
    assert pol["cost_c_tok_us"] == pytest.approx(25.0, rel=1e-6)
    assert pol["cost_graph_widths"] == [0, 1, 3, 7] and pol["cost_eager_widths"] == [0, 3, 7, 15]
    for w, g in zip(pol["cost_graph_widths"], pol["cost_graph_ms"]):
        assert pol["cost_c_base_ms"] + g == pytest.approx(6.0 + GRAPH[w], abs=1e-6)
    for w, e in zip(pol["cost_eager_widths"], pol["cost_eager_ms"]):
        assert pol["cost_c_base_ms"] + e == pytest.approx(6.0 + EAGER[w], abs=1e-6)
    assert json.loads(report.read_text())["max_rel_err"] < 1e-6
    # Usable as DAS_CONFIG: the model-based policy plans with exactly these numbers.
    opts = load_options(16, out.read_text())
    cost = make_policy("length-aware", config=opts.policy).cost
    assert cost.c_tok_s == pytest.approx(25e-6)
    assert cost.step_time(32, 3, host=False) == pytest.approx((6.0 + 0.025 * 128 + GRAPH[3]) * 1e-3)
    assert cost.step_time(32, 15, host=False) == pytest.approx((6.0 + 0.025 * 512 + EAGER[15]) * 1e-3)
    # an eager width between two measured ones is interpolated
    assert cost.width_extra_s(5) == pytest.approx((pol["cost_eager_ms"][1] + pol["cost_eager_ms"][2]) / 2 * 1e-3)


def test_host_json_adds_host_time(tmp_path):
    table, out, host = tmp_path / "t.csv", tmp_path / "cfg.json", tmp_path / "h.json"
    _write_table(table)
    host.write_text(json.dumps({"batches": {"32": {"p50_ms": 0.1}, "512": {"p50_ms": 1.024}}}))
    assert fit_cost_model.main(["--table", str(table), "--json", str(out), "--host-json", str(host)]) == 0
    opts = load_options(None, out.read_text())
    assert opts.policy.cost_host_us_per_request == pytest.approx(2.0)
    assert opts.policy.cost_model().host_s_per_request == pytest.approx(2e-6)


@pytest.mark.parametrize("body, needle", [
    ("batch,tokens,cuda_graph,ms\n1,1,1,2\n", "header must be"),
    ("batch,tokens_per_request,cuda_graph,ms\n1,1,1,2\n4,x,1,3\n", ":3: not numbers"),
    ("batch,tokens_per_request,cuda_graph,ms\n1,1,1,2\n4,2,1,3\n", "cannot separate"),
    ("batch,tokens_per_request,cuda_graph,ms\n1,1,2,2\n4,1,1,3\n", ":2: need batch"),
    ("batch,tokens_per_request,cuda_graph,ms\n1,1,1,2\n", "at least 2 timing rows"),
])
def test_bad_table_exits_1_naming_the_row(tmp_path, body, needle):
    table = tmp_path / "t.csv"
    table.write_text(body)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fit_cost_model.py"), "--table",
                           str(table), "--json", str(tmp_path / "o.json")], capture_output=True, text=True)
    assert proc.returncode == 1 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.json").exists()


def test_config_rejects_bad_coefficients():
    with pytest.raises(ValueError, match="cost_c_tok_us"):
        load_options(None, json.dumps({"policy": {"cost_c_tok_us": -1}}))
    with pytest.raises(ValueError, match="graph_widths"):
        load_options(None, json.dumps({"policy": {"cost_graph_widths": [1, 2], "cost_graph_ms": [0.1]}}))
    with pytest.raises(ValueError, match="width_buckets"):
        load_options(None, json.dumps({"policy": {"width_buckets": [1, 2]}}))
    for bad in (-1, float("inf"), "many", True):
        with pytest.raises(ValueError, match="cost_free_tokens"):
            load_options(None, json.dumps({"policy": {"cost_free_tokens": bad}}))
    assert CostModel(0.001, 1e-6).width_extra_s(4) == 0.0


def test_fits_the_ridge_point(tmp_path):
    """A memory-bound forward is flat until its matmuls outlast the weight read: the fit
    finds that hinge (cost_free_tokens) and the policy's cost model charges only past it."""
    table, out = tmp_path / "t.csv", tmp_path / "cfg.json"
    lines = ["batch,tokens_per_request,cuda_graph,ms"]
    for b in (1, 8, 32, 128, 512):
        for w in (0, 3, 7):
            n = b * (1 + w)
            lines.append(f"{b},{1 + w},1,{6.0 + 0.025 * max(n - 256, 0):.6f}")
    table.write_text("\n".join(lines) + "\n")
    assert fit_cost_model.main(["--table", str(table), "--json", str(out)]) == 0
    pol = json.loads(out.read_text())["policy"]
    assert pol["cost_free_tokens"] == pytest.approx(256)
    assert pol["cost_c_tok_us"] == pytest.approx(25.0, rel=1e-6)
    assert pol["cost_c_base_ms"] == pytest.approx(6.0, abs=1e-6)
    cost = make_policy("length-aware", config=load_options(16, out.read_text()).policy).cost
    assert cost.forward_time(200) == pytest.approx(6e-3)
    assert cost.forward_time(1256) == pytest.approx(6e-3 + 1000 * 25e-6)
