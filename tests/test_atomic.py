"""core/atomic.py: replacement is atomic; durable=False (the worker's per-step counters)
skips the fsyncs and nothing else."""

from __future__ import annotations

import os

import pytest

from das_sglang.core.atomic import atomic_file


def test_durable_replacement_fsyncs_and_the_other_does_not(tmp_path, monkeypatch):
    target = tmp_path / "stats.json"
    target.write_text("old")
    calls = []
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    with atomic_file(target, binary=False, tmp_prefix=".t-", durable=False) as f:
        f.write("new")
    assert target.read_text() == "new" and calls == []
    with atomic_file(target, binary=False, tmp_prefix=".t-") as f:
        f.write("newer")
    assert target.read_text() == "newer" and len(calls) == 2  # the file and its directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]  # no temp file left


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "stats.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target, binary=False, tmp_prefix=".t-", durable=False) as f:
            f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]
