"""benchmarks/bench_peers.py building blocks (the harness itself is a benchmark, run by hand)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_peers as bp  # noqa: E402

from das_sglang.core.config import DrafterConfig  # noqa: E402
from das_sglang.replay.datasets import Rollout  # noqa: E402


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
    assert tree.accept_path([3, 4, 9]) == (2, 2)  # ... ending at node 2 (token 4)
    assert tree.accept_path([5]) == (1, 1) and tree.accept_path([9, 3]) == (0, -1)


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


def test_corpus_bound_accepts_the_longest_stored_continuation_and_bounds_das():
    # After token 2 the history holds 3 4 5 then 9: the bound accepts 3 4 5 (the 4th
    # token, 6, never followed 5 there), then the bonus token: 4 tokens in its first step.
    history = [(0, np.asarray([1, 2, 3, 4, 5, 9], np.int32))]
    bound = bp.CorpusBound(16)
    run = bp.PeerRun()
    bp.run_group(bound, "p", 1, history, [rollout("a", 1, [1, 2], [3, 4, 5, 6, 7])], 16, run)
    (t,) = run.targets
    assert t.tokens == 5 and t.steps == 2  # 3 4 5 +6 (bonus), then 7 (nothing stored after 6)
    # On text with loops and noise, no drafter here gets more per step than the bound
    rng = np.random.default_rng(0)
    loop = rng.integers(10, 60, 7).tolist()
    texts = [(loop * 6)[: 30 + 3 * k] + rng.integers(10, 60, 5).tolist() for k in range(4)]
    members = [rollout(f"r{k}", 1, [1, 2], t) for k, t in enumerate(texts)]
    hist = [(0, np.asarray([1, 2] + loop * 3, np.int32))]
    runs = {}
    for peer in (bp.DasPeer(DrafterConfig(max_budget=16, window_steps=1)), bp.CorpusBound(16)):
        runs[peer.name] = bp.PeerRun()
        bp.run_group(peer, "p", 1, hist, members, 16, runs[peer.name])
    das = sum(t.tokens for t in runs["das"].targets) / sum(t.steps for t in runs["das"].targets)
    top = sum(t.tokens for t in runs["corpus_bound"].targets) / sum(t.steps for t in runs["corpus_bound"].targets)
    assert 1.0 < das <= top


def test_verl_run_writes_the_issue_keys_and_the_machine_load(tmp_path):
    """DAS alone on the bundled verl dump through main(): the slice and keys issue 11's check
    reads (all: server-state leave-one-out), the other two slices, what each is, and what
    else the machine did while it ran."""
    import json

    out = tmp_path / "peers.json"
    assert bp.main(["--json", str(out), "--datasets", "verl_gsm8k", "--skip", "sglang_ngram,arctic"]) == 0
    d = json.loads(out.read_text())
    verl = d["datasets"]["verl_gsm8k"]
    das = verl["all"]["das"]
    assert das["targets"] == 1024 and das["tokens_per_step"] > 1.0
    assert 0.0 < das["p50_us"] <= das["p99_us"]
    assert "sglang_ngram" not in verl["all"]
    assert set(verl) == set(d["verl_gsm8k_slices"]) == {"all", "lockstep", "leave_one_out"}
    lock, loo = verl["lockstep"]["das"], verl["leave_one_out"]["das"]
    assert lock["targets"] == loo["targets"] == 1024
    # the problem's history (15 whole samples) beats live siblings only; the other problems'
    # text in the engine's state (shared index) adds to it
    assert lock["tokens_per_step"] < loo["tokens_per_step"] < das["tokens_per_step"]
    run = d["machine"]["runs"]["verl_gsm8k"]["das"]
    assert run["wall_s"] > 0.0 and run["own_cpu_s"] > 0.0
    assert set(d["machine"]["runs"]) == {"verl_gsm8k", "verl_gsm8k_lockstep", "verl_gsm8k_leave_one_out"}
    assert d["machine"]["cpus"] >= 1


def test_sequential_siblings_see_the_earlier_siblings_whole_and_need_the_server_protocol(capsys):
    """--sequential: a group's members decode one after another, so a later sibling drafts
    from an earlier one's whole text (in lockstep it is only as far as that sibling got);
    with --isolated (state reset per group) it is refused."""
    text = [int(x) for x in np.random.default_rng(0).integers(10, 500, 60)]
    members = [rollout("a", 1, [1, 2], text), rollout("b", 1, [1, 2], text)]
    per = {}
    for sequential in (False, True):
        runs = bp.run_dataset([bp.DasPeer(DrafterConfig(max_budget=16, window_steps=1))], members, {1}, 1, 16,
                              lambda msg: None, sequential)
        per[sequential] = {t.req_id: t for t in runs["das"].targets}
        assert per[sequential]["a"].tokens == per[sequential]["b"].tokens == len(text)
    # b copies a's text: sequentially from the first token on, in lockstep never ahead of a
    assert per[True]["b"].tokens_per_step > 8 > per[False]["b"].tokens_per_step
    assert per[True]["a"].steps == per[False]["a"].steps  # a: no sibling ahead of it either way
    assert bp.main(["--json", "/dev/null", "--sequential", "--isolated"]) == 1
    assert "--sequential needs the server protocol" in capsys.readouterr().err


def test_leave_one_out_decodes_each_target_from_its_siblings_whole_texts_never_its_own():
    """verl_gsm8k.leave_one_out: a target alone, on fresh state, its group's other members'
    whole texts as the step before's history. a and b share their text, c's is its own: a
    and b draft it from each other from the first token on, c never sees its own text (one
    token per step), and no target's state leaks into the next (c decoded first or last alike)."""
    rng = np.random.default_rng(1)
    shared = [int(x) for x in rng.integers(10, 500, 60)]
    own = [int(x) for x in rng.integers(500, 990, 60)]
    members = [rollout("a", 3, [1, 2], shared), rollout("b", 3, [1, 2], shared), rollout("c", 3, [1, 2], own)]
    per = {}
    for order in (members, members[::-1]):
        runs = bp.run_leave_one_out([bp.DasPeer(DrafterConfig(max_budget=16, window_steps=1))], order, 16,
                                    lambda msg: None)
        per[order[0].req_id] = t = {x.req_id: x for x in runs["das"].targets}
        assert {r: x.tokens for r, x in t.items()} == {"a": 60, "b": 60, "c": 60}
        assert t["a"].tokens_per_step > 8 and t["b"].tokens_per_step > 8
        assert t["c"].tokens_per_step == 1.0
    assert per["a"]["c"].steps == per["c"]["c"].steps


def test_server_leave_one_out_holds_the_other_problems_text_but_never_the_target():
    """verl_gsm8k.all: leave-one-out on one peer state per fold. a (problem p) and c (problem
    q) happen to write the same text X; b, d write their own. Fold 0 decodes a, then c: c
    drafts X from a's decoded text (another problem's rollout, in the engine's state), which
    a fresh state per target never has; a, b, d never see their own text (one token per step)."""
    rng = np.random.default_rng(2)
    text = {k: [int(x) for x in rng.choice(np.arange(lo, lo + 200), 60, replace=False)]  # (no repeats)
            for k, lo in (("X", 10), ("Y", 300), ("Z", 600))}
    members = [Rollout("a", "p", 3, np.asarray([1, 2], np.int32), np.asarray(text["X"], np.int32), 60, False),
               Rollout("b", "p", 3, np.asarray([1, 2], np.int32), np.asarray(text["Y"], np.int32), 60, False),
               Rollout("c", "q", 3, np.asarray([1, 2], np.int32), np.asarray(text["X"], np.int32), 60, False),
               Rollout("d", "q", 3, np.asarray([1, 2], np.int32), np.asarray(text["Z"], np.int32), 60, False)]
    per = {}
    for server in (True, False):
        runs = bp.run_leave_one_out([bp.DasPeer(DrafterConfig(max_budget=16, window_steps=1))], members, 16,
                                    lambda msg: None, server=server)
        per[server] = {t.req_id: t for t in runs["das"].targets}
        assert [t.req_id for t in runs["das"].targets] == (["a", "c", "b", "d"] if server else ["a", "b", "c", "d"])
        assert {r: t.tokens for r, t in per[server].items()} == {k: 60 for k in "abcd"}
        for r in "abd":
            assert per[server][r].tokens_per_step == 1.0, (server, r)
    assert per[True]["c"].tokens_per_step > 4 and per[False]["c"].tokens_per_step == 1.0


def test_env_prefill_puts_the_environments_turns_in_the_context_without_decoding_them(tmp_path):
    """--env-prefill: a range the environment wrote (a tool response) goes into the context as
    the next turn's prompt -- no step, not counted as decoded -- and no step accepts past its
    start; the turns are found in the text and tokenized on their own."""
    text = [5, 6, 7, 8, 9, 10]
    env_turn = [90, 91, 92]
    history = [(0, np.asarray([1, 2] + text + env_turn + text, np.int32))]
    member = rollout("a", 1, [1, 2], text + env_turn + text)
    spans = {"a": [(6, 9)]}
    runs = {}
    for env in (None, spans):
        run = runs[env is None] = bp.PeerRun()
        bp.run_group(bp.DasPeer(DrafterConfig(max_budget=16, window_steps=1)), "p", 1, history, [member], 16, run, env)
    (plain,), (pre,) = runs[True].targets, runs[False].targets
    assert plain.tokens == 15 and plain.prefilled == 0
    assert pre.tokens == 12 and pre.prefilled == 3
    assert plain.steps == 1 and pre.steps == 2  # (the whole text in one step vs one step a turn)
    # --turn-requests: the turn after the environment's is a request of its own, its prompt
    # the whole conversation; the first turn stays as history. The same tokens are decoded.
    peer = bp.DasPeer(DrafterConfig(max_budget=16, window_steps=1), turn_requests=True)
    run = bp.PeerRun()
    bp.run_group(peer, "p", 1, history, [member], 16, run, spans)
    (t,) = run.targets
    assert (t.tokens, t.prefilled) == (12, 3) and peer._as["a"] != "a"
    held = peer.d.history()["p"][1]
    assert sorted(len(x) for x in held) == [2 + 6, 2 + 9 + 6]  # turn 1; turn 2 with its prompt
    assert bp.main(["--json", "/dev/null", "--turn-requests"]) == 1

    from das_sglang.core.tokenize import TextTokenizer
    from das_sglang.replay.datasets import TextRollout

    tok = TextTokenizer(cache_dir=tmp_path)
    turn = "user\n<tool_response>\nCurrent parsed answer='21' reward=1.0\n</tool_response>\nassistant\n"
    response = '<tool_call>\n{"answer": "21"}\n</tool_call>\n' + turn + "So the answer is 21.\n#### 21"
    t = TextRollout("a", "p", 1, "Q?", response, None, "x:1")
    (r,), env = bp.env_turns([t], [rollout("a", 1, [1], [0])], tok)
    ((s, e),) = env["a"]
    assert r.response_ids[s:e].tolist() == tok.encode_many([turn])[0].tolist()
    assert len(r.response_ids) == s + (e - s) + len(tok.encode_many(["So the answer is 21.\n#### 21"])[0])
