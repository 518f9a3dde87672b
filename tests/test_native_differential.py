"""Native SuffixIndex vs the pure-Python oracle on random operation sequences.

Every match and every draft tree must agree exactly (probs to 1e-9; the step weights are
dyadic so both sides compute bit-identical sums). Recency (``mix`` with recency > 0) reads
the native labels' newest occurrence, which a removal may re-point into an older one: once
a scenario has removed a sequence, drafts are compared with recency 0 (both sides).
check_integrity() must hold after every
mutation, and the native node count must equal the oracle's canonical compressed count.
Operation totals (lower bounds): default run 200 scenarios x >= 30 operations + 4 streams x
4,000 = 22,000; the `slow` runs add 1,000 x >= 40 + 10 x 10,000 = 140,000.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from das_sglang.native import SuffixIndex, draft_batch
from oracle.reference_index import ReferenceIndex

WEIGHTS = [0.0, 0.25, 0.5, 1.0, 2.0]  # dyadic: sums are exact in both implementations
STEPS = [0, 1, 2, 3]


def arr(tokens) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32)


class Pair:
    """Runs each operation on both implementations and compares every answer."""

    def __init__(self, max_depth: int) -> None:
        self.native = SuffixIndex(max_depth)
        self.ref = ReferenceIndex(max_depth)
        self.next_id = 0
        self.ops = 0
        self.removed = False  # recency is exact only until the first removal

    def _mutated(self) -> None:
        self.native.check_integrity()
        assert self.native.num_nodes == self.ref.canonical_num_nodes()
        assert self.native.num_tokens == self.ref.num_tokens
        assert self.native.steps() == self.ref.steps()

    def add(self, tokens, step) -> None:
        self.native.add_sequence(self.next_id, arr(tokens), step)
        self.ref.add_sequence(self.next_id, list(tokens), step)
        self.next_id += 1
        self._mutated()

    def extend(self, seq_id, tokens) -> None:
        if len(tokens) == 1 and tokens[0] % 2:  # exercise the scalar entry point too
            self.native.append(seq_id, tokens[0])
        else:
            self.native.extend(seq_id, arr(tokens))
        self.ref.extend(seq_id, list(tokens))
        self._mutated()

    def remove(self, seq_id) -> None:
        self.native.remove_sequence(seq_id)
        self.ref.remove_sequence(seq_id)
        self.removed = True
        self._mutated()

    def _args(self, args):
        mix = args[-1]
        if self.removed and mix is not None and len(mix) >= 6:
            args = (*args[:-1], (*mix[:4], 0.0, *mix[5:]))
        return args

    def match(self, ctx) -> None:
        assert self.native.match_length(arr(ctx)) == self.ref.match_length(list(ctx))

    def draft(self, ctx, *args) -> None:
        args = self._args(args)
        same(self.native.draft(arr(ctx), *args), self.ref.draft(list(ctx), *args))

    def draft_seq(self, seq_id, *args) -> None:
        args = self._args(args)
        same(self.native.draft_for_sequence(seq_id, *args), self.ref.draft_for_sequence(seq_id, *args))

    def apply(self, op) -> None:
        self.ops += 1
        kind, *rest = op
        ids = sorted(self.ref.seqs)
        if kind == "add":
            self.add(*rest)
        elif kind == "match":
            self.match(*rest)
        elif kind == "draft":
            self.draft(*rest)
        elif ids:  # operations on an existing sequence: pick one by position
            seq_id = ids[rest[0] % len(ids)]
            if kind == "extend":
                self.extend(seq_id, rest[1])
            elif kind == "remove":
                self.remove(seq_id)
            else:
                self.draft_seq(seq_id, *rest[1:])


def same(native, ref) -> None:
    tokens, parents, probs, match_len = native
    r_tokens, r_parents, r_probs, r_match = ref
    assert match_len == r_match
    assert tokens.tolist() == r_tokens
    assert parents.tolist() == r_parents
    np.testing.assert_allclose(probs, r_probs, rtol=0, atol=1e-9)


# ---------------------------------------------------------------- strategies

def token_lists(alphabet: int, max_size: int):
    return st.lists(st.integers(0, alphabet - 1), min_size=0, max_size=max_size)


def draft_args():
    return st.tuples(
        st.integers(0, 12),  # budget
        st.sampled_from([0.0, 0.05, 0.2, 0.5]),  # min_prob
        st.dictionaries(st.sampled_from(STEPS), st.sampled_from(WEIGHTS), max_size=4),
        st.booleans(),  # chain
        st.integers(0, 8),  # max_match_len
        mixes(),
    )


def mixes():
    """None (longest match only) or a wide-tree mix (alpha, escape, min_match, max_fanout
    [, recency, match_half[, min_ratio]]); integer alphas and dyadic escapes / recencies keep
    both sides' sums bit-identical."""
    base = st.tuples(st.sampled_from([0.0, 1.0, 2.0, 4.0]), st.sampled_from([0.0, 0.5, 1.0]),
                     st.integers(1, 3), st.sampled_from([1, 2, 3, 64]))
    return st.one_of(
        st.none(),
        base,
        st.tuples(base, st.sampled_from([0.0, 0.25, 1.0, 4.0]), st.sampled_from([0.0, 1.0, 4.0, 0.5]))
        .map(lambda t: (*t[0], t[1], t[2])),
        st.tuples(base, st.sampled_from([0.0, 0.25, 1.0]), st.sampled_from([0.0, 4.0]),
                  st.sampled_from([0.0, 0.2, 0.3, 0.5, 0.9]))
        .map(lambda t: (*t[0], t[1], t[2], t[3])),
        st.tuples(base, st.sampled_from([0.0, 0.25, 1.0]), st.sampled_from([0.0, 4.0]),
                  st.sampled_from([0.0, 0.3]), st.sampled_from([False, True, 0.25, 0.5]))  # skip_unseen
        .map(lambda t: (*t[0], t[1], t[2], t[3], t[4])),
    )


def operations(alphabet: int):
    toks = token_lists(alphabet, 12)
    pick = st.integers(0, 50)
    return st.one_of(
        st.tuples(st.just("add"), toks, st.sampled_from(STEPS)),
        st.tuples(st.just("extend"), pick, token_lists(alphabet, 6).filter(bool)),
        st.tuples(st.just("remove"), pick),
        st.tuples(st.just("match"), toks),
        draft_args().flatmap(lambda a: st.tuples(st.just("draft"), toks, *map(st.just, a))),
        draft_args().flatmap(lambda a: st.tuples(st.just("draft_seq"), pick, *map(st.just, a))),
    )


@st.composite
def scenarios(draw, max_ops: int):
    depth = draw(st.sampled_from([2, 3, 4, 6, 9]))
    alphabet = draw(st.sampled_from([2, 3, 5, 12]))  # 12: nodes cross kScanFanout (8)
    ops = draw(st.lists(operations(alphabet), min_size=max_ops // 2, max_size=max_ops))
    return depth, ops


def run(depth, ops) -> int:
    pair = Pair(depth)
    for op in ops:
        pair.apply(op)
    for seq_id in sorted(pair.ref.seqs):  # and everything can be removed again
        pair.remove(seq_id)
    assert pair.native.num_nodes == 1 and pair.native.num_orphans == 0
    return pair.ops


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(max_ops=60))
def test_random_operations_agree(scenario):
    run(*scenario)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(max_ops=80))
def test_random_operations_agree_long(scenario):
    run(*scenario)


def seeded_ops(rng: random.Random, n: int, alphabet: int):
    """Plain pseudo-random operation stream (no shrinking, but cheap to make long)."""
    for _ in range(n):
        r = rng.random()
        toks = [rng.randrange(alphabet) for _ in range(rng.randrange(0, 14))]
        args = (
            rng.randrange(0, 12),
            rng.choice([0.0, 0.05, 0.2]),
            {s: rng.choice(WEIGHTS) for s in rng.sample(STEPS, rng.randrange(0, 5))},
            rng.random() < 0.3,
            rng.randrange(0, 9),
            None if rng.random() < 0.4 else (rng.choice([0.0, 1.0, 2.0, 4.0]), rng.choice([0.0, 0.5, 1.0]),
                                             rng.randrange(1, 4), rng.choice([1, 2, 3, 64]),
                                             rng.choice([0.0, 0.25, 1.0]), rng.choice([0.0, 1.0, 4.0])),
        )
        # As many adds as removes: the index size does a random walk instead of growing,
        # so the per-mutation integrity check stays cheap over long streams.
        if r < 0.15:
            yield ("add", toks, rng.choice(STEPS))
        elif r < 0.4:
            yield ("extend", rng.randrange(50), toks or [0])
        elif r < 0.55:
            yield ("remove", rng.randrange(50))
        elif r < 0.65:
            yield ("match", toks)
        elif r < 0.8:
            yield ("draft", toks, *args)
        else:
            yield ("draft_seq", rng.randrange(50), *args)


@pytest.mark.parametrize("seed", range(4))
def test_seeded_operation_stream(seed):
    rng = random.Random(seed)
    assert run(rng.choice([3, 5, 8]), list(seeded_ops(rng, 4000, rng.choice([2, 4, 7])))) >= 4000


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(100, 110))
def test_seeded_operation_stream_long(seed):
    rng = random.Random(seed)
    assert run(rng.choice([3, 5, 8, 16]), list(seeded_ops(rng, 10000, rng.choice([2, 3, 6, 9])))) >= 10000


def test_draft_for_sequence_equals_draft_of_its_tokens():
    rng = random.Random(7)
    ix = SuffixIndex(8)
    for s in range(6):
        ix.add_sequence(s, arr([rng.randrange(3) for _ in range(40)]), s % 2)
    for s in range(6):
        a = ix.draft_for_sequence(s, 10, 0.0, {0: 1.0, 1: 0.5}, False, 7)
        b = ix.draft(ix.sequence_tokens(s), 10, 0.0, {0: 1.0, 1: 0.5}, False, 7)
        same(a, tuple(x.tolist() if hasattr(x, "tolist") else x for x in b))


def test_batch_equals_per_row_calls():
    rng = random.Random(3)
    indices = [SuffixIndex(6), SuffixIndex(6)]
    rows = []
    for k, ix in enumerate(indices):
        for s in range(4):
            ix.add_sequence(s, arr([rng.randrange(4) for _ in range(50)]), s % 3)
            rows.append((k, s, rng.randrange(0, 9)))
    tokens, parents, probs, offsets, match = draft_batch(
        [indices[k] for k, _, _ in rows],
        np.asarray([s for _, s, _ in rows], np.int64),
        np.asarray([b for _, _, b in rows], np.int32),
        0.01,
        np.asarray([0, 1, 2], np.int64),
        np.asarray([1.0, 0.5, 0.25]),
        False,
        5,
    )
    assert offsets[0] == 0 and offsets[-1] == len(tokens)
    for r, (k, s, b) in enumerate(rows):
        t, p, q, m = indices[k].draft_for_sequence(s, b, 0.01, {0: 1.0, 1: 0.5, 2: 0.25}, False, 5)
        a, z = offsets[r], offsets[r + 1]
        assert tokens[a:z].tolist() == t.tolist() and parents[a:z].tolist() == p.tolist()
        assert probs[a:z].tolist() == q.tolist() and match[r] == m


def test_a_node_crossing_the_scan_fanout_both_ways_agrees():
    """A node's children move into the child map when it gets a 9th child (kScanFanout 8)
    and back to list scans when it drops to 8: integrity (the map holds exactly the
    children of the root and of wide nodes) and every answer checked at each step."""
    pair = Pair(3)
    for k in range(1, 12):  # token 0 gets children 1..11: wide from the 9th on
        pair.add([0, k, 0], k % 3)
        pair.match([5, 0])
        pair.draft([0], 6, 0.0, {}, False, 2, None)
    ids = sorted(pair.ref.seqs)
    pair.extend(ids[0], [3, 0, 9])
    pair.draft_seq(ids[0], 8, 0.0, {0: 1.0, 1: 0.5, 2: 0.25}, False, 2, None)
    for seq_id in ids:  # back below the threshold, then empty
        pair.remove(seq_id)
        pair.draft([0], 6, 0.0, {}, False, 2, None)
    assert pair.native.num_nodes == 1
