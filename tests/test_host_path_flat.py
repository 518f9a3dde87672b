"""Issue 12 flat host path, core side: the batch-at-once forms give exactly what the
row-by-row forms gave -- native ``draft_rows`` (any thread count, prefetching) vs
``draft_batch``, ``DraftBatch`` vs lists of ``DraftTree``, a policy reading ``BudgetRows``
columns vs ``BudgetRow`` objects, batched verify outcomes vs one call per row."""

import os
import time

import numpy as np
import pytest

from das_sglang.core.acceptance import AcceptanceTracker
from das_sglang.core.budget_rows import BudgetRows
from das_sglang.core.config import DrafterConfig
from das_sglang.core.draft_tree import DraftBatch, DraftTree
from das_sglang.core.drafter import SuffixDrafter
from das_sglang.core.online_acceptance import tree_depths
from das_sglang.core.policy import BudgetRow, make_policy
from das_sglang.core.policy_config import PolicyConfig
from das_sglang.native import (
    SuffixIndex, draft_batch, draft_rows, extend_batch, extend_draft_rows, extend_draft_rows_start,
)


def _drafter(seed=0, problems=12, histories=4, history_len=200, requests=300, cold=2, vocab=12,
             prompt_len=30, **kw):
    rng = np.random.default_rng(seed)
    # per-problem indexes only unless asked (the shared index's pre-draft semantics are
    # tested in test_predraft_with_the_shared_index)
    d = SuffixDrafter(DrafterConfig(window_steps=2, **{"global_shard": False, **kw}))
    d.advance_step(2)
    for p in range(problems):
        for k in range(histories):
            d.add_history(f"p{p}", 1 + k % 2, rng.integers(0, vocab, history_len))
    rids = []
    for r in range(requests):
        rid = f"r{r}"
        # the last `cold` problems have no history
        d.start_request(rid, f"p{r % (problems + cold)}", rng.integers(0, vocab, prompt_len))
        rids.append(rid)
    return d, rids, rng


def _same_trees(a, b):
    assert len(a) == len(b)
    for t, u in zip(a, b):
        np.testing.assert_array_equal(t.tokens, u.tokens)
        np.testing.assert_array_equal(t.parents, u.parents)
        np.testing.assert_array_equal(t.probs, u.probs)
        assert t.match_len == u.match_len


@pytest.mark.parametrize("kw", [{}, {"mixture": False}, {"tree": False}, {"global_shard": True}])
def test_flat_speculate_equals_tree_by_tree_for_any_thread_count(kw):
    d, rids, rng = _drafter(**kw)
    budgets = rng.integers(0, 17, len(rids))
    old = d.speculate_batch(rids, budgets)
    assert sum(len(t) for t in old) > 500  # the comparison covers real trees
    for threads in (1, 2, 3, 7):
        new = d.speculate_flat(rids, budgets, threads=threads)
        _same_trees(old, new)
        np.testing.assert_array_equal(new.depths, np.concatenate(tree_depths([t.parents for t in old])))
    _same_trees(d.speculate_batch(rids[:5], [16] * 5), d.speculate_flat(rids[:5], 16))


def _fresh_drafts(d, rids, budget):
    saved, d._predrafted = d._predrafted, None
    try:
        return d.speculate_flat(rids, budget)
    finally:
        d._predrafted = saved


def _same_batch(a, b):
    for f in ("tokens", "parents", "probs", "depths", "offsets"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    np.testing.assert_array_equal(np.asarray(a.match_len), np.asarray(b.match_len))


def test_predrafted_trees_are_reused_only_while_exact():
    """``predraft`` keeps the trees; a later ``speculate_flat`` reuses a row only while its
    sequence, index version, budget and the step weights are unchanged: after extends,
    finishes, new requests, other budgets and a step advance it equals drafting afresh."""
    d, rids, rng = _drafter(3)
    d.predraft(rids, 16)
    kept = d._predrafted[1]
    same = d.speculate_flat(rids, 16)
    assert same is kept  # nothing changed: the trees themselves
    _same_batch(same, _fresh_drafts(d, rids, 16))
    # Rows of p0/p1 gain tokens, a p2 row finishes into history, a new p3 request starts;
    # the rows come back in another order, plus the new one.
    grow = [r for r in rids if d._live[r].problem_id in ("p0", "p1")]
    d.extend_batch(grow, [rng.integers(0, 12, 3) for _ in grow])
    done = next(r for r in rids if d._live[r].problem_id == "p2")
    d.finish_request(done)
    d.start_request("new", "p3", rng.integers(0, 12, 30))
    ask = [r for r in rids if r != done][::-1] + ["new"]
    drafted = []
    native = d._draft_flat
    d._draft_flat = lambda idx, *a: drafted.append(len(idx)) or native(idx, *a)
    out = d.speculate_flat(ask, 16)
    del d._draft_flat
    _same_batch(out, _fresh_drafts(d, ask, 16))
    # (a finish kept as history leaves p2's index as it was: its rows stay valid)
    changed = sum(d._live[r].problem_id in ("p0", "p1", "p3") for r in ask)
    assert drafted == [changed] and 0 < changed < len(ask) / 2  # only those were drafted again
    # another budget for every row: nothing reused, still exact
    d.predraft(ask, 16)
    _same_batch(d.speculate_flat(ask, 7), _fresh_drafts(d, ask, 7))
    # a step advance changes the weights: the first plan after it still takes the kept
    # trees (test_first_plan_after_a_boundary_reuses_the_trees_from_before_it), the next
    # one drafts afresh
    d.predraft(ask, 16)
    kept = d._predrafted[1]
    d.advance_step(d.step + 1)
    assert d.speculate_flat(ask, 16) is kept
    _same_batch(d.speculate_flat(ask, 16), _fresh_drafts(d, ask, 16))
    assert d._predrafted is None


def test_mutation_epoch_moves_with_every_index_change():
    """``mutation_epoch`` changes with any SuffixIndex's add / extend / remove (and only
    then: drafting reads nothing that bumps it)."""
    from das_sglang.native import mutation_epoch

    a, b = SuffixIndex(8), SuffixIndex(8)
    seen = [mutation_epoch()]

    def moved():
        seen.append(mutation_epoch())
        return seen[-1] != seen[-2]

    a.add_sequence(1, np.array([1, 2, 3], np.int32), 0)
    assert moved()
    b.add_sequence(2, np.array([1, 2], np.int32), 0)
    assert moved()
    b.extend(2, np.array([3], np.int32))
    assert moved()
    draft_rows([a, b], np.array([1, 2], np.int64), np.array([4, 4], np.int32), 0.0,
               np.array([0], np.int64), np.array([1.0]), False, 8)
    assert not moved()
    a.remove_sequence(1)
    assert moved()


def test_predrafted_trees_skip_the_version_reads_while_no_index_changed(monkeypatch):
    """While no index changed since the pre-draft (``mutation_epoch``), a plan of its rows
    -- the same ones, or moved, with placeholders -- reuses the trees without reading one
    version per row; once any index changed it reads them, and only the rows whose index
    changed are drafted again. Always the trees of drafting afresh."""
    import das_sglang.core.drafter as drafter_mod

    d, rids, rng = _drafter(4)
    reads = []
    real = drafter_mod.index_versions
    monkeypatch.setattr(drafter_mod, "index_versions", lambda idx: reads.append(len(idx)) or real(idx))
    d.predraft(rids, 16)
    kept = d._predrafted[1]
    assert d.speculate_flat(rids, 16) is kept
    moved = rids[::-1]
    _same_batch(d.speculate_flat(moved, 16), _fresh_drafts(d, moved, 16))
    _same_batch(d.speculate_flat(rids, 16, skip={rids[3]}).take([i for i in range(len(rids)) if i != 3]),
                _fresh_drafts(d, [r for i, r in enumerate(rids) if i != 3], 16))
    assert reads == []  # (the fresh drafts above never reuse: nothing read there either)
    grow = [r for r in rids if d._live[r].problem_id == "p0"]
    d.extend_batch(grow, [rng.integers(0, 12, 2) for _ in grow])
    drafted = []
    native = d._draft_flat
    d._draft_flat = lambda idx, *a: drafted.append(len(idx)) or native(idx, *a)
    out = d.speculate_flat(rids, 16)
    del d._draft_flat
    assert reads == [len(rids)] and drafted == [len(grow)]
    _same_batch(out, _fresh_drafts(d, rids, 16))


def test_predrafted_trees_with_placeholders_in_place_and_moved():
    """A plan with deferred starts (``skip``) over pre-drafted rows: the finished rows'
    places taken by new requests (placeholders, empty trees) and the other rows reused --
    found in place without a search, or moved (another order) -- and a row whose index
    changed drafted again; every tree equals drafting afresh with the placeholders empty."""
    d, rids, rng = _drafter(5, requests=120)
    d.predraft(rids, 16)
    for moved in (False, True):
        batch = list(rids)
        batch[7], batch[50] = "new_a", "new_b"  # (r7, r50 finished; their rows re-used)
        if moved:
            batch = batch[::-1]
        skip = {"new_a", "new_b"}
        for change in (False, True):
            d.predraft(rids, 16)
            if change:  # one problem's index changes: its rows are drafted again
                grow = [r for r in rids if d._live[r].problem_id == "p3"]
                d.extend_batch(grow, [rng.integers(0, 12, 2) for _ in grow])
            drafted = []
            native = d._draft_flat
            d._draft_flat = lambda idx, *a: drafted.append(len(idx)) or native(idx, *a)
            got = d.speculate_flat(batch, 16, skip=skip)
            del d._draft_flat
            assert len(got) == len(batch)
            hole = [i for i, r in enumerate(batch) if r in skip]
            assert all(got.lens()[i] == 0 and got.match_len[i] == 0 for i in hole)
            keep = [i for i, r in enumerate(batch) if r not in skip]
            _same_batch(got.take(np.array(keep)), _fresh_drafts(d, [batch[i] for i in keep], 16))
            n_p3 = sum(d._live[batch[i]].problem_id == "p3" for i in keep)
            assert drafted == ([n_p3] if change else []) and n_p3 > 0


def test_take_rows_makes_minus_one_rows_empty():
    d, rids, _ = _drafter(6, requests=20)
    out = d.speculate_flat(rids, 16)
    rows = np.array([3, -1, 0, 3, -1, 19])
    got = out.take_rows(rows)
    assert got.lens().tolist() == [out.lens()[3], 0, out.lens()[0], out.lens()[3], 0, out.lens()[19]]
    assert sum(got.lens()) > 0
    assert np.asarray(got.match_len)[[1, 4]].tolist() == [0, 0]
    _same_batch(got.take(np.array([0, 2, 3, 5])), out.take(np.array([3, 0, 3, 19])))
    _same_batch(out.take_rows(np.array([2, 1])), out.take(np.array([2, 1])))


@pytest.mark.parametrize("lazy", [True, False])
def test_first_plan_after_a_boundary_reuses_the_trees_from_before_it(lazy):
    """Across a step boundary the pre-drafted trees (made under the previous step's weights)
    serve the next ``speculate_flat`` for every row whose index did not change otherwise --
    the boundary's own removals of out-of-window history do not count, so eager and lazy
    eviction give the same trees -- and only that one; rows whose index changed are drafted
    afresh. Off (``REUSE_ACROSS_BOUNDARY``), every row is drafted again."""
    for reuse in (True, False):
        d, rids, rng = _drafter(11)
        d.lazy_eviction = lazy
        d.REUSE_ACROSS_BOUNDARY = reuse
        d.predraft(rids, 16)
        before = _fresh_drafts(d, rids, 16)
        d.advance_step(d.step + 2)  # window_steps 2 at step 4: step 1's history leaves
        assert d._evicting == ({1} if lazy else set())
        # a row of p0 gains tokens after the boundary: drafted again, the others are not
        grow = [r for r in rids if d._live[r].problem_id == "p0"]
        d.extend_batch(grow, [rng.integers(0, 12, 3) for _ in grow])
        fresh = _fresh_drafts(d, rids, 16)
        drafted = []
        native = d._draft_flat
        d._draft_flat = lambda idx, *a: drafted.append(len(idx)) or native(idx, *a)
        out = d.speculate_flat(rids, 16)
        del d._draft_flat
        if reuse:
            assert drafted == [len(grow)]
            g = set(grow)
            for i, r in enumerate(rids):
                want = fresh if r in g else before
                _same_trees([out[i]], [want[i]])
            # the history that left changed some trees: the reused ones are the old ones
            assert any(not np.array_equal(before[i].tokens, fresh[i].tokens)
                       for i, r in enumerate(rids) if r not in g)
            # the next plan drafts every row under the new weights
            _same_batch(d.speculate_flat(rids, 16), fresh)
        else:
            assert drafted == [len(rids)]
            _same_batch(out, fresh)


def test_boundary_reuse_with_a_request_predrafted_twice():
    """Eager eviction re-stamps the kept trees' versions entry by entry: a request that
    appears twice in the pre-drafted rows (the dict keeps its later row) neither breaks
    the step advance nor loses its tree."""
    d, rids, rng = _drafter(11)
    ask = [rids[0], rids[0]] + rids[1:5]
    d.predraft(ask, 16)
    before = _fresh_drafts(d, ask, 16)
    d.advance_step(d.step + 2)  # eager: step 1's history leaves now
    assert len(d._predrafted[2]) == len(ask)
    out = d.speculate_flat(ask, 16)
    _same_batch(out, before)
    assert not all(np.array_equal(before[i].tokens, t.tokens)
                   for i, t in enumerate(_fresh_drafts(d, ask, 16)))


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_extend_draft_rows_equals_extend_then_draft(threads):
    """The fused native call gives extend_batch's indices and draft_rows' trees (rows of
    one index drafted after its last append, whatever the split), and the versions."""
    a, rids, rng = _drafter(5)
    b, _, _ = _drafter(5)
    c, _, _ = _drafter(5)
    rows = list(rng.permutation(rids)[:120])  # many rows share an index
    toks = [rng.integers(0, 12, int(rng.integers(1, 5))) for _ in rows]
    budgets = rng.integers(0, 17, len(rows)).astype(np.int32)
    out = []
    for d, mode in ((a, "fused"), (b, "two calls"), (c, "started")):
        idx, seq, flat, off = d.prepare_extend(rows, toks)
        steps, weights = d._weights
        args = (0.05, steps, weights, False, 32, d._mix())
        if mode == "two calls":
            extend_batch(idx, seq, flat, off)
            arrays = draft_rows(idx, seq, budgets, *args, 1)
        else:
            if mode == "fused":
                *arrays, versions, probs_ok = extend_draft_rows(idx, seq, flat, off, budgets, *args, threads,
                                                                threads)
            else:
                pending = extend_draft_rows_start(idx, seq, flat, off, budgets, *args, threads)
                *arrays, versions, probs_ok = pending.wait()
                with pytest.raises(ValueError, match="already returned"):
                    pending.wait()
            np.testing.assert_array_equal(versions, [ix.version for ix in idx])
            # (the job's check of its trees' node probabilities: the numpy one's answer)
            assert probs_ok is bool(((arrays[2] >= 0.0) & (arrays[2] <= 1.0)).all()) is True
        out.append(arrays)
        assert len(arrays[0]) > 200
    for x, y, z in zip(*out):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(z, y)
    for d in (a, c):
        assert {p: d._indices[p].sequence_ids() for p in d._indices} == {p: b._indices[p].sequence_ids() for p in b._indices}
        for r in rids:
            np.testing.assert_array_equal(d._indices[d._live[r].problem_id].sequence_tokens(d._live[r].seq_id),
                                          b._indices[b._live[r].problem_id].sequence_tokens(b._live[r].seq_id))
    with pytest.raises(ValueError, match="extend_threads=-1"):
        extend_draft_rows(idx, seq, flat, off, budgets, *args, 1, -1)
    bad = (idx[:1], np.array([999999], np.int64), flat[:1], np.array([0, 1], np.int64), budgets[:1], *args, 1)
    before = idx[0].sequence_ids(), [idx[0].sequence_tokens(q).copy() for q in idx[0].sequence_ids()]
    with pytest.raises(ValueError, match="unknown seq_id=999999 in row 0"):
        extend_draft_rows(*bad)  # checked before anything starts
    # The started form looks its rows up on its own worker (off the caller's thread): the
    # same error, raised by wait(), before any index changed.
    pending = extend_draft_rows_start(*bad)
    with pytest.raises(ValueError, match="unknown seq_id=999999 in row 0"):
        pending.wait()
    assert idx[0].sequence_ids() == before[0]
    for q, toks in zip(before[0], before[1]):
        np.testing.assert_array_equal(idx[0].sequence_tokens(q), toks)


def test_apply_extend_with_predraft_keeps_exact_trees():
    d, rids, rng = _drafter(6)
    d.apply_extend(d.prepare_extend(rids, [rng.integers(0, 12, 2) for _ in rids]), 16)
    assert d._predrafted is not None
    assert d.speculate_flat(rids, 16) is d._predrafted[1]
    _same_batch(d._predrafted[1], _fresh_drafts(d, rids, 16))
    done = d.start_extend(d.prepare_extend(rids, [rng.integers(0, 12, 2) for _ in rids]), 16)
    done()  # the started form: the same trees once waited for
    assert d.speculate_flat(rids, 16) is d._predrafted[1]
    _same_batch(d._predrafted[1], _fresh_drafts(d, rids, 16))


def test_predrafted_trees_survive_a_new_step_elsewhere():
    """The weights change when a step's first sequence arrives (here: history of step 0, in
    the window, for one problem): rows of other problems keep their trees (their indices
    read none of that step), the problem's own rows are drafted again; all exact."""
    d, rids, rng = _drafter(7)
    assert 0 not in d._weight_dict
    d.predraft(rids, 16)
    token = d._weights
    d.add_history("p5", 0, rng.integers(0, 12, 50))
    assert d._weights is not token and 0 in d._weight_dict
    drafted = []
    native = d._draft_flat
    d._draft_flat = lambda idx, *a: drafted.append(len(idx)) or native(idx, *a)
    out = d.speculate_flat(rids, 16)
    del d._draft_flat
    assert drafted == [sum(d._live[r].problem_id == "p5" for r in rids)]
    _same_batch(out, _fresh_drafts(d, rids, 16))


def test_predraft_with_the_shared_index():
    """Fallback-only shared index (shared_weight 0): no pre-draft. Mixed into every draft:
    the fused extend + pre-draft appends to the shared index too and drafts with it (= the
    two-call path); later, a row whose own index is unchanged keeps its pre-drafted tree
    although other problems' starts changed the shared index; rows whose own index changed
    are drafted again, exactly as drafting then would."""
    d, rids, _ = _drafter(4, global_shard=True, shared_weight=0.0)
    d.predraft(rids, 16)
    assert d._predrafted is None
    d.apply_extend(d.prepare_extend(rids[:3], [[1], [2], [3]]), 16)
    assert d._predrafted is None
    a, rids, rng = _drafter(4, global_shard=True)
    b, _, _ = _drafter(4, global_shard=True)
    toks = [rng.integers(0, 12, 2) for _ in rids]
    a.apply_extend(a.prepare_extend(rids, toks), 16)  # fused: extend both indexes + pre-draft
    b.extend_batch(rids, toks)
    _same_batch(a._predrafted[1], b.speculate_flat(rids, 16))
    assert a._global.version == b._global.version and a._global.num_tokens == b._global.num_tokens
    kept = a._predrafted[1]
    a.start_request("other", "p5", rng.integers(0, 12, 40))  # p5's own index and the shared one change
    out = a.speculate_flat(rids, 16)
    p5 = np.array([a._live[r].problem_id == "p5" for r in rids])
    assert 0 < p5.sum() < len(rids)
    keep_rows = np.flatnonzero(~p5)
    _same_batch(out.take(keep_rows), kept.take(keep_rows))  # the shared part as of the pre-draft
    fresh = a._draft_flat([a._indices["p5"]] * int(p5.sum()),
                          np.array([a._live[r].seq_id for r in np.array(rids)[p5]], np.int64),
                          np.full(int(p5.sum()), 16, np.int32), 1)
    _same_batch(out.take(np.flatnonzero(p5)), fresh)  # drafted again, reading the shared index now


def test_draft_rows_matches_draft_batch_and_checks_its_arguments():
    d, rids, rng = _drafter(1)
    lives = [d._live[r] for r in rids]
    idx = [d._indices[lv.problem_id] for lv in lives]
    seq = np.array([lv.seq_id for lv in lives], np.int64)
    b = rng.integers(0, 12, len(rids)).astype(np.int32)
    steps, weights = d._weights
    args = (0.05, steps, weights, False, 32, (4.0, 0.0, 1, 1 << 30))
    ref = draft_batch(idx, seq, b, *args)
    for threads in (1, 4):
        out = draft_rows(idx, seq, b, *args, threads)
        for x, y in zip(ref, out[:3] + out[4:]):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="threads=0"):
        draft_rows(idx, seq, b, *args, 0)
    with pytest.raises(ValueError, match="budget=-1 in row 0"):
        draft_rows(idx[:1], seq[:1], np.array([-1], np.int32), *args, 2)
    with pytest.raises(ValueError, match="unknown seq_id=999999 in row 0"):
        draft_rows(idx[:1], np.array([999999], np.int64), b[:1], *args, 2)


def test_index_version_changes_with_every_mutation():
    ix = SuffixIndex(8)
    v = [ix.version]
    ix.add_sequence(1, np.array([1, 2, 3], np.int32), 0)
    v.append(ix.version)
    ix.draft_for_sequence(1, 4, 0.0, {0: 1.0}, False, 4)  # reads leave it alone
    assert ix.version == v[-1]
    ix.extend(1, np.array([4], np.int32))
    v.append(ix.version)
    ix.remove_sequence(1)
    v.append(ix.version)
    assert v == sorted(set(v))


def _random_trees(rng, n):
    trees = []
    for _ in range(n):
        k = int(rng.integers(0, 9))
        parents = [int(rng.integers(-1, i)) for i in range(k)]
        trees.append(DraftTree(rng.integers(0, 50, k).astype(np.int32), np.array(parents, np.int32),
                               np.sort(rng.random(k))[::-1].copy(), int(rng.integers(0, 5))))
    return trees


def test_draft_batch_ops_equal_per_tree_ops():
    rng = np.random.default_rng(2)
    trees = _random_trees(rng, 40)
    batch = DraftBatch.from_trees(trees)
    _same_trees(trees, batch)
    np.testing.assert_array_equal(batch.lens(), [len(t) for t in trees])
    assert batch.width == max(len(t) for t in trees)
    keep = rng.integers(-1, 10, len(trees))
    _same_trees([t.truncate(int(k)) for t, k in zip(trees, keep)], batch.truncate(keep))
    cut = batch.truncate(keep)
    np.testing.assert_array_equal(cut.depths, np.concatenate([t.depths() for t in cut]))
    rows = rng.integers(0, len(trees), 25)
    _same_trees([trees[i] for i in rows], batch.take(rows))
    _same_trees(trees + trees[:3], DraftBatch.concat([batch, batch.take([0, 1, 2])]))
    assert batch.truncate([99] * len(trees)) is batch
    with pytest.raises(IndexError, match="row 40"):
        batch[40]


def _rows(rng, n, drafts, pids):
    gen = rng.integers(0, 400, n)
    return BudgetRows([f"r{i}" for i in range(n)], [pids[i % len(pids)] for i in range(n)],
                      gen.astype(np.int64), (gen + rng.integers(1, 300, n)).astype(np.int64),
                      rng.integers(10, 90, n).astype(np.int64), drafts)


@pytest.mark.parametrize("policy,cfg", [
    ("length-aware", {}), ("length-aware", {"curve_mode": "outcome"}),
    ("length-aware", {"curve_mode": "blend", "uniform_width": True,
                      "width_buckets": (0, 1, 2, 4, 8, 16)}),
    ("length-aware", {"lookahead": "stationary"}), ("paper", {}), ("fixed", {})])
def test_policy_plans_columns_exactly_like_rows(policy, cfg):
    """Two identical policies, one fed BudgetRows, the other the same rows as BudgetRow
    objects, over steps with outcomes and finishes: the same budgets every step."""
    rng = np.random.default_rng(3)
    pc = PolicyConfig(max_budget=16, **cfg)
    a, b = make_policy(policy, config=pc), make_policy(policy, config=pc)
    pids = [f"p{i}" for i in range(7)]
    for i in range(30):
        length = int(rng.integers(50, 900))
        for pol in (a, b):
            pol.observe_finished(pids[i % 7], length)
    n = 60
    gen = rng.integers(0, 300, n).astype(np.int64)
    for step in range(12):
        drafts = DraftBatch.from_trees(_random_trees(rng, n))
        rows = _rows(rng, n, drafts, pids)
        rows.generated = gen.copy()
        objs = [BudgetRow(r.req_id, r.problem_id, r.generated_len, r.max_new_tokens, r.node_probs,
                          r.prompt_len, r.match_len, r.node_depths) for r in rows]
        pa, pb = a.plan(rows), b.plan(objs)
        np.testing.assert_array_equal(pa.budgets, pb.budgets)
        assert pa.width == pb.width
        acc = np.minimum(rng.integers(0, 5, n), pa.budgets)
        for i in range(n):
            a.observe_verify(rows.problem_ids[i], int(pa.budgets[i]), int(acc[i]))
            b.observe_verify(rows.problem_ids[i], int(pa.budgets[i]), int(acc[i]))
        gen += acc + 1
    assert a.acceptance.calibration("p1") == b.acceptance.calibration("p1")


def test_budget_rows_index_like_budget_row_objects():
    rng = np.random.default_rng(4)
    trees = _random_trees(rng, 5)
    rows = _rows(rng, 5, DraftBatch.from_trees(trees), ["p"])
    r = rows[3]
    assert (r.req_id, r.problem_id, r.generated_len) == ("r3", "p", int(rows.generated[3]))
    np.testing.assert_array_equal(r.node_probs, trees[3].probs)
    np.testing.assert_array_equal(r.node_depths, trees[3].depths())
    assert r.match_len == trees[3].match_len
    sub = rows.take([4, 0])
    assert sub.req_ids == ["r4", "r0"] and [len(x.node_probs) for x in sub] == [len(trees[4]), len(trees[0])]
    with pytest.raises(ValueError, match="differ in length"):
        BudgetRows(["a"], [], np.zeros(1), np.zeros(1), np.zeros(1), rows.drafts.take([0]))


def test_observe_many_equals_observe_row_by_row():
    cfg = PolicyConfig(max_budget=16)
    a, b = AcceptanceTracker(cfg), AcceptanceTracker(cfg)
    rng = np.random.default_rng(5)
    for rnd in range(20):
        pids = [f"p{int(i)}" for i in rng.integers(0, 6, 50)]
        if rnd >= 17:
            pids[3] = "*"  # a problem named like the pooled key (row by row there)
        prop = rng.integers(0, 17, 50)
        acc = np.minimum(rng.integers(0, 6, 50), prop)
        exp = (prop[:30] * 0.37).tolist()
        a.expect_many(pids[:30], prop[:30].tolist(), exp)  # some rows have a planned expectation
        for pid, p, e in zip(pids[:30], prop[:30], exp):
            b.expect(pid, int(p), e)
        a.observe_many(pids, prop, acc)
        for pid, p, x in zip(pids, prop.tolist(), acc.tolist()):
            b.observe(pid, p, x)
    np.testing.assert_array_equal(a._by_budget, b._by_budget)
    for pid in ["*"] + [f"p{i}" for i in range(6)]:
        sa, sb = a._stats[pid], b._stats[pid]
        assert (list(sa.recent), sa.n_obs, sa.sum_accepted, sa.sum_expected, sa.sum_matched) == \
            (list(sb.recent), sb.n_obs, sb.sum_accepted, sb.sum_expected, sb.sum_matched)
    assert {k: list(v) for k, v in a._pending.items()} == {k: list(v) for k, v in b._pending.items()}
    ids = ["*", "p1", "nobody", "p3"]
    assert a.calibration_many(ids) == {pid: b.calibration(pid) for pid in ids}
    with pytest.raises(ValueError, match="problem 'q'.*proposed=1, accepted=2"):
        a.observe_many(["ok", "q"], [1, 1], [1, 2])
    assert "ok" not in a._stats  # validated before anything is recorded


def _fill_nodes_by_full_sort(value, acc, m, c_tok, free):
    """allocation._fill_nodes as it was: every node ranked by one stable sort."""
    from das_sglang.core.allocation import FREE_TOKEN_SHARE
    rows, width = acc.shape
    b = np.arange(1, width)
    delta = np.minimum.accumulate(np.where(b[None, :] <= m[:, None], np.diff(acc, axis=1), -np.inf), axis=1)
    flat = (value[:, None] * delta).reshape(-1)
    order = np.argsort(-flat, kind="stable")
    ranked = flat[order]
    positive = int(np.count_nonzero(ranked > FREE_TOKEN_SHARE * c_tok))
    k_free = min(int(free), positive)
    k_paid = int(np.count_nonzero(ranked[k_free:positive] > c_tok))
    take = order[: k_free + k_paid]
    return (np.bincount(take // (width - 1), minlength=rows).astype(np.int32),
            float(ranked[: k_free + k_paid].sum() - c_tok * k_paid))


def test_allocator_fast_paths_equal_the_full_sorts():
    """The per-step allocator's faster selections give the full stable sorts' results, bit
    for bit, ties included (budgets and the float gain; argsort order)."""
    from das_sglang.core.allocation import _fill_nodes, stable_argsort
    rng = np.random.default_rng(11)
    taken = 0
    for trial in range(600):
        rows, width = int(rng.integers(1, 300)), int(rng.integers(2, 18))
        inc = rng.random((rows, width - 1))
        q = [0, 3, 20][trial % 3]
        if q:
            inc = np.round(inc * q) / q  # many equal gains
        acc = np.concatenate([np.zeros((rows, 1)), np.cumsum(inc, axis=1)], axis=1)
        m = rng.integers(0, width, rows)
        value = rng.random(rows) if trial % 4 else np.round(rng.random(rows) * 4) / 4 + 0.25
        c_tok = [0.0, 1e-4, 0.01, 0.1, 0.3][trial % 5]
        free = [0, 5, 50, 500, 1e5][trial % 7 % 5]
        got, want = _fill_nodes(value, acc, m, c_tok, free), _fill_nodes_by_full_sort(value, acc, m, c_tok, free)
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1] == want[1]
        taken += int(want[0].sum() > 0)
        a = np.round(rng.random(int(rng.integers(0, 3000))) * [1, 7, 1000][trial % 3]) / 7
        a[rng.random(len(a)) < 0.01] = np.inf
        np.testing.assert_array_equal(stable_argsort(a), np.argsort(a, kind="stable"))
    assert taken > 300

def test_observe_more_drafts_than_max_budget_counts_in_the_last_bin():
    # a caller reporting more drafts than max_budget (another engine's budget, a bench
    # replaying whole chunks) must not crash the feedback path
    cfg = PolicyConfig(max_budget=16)
    a, b = AcceptanceTracker(cfg), AcceptanceTracker(cfg)
    a.observe_many(["p", "p"], [63, 40], [60, 3])
    b.observe("p", 63, 60)
    b.observe("p", 40, 3)
    np.testing.assert_array_equal(a._by_budget, b._by_budget)
    assert a._stats["p"].n_obs == 2 and a._stats["p"].sum_accepted == 63


@pytest.mark.parametrize("threads", [1, 3])
def test_started_job_shares_its_tasks_and_equals_the_sequential_calls(threads):
    """At RL batch sizes the started job splits the appends into several tasks (per-problem
    buckets plus the shared index's) and the drafts into chunks, taken by its workers and by
    the thread that waits: the indices and trees equal the sequential two calls'."""
    def build():
        return _drafter(9, problems=40, histories=3, history_len=120, requests=600, cold=3, vocab=30,
                        prompt_len=20, global_shard=True)

    (a, rids, _), (b, _, _) = build(), build()
    rng = np.random.default_rng(3)
    toks = [rng.integers(0, 30, int(rng.integers(1, 6))) for _ in rids]
    budgets = rng.integers(0, 17, len(rids)).astype(np.int32)
    steps, weights = a._weights
    args = (0.05, steps, weights, False, 32, a._mix())
    shared_a, shared_b = a._shared(), b._shared()
    assert shared_a[0] is not None  # the shared index is appended to and drafted from
    idx, seq, flat, off = b.prepare_extend(rids, toks)
    extend_batch(idx, seq, flat, off)
    extend_batch([shared_b[0]] * len(idx), seq, flat, off)
    want = draft_rows(idx, seq, budgets, *args, 1, *shared_b)
    idx, seq, flat, off = a.prepare_extend(rids, toks)
    pending = extend_draft_rows_start(idx, seq, flat, off, budgets, *args, threads, 0, *shared_a)
    *got, versions, _ = pending.wait()
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(versions, [ix.version for ix in idx])
    assert len(got[0]) > 2000 and (np.diff(got[4]) > 0).sum() > 300
    # a job never waited for is joined when dropped; the indices are then complete
    more = [rng.integers(0, 30, 2) for _ in rids]
    extend_draft_rows_start(*a.prepare_extend(rids, more), budgets, *args, threads, 0, *shared_a)
    b.extend_batch(rids, more)
    _same_sequences(a, b, rids[:50])


def _thread_nices() -> list[int]:
    out = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                out.append(int(f.read().rpartition(")")[2].split()[16]))  # field 19: nice
        except (OSError, ValueError, IndexError):
            pass  # (a thread that just ended)
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_a_started_job_runs_its_workers_at_the_background_nice_value():
    from das_sglang.native import background_nice, set_background_nice

    with pytest.raises(ValueError, match="invalid nice=20"):
        set_background_nice(20)
    d, rids, rng = _drafter(7, requests=300)
    before = background_nice()
    set_background_nice(7)
    try:
        assert 7 not in _thread_nices()
        # a long job (60k appends + 300 drafts): its workers are seen while it runs (polled:
        # on a loaded host a worker may take a while to be scheduled and set its value)
        done = d.start_extend(d.prepare_extend(rids, [rng.integers(0, 12, 200) for _ in rids]), 16)
        deadline = time.monotonic() + 5.0
        seen = False
        while not seen and time.monotonic() < deadline:
            seen = 7 in _thread_nices()
        done()
        assert seen
        assert os.getpriority(os.PRIO_PROCESS, 0) == 0  # this (the caller's) thread keeps its own
    finally:
        set_background_nice(before)


def _threads_at_nice(nice: int) -> set[str]:
    out = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                if int(f.read().rpartition(")")[2].split()[16]) == nice:
                    out.add(tid)
        except (OSError, ValueError, IndexError):
            pass
    return out


def _twin_drafters(seed: int, requests: int):
    """Two equal drafters -- ``a`` for started jobs, ``b`` for the sequential calls -- their
    rows, and the draft arguments after the budgets."""
    (a, rids, _), (b, _, _) = _drafter(seed, requests=requests), _drafter(seed, requests=requests)
    steps, weights = a._weights
    return a, b, rids, (0.05, steps, weights, False, 32, a._mix())


def _sequential(b, rids, toks, budgets, args):
    """A started job's step as the two sequential calls on ``b``: its trees."""
    idx, seq, flat, off = b.prepare_extend(rids, toks)
    extend_batch(idx, seq, flat, off)
    return draft_rows(idx, seq, budgets, *args, 1)


def _same_sequences(a, b, rids) -> None:
    for r in rids:
        np.testing.assert_array_equal(a._indices[a._live[r].problem_id].sequence_tokens(a._live[r].seq_id),
                                      b._indices[b._live[r].problem_id].sequence_tokens(b._live[r].seq_id))


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_started_jobs_reuse_kept_threads():
    """Started jobs run on a kept pool of threads, not one new thread per job (a thread made
    per job started at the caller's priority and could take its core for a time slice):
    after each of many jobs the threads that ran it, at the background nice value, are
    still there (idle), the pool made no more, and every job's result equals the sequential
    calls'."""
    from das_sglang.native import background_nice, background_threads, set_background_nice

    a, b, rids, args = _twin_drafters(5, 200)
    rng = np.random.default_rng(5)
    budgets = rng.integers(0, 9, len(rids)).astype(np.int32)
    before = background_nice()
    set_background_nice(19)
    try:
        kept = []
        for _ in range(6):
            toks = [rng.integers(0, 12, 3) for _ in rids]
            *got, _, _ = extend_draft_rows_start(*a.prepare_extend(rids, toks), budgets, *args, 2, 0).wait()
            for x, y in zip(got, _sequential(b, rids, toks, budgets, args)):
                np.testing.assert_array_equal(x, y)
            kept.append((_threads_at_nice(19), background_threads()))
    finally:
        set_background_nice(before)
    assert kept[0][0] and kept[0][1] >= 2, kept  # the job's worker threads outlive it
    # the next jobs run on the kept threads: none is made, none goes away (which idle
    # thread takes a task varies)
    assert all(n == kept[0][1] for _, n in kept), kept
    assert all(x <= y for (x, _), (y, _) in zip(kept, kept[1:])), kept


def _allowed_cpus(tid: str) -> set[int] | None:
    try:
        with open(f"/proc/self/task/{tid}/status") as f:
            line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
    except (OSError, StopIteration):
        return None
    out = set()
    for part in line.split(":", 1)[1].strip().split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/task") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux /proc and two allowed CPUs")
def test_a_started_job_keeps_off_the_submitting_core():
    """A pool thread woken for a job is placed next to the thread that woke it (the
    scheduler thread, whose Python runs next): while it works on the job it is allowed
    every CPU but one -- the submitter's -- and afterwards its whole mask again."""
    from das_sglang.native import background_nice, set_background_nice

    d, rids, rng = _drafter(7, requests=300)
    allowed = os.sched_getaffinity(0)
    before = background_nice()
    set_background_nice(6)
    try:
        d.start_extend(d.prepare_extend(rids, [rng.integers(0, 12, 3) for _ in rids]), 4)()  # (the pool exists)
        done = d.start_extend(d.prepare_extend(rids, [rng.integers(0, 12, 200) for _ in rids]), 16)
        seen = []
        deadline = time.monotonic() + 5.0
        while not seen and time.monotonic() < deadline:
            for tid in _threads_at_nice(6):
                cpus = _allowed_cpus(tid)
                if cpus is not None and cpus != allowed:
                    seen.append((tid, cpus))
        done()
        assert seen, "no pool thread was seen keeping off a core"
        tid, cpus = seen[0]
        assert cpus < allowed and len(allowed - cpus) == 1
        deadline = time.monotonic() + 5.0
        while _allowed_cpus(tid) not in (allowed, None) and time.monotonic() < deadline:
            time.sleep(0.001)  # (the thread restores its mask right after its task)
        assert _allowed_cpus(tid) in (allowed, None)
    finally:
        set_background_nice(before)


def test_started_jobs_dropped_waited_and_renice_keep_the_indices_exact():
    """Jobs on the kept pool, many in a row with 1-4 threads each: waited at once, waited
    late, or dropped unwaited (completed by the drop), while the background nice value
    goes up and down (a pool thread that may not lower its value again -- no
    CAP_SYS_NICE -- is replaced): every waited result and the final indices equal the
    sequential calls'."""
    from das_sglang.native import background_nice, background_threads, set_background_nice

    a, b, rids, args = _twin_drafters(8, 150)
    rng = np.random.default_rng(8)
    budgets = rng.integers(0, 9, len(rids)).astype(np.int32)
    before = background_nice()
    try:
        for it in range(60):
            set_background_nice(int(rng.choice([0, 4, 9, 19])))
            toks = [rng.integers(0, 12, 2) for _ in rids]
            pending = extend_draft_rows_start(*a.prepare_extend(rids, toks), budgets, *args,
                                              int(rng.integers(1, 5)), int(rng.integers(0, 9)))
            want = _sequential(b, rids, toks, budgets, args)
            if it % 3 == 0:
                del pending
                continue
            if it % 3 == 1:
                time.sleep(0.0005)
            *got, _, _ = pending.wait()
            for x, y in zip(got, want):
                np.testing.assert_array_equal(x, y)
    finally:
        set_background_nice(before)
    # the pool stays about as wide as the widest job (not a thread per queued task or per
    # change of the nice value)
    assert background_threads() <= 8
    _same_sequences(a, b, rids)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_runs_started_jobs():
    """A process forked after the pool made its threads (SGLang's launchers fork) starts
    with an empty pool of its own: its jobs complete, they do not wait on threads that
    exist only in the parent, and the child makes pool threads of its own (fork copies
    only the forking thread: without them every job would run on its caller alone)."""
    a, b, rids, args = _twin_drafters(6, 100)
    budgets = np.full(len(rids), 4, np.int32)
    toks = [np.array([1, 2, 3])] * len(rids)
    extend_draft_rows_start(*a.prepare_extend(rids, toks), budgets, *args, 2, 0).wait()  # the pool exists
    _sequential(b, rids, toks, budgets, args)
    toks2 = [np.array([4, 5])] * len(rids)
    pid = os.fork()
    if pid == 0:  # the child: one job, then exit with its verdict (never back into pytest)
        code = 1
        try:
            *got, _, _ = extend_draft_rows_start(*a.prepare_extend(rids, toks2), budgets, *args, 2, 0).wait()
            want = _sequential(b, rids, toks2, budgets, args)
            code = 0 if all(np.array_equal(x, y) for x, y in zip(got, want)) else 2
            if code == 0 and os.path.exists("/proc/self/task") and len(os.listdir("/proc/self/task")) < 2:
                code = 3  # no pool thread of the child's own: the job never had one
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60.0
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's started job never finished")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0


def test_calibration_rows_are_calibration_per_problem():
    """The plan's per-row factors (one gather from the tracker's sums table) are
    ``calibration(pid)`` bit for bit: past the table's first growth (more than 64
    problems), after forgotten problems' rows are reused by new ones, for the pooled key
    and unknown problems (the prior), and for a list changed in place since the last read."""
    cfg = PolicyConfig(max_budget=8)
    t = AcceptanceTracker(cfg)
    rng = np.random.default_rng(11)

    def feed(pids):
        prop = rng.integers(1, 9, len(pids))
        t.expect_many(pids, prop.tolist(), (prop * rng.random(len(pids))).tolist())
        t.observe_many(pids, prop, np.minimum(rng.integers(0, 5, len(pids)), prop))

    for _ in range(5):
        feed([f"p{int(i)}" for i in rng.integers(0, 100, 300)])
    ids = [f"p{i}" for i in range(0, 120, 3)] + ["*", "nobody"]
    for _ in range(2):  # (the second read: the kept slots)
        got = t.calibration_rows(ids)
        assert got.tolist() == [t.calibration(p) for p in ids]
    t.forget([f"p{i}" for i in range(0, 50)])
    feed([f"new{i}" for i in range(30)])  # reuse the freed rows
    ids[0] = "new3"  # in place: the same list object
    got = t.calibration_rows(ids)
    assert got.tolist() == [t.calibration(p) for p in ids]
    assert got[0] != t.calibration("p0")  # the forgotten problem reads the prior now
    assert t.calibration("p0") == t.calibration("nobody")
    assert t.calibration_many(ids) == dict(zip(ids, got.tolist()))


def test_row_inputs_of_a_few_rows_are_the_batch_path_bit_for_bit():
    """A step's few new rows read their calibration factors per problem (the plan adopted
    from the feedback's job, ``_adopt_kept``): the same floats as the batch path's gather,
    for known, unknown and pooled problems, and the batch's memos untouched."""
    from das_sglang.core.policy import LengthAware

    pol = LengthAware(config=PolicyConfig(max_budget=8))
    rng = np.random.default_rng(5)
    for _ in range(4):
        pids = [f"p{int(i)}" for i in rng.integers(0, 40, 200)]
        prop = rng.integers(1, 9, len(pids))
        pol.acceptance.expect_many(pids, prop.tolist(), (prop * rng.random(len(pids))).tolist())
        pol.observe_verify_many(pids, prop, np.minimum(rng.integers(0, 5, len(pids)), prop))
        for pid in pids[:20]:
            pol.observe_finished(pid, int(rng.integers(50, 900)))
    batch = [f"p{i}" for i in range(40)]
    gen = rng.integers(0, 300, 40)
    pol._row_inputs(batch, gen, np.full(40, 1024), np.full(40, 100))  # (the batch's memo)
    memo = pol.acceptance._slots_memo
    few = ["p3", "p3", "nobody", "*", "p17"]
    g, m, pl = np.array([0, 5, 9, 0, 40]), np.full(5, 1024), np.array([30, 30, 12, 7, 50])
    assert len(few) <= LengthAware.FEW_ROWS
    got = pol._row_inputs(few, g, m, pl)
    assert pol.acceptance._slots_memo is memo  # (the per-problem path leaves it)
    try:
        LengthAware.FEW_ROWS = 0  # the batch path
        want = pol._row_inputs(few, g, m, pl)
    finally:
        LengthAware.FEW_ROWS = 16
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.tolist() == b.tolist()
    assert got[0][0] != got[0][2]  # (a known problem's factor is not the prior)


def test_positions_are_the_dict_lookups_they_replace():
    """``drafter._positions`` (where the plan finds its rows among the pre-drafted ones) is
    ``dict(zip(keys, range(n)))`` lookups: the last of a repeated key, -1 when absent."""
    from itertools import repeat

    from das_sglang.core.drafter import _positions

    rng = np.random.default_rng(3)
    for n_keys, n_q in [(0, 5), (1, 3), (50, 80), (512, 512)]:
        keys = rng.integers(0, max(2 * n_keys, 1), n_keys).astype(np.int64)  # (repeats)
        queries = rng.integers(-2, 2 * n_keys + 2, n_q).astype(np.int64)
        pos = dict(zip(keys.tolist(), range(n_keys)))
        want = np.fromiter(map(pos.get, queries.tolist(), repeat(-1, n_q)), np.int64, n_q)
        got = _positions(keys, queries)
        assert got.dtype == np.int64 and got.tolist() == want.tolist()
    assert len(set(keys.tolist())) < len(keys) and (want >= 0).any() and (want < 0).any()


def test_index_versions_is_every_indexs_version():
    from das_sglang.native import SuffixIndex, index_versions

    a, b = SuffixIndex(8), SuffixIndex(8)
    a.add_sequence(1, np.array([1, 2, 3], np.int32), 0)
    got = index_versions([a, b, a])
    assert got.dtype == np.uint64 and got.tolist() == [a.version, b.version, a.version]
    assert a.version != b.version
    with pytest.raises(ValueError, match="item 1 is not a SuffixIndex"):
        index_versions([a, "b"])
    assert index_versions([None, a]).tolist() == [0, a.version]  # (a placeholder row)


def iter_seq(items):
    """A sequence that is neither a list nor a tuple."""
    from collections import deque

    return deque(items)


@pytest.mark.parametrize("seed", range(3))
def test_row_map_is_the_dict_lookup_and_set_size(seed):
    """``native.row_map(prev, new)`` gives what ``dict(zip(prev, range(len(prev))))`` lookups
    (-1 where absent: a repeated item's last row) and ``len(set(new)) == len(new)`` give,
    for strings, ints, equal-but-distinct objects and hash collisions; ``gather_list`` is
    the list gather with a fill; bad input raises naming it."""
    from das_sglang.native import gather_list, row_map

    class Clash:  # (every instance hashes alike: equality decides)
        def __init__(self, v):
            self.v = v

        def __hash__(self):
            return 7

        def __eq__(self, other):
            return isinstance(other, Clash) and other.v == self.v

    rng = np.random.default_rng(seed)
    for make in (lambda v: f"r{v}", int, lambda v: "".join(["x", str(v)]), Clash):
        for n_prev, n_new in ((0, 5), (40, 0), (300, 320), (9, 9)):
            prev = [make(int(v)) for v in rng.integers(0, 400, n_prev)]
            new = [make(int(v)) for v in rng.integers(0, 400, n_new)]
            want = dict(zip(prev, range(len(prev))))
            at, unique = row_map(prev, new)
            assert at.dtype == np.int64 and at.tolist() == [want.get(x, -1) for x in new]
            assert unique == (len(set(new)) == len(new))
    # by identity (the worker's Req lists, read in place: no item is touched), from lists,
    # tuples or any sequence alike: the dict of the objects' ids
    objs = [object() for _ in range(400)]
    for n_prev, n_new in ((0, 5), (40, 0), (300, 320), (9, 9)):
        prev = [objs[int(v)] for v in rng.integers(0, 400, n_prev)]
        new = [objs[int(v)] for v in rng.integers(0, 400, n_new)]
        want = {id(x): i for i, x in enumerate(prev)}
        ref = ([want.get(id(x), -1) for x in new], len({id(x) for x in new}) == len(new))
        fresh = [i for i, x in enumerate(new) if id(x) not in want]
        for a, b in ((prev, new), (tuple(prev), new), (prev, tuple(new)), (iter_seq(prev), iter_seq(new))):
            at, unique = row_map(a, b, identity=True)
            assert (at.tolist(), unique) == ref
            # (fresh=True: also the rows absent from prev, from the same pass -- lists take
            # the one-table path, other sequences the general one)
            at, unique, got = row_map(a, b, identity=True, fresh=True)
            assert (at.tolist(), unique) == ref and got.dtype == np.int64 and got.tolist() == fresh
    with pytest.raises(ValueError, match="fresh=True is for identity=True"):
        row_map([1], [1], fresh=True)
    ids = [f"r{i}" for i in range(6)]
    assert row_map(ids, ids[::-1])[0].tolist() == [5, 4, 3, 2, 1, 0]
    assert row_map(ids, ids + ["r0"]) [1] is False
    assert gather_list(ids, np.array([2, -1, 0], np.int64), None) == ["r2", None, "r0"]
    with pytest.raises(ValueError, match=r"at\[1\]=6 is out of range for 6 items"):
        gather_list(ids, np.array([0, 6], np.int64), None)
    with pytest.raises(TypeError):
        row_map(ids, [["unhashable"]])

    class Clears(Clash):  # (an __eq__ that empties the caller's list mid-call)
        __hash__ = Clash.__hash__

        def __eq__(self, other):
            victim.clear()
            return super().__eq__(other)

    victim = [Clears(v) for v in range(50)]
    probe = [Clears(v) for v in (3, 60, 49)]
    assert row_map(victim, probe)[0].tolist() == [3, -1, 49] and victim == []  # (the lists as passed)


@pytest.mark.parametrize("seed", range(4))
def test_ahead_rows_is_its_numpy_reading_of_a_row_map(seed):
    """native.ahead_rows (the plan adopted for kept rows, _adopt_kept) is the numpy it
    replaced: whether some row is kept with the job's generated count and none of them
    skipped, max(at, 0), the new rows, the job's rows no row maps to."""
    from das_sglang.native import ahead_rows

    rng = np.random.default_rng(seed)
    n_old, n = int(rng.integers(1, 40)), int(rng.integers(1, 40))
    at = np.full(n, -1, np.int64)
    take = rng.permutation(n_old)[: min(n_old, n)]
    at[rng.permutation(n)[: len(take)]] = take
    at[rng.random(n) < 0.3] = -1
    old_gen = rng.integers(0, 50, n_old).astype(np.int64)
    gen = np.where(at >= 0, old_gen[np.maximum(at, 0)], rng.integers(0, 50, n)).astype(np.int64)
    for case in range(4):
        g, skipped = gen.copy(), None
        kept = at >= 0
        if case == 1 and kept.any():  # a kept row's count moved
            g[np.flatnonzero(kept)[0]] += 1
        if case >= 2:
            skipped = rng.random(n_old) < 0.2
            if case == 3 and kept.any():  # a kept row the job took for finishing
                skipped[at[np.flatnonzero(kept)[-1]]] = True
        ok, src, fresh, left = ahead_rows(at, old_gen, g, skipped)
        stays = np.zeros(n_old, bool)
        stays[at[kept]] = True
        want_ok = bool(kept.any() and np.array_equal(old_gen[at[kept]], g[kept])
                       and (skipped is None or not skipped[at[kept]].any()))
        assert ok == want_ok
        assert src.tolist() == np.maximum(at, 0).tolist()
        assert fresh.tolist() == np.flatnonzero(~kept).tolist()
        assert left.tolist() == np.flatnonzero(~stays).tolist()
    with pytest.raises(ValueError, match="at\\[0\\]=99"):
        ahead_rows(np.array([99] + [-1] * (n - 1), np.int64), old_gen, gen, None)
    with pytest.raises(ValueError, match="generated counts"):
        ahead_rows(at, old_gen, gen[:-1], None)
    with pytest.raises(ValueError, match="skipped has"):
        ahead_rows(at, old_gen, gen, np.zeros(n_old + 1, bool))
    with pytest.raises(ValueError, match="int64"):
        ahead_rows(at.astype(np.int32), old_gen, gen, None)


def test_shared_row_map_reuses_a_map_only_for_equal_lists():
    """``budget_rows.shared_row_map`` (one map per step for every part that keeps per-row
    values) is ``row_map``'s result, reused for lists equal to a recent pair's -- copies,
    or the same lists unchanged -- and never for a list changed in place since; the map is
    read-only, and ``kept_rows`` with ended ids marks them on a copy, leaving it intact."""
    import das_sglang.core.budget_rows as R
    from das_sglang.native import row_map

    calls = []
    real = R.row_map
    R.row_map = lambda a, b: calls.append(1) or real(a, b)
    try:
        prev = [f"q{i}" for i in range(100)]
        new = prev[:50] + ["fresh"] + prev[51:]
        back, unique = R.shared_row_map(prev, new)
        assert back.tolist() == row_map(prev, new)[0].tolist() and unique
        assert not back.flags.writeable
        again, _ = R.shared_row_map(list(prev), list(new))  # (copies: the same ids)
        assert again is back and len(calls) == 1
        other = prev[::-1]
        R.shared_row_map(prev, other)
        assert R.shared_row_map(prev, new)[0] is back and len(calls) == 2  # (a few are kept)
        new[0] = "changed"  # in place: the same list object
        moved, _ = R.shared_row_map(prev, new)
        assert moved is not back and moved.tolist() == row_map(prev, new)[0].tolist() and len(calls) == 3
        kept, _ = R.kept_rows(prev, new, {"q1"})
        assert kept[1] == -1 and moved[1] == 1  # the memo's map is untouched
        r = R.regather(prev, np.arange(100), new, {"changed": -5}.get, 0)
        assert r[0] == -5 and r[50] == 0 and r[1] == 1 and len(calls) == 4  # (drop's map; the pair is kept)
    finally:
        R.row_map = real


def test_spread_is_concat_with_empty_rows_then_take():
    """``DraftBatch.spread`` (a plan's drafted rows placed among the empty rows of requests
    whose starts are still deferred) gives what ``concat([batch, empty(1)]).take(...)``
    gives, without copying the nodes; bad targets are refused."""
    rng = np.random.default_rng(7)
    trees = []
    for _ in range(9):
        k = int(rng.integers(0, 6))
        trees.append(DraftTree(rng.integers(0, 50, k).astype(np.int32),
                               np.array([int(rng.integers(-1, j)) for j in range(k)], np.int32),
                               np.sort(rng.random(k))[::-1].copy(), match_len=int(rng.integers(0, 9))))
    batch = DraftBatch.from_trees(trees)
    rows = np.sort(rng.choice(14, 9, replace=False))
    at = np.full(14, 9, np.int64)
    at[rows] = np.arange(9)
    want = DraftBatch.concat([batch, DraftBatch.empty(1)]).take(at)
    got = batch.spread(rows, 14)
    for f in ("tokens", "parents", "probs", "depths", "offsets", "match_len"):
        a, b = np.asarray(getattr(got, f)), np.asarray(getattr(want, f))
        assert a.dtype == b.dtype and a.tolist() == b.tolist(), f
    assert got.tokens is batch.tokens  # (no copy)
    with pytest.raises(ValueError, match="must increase"):
        batch.spread(rows[::-1], 14)
    with pytest.raises(ValueError, match="9 target rows|target rows"):
        batch.spread(rows[:5], 14)


@pytest.mark.parametrize("threads", [1, 3])
def test_batches_interleaving_indexes_equal_row_by_row_drafts(threads):
    """A batch whose rows interleave many problems' indexes is drafted grouped by index
    (native ``index_order``: siblings' reads share the cache) and handed back in row order:
    every row's tree, depth and match length equal the row drafted alone (one-row calls
    are never reordered), through draft_batch, draft_rows and the started extend job."""
    d, rids, rng = _drafter(11, problems=10, requests=200, global_shard=True)
    rows = list(rng.permutation(rids)[:96])  # interleaved problems, 96 rows >= the 16 it needs
    assert len({d._live[r].problem_id for r in rows[:16]}) > 4
    budgets = rng.integers(0, 17, len(rows)).astype(np.int32)
    _, idx, seq = d._rows(rows)
    steps, weights = d._weights
    args = (0.05, steps, weights, False, 32, d._mix())
    # (the job first: its appends, empty here, still touch the indexes' state the drafts read)
    pending = extend_draft_rows_start(idx, seq, np.zeros(0, np.int32), np.zeros(len(rows) + 1, np.int64),
                                      budgets, *args, threads, 0, *d._shared())
    *started, _, _ = pending.wait()
    alone = [draft_rows([ix], seq[i:i + 1], budgets[i:i + 1], *args, 1, *d._shared())
             for i, ix in enumerate(idx)]
    whole = draft_rows(idx, seq, budgets, *args, threads, *d._shared())
    batch = draft_batch(idx, seq, budgets, *args, *d._shared())
    for out in (whole, started):
        tokens, parents, probs, depths, offsets, match = out
        assert len(tokens) > 300
        for i, one in enumerate(alone):
            a, z = offsets[i], offsets[i + 1]
            for got, want in zip((tokens[a:z], parents[a:z], probs[a:z], depths[a:z]), one[:4]):
                np.testing.assert_array_equal(got, want)
            assert match[i] == one[5][0]
    for x, y in zip(batch, (whole[0], whole[1], whole[2], whole[4], whole[5])):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("global_shard", [False, True])
def test_skipped_rows_get_empty_trees_and_are_looked_up_alone_once_registered(global_shard):
    """speculate_flat(skip=...) (a plan with deferred starts): the skipped rows' trees are
    empty, registered or not, the others' those of drafting them alone; the feedback's
    extend of the same list then looks up only the placeholders (registered meanwhile),
    and the rows it resolves are those of a fresh lookup. A row outside ``skip`` that is
    unknown still raises, naming it."""
    d, rids, rng = _drafter(requests=80, global_shard=global_shard)
    budgets = rng.integers(0, 17, 83)
    batch = rids[:40] + ["n0"] + rids[40:79] + ["n1", "r79"] + ["n2"]  # n*: started later
    skip = {"n0", "n1", "n2", "r79"}  # (r79 is registered: skipped all the same)
    got = d.speculate_flat(batch, budgets, skip=skip)
    keep = [i for i, r in enumerate(batch) if r not in skip]
    alone = d.speculate_flat([batch[i] for i in keep], budgets[keep])
    assert sum(alone.lens()) > 100
    _same_batch(got.take(np.array(keep)), alone)
    assert all(got.lens()[i] == 0 for i, r in enumerate(batch) if r in skip)
    looked_up = []
    request = d._request
    d._request = lambda r: looked_up.append(r) or request(r)
    for k, r in enumerate(("n0", "n1", "n2")):
        d.start_request(r, f"p{k}", rng.integers(0, 12, 30))
    d._rows(batch, skip)  # (with skip: placeholders again, built afresh)
    lives, idx, seq_ids = d._rows(list(batch))
    assert sorted(looked_up) == ["n0", "n1", "n2", "r79"]
    d._rows_memo = None
    fresh = d._rows(list(batch))
    assert lives == fresh[0] and idx == fresh[1] and seq_ids.tolist() == fresh[2].tolist()
    with pytest.raises(ValueError, match="unknown req_id='zz'"):
        d.speculate_flat(batch[:5] + ["zz"], 4, skip={"n0"})


def test_rows_memo_outlives_other_requests_ends_not_its_own():
    """A batch's resolved rows stay valid while requests outside it start and end (a step's
    finishes are handed over after its plan); the end of one of its own requests, or that
    id coming back as another request, makes it stale."""
    d, rids, rng = _drafter(requests=30)
    batch = rids[:20]
    memo_rows = d._rows(list(batch))
    d.finish_request("r25")
    d.start_request("x1", "p1", rng.integers(0, 12, 30))
    assert d._rows(list(batch))[2] is memo_rows[2]  # (the memo's own array: not looked up again)
    d.finish_request("r3")
    d.start_request("r3", "p5", rng.integers(0, 12, 30))
    lives, idx, seq_ids = d._rows(list(batch))
    assert seq_ids is not memo_rows[2] and lives[3] is d._live["r3"] and lives[3].problem_id == "p5"
    assert seq_ids[3] == d._live["r3"].seq_id != memo_rows[2][3]


@pytest.mark.parametrize("seed", [0, 1])
def test_rows_through_the_memo_equal_rows_looked_up(seed):
    """From ROWMAP_MIN_ROWS rows on, a changed batch's rows are gathered from the memo
    (``_rows_from``): rows moved, new ones, placeholders (``skip``), a request that ended
    and an id that came back as another request resolve as a fresh lookup does; an ended
    request still in the rows raises, naming it."""
    d, rids, rng = _drafter(seed, requests=160)
    fresh, _, _ = _drafter(seed, requests=160)  # (the same drafter: looked up row by row)
    fresh.ROWMAP_MIN_ROWS = 10**9
    batch = rids[:100]
    d._rows(list(batch))
    for k in range(6):
        gone = batch[int(rng.integers(0, len(batch)))]
        for x in (d, fresh):
            x.finish_request(gone)
        batch = [r for r in batch if r != gone]
        if k % 2:  # the id comes back as another problem's request
            prompt = rng.integers(0, 12, 30)
            for x in (d, fresh):
                x.start_request(gone, "p3", prompt)
            batch.append(gone)
        shift = int(rng.integers(0, len(batch)))
        batch = batch[shift:] + batch[:shift] + rids[100 + 3 * k: 103 + 3 * k]
        skip = set(batch[-2:]) if k == 4 else None
        got, want = d._rows(list(batch), skip), fresh._rows(list(batch), skip)
        assert [(lv.problem_id, lv.seq_id) for lv in got[0]] == [(lv.problem_id, lv.seq_id) for lv in want[0]]
        assert all(lv is d._live[r] for r, lv in zip(batch, got[0]) if not skip or r not in skip)
        assert got[1] == [None if lv.index is None else d._indices[lv.problem_id] for lv in got[0]]
        assert got[2].tolist() == want[2].tolist()
        assert (got[2] < 0).sum() == (2 if skip else 0)
    with pytest.raises(ValueError, match="unknown req_id='r1'"):
        d.finish_request("r1")
        d._rows(["r1"] + batch[:80])


@pytest.mark.parametrize("seed", [0, 1])
def test_native_select_equals_numpy_take_truncate(seed):
    """DraftBatch.take / take_rows / truncate natively (native.draft_select) give the numpy
    reference's arrays (dtypes included), for any rows (repeats, -1 holes) and budgets
    (per row, a scalar, negative, past the tree), and a truncate that cuts nothing returns
    the batch itself either way."""
    d, rids, rng = _drafter(seed, requests=60)
    out = d.speculate_flat(rids, rng.integers(0, 17, 60))
    assert out._native_ok() and sum(out.lens()) > 200
    cases = [("take", rng.integers(0, 60, 90)), ("take", np.zeros(0, np.int64)),
             ("take_rows", np.where(rng.random(70) < 0.2, -1, rng.integers(0, 60, 70))),
             ("truncate", rng.integers(-2, 20, 60)), ("truncate", 3), ("truncate", np.full(60, 99))]
    for name, arg in cases:
        DraftBatch.NATIVE = True
        try:
            got = getattr(out, name)(arg)
        finally:
            DraftBatch.NATIVE = False
        try:
            want = getattr(out, name)(arg)
        finally:
            DraftBatch.NATIVE = True
        _same_batch(got, want)
        for f in ("tokens", "parents", "probs", "depths", "offsets"):
            assert getattr(got, f).dtype == getattr(want, f).dtype, (name, f)
        assert np.asarray(got.match_len).dtype == np.asarray(want.match_len).dtype
        if name == "truncate" and not isinstance(arg, int) and (arg >= 17).all():
            assert got is out and want is out
    with pytest.raises(ValueError, match="rows"):
        out.take_rows(np.array([0, 60]))


@pytest.mark.parametrize("seed", [0, 1])
def test_rows_of_is_take_rows_made_when_read_and_truncated_in_one_pass(seed):
    """draft_tree.RowsOf (the drafter's reused trees gathered by row, made when first read):
    its length without making it, its arrays, lens and rows as take_rows gives them once
    read, and a truncate before any read -- one pass from the source -- the gather's
    truncate (rows with -1 holes, repeats, budgets per row, scalar, negative, past the tree);
    the probability check covers the rows' nodes without making it."""
    from das_sglang.core.draft_tree import RowsOf

    d, rids, rng = _drafter(seed, requests=60)
    src = d.speculate_flat(rids, rng.integers(0, 17, 60))
    rows = np.where(rng.random(70) < 0.2, -1, rng.integers(0, 60, 70))
    want = src.take_rows(rows)
    for keep in (rng.integers(-2, 20, 70), 3, np.full(70, 99)):
        lazy = RowsOf(src, rows)
        assert len(lazy) == 70 and not lazy._made
        assert lazy.probs_in_range() and not lazy._made
        got = lazy.truncate(keep)
        assert not lazy._made and type(got) is DraftBatch
        _same_batch(got, want.truncate(keep))
    lazy = RowsOf(src, rows)
    assert lazy.lens().tolist() == want.lens().tolist() and lazy._made
    _same_batch(lazy, want)
    assert lazy[5].tokens.tolist() == want[5].tokens.tolist() and lazy.width == want.width
    _same_batch(lazy.truncate(np.full(70, 4)), want.truncate(np.full(70, 4)))  # (made: DraftBatch's)
    assert lazy.probs_in_range() and lazy.probs_ok


def test_native_from_padded_equals_numpy_and_bad_rows_are_named():
    """TokenRows.from_padded natively (native.padded_rows, int64 and int32 arrays) gives the
    numpy reference's rows; a bad length or token id falls back to the numpy path, whose
    error names it."""
    from das_sglang.core.drafter import TokenRows

    rng = np.random.default_rng(3)
    for dtype in (np.int64, np.int32):
        tokens = rng.integers(0, 150_000, (64, 17)).astype(dtype)
        lens = rng.integers(0, 18, 64)
        got = TokenRows.from_padded(tokens, lens)
        TokenRows.NATIVE = False
        try:
            want = TokenRows.from_padded(tokens, lens)
        finally:
            TokenRows.NATIVE = True
        assert got.flat.dtype == want.flat.dtype == np.int32 and got.offsets.dtype == np.int64
        np.testing.assert_array_equal(got.flat, want.flat)
        np.testing.assert_array_equal(got.offsets, want.offsets)
        np.testing.assert_array_equal(got.lens(), want.lens())
        assert [r.tolist() for r in got] == [list(t[:k]) for t, k in zip(tokens.tolist(), lens)]
    tokens = np.ones((3, 4), np.int64)
    with pytest.raises(ValueError, match="invalid length 5 in row 1"):
        TokenRows.from_padded(tokens, [1, 5, 0])
    tokens[2, 1] = -7
    with pytest.raises(ValueError, match="invalid token id -7 in row 2"):
        TokenRows.from_padded(tokens, [1, 4, 2])
    tokens[2, 1] = 2**31
    with pytest.raises(ValueError, match="invalid token id 2147483648 in row 2"):
        TokenRows.from_padded(tokens, [1, 4, 2])
    assert TokenRows.from_padded(tokens, [1, 4, 1]).flat.tolist() == [1, 1, 1, 1, 1, 1]


def test_native_select_refuses_bad_input_naming_it():
    """native.draft_select checks what it copies with before copying: bad rows, a keep of
    the wrong length, offsets that do not span the nodes or that decrease, wrong dtypes."""
    from das_sglang.native import draft_select

    d, rids, _ = _drafter(7, requests=10)
    b = d.speculate_flat(rids, 16)
    args = [b.offsets, None, None, b.tokens, b.parents, b.probs, b.depths, b.match_len]

    def call(**kw):
        names = ["offsets", "rows", "keep", "tokens", "parents", "probs", "depths", "match"]
        a = list(args)
        for k, v in kw.items():
            a[names.index(k)] = v
        return draft_select(*a)

    assert sum(b.lens()) > 20 and call(keep=np.full(10, 99, np.int64)) == ()
    keep = np.arange(10, dtype=np.int64) % 4
    *arrays, lens, width = call(rows=np.array([3, -1, 0, 3, 9, 1, 2, 4, 5, 6], np.int64), keep=keep)
    want = b.take_rows(np.array([3, -1, 0, 3, 9, 1, 2, 4, 5, 6])).truncate(keep)
    assert lens.tolist() == np.diff(want.offsets).tolist() and width == max(lens.tolist())
    cut = b.truncate(np.full(10, 2))  # (lens and width as counted by the select)
    assert cut._lens is not None and cut.width == int(np.diff(cut.offsets).max()) and cut.lens().tolist() == \
        np.diff(cut.offsets).tolist()
    with pytest.raises(ValueError, match=r"invalid rows\[1\]=10"):
        call(rows=np.array([0, 10], np.int64))
    with pytest.raises(ValueError, match=r"invalid rows\[0\]=-2"):
        call(rows=np.array([-2], np.int64))
    with pytest.raises(ValueError, match="keep has 3 entries for 10 rows"):
        call(keep=np.zeros(3, np.int64))
    bad = b.offsets.copy()
    bad[-1] += 1
    with pytest.raises(ValueError, match="offsets must run from 0"):
        call(offsets=bad)
    lens = b.lens()
    r = int(np.flatnonzero(lens > 1)[0])
    bad = b.offsets.copy()
    bad[r + 1] = bad[r] - 1  # a row of negative length
    with pytest.raises(ValueError, match="must not decrease"):
        call(offsets=bad)
    with pytest.raises(ValueError, match="tokens: expected a 1-D contiguous int32"):
        call(tokens=b.tokens.astype(np.int64))
    with pytest.raises(ValueError, match="one entry per node"):
        call(probs=b.probs[:-1])


def test_as_tokens_fast_path_equals_numpys():
    """``as_tokens`` converts a list / tuple of Python ints, or a 1-D buffer of 32- / 64-bit
    ints (SGLang's ``array("q")`` of output ids, an int64 numpy array), in one C pass
    (``native.int32_tokens``): the same int32 array as numpy's conversion; anything else
    (bools, numpy scalars, out-of-range ids, nested lists, floats, strided or 2-D arrays,
    other item sizes) takes the numpy path, which converts it or raises naming the bad
    value."""
    from array import array

    from das_sglang.core.drafter import as_tokens
    from das_sglang.native import int32_tokens

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 2**31 - 1, 300).tolist() + [0, 2**31 - 1]
    for seq in (ids, tuple(ids), [], [7], array("q", ids), array("q"), array("l", ids), array("i", ids),
                np.array(ids, np.int64), np.array(ids, np.int32).astype(np.intc)):
        got = as_tokens(seq, "t")
        assert got.dtype == np.int32 and got.tolist() == list(seq)
        assert int32_tokens(seq) is not None and int32_tokens(seq).tolist() == list(seq)
    for odd in ([True, 2], [np.int64(3), 4], [1, -1], [2**31], [1, 2**70], [[1]], [1.0], "abc",
                array("q", [1, -1]), array("q", [2**31]), np.array([2**40]), np.arange(6)[::2],
                np.zeros((2, 2), np.int64), np.array([1.0]), array("h", [1]), np.arange(3, dtype=np.uint64),
                b"abc", bytearray(4)):
        assert int32_tokens(odd) is None, odd
    assert as_tokens([np.int64(3), 4], "t").tolist() == [3, 4]  # (numpy path: converted)
    assert as_tokens(np.arange(6)[::2], "t").tolist() == [0, 2, 4]
    assert as_tokens(array("h", [1, 2]), "t").tolist() == [1, 2]
    for bad, msg in (([1, -1], r"in \[0, 2\*\*31\), got -1\.\.1"), ([2**31], "2147483648"),
                     ([[1]], "expected a 1-D sequence"), ([1.5], "dtype=float64"),
                     (array("q", [5, -7]), r"got -7\.\.5"), (np.array([3, 2**40]), "1099511627776")):
        with pytest.raises(ValueError, match=msg):
            as_tokens(bad, "t")


def test_budget_array_reuses_only_the_same_read_only_sizes():
    """The per-row budgets of a read-only sizes array (a policy's ``draft_sizes``: asked by
    the feedback's pre-draft, then by the plan) are converted once; any other array is
    converted afresh (a writeable one may have changed since)."""
    d, rids, _ = _drafter(requests=20)
    sizes = np.arange(20, dtype=np.int64)
    sizes.flags.writeable = False
    a = d._budget_array(rids, sizes)
    assert a.tolist() == np.minimum(np.arange(20), d.config.max_budget).tolist()
    assert d._budget_array(rids, sizes) is a and not a.flags.writeable
    other = np.full(20, 3, np.int64)
    other.flags.writeable = False
    assert d._budget_array(rids, other).tolist() == [3] * 20
    w = np.full(20, 2, np.int64)
    first = d._budget_array(rids, w)
    w[:] = 5
    assert d._budget_array(rids, w).tolist() == [5] * 20 and first.tolist() == [2] * 20


def test_the_probability_check_is_the_pre_draft_jobs_for_its_trees():
    """DraftBatch.probs_in_range: every node probability in [0, 1] (NaN not), computed once;
    the native pre-draft job checks its trees itself (the plan then computes nothing), a
    RowsOf answers for its source's nodes, and a session whose drafter returns probabilities
    out of range refuses the plan, as before."""
    from das_sglang.core.draft_tree import RowsOf

    def batch(probs):
        n = len(probs)
        return DraftBatch(np.zeros(n, np.int32), np.full(n, -1, np.int32), np.asarray(probs, np.float64),
                          np.ones(n, np.int32), np.array([0, n], np.int64), np.zeros(1, np.int32))

    for probs, ok in (([], True), ([0.0, 1.0, 0.5], True), ([0.5, 1.0000001], False), ([-0.0, -1e-9], False),
                      ([0.2, float("nan")], False)):
        b = batch(probs)
        assert b.probs_ok is None and b.probs_in_range() is ok and b.probs_ok is ok
        lazy = RowsOf(b, np.array([0, -1]))
        assert lazy.probs_in_range() is ok and not lazy._made
    known = batch([7.0])
    known.probs_ok = True  # (who made the arrays said so: not computed again)
    assert known.probs_in_range()

    d, rids, rng = _drafter(0, requests=24)
    from das_sglang.core.drafter import TokenRows

    prepared = d.prepare_extend(rids, TokenRows.from_padded(np.full((24, 2), 5, np.int64), np.ones(24, np.int64)))
    done = d.start_extend(prepared, 8)
    assert done is not None
    done()
    trees = d.predrafted_trees()
    assert trees is not None and trees.probs_ok is True and len(trees.probs)
    assert trees.probs_in_range()


def test_a_plan_refuses_drafts_with_probabilities_out_of_range(monkeypatch):
    """The session's check of the drafter's node probabilities (before the policy reads them)
    still refuses a drafter that returns one outside [0, 1]."""
    import json

    from das_sglang.sglang.options import load_options
    from das_sglang.sglang.session import DasSession

    s = DasSession(load_options(9, json.dumps({"server": {"policy": "length-aware"}})))
    s.start("r0", {"das_problem_id": "p"}, [1, 2, 3], [], 100)
    real = s.drafter.speculate_flat

    def bad(*a, **k):
        out = real(*a, **k)
        return DraftBatch(out.tokens, out.parents, np.full(len(out.probs), 1.5), out.depths, out.offsets,
                          out.match_len) if len(out.probs) else DraftBatch(
            np.zeros(1, np.int32), np.full(1, -1, np.int32), np.full(1, 1.5), np.ones(1, np.int32),
            np.array([0, 1], np.int64), np.zeros(1, np.int32))

    monkeypatch.setattr(s.drafter, "speculate_flat", bad)
    with pytest.raises(ValueError, match=r"node probabilities outside \[0, 1\]"):
        s.plan(["r0"], 8)
    s.close()


def test_same_ints_is_array_equal_for_integer_arrays_of_one_dtype():
    """budget_rows.same_ints: np.array_equal for int arrays of one dtype and shape; another
    dtype or a float array reads as different (the callers then take their exact path)."""
    from das_sglang.core.budget_rows import same_ints

    rng = np.random.default_rng(0)
    a = rng.integers(-5, 5, 512)
    for b, want in ((a.copy(), True), (a[::-1].copy(), False), (a[:-1].copy(), False), (a.reshape(2, 256), False),
                    (a.astype(np.int32), False), (a.astype(np.float64), False), (np.zeros(0, np.int64), False)):
        assert same_ints(a, b) is want
        if want:
            assert np.array_equal(a, b)
    assert same_ints(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert not same_ints(np.zeros(3), np.zeros(3))  # (floats: -0.0 / NaN are not bytes)
    c = a.copy()
    c[300] += 1
    assert not same_ints(a, c) and same_ints(a[::2], a[::2].copy())  # (a strided view too)


def test_placeholders_are_filled_in_place_and_none_while_one_is_unknown():
    """The feedback after a plan with deferred starts fills the memo's placeholders in its
    own lists (``_fill_rows``: nothing holds them past the plan), and an unknown one raises,
    naming it, before any row is filled."""
    d, rids, rng = _drafter(requests=80)
    batch = rids[:40] + ["n0"] + rids[40:79] + ["n1"]
    d.speculate_flat(batch, 4, skip={"n0", "n1"})
    d.start_request("n0", "p0", rng.integers(0, 12, 30))
    d._rows(batch, {"n0", "n1"})  # (with skip: placeholders, built afresh)
    memo = d._rows_memo
    with pytest.raises(ValueError, match="unknown req_id='n1'"):
        d._rows(list(batch))
    assert memo[2][40] is None and memo[3][40] == -1  # (n0's row not filled either)
    d.start_request("n1", "p1", rng.integers(0, 12, 30))
    lives, idx, seq_ids = d._rows(list(batch))
    assert idx is memo[2] and seq_ids is memo[3] and idx[40] is not None and seq_ids[80] >= 0
    d._rows_memo = None
    fresh = d._rows(list(batch))
    assert lives == fresh[0] and idx == fresh[1] and seq_ids.tolist() == fresh[2].tolist()
