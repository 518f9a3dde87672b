"""The length predictor as it was before issue 12 (full rebuild after every finish), kept
for bench_host_path.py's same-process baseline only."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from das_sglang.core.length_predictor import (
    LONG, MEDIUM, SHORT, _ALL, _Group, _LengthQueries, _classify, _classify_array,
)
from das_sglang.core.policy_config import PolicyConfig


class LegacyLengthPredictor(_LengthQueries):
    """Only the index differs: rebuilt from scratch whenever a finish invalidated it."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self._history: dict[str, list[tuple[int, int]]] = defaultdict(list)  # pid -> (step, len)
        self._step = 0
        self._cache: tuple[np.ndarray | None, dict[str, int], dict[int, _Group]] | None = None

    # ---- updates ---------------------------------------------------------------------
    def observe_finished(self, problem_id: str, length: int) -> None:
        if length < 0:
            raise ValueError(f"invalid finished length {length!r} for problem {problem_id!r}: must be >= 0")
        self._history[problem_id].append((self._step, int(length)))
        self._cache = None

    def advance_step(self, step: int) -> None:
        if step < self._step:
            raise ValueError(f"invalid step={step!r}: steps only advance (current {self._step})")
        self._step = step
        oldest = step - self.config.length_window_steps
        for pid in list(self._history):
            kept = [(s, n) for s, n in self._history[pid] if s >= oldest]
            if kept:
                self._history[pid] = kept
            else:
                del self._history[pid]
        self._cache = None

    def _index(self):
        if self._cache is None:
            self._cache = self._build_index()
        return self._cache

    def _build_index(self):
        pids = [p for p, h in self._history.items() if h]
        if not pids:
            return None, {}, {}
        per_pid = {p: np.array([n for _, n in self._history[p]], dtype=np.float64) for p in pids}
        pooled = np.concatenate(list(per_pid.values()))
        if self.config.class_thresholds is not None:
            thresholds = np.asarray(self.config.class_thresholds, dtype=np.float64)
        else:
            thresholds = np.quantile(pooled, self.config.class_quantiles)
        initial = {p: _classify(float(np.median(v)), thresholds) for p, v in per_pid.items()}
        group_of = np.concatenate([np.full(len(per_pid[p]), initial[p]) for p in pids])
        classes = _classify_array(pooled, thresholds)
        groups = {_ALL: _Group(pooled, classes)}
        for c in (SHORT, MEDIUM, LONG):
            mask = group_of == c
            if mask.any():
                groups[c] = _Group(pooled[mask], classes[mask])
        return thresholds, initial, groups


