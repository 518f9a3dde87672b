"""Per-problem history shards: lazy loads, ownership, atomic writes under concurrency."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from das_sglang.core.drafter import SuffixDrafter
from das_sglang.core.config import DrafterConfig
from das_sglang.core.shards import (
    ShardStore,
    ShardSync,
    check_engine_id,
    parse_metrics,
    problem_key,
    read_engine_stats,
)


def _seq(seed: int, n: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, n, dtype=np.int32)


def _drafter(step: int, window: int = 4) -> SuffixDrafter:
    d = SuffixDrafter(DrafterConfig(window_steps=window))
    d.advance_step(step)
    return d


def _sync(root, engine, drafter, **kw) -> ShardSync:
    return ShardSync(root, engine, drafter, drafter.config.window_steps, **kw)


def _serve(sync: ShardSync, pid: str, step: int, seqs: list[np.ndarray]) -> None:
    """One GRPO group of ``pid`` at ``step`` on one engine: start all, finish all."""
    for _ in seqs:
        sync.on_start(pid, step)
    for s in seqs:
        sync.drafter.add_history(pid, step, s)  # what the session does on finish
        sync.on_finished(pid, step, s)


def test_problem_keys_are_safe_and_distinct():
    ids = ["gsm8k/17", "gsm8k_17", "../../etc", "", "x" * 300, "ü"]
    keys = [problem_key(i) for i in ids]
    assert len(set(keys)) == len(ids)
    assert all("/" not in k and not k.startswith(".") and len(k) < 80 for k in keys)


@pytest.mark.parametrize("bad", ["", "a/b", ".hidden", "a b", None])
def test_bad_engine_id_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="engine_id"):
        check_engine_id(bad)


def test_restarted_engine_loads_its_own_and_others_history(tmp_path):
    a = _sync(tmp_path, "a", _drafter(1))
    _serve(a, "p", 1, [_seq(1), _seq(2)])
    b = _sync(tmp_path, "b", _drafter(1))
    _serve(b, "p", 1, [_seq(3)])
    assert a.flush(10) and b.flush(10)
    a.close()  # engine "a" goes away (restart)

    a2 = _sync(tmp_path, "a", _drafter(2))
    a2.on_start("p", 2)
    assert (a2.stats.lazy_loads, a2.stats.lazy_load_hits, a2.stats.lazy_load_sequences) == (1, 1, 3)
    held = a2.drafter.history()["p"][1]
    assert sorted(map(bytes, held)) == sorted(map(bytes, [_seq(1), _seq(2), _seq(3)]))
    # Its own old rollouts were adopted: the next write of "p" still holds them, and
    # not b's (b's shard has those).
    a2.on_finished("p", 2, _seq(4))
    assert a2.flush(10)
    own = ShardStore(tmp_path, "x").read("p")["a"]
    assert sorted(own) == [1, 2] and len(own[1]) == 2 and len(own[2]) == 1
    a2.close()
    b.close()


def test_no_reload_while_held_and_gap_loads_only_missed_steps(tmp_path):
    a = _sync(tmp_path, "a", _drafter(1))
    b = _sync(tmp_path, "b", _drafter(1))
    _serve(a, "p", 1, [_seq(1)])
    assert a.flush(10)
    _serve(b, "p", 1, [_seq(2)])  # first sight on b: loads a's step-1 rollout
    assert b.stats.lazy_load_sequences == 1
    for step in (2, 3):  # p moves to b for two steps
        b.drafter.advance_step(step)
        _serve(b, "p", step, [_seq(10 + step)])
    assert b.stats.lazy_loads == 1  # held continuously: no further lookups
    assert b.flush(10)
    a.drafter.advance_step(4)
    a.on_start("p", 4)  # back on a after missing steps 2 and 3
    assert a.stats.lazy_loads == 2 and a.stats.lazy_load_hits == 1
    hist = a.drafter.history()["p"]
    assert sorted(hist) == [1, 2, 3] and len(hist[1]) == 1  # b's step-1 copy not duplicated
    a.close()
    b.close()


def test_steps_outside_window_or_ahead_are_not_loaded(tmp_path):
    a = _sync(tmp_path, "a", _drafter(10, window=2))
    for step in (5, 8, 10):
        _serve(a, "p", step, [_seq(step)])
    assert a.flush(10)
    a.close()
    b = _sync(tmp_path, "b", _drafter(9, window=2))
    b.on_start("p", 9)
    assert sorted(b.drafter.history()["p"]) == [8]  # 5 too old, 10 ahead of b's step
    b.close()


def test_second_live_engine_with_same_id_is_refused(tmp_path):
    a = _sync(tmp_path, "same", _drafter(0))
    with pytest.raises(ValueError, match="held by another live engine"):
        _sync(tmp_path, "same", _drafter(0))
    a.close()
    _sync(tmp_path, "same", _drafter(0)).close()  # free again once closed


def test_corrupt_shard_is_skipped_not_fatal(tmp_path):
    a = _sync(tmp_path, "a", _drafter(1))
    b = _sync(tmp_path, "b", _drafter(1))
    _serve(a, "p", 1, [_seq(1)])
    _serve(b, "p", 1, [_seq(2)])
    assert a.flush(10) and b.flush(10)
    shard = tmp_path / problem_key("p") / "b" / "history.dassnap"
    data = bytearray(shard.read_bytes())
    data[-40] ^= 0xFF
    shard.write_bytes(bytes(data))
    c = _sync(tmp_path, "c", _drafter(1))
    c.on_start("p", 1)
    assert c.stats.lazy_load_sequences == 1  # a's shard only
    for s in (a, b, c):
        s.close()


def test_write_failure_is_counted_and_serving_goes_on(tmp_path):
    a = _sync(tmp_path, "a", _drafter(1))
    (tmp_path / problem_key("p")).write_text("not a directory")  # the shard dir cannot exist
    _serve(a, "p", 1, [_seq(1)])
    assert a.flush(10)
    assert a.stats.shard_write_errors == 1 and a.stats.shard_writes == 0
    a.close()


def test_stats_file_and_metrics_text(tmp_path):
    a = _sync(tmp_path, "a", _drafter(1))
    _serve(a, "p", 1, [_seq(1), _seq(2)])
    a.flush(10)
    stats = read_engine_stats(tmp_path)["a"]
    assert stats["requests_finished"] == 2 and stats["shard_writes"] == 1
    assert stats["lazy_loads"] == 1 and stats["lazy_load_hit_rate"] == 0.0
    a.close()
    text = 'das_lazy_loads_total{engine="e1"} 3.0\ndas_problems_held{engine="e1"} 7.0\nother 1\n'
    assert parse_metrics(text) == {"e1": {"lazy_loads": 3.0, "problems_held": 7.0}}


# ---------------------------------------------------------------- two processes

_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from das_sglang.core.shards import ShardStore
    root, engine, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = ShardStore(root, engine)
    store.acquire()
    for r in range(rounds):
        for p in range(4):
            # Content is a function of (engine, round, problem): a reader can tell a
            # complete version from a torn or mixed one.
            seed = hash((engine, p)) % 1000 + r
            seqs = [np.full(200 + 37 * k, seed * 10 + k, np.int32) for k in range(3)]
            store.write(f"p{p}", {r: seqs})
    store.release()
""")


def _check_version(engine_steps) -> None:
    (step, seqs), = engine_steps.items()
    assert len(seqs) == 3
    for k, s in enumerate(seqs):
        assert len(s) == 200 + 37 * k and len(set(s.tolist())) == 1 and int(s[0]) % 10 == k


def test_two_engine_processes_never_corrupt_each_others_shards(tmp_path):
    rounds = 60
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), e, str(rounds)])
             for e in ("e1", "e2")]
    reader = ShardStore(tmp_path, "reader")
    reads = 0
    while any(p.poll() is None for p in procs):
        for p in range(4):
            for engine, steps in reader.read(f"p{p}").items():
                assert engine in ("e1", "e2")
                _check_version(steps)
                reads += 1
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    for p in range(4):
        final = reader.read(f"p{p}")
        assert sorted(final) == ["e1", "e2"]
        for steps in final.values():
            assert list(steps) == [rounds - 1]
            _check_version(steps)
    assert reads > 0
    leftovers = [f for f in tmp_path.rglob("*.tmp")]
    assert leftovers == []


def test_prometheus_series_when_sglang_metrics_are_on(tmp_path, monkeypatch):
    """With SGLang's multiprocess metrics dir set, two syncs in one process share one
    registration and the values read back through prometheus' multiprocess collector."""
    from das_sglang.core import shards

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "prom"))
    (tmp_path / "prom").mkdir()
    monkeypatch.setattr(shards._PromMetrics, "_series", None)
    import importlib

    import prometheus_client.values as values

    importlib.reload(values)  # pick the multiprocess value class, as a fresh process would
    try:
        a = _sync(tmp_path / "s", "a", _drafter(1))
        b = _sync(tmp_path / "s", "b", _drafter(1))
        _serve(a, "p", 1, [_seq(1), _seq(2)])
        assert a.flush(10) and b.flush(10)
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(tmp_path / "prom"))
        got = parse_metrics(generate_latest(registry).decode())
        assert got["a"]["requests_finished"] == 2 and got["a"]["lazy_loads"] == 1
        assert got["b"]["requests_finished"] == 0
        a.close()
        b.close()
    finally:
        monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
        importlib.reload(values)
        shards._PromMetrics._series = None


def test_shard_engine_id_refuses_tensor_and_data_parallel():
    from types import SimpleNamespace

    from das_sglang.sglang.options import load_options
    from das_sglang.sglang.scaleout import shard_engine_id

    on = load_options(8, json.dumps({"server": {"shard_path": "/s"}}))
    assert shard_engine_id(SimpleNamespace(tp_size=1, dp_size=1, port=31001), on).endswith("-31001")
    named = load_options(8, json.dumps({"server": {"shard_path": "/s", "engine_id": "e7"}}))
    assert shard_engine_id(SimpleNamespace(tp_size=1, dp_size=1, port=1), named) == "e7"
    assert shard_engine_id(SimpleNamespace(tp_size=4), load_options(8, "")) is None
    for bad in (SimpleNamespace(tp_size=2, dp_size=1), SimpleNamespace(tp_size=1, dp_size=2)):
        with pytest.raises(ValueError, match="shard_path with (tp|dp)_size=2"):
            shard_engine_id(bad, on)
    with pytest.raises(ValueError, match="engine_id"):
        load_options(8, json.dumps({"server": {"shard_path": "/s", "engine_id": "a/b"}}))
