"""Requests whose next-token distribution depends on more than the text: exact verify.

SGLang's sampler, without speculation, turns the logits of one position into a token
in this order (``model_runner._preprocess_logits`` then ``Sampler.forward``):

1. penalties (frequency / presence / repetition / min_new_tokens), computed from the
   tokens generated *so far*;
2. the grammar's vocab mask (JSON schema / regex / EBNF / structural tag), from the
   grammar state *after the tokens so far*;
3. logit bias (static);
4. custom logit processors (arbitrary code, may read the request's state);
5. temperature / top-k / top-p / min-p, then the draw.

A draft row at depth d > 0 stands d tokens past what SGLang's penalizers, grammar and
processor states have seen, so 1, 2 and 4 would be wrong there (SGLang's own
speculative verify applies them "relaxed", i.e. at the root's state to every row).
DAS does not draft for such requests (:func:`needs_root_only`: budget 0, the root row
only), and applies 1-4 to every row in SGLang's order (:func:`apply_logit_transforms`):
the root row then gets exactly what the non-speculative sampler applies. Logit bias
alone is static, so it is exact at every row and such requests are drafted normally.
Watermarking is not handled (not supported with DAS).
"""

from __future__ import annotations

import torch


def needs_root_only(req) -> bool:
    """True when a draft row of ``req`` could not be verified exactly."""
    sp = req.sampling_params
    return bool(
        req.grammar is not None
        or req.custom_logit_processor
        or (sp.frequency_penalty or 0.0) != 0.0
        or (sp.presence_penalty or 0.0) != 0.0
        or (sp.repetition_penalty if sp.repetition_penalty is not None else 1.0) != 1.0
        or (sp.min_new_tokens or 0) > 0
    )


def _rows(t: torch.Tensor, n) -> torch.Tensor:
    """Per-request rows -> per-verify-row rows; ``n`` is the rows per request, an int
    (uniform layout) or an int tensor of per-request counts (ragged layout)."""
    if isinstance(n, int) and n == 1:
        return t
    return torch.repeat_interleave(t, n, dim=0)


def needs_uniform_rows(sampling_info) -> bool:
    """True when a transform of this batch takes one row count for every request
    (SGLang's penalizer orchestrator, grammar masks, custom logit processors): such a
    batch is verified in the uniform layout, never ragged."""
    orchestrator = getattr(sampling_info, "penalizer_orchestrator", None)
    grammars = getattr(sampling_info, "grammars", None)
    return bool(
        (orchestrator is not None and orchestrator.is_required)
        or (grammars and any(grammars))
        or getattr(sampling_info, "has_custom_logit_processor", False)
    )


def apply_logit_transforms(logits: torch.Tensor, sampling_info, n: int) -> None:
    """Steps 1-4 above, in place, on ``logits [bs * n, vocab]`` (n rows per request)."""
    _apply_penalties(logits, sampling_info, n)
    _apply_grammar(logits, sampling_info, n)
    if sampling_info.logit_bias is not None:
        logits.add_(_rows(sampling_info.logit_bias, n))
    if getattr(sampling_info, "has_custom_logit_processor", False):
        from sglang.srt.layers.sampler import apply_custom_logit_processor

        apply_custom_logit_processor(logits, sampling_info, num_tokens_in_batch=n)


def _apply_penalties(logits: torch.Tensor, sampling_info, n: int) -> None:
    # SamplingBatchInfo._apply_pre_grammar_logits_transforms, per verify row.
    if sampling_info.acc_additive_penalties is not None:
        logits.add_(_rows(sampling_info.acc_additive_penalties, n))
    if sampling_info.acc_scaling_penalties is not None:
        from sglang.srt.sampling.penaltylib.repetition_penalty import apply_scaling_penalties

        apply_scaling_penalties(logits, _rows(sampling_info.acc_scaling_penalties, n))
    orchestrator = getattr(sampling_info, "penalizer_orchestrator", None)
    if orchestrator is not None and orchestrator.is_required:
        orchestrator.apply(logits, repeat=None if n == 1 else n)


def _apply_grammar(logits: torch.Tensor, sampling_info, n: int) -> None:
    grammars = getattr(sampling_info, "grammars", None)
    if not grammars or not any(grammars):
        return
    sampling_info.update_regex_vocab_mask()  # the grammars' state after the text so far
    mask = sampling_info.grammar_mask
    sampling_info.grammar_mask = None  # released as model_runner._preprocess_logits does
    if mask is not None:
        mask.grammar.apply_vocab_mask(logits=logits, vocab_mask=_rows(mask.vocab_mask, n))
