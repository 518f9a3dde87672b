"""A problem that moved to this engine is loaded lazily from the shard directory (real
SGLang, CPU): history written by "another engine" drafts the moved problem's requests."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from sglang_engines import generate, launch

from das_sglang.core.shards import ShardStore, read_engine_stats

pytestmark = pytest.mark.sglang

GREEDY = {"temperature": 0.0, "max_new_tokens": 24}


def test_moved_problem_drafts_from_another_engines_shard(tiny_model, tmp_path):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 300, 8).tolist() for _ in range(3)]
    env = {"DAS_CONFIG": json.dumps(
        {"server": {"shard_path": str(tmp_path), "engine_id": "e0", "policy": "unlimited"}})}
    with launch(tiny_model, "DAS", env=env) as engine:
        # Step 1, problems "local-*": no shards yet (lookups miss); this gives the
        # greedy outputs "another engine" would have produced.
        first, meta1 = generate(engine, prompts, GREEDY, [(f"local-{i}", 1) for i in range(3)])
        # Another engine served problems "moved-*" at step 1: its shards hold exactly
        # those rollouts (prompt + output).
        other = ShardStore(tmp_path, "other")
        for i, (p, out) in enumerate(zip(prompts, first)):
            other.write(f"moved-{i}", {1: [np.asarray(p + out, np.int32)]})
        # Step 2: the moved problems arrive here; this engine never held them.
        second, meta2 = generate(engine, prompts, GREEDY, [(f"moved-{i}", 2) for i in range(3)])
        engine.get_server_info()  # a scheduler round trip: step-2 finishes are processed
        # Shards and stats are written by the engine's background writer; wait for it
        # before shutdown (which SIGKILLs the scheduler).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = read_engine_stats(tmp_path).get("e0", {})
            if stats.get("lazy_load_hits") == 3 and stats.get("shard_pending") == 0 \
                    and stats.get("shard_writes", 0) >= 6:
                break
            time.sleep(0.2)
    assert second == first  # greedy: lossless
    cold = np.mean([m["spec_accept_length"] for m in meta1])
    warm = np.mean([m["spec_accept_length"] for m in meta2])
    print(f"accept length: cold {cold:.2f}, after lazy load {warm:.2f}")
    assert warm > cold + 1.0
    assert stats["lazy_load_hits"] == 3 and stats["lazy_load_sequences"] == 3
    assert stats["lazy_loads"] >= 6  # 3 misses (local-*) + 3 hits, + SGLang's warm-up if any
    # This engine's own step-2 rollouts of the moved problems are in its shards now.
    mine = ShardStore(tmp_path, "reader").read("moved-0")
    assert sorted(mine) == ["e0", "other"] and list(mine["e0"]) == [2]
