"""Tensor parallel: every TP rank takes the same accept decisions; only rank 0 writes.

A real 2-process ``torch.distributed`` group (gloo, CPU) runs ``tp_ranks.run_rank`` per
rank: the production session, layout and verify path, with the worker's ``TpGroup``
broadcast (``tp.py``) between sampling and the tree walk, each rank drawing different
targets on purpose, so the broadcast is what makes decisions agree (a real ``--tp 2``
engine, where the ranks' draws already agree, is ``test_tp_engine.py``).
"""

from __future__ import annotations

import json
import multiprocessing
import socket
from pathlib import Path

import pytest

from das_sglang.core import snapshot

pytestmark = pytest.mark.tp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    from tp_ranks import run_rank

    tmp = tmp_path_factory.mktemp("tp")
    out = tmp / "result.json"
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=run_rank, args=(r, 2, port, str(tmp), str(out)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0, f"rank exited with {p.exitcode}"
    return [dict(r, tmp=tmp) for r in json.loads(out.read_text())]


def test_ranks_agree_on_every_accept_decision(ranks):
    a, b = (r["agree"] for r in ranks)
    assert a["decisions"] == b["decisions"] and a["outputs"] == b["outputs"]
    accepted = sum(sum(k) for _, k in a["decisions"])
    print(f"{accepted} drafts accepted over {len(a['decisions'])} steps, on both ranks")
    assert accepted > 0  # the trees really branch into accept decisions


def test_ranks_take_rank0s_measured_seconds(ranks):
    """The CUDA-graph tiers choose verify widths from measured forward times, which
    differ per rank: every rank reads rank 0's (TpGroup.agree_value)."""
    expected = [0.010 + 0.001 * i for i in range(3)]
    for r in ranks:
        assert r["seconds"] == pytest.approx(expected)


def test_negative_control_without_the_broadcast_ranks_disagree(ranks):
    assert ranks[0]["control"]["decisions"] != ranks[1]["control"]["decisions"]


def test_only_rank0_writes_snapshots(ranks):
    assert [r["agree"]["wrote"] for r in ranks] == [True, False]
    history_dir = ranks[0]["tmp"] / "history"
    assert sorted(p.name for p in history_dir.iterdir()) == [snapshot.SNAPSHOT_NAME]
    history, _ = snapshot.load_history(history_dir)
    assert sum(len(v) for steps in history.values() for v in steps.values()) == 8


def test_snapshot_save_leaves_other_live_writers_temps_alone(tmp_path):
    host = socket.gethostname()
    other = tmp_path / f"{snapshot._TMP_PREFIX}{host}-1-livewriter.tmp"  # pid 1 is alive
    other_host = tmp_path / f"{snapshot._TMP_PREFIX}otherhost-999999-x.tmp"
    dead = tmp_path / f"{snapshot._TMP_PREFIX}{host}-{_dead_pid()}-x.tmp"
    for f in (other, other_host, dead):
        f.write_bytes(b"partial")
    snapshot.save_history(tmp_path, {"p": {0: [[1, 2, 3]]}})
    assert other.exists() and other_host.exists()  # another writer's file: untouched
    assert not dead.exists()  # a dead writer's temp on this host: swept


def _dead_pid() -> int:
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=int)
    p.start()
    p.join()
    return p.pid
