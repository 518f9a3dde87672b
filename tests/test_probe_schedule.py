"""ProbeSchedule: the plan's rows read from an array kept with the latest recorded plan
(the next plan of the same rows) give what the per-request dict gives, duplicates and
changing rows included."""

from __future__ import annotations

from itertools import repeat

import numpy as np

from das_sglang.core.online_acceptance import ProbeSchedule
from das_sglang.core.policy import BudgetRow, PolicyConfig


def _reference_due(sched: ProbeSchedule, ids) -> np.ndarray:
    never = -sched.config.probe_every
    last = np.fromiter(map(sched._last.get, ids, repeat(never)), np.int64, len(ids))
    return sched._plans - last >= sched.config.probe_every


def test_due_rows_from_the_cached_array_equal_the_dict_lookups():
    rng = np.random.default_rng(0)
    sched = ProbeSchedule(PolicyConfig(probe_every=3))
    ids = [f"r{i}" for i in range(12)]
    fast = 0
    for plan in range(300):
        if plan % 7 == 3:  # a finish and a start: the rows change
            ids = ids[1:] + [f"n{plan}"]
        if plan % 41 == 5:  # a request twice in the rows
            ids = ids[:-1] + [ids[0]]
        if plan % 41 == 9:
            ids = ids[:-1] + [f"m{plan}"]
        rows = [BudgetRow(r, "q", 0, 100, np.zeros(0), 10) for r in ids]
        if sched._rows_last is not None and sched._rows_last[0] == ids:
            fast += 1
        got = sched.due(rows)
        assert got.tolist() == _reference_due(sched, ids).tolist(), plan
        budgets = (rng.random(len(ids)) < 0.4).astype(np.int32) * 2
        sched.record(rows, budgets, 0.01, 0.0)
    assert fast > 150  # most plans took the array path
