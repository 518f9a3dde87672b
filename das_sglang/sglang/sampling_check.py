"""Statistics that check sampled speculative decoding against no speculation.

Shared by the CPU end-to-end sampling test (``tests/sglang/test_e2e_sampling.py``) and the
GPU kit (``benchmarks/gpu/``): many samples of one prompt are drawn with and without
speculation, and the token counts at every generated position are compared with a
chi-square test of homogeneity (Bonferroni over the positions). Positions start at 1:
the first token comes from prefill, not from verification. The check only has teeth when
drafts are actually accepted, so :func:`accepted_per_verify` is reported beside it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

ALPHA = 1e-3  # family-wise, Bonferroni over the positions


def homogeneity_p(a: Sequence[int], b: Sequence[int]) -> float:
    """Chi-square p-value that two token samples share one distribution; tokens seen
    fewer than 10 times in total are pooled into one category."""
    from scipy.stats import chi2_contingency

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


def position_pvalues(ref: Sequence[Sequence[int]], got: Sequence[Sequence[int]],
                     new_tokens: int) -> list[float]:
    """One homogeneity p-value per generated position 1 .. new_tokens - 1."""
    return [homogeneity_p([o[t] for o in ref], [o[t] for o in got]) for t in range(1, new_tokens)]


def accepted_per_verify(metas: Sequence[Mapping]) -> float:
    """Draft tokens accepted per verify forward (bonus and prefill token excluded), over
    the requests that verified at all; 0.0 when none did."""
    done = [m for m in metas if m.get("spec_verify_ct", 0) > 0]
    if not done:
        return 0.0
    return float(np.mean([(m["completion_tokens"] - 1) / m["spec_verify_ct"] - 1 for m in done]))


@dataclass(frozen=True, slots=True)
class SamplingVerdict:
    """Outcome of one sampled comparison: ``ok`` when the distributions match at level
    ``alpha`` (Bonferroni) *and* enough drafts were accepted for the test to have teeth."""

    pvalues: list[float]
    accepted_per_verify: float
    min_accepted: float
    alpha: float = ALPHA

    @property
    def distributions_match(self) -> bool:
        return not self.pvalues or min(self.pvalues) > self.alpha / len(self.pvalues)

    @property
    def has_teeth(self) -> bool:
        return self.accepted_per_verify > self.min_accepted

    @property
    def ok(self) -> bool:
        return self.distributions_match and self.has_teeth

    def as_dict(self) -> dict:
        return {"ok": self.ok, "distributions_match": self.distributions_match,
                "has_teeth": self.has_teeth, "accepted_per_verify": self.accepted_per_verify,
                "min_accepted_per_verify": self.min_accepted, "alpha": self.alpha,
                "min_pvalue": min(self.pvalues) if self.pvalues else None,
                "pvalues": self.pvalues}


def compare(ref: Sequence[Sequence[int]], got: Sequence[Sequence[int]], metas: Sequence[Mapping],
            new_tokens: int, min_accepted: float = 1.0, alpha: float = ALPHA) -> SamplingVerdict:
    """The verdict for speculative samples ``got`` (with their ``meta_info``) against
    non-speculative samples ``ref`` of the same prompt and settings."""
    return SamplingVerdict(position_pvalues(ref, got, new_tokens), accepted_per_verify(metas),
                           min_accepted, alpha)
