"""benchmarks/bench_peers.py building blocks (the harness itself is a benchmark, run by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_peers as bp  # noqa: E402

from das_sglang.core.config import DrafterConfig  # noqa: E402
from das_sglang.core.datasets import Rollout  # noqa: E402


def test_ngram_rows_become_draft_trees_without_padding():
    # root(7) -> 3 -> 4, root -> 5; then two padding slots (token 0 under the root)
    n = 6
    ids = np.array([7, 3, 5, 4, 0, 0])
    mask = np.zeros((n, n), np.int64)
    rows = {0: [0], 1: [0, 1], 2: [0, 2], 3: [0, 1, 3], 4: [0, 4], 5: [0, 5]}
    for i, cols in rows.items():
        mask[i, cols] = 1
    (tree,) = bp.ngram_trees(ids, mask.ravel(), 1, n)
    assert tree.tokens.tolist() == [3, 5, 4]
    assert tree.parents.tolist() == [-1, -1, 0]
    assert tree.accept_length([3, 4, 9]) == 2


def rollout(rid: str, step: int, prompt, response) -> Rollout:
    return Rollout(rid, "p", step, np.asarray(prompt, np.int32), np.asarray(response, np.int32),
                   len(response), False)


def test_das_peer_group_replays_every_token_and_speculates_on_repeats():
    loop = [5, 6, 7, 8] * 12
    history = [(0, np.asarray([1, 2] + loop, np.int32))]
    members = [rollout("a", 1, [1, 2], loop), rollout("b", 1, [1, 2], loop[:30])]
    run = bp.PeerRun()
    bp.run_group(bp.DasPeer(DrafterConfig(max_budget=16, window_steps=1)), "p", 1, history, members, 16, run)
    by_id = {t.req_id: t for t in run.targets}
    assert by_id["a"].tokens == len(loop) and by_id["b"].tokens == 30
    assert by_id["a"].tokens_per_step > 4  # the loop is in the history: long accepted drafts
    assert len(run.us_per_request) == max(t.steps for t in run.targets)


def test_bad_das_override_is_a_clear_error(capsys):
    assert bp.main(["--json", "/dev/null", "--das", "nope=1"]) == 1
    assert "invalid --das 'nope=1'" in capsys.readouterr().err
    assert bp.main(["--json", "/dev/null", "--das", "mix_escape=-1"]) == 1
    assert "mix_escape" in capsys.readouterr().err
