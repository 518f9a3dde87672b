"""Native SuffixIndex: golden examples, validation, bookkeeping, bounded memory."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

from das_sglang.native import (
    MAX_STEPS,
    SuffixIndex,
    draft_batch,
    extend_batch,
    node_reserve_bytes,
    set_node_reserve_bytes,
)


def arr(tokens) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32)


class TestGolden:
    def test_tree_worked_example(self):
        # "1 2 3 1 2 4 1 2 3": after "1 2" comes 3 twice and 4 once.
        ix = SuffixIndex(8)
        ix.add_sequence(1, arr([1, 2, 3, 1, 2, 4, 1, 2, 3]), 0)
        tokens, parents, probs, match_len = ix.draft(arr([9, 1, 2]), 3, 0.0, {0: 1.0}, False, 7)
        assert match_len == 2
        assert tokens.tolist() == [3, 1, 2] and parents.tolist() == [-1, 0, 1]
        assert probs.tolist() == pytest.approx([2 / 3] * 3)
        tokens, parents, probs, _ = ix.draft(arr([1, 2]), 10, 0.3, {0: 1.0}, False, 7)
        assert (4, -1) in zip(tokens.tolist(), parents.tolist())  # the 1/3 branch
        assert min(probs) >= 0.3

    def test_tie_breaks_on_smaller_token(self):
        ix = SuffixIndex(4)
        ix.add_sequence(0, arr([1, 5]), 0)
        ix.add_sequence(1, arr([1, 3]), 0)
        tokens, _, probs, _ = ix.draft(arr([1]), 2, 0.0, {0: 1.0}, False, 3)
        assert tokens.tolist() == [3, 5] and probs.tolist() == [0.5, 0.5]
        tokens, _, _, _ = ix.draft(arr([1]), 2, 0.0, {0: 1.0}, True, 3)
        assert tokens.tolist() == [3]

    def test_steps_missing_from_weights_weigh_zero(self):
        ix = SuffixIndex(4)
        ix.add_sequence(0, arr([1, 5]), 0)
        ix.add_sequence(1, arr([1, 3]), 7)
        tokens, _, probs, _ = ix.draft(arr([1]), 4, 0.0, {0: 1.0}, False, 3)
        assert tokens.tolist() == [5] and probs.tolist() == [1.0]

    def test_match_prefers_longest_suffix_with_continuation(self):
        ix = SuffixIndex(6)
        ix.add_sequence(0, arr([4, 1, 2, 7]), 0)
        ix.add_sequence(1, arr([1, 2, 8, 9]), 0)
        assert ix.match_length(arr([4, 1, 2])) == 3
        tokens, _, _, m = ix.draft(arr([4, 1, 2]), 1, 0.0, {0: 1.0}, False, 5)
        assert (m, tokens.tolist()) == (3, [7])
        _, _, _, m = ix.draft(arr([4, 1, 2]), 1, 0.0, {0: 1.0}, False, 2)
        assert m == 2

    def test_depth_bound(self):
        ix = SuffixIndex(3)
        ix.add_sequence(0, arr([1, 2, 3, 4, 5]), 0)
        tokens, _, _, m = ix.draft(arr([1]), 10, 0.0, {0: 1.0}, False, 2)
        assert m == 1 and tokens.tolist() == [2, 3]  # match + draft <= max_depth


class TestValidation:
    def test_errors_name_the_bad_value(self):
        ix = SuffixIndex(8)
        with pytest.raises(ValueError, match="dtype=dtype\\('int64'\\)"):
            ix.add_sequence(1, np.array([1, 2]), 0)
        with pytest.raises(ValueError, match="got list"):
            ix.add_sequence(1, [1, 2], 0)
        with pytest.raises(ValueError, match="unknown seq_id=9"):
            ix.remove_sequence(9)
        with pytest.raises(ValueError, match="unknown seq_id=9"):
            ix.extend(9, arr([1]))
        ix.add_sequence(1, arr([1]), 0)
        with pytest.raises(ValueError, match="duplicate seq_id=1"):
            ix.add_sequence(1, arr([1]), 0)
        with pytest.raises(ValueError, match="budget=-2"):
            ix.draft_for_sequence(1, -2, 0.0, {}, False, 4)
        with pytest.raises(ValueError, match="max_depth=1"):
            SuffixIndex(1)

    def test_too_many_steps_names_the_step(self):
        ix = SuffixIndex(4)
        for s in range(MAX_STEPS):
            ix.add_sequence(s, arr([1]), 100 + s)
        with pytest.raises(ValueError, match="step=999"):
            ix.add_sequence(99, arr([1]), 999)
        ix.remove_sequence(0)  # frees step 100's slot
        ix.add_sequence(99, arr([1]), 999)
        assert 999 in ix.steps() and 100 not in ix.steps()
        ix.check_integrity()

    def test_batch_validation(self):
        ix = SuffixIndex(4)
        ix.add_sequence(0, arr([1, 2]), 0)
        args = (0.0, np.array([0], np.int64), np.array([1.0]), False, 3)
        with pytest.raises(ValueError, match="unknown seq_id=5"):
            draft_batch([ix], np.array([5], np.int64), np.array([1], np.int32), *args)
        with pytest.raises(ValueError, match="differ in length"):
            draft_batch([ix, ix], np.array([0], np.int64), np.array([1], np.int32), *args)
        with pytest.raises(ValueError, match="budget=-1"):
            draft_batch([ix], np.array([0], np.int64), np.array([-1], np.int32), *args)


class TestExtendBatch:
    def test_rows_append_their_slices(self):
        a, b = SuffixIndex(6), SuffixIndex(6)
        a.add_sequence(1, arr([1]), 0)
        b.add_sequence(2, arr([]), 0)
        extend_batch([a, b, a], np.array([1, 2, 1], np.int64), arr([4, 5, 6, 7]), np.array([0, 2, 2, 4], np.int64))
        assert a.sequence_tokens(1).tolist() == [1, 4, 5, 6, 7] and b.sequence_tokens(2).tolist() == []
        a.check_integrity()

    def test_bad_rows_change_nothing(self):
        a = SuffixIndex(6)
        a.add_sequence(1, arr([1]), 0)
        with pytest.raises(ValueError, match="unknown seq_id=9 in row 1"):
            extend_batch([a, a], np.array([1, 9], np.int64), arr([4, 5]), np.array([0, 1, 2], np.int64))
        with pytest.raises(ValueError, match="invalid offsets"):
            extend_batch([a], np.array([1], np.int64), arr([4]), np.array([0, 3], np.int64))
        assert a.sequence_tokens(1).tolist() == [1]


class TestBookkeeping:
    def test_introspection(self):
        ix = SuffixIndex(8)
        ix.add_sequence(3, arr([1, 2, 3]), 5)
        ix.extend(3, arr([4]))
        ix.append(3, 5)
        assert ix.num_sequences == 1 and ix.num_tokens == 5
        assert ix.sequence_tokens(3).tolist() == [1, 2, 3, 4, 5]
        assert ix.sequence_step(3) == 5 and ix.steps() == [5] and ix.sequence_ids() == [3]
        assert ix.memory_bytes() > 0
        ix.check_integrity()

    def test_empty_sequences_are_fine(self):
        ix = SuffixIndex(4)
        ix.add_sequence(0, arr([]), 0)
        assert ix.draft_for_sequence(0, 4, 0.0, {0: 1.0}, False, 3)[3] == 0
        ix.remove_sequence(0)
        assert ix.num_nodes == 1


def _rollout(rng: random.Random, base: list[int]) -> list[int]:
    """A noisy copy of a base text: RL siblings share most of their text."""
    out = []
    for t in base:
        r = rng.random()
        if r < 0.05:
            out.append(rng.randrange(1000))
        elif r > 0.97:
            continue
        else:
            out.append(t)
    return out


class TestMemory:
    def test_sliding_window_over_120_steps_is_bounded_and_returns_to_baseline(self):
        rng = random.Random(0)
        base = [rng.randrange(200) for _ in range(400)]
        ix = SuffixIndex(32)
        baseline_nodes, window, live, sid = ix.num_nodes, 4, [], 0
        nodes, mem = [], []
        for step in range(120):
            for _ in range(4):
                ix.add_sequence(sid, arr(_rollout(rng, base)), step)
                live.append((step, sid))
                sid += 1
            for s, q in [x for x in live if x[0] < step - window]:
                ix.remove_sequence(q)
                live.remove((s, q))
            if step % 10 == 0:
                ix.check_integrity()
            nodes.append(ix.num_nodes)
            mem.append(ix.memory_bytes())
        # Steady state: the window holds the same amount of text from step `window` on.
        assert max(nodes[60:]) <= 1.3 * max(nodes[window + 1 : 30])
        assert max(mem[60:]) <= 1.3 * max(mem[window + 1 : 30])
        for _, q in live:
            ix.remove_sequence(q)
        ix.check_integrity()
        assert ix.num_nodes == baseline_nodes and ix.num_orphans == 0 and ix.num_tokens == 0

    def test_remove_restores_node_count_exactly(self):
        rng = random.Random(1)
        ix = SuffixIndex(16)
        for s in range(10):
            ix.add_sequence(s, arr([rng.randrange(5) for _ in range(200)]), s % 3)
        before = ix.num_nodes
        ix.add_sequence(99, arr([rng.randrange(5) for _ in range(300)]), 1)
        ix.extend(99, arr([rng.randrange(5) for _ in range(50)]))
        ix.remove_sequence(99)
        ix.check_integrity()
        assert ix.num_nodes == before

    def test_node_array_past_its_reservation_moves_intact(self):
        """An index's node array grows in place inside the address space it reserved
        (default 256 MiB); past it, it moves to a larger reservation by copying. With a
        one-page reservation every growth past it moves: the index must be the same as one
        that never moved -- nodes, sizes, drafts, removals."""

        def build(rng):
            ix = SuffixIndex(16)
            for s in range(12):
                ix.add_sequence(s, arr([rng.randrange(40) for _ in range(300)]), s % 3)
            for s in range(0, 12, 3):
                ix.extend(s, arr([rng.randrange(40) for _ in range(80)]))
            return ix

        default = node_reserve_bytes()
        set_node_reserve_bytes(4096)  # 64 nodes
        try:
            moved = build(random.Random(5))
        finally:
            set_node_reserve_bytes(default)
        ref = build(random.Random(5))
        assert node_reserve_bytes() == default
        assert moved.num_nodes == ref.num_nodes > 64 * 16  # (it moved several times)
        assert moved.memory_bytes() == ref.memory_bytes()
        moved.check_integrity()
        rng = random.Random(6)
        for _ in range(20):
            ctx = arr([rng.randrange(40) for _ in range(6)])
            a = moved.draft(ctx, 12, 0.0, {0: 1.0, 1: 0.5, 2: 0.25}, False, 5)
            b = ref.draft(ctx, 12, 0.0, {0: 1.0, 1: 0.5, 2: 0.25}, False, 5)
            assert all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3])) and a[3] == b[3]
        for s in (1, 4, 7):
            moved.remove_sequence(s)
            ref.remove_sequence(s)
        moved.check_integrity()
        assert moved.num_nodes == ref.num_nodes
        assert moved.sequence_tokens(3).tolist() == ref.sequence_tokens(3).tolist()

    def test_node_reserve_bytes_names_a_bad_value(self):
        with pytest.raises(ValueError, match="bytes=100"):
            set_node_reserve_bytes(100)
        assert node_reserve_bytes() >= 4096


_TIGHT_AS = """
import resource, sys
import numpy as np
from das_sglang.native import SuffixIndex
vsz = int(open("/proc/self/statm").read().split()[0]) * 4096
limit = vsz + (200 << 20)  # no room for one 256 MiB reservation
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import mmap
try:
    mmap.mmap(-1, 256 << 20).close()
    fits = 1
except OSError:
    fits = 0
rng = np.random.default_rng(0)
ixs = []
for k in range(8):
    ix = SuffixIndex(16)
    for s in range(6):
        ix.add_sequence(s, rng.integers(0, 30, 400).astype(np.int32), 0)
    ix.check_integrity()
    ixs.append(ix)
print(sum(ix.num_nodes for ix in ixs), fits)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")
def test_indexes_work_where_no_reservation_fits_the_address_space_limit():
    """Under a tight ``ulimit -v`` (HPC batch systems set one) the 256 MiB reservation
    cannot be had: node arrays then reserve exactly what they use and move by copying as
    they grow, instead of failing."""
    out = subprocess.run([sys.executable, "-c", _TIGHT_AS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    nodes, fits = (int(x) for x in out.stdout.split())
    assert fits == 0  # (the limit does leave no room for a reservation)
    assert nodes > 8 * 6 * 400 // 2  # (they were built, all eight)


def test_long_inserts_release_the_gil():
    """add_sequence / extend of a long array run without the GIL (the session's update
    thread inserts prompts and finished rollouts while the scheduler thread runs Python).
    Counted, not timed: with a long switch interval the main thread's Python can step
    while the worker thread is inside the call only if the call released the GIL (holding
    it, the count stays 0: measured before the release was added)."""
    import sys
    import threading

    big = np.random.default_rng(0).integers(0, 50, 200_000, dtype=np.int32)
    counts = {}
    state = {"n": 0, "stop": False}

    def worker():
        ix = SuffixIndex(48)
        a = state["n"]
        ix.add_sequence(1, big, 0)
        b = state["n"]
        ix.extend(1, big[:100_000])
        c = state["n"]
        for i in range(2, 202):  # short ones keep the GIL (cheaper than handing it over)
            ix.add_sequence(i, big[i : i + 8], 0)
        counts.update(add=b - a, extend=c - b, seqs=ix.num_sequences)
        state["stop"] = True

    old = sys.getswitchinterval()
    sys.setswitchinterval(0.2)
    try:
        t = threading.Thread(target=worker)
        t.start()
        while not state["stop"]:
            state["n"] += 1
        t.join()
    finally:
        sys.setswitchinterval(old)
    assert counts["seqs"] == 201
    assert counts["add"] > 0 and counts["extend"] > 0, counts


def _rss_bytes() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/statm is Linux's")
def test_freed_nodes_give_their_pages_back_and_are_reused_intact():
    """A removal that frees many nodes hands the pages whose nodes are all free back to the
    OS (an index that lost a step of history no longer keeps it resident until it grows
    again): RSS drops by most of the freed nodes' bytes. The free nodes are reused after,
    from zeroed pages: the index stays the same as one built from what it holds."""
    rng = np.random.default_rng(3)
    old = rng.integers(0, 1000, 150_000).astype(np.int32)
    kept = rng.integers(0, 1000, 20_000).astype(np.int32)
    new = rng.integers(0, 1000, 60_000).astype(np.int32)
    ix = SuffixIndex(16)
    ix.add_sequence(1, old, 0)
    ix.add_sequence(2, kept, 1)
    before_nodes, before_rss = ix.num_nodes, _rss_bytes()
    ix.remove_sequence(1)
    freed = (before_nodes - ix.num_nodes) * 64
    released = before_rss - _rss_bytes()
    assert freed > 8 << 20
    assert released > freed // 2, (released, freed)
    ix.check_integrity()

    def same(a, b, steps):
        q = np.random.default_rng(4)
        for _ in range(40):
            src = kept if q.random() < 0.5 else new
            at = int(q.integers(8, len(src) - 8))
            ctx = src[at - 8: at]
            x = a.draft(ctx, 12, 0.0, steps, False, 8)
            y = b.draft(ctx, 12, 0.0, steps, False, 8)
            assert all(np.array_equal(u, v) for u, v in zip(x[:3], y[:3])) and x[3] == y[3]

    ref = SuffixIndex(16)
    ref.add_sequence(2, kept, 1)
    assert ix.num_nodes == ref.num_nodes
    same(ix, ref, {1: 1.0})
    ix.add_sequence(3, new, 2)  # (into the free nodes, on pages read back as zeros)
    ref.add_sequence(3, new, 2)
    ix.check_integrity()
    assert ix.num_nodes == ref.num_nodes
    same(ix, ref, {1: 1.0, 2: 0.5})
