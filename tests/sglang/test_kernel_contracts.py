"""Every CPU stand-in op enforces its real kernel's argument contract (dtype, shape,
contiguity, device) and rejects a violation as the real op does: RuntimeError, naming the
argument. Contracts: SGLang 0.5.23's CUDA JIT kernels (``kernels/jit/csrc/speculative/
tree.cuh``) where the op has one, else the compiled ``sgl_kernel`` CPU op (see
``das_sglang/sglang/cpu/contracts.py``)."""

from __future__ import annotations

import pytest
import torch

from das_sglang.sglang.cpu import ops

I32, I64 = torch.int32, torch.int64


def _verify_args():
    bs, n, steps = 2, 4, 4
    return dict(
        predicts=torch.zeros(bs * n, dtype=I32),
        accept_index=torch.full((bs, steps), -1, dtype=I32),
        accept_token_num=torch.zeros(bs, dtype=I32),
        candidates=torch.tensor([[7, 1, 2, 3], [5, 6, 6, 6]], dtype=I64),
        retrive_index=torch.arange(bs * n, dtype=I64).view(bs, n),
        retrive_next_token=torch.tensor([[1, 2, -1, -1], [1, -1, -1, -1]], dtype=I64),
        retrive_next_sibling=torch.tensor([[-1, 3, -1, -1], [-1, -1, -1, -1]], dtype=I64),
        target_predict=torch.tensor([[3, 9, 9, 5], [6, 1, 1, 1]], dtype=I64),
    )


def _reconstruct_args():
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool).flatten()
    return dict(
        tree_mask=mask, verified_seq_len=torch.tensor([10], dtype=I64),
        positions=torch.zeros(3, dtype=I64), retrieve_index=torch.zeros(1, 3, dtype=I64),
        retrieve_next_token=torch.zeros(1, 3, dtype=I64),
        retrieve_next_sibling=torch.zeros(1, 3, dtype=I64), batch_size=1, draft_token_num=3,
    )


def _cache_loc_args():
    return dict(
        req_pool_indices=torch.tensor([2, 0], dtype=I64),
        req_to_token=torch.arange(40, dtype=I32).view(4, 10),
        start_offset=torch.tensor([1, 7], dtype=I64), end_offset=torch.tensor([3, 10], dtype=I64),
        out_cache_loc=torch.zeros(5, dtype=I64), pool_len=10,
    )


_KV = torch.zeros(4, 3)  # 4 rows of 12 bytes, the raw buffer copy_all_layer_kv_cache moves


def _kv_copy_args():
    return dict(
        data_ptrs=torch.tensor([_KV.data_ptr()], dtype=torch.uint64),
        strides=torch.tensor([12], dtype=I64),
        tgt_loc=torch.tensor([0, 1], dtype=I64), src_loc=torch.tensor([2, 0], dtype=I64),
    )


def _fill_accept_args():
    return dict(
        accept_index=torch.tensor([[0, 2, -1], [3, -1, -1]], dtype=I32),
        out_cache_loc=torch.arange(100, 106, dtype=I64),
        accept_out_cache_loc=torch.zeros(6, dtype=I64),
    )


def _fill_bonus_args():
    return dict(
        accept_tokens=torch.arange(5, 11, dtype=I32), accept_lens=torch.tensor([2, 1], dtype=I32),
        bonus_tokens=torch.zeros(2, dtype=I32), stride=3,
    )


# op -> (valid arguments, {tensor argument: a dtype the real kernel rejects})
CASES = {
    "verify_tree_greedy_cpu": (_verify_args, {
        "predicts": I64, "accept_index": I64, "accept_token_num": I64, "candidates": I32,
        "retrive_index": I32, "retrive_next_token": I32, "retrive_next_sibling": I32,
        "target_predict": I32}),
    "reconstruct_indices_from_tree_mask": (_reconstruct_args, {
        "tree_mask": I32, "verified_seq_len": I32, "positions": I32, "retrieve_index": I32,
        "retrieve_next_token": I32, "retrieve_next_sibling": I32}),
    "assign_extend_cache_locs_cpu": (_cache_loc_args, {
        "req_pool_indices": torch.float32, "req_to_token": I64, "start_offset": torch.float32,
        "end_offset": I32, "out_cache_loc": I32}),
    "assign_req_to_token_pool_cpu": (_cache_loc_args, {
        "req_pool_indices": torch.float32, "req_to_token": I64, "start_offset": torch.float32,
        "end_offset": I32, "out_cache_loc": I32}),
    "copy_all_layer_kv_cache_cpu": (_kv_copy_args, {
        "data_ptrs": I64, "strides": I32, "tgt_loc": torch.float32, "src_loc": I32}),
    "fill_accept_out_cache_loc_cpu": (_fill_accept_args, {
        "accept_index": torch.float32, "out_cache_loc": I32, "accept_out_cache_loc": I32}),
    "fill_bonus_tokens_cpu": (_fill_bonus_args, {
        "accept_tokens": I64, "accept_lens": I64, "bonus_tokens": I64}),
}
WRONG_DTYPE = [(op, arg, dtype) for op, (_, wrong) in CASES.items() for arg, dtype in wrong.items()]


def _standin(op: str):
    """The op as SGLang imports it on the CPU: from the ``sgl_kernel`` stand-in."""
    import sgl_kernel
    import sgl_kernel.speculative

    return getattr(sgl_kernel.speculative if op.startswith("reconstruct") else sgl_kernel, op)


def test_every_standin_op_has_a_contract_case():
    served = {name for name in vars(ops) if not name.startswith("_") and callable(getattr(ops, name))
              and getattr(ops, name).__module__ == ops.__name__}
    assert served == set(CASES)


@pytest.mark.parametrize("op", sorted(CASES))
def test_valid_arguments_pass(op):
    build, _ = CASES[op]
    _standin(op)(**build())


@pytest.mark.parametrize("op, arg, dtype", WRONG_DTYPE)
def test_wrong_dtype_is_rejected_naming_the_argument(op, arg, dtype):
    build, _ = CASES[op]
    args = build()
    args[arg] = args[arg].to(dtype)
    with pytest.raises(RuntimeError, match=rf"{op.removesuffix('_cpu')}\w*: {arg} .*{str(dtype)[6:]}"):
        _standin(op)(**args)


# op -> (argument, a shape the real kernel rejects)
MISSHAPED = {
    "verify_tree_greedy_cpu": ("target_predict", lambda t: t.reshape(-1)),  # must be [bs, n]
    "reconstruct_indices_from_tree_mask": ("positions", lambda t: t[:2]),  # [bs * n]
    "assign_extend_cache_locs_cpu": ("req_to_token", lambda t: t.reshape(-1)),  # 2-D
    "assign_req_to_token_pool_cpu": ("end_offset", lambda t: t[:1]),  # [bs]
    "copy_all_layer_kv_cache_cpu": ("src_loc", lambda t: t[:1]),  # as many as tgt_loc
    "fill_accept_out_cache_loc_cpu": ("accept_out_cache_loc", lambda t: t[:3]),  # >= index
    "fill_bonus_tokens_cpu": ("bonus_tokens", lambda t: t[:1]),  # [bs]
}


@pytest.mark.parametrize("op", sorted(CASES))
def test_non_contiguous_and_misshaped_tensors_are_rejected(op):
    build, wrong = CASES[op]
    args = build()
    arg = next(a for a in wrong if args[a].numel() > 1)
    t = args[arg]
    args[arg] = torch.stack([t, t], dim=-1)[..., 0]  # same values, strided
    with pytest.raises(RuntimeError, match=f"{arg} must be contiguous"):
        _standin(op)(**args)
    arg, misshape = MISSHAPED[op]
    args = build()
    args[arg] = misshape(args[arg])
    with pytest.raises(RuntimeError, match=arg):
        _standin(op)(**args)


def test_sglang_verify_tree_greedy_func_rejects_int32_target_predict():
    """The exact call SGLang's tree verify makes, through SGLang's own dispatcher."""
    from sglang.kernels.ops.speculative.spec_tree import verify_tree_greedy_func

    args = _verify_args()
    args["target_predict"] = args["target_predict"].to(I32)  # what FlashInfer sampling returns
    kwargs = {k.replace("retrive", "retrieve"): v for k, v in args.items()}
    with pytest.raises(RuntimeError, match="target_predict must have dtype int64, got int32"):
        verify_tree_greedy_func(**kwargs)
    kwargs["target_predict"] = kwargs["target_predict"].to(I64)
    verify_tree_greedy_func(**kwargs)
    assert kwargs["accept_token_num"].tolist() == [1, 1]


def test_walk_trees_accepts_sampler_int32_tokens():
    """verify.walk_trees hands the kernel int64 whatever dtype the sampler returned."""
    from das_sglang.sglang.verify import walk_trees

    a = _verify_args()
    links = (a["candidates"].view(-1).to(I32), a["retrive_index"], a["retrive_next_token"],
             a["retrive_next_sibling"])
    results = [walk_trees(links, a["target_predict"].view(-1).to(dtype), 2, 4, 4)
               for dtype in (I32, I64)]
    for got in zip(*results):
        assert torch.equal(*got)
    predict, accept_index, num_correct = results[0]
    assert num_correct.tolist() == [1, 1] and accept_index[0, :2].tolist() == [0, 3]
    assert predict[[0, 3]].tolist() == [3, 5]
