"""OutcomeCalibration's vectorised update gives bit-identical cells to the row-by-row one."""

import numpy as np

from das_sglang.core.acceptance import OutcomeCalibration, _bin
from das_sglang.core.policy import BudgetRow
from das_sglang.core.policy_config import PolicyConfig


class _RowByRow(OutcomeCalibration):
    """The per-row reference (one dict entry and two bincounts per row)."""

    def planned(self, rows, budgets, base):
        self._ref = {}
        nodes = np.diff(base, axis=1)
        for i, (row, b) in enumerate(zip(rows, budgets.tolist())):
            b = min(int(b), nodes.shape[1])
            self._ref[row.req_id] = (row.generated_len, b, nodes[i, :b].copy())

    def update(self, rows):
        for row in rows:
            prev = getattr(self, "_ref", {}).get(row.req_id)
            if prev is None or prev[1] == 0:
                continue
            generated, budget, nodes = prev
            accepted = min(max(row.generated_len - generated - 1, 0), budget)
            state = self._state.get(row.req_id, 0)
            bins = self._rank_bin[:budget]
            cells = self._cells[state]
            cells[:, 0] += np.bincount(bins[:accepted], minlength=len(cells))
            cells[:, 1] += np.bincount(bins, weights=nodes, minlength=len(cells))
            self._state[row.req_id] = self.state_of(accepted, budget)
        live = {row.req_id for row in rows}
        if len(self._state) > 4 * max(len(live), 1):
            self._state = {k: v for k, v in self._state.items() if k in live}


def test_vectorised_update_matches_row_by_row_bit_for_bit():
    cfg = PolicyConfig(max_budget=24)
    rng = np.random.default_rng(7)
    fast, ref = OutcomeCalibration(cfg), _RowByRow(cfg)
    gen = {f"r{i}": 0 for i in range(40)}
    for step in range(60):
        live = [r for r in gen if rng.random() > 0.1]  # some rows skip a step
        if step % 7 == 3 and live:
            live.append(live[0])  # a repeated request
        rows = [BudgetRow(r, "q", gen[r], 10_000) for r in live]
        for oc in (fast, ref):
            oc.update(rows)
        width = int(rng.integers(0, cfg.max_budget + 1))
        probs = rng.random((len(rows), width)) ** 2
        base = np.concatenate([np.zeros((len(rows), 1)), np.cumsum(probs, axis=1)], axis=1)
        budgets = rng.integers(0, cfg.max_budget + 4, len(rows)).astype(np.int32)
        for oc in (fast, ref):
            oc.planned(rows, budgets, base)
        for r in set(live):
            gen[r] += int(rng.integers(1, 12))
        if step == 30:  # finished requests drop out, new ones join
            gen = {**{k: v for k, v in list(gen.items())[10:]}, **{f"n{i}": 0 for i in range(12)}}
    assert fast._cells.sum() > 0
    assert np.array_equal(fast._cells, ref._cells)
    assert fast._state == ref._state
    assert _bin(1) == 0


def test_budget_row_rejects_nan_and_out_of_range_probs_naming_the_request():
    import pytest

    for bad in ([0.5, float("nan")], [float("nan"), 0.5], [1.5, 0.2], [0.2, -0.1]):
        with pytest.raises(ValueError, match="'r7'.*node_probs|node_probs.*'r7'"):
            BudgetRow("r7", "q", 0, 10, np.array(bad))
    assert BudgetRow("r8", "q", 0, 10, [1.0, 0.0]).node_probs.dtype == np.float64
