"""The torch stand-ins of SGLang's CPU speculative ops, on hand-checked examples."""

from __future__ import annotations

import torch

from das_sglang.sglang.cpu import ops


def test_reconstruct_indices_matches_hand_example():
    # root(0) -> a(1) -> b(2); root -> c(3)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    pos = torch.zeros(4, dtype=torch.int64)
    idx, nxt, sib = (torch.zeros(1, 4, dtype=torch.int64) for _ in range(3))
    ops.reconstruct_indices_from_tree_mask(mask.flatten(), torch.tensor([10]), pos, idx, nxt, sib, 1, 4)
    assert pos.tolist() == [10, 11, 12, 11]
    assert nxt.tolist() == [[1, 2, -1, -1]]
    assert sib.tolist() == [[-1, 3, -1, -1]]


def test_verify_tree_greedy_walks_siblings_and_records_bonus():
    cand = torch.tensor([[7, 1, 2, 3]])  # root 7; children 1 (-> 2) and 3
    nxt = torch.tensor([[1, 2, -1, -1]])
    sib = torch.tensor([[-1, 3, -1, -1]])
    target = torch.tensor([[3, 9, 9, 5]])  # after root: 3 (the second child); after 3: 5
    predict = torch.zeros(4, dtype=torch.int32)
    accept = torch.full((1, 4), -1, dtype=torch.int32)
    count = torch.zeros(1, dtype=torch.int32)
    ops.verify_tree_greedy_cpu(predict, accept, count, cand, torch.arange(4).view(1, 4), nxt, sib,
                               target)
    assert count.tolist() == [1]
    assert accept.tolist() == [[0, 3, -1, -1]]
    assert predict[[0, 3]].tolist() == [3, 5]  # accepted token, then the bonus


def test_cache_loc_ops_are_inverse():
    req_to_token = torch.arange(40, dtype=torch.int32).view(4, 10)
    out = torch.zeros(5, dtype=torch.int64)
    ops.assign_extend_cache_locs_cpu(torch.tensor([2, 0]), req_to_token, torch.tensor([1, 7]),
                                     torch.tensor([3, 10]), out, 10)
    assert out.tolist() == [21, 22, 7, 8, 9]
    fresh = torch.zeros_like(req_to_token)
    ops.assign_req_to_token_pool_cpu(torch.tensor([2, 0]), fresh, torch.tensor([1, 7]),
                                     torch.tensor([3, 10]), out, 10)
    assert fresh[2, 1:3].tolist() == [21, 22] and fresh[0, 7:10].tolist() == [7, 8, 9]


def test_fill_ops_and_raw_kv_copy():
    accept_index = torch.tensor([[0, 2, -1], [3, -1, -1]])
    out_cache = torch.tensor([100, 101, 102, 103, 104, 105])
    dst = torch.zeros(6, dtype=torch.int64)
    ops.fill_accept_out_cache_loc_cpu(accept_index, out_cache, dst)
    assert dst[:3].tolist() == [100, 102, 103]
    bonus = torch.zeros(2, dtype=torch.int32)
    ops.fill_bonus_tokens_cpu(torch.tensor([5, 6, 7, 8, 9, 10], dtype=torch.int32),
                              torch.tensor([2, 1], dtype=torch.int32), bonus, 3)
    assert bonus.tolist() == [6, 8]
    kv = torch.arange(12, dtype=torch.float32).view(4, 3)  # 4 rows of 12 bytes
    ops.copy_all_layer_kv_cache_cpu(torch.tensor([kv.data_ptr()], dtype=torch.uint64),
                                    torch.tensor([12]),
                                    torch.tensor([0, 1]), torch.tensor([2, 0]))
    assert kv[0].tolist() == [6, 7, 8] and kv[1].tolist() == [0, 1, 2]  # sources read first


def test_cache_loc_ops_equal_their_row_by_row_reference():
    """The vectorised stand-ins (one gather / scatter) against the per-request loop they
    replaced, on random batches (incl. empty segments and int32 offsets)."""
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        pool, width, bs = 12, 40, int(torch.randint(1, 10, (1,), generator=g))
        req_to_token = torch.randint(0, 10_000, (pool, width), dtype=torch.int32, generator=g)
        rows = torch.randperm(pool, generator=g)[:bs]
        start = torch.randint(0, 20, (bs,), generator=g)
        end = start + torch.randint(0, 12, (bs,), generator=g)
        if trial % 2:
            start, end = start.to(torch.int32), end.to(torch.int32)
        total = int((end.long() - start.long()).sum())
        out = torch.full((total + 3,), -1, dtype=torch.int64)
        ops.assign_extend_cache_locs_cpu(rows, req_to_token, start, end, out, width)
        want = [v for r, s, e in zip(rows.tolist(), start.tolist(), end.tolist())
                for v in req_to_token[r, s:e].tolist()]
        assert out[:total].tolist() == want and out[total:].tolist() == [-1] * 3
        back = torch.zeros_like(req_to_token)
        ops.assign_req_to_token_pool_cpu(rows, back, start, end, out, width)
        ref = torch.zeros_like(req_to_token)
        pos = 0
        for r, s, e in zip(rows.tolist(), start.tolist(), end.tolist()):
            ref[r, s:e] = out[pos:pos + e - s].to(torch.int32)
            pos += e - s
        assert torch.equal(back, ref)
