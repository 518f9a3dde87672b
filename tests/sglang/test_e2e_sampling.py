"""Sampled DAS on real SGLang has the non-speculative output distribution (CPU).

Many samples of one prompt, GRPO-style: a warm-up group of the problem in step 1 becomes
history, then the counted samples run as step-2 siblings of the same problem, so
drafts come from earlier rollouts. Settings are peaky (low temperature, small top-k) so
the tiny model's continuations repeat and drafts are accepted often: most committed
tokens then come through the acceptance path, not the bonus path, and a wrong acceptance
rule changes the distribution visibly. For every generated position after the first
(the first comes from prefill, not verification) the token counts of DAS and of no
speculation are compared with a chi-square test of homogeneity. The negative control
(the test plugin's ``DAS_GREEDY_ACCEPT``: drafts accepted when they equal the target's argmax,
SGLang's CPU rule) must be detected by the same test.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from das_sglang.sglang import sampling_check
from das_sglang.sglang.sampling_check import ALPHA, accepted_per_verify
from sglang_engines import generate, launch

pytestmark = pytest.mark.sglang

PROMPT = [17, 42, 99, 5, 230, 11]
SAMPLES, WARMUP, BATCH, NEW_TOKENS = 320, 64, 32, 10
SETTINGS = {
    "top_k": {"temperature": 1.0, "top_k": 2},
    "low_temperature_top_k_top_p": {"temperature": 0.3, "top_k": 3, "top_p": 0.9},
}
# Always verify the full width: the length-aware policy would trim budgets that the
# cost model deems unprofitable, and every accepted draft adds to the test's power.
FULL_WIDTH = {"DAS_CONFIG": '{"server": {"policy": "unlimited"}}'}


def sample(engine, params, n: int, tag=None):
    params = dict(params, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    outs, metas = [], []
    for _ in range(0, n, BATCH):
        o, m = generate(engine, [PROMPT] * BATCH, params, [tag] * BATCH if tag else None)
        outs += o
        metas += m
    return outs, metas


def sample_das(engine):
    got = {}
    for name, params in SETTINGS.items():
        sample(engine, params, WARMUP, tag=(name, 1))  # history for step 2
        got[name] = sample(engine, params, SAMPLES, tag=(name, 2))
    return got


@pytest.fixture(scope="module")
def das_stats(tmp_path_factory):
    return tmp_path_factory.mktemp("das-stats") / "stats.json"


@pytest.fixture(scope="module")
def samples(tiny_model, das_stats):
    got = {}
    with launch(tiny_model, None) as engine:
        for name, params in SETTINGS.items():
            got[("none", name)] = sample(engine, params, SAMPLES)
    # default verify layout (ragged on CPU); the counters say it was ragged
    env = {"DAS_CONFIG": json.dumps({"server": {"policy": "unlimited",
                                                "stats_path": str(das_stats)}})}
    with launch(tiny_model, "DAS", env=env) as engine:
        got.update({("das", k): v for k, v in sample_das(engine).items()})
    return got


def test_sampled_batches_were_verified_ragged(samples, das_stats):
    stats = json.loads(das_stats.read_text())
    print(f"worker counters: {stats}")
    assert stats["layout"] == "ragged" and stats["ragged_steps"] > 0


@pytest.fixture(scope="module")
def greedy_accept_samples(tiny_model):
    from das_test_doubles import GREEDY_ACCEPT

    with launch(tiny_model, GREEDY_ACCEPT, env=FULL_WIDTH) as engine:
        return sample_das(engine)


def position_pvalues(ref, got) -> list[float]:
    return sampling_check.position_pvalues(ref, got, NEW_TOKENS)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_token_distribution_matches_no_speculation(samples, setting):
    ref, _ = samples[("none", setting)]
    das, metas = samples[("das", setting)]
    accepted = accepted_per_verify(metas)
    pvals = position_pvalues(ref, das)
    print(f"{setting}: {accepted:.2f} drafts accepted per verify, "
          f"p-values {np.round(pvals, 4).tolist()}")
    assert accepted > 1.0  # most tokens pass through acceptance: the test has teeth
    assert min(pvals) > ALPHA / len(pvals)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_negative_control_greedy_acceptance_is_detected(samples, greedy_accept_samples, setting):
    ref, _ = samples[("none", setting)]
    bad, metas = greedy_accept_samples[setting]
    pvals = position_pvalues(ref, bad)
    print(f"greedy accept, {setting}: {accepted_per_verify(metas):.2f} drafts accepted per "
          f"verify, p-values {np.array(pvals).round(8).tolist()}")
    assert min(pvals) < ALPHA / len(pvals)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_samples_are_not_degenerate(samples, setting):
    ref, _ = samples[("none", setting)]
    # A distribution test over (nearly) a single token would pass vacuously.
    for t in range(1, NEW_TOKENS):
        counts = Counter(o[t] for o in ref)
        assert len(counts) >= 2 and max(counts.values()) < 0.95 * SAMPLES, t
