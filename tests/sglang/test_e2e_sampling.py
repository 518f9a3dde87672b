"""Sampled DAS on real SGLang has the non-speculative output distribution (CPU).

Many samples of one prompt, all siblings of one problem (so drafts come from each
other's text and are often accepted). For every generated position after the first
(the first comes from prefill, not verification) the token counts of DAS and of no
speculation are compared with a chi-square test of homogeneity.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy.stats import chi2_contingency

from sglang_engines import generate, launch

pytestmark = pytest.mark.sglang

PROMPT = [17, 42, 99, 5, 230, 11]
SAMPLES, BATCH, NEW_TOKENS = 256, 32, 8
SETTINGS = {
    "temperature": {"temperature": 0.7},
    "top_k_top_p": {"temperature": 0.6, "top_k": 8, "top_p": 0.9},
}


def sample(engine, params, tag: bool):
    params = dict(params, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    outs, metas = [], []
    for start in range(0, SAMPLES, BATCH):
        tags = [("sampled-problem", 1)] * BATCH if tag else None
        o, m = generate(engine, [PROMPT] * BATCH, params, tags)
        outs += o
        metas += m
    return outs, metas


@pytest.fixture(scope="module")
def samples(tiny_model):
    got = {}
    with launch(tiny_model, None) as engine:
        for name, params in SETTINGS.items():
            got[("none", name)] = sample(engine, params, tag=False)
    with launch(tiny_model, "DAS") as engine:
        for name, params in SETTINGS.items():
            got[("das", name)] = sample(engine, params, tag=True)
    return got


def homogeneity_p(a: list[int], b: list[int]) -> float:
    """Chi-square p-value that two token samples share one distribution; tokens seen
    fewer than 10 times in total are pooled into one category."""
    ca, cb = Counter(a), Counter(b)
    common = [t for t in ca.keys() | cb.keys() if ca[t] + cb[t] >= 10]
    rows = [[ca[t] for t in common], [cb[t] for t in common]]
    rows[0].append(len(a) - sum(rows[0]))
    rows[1].append(len(b) - sum(rows[1]))
    table = np.array(rows)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 1.0
    return float(chi2_contingency(table)[1])


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_token_distribution_matches_no_speculation(samples, setting):
    ref, _ = samples[("none", setting)]
    das, metas = samples[("das", setting)]
    accept = np.mean([m["spec_accept_length"] for m in metas])
    pvals = [homogeneity_p([o[t] for o in ref], [o[t] for o in das]) for t in range(1, NEW_TOKENS)]
    print(f"{setting}: accept length {accept:.2f}, p-values {np.round(pvals, 3).tolist()}")
    assert accept > 1.1  # verification really accepted drafts, so the test has teeth
    assert min(pvals) > 0.001 / len(pvals)  # Bonferroni over positions


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_samples_are_not_degenerate(samples, setting):
    ref, _ = samples[("none", setting)]
    # A distribution test over a single token would pass vacuously.
    assert len({o[2] for o in ref}) >= 3
