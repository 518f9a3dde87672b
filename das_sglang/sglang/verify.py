"""Lossless tree verification for greedy and sampled decoding.

SGLang's CPU verify is greedy even at temperature > 0, so DAS verifies the same way on
every device: **sample, then match**. For every verify row (the root and each draft
node) the target's next token is drawn with exactly the procedure SGLang's sampler uses
without speculation (same temperature / top-k / top-p / min-p handling, same functions),
then the tree is walked from the root accepting the child equal to the drawn token
(SGLang's own greedy tree-walk kernel).

Why this is lossless: the walk only ever uses the draw of the node it stands on, and
that draw is a sample of the target's next-token distribution given the committed text,
independent of the draft. So every emitted token has the target's distribution.

Seeded exactness: with ``--enable-deterministic-inference`` SGLang draws a token from
Gumbel noise keyed by (request seed, position). Verify row ``i`` sits at the position
the non-speculative decode would feed that token at (``seq_len + depth``), so its draw
uses the same key, and DAS output equals the non-speculative output token for token.
"""

from __future__ import annotations

import torch


def target_tokens(logits: torch.Tensor, sampling_info, positions: torch.Tensor, n: int):
    """The target's next token after every verify row: int [rows] (rows = bs * n).

    The dtype is the sampler's (argmax: int64; FlashInfer's sampling kernels: int32);
    :func:`walk_trees` converts to what the tree-walk kernel requires.
    """
    _apply_penalties(logits, sampling_info, n)
    return _sample(logits, sampling_info, positions, n)


def _sample(logits: torch.Tensor, sampling_info, positions: torch.Tensor, n: int):
    if sampling_info.is_all_greedy:
        return torch.argmax(logits, dim=-1)
    from sglang.kernels.ops.sampling import softmax as sampler_softmax
    from sglang.srt.runtime_context import get_exec

    def rows(t):
        return None if t is None else torch.repeat_interleave(t, n, dim=0)

    logits = logits / rows(sampling_info.temperatures)
    deterministic = get_exec().deterministic.enable_deterministic_inference
    probs = torch.softmax(logits, dim=-1) if deterministic else sampler_softmax(logits)
    seed = rows(sampling_info.sampling_seed)
    simple = not (
        sampling_info.need_top_p_sampling
        or sampling_info.need_top_k_sampling
        or sampling_info.need_min_p_sampling
    )
    if simple:
        from sglang.srt.layers.sampler import sampling_from_probs_torch

        return sampling_from_probs_torch(probs, sampling_seed=seed, positions=positions)
    backend = get_exec().kernel.sampling_backend
    if backend == "pytorch":
        from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch

        return top_k_top_p_min_p_sampling_from_probs_torch(
            probs,
            rows(sampling_info.top_ks),
            rows(sampling_info.top_ps),
            rows(sampling_info.min_ps),
            sampling_info.need_min_p_sampling,
            seed,
            positions,
            max_top_k=sampling_info.max_top_k,
        )
    return _flashinfer_filtered(probs, sampling_info, rows)


def _flashinfer_filtered(probs, sampling_info, rows):
    """GPU: the same FlashInfer sampling kernels SGLang's sampler calls."""
    from sglang.srt.layers.sampler import (
        min_p_sampling_from_probs,
        top_k_renorm_prob,
        top_k_top_p_sampling_from_probs,
        top_p_renorm_prob,
    )

    if sampling_info.need_min_p_sampling:
        probs = top_k_renorm_prob(probs, rows(sampling_info.top_ks))
        probs = top_p_renorm_prob(probs, rows(sampling_info.top_ps))
        return min_p_sampling_from_probs(probs, rows(sampling_info.min_ps))
    return top_k_top_p_sampling_from_probs(
        probs.contiguous(),
        rows(sampling_info.top_ks),
        rows(sampling_info.top_ps),
        filter_apply_order="joint",
    )


def _apply_penalties(logits: torch.Tensor, sampling_info, n: int) -> None:
    """Penalties, grammar mask, logit bias and custom logit processors per verify row,
    in SGLang's sampler order (``request_constraints``; rows past the root are exact
    only for requests drafted normally, the others are verified at width 0)."""
    from das_sglang.sglang.request_constraints import apply_logit_transforms

    apply_logit_transforms(logits, sampling_info, n)


def walk_trees(layout_tensors, target: torch.Tensor, bs: int, n: int, stride: int):
    """Accept, per request, the longest root path whose tokens equal the target's draws.

    Returns ``(predict [bs*n], accept_index [bs, stride], num_correct [bs])`` in SGLang's
    layout: ``accept_index[b]`` lists the flat rows of the root and accepted nodes (-1
    after), ``predict[row]`` the token committed after that row (accepted child or bonus).
    """
    from sglang.kernels.ops.speculative.spec_tree import verify_tree_greedy_func

    device = target.device
    tokens, retrieve_index, next_token, next_sibling = layout_tensors
    predict = torch.zeros(bs * n, dtype=torch.int32, device=device)
    accept_index = torch.full((bs, stride), -1, dtype=torch.int32, device=device)
    num_correct = torch.zeros(bs, dtype=torch.int32, device=device)
    verify_tree_greedy_func(
        predicts=predict,
        accept_index=accept_index,
        accept_token_num=num_correct,
        candidates=_kernel_index(tokens, bs, n),
        retrieve_index=_kernel_index(retrieve_index, bs, n),
        retrieve_next_token=_kernel_index(next_token, bs, n),
        retrieve_next_sibling=_kernel_index(next_sibling, bs, n),
        target_predict=_kernel_index(target, bs, n),
    )
    return predict, accept_index, num_correct


def _kernel_index(t: torch.Tensor, bs: int, n: int) -> torch.Tensor:
    """``[bs, n]`` contiguous int64, as the CUDA tree-walk kernel requires of its tree
    tensors and ``target_predict`` (FlashInfer's samplers return int32: without this,
    every sampled batch would fail on a GPU). No copy when already so."""
    return t.reshape(bs, n).to(torch.int64).contiguous()
