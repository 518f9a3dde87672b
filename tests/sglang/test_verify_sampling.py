"""Sampled verification math (``verify.py``) is lossless: a statistical test, no engine.

A fixed "target model" over a small vocabulary (a Markov chain: the logits after a token
depend on that token only) is decoded with DAS verification: every step drafts a fixed-
shape tree built from the chain's most likely continuations (so drafts are accepted
often, ~2-3 tokens per step), the verify rows get the chain's logits, ``target_tokens``
samples and ``walk_trees`` accepts exactly as the worker does. The committed tokens at
positions 1..L are compared with the exact marginals of non-speculative sampling
(powers of the filtered transition matrix) by chi-square goodness of fit. The negative
control (``doubles/das_test_doubles``: drafts accepted by argmax, SGLang's CPU rule) must
be rejected by the same test.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from das_sglang.core.draft_tree import DraftTree
from das_sglang.sglang.tree_inputs import build_layout
from das_sglang.sglang.verify import target_tokens, walk_trees

V, LENGTH, SAMPLES, START = 6, 5, 3000, 0
ALPHA = 1e-3  # family-wise, Bonferroni over the positions
SETTINGS = {
    "temperature": dict(temperature=0.7, top_k=V, top_p=1.0),
    "top_k_top_p": dict(temperature=1.0, top_k=4, top_p=0.8),
}


@pytest.fixture(scope="module")
def sglang_context(tiny_model):
    """SGLang's process config (sampling backend etc.), as a scheduler process has it."""
    from sglang.srt import runtime_context
    from sglang.srt.server_args import ServerArgs

    from das_sglang.sglang import cpu

    args = ServerArgs(model_path=tiny_model, **cpu.ENGINE_KWARGS)
    with runtime_context.use_context(runtime_context.create_context(args, role="scheduler")):
        yield


def chain_logits(seed: int = 4) -> np.ndarray:
    """[V, V] logits of the next token given the last one: peaked but not degenerate."""
    rng = np.random.default_rng(seed)
    return (rng.normal(0.0, 1.0, (V, V))).astype(np.float32)


def filtered_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float):
    """Exact sampling distribution per row under SGLang's torch top-k / top-p rule
    (rank < k, and mass of the higher ranks <= p)."""
    z = logits / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    out = np.zeros_like(p)
    for r in range(len(p)):
        order = np.argsort(-p[r], kind="stable")
        before = np.cumsum(p[r, order]) - p[r, order]
        keep = order[(np.arange(len(order)) < top_k) & (before <= top_p)]
        out[r, keep] = p[r, keep] / p[r, keep].sum()
    return out


def draft_trees(logits: np.ndarray) -> list[DraftTree]:
    """Per root token, 5 nodes: the two likeliest children; below the likeliest a chain
    of its likeliest continuations (depth 3) and its second likeliest child."""
    order = np.argsort(-logits, axis=1, kind="stable")
    trees = []
    for r in range(V):
        a, b = order[r, 0], order[r, 1]
        c = order[a, 0]
        tokens = [a, b, c, order[c, 0], order[a, 1]]
        trees.append(DraftTree(np.array(tokens), np.array([-1, -1, 0, 2, 0]),
                               np.ones(5, dtype=np.float32)))
    return trees


def sampling_info(bs: int, temperature: float, top_k: int, top_p: float):
    filtering = top_k < V or top_p < 1.0
    return SimpleNamespace(
        is_all_greedy=False,
        temperatures=torch.full((bs, 1), temperature),
        top_ks=torch.full((bs,), top_k, dtype=torch.int32),
        top_ps=torch.full((bs,), top_p),
        min_ps=torch.zeros(bs),
        need_top_k_sampling=filtering,
        need_top_p_sampling=filtering,
        need_min_p_sampling=False,
        max_top_k=top_k,
        sampling_seed=None,
        acc_additive_penalties=None,
        acc_scaling_penalties=None,
        logit_bias=None,
    )


def decode_das(params: dict, samples: int = SAMPLES, torch_seed: int = 0,
               sample=target_tokens, walk=walk_trees):
    """``samples`` sequences of LENGTH tokens after START, and mean tokens per verify."""
    torch.manual_seed(torch_seed)
    table = chain_logits()
    trees = draft_trees(table)
    info = sampling_info(samples, **params)
    seqs = [[START] for _ in range(samples)]
    steps = committed = 0
    while min(len(s) for s in seqs) <= LENGTH:
        roots = [s[-1] for s in seqs]
        seq_lens = [len(s) for s in seqs]  # prompt = START, so positions = token index
        layout = build_layout(roots, [trees[r] for r in roots], seq_lens, 5)
        logits = torch.from_numpy(table[layout.tokens])
        target = sample(logits, info, torch.from_numpy(layout.positions), layout.n)
        links = tuple(torch.from_numpy(x) for x in (
            layout.tokens, layout.retrieve_index, layout.next_token, layout.next_sibling))
        predict, accept_index, num_correct = walk(links, target, samples, layout.n, layout.n)
        predict, accept_index = predict.tolist(), accept_index.tolist()
        for s, rows, k in zip(seqs, accept_index, num_correct.tolist()):
            s.extend(predict[row] for row in rows[: k + 1])
        steps += 1
        committed += int(num_correct.sum()) + samples
    return np.array([s[1 : LENGTH + 1] for s in seqs]), committed / (steps * samples)


def exact_marginals(params: dict) -> np.ndarray:
    """[LENGTH, V]: distribution of the token at positions 1..LENGTH without speculation."""
    P = filtered_probs(chain_logits(), **params)
    dist = np.eye(V)[START]
    out = []
    for _ in range(LENGTH):
        dist = dist @ P
        out.append(dist)
    return np.array(out)


def goodness_of_fit(tokens: np.ndarray, params: dict) -> list[float]:
    """Chi-square p-value per position; cells with expected count < 5 are pooled."""
    pvals = []
    for t, expected in enumerate(exact_marginals(params) * len(tokens)):
        observed = np.bincount(tokens[:, t], minlength=V).astype(float)
        small = expected < 5
        if observed[expected == 0].sum() > 0:  # a filtered-out token was emitted
            pvals.append(0.0)
            continue
        obs = np.append(observed[~small], observed[small].sum())
        exp = np.append(expected[~small], expected[small].sum())
        exp *= obs.sum() / exp.sum()  # float rounding; scipy wants equal totals
        keep = exp > 0
        pvals.append(float(chisquare(obs[keep], exp[keep])[1]) if keep.sum() > 1 else 1.0)
    return pvals


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_committed_tokens_have_the_target_distribution(sglang_context, setting):
    tokens, per_step = decode_das(SETTINGS[setting])
    pvals = goodness_of_fit(tokens, SETTINGS[setting])
    print(f"{setting}: {per_step:.2f} tokens/verify, p-values {np.round(pvals, 4).tolist()}")
    assert per_step > 2.0  # drafts are really accepted, so the test has power
    assert min(pvals) > ALPHA / LENGTH


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_negative_control_greedy_acceptance_is_detected(sglang_context, setting):
    from das_test_doubles.workers import greedy_accept_target_tokens, greedy_accept_walk_trees

    tokens, per_step = decode_das(SETTINGS[setting], sample=greedy_accept_target_tokens,
                                  walk=greedy_accept_walk_trees)
    pvals = goodness_of_fit(tokens, SETTINGS[setting])
    print(f"greedy accept, {setting}: {per_step:.2f} tokens/verify, "
          f"p-values {np.round(pvals, 6).tolist()}")
    assert min(pvals) < ALPHA / LENGTH


def test_distribution_is_not_degenerate():
    # A goodness-of-fit test over (nearly) one token would pass vacuously.
    for params in SETTINGS.values():
        marg = exact_marginals(params)
        assert (marg.max(axis=1) < 0.9).all() and ((marg > 0.05).sum(axis=1) >= 2).all()
