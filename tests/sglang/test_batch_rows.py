"""The worker's per-step reads of a decode batch (``batch_rows.py``): the vectorised stop
cut gives ``finish.stop_cut`` row for row (real SGLang Req objects, the tiny model's real
tokenizer; no engine), the rows are remade only for another ``batch.reqs`` list, and the
kept stop rules stay bounded by the live requests."""

from __future__ import annotations

import numpy as np
import pytest

from das_sglang.sglang.batch_rows import NO_LIMIT, BatchRows, StopRules
from das_sglang.sglang.finish import TextStops, _fast_decode, stop_cut


from test_finish import make_req as _finish_req
from test_finish import tokenizer  # noqa: F401 - the fixture


def make_req(tokenizer, rid, output, **params):
    """A real SGLang Req with prompt [5, 6, 7] (test_finish.make_req) named ``rid``."""
    return _finish_req(tokenizer, [5, 6, 7], output, rid=rid, **params)


def _words(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def _mixed_batch(tokenizer, rng, n):
    """Rows of every kind stop_cut tells apart: EOS only, ignore_eos, extra stop token
    ids, max_new_tokens about to bind, stop strings (listed out of text order), a stop
    regex, and no tokenizer."""
    vocab = _words(tokenizer, "the cat sat on a mat and then ran off to see the dog at home")
    reqs = []
    for i in range(n):
        kind = i % 7
        out = [int(t) for t in rng.choice(vocab, int(rng.integers(1, 40)))]
        params = dict(temperature=1.0, max_new_tokens=4096)
        if kind == 1:
            params["ignore_eos"] = True
        elif kind == 2:
            params["stop_token_ids"] = [int(vocab[0]), int(vocab[3])]
        elif kind == 3:
            params["max_new_tokens"] = len(out) + int(rng.integers(0, 5))
        elif kind == 4:
            params["stop"] = ["ran", " sat on"]
        elif kind == 5:
            params["stop_regex"] = [r"the \w+ sat"]
        req = make_req(tokenizer, f"r{i}", out, **params)
        if kind == 6:
            params["stop"] = ["dog"]
            req = make_req(tokenizer, f"r{i}", out, **params)
            req.tokenizer = None  # (skip_tokenizer_init: stop text never matches)
        reqs.append(req)
    return reqs, vocab


def _runs(tokenizer, rng, vocab, n, width=8):
    pool = np.array(list(vocab) + [tokenizer.eos_token_id], dtype=np.int64)
    runs = rng.choice(pool, (n, width))
    lens = rng.integers(1, width + 1, n).astype(np.int64)
    return runs, lens


def test_vectorised_cut_is_stop_cut_row_for_row(tokenizer):
    rng = np.random.default_rng(0)
    reqs, vocab = _mixed_batch(tokenizer, rng, 70)
    rules = StopRules()
    for r in reqs[:-5]:  # (the last rows without a rule kept: stop_cut itself)
        rules.add(r.rid, r)
    rows = BatchRows(rules)
    rows.update(reqs)
    cut_somewhere = 0
    for _ in range(40):
        runs, lens = _runs(tokenizer, rng, vocab, len(reqs))
        want = [stop_cut(r, runs[b, : lens[b]].tolist()) for b, r in enumerate(reqs)]
        got = rows.cut(runs, lens)
        assert got.tolist() == want
        cut_somewhere += int((got < lens).sum())
    assert cut_somewhere > 50  # (the batches did stop inside runs)


def test_one_shared_stop_set_covers_the_batch(tokenizer):
    rng = np.random.default_rng(1)
    eos = tokenizer.eos_token_id
    reqs = [make_req(tokenizer, f"q{i}", [11, 12], temperature=1.0, max_new_tokens=4096) for i in range(16)]
    rules = StopRules()
    for r in reqs:
        rules.add(r.rid, r)
    assert rules.rules_held() == 1
    rows = BatchRows(rules)
    rows.update(reqs)
    runs = rng.integers(20, 40, (16, 5))
    runs[3, 2] = eos
    runs[7, 0] = eos
    lens = np.full(16, 5)
    got = rows.cut(runs, lens)
    assert got[3] == 3 and got[7] == 1 and (np.delete(got, [3, 7]) == 5).all()


def test_rows_are_remade_only_for_another_list(tokenizer):
    reqs = [make_req(tokenizer, f"s{i}", [30 + i], temperature=0, max_new_tokens=8) for i in range(4)]
    rows = BatchRows(StopRules())
    rids = rows.update(reqs)
    assert rids == ["s0", "s1", "s2", "s3"] and rows.update(reqs) is rids and not rows.changed(reqs)
    reqs[0].output_ids.append(99)
    assert rows.roots().tolist() == [99, 31, 32, 33]  # (read each step: the current outputs)
    assert rows.committed().tolist() == [2, 1, 1, 1]
    other = list(reqs[1:])  # (SGLang's filter_batch: a new list)
    assert rows.changed(other) and rows.update(other) == ["s1", "s2", "s3"]
    # A large list: rows kept from the previous list are taken from it (by identity), the
    # new ones read; the rules kept with them, the new rows' to look up.
    big = [make_req(tokenizer, f"b{i}", [40 + i], temperature=0, max_new_tokens=8) for i in range(80)]
    rules = StopRules()
    for r in big:
        rules.add(r.rid, r)
    rows = BatchRows(rules)
    rows.update(big)
    j = rules.rule["b0"]
    assert rows.lookup_rules().tolist() == rules.of(rows.rids).tolist() == [j] * 80  # (no previous list)
    newcomer = make_req(tokenizer, "n", [7], temperature=0, max_new_tokens=8, stop_token_ids=[3])
    rules.add("n", newcomer)
    nxt = big[:10] + big[11:] + [newcomer]  # (one finished, one merged at the end)
    assert rows.update(nxt) == [r.rid for r in nxt]
    assert rows.roots().tolist() == [r.output_ids[-1] for r in nxt]
    rules.remove("b5")  # (looked up, its row would read -1: kept, it reads the previous list's)
    rule = rows.lookup_rules()
    assert (rule[:79] == j).all() and rule[79] == rules.rule["n"] != j


def test_stop_rules_stay_bounded_by_the_live_requests(tokenizer):
    rules = StopRules()
    for i in range(300):  # a stream of requests, each with stop tokens of its own
        req = make_req(tokenizer, f"t{i}", [1], temperature=0, max_new_tokens=8, stop_token_ids=[100 + i])
        rules.add(req.rid, req)
        if i >= 2:
            rules.remove(f"t{i - 2}")
    assert len(rules) == 2 and rules.rules_held() == 2 and len(rules.set_ids) <= 3
    rules.remove("t298")
    rules.remove("t299")
    rules.remove("t299")  # (twice: nothing)
    assert len(rules) == 0 and rules.rules_held() == 0


def test_max_new_tokens_none_is_no_limit(tokenizer):
    req = make_req(tokenizer, "u", [1, 2], temperature=0, max_new_tokens=8, ignore_eos=True)
    req.sampling_params.max_new_tokens = None
    rules = StopRules()
    rules.add("u", req)
    assert rules.tables()[0][rules.rule["u"]] == NO_LIMIT
    rows = BatchRows(rules)
    rows.update([req])
    assert rows.cut(np.array([[5, 6, 7]]), np.array([3])).tolist() == [stop_cut(req, [5, 6, 7])] == [3]


def test_fast_decode_is_the_tokenizers_decode(tokenizer):
    rng = np.random.default_rng(2)
    fast = _fast_decode(tokenizer)
    for _ in range(200):
        ids = [int(t) for t in rng.integers(0, tokenizer.vocab_size, int(rng.integers(0, 20)))]
        assert fast(ids) == tokenizer.decode(ids)
    assert _fast_decode(None) is None

    class Own(type(tokenizer)):  # (a decode of its own: called as it is)
        def decode(self, token_ids, **kwargs):
            return "own"

    mine = object.__new__(Own)
    assert _fast_decode(mine) == mine.decode


def test_text_stops_read_once_cut_as_stop_cut(tokenizer):
    ids = _words(tokenizer, "one two three four five six")
    req = make_req(tokenizer, "v", ids[:2], temperature=0, max_new_tokens=64, stop=[" four"])
    stops = TextStops(req, frozenset({tokenizer.eos_token_id}))
    run = ids[2:]
    assert stops.cut(req.output_ids, run, len(run)) == stop_cut(req, run) < len(run)
    # A pattern that does not compile (SGLang aborts such a request itself) never ends a
    # run, beside one that does, as in stop_cut.
    req = make_req(tokenizer, "w", ids[:2], temperature=0, max_new_tokens=64, stop_regex=[r"f\w+e"])
    req.sampling_params.stop_regex_strs = ["(", r"f\w+e"]
    stops = TextStops(req, frozenset({tokenizer.eos_token_id}))
    assert len(stops.regexes) == 1
    assert stops.cut(req.output_ids, run, len(run)) == stop_cut(req, run) < len(run)


def test_native_reads_refuse_bad_input_naming_it(tokenizer):
    from array import array

    from das_sglang.native import row_map, seq_tails, stop_rows

    a, b, c = tuple([1]), tuple([1]), tuple([1])  # (equal, not the same object)
    assert a is not b and b is not c
    assert row_map([a, b], [b, c])[0].tolist() == [1, 1]
    assert row_map([a, b], [b, c], identity=True)[0].tolist() == [1, -1]
    assert row_map([[1]], [[2]], identity=True)[0].tolist() == [-1]  # (items never hashed)

    with pytest.raises(ValueError, match="sequence at row 1 is empty"):
        seq_tails([array("q", [4, 5]), array("q")])
    last, length = seq_tails([array("q", [4, 5]), [7], (1, 2, 3)])
    assert last.tolist() == [5, 7, 3] and length.tolist() == [2, 1, 3]
    runs = np.array([[3, 2, 9], [2, 7, 7]], dtype=np.int64)
    one = np.ones(2, dtype=np.int64)
    ids, offs = np.array([2], dtype=np.int64), np.array([0, 1], dtype=np.int64)
    cut, limit, stopped = stop_rows(runs, np.array([3, 3]), np.array([50, 5]), np.array([0, 4]), np.array([0, 0]), ids, offs)
    assert cut.tolist() == [2, 1] and limit.tolist() == [3, 1]
    assert stopped.dtype == bool and stopped.tolist() == [True, True]  # (the requests finish with these runs)
    cut, limit, stopped = stop_rows(np.array([[3, 4, 9]]), np.array([3]), np.array([50]), np.array([0]),
                                    np.array([0]), ids, offs)
    assert cut.tolist() == [3] and stopped.tolist() == [False]
    # the length limit finishes a request too (committed + cut >= max_new), stop set or not
    cut, limit, stopped = stop_rows(np.array([[3, 4, 9], [3, 4, 9], [3, 4, 9]]), np.array([3, 3, 3]),
                                    np.array([50, 50, 6]), np.array([47, 46, 0]), np.array([0, -1, -1]), ids, offs)
    assert cut.tolist() == [3, 3, 3] and stopped.tolist() == [True, False, False]
    cut, limit, stopped = stop_rows(np.array([[3, 4, 9]]), np.array([3]), np.array([50]), np.array([48]),
                                    np.array([-1]), ids, offs)
    assert cut.tolist() == [2] and limit.tolist() == [2] and stopped.tolist() == [True]
    with pytest.raises(ValueError, match=r"lens\[1\]=4 is outside \[1, 3\]"):
        stop_rows(runs, np.array([3, 4]), one, one * 0, one * 0, ids, offs)
    with pytest.raises(ValueError, match=r"row_set\[0\]=1 but 1 sets"):
        stop_rows(runs, one, one, one, np.array([1, 0]), ids, offs)
    with pytest.raises(ValueError, match="2 runs but"):
        stop_rows(runs, np.ones(3, dtype=np.int64), one, one, one, ids, offs)
    with pytest.raises(ValueError, match="invalid runs"):
        stop_rows(runs.astype(np.int32), one, one, one, one, ids, offs)


def test_sglang_keeps_the_contract_batch_rows_relies_on():
    """What BatchRows keys on, read from the installed SGLang's source: nothing changes a
    batch's ``reqs`` list in place (filter / merge / retract rebind it), and a request's
    ``output_ids`` is rebound only where it leaves decoding (retraction, disaggregated
    prefill, a streaming session's finish) -- so the arrays held for a list's life are
    the ones SGLang appends the batch's tokens to. A new SGLang that breaks either
    fails here."""
    import re
    from pathlib import Path

    import sglang

    root = Path(sglang.__file__).parent / "srt"
    in_place = re.compile(r"\.reqs\s*(\[[^\]]*\]\s*=[^=]|\.(append|extend|insert|pop|remove|sort|clear|reverse)\(|\+=)")
    rebind = re.compile(r"\.output_ids\s*=[^=]")
    in_place_hits, rebinds = [], []
    for path in root.rglob("*.py"):
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            code = line.split("#", 1)[0]
            if in_place.search(code):
                in_place_hits.append(f"{path.relative_to(root)}:{n}")
            if rebind.search(code):
                rebinds.append((str(path.relative_to(root)), code.strip()))
    assert in_place_hits == []
    known = {("managers/schedule_batch.py", 'self.output_ids = array("q")'),  # __init__ and retraction
             ("disaggregation/prefill.py", 'req.output_ids = array("q")'),
             ("disaggregation/utils.py", "self.output_ids = torch.zeros((size, 16), dtype=torch.int32, device=device)"),
             ("session/streaming_session.py", "req.output_ids = req.output_ids[:finished_len]")}
    assert set(rebinds) <= known and len(rebinds) >= 3


class _Req:
    """What BatchRows reads of an SGLang Req (hashed and compared by identity, as Req)."""

    def __init__(self, rid):
        from array import array

        self.rid = rid
        self.output_ids = array("q", [8])


def _drive_batches(session, use_kept: bool, steps=40, rows=80, seed=0):
    """SGLang's batch lists over a GRPO-like workload: finished requests filtered out in
    order, new ones merged at the end (new list objects), the session planned with or
    without BatchRows' map of the lists; every plan's (trees, width), and how many plans
    took the map."""
    import json

    from das_sglang.sglang.options import load_options

    rng = np.random.default_rng(seed)
    texts = {f"p{i}": rng.integers(0, 6, 120).tolist() for i in range(6)}
    rows_ = BatchRows(StopRules())
    batch, pos, out, n, hits = [], {}, [], 0, 0
    for step in range(steps):
        fresh = []
        while len(batch) + len(fresh) < rows:
            fresh.append(_Req(f"r{n}"))
            session.start(f"r{n}", {"das_problem_id": f"p{n % 6}"}, [7, 8], [], 200)
            pos[f"r{n}"] = 0
            n += 1
        if fresh or not step:
            batch = batch + fresh  # (merge_batch: a new list)
        rids = rows_.update(batch)
        trees, width = session.plan(rids, 8, kept=rows_.kept if use_kept else None)
        hits += session._kept_hit
        out.append(([t.tokens.tolist() for t in trees], width))
        session.before_forward()
        commits = []
        for req, tree in zip(batch, trees):
            text = texts[f"p{int(req.rid[1:]) % 6}"]
            p = pos[req.rid]
            k = tree.accept_length(text[p: p + len(tree) + 1])
            commits.append(text[p: p + k + 1])
            pos[req.rid] = p + k + 1
        session.committed_batch(rids, [len(t) for t in trees], commits)
        done = [r for r in batch if pos[r.rid] >= 30 + 7 * (int(r.rid[1:]) % 5)]
        for r in done:
            session.finished(r.rid, [7, 8], texts[f"p{int(r.rid[1:]) % 6}"][: pos[r.rid]])
        if done:
            batch = [r for r in batch if r not in done]  # (filter_batch: a new list)
    return out, hits


def test_plans_through_batch_rows_map_are_the_plans_without_it():
    """The session and the drafter gather their per-row state through BatchRows' identity
    map of SGLang's batch lists (plan's ``kept``) after a start or a finish: the same
    trees and widths as mapping the request ids, step for step."""
    import json

    from das_sglang.sglang.options import load_options
    from das_sglang.sglang.session import DasSession

    def session():
        cfg = {"drafter": {"window_steps": 2}, "server": {"policy": "length-aware"}}
        s = DasSession(load_options(9, json.dumps(cfg)))
        s.policy.lengths.background = False
        return s

    a, b = session(), session()
    got, hits = _drive_batches(a, True)
    want, none = _drive_batches(b, False)
    a.close()
    b.close()
    assert got == want
    assert hits >= 10 and none == 0  # (the map was taken on the steps whose list changed)
    assert sum(len(t) for trees, _ in got for t in trees) > 0


def test_plans_are_the_same_without_the_seeded_problem_map(monkeypatch):
    """The session seeds the map of its problem-id lists (a kept request keeps its problem)
    for the policy's per-problem reads (calibration factors, length-index rows): the same
    trees and widths as when each part maps the problem ids itself."""
    import json

    import das_sglang.sglang.session as session_mod
    from das_sglang.core import budget_rows
    from das_sglang.sglang.options import load_options
    from das_sglang.sglang.session import DasSession

    def session():
        cfg = {"drafter": {"window_steps": 2}, "server": {"policy": "length-aware"}}
        s = DasSession(load_options(9, json.dumps(cfg)))
        s.policy.lengths.background = False
        return s

    seeded = []
    real = budget_rows.seed_gather_map
    monkeypatch.setattr(session_mod, "seed_gather_map", lambda *a: (seeded.append(1), real(*a)))
    a = session()
    got, _ = _drive_batches(a, True)
    a.close()
    assert len(seeded) >= 10
    budget_rows._GATHER_MAPS.clear()
    monkeypatch.setattr(session_mod, "seed_gather_map", lambda *a: None)
    b = session()
    want, _ = _drive_batches(b, True)
    b.close()
    assert got == want


def test_gather_map_is_seeded_or_the_row_map():
    """gather_map answers a seeded pair of lists (equal lists, not only the same objects)
    with the seeded map, and any other pair with row_map's; the per-problem reads take it
    (a wrong seeded map changes what they read: it is used)."""
    from das_sglang.core import budget_rows as R
    from das_sglang.core.acceptance import AcceptanceTracker
    from das_sglang.core.policy_config import PolicyConfig

    prev = [f"p{i % 5}" for i in range(100)]
    new = prev[3:] + ["p9", "p1"]
    want = R.shared_row_map(prev, new)[0]
    assert R.gather_map(prev, new).tolist() == want.tolist()
    back = np.concatenate([np.arange(3, 100), [-1, -1]])
    R.seed_gather_map(prev, new, back)
    assert R.gather_map(list(prev), list(new)).tolist() == back.tolist()
    assert R.gather_map(prev, new[:-1]).tolist() == want[:-1].tolist()
    tracker = AcceptanceTracker(PolicyConfig())
    for i, pid in enumerate(["p0", "p1", "p2", "p3", "p4", "p9"]):
        tracker.expect(pid, 4, 2.0)
        tracker.observe(pid, 4, i % 5)
    first = tracker.calibration_rows(prev)
    assert len(set(first.tolist())) == 5
    looked_up = np.array([tracker.calibration(p) for p in new])
    np.testing.assert_array_equal(tracker.calibration_rows(new), looked_up)
    # a wrong seeded map for the same lists: its rows are read
    tracker.calibration_rows(prev)
    R.seed_gather_map(prev, new, np.zeros(len(new), np.int64))
    assert (tracker.calibration_rows(new) == first[0]).all()
    R._GATHER_MAPS.clear()


def test_finishing_rows_are_the_rows_sglang_finishes(tokenizer):
    """``BatchRows.finishing`` after a cut: the rows whose request SGLang's own finish check
    (``Req.update_finish_state`` on the cut run) ends -- every one of them where the stops
    are tokens or the length limit; a row with stop text only where the cut ended its run
    early (a stop text matching at the run's very end is SGLang's to find). Never a row
    SGLang does not finish."""
    rng = np.random.default_rng(2)
    reqs, vocab = _mixed_batch(tokenizer, rng, 70)
    rules = StopRules()
    for r in reqs:
        rules.add(r.rid, r)
    rows = BatchRows(rules)
    rows.update(reqs)
    text = {i for i, r in enumerate(reqs) if r.sampling_params.stop_strs or r.sampling_params.stop_regex_strs}
    flagged = finished_n = 0
    for _ in range(30):
        runs, lens = _runs(tokenizer, rng, vocab, len(reqs))
        cut = rows.cut(runs, lens)
        got = rows.finishing.copy()
        for b, req in enumerate(reqs):
            if req.tokenizer is None:  # (stop text without a tokenizer: SGLang's check cannot run)
                continue
            n0 = len(req.output_ids)
            req.output_ids.extend(int(t) for t in runs[b, : cut[b]])
            req.update_finish_state(int(cut[b]))
            done = req.finished()
            del req.output_ids[n0:]
            req.finished_reason, req.finished_len, req.to_finish = None, None, None
            assert done or not got[b], f"row {b} flagged but SGLang does not finish it"
            if b not in text:
                assert got[b] == done, f"row {b}: finishing {got[b]} but SGLang says {done}"
            flagged += int(got[b])
            finished_n += int(done)
    assert flagged > 100 and finished_n >= flagged
