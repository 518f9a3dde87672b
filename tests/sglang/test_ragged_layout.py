"""Ragged verify inputs (per-request tree sizes) against the uniform layout (no engine).

The ragged layout must be the uniform one with the pad rows removed: same tokens,
positions, masks and links on every real row; the tree walk (SGLang's kernel through
the CPU stand-in) must accept the same path for the same target tokens; and the masks
must have the layouts the CPU backend and FlashInfer read.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from das_sglang.core.draft_tree import DraftTree
from das_sglang.sglang.tree_inputs import (
    build_layout, build_ragged_layout, ragged_custom_mask,
)
from test_tree_inputs import trees


def _batch(data, tree_list):
    bs = len(tree_list)
    roots = data.draw(st.lists(st.integers(0, 20), min_size=bs, max_size=bs))
    seq_lens = data.draw(st.lists(st.integers(1, 50), min_size=bs, max_size=bs))
    return roots, seq_lens


class TestAgainstUniform:
    @settings(max_examples=150, deadline=None)
    @given(st.lists(trees(), min_size=1, max_size=5), st.data())
    def test_real_rows_match_the_padded_layout(self, tree_list, data):
        roots, seq_lens = _batch(data, tree_list)
        width = max(len(t) for t in tree_list)
        uni = build_layout(roots, tree_list, seq_lens, width)
        rag = build_ragged_layout(roots, tree_list, seq_lens)
        lens = [len(t) + 1 for t in tree_list]
        assert rag.verify_lens.tolist() == lens
        assert rag.total == sum(lens) == len(rag.tokens) == len(rag.positions)
        assert rag.n == uni.n
        n = uni.n
        for b, k in enumerate(lens):
            rows = slice(rag.offsets[b], rag.offsets[b] + k)
            assert rag.tokens[rows].tolist() == uni.tokens[b * n : b * n + k].tolist()
            assert rag.positions[rows].tolist() == uni.positions[b * n : b * n + k].tolist()
            assert np.array_equal(rag.block(b), uni.mask[b, :k, :k])
            assert rag.retrieve_index[b, :k].tolist() == list(range(rag.offsets[b],
                                                                    rag.offsets[b] + k))
            assert (rag.retrieve_index[b, k:] == -1).all()
            assert rag.candidates[b, :k].tolist() == uni.tokens[b * n : b * n + k].tolist()
            # links never point at a column past the request's rows
            assert rag.next_token[b].max(initial=-1) < k
            assert rag.next_sibling[b].max(initial=-1) < k
        assert np.array_equal(rag.next_token, uni.next_token)
        assert np.array_equal(rag.next_sibling, uni.next_sibling)

    def test_zero_budget_rows_verify_the_root_only(self):
        chain = DraftTree.chain([7, 8, 9])
        empty = DraftTree.chain([])
        rag = build_ragged_layout([1, 2, 3], [empty, chain, empty], [10, 20, 30])
        assert rag.verify_lens.tolist() == [1, 4, 1]
        assert rag.offsets.tolist() == [0, 1, 5]
        assert rag.tokens.tolist() == [1, 2, 7, 8, 9, 3]
        assert rag.positions.tolist() == [10, 20, 21, 22, 23, 30]
        assert rag.next_token[0].tolist() == [-1, -1, -1, -1]
        assert rag.next_token[1].tolist() == [1, 2, 3, -1]
        # uniform would verify 3 x 4 = 12 tokens; ragged verifies 6
        assert rag.total == 6


class TestMasks:
    def _layout(self):
        a = DraftTree(np.array([5, 6, 7], np.int32), np.array([-1, -1, 0], np.int32),
                      np.array([.9, .8, .7]))
        return build_ragged_layout([1, 2], [a, DraftTree.chain([])], [3, 2])

    def test_cpu_form_is_the_blocks_back_to_back(self):
        rag = self._layout()
        flat = ragged_custom_mask(rag, [3, 2], "cpu")
        assert flat.dtype == torch.bool
        assert flat.numel() == 4 * 4 + 1
        assert flat[:16].view(4, 4).tolist() == rag.block(0).tolist()
        assert flat[16:].tolist() == [True]

    def test_flashinfer_form_is_prefix_ones_then_tree_per_request(self):
        rag = self._layout()
        seq = [3, 2]
        flat = ragged_custom_mask(rag, seq, "cuda", target="cpu")  # built on the CPU
        # request 0: 4 rows of (3 + 4); request 1: 1 row of (2 + 1)
        assert flat.numel() == 4 * 7 + 1 * 3
        r0 = flat[:28].view(4, 7)
        assert r0[:, :3].all()
        assert r0[:, 3:].tolist() == rag.block(0).tolist()
        assert flat[28:].tolist() == [True, True, True]
        # row 3 (token 7, child of 5) sees the root, 5 and itself, not its uncle 6
        assert r0[3, 3:].tolist() == [True, True, False, True]


    def test_flashinfer_form_of_random_batches_equals_the_blocks(self):
        """The device form made as ones with the tree blocks' False entries cleared equals
        the per-request ``[seq_len ones | tree block]`` rows, for random trees (chains,
        empty trees and roots with many children among them)."""
        rng = np.random.default_rng(5)
        for _ in range(20):
            trees_, roots, seq = [], [], []
            for _ in range(int(rng.integers(1, 6))):
                n = int(rng.integers(0, 9))
                parents = np.array([int(rng.integers(-1, i)) for i in range(n)], np.int32)
                trees_.append(DraftTree(rng.integers(0, 50, n).astype(np.int32), parents, np.full(n, 0.5)))
                roots.append(int(rng.integers(0, 50)))
                seq.append(int(rng.integers(1, 7)))
            rag = build_ragged_layout(roots, trees_, seq)
            flat = ragged_custom_mask(rag, seq, "cuda", target="cpu")
            want = []
            for b, s_len in enumerate(seq):
                block = rag.block(b)
                k = block.shape[0]
                want.append(np.concatenate([np.ones((k, s_len), bool), block], axis=1).reshape(-1))
            assert flat.tolist() == np.concatenate(want).tolist()


class TestWalk:
    """SGLang's tree-walk kernel (CPU stand-in) over ragged rows."""

    @settings(max_examples=60, deadline=None)
    @given(st.lists(trees(max_nodes=6), min_size=1, max_size=4), st.data())
    def test_same_acceptance_as_the_uniform_walk(self, tree_list, data):
        from das_sglang.sglang.ragged import walk_ragged
        from das_sglang.sglang.verify import walk_trees

        roots, seq_lens = _batch(data, tree_list)
        width = max(len(t) for t in tree_list)
        uni = build_layout(roots, tree_list, seq_lens, width)
        rag = build_ragged_layout(roots, tree_list, seq_lens)
        n, bs, stride = uni.n, len(tree_list), 7
        # the target's token after every uniform row; ragged rows get the same values
        target_uni = torch.tensor(data.draw(st.lists(st.integers(0, 20), min_size=bs * n,
                                                     max_size=bs * n)), dtype=torch.int64)
        keep = np.concatenate([np.arange(b * n, b * n + len(t) + 1)
                               for b, t in enumerate(tree_list)])
        target_rag = target_uni[torch.from_numpy(keep)]
        t = lambda a: torch.from_numpy(a)  # noqa: E731
        p_u, a_u, c_u = walk_trees((t(uni.tokens), t(uni.retrieve_index), t(uni.next_token),
                                    t(uni.next_sibling)), target_uni, bs, n, stride)
        p_r, a_r, c_r = walk_ragged(t(rag.candidates), t(rag.retrieve_index),
                                    t(rag.next_token), t(rag.next_sibling), target_rag, stride)
        assert c_r.tolist() == c_u.tolist()
        for b in range(bs):
            k = int(c_u[b]) + 1
            uni_rows = a_u[b, :k].long()
            rag_rows = a_r[b, :k].long()
            # same tree columns accepted, in ragged rows
            assert (uni_rows - b * n).tolist() == (rag_rows - int(rag.offsets[b])).tolist()
            assert p_r[rag_rows].tolist() == p_u[uni_rows].tolist()
            assert (a_r[b, k:] == -1).all()


def test_layout_choice_names_the_backend():
    from das_sglang.sglang.ragged import choose_layout

    assert choose_layout("auto", "triton") == "uniform"
    assert choose_layout("auto", "flashinfer") == "ragged"
    assert choose_layout("auto", "flashinfer", lora=True) == "uniform"
    assert choose_layout("uniform", "flashinfer") == "uniform"
    assert choose_layout("auto", "torch_native") == "ragged"  # CPU mode's subclass
    with pytest.raises(ValueError, match="verify backend is fa3"):
        choose_layout("ragged", "fa3")
    with pytest.raises(ValueError, match="invalid verify layout 'wide'"):
        choose_layout("wide", "triton")


def _mask_index_reference(verify_lens, seq_lens):
    """``native.ragged_mask_index`` in numpy: where tree entry (b, i, j) lands in request b's
    ``verify_lens[b]`` rows of ``[seq_len prefix | tree columns]``; and the mask's length."""
    lens = np.asarray(seq_lens, dtype=np.int64)
    vl = np.asarray(verify_lens, dtype=np.int64)
    row_len = lens + vl
    start = np.cumsum(vl * row_len) - vl * row_len
    sq = vl * vl
    b_of = np.repeat(np.arange(len(vl)), sq)  # request of every tree-block entry
    local = np.arange(int(sq.sum()), dtype=np.int64) - np.repeat(np.cumsum(sq) - sq, sq)
    i, j = local // vl[b_of], local % vl[b_of]
    return start[b_of] + i * row_len[b_of] + lens[b_of] + j, int((vl * row_len).sum())


class TestNativeLayout:
    """The worker's path (a flat DraftBatch: one native call) gives the numpy layout's
    arrays, field for field, and the FlashInfer-form mask index of the numpy version."""

    @settings(max_examples=150, deadline=None)
    @given(st.lists(trees(), min_size=1, max_size=6), st.data())
    def test_native_equals_numpy(self, tree_list, data):
        from das_sglang.core.draft_tree import DraftBatch
        from das_sglang.native import ragged_mask_index
        from das_sglang.sglang.tree_inputs import build_ragged_layout_numpy

        roots, seq_lens = _batch(data, tree_list)
        want = build_ragged_layout_numpy(roots, tree_list, seq_lens)
        got = build_ragged_layout(roots, DraftBatch.from_trees(tree_list), seq_lens)
        assert got.n == want.n
        # (the packed layout's views are made when first read: the worker's verify reads
        # only the buffer, its parts and the counts -- the native call's, not a sum)
        assert got._views is None
        assert type(got.total) is int and got.total == want.total and len(got) == len(want) == len(tree_list)
        for field in ("tokens", "positions", "verify_lens", "offsets", "mask", "candidates",
                      "retrieve_index", "next_token", "next_sibling"):
            a, b = getattr(got, field), getattr(want, field)
            assert a.dtype == b.dtype and a.shape == b.shape, field
            np.testing.assert_array_equal(a, b, err_msg=field)
        idx, length = ragged_mask_index(got.verify_lens, np.asarray(seq_lens, np.int64))
        ref_idx, ref_len = _mask_index_reference(got.verify_lens, seq_lens)
        assert length == ref_len
        np.testing.assert_array_equal(idx, ref_idx)
        # with the tree blocks: only where they are False (what the device form clears)
        zeros, length = ragged_mask_index(got.verify_lens, np.asarray(seq_lens, np.int64), got.mask)
        assert length == ref_len
        np.testing.assert_array_equal(zeros, ref_idx[~got.mask])
        with pytest.raises(ValueError, match="tree has"):
            ragged_mask_index(got.verify_lens, np.asarray(seq_lens, np.int64), np.ones(len(got.mask) + 1, bool))
        with pytest.raises(ValueError, match="negative verify_len or seq_len at row 0"):
            ragged_mask_index(got.verify_lens, np.asarray([-1] + list(seq_lens[1:]), np.int64), got.mask)

    def test_bad_input_is_refused_naming_it(self):
        from das_sglang.native import ragged_layout

        off = np.array([0, 2], np.int64)
        tok = np.array([5, 6], np.int32)
        with pytest.raises(ValueError, match="row 0 node 1 has parent 1"):
            ragged_layout(np.array([1], np.int64), np.array([3], np.int64), off, tok, np.array([-1, 1], np.int32))
        with pytest.raises(ValueError, match="invalid parents: expected a 1-D contiguous int32"):
            ragged_layout(np.array([1], np.int64), np.array([3], np.int64), off, tok, np.array([-1, 0], np.int64))
        with pytest.raises(ValueError, match="1 roots but 2 seq_lens"):
            ragged_layout(np.array([1], np.int64), np.array([3, 4], np.int64), off, tok, np.array([-1, 0], np.int32))
        with pytest.raises(ValueError, match="offsets must run from 0"):
            ragged_layout(np.array([1], np.int64), np.array([3], np.int64), np.array([0, 3], np.int64), tok,
                          np.array([-1, 0], np.int32))


def test_layout_from_inputs_is_sglangs_host_list_layout():
    """The worker's SGLang layout from its packed inputs (layout_from_inputs) has what
    SGLang's host-list form gives: lengths, qo_indptr, start locations, graph tier."""
    from sglang.srt.speculative.ragged_verify import RaggedVerifyLayout

    from das_sglang.core.draft_tree import DraftBatch
    from das_sglang.sglang.ragged import DasVerifyInput, layout_from_inputs
    from das_sglang.sglang.tree_inputs import ragged_device_inputs

    rng = np.random.default_rng(3)
    for bs in (1, 7, 512):
        tree_list = [DraftTree.chain(rng.integers(0, 50, int(k)).tolist()) for k in rng.integers(0, 17, bs)]
        rag = build_ragged_layout(rng.integers(0, 50, bs), DraftBatch.from_trees(tree_list),
                                  rng.integers(1, 300, bs), mask_zeros=True)
        total = rag.total
        got = layout_from_inputs(ragged_device_inputs(rag, rng.integers(1, 300, bs), "cuda", target="cpu"), total)
        want = RaggedVerifyLayout.from_verify_lens(verify_lens_cpu=rag.verify_lens.tolist(),
                                                   device=torch.device("cpu"), grid=[total])
        assert got.graph_num_tokens == want.graph_num_tokens == total and got.bs == bs
        for field in ("verify_lens", "qo_indptr_device", "extend_start_loc"):
            assert torch.equal(getattr(got, field), getattr(want, field)), field
        mask = torch.ones(1, dtype=torch.bool)  # (the verify input's total: its own, or SGLang's)
        assert DasVerifyInput(layout=got, total_tokens=total, custom_mask=mask, draft_token_num=18).total_tokens == total
        assert DasVerifyInput(layout=want, custom_mask=mask, draft_token_num=18).total_tokens == total


class TestPackedInputs:
    """The worker's verify inputs come from one packed buffer (one host-to-device copy):
    the native buffer is the numpy packing of the numpy layout word for word, the device
    views are the arrays the separate copies gave, and SGLang's layout made from the
    buffer's int32 qo arrays is the one its own ops make from the lengths."""

    @settings(max_examples=150, deadline=None)
    @given(st.lists(trees(), min_size=1, max_size=6), st.data())
    def test_native_buffer_is_the_numpy_packing(self, tree_list, data):
        from das_sglang.core.draft_tree import DraftBatch
        from das_sglang.sglang.tree_inputs import RAGGED_PARTS, build_ragged_layout_numpy, pack_ragged

        roots, seq_lens = _batch(data, tree_list)
        got = build_ragged_layout(roots, DraftBatch.from_trees(tree_list), seq_lens, mask_zeros=True)
        want = pack_ragged(build_ragged_layout_numpy(roots, tree_list, seq_lens), seq_lens)
        np.testing.assert_array_equal(got.starts, want.starts)
        assert len(got.starts) == len(RAGGED_PARTS) + 1 and got.starts[-1] == len(got.packed)
        assert got.flat_mask_len == want.flat_mask_len == _mask_index_reference(got.verify_lens, seq_lens)[1]
        assert got.starts[5] % 2 == 0 and got.starts[6] % 2 == 0  # the int32 part 16-byte aligned
        np.testing.assert_array_equal(got.packed, want.packed)  # word for word, padding included
        # the layout's arrays are views of the buffer, equal to the unpacked layout's
        plain = build_ragged_layout(roots, DraftBatch.from_trees(tree_list), seq_lens)
        for name in ("tokens", "positions", "verify_lens", "offsets", "candidates", "retrieve_index",
                     "next_token", "next_sibling"):
            assert np.shares_memory(getattr(got, name), got.packed), name
            np.testing.assert_array_equal(getattr(got, name), getattr(plain, name), err_msg=name)
        assert plain.flat_mask_len == -1 and plain.starts[-1] == plain.starts[-2]  # no zeros part
        # the zeros are the device mask's (ragged_custom_mask from the separate index)
        zeros, _ = _mask_index_reference(got.verify_lens, seq_lens)
        np.testing.assert_array_equal(got.packed[got.starts[6]:], zeros[~got.mask])

    @settings(max_examples=60, deadline=None)
    @given(st.lists(trees(), min_size=1, max_size=6), st.data())
    def test_device_views_are_the_separate_copies(self, tree_list, data):
        from das_sglang.core.draft_tree import DraftBatch
        from das_sglang.sglang.tree_inputs import ragged_device_inputs

        roots, seq_lens = _batch(data, tree_list)
        # a device other than the CPU (the copy made to the CPU here, as the mask tests do)
        rag = build_ragged_layout(roots, DraftBatch.from_trees(tree_list), seq_lens, mask_zeros=True)
        d = ragged_device_inputs(rag, seq_lens, "cuda", target="cpu")
        for name in ("tokens", "positions", "verify_lens", "offsets", "candidates", "retrieve_index",
                     "next_token", "next_sibling"):
            t = getattr(d, name)
            assert t.dtype == torch.int64 and t.is_contiguous(), name
            assert torch.equal(t, torch.from_numpy(np.ascontiguousarray(getattr(rag, name)))), name
        vl = rag.verify_lens
        assert d.verify_lens32.dtype == d.qo_indptr.dtype == d.extend_start_loc.dtype == torch.int32
        assert d.verify_lens32.tolist() == vl.tolist()
        assert d.qo_indptr.tolist() == [0] + np.cumsum(vl).tolist()
        assert d.extend_start_loc.tolist() == (np.cumsum(vl) - vl).tolist()
        assert torch.equal(d.custom_mask, ragged_custom_mask(rag, seq_lens, "cuda", target="cpu"))
        # the numpy layout (no buffer) and a layout built without the zeros are packed on demand
        for other in (build_ragged_layout(roots, tree_list, seq_lens),
                      build_ragged_layout(roots, DraftBatch.from_trees(tree_list), seq_lens)):
            e = ragged_device_inputs(other, seq_lens, "cuda", target="cpu")
            for a, b in zip(d, e):
                assert torch.equal(a, b)
        # on the CPU: views of the host buffer (no copy) and the tree blocks as the mask
        c = ragged_device_inputs(rag, seq_lens, "cpu")
        assert c.tokens.data_ptr() == rag.tokens.ctypes.data
        assert torch.equal(c.custom_mask, ragged_custom_mask(rag, seq_lens, "cpu"))

    def test_sglang_layout_from_the_buffer(self):
        from sglang.srt.speculative.ragged_verify import RaggedVerifyLayout

        from das_sglang.core.draft_tree import DraftBatch, DraftTree
        from das_sglang.sglang.ragged import layout_from_inputs
        from das_sglang.sglang.tree_inputs import ragged_device_inputs

        rng = np.random.default_rng(5)
        for bs in (1, 7, 512):
            tree_list = [DraftTree.chain(rng.integers(0, 50, int(k)).tolist()) for k in rng.integers(0, 17, bs)]
            seq = rng.integers(1, 300, bs)
            rag = build_ragged_layout(rng.integers(0, 50, bs), DraftBatch.from_trees(tree_list), seq,
                                      mask_zeros=True)
            d = ragged_device_inputs(rag, seq, "cuda", target="cpu")
            got = layout_from_inputs(d, rag.total)
            want = RaggedVerifyLayout.from_verify_lens_device(verify_lens=torch.from_numpy(rag.verify_lens),
                                                              graph_num_tokens=rag.total)
            assert type(got) is RaggedVerifyLayout
            for field in RaggedVerifyLayout.__struct_fields__:
                a, b = getattr(got, field), getattr(want, field)
                if isinstance(a, torch.Tensor):
                    assert a.dtype == b.dtype and torch.equal(a, b), field
                else:
                    assert a == b, field

    def test_bad_seq_len_is_refused_naming_it(self):
        from das_sglang.native import ragged_layout

        off = np.array([0, 1], np.int64)
        with pytest.raises(ValueError, match="negative seq_len -4 at row 0"):
            ragged_layout(np.array([1], np.int64), np.array([-4], np.int64), off, np.array([5], np.int32),
                          np.array([-1], np.int32), True)
