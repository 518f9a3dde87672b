"""The worker's host-time counters (das_sglang/sglang/host_time.py)."""

import pytest

from das_sglang.sglang.host_time import (
    add_engine_gap, add_feedback, add_plan, add_verify, delta, new_host_time, summary,
)


def test_sums_maxima_and_means():
    h = new_host_time()
    add_plan(h, 0.002, 32)
    add_plan(h, 0.004, 32)
    add_feedback(h, 0.001)
    add_feedback(h, 0.003)
    add_engine_gap(h, 0.010, 32)
    add_verify(h, 0.020)
    add_verify(h, 0.040)
    assert h["steps"] == 2 and h["rows"] == 64
    assert h["verify_max_ms"] == pytest.approx(40.0)
    assert h["plan_ms"] == pytest.approx(6.0) and h["plan_max_ms"] == pytest.approx(4.0)
    assert h["feedback_max_ms"] == pytest.approx(3.0)
    s = summary(h)
    assert s["plan_ms_per_step"] == pytest.approx(3.0)
    assert s["feedback_ms_per_step"] == pytest.approx(2.0)
    assert s["verify_ms_per_step"] == pytest.approx(30.0)
    assert s["engine_gap_ms_per_step"] == pytest.approx(10.0)
    assert s["engine_gap_us_per_row"] == pytest.approx(10_000 / 32)


def test_nothing_measured_is_none_not_zero():
    s = summary(new_host_time())
    assert s["plan_ms_per_step"] is None and s["engine_gap_us_per_row"] is None


def test_delta_of_a_window_keeps_the_latest_maxima():
    before = new_host_time()
    add_engine_gap(before, 0.005, 8)
    after = dict(before)
    add_engine_gap(after, 0.001, 8)
    d = delta(after, before)
    assert d["engine_gap_steps"] == 1 and d["engine_gap_rows"] == 8
    assert d["engine_gap_ms"] == pytest.approx(1.0)
    assert d["engine_gap_max_ms"] == pytest.approx(5.0)  # maxima are not differences


def test_measure_engine_gap_rejects_bad_batches_before_starting_an_engine(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import measure_engine_gap

    assert measure_engine_gap.main(["--json", str(tmp_path / "o.json"), "--batches", "32,x"]) == 1
    assert "invalid --batches='32,x'" in capsys.readouterr().err
    assert measure_engine_gap.main(["--json", str(tmp_path / "o.json"), "--batches", "0"]) == 1
    assert not (tmp_path / "o.json").exists()
