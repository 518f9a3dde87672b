"""Torch implementations of the ``sgl_kernel`` CPU ops SGLang's tree-verify path calls.

CPU development mode only (served to SGLang through the ``sgl_kernel`` stand-in). Each
op follows the contract of the compiled op of the same name (argument order included)
and first checks its arguments as the real kernel does (:mod:`.contracts`: dtype, shape,
contiguity, device; RuntimeError naming the argument otherwise); in-place outputs are
written into the tensors passed in. Speed is not a goal: clarity is, since these ops are
part of what the end-to-end tests check.
"""

from __future__ import annotations

import ctypes

import torch

from das_sglang.sglang.cpu.contracts import (
    INDEX_DTYPES,
    check_same_dtype,
    check_tensor,
    check_value,
)

_I32, _I64 = torch.int32, torch.int64


def _check_cache_locs(op, req_pool_indices, req_to_token, start_offset, end_offset,
                      out_cache_loc, pool_len) -> None:
    """sgl_kernel's assign_extend_cache_locs_cpu / assign_req_to_token_pool_cpu checks."""
    bs = check_tensor(op, "req_pool_indices", req_pool_indices, dtype=INDEX_DTYPES, ndim=1).shape[0]
    check_tensor(op, "req_to_token", req_to_token, dtype=_I32, shape=(None, pool_len))
    check_tensor(op, "start_offset", start_offset, dtype=INDEX_DTYPES, shape=(bs,))
    check_tensor(op, "end_offset", end_offset, dtype=INDEX_DTYPES, shape=(bs,))
    check_same_dtype(op, "end_offset", end_offset, "start_offset", start_offset)
    check_tensor(op, "out_cache_loc", out_cache_loc, dtype=_I64, ndim=1)
    need = int((end_offset.to(_I64) - start_offset.to(_I64)).sum()) if bs else 0
    check_value(op, need <= out_cache_loc.numel(),
                f"out_cache_loc has {out_cache_loc.numel()} entries but offsets require {need}")


def assign_extend_cache_locs_cpu(
    req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len
) -> None:
    """Concatenate ``req_to_token[r, start:end]`` of every request into ``out_cache_loc``."""
    _check_cache_locs("assign_extend_cache_locs_cpu", req_pool_indices, req_to_token,
                      start_offset, end_offset, out_cache_loc, pool_len)
    where = _segments(req_pool_indices, start_offset, end_offset)
    if where is not None:  # one gather, as the kernel's one launch (no per-request Python)
        rows, cols = where
        out_cache_loc[: rows.numel()] = req_to_token[rows, cols]
        return
    pos = 0
    for r, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        out_cache_loc[pos : pos + e - s] = req_to_token[r, s:e]
        pos += e - s


def _segments(req_pool_indices, start_offset, end_offset):
    """(row, column) of every ``req_to_token`` slot the two ops touch, request by request
    in order; None where a request's end is before its start (the row-by-row loops keep
    what they did there) or nothing is touched."""
    starts, ends = start_offset.to(_I64), end_offset.to(_I64)
    lens = ends - starts
    if lens.numel() == 0 or bool((lens < 0).any()):
        return None
    total = int(lens.sum())
    if total == 0:
        return None
    first = torch.cumsum(lens, 0) - lens  # each request's first position in the output
    cols = torch.arange(total, dtype=_I64) + torch.repeat_interleave(starts - first, lens)
    return torch.repeat_interleave(req_pool_indices.to(_I64), lens), cols


def assign_req_to_token_pool_cpu(
    req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len
) -> None:
    """Inverse of :func:`assign_extend_cache_locs_cpu`: write the slots into ``req_to_token``."""
    _check_cache_locs("assign_req_to_token_pool_cpu", req_pool_indices, req_to_token,
                      start_offset, end_offset, out_cache_loc, pool_len)
    where = _segments(req_pool_indices, start_offset, end_offset)
    if where is not None and torch.unique(req_pool_indices).numel() == req_pool_indices.numel():
        rows, cols = where  # (distinct requests: no slot written twice, order-free)
        req_to_token[rows, cols] = out_cache_loc[: rows.numel()].to(req_to_token.dtype)
        return
    pos = 0
    for r, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        req_to_token[r, s:e] = out_cache_loc[pos : pos + e - s].to(req_to_token.dtype)
        pos += e - s


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc) -> None:
    """For every layer buffer (raw address + row stride in bytes) copy row src -> tgt.

    All source rows are read before any target row is written (moves may overlap).
    """
    op = "copy_all_layer_kv_cache_cpu"
    bufs = check_tensor(op, "data_ptrs", data_ptrs, dtype=torch.uint64, ndim=1).shape[0]
    check_tensor(op, "strides", strides, dtype=_I64, shape=(bufs,))
    locs = check_tensor(op, "tgt_loc", tgt_loc, dtype=INDEX_DTYPES, ndim=1).shape[0]
    check_tensor(op, "src_loc", src_loc, dtype=INDEX_DTYPES, shape=(locs,))
    check_same_dtype(op, "src_loc", src_loc, "tgt_loc", tgt_loc)
    if tgt_loc.numel() == 0:
        return
    src = src_loc.to(torch.int64)
    tgt = tgt_loc.to(torch.int64)
    rows = int(torch.maximum(src.max(), tgt.max())) + 1
    for address, stride in zip(data_ptrs.tolist(), strides.tolist()):
        raw = (ctypes.c_uint8 * (rows * stride)).from_address(address)
        buf = torch.frombuffer(raw, dtype=torch.uint8).view(rows, stride)
        buf[tgt] = buf[src].clone()


def reconstruct_indices_from_tree_mask(
    tree_mask,
    verified_seq_len,
    positions,
    retrieve_index,
    retrieve_next_token,
    retrieve_next_sibling,
    batch_size: int,
    draft_token_num: int,
) -> None:
    """Positions and first-child / next-sibling links from per-request ancestor masks.

    ``tree_mask[b, i, j]`` marks node ``j`` as node ``i`` or one of its ancestors.
    """
    # The JIT kernel's contract (tree.cuh): a flat 1-byte mask, int64 everything else.
    op = "reconstruct_indices_from_tree_mask"
    check_value(op, batch_size >= 0 and 0 < draft_token_num <= 1024,
                f"invalid batch_size={batch_size} / draft_token_num={draft_token_num}")
    bs, n = batch_size, draft_token_num
    check_tensor(op, "tree_mask", tree_mask, ndim=1)
    check_value(op, tree_mask.element_size() == 1,
                f"tree_mask must have a 1-byte dtype, got {tree_mask.dtype}")
    check_value(op, tree_mask.numel() >= bs * n * n,
                f"tree_mask has {tree_mask.numel()} entries, needs >= {bs * n * n}")
    check_tensor(op, "verified_seq_len", verified_seq_len, dtype=_I64, shape=(bs,))
    check_tensor(op, "positions", positions, dtype=_I64, shape=(bs * n,))
    for name, t in (("retrieve_index", retrieve_index), ("retrieve_next_token", retrieve_next_token),
                    ("retrieve_next_sibling", retrieve_next_sibling)):
        check_tensor(op, name, t, dtype=_I64, shape=(bs, n))
    n = draft_token_num
    mask = tree_mask.view(batch_size, n, n).to(torch.bool)
    for b in range(batch_size):
        parent = [-1] * n
        for i in range(n):
            anc = [j for j in range(i) if bool(mask[b, i, j])]
            parent[i] = anc[-1] if anc else -1
            positions[b * n + i] = int(verified_seq_len[b]) + len(anc)
            retrieve_index[b, i] = b * n + i
        first_child = [-1] * n
        next_sibling = [-1] * n
        last_child: dict[int, int] = {}
        for i in range(n):
            p = parent[i]
            if p < 0:
                continue
            if first_child[p] < 0:
                first_child[p] = i
            else:
                next_sibling[last_child[p]] = i
            last_child[p] = i
        retrieve_next_token[b] = torch.tensor(first_child, dtype=retrieve_next_token.dtype)
        retrieve_next_sibling[b] = torch.tensor(next_sibling, dtype=retrieve_next_sibling.dtype)


def verify_tree_greedy_cpu(
    predicts,
    accept_index,
    accept_token_num,
    candidates,
    retrive_index,
    retrive_next_token,
    retrive_next_sibling,
    target_predict,
) -> None:
    """Walk each tree from its root, accepting the child equal to the target's token.

    ``target_predict[b, i]`` is the target's token after verify row ``i``; the walk stops
    at the first level where no child matches. ``predicts`` (flat) receives the accepted
    tokens and the bonus token at the accepted rows; ``accept_index[b]`` the flat rows of
    the root and the accepted nodes; ``accept_token_num[b]`` the accepted draft count.
    """
    # The CUDA JIT kernel's contract (tree.cuh verify_tree_greedy), which the same call
    # sites meet on a GPU: int64 tree tensors and target, int32 outputs.
    op = "verify_tree_greedy"
    bs, n = check_tensor(op, "candidates", candidates, dtype=_I64, ndim=2).shape
    for name, t in (("retrive_index", retrive_index), ("retrive_next_token", retrive_next_token),
                    ("retrive_next_sibling", retrive_next_sibling),
                    ("target_predict", target_predict)):
        check_tensor(op, name, t, dtype=_I64, shape=(bs, n))
    check_tensor(op, "accept_index", accept_index, dtype=_I32, shape=(bs, None))
    check_tensor(op, "accept_token_num", accept_token_num, dtype=_I32, shape=(bs,))
    check_tensor(op, "predicts", predicts, dtype=_I32, shape=(bs * n,))
    check_value(op, n > 0 and accept_index.shape[1] > 0,
                f"draft_tokens={n} and spec_tokens={accept_index.shape[1]} must be > 0")
    bs, num_steps = accept_index.shape
    target = target_predict.reshape(-1).tolist()
    cand = candidates.tolist()
    rindex = retrive_index.tolist()
    next_token = retrive_next_token.tolist()
    next_sibling = retrive_next_sibling.tolist()
    for b in range(bs):
        last = rindex[b][0]
        accept_index[b, 0] = last
        accepted, cur = 0, 0
        for _ in range(1, num_steps):
            cur = next_token[b][cur]
            while cur != -1 and cand[b][cur] != target[last]:
                cur = next_sibling[b][cur]
            if cur == -1:
                break
            predicts[last] = target[last]
            accepted += 1
            last = rindex[b][cur]
            accept_index[b, accepted] = last
        accept_token_num[b] = accepted
        predicts[last] = target[last]


def fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, accept_out_cache_loc) -> None:
    """Compact ``out_cache_loc[accept_index]`` over the non-(-1) entries, in order."""
    op = "fill_accept_out_cache_loc_cpu"
    check_tensor(op, "accept_index", accept_index, dtype=INDEX_DTYPES)
    check_tensor(op, "out_cache_loc", out_cache_loc, dtype=_I64)
    check_tensor(op, "accept_out_cache_loc", accept_out_cache_loc, dtype=_I64)
    check_value(op, accept_out_cache_loc.numel() >= accept_index.numel(),
                f"accept_out_cache_loc has {accept_out_cache_loc.numel()} entries, needs >= "
                f"accept_index's {accept_index.numel()}")
    flat = accept_index.reshape(-1)
    kept = flat[flat != -1].to(torch.int64)
    accept_out_cache_loc[: kept.numel()] = out_cache_loc[kept]


def fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus_tokens, stride: int) -> None:
    """``bonus[b] = accept_tokens[b * stride + accept_lens[b] - 1]`` (the last accepted)."""
    op = "fill_bonus_tokens_cpu"
    bs = check_tensor(op, "accept_lens", accept_lens, dtype=_I32, ndim=1).shape[0]
    check_tensor(op, "accept_tokens", accept_tokens, dtype=_I32)
    check_tensor(op, "bonus_tokens", bonus_tokens, dtype=_I32, shape=(bs,))
    check_value(op, accept_tokens.numel() == bs * stride,
                f"accept_tokens has {accept_tokens.numel()} entries, expected bs * stride = "
                f"{bs * stride}")
    rows = torch.arange(accept_lens.numel(), device=accept_lens.device) * stride
    bonus_tokens.copy_(accept_tokens.reshape(-1)[rows + accept_lens.to(torch.int64) - 1])
