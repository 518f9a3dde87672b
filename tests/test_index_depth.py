"""The index is built only as deep as a draft can read (``DrafterConfig.index_depth``).

A draft starts at a match of at most ``max_match_len`` tokens and adds at most
``max_budget`` levels, so the levels past ``max_match_len + max_budget`` cost appends and
memory and never change a draft. These tests hold the shallower index to the full-depth one
draft for draft (tokens, parents, probabilities, depths, match lengths) over histories with
deep repeats, live growth, finishes and step advances."""

from __future__ import annotations

import numpy as np
import pytest

from das_sglang.core.config import DrafterConfig
from das_sglang.core.drafter import SuffixDrafter


class FullDepth(DrafterConfig):
    """The same settings, every index built to ``max_depth`` (the pre-change behaviour)."""

    @property
    def index_depth(self) -> int:
        return self.max_depth

    @property
    def shared_index_depth(self) -> int:
        return self.shared_max_depth or self.max_depth


def test_index_depth_defaults_and_bounds():
    assert DrafterConfig().index_depth == 64  # 32 + 32: the defaults already need all 64
    assert DrafterConfig(max_budget=16).index_depth == 48  # a 17-token verify (SGLang's default)
    assert DrafterConfig(max_budget=16, max_match_len=8).index_depth == 24
    assert DrafterConfig(max_budget=0).index_depth == 33  # a match needs one level below it
    assert DrafterConfig(max_budget=200, max_depth=80).index_depth == 80  # never past max_depth
    assert DrafterConfig(max_budget=16).shared_index_depth == 24
    assert DrafterConfig(max_budget=4, max_match_len=8).shared_index_depth == 12
    assert DrafterConfig(max_budget=16, shared_max_depth=0).shared_index_depth == 48
    d = SuffixDrafter(DrafterConfig(max_budget=16))
    d.add_history("p", 0, np.arange(100, dtype=np.int32))
    assert d._indices["p"].max_depth == 48 and d._global.max_depth == 24


def _text(rng, n, motifs):
    """Text made of repeated motifs (long, deep repeats) with some noise."""
    out = []
    while len(out) < n:
        m = motifs[int(rng.integers(len(motifs)))]
        out.extend(m.tolist())
        if rng.random() < 0.1:
            out.append(int(rng.integers(5)))
    return np.asarray(out[:n], np.int32)


def _run(config: DrafterConfig, seed: int, budgets) -> list:
    rng = np.random.default_rng(seed)
    # long motifs over a larger vocabulary (deep, mostly unique continuations: matches of
    # max_match_len and full-depth chains) and short ones over a few tokens (wide nodes)
    motifs = [rng.integers(0, 40, int(rng.integers(40, 120))).astype(np.int32) for _ in range(4)]
    motifs += [rng.integers(0, 6, int(rng.integers(3, 12))).astype(np.int32) for _ in range(3)]
    d = SuffixDrafter(config)
    problems = [f"p{i}" for i in range(3)]
    for step in range(1, 4):
        d.advance_step(step)
        for p in problems:
            for _ in range(2):
                d.add_history(p, step, _text(rng, int(rng.integers(50, 300)), motifs))
    d.advance_step(4)
    live, out, rid = {}, [], 0  # req -> [problem, the text it decodes, position]
    for it in range(60):
        while len(live) < 5:
            p = problems[int(rng.integers(len(problems)))]
            text = _text(rng, 400, motifs)
            live[f"r{rid}"] = [p, text, 20]
            d.start_request(f"r{rid}", p, text[:20])
            rid += 1
        ids = sorted(live)
        chunks = []
        for r in ids:
            _, text, pos = live[r]
            k = int(rng.integers(1, 6))
            chunks.append(text[pos: pos + k])
            live[r][2] += k
        d.extend_batch(ids, chunks)
        for b in budgets:
            f = d.speculate_flat(ids, b)
            out.append([np.asarray(a).tolist() for a in (f.tokens, f.parents, f.depths, f.offsets, f.match_len)])
            out.append(np.asarray(f.probs).round(12).tolist())
        if it % 7 == 6:  # a finish: its text becomes history
            r = ids[int(rng.integers(len(ids)))]
            d.finish_request(r)
            del live[r]
        if it == 40:
            d.advance_step(5)  # the window slides: the oldest step leaves
    return out


@pytest.mark.parametrize("fields", [
    {"max_budget": 16},
    {"max_budget": 8, "max_match_len": 12},
    {"max_budget": 16, "tree": False},
    {"max_budget": 16, "mixture": False},
    {"max_budget": 16, "shared_weight": 1.0, "shared_max_depth": 0},
])
def test_shallower_index_drafts_the_same(fields):
    cfg = DrafterConfig(window_steps=2, **fields)
    assert cfg.index_depth < cfg.max_depth  # the case under test: levels are left out
    budgets = [cfg.max_budget, 3, cfg.max_budget + 5]  # above max_budget: capped to it
    full = _run(FullDepth(window_steps=2, **fields), 5, budgets)
    # some draft reads the deepest level the shallower index keeps (match + its depth)
    reach = max(max((np.repeat(r[4], np.diff(r[3])) + np.asarray(r[2], np.int64)).tolist(), default=0)
                for r in full[0::2])
    assert reach == cfg.index_depth
    assert _run(cfg, 5, budgets) == full


def test_budgets_are_capped_at_max_budget():
    d = SuffixDrafter(DrafterConfig(max_budget=4, min_token_prob=0.0))
    d.add_history("p", 0, np.tile(np.arange(10, dtype=np.int32), 20))
    d.start_request("r", "p", np.arange(5, dtype=np.int32))
    assert d._indices["p"].max_depth == 36
    assert len(d.speculate("r", 50)) == 4
    assert d.speculate_flat(["r"], [50]).lens().tolist() == [4]
    with pytest.raises(ValueError, match="budget=-1"):
        d.speculate_flat(["r"], [-1])
