"""Online draft acceptance that recovers: calibration by outcome state *and* match length,
with forgetting, and cost-bounded probing so that a budget of 0 is never final.

``acceptance.OutcomeCalibration`` calibrates the drafter's node probabilities by the
request's last verify outcome, pooled over problems, and never forgets. On data the policy
has never seen that can lock speculation off for good: in a GRPO cold start (a problem's
first step: only its live siblings and its own prompt to draft from) the first drafts come
from matches inside the prompt and are all rejected; the pooled ratio collapses, every cell
shrinks to it, no row is drafted again, and with no drafts there are no outcomes to correct
the estimate -- while later in the step the siblings' text gives long, accurate matches.

``OnlineCalibration`` fixes the three causes:

- **What kind of draft.** Cells are (outcome state, match-length bin, node-depth bin): the
  drafter's own confidence signal (``BudgetRow.match_len``, the length of the suffix match
  the tree grew from) separates "a 2-token match inside the prompt" from "a 20-token match
  in a sibling's text", so rejections of the first kind do not condemn the second.
- **Prior, not pooled pessimism.** A match-length bin without evidence starts from the
  fixed prior (``prior_alpha``, a Beta-like pseudo-count of ``calibration_prior_tokens``),
  not from the pooled ratio; a (state, match) cell starts from its match bin's ratio times
  its state's effect (the state's ratio over all states'); depth bins shrink to the bin above.
- **Tree reading.** An outcome of ``a`` accepted tokens put exactly one node on the path at
  each depth ``1..a``; comparing that with the drafter's expectation summed per depth is
  unbiased for trees (reading it as "the best ``a`` nodes by rank" credits a hit on a
  second branch to the first, so wide trees look worse than they are).
- **Forgetting.** Every cell's evidence decays with half-life ``outcome_halflife`` plans
  (forward passes), so old rejections weigh less than new acceptances, and a cell nobody
  drafts drifts back towards its prior.

Probing (``ProbeSchedule``) closes the loop: a request that has not been drafted for
``probe_every`` plans is given ``probe_budget`` draft nodes, as long as the modeled cost of
all probes stays within ``probe_share`` of the modeled time of all forwards so far. The
outcomes feed the cells above, so an estimate that was wrong recovers, at a bounded price.
"""

from __future__ import annotations

from itertools import repeat

import numpy as np

from das_sglang.core import budget_rows as R

from das_sglang.core.acceptance import (
    OutcomeCalibration, _bin, _n_bins, forget_finished, pending_rows, remember_plan,
)
from das_sglang.core.policy_config import PolicyConfig
from das_sglang.native import online_add, online_curves, online_table, online_update

N_MATCH_BINS = 6  # match length <= 1 (or unknown), 2-3, 4-7, 8-15, 16-31, 32+


def tree_depths(parents_list) -> list[np.ndarray]:
    """Depth of every node (root children: 1) of each tree, given its parent arrays (parent
    index < node index, -1 = root), computed for the whole batch at once."""
    sizes = [len(p) for p in parents_list]
    if not sizes or sum(sizes) == 0:
        return [np.zeros(n, dtype=np.int64) for n in sizes]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in parents_list])
    glob = np.where(flat >= 0, flat + np.repeat(offsets, sizes), -1)
    depth = np.ones(len(flat), dtype=np.int64)
    has_parent = glob >= 0
    par = glob[has_parent]
    for _ in range(len(flat)):  # each pass fixes at least one more level
        new = depth.copy()
        new[has_parent] = depth[par] + 1
        if np.array_equal(new, depth):
            break
        depth = new
    return np.split(depth, np.cumsum(sizes)[:-1])


# match length 0..2**(N_MATCH_BINS - 1) -> its bin: floor(log2(max(m, 1))), at most the last
_MATCH_LUT = np.minimum(np.floor(np.log2(np.maximum(np.arange(2 ** (N_MATCH_BINS - 1) + 1), 1))),
                        N_MATCH_BINS - 1).astype(np.int64)


def match_bin(match_len):
    """Match-length bin: 0 for <= 1 (or unknown, -1), 1 for 2-3, 2 for 4-7, ..., 5 for 32+
    (one table lookup: the per-step rows' bins without a log per row)."""
    m = np.asarray(match_len)
    if m.dtype.kind not in "iu":
        m = m.astype(np.int64)
    # (take's clip mode bounds the index in the same C pass: -1 -> entry 0, the <= 1 bin;
    # np.clip then a gather took ~4x as long at 512 rows)
    out = np.take(_MATCH_LUT, m, mode="clip")
    return int(out) if out.ndim == 0 else out


class OnlineCalibration:
    """Per (outcome state, match-length bin, node-rank bin): accepted nodes and the drafter's
    expected acceptance of the drafted nodes, pooled over problems, decaying; see the module
    docstring. Same call pattern as ``OutcomeCalibration``: ``update(rows)`` at the start of a
    plan (reads the previous plan's outcomes off the rows' progress), ``planned(...)`` at its
    end, ``ratios(rows, max_budget)`` in between."""

    N_STATES = OutcomeCalibration.N_STATES
    state_of = OutcomeCalibration.state_of

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        n_bins = _n_bins(config.max_budget)
        self._cells = np.zeros((self.N_STATES, N_MATCH_BINS, n_bins, 2))  # accepted, expected
        self._states: dict[str, int] = {}  # (read through _state: see _flush_row_states)
        self._rows_dirty = False  # _row_states holds states newer than the dict's
        self._rows_unique = False  # each request once in _row_states' rows
        self._pending: dict[str, int] = {}
        self._pending_ids: list = []  # the planned rows' req_ids (read_pending)
        self._pending_generated = np.zeros(0, dtype=np.int64)
        self._pending_budget = np.zeros(0, dtype=np.int64)
        self._pending_match = np.zeros(0, dtype=np.int64)
        self._pending_nodes = np.zeros((0, 0))
        self._pending_bins = np.zeros((0, 0), dtype=np.int64)
        self._rank_bin = _bin(np.arange(1, config.max_budget + 1))
        # Depth -> depth bin (depths past max_budget in the last), and per bin the depths
        # before it and in it: an accepted path of ``a`` nodes has one node at each depth
        # 1..a, so ``clip(a - before, 0, size)`` of them in each bin.
        self._depth_bin = _bin(np.arange(config.max_budget + 1))
        self._bin_before = np.array([(self._rank_bin < k).sum() for k in range(n_bins)], np.int64)
        self._bin_size = np.array([(self._rank_bin == k).sum() for k in range(n_bins)], np.int64)
        # the latest update's rows (their req_ids list) and each one's state after it
        self._row_states: tuple | None = None
        self._rows_split = False  # (_update_native: the rows that left were written, not the rest)
        hl = config.outcome_halflife
        self._decay = 0.5 ** (1.0 / hl) if hl > 0 else 1.0
        self._table: np.ndarray | None = None
        self._bins_cache: tuple | None = None

    @property
    def _state(self) -> dict[str, int]:
        """Each request's state (its last outcome), as a dict: the rows of the latest
        :meth:`update` written into it first, if they are newer."""
        self._flush_row_states()
        return self._states

    @_state.setter
    def _state(self, states: dict[str, int]) -> None:
        self._flush_row_states()
        self._states = states

    def _flush_row_states(self) -> None:
        if self._rows_dirty:
            ids, states = self._row_states
            # (0, no outcome yet, is what the dict reads for a request it lacks: and a
            # state, once set, is never 0 again)
            at = np.flatnonzero(states).tolist()
            self._states.update(zip([ids[i] for i in at], states[at].tolist()))
            self._rows_dirty = False

    # ---- updates -------------------------------------------------------------------------
    def planned(self, rows, budgets: np.ndarray, base: np.ndarray, pos: dict | None = None) -> None:
        """Remember each row's budget, match bin and uncalibrated per-node expectation
        (``pos``: the rows' ``plan_rows``, if at hand)."""
        remember_plan(self, rows, budgets, base, pos)
        self._pending_match = match_bin(R.match_lens(rows))
        self._pending_bins = self.node_bins(rows, self._pending_nodes.shape[1])

    def node_bins(self, rows, width: int) -> np.ndarray:
        """Rows x node ranks ``1..width``: the depth bin of each node (``BudgetRow.node_depths``;
        a row without depths reads as a chain, depth = rank). One plan asks twice (``ratios``,
        then ``planned``) for the same rows: the second answer is the first one's."""
        cached = self._bins_cache
        if cached is not None and cached[0] is rows and cached[1] == width:
            return cached[2]
        out = self._node_bins(rows, width)
        self._bins_cache = (rows, width, out)
        return out

    def _node_bins(self, rows, width: int) -> np.ndarray:
        out = np.tile(self._rank_bin[:width], (len(rows), 1)) if width else np.zeros((len(rows), 0), np.int64)
        if not width:
            return out
        if type(rows) is R.BudgetRows:  # every row has depths, one per node: flat
            d = rows.drafts
            lens = d.lens()
            k = np.minimum(lens, width)
            rank = np.arange(len(d.depths), dtype=np.int64) - np.repeat(d.offsets[:-1], lens)
            mask = np.arange(width)[None, :] < k[:, None]
            out[mask] = self._depth_bin[np.minimum(d.depths[rank < np.repeat(k, lens)], self.config.max_budget)]
            return out
        parts = [(i, row.node_depths[:width]) for i, row in enumerate(rows)
                 if row.node_depths is not None and len(row.node_depths)]
        if parts:
            k = np.array([len(d) for _, d in parts])
            which = np.array([i for i, _ in parts])
            mask = np.zeros(out.shape, dtype=bool)
            mask[which] = np.arange(width)[None, :] < k[:, None]
            # row-major order of the masked cells = the rows' depths concatenated in order
            out[mask] = _bin(np.minimum(np.concatenate([d for _, d in parts]), self.config.max_budget))
        return out

    # The outcomes' arithmetic (``online_update`` / ``online_add``) and the table
    # (``online_table``) in one native call each; False: numpy, the reference they are
    # tested against (tests/test_policy_online.py), the same cells and table bit for bit.
    NATIVE_ADD = True

    def update(self, rows) -> None:
        """Decay every cell by one plan's worth, then add the previous plan's outcomes."""
        if self.NATIVE_ADD:
            self._update_native(rows)
        else:
            self._update_rows(rows)

    def _update_rows(self, rows) -> None:
        """:meth:`update` row by row (numpy, or ``online_add`` for the additions): the
        reference path, and the one for rows holding a request twice."""
        if self._decay < 1.0:
            self._cells *= self._decay
        self._table = None
        self._bins_cache = None
        ids = R.req_ids(rows)
        n = len(ids)
        prev = self._row_states
        if prev is not None and self._rows_unique and (prev[0] is ids or prev[0] == ids):
            # The latest update's rows again (a decode step without starts or finishes):
            # their states are that update's array; the dict is written only when the rows
            # change or someone reads it (_flush_row_states), not per row every plan.
            states = prev[1].copy()
            got = pending_rows(self, rows)
            if got is not None:
                j, pos, budget = got
                states[j] = self._add(states[j], R.generated(rows)[j], pos, budget)
                self._rows_dirty = True
            self._row_states = (ids, states)
            return
        # every row's state before the outcomes (those with one read theirs from here)
        state = self._state
        states = np.fromiter(map(state.get, ids, repeat(0, n)), np.int64, n)
        live = set(ids)
        got = pending_rows(self, rows)
        if got is not None:
            j, pos, budget = got
            new = self._add(states[j], R.generated(rows)[j], pos, budget)
            # a repeated request: the last outcome wins
            state.update(zip([ids[i] for i in j.tolist()], new.tolist()))
            if len(live) == n:
                states[j] = new
            else:  # (a request twice in the rows: each row reads the state it ends with)
                states = np.fromiter(map(state.get, ids, repeat(0, n)), np.int64, n)
        forget_finished(self, ids, live)
        # (ratios of these rows -- the plan that follows -- read the states from here)
        self._row_states = (ids, states)
        self._rows_unique = len(live) == n

    def _update_native(self, rows) -> None:
        """:meth:`update` in one native call (``online_update``: the decay and every row's
        outcome; the same cells and states bit for bit as the numpy path,
        tests/test_policy_online.py): the per-request dict is read and written only when
        the rows change (a start or a finish), and then only for the rows whose state
        changed."""
        self._table = None
        self._bins_cache = None
        ids = R.req_ids(rows)
        n = len(ids)
        prev = self._row_states
        same = prev is not None and self._rows_unique and (prev[0] is ids or prev[0] == ids)
        if same:
            states = prev[1]
        else:
            # Rows changed (a start or a finish): the rows the latest update also had read
            # their state from its array (newer than the dict), only the others from the
            # dict; row_map also says whether each request is there once. The dict is
            # written only for the rows that left the array (else their state would be
            # lost); the array stays the truth for its rows (flushed when read, _state).
            state = self._states
            if prev is not None and self._rows_unique:
                back, unique = R.shared_row_map(prev[0], ids)
                if unique:
                    states = R.regather(prev[0], prev[1], ids, state.get, 0, back)
                    if self._rows_dirty:
                        # (the previous rows are each request once: a row no new row maps
                        # back to has left)
                        stays = np.zeros(len(prev[0]), bool)
                        stays[back[back >= 0]] = True
                        left = np.flatnonzero(~stays & (prev[1] != 0)).tolist()
                        old_ids = prev[0]
                        state.update(zip([old_ids[i] for i in left], prev[1][left].tolist()))
                    self._rows_split = True
            else:
                unique = len(set(ids)) == n
                if unique:
                    state = self._state
                    states = np.fromiter(map(state.get, ids, repeat(0, n)), np.int64, n)
            if not unique:  # (a request twice in the rows: the reference path's rule)
                self._update_rows(rows)
                return
        index = self._pending
        if len(index) == len(ids) and self._pending_ids == ids:
            at = None  # the planned rows again, in order
        else:  # (the planned row of each request: the later one, as the plan's dict has it)
            at = R.shared_row_map(self._pending_ids, ids)[0] if index else np.full(n, -1, np.int64)
        new, added = online_update(
            self._cells, self._decay, at, np.ascontiguousarray(R.generated(rows), dtype=np.int64), states,
            np.ascontiguousarray(self._pending_budget, dtype=np.int64),
            np.ascontiguousarray(self._pending_generated, dtype=np.int64),
            np.ascontiguousarray(self._pending_match, dtype=np.int64),
            np.ascontiguousarray(self._pending_nodes, dtype=np.float64),
            np.ascontiguousarray(self._pending_bins, dtype=np.int64), self._bin_before, self._bin_size)
        if same:
            if added:
                self._rows_dirty = True
            self._row_states = (ids, new)
            return
        if self._rows_split:  # (the rows that left are in the dict: the array is these rows' truth)
            self._rows_split = False
            self._row_states = (ids, new)
            self._rows_unique = True
            self._rows_dirty = True
            forget_finished(self, ids, n_live=n, size=len(self._states))
            return
        state = self._state  # (flushed: the dict is the latest update's truth from here)
        if added:
            changed = np.flatnonzero(new != states).tolist()
            state.update(zip([ids[i] for i in changed], new[changed].tolist()))
        forget_finished(self, ids, n_live=n)
        self._row_states = (ids, new)
        self._rows_unique = True

    def outcomes_of(self, pos: np.ndarray, generated: np.ndarray, states: np.ndarray) -> np.ndarray | None:
        """What :meth:`update` adds to the cells for the pending plan's rows ``pos`` (int64),
        given their ``generated`` counts now and their ``states`` before it (a cells-shaped
        array; after the decay an update adds each row's outcome as is), or None when none
        of them had a budget. The plan made ahead counted every row of the plan before; a
        plan of other rows subtracts this for the rows that left (``_adopt_kept``)."""
        budget = self._pending_budget[pos]
        keep = budget > 0
        if not keep.any():
            return None
        out = np.zeros_like(self._cells)
        online_add(out, np.ascontiguousarray(generated[keep], dtype=np.int64), np.ascontiguousarray(pos[keep]),
                   np.ascontiguousarray(budget[keep], dtype=np.int64),
                   np.ascontiguousarray(states[keep], dtype=np.int64),
                   np.ascontiguousarray(self._pending_generated, dtype=np.int64),
                   np.ascontiguousarray(self._pending_match, dtype=np.int64),
                   np.ascontiguousarray(self._pending_nodes, dtype=np.float64),
                   np.ascontiguousarray(self._pending_bins, dtype=np.int64), self._bin_before, self._bin_size)
        return out

    def _add(self, states: np.ndarray, generated: np.ndarray, pos: np.ndarray, budget: np.ndarray) -> np.ndarray:
        """Add the outcomes of rows in ``states`` (their states before), ``generated`` now,
        planned rows ``pos`` with budgets ``budget`` > 0 to the cells; returns each row's
        next state."""
        if self.NATIVE_ADD:
            return online_add(self._cells, np.ascontiguousarray(generated, dtype=np.int64), pos, budget, states,
                              np.ascontiguousarray(self._pending_generated, dtype=np.int64),
                              np.ascontiguousarray(self._pending_match, dtype=np.int64),
                              np.ascontiguousarray(self._pending_nodes, dtype=np.float64),
                              np.ascontiguousarray(self._pending_bins, dtype=np.int64),
                              self._bin_before, self._bin_size)
        cells = self._cells
        n_states, n_match, n_bins, _ = cells.shape
        n = len(states)
        # Accepted drafts (``generated`` grew by accepted + 1) and hits by depth bin: the
        # accepted path has one node at each depth 1..accepted. The drafter's expectation
        # at a depth bin sums its drafted nodes of those depths (a chain reading by rank
        # would credit a branch's hit to the best sibling instead).
        accepted = np.minimum(np.maximum(generated - self._pending_generated[pos] - 1, 0), budget)
        hit = np.clip(accepted[:, None] - self._bin_before[None, :], 0, self._bin_size[None, :])
        new = 1 + np.minimum(_bin(accepted + 1), 5) + np.where(accepted == budget, 6, 0)  # state_of
        nodes = self._pending_nodes[pos]
        drafted = np.where(np.arange(nodes.shape[1])[None, :] < budget[:, None], nodes, 0.0)
        row_bin = np.arange(n)[:, None] * n_bins + self._pending_bins[pos]
        expected = np.bincount(row_bin.ravel(), weights=drafted.ravel(), minlength=n * n_bins)
        # every row's (state, match bin, depth bin) cells, summed per cell in row order
        cell = ((states * n_match + self._pending_match[pos]) * n_bins)[:, None] + np.arange(n_bins)[None, :]
        size = n_states * n_match * n_bins
        cells[..., 0] += np.bincount(cell.ravel(), weights=hit.ravel().astype(np.float64),
                                     minlength=size).reshape(cells.shape[:3])
        cells[..., 1] += np.bincount(cell.ravel(), weights=expected, minlength=size).reshape(cells.shape[:3])
        return new

    # ---- queries -------------------------------------------------------------------------
    def table(self) -> np.ndarray:
        """(state, match bin, rank bin) -> accepted / expected, shrunk as the module says."""
        if self._table is not None:
            return self._table
        if self.NATIVE_ADD:  # (one native call, numpy's doubles: ~45 small numpy operations below)
            self._table = online_table(self._cells, float(self.config.calibration_prior_tokens),
                                       float(self.config.prior_alpha))
            return self._table
        w = self.config.calibration_prior_tokens
        prior = self.config.prior_alpha
        c = self._cells
        shrink = lambda a, e, p: (w * p + a) / (w + e)  # noqa: E731
        total = c.sum(axis=(0, 1, 2))
        pooled = shrink(total[0], total[1], prior)
        by_state = c.sum(axis=(1, 2))  # states x 2
        # A state's effect: its ratio relative to all outcomes' ratio R, shrunk to 1
        # (= shrink(a, e, R) / R): 1 for a state without outcomes or one holding them all.
        if total[0] > 0:
            effect = (w + by_state[:, 0] * (total[1] / total[0])) / (w + by_state[:, 1])
        else:  # nothing accepted anywhere: no state differs from another
            effect = np.ones(len(by_state))
        by_match = c.sum(axis=(0, 2))  # match bins x 2
        r_match = shrink(by_match[:, 0], by_match[:, 1], prior)  # independent a priori
        by_cell = c.sum(axis=2)  # states x match bins x 2
        r_sm = shrink(by_cell[..., 0], by_cell[..., 1], effect[:, None] * r_match[None, :])
        out = np.empty(c.shape[:3])
        below = r_sm
        for k in range(c.shape[2]):
            below = out[:, :, k] = shrink(c[:, :, k, 0], c[:, :, k, 1], below)
        self._table = out
        return out

    def ratios(self, rows, max_budget: int) -> np.ndarray:
        """Rows x node ranks ``1..max_budget``: calibration factor of each row's nodes."""
        table = self.table()
        bins = np.minimum(self.node_bins(rows, max_budget), table.shape[2] - 1)
        match = match_bin(R.match_lens(rows))
        return np.take_along_axis(table[self._states_of(rows), match], bins, axis=1)

    def _states_of(self, rows) -> np.ndarray:
        """Each row's state (its request's last outcome; 0 before any)."""
        ids, cached = R.req_ids(rows), self._row_states
        if cached is not None and (cached[0] is ids or cached[0] == ids):
            return cached[1]
        return np.fromiter(map(self._state.get, ids, repeat(0, len(rows))), np.int64, len(rows))

    def curve_inputs(self, rows: R.BudgetRows) -> tuple:
        """What :meth:`curves` reads besides the drafts, ``m`` and ``relative``: (table,
        states, match bins, depth bins, rank bins, max budget), as the native call takes
        them (``native.online_plan`` takes them too)."""
        return (self.table(), np.ascontiguousarray(self._states_of(rows), dtype=np.int64),
                match_bin(R.match_lens(rows)), self._depth_bin, self._rank_bin, int(self.config.max_budget))

    def keep_bins(self, rows, bins: np.ndarray, width: int) -> None:
        """The node bins the plan's curves read (``native.online_curves`` / ``online_plan``),
        for the plan's :meth:`planned` (as :meth:`node_bins` would give them)."""
        self._bins_cache = (rows, width - 1, bins.reshape(len(rows), width - 1))

    def curves(self, rows: R.BudgetRows, m: np.ndarray, relative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(base, acc)`` of ``_ModelBased.inputs`` (online curves) for flat rows, in one
        native call: ``base`` the drafter's expected accepted tokens (cumulative node
        probabilities, the first ``m[i]`` nodes of row ``i``), ``acc`` the calibrated curve
        (each node's probability times :meth:`ratios`' factor times ``relative[i]``,
        summed, at most the budget). The same arrays as the numpy reference, bit for bit
        (tests/test_policy_online.py); the node bins it read serve the plan's
        :meth:`planned` as :meth:`node_bins` would."""
        d = rows.drafts
        n = len(rows)
        table, states, match, depth_bin, rank_bin, max_budget = self.curve_inputs(rows)
        base, acc, bins, width = online_curves(
            np.ascontiguousarray(d.offsets, dtype=np.int64), np.ascontiguousarray(d.probs, dtype=np.float64),
            np.ascontiguousarray(d.depths, dtype=np.int32), np.ascontiguousarray(m, dtype=np.int64),
            table, states, match, np.ascontiguousarray(relative, dtype=np.float64), depth_bin, rank_bin, max_budget)
        self.keep_bins(rows, bins, width)
        return base.reshape(n, width), acc.reshape(n, width)


class ProbeSchedule:
    """Which rows get a probe draft this plan, within a modeled-cost allowance.

    A row is due when its request has not been drafted in its last ``probe_every`` plans (a
    new request is due at once). Probing spends at most ``probe_share`` of the modeled time
    of every forward planned so far (the allowance accrues as forwards run), so exploring can
    cost at most that share of the makespan, however wrong the estimates are."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._plans = 0  # plans recorded so far
        self._last: dict[str, int] = {}  # req_id -> the plan it was last drafted in
        # The latest recorded plan's rows and their _last values (never: -probe_every), so
        # the next plan of the same rows reads an array, not the dict row by row.
        self._rows_last: tuple[list, np.ndarray, bool] | None = None  # (+ each request once)
        self.spent_s = 0.0  # modeled seconds of probe drafts
        self.total_s = 0.0  # modeled seconds of every planned forward

    def due(self, rows) -> np.ndarray:
        ids = R.req_ids(rows)
        cached = self._cached(ids)
        last = cached[1] if cached is not None else self._last_of(ids, self._rows_last)
        return self._plans - last >= self.config.probe_every

    def _cached(self, ids) -> tuple | None:
        """``_rows_last`` when it is these rows' (the same request ids, in order)."""
        cached = self._rows_last
        return cached if cached is not None and cached[0] == ids else None

    def _last_of(self, ids, near: tuple | None = None) -> np.ndarray:
        """Each request's ``_last`` value (``near``: the latest rows' cache, each request
        once there: the requests it holds read their values from it)."""
        never = -self.config.probe_every  # a new request is due at once
        n = len(ids)
        if near is not None and near[2] and type(ids) is list and n >= R.ROWMAP_MIN_ROWS:
            return R.regather(near[0], near[1], ids, self._last.get, never)
        return np.fromiter(map(self._last.get, ids, repeat(never, n)), np.int64, n)

    def affordable(self, cost_s: float) -> bool:
        return self.spent_s + cost_s <= self.config.probe_share * self.total_s

    def record(self, rows, budgets: np.ndarray, forward_s: float, probe_s: float) -> None:
        self.total_s += forward_s
        self.spent_s += probe_s
        drafted = np.flatnonzero(np.asarray(budgets) > 0)
        ids = R.req_ids(rows)
        self._last.update(dict.fromkeys((ids[i] for i in drafted.tolist()), self._plans))
        cached = self._cached(ids)
        if cached is not None and cached[2]:
            # the same rows, each request once: only the drafted rows' values change
            # (this is the plan's bookkeeping, off the next plan's path)
            values = cached[1].copy()
            values[drafted] = self._plans
            self._rows_last = (cached[0], values, True)
        else:  # (a request twice: each row reads what the dict has, the later row's update)
            self._rows_last = (list(ids), self._last_of(ids), len(set(ids)) == len(ids))
        self._plans += 1
        if len(self._last) > 4 * max(len(rows), 1):  # forget finished requests
            live = set(ids)
            self._last = {k: v for k, v in self._last.items() if k in live}
