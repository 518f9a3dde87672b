"""A real ``--tp 2`` SGLang engine with DAS on the CPU (gloo all-reduce, no AMX needed):
both TP ranks take identical accept decisions and only rank 0 writes the snapshot.

The test plugin's ``DAS_TP_RECORD`` worker is the production worker plus a per-rank
record of every accept decision. (On the CPU both ranks' logits agree bitwise, so this
shows the TP path end to end; that the rank-0 broadcast is what makes decisions agree
when draws differ is shown by the negative control of ``test_tp.py``.)
"""

from __future__ import annotations

import json
import os

import pytest
from sglang_engines import generate, launch

from das_sglang.core import snapshot

pytestmark = [pytest.mark.tp, pytest.mark.sglang]

PROMPTS = [[17, 42, 99, 5, 230, 11], [3, 14, 15, 92, 65, 35]]


def test_tp2_engine_ranks_agree_and_only_rank0_writes(tiny_model, tmp_path):
    from das_test_doubles import TP_RECORD

    record, history = tmp_path / "record", tmp_path / "history"
    record.mkdir()
    cores = sorted(os.sched_getaffinity(0))
    env = {"DAS_TEST_TP_RECORD_DIR": str(record),
           # SGLang's CPU TP binds one NUMA node per rank unless told which cores to use.
           "SGLANG_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[-1]}",
           "DAS_CONFIG": json.dumps({"server": {"history_path": str(history),
                                                "snapshot_interval": 1}})}
    greedy = {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True}
    sampled = {"temperature": 1.0, "top_k": 2, "max_new_tokens": 24, "ignore_eos": True}
    with launch(tiny_model, TP_RECORD, env=env, tp_size=2) as engine:
        for step in (1, 2):
            for params in (greedy, sampled):
                tags = [(f"p{i}", step) for i in range(len(PROMPTS)) for _ in range(4)]
                generate(engine, [PROMPTS[int(t[0][1:])] for t in tags], params, tags)
    ranks = [[json.loads(line) for line in (record / f"rank{r}.jsonl").read_text().splitlines()]
             for r in range(2)]
    assert [r[0] for r in ranks] == [
        {"rank": 0, "size": 2, "writes_snapshots": True},
        {"rank": 1, "size": 2, "writes_snapshots": False}]
    assert len(ranks[0]) == len(ranks[1]) > 1
    assert ranks[0][1:] == ranks[1][1:]  # every accept decision, token for token
    accepted = sum(sum(d["num_correct"]) for d in ranks[0][1:])
    print(f"tp=2: {len(ranks[0]) - 1} verify steps, {accepted} drafts accepted, identical")
    assert accepted > 0
    assert sorted(p.name for p in history.iterdir()) == [snapshot.SNAPSHOT_NAME]
