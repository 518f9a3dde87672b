"""Ragged tree verification: every request verifies its own tree size in one forward.

The uniform layout pads every request to the batch's widest tree, so a batch where one
request drafts 7 nodes and 31 draft none verifies 32 x 8 tokens. Here request ``b``
verifies ``verify_lens[b] = budget_b + 1`` tokens (1 = a plain decode step), back to
back, and the target processes ``sum(verify_lens)`` tokens.

Built on SGLang's own ragged-verify pieces (``speculative/ragged_verify.py``):

- the verify input carries a :class:`RaggedVerifyLayout` (per-request verify lengths,
  ``qo_indptr`` from SGLang's ``BuildQoIndptr``), the field SGLang's attention
  backends and graph runner read (``SpecInput.ragged_verify_layout``);
- FlashInfer's TARGET_VERIFY takes its CSR arguments from the verify input's
  ``generate_attn_arg_prefill``: ours returns the ragged ``qo_indptr``, KV lengths
  widened by each request's own verify length and the ragged custom mask, as SGLang's
  DFLASH verify input does for its ragged layout. FlashInfer refuses ragged verify
  under CUDA graphs, so ragged steps run eagerly (``num_tokens_per_req = 1``, SGLang's
  convention for ragged forwards, never matches a captured width); a step whose every
  request verifies the full width is submitted uniform and may replay a graph;
- on the CPU, the torch_native subclass (``cpu/attention.py``) reads the same layout;
- the tree walk is SGLang's ``verify_tree_greedy`` kernel unchanged: its link arrays
  stay dense ``[bs, n]`` and ``retrieve_index`` maps each column to its ragged row,
  where the kernel reads the target token and writes ``predicts``/``accept_index``
  (flat, as its contract indexes them);
- the KV mover is SGLang's ``move_accept_tokens_to_target_kvcache``: it reads each
  request's verify window as a ``[bs, stride]`` view of ``out_cache_loc``, so it is
  given that dense window (the ragged slots, rows padded) and ``accept_index`` in
  window coordinates.

Backends without a ragged TARGET_VERIFY path (Triton, FA3, TRT-LLM, ...: their verify
metadata is ``bs x num_tokens_per_req``) keep the uniform layout; the choice is made
once at worker start and logged (:func:`choose_layout`).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
from sglang.srt.speculative.ngram_info import NgramVerifyInput
from sglang.srt.speculative.ragged_verify import RaggedVerifyLayout

from das_sglang.sglang.options import VERIFY_LAYOUTS as LAYOUTS
from das_sglang.sglang.verify import walk_trees

_log = logging.getLogger(__name__)


def verify_backend_name() -> str:
    """Name of the attention backend SGLang will run TARGET_VERIFY with (resolved from
    the server args before the backends exist: the draft worker is built first)."""
    from sglang.srt.runtime_context import attention_backends, get_spec

    prefill, decode = attention_backends()
    if prefill == decode:
        return str(prefill)
    mode = get_spec().speculative_attention_mode
    return str(decode if mode == "decode" else prefill)


def _cpu_tree_verify_registered() -> bool:
    """CPU development mode registered its tree-verify subclass as ``torch_native``."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from das_sglang.sglang.cpu import attention

    return ATTENTION_BACKENDS.get("torch_native") is attention.create_backend


def name_supports_ragged(name: str) -> bool:
    if name == "flashinfer":
        return True
    return name == "torch_native" and _cpu_tree_verify_registered()


def choose_layout(requested: str, backend_name: str, lora: bool = False) -> str:
    """``ragged`` or ``uniform`` for this worker, logged once at start-up.

    Ragged verify is supported on FlashInfer (eager TARGET_VERIFY) and, in CPU
    development mode, on torch_native (our subclass); every other backend (Triton, FA3,
    TRT-LLM, aiter, ...) plans TARGET_VERIFY as ``bs x num_tokens_per_req`` and keeps
    the uniform layout, as does LoRA (its batch info sizes verify rows the same way).
    ``auto`` takes ragged where supported; an explicit ``ragged`` without support is
    refused (padding silently would not be what was asked for)."""
    if requested not in LAYOUTS:
        raise ValueError(f"invalid verify layout {requested!r}: choose one of {LAYOUTS}")
    ok = name_supports_ragged(backend_name) and not lora
    what = backend_name + (" with LoRA" if lora else "")
    if requested == "ragged" and not ok:
        raise ValueError(
            f"DAS server.verify_layout='ragged' needs a TARGET_VERIFY backend with ragged "
            f"support (flashinfer, or torch_native in CPU development mode); the verify "
            f"backend is {what}. Use 'auto' or 'uniform'."
        )
    layout = "ragged" if (ok and requested != "uniform") else "uniform"
    _log.info(
        "DAS verify layout: %s (requested %s; TARGET_VERIFY backend %s %s ragged verify)",
        layout, requested, what, "supports" if ok else "does not support",
    )
    return layout


def confirm_layout(layout: str, attn_backend) -> str:
    """At the first verify step, with the backend object built: keep ``ragged`` only if
    the object that runs TARGET_VERIFY is one whose ragged path is known (a model may
    wrap the configured backend, e.g. hybrid linear attention); else uniform, logged."""
    if layout != "ragged":
        return layout
    from sglang.srt.layers.attention.hybrid_attn_backend import HybridAttnBackend

    from das_sglang.sglang.cpu.attention import TreeVerifyTorchNativeAttnBackend

    backend = attn_backend
    if isinstance(backend, HybridAttnBackend):
        backend = backend.decode_backend if backend.spec_attn_is_decode else (
            backend.prefill_backend)
    ok = isinstance(backend, TreeVerifyTorchNativeAttnBackend)
    if not ok:
        try:
            from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

            ok = type(backend) is FlashInferAttnBackend
        except Exception:  # noqa: BLE001 - flashinfer not importable: not this backend
            ok = False
    if not ok:
        _log.warning("DAS verify layout: the TARGET_VERIFY backend object is %s, which has "
                     "no ragged verify path here; verifying uniform (padded) instead",
                     type(backend).__name__)
        return "uniform"
    return layout


class DasVerifyInput(NgramVerifyInput):
    """NGRAM's verify input with per-request verify lengths (``ragged_verify_layout``)."""

    def __init__(self, *, layout: RaggedVerifyLayout, total_tokens: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.ragged_verify_layout = layout
        # verify rows in all (layout_from_inputs' layout has no host total of its own)
        self.total_tokens = layout.total_verify_tokens if total_tokens is None else int(total_tokens)
        # SGLang's convention for ragged forwards (spec_info.py): 1 here, so no
        # uniform-width consumer (graph replay, fast plans) mistakes it for uniform.
        self.num_tokens_per_req = 1
        self.num_tokens_for_logprob_per_req = 1

    def generate_attn_arg_prefill(self, *, req_pool_indices, paged_kernel_lens,
                                  paged_kernel_lens_sum, translator, plan, kind=None):
        """FlashInfer's CSR verify arguments for the ragged layout: ``qo_indptr`` of the
        verify lengths, each request's KV widened by its own verify length."""
        from sglang.srt.mem_cache.kv_loc_plan import IdSpaceKind

        layout = self.ragged_verify_layout
        bs = req_pool_indices.numel()
        if layout.bs != bs:
            # Only a CUDA-graph replay pads the batch; ragged steps never replay one.
            raise RuntimeError(
                f"DAS ragged verify planned for {bs} requests but its layout has "
                f"{layout.bs}: ragged verify runs eagerly only"
            )
        device = req_pool_indices.device
        verify_lens = layout.verify_lens.to(device)
        kv_lens = paged_kernel_lens + verify_lens
        cum_kv_seq_len = torch.zeros((bs + 1,), dtype=torch.int32, device=device)
        cum_kv_seq_len[1:] = torch.cumsum(kv_lens, dim=0)
        kv_indices = torch.empty(
            paged_kernel_lens_sum + self.total_tokens, dtype=torch.int32,
            device=device,
        )
        translator.pack_read_stream(
            plan, req_pool_indices=req_pool_indices, seq_lens=kv_lens,
            indptr=cum_kv_seq_len, out=kv_indices,
            kind=IdSpaceKind.FULL if kind is None else kind,
        )
        self.qo_indptr = layout.qo_indptr_device
        return kv_indices, cum_kv_seq_len, self.qo_indptr, self.custom_mask


def layout_from_inputs(inputs, total: int) -> RaggedVerifyLayout:
    """SGLang's layout for eager verify from the worker's packed inputs
    (``tree_inputs.ragged_device_inputs``: the int32 lengths, ``qo_indptr`` and start
    locations computed on the host with the rest and copied with them): the object
    ``from_verify_lens_device`` assembles, without its device ops (a dtype conversion and
    the qo_indptr kernel: two launches a step on a GPU, ~0.2 ms of host time at 512 rows
    on the CPU). The same fields (tests/sglang/test_ragged_layout.py)."""
    return RaggedVerifyLayout(verify_lens=inputs.verify_lens32, graph_num_tokens=int(total),
                              extend_start_loc=inputs.extend_start_loc, qo_indptr_device=inputs.qo_indptr)


def walk_ragged(candidates, retrieve_index, next_token, next_sibling, target, stride: int,
                greedy_accept=None):
    """SGLang's greedy tree walk over a ragged verify.

    ``target`` holds the target's token after every ragged row (``[total]``). The
    kernel's contract is dense (``target_predict`` ``[bs, n]``, ``predicts``
    ``[bs * n]``) but it indexes both by ``retrieve_index``, i.e. by ragged row, so the
    ragged rows fill the first ``total`` entries of dense buffers (``total <= bs * n``)
    and the walk is :func:`verify.walk_trees` itself.
    Returns ``(predict [bs*n], accept_index [bs, stride], num_correct [bs])`` with
    ragged rows in ``accept_index``.
    """
    bs, n = candidates.shape
    total = target.numel()

    def dense(t):
        out = torch.zeros(bs * n, dtype=torch.int64, device=t.device)
        out[:total] = t.to(torch.int64)
        return out

    links = (candidates, retrieve_index, next_token, next_sibling)
    walked = target if greedy_accept is None else greedy_accept
    predict, accept_index, num_correct = walk_trees(links, dense(walked), bs, n, stride)
    if greedy_accept is not None:  # negative control (tests): the bonus stays sampled
        bonus = accept_index.gather(1, num_correct.long()[:, None]).view(-1).long()
        predict[bonus] = target[bonus].to(predict.dtype)
    return predict, accept_index, num_correct


def move_accepted_kv(batch, offsets, verify_lens, accept_index, num_correct, allocator,
                     stride: int) -> None:
    """Keep the accepted KV of a ragged verify with SGLang's mover.

    The mover views ``out_cache_loc`` as ``[bs, window]`` (request ``b``'s verify slots
    in row ``b``) and reads ``out_cache_loc[accept_index]``; it gets the ragged slots
    laid out as that dense window (short rows padded with their last slot, never read:
    targets are the first ``accept_len <= verify_len`` slots, sources accepted rows) and
    ``accept_index`` translated from ragged rows to window coordinates."""
    from sglang.srt.speculative.spec_utils import move_accept_tokens_to_target_kvcache

    bs = offsets.numel()
    cols = torch.arange(stride, device=offsets.device)
    within = torch.minimum(cols[None, :], (verify_lens - 1)[:, None])
    window = batch.out_cache_loc[(offsets[:, None] + within).reshape(-1)]
    valid = accept_index >= 0
    local = accept_index.to(torch.int64) - offsets[:, None]
    rows = torch.arange(bs, device=offsets.device)[:, None] * stride
    window_index = torch.where(valid, rows + local, -1).to(accept_index.dtype)
    view = SimpleNamespace(seq_lens=batch.seq_lens, out_cache_loc=window)
    move_accept_tokens_to_target_kvcache(view, window_index, num_correct, allocator)
