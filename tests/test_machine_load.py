"""benchmarks/machine_load.py: what else the machine did during a benchmark (issue 12's
host-path tail: DAMON's kdamond, other tasks, steal), read from /proc and /sys."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import machine_load as M  # noqa: E402


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc")
def test_own_cpu_counts_this_process_and_others_never_negative():
    before = M.MachineLoad.now()
    _spin(0.12)
    used = M.MachineLoad.now().since(before)
    assert set(used) == {"wall_s", "own_cpu_s", "others_cpu_s", "steal_s", "kdamond_cpu_s"}
    assert used["own_cpu_s"] >= 0.1  # the spin is this process's CPU
    assert used["wall_s"] >= used["own_cpu_s"] * 0.5
    assert used["others_cpu_s"] is not None and used["others_cpu_s"] >= 0.0
    assert used["steal_s"] is not None and used["steal_s"] >= 0.0


def test_add_sums_fields_and_keeps_unknown_unknown():
    total = {}
    M.add(total, {"a": 1.0, "b": None, "c": 2.0})
    M.add(total, {"a": 0.5, "b": 3.0, "c": None})
    assert total == {"a": 1.5, "b": None, "c": None}


def test_damon_reads_monitors_or_nothing(tmp_path, monkeypatch):
    kd = tmp_path / "0"
    (kd / "contexts" / "0" / "schemes" / "0").mkdir(parents=True)
    (kd / "state").write_text("on\n")
    (kd / "pid").write_text("77\n")
    (kd / "contexts" / "0" / "operations").write_text("paddr\n")
    (kd / "contexts" / "0" / "schemes" / "0" / "action").write_text("pageout\n")
    monkeypatch.setattr(M, "_DAMON", tmp_path)
    assert M.damon() == [{"state": "on", "pid": 77, "contexts": [{"operations": "paddr", "schemes": ["pageout"]}]}]
    monkeypatch.setattr(M, "_DAMON", tmp_path / "absent")
    assert M.damon() == []


def test_bench_host_path_writes_the_issue_keys_and_the_machine_load(tmp_path):
    """A tiny run of benchmarks/bench_host_path.py: the keys issue 12's check reads, and
    per configuration what else the machine did (the tail's context)."""
    import bench_host_path

    out = tmp_path / "hp.json"
    rc = bench_host_path.main(["--json", str(out), "--batches", "4", "--problems", "30", "--samples", "4",
                               "--steps", "20", "--warmup", "10", "--forward-ms", "0",
                               "--snapshot-every", "8"])
    assert rc == 0
    import json

    d = json.loads(out.read_text())
    e = d["batches"]["4"]
    for k in ("p50_ms", "p99_ms", "max_ms", "baseline_p50_ms"):
        assert e[k] > 0.0
    assert e["steps"] == 20 and len(e["per_step_ms"]) == 20
    m = e["machine"]
    assert set(m) == {"current", "baseline", "blocks", "quiet"}
    q = m["quiet"]
    assert 0 <= q["blocks"] <= 2 and q["steps"] == 10 * q["blocks"]
    if q["steps"]:
        assert q["p50_ms"] <= q["p99_ms"] <= q["max_ms"] <= e["max_ms"]
    assert m["current"]["own_cpu_ms_per_step"] > 0.0
    # the timed steps (after the 10-step warm-up) in blocks of --interleave (10)
    assert [b["steps"] for b in m["blocks"]] == [[0, 10], [10, 20]]
    assert all(b["max_ms"] <= e["max_ms"] for b in m["blocks"])
    assert max(b["max_ms"] for b in m["blocks"]) == e["max_ms"]
    assert d["machine_info"]["cpus"] >= 1 and isinstance(d["machine_info"]["damon"], list)
    # the worker's reads of the batch before / after BatchRows (checked equal in the run)
    wr = e["worker_rows"]
    assert set(wr) == {"eos", "stop_string"}
    assert all(set(v) == {"before", "after", "after_new_list"} and min(v.values()) > 0.0 for v in wr.values())
    # each phase's p50 and max per step kind: the kinds that ran, every phase, p50 <= max
    by_kind = e["phases_by_kind_ms"]
    assert set(by_kind) <= {"decode", "finish", "boundary"} and "decode" in by_kind
    for phases in by_kind.values():
        assert set(phases) == set(e["phases_p50_ms"])
        assert all(0.0 <= v["p50"] <= v["max"] for v in phases.values())
    # each step's kind beside its time, and each kind's own p50 and max from them
    kinds = e["per_step_kind"]
    assert len(kinds) == 20 and set(kinds) == set(by_kind)
    for kind in set(kinds):
        own = [t for t, k in zip(e["per_step_ms"], kinds) if k == kind]
        assert e[f"{kind}_steps"] == len(own) and e[f"{kind}_max_ms"] == max(own)
        assert min(own) <= e[f"{kind}_p50_ms"] <= max(own)
    # the headline under the off-CPU rule, both rules kept; the engine model's delay in
    # the steps beside the same model run alone (3 gaps before and after each current-path block)
    assert e["headline_rule"] == "off_cpu" and set(e["rules"]) == {"off_cpu", "all"}
    assert e["p50_ms"] == e["rules"]["off_cpu"]["p50_ms"] and e["max_ms"] == e["rules"]["off_cpu"]["max_ms"]
    assert all(a <= b + 1e-9 for a, b in zip(e["per_step_ms"], e["per_step_all_ms"]))
    assert e["rules"]["off_cpu"]["p99_ms"] <= e["rules"]["all"]["p99_ms"] + 1e-9
    assert set(e["baseline_rules_p50_ms"]) == {"off_cpu", "all"}
    ed, ec = e["engine_delay"], e["engine_control"]
    assert ed["gaps"] == 20 and ec["gaps"] >= 15 and ec["gaps"] % 3 == 0
    for st in (ed, ec):
        for q in ("p50", "p90", "p99", "max"):
            assert 0.0 <= st[f"off_cpu_{q}_ms"] <= st[f"delay_{q}_ms"] + 1e-9


def test_quiet_blocks_are_those_where_other_tasks_left_the_machine_alone():
    """bench_host_path's ``quiet`` statistics: only the steps of blocks where other tasks
    and steal took at most QUIET_SHARE of one CPU (here the 1st and 3rd of four 10-step
    blocks)."""
    from types import SimpleNamespace

    import bench_host_path as bh

    args = SimpleNamespace(interleave=10, warmup=10)
    times = [1.0] * 10 + [50.0] * 10 + [2.0] * 10 + [60.0] * 10  # 40 timed steps
    block = lambda others, steal=0.0: {"wall_s": 1.0, "others_cpu_s": others,  # noqa: E731
                                       "kdamond_cpu_s": others, "steal_s": steal, "own_cpu_s": 1.0}
    # first: warm-up; the 3rd timed one is quiet of tasks but not of steal
    blocks = [block(0.0), block(0.05), block(0.02, steal=0.3), block(0.02), block(0.5)]
    m = bh._machine({False: {}}, {False: 5}, blocks, times, args)
    assert [b["steps"] for b in m["blocks"]] == [[0, 10], [10, 20], [20, 30], [30, 40]]
    q = m["quiet"]
    assert (q["blocks"], q["steps"]) == (2, 20)
    assert q["p50_ms"] == 1.5 and q["max_ms"] == 2.0  # steps 0-9 (1.0) and 20-29 (2.0)
