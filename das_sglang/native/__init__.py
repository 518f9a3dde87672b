"""Native suffix index (C++17, nanobind): see docs/design.md "Native index".

``SuffixIndex`` methods raise ValueError naming the bad seq_id / step / array dtype.
``draft_batch(indices, seq_ids, budgets, min_prob, steps, weights, chain, max_match_len)``
drafts one tree per row (``indices[r]``, ``seq_ids[r]``, ``budgets[r]``) in one call with the
GIL released and returns ``(tokens, parents, probs, offsets, match_lens)``: row ``r``'s
tree is ``[offsets[r], offsets[r+1])`` of the flat arrays.
``draft_rows(..., mix, threads)`` is ``draft_batch`` plus every node's depth (root children
1), with the rows split over ``threads`` threads (same arrays): ``(tokens, parents, probs,
depths, offsets, match_lens)``. ``SuffixIndex.version`` changes with every mutation.
``extend_batch(indices, seq_ids, tokens, offsets)`` is the matching one-call update: row
``r`` appends ``tokens[offsets[r]:offsets[r+1]]`` (all rows are validated first). ``MAX_STEPS`` is how many
distinct steps one index can hold at once.
``extend_draft_rows(indices, seq_ids, tokens, offsets, budgets, min_prob, steps, weights, chain,
max_match_len, mix, threads, extend_threads)`` is ``extend_batch`` (on ``extend_threads``, 0: as
it picks) then ``draft_rows`` (on ``threads``) of the same rows in one GIL-free call, plus every row's index ``version`` after it (uint64)
and whether every node probability is in [0, 1] (the session's check of the trees, made by the job);
``extend_draft_rows_start(...)`` (same arguments) starts it on the native background pool (threads made once and kept) and
returns a ``PendingExtendDraft`` whose ``wait()`` gives the result.
``ragged_layout(roots, seq_lens, offsets, tokens, parents)`` and ``ragged_mask_index(verify_lens,
seq_lens)`` build a ragged verify's inputs from a flat draft batch (sglang/tree_inputs.py).
``best_per_row(remaining, acc, m, kv_tokens, c_base, c_tok, c_kv)`` and
``lookahead_per_row(..., spread, free_tokens)`` are core/allocation.py's per-row allocators
(the policy's per-step math; numpy there is the reference they are tested against):
``(budgets, width, modeled_s, baseline_s, makespan_steps)``, the lookahead None where numpy
ranks every node instead. ``online_curves(offsets, probs, depths, m, table, states, match, relative,
depth_bin, rank_bin, max_budget)`` is the policy's online acceptance curves of flat drafts
(``_ModelBased.inputs``, curve_mode "online"): ``(base, acc, bins, width)``, numpy's bit for bit;
``online_plan(...)`` is ``LengthAware.plan``'s per-row work for such rows in one call (usable
nodes, those curves, ``lookahead_per_row``, the min-gain rule and the probe drafts).
``online_add(cells, generated, pos, budget, states, pend_generated, pend_match, pend_nodes, pend_bins,
bin_before, bin_size)`` adds one plan's verify outcomes to the online calibration's cells in place
(``OnlineCalibration._add``, numpy's sums bit for bit) and returns each row's next state.
``online_table(cells, w, prior)`` is ``OnlineCalibration.table`` (the shrunk ratios), numpy's doubles.
``online_update(cells, decay, at, generated, states, pend_budget, ...)`` is the whole batch's
``OnlineCalibration.update`` (decay, then the planned rows' outcomes): ``(next states, rows added)``.
``length_remaining(g, cap, c0, present, sorted, sorted_off, suffix, suffix_off, tail_factor)`` is the
length predictor's per-row group query (``_LengthQueries.predict_many``): ``(remaining, class)``.
``LengthIndex(fixed, a, b)`` is the length predictor's incremental query index (``add`` one
finished length, ``build`` from columns, ``query`` rows): src/length_index.h.
``index_versions(indices)`` is every index's ``version`` in one call (uint64 array; None reads 0).
``mutation_epoch()`` is bumped with every index's version, process-wide: unchanged, no index changed.
``row_map(prev, new, identity=False)`` is, per item of ``new``, the index of its last equal item in
``prev`` (-1: none) plus whether ``new`` holds each item once (``identity``: equal = the same object;
with ``fresh=True`` also the rows of ``new`` absent from ``prev``); ``gather_list(src, at, fill)`` is ``[src[j] if j >= 0 else
fill for j in at]``: the per-step parts gather their latest rows' values through them.
``clip_budgets(budgets, cap)`` is the drafter's per-row budgets (int64) as int32 at most ``cap``:
``(-1, array)``, or ``(the first negative row, None)``.
``ahead_rows(at, old_generated, generated, skipped)`` reads a row map into a plan made ahead's
rows (``_ModelBased._adopt_kept``): ``(ok, src, fresh, left)``.
``int32_tokens(seq)`` is a list / tuple of Python ints, or a 1-D buffer of 32- / 64-bit ints (SGLang's ``array("q")``, an int64 numpy array), in [0, 2**31) as int32 (None otherwise: ``as_tokens``' fast path).
``seq_tails(seqs)`` is each sequence's last item and length (int64 arrays: the decode rows' outputs);
``stop_rows(runs, lens, max_new, committed, row_set, set_ids, set_offsets)`` is the token-stop cut of
each row's accepted run and its length limit (``sglang/batch_rows.py``): ``(cut, limit, finishing)``
(finishing: a stop token or the length limit ends the request with its run as cut).
``padded_rows(tokens, lens)`` is ``TokenRows.from_padded`` in one pass: ``(flat, offsets)``, None on bad input.
``outcome_rows(proposed, committed)`` is a feedback's verify outcomes (``DasSession.committed_batch``):
``(rows, proposed, accepted, bad)`` for the rows with one (something drafted, or more than the bonus
token), ``bad`` the first of them that is invalid (-1: none).
``plan_ahead(...)`` copies the policy's inputs for its next plan of a feedback's rows
(``_ModelBased.plan_ahead``); passed to ``extend_draft_rows_start(..., ahead=)``, the job runs
``OnlineCalibration.update`` / ``table``, the calibration factors, the length predictions and
``online_plan`` on its drafts; ``PlanAhead.result()`` gives them (None if it did not run).
``draft_select(offsets, rows, keep, tokens, parents, probs, depths, match_len)`` is DraftBatch's
``take`` / ``take_rows`` / ``truncate`` in one pass (rows None: every row; -1: an empty row;
keep None: whole rows): ``(tokens, parents, probs, depths, offsets, match, lens, width)``.
``set_node_reserve_bytes(bytes)`` / ``node_reserve_bytes()``: the address space an index reserves
for its node array when it first grows (default 256 MiB, virtual only; it grows in place within
it and never moves, see ``MappedArray`` in src/suffix_index.h).
"""

from das_sglang.native._suffix import (
    MAX_STEPS,
    LengthIndex,
    PendingExtendDraft,
    PlanAhead,
    SuffixIndex,
    ahead_rows,
    background_nice,
    background_threads,
    best_per_row,
    clip_budgets,
    draft_batch,
    draft_rows,
    draft_select,
    extend_batch,
    extend_draft_rows,
    extend_draft_rows_start,
    gather_list,
    index_versions,
    mutation_epoch,
    int32_tokens,
    length_remaining,
    node_reserve_bytes,
    lookahead_per_row,
    online_add,
    online_curves,
    online_plan,
    online_table,
    online_update,
    outcome_rows,
    padded_rows,
    plan_ahead,
    ragged_layout,
    ragged_mask_index,
    row_map,
    set_background_nice,
    seq_tails,
    set_node_reserve_bytes,
    stop_rows,
)

__all__ = ["LengthIndex", "MAX_STEPS", "PendingExtendDraft", "SuffixIndex", "background_nice", "background_threads", "ahead_rows", "best_per_row", "clip_budgets",
           "draft_batch", "draft_rows", "draft_select", "extend_batch", "extend_draft_rows", "extend_draft_rows_start",
           "gather_list", "index_versions", "mutation_epoch", "int32_tokens", "length_remaining", "lookahead_per_row", "node_reserve_bytes", "online_add", "online_curves", "online_plan", "online_table", "online_update", "outcome_rows", "padded_rows",
           "ragged_layout", "ragged_mask_index", "row_map", "seq_tails", "set_background_nice", "set_node_reserve_bytes", "stop_rows"]
