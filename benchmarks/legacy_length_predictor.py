"""The length predictor as it was before issue 12 (full rebuild after every finish), kept
for bench_host_path.py's same-process baseline only."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from das_sglang.core.length_predictor import (  # noqa: F401
    LONG, MEDIUM, SHORT, _ALL, LengthPrediction, _Group, _classify, _classify_array,
)
from das_sglang.core.policy_config import PolicyConfig


class LegacyLengthPredictor:
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

    # ---- queries ---------------------------------------------------------------------
    def thresholds(self) -> np.ndarray | None:
        """Short/Medium and Medium/Long boundaries (lengths <= t1 are Short), or None."""
        return self._index()[0]

    def initial_class(self, problem_id: str) -> int | None:
        return self._index()[1].get(problem_id)

    def predict(self, problem_id: str, generated_len: int, max_new_tokens: int) -> LengthPrediction:
        remaining, cls, c0 = self.predict_many([problem_id], [generated_len], [max_new_tokens])
        return LengthPrediction(
            float(remaining[0]),
            None if cls[0] < 0 else int(cls[0]),
            None if c0[0] < 0 else int(c0[0]),
        )

    def predict_many(self, problem_ids, generated_lens, max_new_tokens):
        """Vectorised ``predict``: (remaining, class or -1, initial class or -1) arrays."""
        cfg = self.config
        g = np.maximum(np.asarray(generated_lens, dtype=np.float64), 0.0)
        cap = np.maximum(1.0, np.asarray(max_new_tokens, dtype=np.float64) - g)
        n = len(g)
        thresholds, initial, groups = self._index()
        c0 = np.array([initial.get(p, -1) for p in problem_ids], dtype=np.int64)
        if thresholds is None:  # no history anywhere
            guess = np.maximum(cfg.prior_length - g, cfg.tail_factor * g)
            return np.clip(guess, 1.0, cap), np.full(n, -1), c0
        remaining = cfg.tail_factor * g  # heavy-tail rule unless a group has longer rollouts
        cls = np.full(n, LONG, dtype=np.int64)
        todo = np.ones(n, dtype=bool)
        for key, rows in ((c, c0 == c) for c in (SHORT, MEDIUM, LONG, _ALL)):
            sel = todo & (rows if key != _ALL else True)
            if key not in groups or not sel.any():
                continue
            counts, sums = groups[key].longer_than(g[sel])
            found = counts.sum(axis=1) > 0
            # Add-one smoothing over the classes that still contain longer rollouts; argmax
            # ties go to the shorter class (first index), which is the cautious choice.
            c_star = np.argmax(np.where(counts > 0, counts + 1.0, -1.0), axis=1)
            pick = np.arange(len(c_star))
            mean_len = sums[pick, c_star] / np.maximum(counts[pick, c_star], 1.0)
            idx = np.flatnonzero(sel)[found]
            remaining[idx] = mean_len[found] - g[idx]
            cls[idx] = c_star[found]
            todo[idx] = False
        return np.clip(remaining, 1.0, cap), cls, c0

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


