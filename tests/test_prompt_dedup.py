"""DrafterConfig.dedup_prompts: a request whose problem's index already holds a whole copy
of the same prompt (stored, in a weighted step) indexes only the prompt's last
``index_depth`` tokens. Its cursors and every count a draft reads past the prompt are those
of the whole prompt; history, snapshots and finish_as see the whole text."""

from __future__ import annotations

import numpy as np

from das_sglang.core.config import DrafterConfig
from das_sglang.core.drafter import SuffixDrafter

RNG = np.random.default_rng(7)
PROMPT = RNG.integers(1000, 2000, 120).astype(np.int32)  # (token ranges: prompt vs responses)


def _drafter(dedup: bool, **kw) -> SuffixDrafter:
    cfg = dict(max_match_len=4, max_budget=6, global_shard=False, window_steps=2, dedup_prompts=dedup)
    cfg.update(kw)
    return SuffixDrafter(DrafterConfig(**cfg))


def _tokens(d: SuffixDrafter, problem="p") -> int:
    return d._indices[problem].num_tokens


def test_a_second_copy_of_a_prompt_indexes_only_its_tail():
    d = _drafter(True)
    k = d.config.index_depth
    d.start_request("a", "p", PROMPT)
    assert _tokens(d) == len(PROMPT)
    d.start_request("b", "p", PROMPT)
    assert _tokens(d) == len(PROMPT) + k  # the tail only
    d.start_request("c", "q", PROMPT)  # another problem: its own index, whole
    assert _tokens(d, "q") == len(PROMPT)
    d.start_request("e", "p", PROMPT[:-1])  # another prompt: whole
    assert _tokens(d) == 2 * len(PROMPT) - 1 + k
    off = _drafter(False)
    off.start_request("a", "p", PROMPT)
    off.start_request("b", "p", PROMPT)
    assert _tokens(off) == 2 * len(PROMPT)


def test_drafts_past_the_prompt_are_those_of_whole_copies():
    rng = np.random.default_rng(1)
    responses = {r: rng.integers(0, 12, 60).astype(np.int32) for r in "abcd"}
    drafts = []
    for dedup in (True, False):
        d = _drafter(dedup)
        for r in "abcd":
            d.start_request(r, "p", PROMPT)
        out = []
        for pos in range(0, 60, 3):
            for r in "abcd":
                d.extend_request(r, responses[r][pos:pos + 3])
            for r in "abcd":
                t = d.speculate(r, 6)
                out.append((t.tokens.tolist(), t.parents.tolist(), np.round(t.probs, 12).tolist()))
        drafts.append(out)
        if dedup:
            assert len(d._heads) == 3  # three of the four indexed the tail only
    assert drafts[0] == drafts[1]
    assert any(tokens for tokens, _, _ in drafts[0])  # (something was drafted)


def test_history_and_finish_see_the_whole_text():
    d = _drafter(True)
    out = RNG.integers(0, 50, 30).astype(np.int32)
    for r in "ab":
        d.start_request(r, "p", PROMPT)
        d.extend_request(r, out[:20])
    whole = np.concatenate([PROMPT, out])
    d.finish_as("b", "p", 0, whole)  # the returned text continues the live copy: kept
    assert d._heads  # (not replaced by a whole re-insertion)
    d.finish_as("a", "p", 0, whole)
    hist = d.history()["p"][0]
    assert len(hist) == 2 and all(np.array_equal(h, whole) for h in hist)
    # a returned prompt that differs from the registered one: replaced by the returned text
    d.start_request("c", "p", PROMPT)
    other = np.concatenate([PROMPT[::-1], out[:5]])
    d.finish_as("c", "p", 0, other)
    texts = d.history()["p"][0]
    assert any(np.array_equal(h, other) for h in texts) and len(texts) == 3


def test_the_whole_copy_must_be_stored_and_weighted():
    d = _drafter(True)
    k = d.config.index_depth
    d.start_request("a", "p", PROMPT)
    d.finish_request("a", keep=False)  # the whole copy left the index
    d.start_request("b", "p", PROMPT)
    assert _tokens(d) == len(PROMPT) and not d._heads  # whole again
    d.finish_request("b", keep=True)  # history of step 0
    d.start_request("c", "p", PROMPT)
    assert _tokens(d) == len(PROMPT) + k
    d.advance_step(3)  # step 0 leaves the window (window_steps 2)
    d.start_request("e", "p", PROMPT)
    assert d._whole_key.get(d._live["e"].seq_id) is not None  # the new whole copy
    d.finish_request("c", keep=False)
    d.finish_request("e", keep=True)
    d.advance_step(6)
    assert not d._prompt_copies and not d._heads and not d._whole_key  # nothing stale left


def test_lazy_eviction_forgets_prompt_copies_with_their_sequences():
    d = _drafter(True)
    d.lazy_eviction = True
    for r in "abc":
        d.start_request(r, "p", PROMPT)
        d.finish_request(r, keep=True)
    assert len(d._heads) == 2 and len(d._prompt_copies) == 1
    d.advance_step(3)
    d.start_request("n", "p", PROMPT)  # the stored copies are out of the window: whole
    assert d._live["n"].seq_id in d._whole_key
    assert d.evict_pending(None)
    assert not d._heads and list(d._whole_key) == [d._live["n"].seq_id]


def test_a_digest_collision_indexes_the_prompt_whole(monkeypatch):
    import das_sglang.core.drafter as drafter_module

    class Same:  # every prompt gets the same digest
        def __init__(self, *a, **k):
            pass

        def digest(self):
            return b"x" * 16

    monkeypatch.setattr(drafter_module.hashlib, "blake2b", Same)
    d = _drafter(True)
    other = PROMPT.copy()
    other[3] += 1  # differs in the head
    d.start_request("a", "p", PROMPT)
    d.start_request("b", "p", other)
    assert _tokens(d) == 2 * len(PROMPT) and not d._heads  # whole: the heads differ
    d.start_request("c", "p", other)  # the entry is b's now (the latest whole copy)
    assert list(d._heads.values())[0].tolist() == other[: len(other) - d.config.index_depth].tolist()
    out = np.arange(5, dtype=np.int32)
    for r, p in (("a", PROMPT), ("b", other), ("c", other)):
        d.extend_request(r, out)
        d.finish_as(r, "p", 0, np.concatenate([p, out]))
    texts = sorted(t.tolist() for t in d.history()["p"][0])
    assert texts == sorted([np.concatenate([p, out]).tolist() for p in (PROMPT, other, other)])
