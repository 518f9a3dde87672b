"""torch_native attention with tree-mask TARGET_VERIFY support (CPU development mode).

SGLang's ``TorchNativeAttnBackend`` has no TARGET_VERIFY path: it ignores
``spec_info.custom_mask``. This subclass handles TARGET_VERIFY with one batched SDPA
over every request's (committed prefix + verify tokens), keys padded to the longest
request: the prefix is fully visible, the verify tokens see each other through the
request's n x n ancestor mask, padding is masked out. A ragged verify (the verify
input carries SGLang's ``RaggedVerifyLayout``: request ``b`` verifies ``n_b`` tokens,
back to back) is read the same way with per-request ``n_b``: queries are gathered into
a ``[bs, max n_b]`` batch and scattered back to their ragged rows. Every other mode is the
parent's code, untouched. Registered under the ``torch_native`` name of
SGLang's attention registry by :func:`das_sglang.sglang.cpu.activate`.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from torch.nn.functional import scaled_dot_product_attention


class TreeVerifyTorchNativeAttnBackend(TorchNativeAttnBackend):
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if not forward_batch.forward_mode.is_target_verify():
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(
                layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v
            )
        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o = q.new_empty((q_.shape[0], layer.tp_q_head_num, layer.v_head_dim))
        ragged = getattr(forward_batch.spec_info, "ragged_verify_layout", None)
        if ragged is not None:
            self._ragged_verify_attention(q_, o, layer, forward_batch, ragged)
        else:
            self._verify_attention(q_, o, layer, forward_batch)
        return o.view(o.shape[0], -1)

    def _tree_masks(self, forward_batch, bs: int, n: int) -> torch.Tensor:
        """[bs, n, n] bool ancestor masks (the trailing n x n block of a full mask)."""
        mask = forward_batch.spec_info.custom_mask
        if mask.numel() == bs * n * n:
            return mask.view(bs, n, n).to(torch.bool)
        # Full-mask layout (prefix columns + tree columns, per request): keep the tree part.
        out, start = [], 0
        for prefix in forward_batch.seq_lens.tolist():
            block = mask[start : start + n * (prefix + n)].view(n, prefix + n)
            out.append(block[:, prefix:].to(torch.bool))
            start += n * (prefix + n)
        return torch.stack(out)

    def _verify_attention(self, q, o, layer, forward_batch) -> None:
        """One batched SDPA: keys padded to the longest request, padding masked out."""
        n = forward_batch.spec_info.draft_token_num
        seq_lens = forward_batch.seq_lens.to(torch.int64)
        bs = seq_lens.numel()
        trees = self._tree_masks(forward_batch, bs, n)
        kv_lens = seq_lens + n
        width = int(kv_lens.max())
        cols = torch.arange(width, device=q.device)
        rows = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices]
        slots = rows[:, :width].to(torch.int64) * (cols < kv_lens[:, None])  # pad -> slot 0
        allowed = (cols < seq_lens[:, None])[:, None, :].expand(bs, n, width).clone()
        tree_cols = seq_lens[:, None] + torch.arange(n, device=q.device)  # [bs, n]
        allowed.scatter_(2, tree_cols[:, None, :].expand(bs, n, n), trees)
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        key = k_cache[slots].to(q.dtype).permute(0, 2, 1, 3)  # [bs, heads, kv, dim]
        value = v_cache[slots].to(q.dtype).permute(0, 2, 1, 3)
        query = q.view(bs, n, q.shape[1], q.shape[2]).permute(0, 2, 1, 3)
        out = scaled_dot_product_attention(
            query, key, value, attn_mask=allowed[:, None], scale=layer.scaling,
            enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
        )
        o.copy_(out.permute(0, 2, 1, 3).reshape(o.shape))

    # ------------------------------------------------------------ ragged verify
    def _ragged_tree_masks(self, forward_batch, lens: torch.Tensor, width: int) -> torch.Tensor:
        """[bs, width, width] bool: request b's n_b x n_b ancestor mask top-left, False
        elsewhere. The custom mask is the tree blocks back to back (CPU form) or, per
        request, n_b rows of [prefix | tree] (the form FlashInfer reads)."""
        bs = lens.numel()
        mask = forward_batch.spec_info.custom_mask.to(torch.bool)
        out = torch.zeros((bs, width, width), dtype=torch.bool, device=mask.device)
        sq = lens * lens
        if mask.numel() == int(sq.sum()):
            b_of = torch.repeat_interleave(torch.arange(bs, device=mask.device), sq)
            first = (torch.cumsum(sq, 0) - sq)[b_of]  # where each entry's block starts
            local = torch.arange(mask.numel(), device=mask.device) - first
            n_of = lens[b_of]
            out[b_of, local // n_of, local % n_of] = mask
            return out
        start = 0
        for b, (prefix, k) in enumerate(zip(forward_batch.seq_lens.tolist(), lens.tolist())):
            block = mask[start : start + k * (prefix + k)].view(k, prefix + k)
            out[b, :k, :k] = block[:, prefix:]
            start += k * (prefix + k)
        return out

    def _ragged_verify_attention(self, q, o, layer, forward_batch, layout) -> None:
        """Per-request verify lengths: one batched SDPA over [bs, max n_b] queries (short
        requests' extra query rows see only key 0 and are dropped)."""
        lens = layout.verify_lens.to(torch.int64)
        starts = layout.qo_indptr_device[:-1].to(torch.int64)
        seq_lens = forward_batch.seq_lens.to(torch.int64)
        bs, n = lens.numel(), int(lens.max())
        trees = self._ragged_tree_masks(forward_batch, lens, n)
        kv_lens = seq_lens + lens
        width = int(kv_lens.max())
        cols = torch.arange(width, device=q.device)
        rows = self.req_to_token_pool.req_to_token[forward_batch.req_pool_indices]
        slots = rows[:, :width].to(torch.int64) * (cols < kv_lens[:, None])  # pad -> slot 0
        # Key column c of request b: prefix (c < seq_len_b, always visible) or tree
        # column j = c - seq_len_b (visible where the ancestor mask says, j < n_b).
        j = cols[None, :] - seq_lens[:, None]  # [bs, width]
        in_tree = (j >= 0) & (j < lens[:, None])
        tree_vals = trees.gather(2, j.clamp(0, n - 1)[:, None, :].expand(bs, n, width))
        allowed = (j < 0)[:, None, :] | (tree_vals & in_tree[:, None, :])
        qi = torch.arange(n, device=q.device)
        real_q = qi[None, :] < lens[:, None]  # [bs, n]
        allowed[:, :, 0] |= ~real_q  # pad queries: one visible key, output dropped
        k_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        key = k_cache[slots].to(q.dtype).permute(0, 2, 1, 3)  # [bs, heads, kv, dim]
        value = v_cache[slots].to(q.dtype).permute(0, 2, 1, 3)
        flat = starts[:, None] + torch.minimum(qi[None, :], (lens - 1)[:, None])  # [bs, n]
        query = q[flat.reshape(-1)].view(bs, n, q.shape[1], q.shape[2]).permute(0, 2, 1, 3)
        out = scaled_dot_product_attention(
            query, key, value, attn_mask=allowed[:, None], scale=layer.scaling,
            enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
        )
        out = out.permute(0, 2, 1, 3)  # [bs, n, heads, dim]
        o[flat[real_q]] = out[real_q].to(o.dtype)


def create_backend(runner):
    return TreeVerifyTorchNativeAttnBackend(runner)
