"""The DAS speculative worker: SGLang's NGRAM verify plumbing, DAS drafts.

Per decode step (``forward_batch_generation``):

1. new requests are registered with the drafter (problem id / step from
   ``custom_params``), the drafter proposes a tree per request, the policy picks
   per-request budgets and so the batch width (0 = verify the root only);
2. the trees become SGLang's tree-verify inputs (``tree_inputs.build_layout``) and the
   target model runs one TARGET_VERIFY forward;
3. ``verify.target_tokens`` draws the target's token after every row exactly as the
   non-speculative sampler would, ``verify.walk_trees`` accepts the matching path;
4. accepted KV is kept (SGLang's mover), and the committed tokens go back to the
   drafter and the policy.

Finished requests (``note_request_finished``) become history of their problem. History
is never cleared by SGLang's cache flushes (``clear_cache_pool``), so it survives
``update_weights_from_*``; a flush advances the training step (the sliding window).
"""

from __future__ import annotations

import atexit
import logging
import time

import numpy as np
import torch
from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs_func
from sglang.srt.layers.logprob_processor import compute_spec_logprobs
from sglang.srt.managers.schedule_batch import FINISH_ABORT
from sglang.srt.managers.scheduler import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.runtime_context import get_device, get_schedule, get_spec
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from sglang.srt.speculative.ngram_info import NgramVerifyInput
from sglang.srt.speculative.ngram_worker import NGRAMWorker
from sglang.srt.speculative.spec_utils import move_accept_tokens_to_target_kvcache

from das_sglang.core.drafter import TokenRows
from das_sglang.core.graph_tiers import GraphSpec, GraphTiers
from das_sglang.sglang.batch_rows import BatchRows, StopRules
from das_sglang.sglang.finish import delivered_output, is_server_warmup, stop_cut
from das_sglang.sglang.host_time import (
    add_engine_gap, add_feedback, add_plan, add_verify, new_host_time,
)
from das_sglang.sglang.options import for_engine_graphs, for_layout, hook_after_launch, load_options
from das_sglang.sglang.ragged import (
    DasVerifyInput, choose_layout, confirm_layout, layout_from_inputs, move_accepted_kv,
    verify_backend_name, walk_ragged,
)
from das_sglang.sglang.request_constraints import needs_root_only, needs_uniform_rows
from das_sglang.sglang.scaleout import shard_engine_id
from das_sglang.sglang.session import DasSession
from das_sglang.sglang.support import NoExternalCorpus, check_model_supported
from das_sglang.sglang.tp import from_sglang as tp_group_of_worker
from das_sglang.sglang.tree_inputs import (
    build_layout, build_ragged_layout, custom_mask, ragged_device_inputs, tree_lens,
)
from das_sglang.sglang.verify import target_tokens, walk_trees

_log = logging.getLogger(__name__)


def write_json_atomic(path: str, data: dict) -> None:
    """Replace ``path`` by ``data`` as JSON, atomically (a reader sees the old file or the
    new one) but not fsynced: the worker's counters (``server.stats_path``) are rewritten
    after every verify step, where two fsyncs cost milliseconds on the scheduler thread,
    and a crash loses nothing the next run does not count again."""
    import json
    from pathlib import Path

    from das_sglang.core.atomic import atomic_file

    with atomic_file(Path(path), binary=False, tmp_prefix=".das-stats-", durable=False) as f:
        json.dump(data, f)


def captured_verify_graphs(model_runner) -> GraphSpec | None:
    """The TARGET_VERIFY CUDA graphs SGLang captured for this target (its decode graph
    runner's capture width, in draft tokens, and largest batch), or None: no graphs
    (CPU, ``--disable-cuda-graph``, or a runner that is the eager one)."""
    runner = getattr(model_runner, "decode_cuda_graph_runner", None)
    if runner is None or runner is getattr(model_runner, "eager_runner", None):
        return None
    width, bs = getattr(runner, "captured_req_width", None), getattr(runner, "max_bs", None)
    if not isinstance(width, int) or not isinstance(bs, int) or width < 2 or bs < 1:
        return None
    return GraphSpec(width=width - 1, max_bs=bs)


class DasWorker(NoExternalCorpus, NGRAMWorker):
    # NGRAMWorker's __init__ builds (and JIT-compiles) its n-gram corpus, which DAS
    # does not use; BaseSpecWorker's is called instead. The inherited parts are the
    # memory-pool hookup, the draft-worker-less properties and the verify-result hooks.
    # Verification steps as attributes: the tests' negative controls subclass them.
    target_tokens = staticmethod(target_tokens)
    walk_trees = staticmethod(walk_trees)

    def __init__(self, server_args, gpu_id, nccl_port, target_worker):
        BaseSpecWorker.__init__(self)
        self.server_args = server_args
        self._target_worker = target_worker
        self.model_runner = target_worker.model_runner
        check_model_supported(self.model_runner.model_config)
        self.tp = tp_group_of_worker()
        self.device = get_device().device
        self.page_size = get_schedule().page_size
        self.enable_overlap = not get_schedule().disable_overlap_schedule
        self.draft_token_num = get_spec().speculative_num_draft_tokens
        self.speculative_num_draft_tokens = self.draft_token_num
        self.adaptive_controller = None
        self.options = load_options(self.draft_token_num)
        lora = bool(getattr(server_args, "enable_lora", False) or
                    getattr(server_args, "lora_paths", None))
        self.layout = choose_layout(
            self.options.server.verify_layout, verify_backend_name(), lora=lora
        )
        self.options = for_layout(self.options, self.layout)  # per-request budgets if ragged
        self._layout_confirmed = False
        self.session = DasSession(self.options, write_snapshots=self.tp.is_writer,
                                  engine_id=shard_engine_id(server_args, self.options))
        # rid -> (Req, SGLang's prompt object, the tuple started with) of requests the
        # drafter knows
        self._reqs: dict = {}
        # What each decode step reads of batch.reqs: ids and stop rules made once per batch
        # composition (SGLang rebinds batch.reqs when it changes), the stop cut vectorised
        # (batch_rows.py), with the registered requests' stop rules.
        self._stop_rules = StopRules()
        self._rows = BatchRows(self._stop_rules)
        self._committed: tuple | None = None
        self._walked: float | None = None  # the verify's end (_cut_at_stops' first sync)
        self._cut_s = 0.0
        self._finishing = None  # (the stop cut's rows that finish with this step: BatchRows.cut)
        # (batch.reqs, whether it changed, the trees and width) of a step that verifies the
        # plan made ahead before its plan is made (_plan, _settle_launch)
        self._launched: tuple | None = None
        # graph_steps: verify forwards SGLang replayed as a CUDA graph (the rest ran eagerly)
        # plans_ahead: plans that were the feedback's job's (DasSession: plan made ahead),
        # of them plans_ahead_kept for the rows kept since (finishes, deferred starts);
        # launched_first: steps that verified it before their plan ran (the plan in the
        # forward's shadow), launch_mismatch: of them, those whose plan drafted otherwise
        self.stats = {"verify_steps": 0, "proposed": 0, "accepted": 0, "verify_tokens": 0,
                      "ragged_steps": 0, "graph_steps": 0, "plans_ahead": 0, "plans_ahead_kept": 0,
                      "launched_first": 0, "launch_mismatch": 0,
                      "layout": self.layout,
                      "budgets": self._budget_form()}
        # Host time per decode step (stats "host"): DAS's own (plan + verify inputs,
        # feedback) and SGLang's between two decode steps (its result processing and
        # scheduling: the time DAS's background work overlaps). See host_time().
        self.stats["host"] = new_host_time()
        self._decode_exit: float | None = None  # when the last decode step returned
        self.graph_tiers: GraphTiers | None = None  # (set at the first decode step)
        self._tiers_plan = False  # the policy plans with graph_tiers' cost (uniform layout)
        self._forward_start: float | None = None  # the verify's launch time
        # The step's background work starts once the verify forward is launched where the
        # launch is asynchronous (CUDA): server.forward_hook.
        self._hook_after_launch = hook_after_launch(self.options.server.forward_hook, self.device)
        self.stats["forward_hook"] = "after_launch" if self._hook_after_launch else "before_launch"
        self._forward_tokens = 0  # and the tokens it submits
        self.session.worker_stats = self.stats  # read by the shard stats (scale-out)
        atexit.register(self.session.close)
        _log.info("DAS worker: %s", self.options)

    def _init_preallocated_tensors(self):
        pass  # NGRAM's fixed-width buffers; DAS sizes its verify inputs per step

    def clear_cache_pool(self):
        # Called on cache flushes: SGLang's update_weights_from_{disk,tensor,distributed,
        # ipc} flush after loading (flush_cache_after_weight_update), only when idle. KV
        # is gone, history is not -- the rollouts stay valid drafts for the next policy
        # version -- and the flush is the RL step boundary: untagged traffic's step
        # advances here, so history slides without das_step tags.
        self.session.weights_updated()

    # ---------------------------------------------------------------- decode step
    def forward_batch_generation(self, batch, on_publish=None, pp_proxy_tensors=None):
        if not batch.forward_mode.is_decode():
            self._decode_exit = None  # a prefill in between: no engine gap to measure
            return self._forward_extend(batch, on_publish, pp_proxy_tensors)
        t_in = time.perf_counter()
        if self._decode_exit is not None:
            add_engine_gap(self.stats["host"], t_in - self._decode_exit, len(batch.reqs))
        self._decode_exit = None
        try:
            return self._decode(batch, on_publish, pp_proxy_tensors, t_in)
        finally:
            self._decode_exit = time.perf_counter()

    def _decode(self, batch, on_publish, pp_proxy_tensors, t_in):
        bs = len(batch.reqs)
        self._committed = None  # (the output lengths read with this step's roots: _roots)
        trees, planned = self._plan(batch)
        if not self._layout_confirmed:  # the attention backends exist from here on
            layout = confirm_layout(self.layout, self.model_runner.attn_backend)
            if layout != self.layout:  # padded after all: plan (and pay) one batch width
                self._set_options(for_layout(self.options, layout))
            self.layout = self.stats["layout"] = layout
            self.stats["budgets"] = self._budget_form()
            self._layout_confirmed = True
            self._init_graph_tiers()
        graph = False
        if self.layout == "ragged" and not needs_uniform_rows(batch.sampling_info):
            lens = tree_lens(trees)
            graph = self._graph_over_ragged(bs, lens)
            if not graph and lens.size and lens.min() != lens.max():  # (rows of different widths)
                return self._verify_ragged(batch, trees, on_publish, pp_proxy_tensors, t_in)
        layout = self._prepare_verify(batch, trees, self._verify_width(trees, planned, bs, graph))
        add_plan(self.stats["host"], time.perf_counter() - t_in, bs)
        result = self._launch_verify(batch, pp_proxy_tensors)
        logits_output = result.logits_output
        spec = batch.spec_info
        target = self.target_tokens(
            logits_output.next_token_logits, batch.sampling_info, spec.positions, layout.n
        )
        self.tp.agree(target)  # decided once, on TP rank 0 (see tp.py)
        predict, accept_index, num_correct = self.walk_trees(
            (spec.draft_token, spec.retrieve_index, spec.retrieve_next_token,
             spec.retrieve_next_sibling),
            target, bs, layout.n, self.draft_token_num,
        )
        return self._commit(
            batch, trees, result, predict, accept_index, num_correct, on_publish,
            lambda k: move_accept_tokens_to_target_kvcache(
                batch, accept_index, k, self.token_to_kv_pool_allocator),
        )

    def _launch_verify(self, batch, pp_proxy_tensors):
        """The verify forward, with the session's forward hook (its background work) just
        before the launch or, where the launch is asynchronous, just after it: the hook's
        host time then overlaps the device's forward (server.forward_hook)."""
        if not self._hook_after_launch:
            self.session.before_forward()
        self._forward_start = time.perf_counter()
        result = self.target_worker.forward_batch_generation(
            batch, pp_proxy_tensors=pp_proxy_tensors, is_verify=True
        )
        if self._hook_after_launch:
            if self._launched is not None:
                self._settle_launch()
            self.session.before_forward()
        return result

    def _commit(self, batch, trees, result, predict, accept_index, num_correct, on_publish,
                move_kv):
        """After the tree walk (either layout): cut at stop conditions, keep the accepted
        KV (``move_kv(num_correct)``, called with the cut counts), logprobs, feedback to
        the drafter and policy, and SGLang's result."""
        logits_output = result.logits_output
        self.stats["graph_steps"] += bool(result.can_run_cuda_graph)
        self._walked = None
        t_cut = time.perf_counter()
        num_correct = self._cut_at_stops(batch.reqs, predict, accept_index, num_correct)
        # The verify ends at the cut's first host sync (after the tree walk); the cut after
        # it is DAS's host work, counted with the feedback (until stop 48 the verify clock
        # ran to the cut's end and held it: ~2 ms a step at 512 rows then).
        walked = self._walked if self._walked is not None else t_cut
        self._cut_s = time.perf_counter() - walked
        self._observe_forward(batch, result, self._forward_tokens, end=walked)
        accept_lens = num_correct + 1
        new_seq_lens = batch.seq_lens + accept_lens
        accept_tokens = predict[accept_index.clamp(min=0).long()]
        move_kv(num_correct)
        if batch.return_logprob:
            compute_spec_logprobs(batch, logits_output, predict, accept_index=accept_index)
        if on_publish is not None:
            on_publish(new_seq_lens)
        batch.forward_mode = ForwardMode.DECODE
        self._feed_back(batch, trees, accept_tokens.cpu(), accept_lens.cpu())
        accept_tokens = accept_tokens.flatten()
        return GenerationBatchResult(
            logits_output=logits_output,
            next_token_ids=accept_tokens,
            can_run_cuda_graph=result.can_run_cuda_graph,
            accept_lens=accept_lens,
            new_seq_lens=new_seq_lens,
            next_draft_input=self._relay(new_seq_lens, accept_tokens, accept_lens),
            speculative_num_draft_tokens=self.draft_token_num,
        )

    def _cut_at_stops(self, reqs, predict, accept_index, num_correct):
        """End each accepted run where one-token-at-a-time decoding would end it
        (``finish.stop_cut``; over the batch's rows at once, ``BatchRows.cut``);
        ``accept_index`` is cut in place."""
        if num_correct.numel() == 0:
            return num_correct
        k = num_correct.cpu().numpy()  # (one copy; the runs' below only if a draft was accepted)
        self._walked = time.perf_counter()  # (the first host sync after the tree walk)
        self._finishing = None
        if int(k.max()) == 0:
            return num_correct  # one token per request: nothing to cut
        lens = k.astype(np.int64) + 1
        runs = predict[accept_index.clamp(min=0).long()].cpu().numpy()
        read, self._committed = self._committed, None
        if reqs is self._rows.reqs:
            cut = self._rows.cut(runs, lens, read[1] if read is not None and read[0] is reqs else None)
            # (which requests finish with this step, as far as the stop rules tell: the
            # feedback's job leaves their last outcome out of the next plan's calibration)
            self._finishing = self._rows.finishing
        else:  # (rows the worker did not plan: the reference, request by request)
            cut = np.array([stop_cut(req, run[:n].tolist()) for req, run, n in zip(reqs, runs, lens)],
                           dtype=np.int64)
        rows = np.flatnonzero(cut < lens)
        if not rows.size:
            return num_correct
        for b in rows.tolist():
            accept_index[b, int(cut[b]):] = -1
        return torch.from_numpy(cut - 1).to(dtype=num_correct.dtype, device=num_correct.device)

    def _plan(self, batch):
        """Draft trees of the batch, truncated to the policy's per-request budgets. New
        requests are registered when the batch's requests changed (SGLang rebinds
        ``batch.reqs`` then); a step without a start or a finish reuses the ids."""
        if self._launched is not None:  # (a step that never reached its launch: its plan now)
            self._settle_launch()
        reqs = batch.reqs
        changed = self._rows.changed(reqs)
        if changed:
            self._rows.update(reqs)
        if self._hook_after_launch and self._layout_confirmed:
            # The plan made ahead verified at once, the plan itself (and the new requests'
            # registration before it) in the forward's shadow: DasSession.launch_plan.
            fast = self.session.launch_plan(self._rows.rids, self.options.max_nodes,
                                            kept=self._rows.kept if changed else None)
            if fast is not None:
                self._launched = (reqs, changed, fast)
                return fast
        self._register_new(reqs, changed)
        # (kept: the rows carried over from the previous list, mapped by identity: the
        # session and drafter gather their per-row state through it, not by the ids)
        return self.session.plan(self._rows.rids, self.options.max_nodes, kept=self._rows.kept)

    def _register_new(self, reqs, changed: bool) -> None:
        """Register the requests new in a changed ``batch.reqs`` list (after its update)."""
        if not changed:
            return
        rids = self._rows.rids
        # (a rule is kept from _register to the finish: -1 = not registered yet)
        rule = self._rows.lookup_rules()
        missing = np.flatnonzero(rule < 0).tolist()
        for i in missing:
            self._register(reqs[i])
            rule[i] = self._stop_rules.rule.get(rids[i], -1)
        if missing:
            self._rows.set_rules(rule)

    def _settle_launch(self) -> None:
        """After a launch of the plan made ahead (``_plan``): the new requests registered
        and the plan made, as before the launch otherwise (DasSession.settle_launch)."""
        reqs, changed, fast = self._launched
        self._launched = None
        self._register_new(reqs, changed)
        self.session.settle_launch(fast, self._rows.rids, self.options.max_nodes, kept=self._rows.kept)

    def _rids(self, batch) -> list:
        return self._rows.rids if batch.reqs is self._rows.reqs else [req.rid for req in batch.reqs]

    def _roots(self, batch):
        """Each request's last token (the verify's roots). With them the output lengths
        are read, for this step's stop cut (SGLang appends the step's tokens after it)."""
        if batch.reqs is self._rows.reqs:
            roots, committed = self._rows.tails()
            self._committed = (batch.reqs, committed)
            return roots
        self._committed = None
        return [req.output_ids[-1] for req in batch.reqs]

    def _set_options(self, options) -> None:
        """New options for the worker, its session and the session's policy."""
        self.options = self.session.options = options
        if hasattr(self.session.policy, "config"):
            self.session.policy.config = options.policy

    # ------------------------------------------------------------- CUDA-graph widths
    def _init_graph_tiers(self) -> None:
        """Which verify widths SGLang replays as CUDA graphs here, and what an eager
        verify costs beside one (``core.graph_tiers``; docs/sglang.md "CUDA graphs").

        Stock SGLang captures TARGET_VERIFY graphs at the full width only
        (``captured_req_width`` tokens per request, batches up to ``max_bs``). Unless
        ``DAS_CONFIG`` set measured tiers (``cost_graph_widths`` / ``cost_eager_*``), the
        worker times its own verifies: on the uniform layout it hands the policy the
        measured eager extra, so it plans the full, graph-replayed width when that is
        cheaper; on the ragged layout (whose verifies never replay a stock graph) each
        step goes ragged or padded to the graph, whichever the times say is cheaper.
        Without captured graphs (CPU, ``--disable-cuda-graph``) every verify is eager: no
        tiers, and no padding to bucket widths that nothing replays."""
        self.graph_tiers = None
        policy = self.session.policy
        cfg = self.options.policy
        self._set_options(for_engine_graphs(self.options))
        spec = self._captured_graphs()
        self.stats["graph_width"] = None if spec is None else spec.width
        if spec is None:
            return
        if spec.width != self.options.max_nodes:
            _log.warning("DAS: SGLang captured verify graphs at %d draft tokens, the worker plans "
                         "up to %d: no graph tiers", spec.width, self.options.max_nodes)
            return
        self.graph_tiers = GraphTiers(spec)
        # Uniform layout: the policy plans with the tiers (unless DAS_CONFIG set measured
        # ones); ragged: each step goes ragged (eager) or padded to the graph, by the times.
        self._tiers_plan = (self.layout == "uniform" and hasattr(policy, "cost")
                            and not (cfg.cost_graph_widths or cfg.cost_eager_widths))
        if self._tiers_plan:
            self._base_cost = self._tiered_cost = policy.cost
            self._tiers_seen = -1
        _log.info("DAS: SGLang replays verify graphs at %d draft tokens for batches <= %d; "
                  "eager verifies are timed to price the other widths (%s layout)",
                  spec.width, spec.max_bs, self.layout)

    def _captured_graphs(self) -> GraphSpec | None:
        return captured_verify_graphs(self.model_runner)

    def _graph_over_ragged(self, bs: int, lens) -> bool:
        """Ragged layout: verify this step padded to the graph width instead of at its
        trees' own sizes (ragged, or uniform narrower: eager either way) -- a replay
        measured cheaper, or an exploring step? The same trees either way: lossless."""
        tiers = self.graph_tiers
        if tiers is None or bool((lens == tiers.spec.width).all()):
            return False
        if tiers.prefer_graph(bs, int(lens.sum()) + bs):
            return not tiers.explore_eager(bs)  # (now and then ragged: its price measured)
        return tiers.explore(bs)

    def _verify_width(self, trees, planned: int, bs: int, graph: bool = False) -> int:
        """The uniform verify's draft width: the widest tree, or the policy's planned
        width when it is a graph width (the padding buys the replay), or the graph width
        (``graph``: chosen over a ragged verify; or an exploring step, ``GraphTiers.explore``)."""
        width = int(tree_lens(trees).max(initial=0))
        cost = getattr(self.session.policy, "cost", None)
        if planned > width and cost is not None and cost.is_graph_width(planned):
            width = planned
        tiers = self.graph_tiers
        if tiers is not None:
            if graph or (width != tiers.spec.width and self.layout == "uniform" and tiers.explore(bs)):
                width = tiers.spec.width
            if self._tiers_plan:
                self._set_tiers_cost(bs)
        return width

    def _set_tiers_cost(self, bs: int) -> None:
        """The policy's cost model for the next plan: with the measured tiers while the
        batch fits the captured graphs, the configured model otherwise."""
        tiers = self.graph_tiers
        seen = tiers.samples
        if seen != self._tiers_seen and seen % 8 == 0:
            self._tiers_seen = seen
            self._tiered_cost = tiers.cost_model(self._base_cost)
        use = tiers.spec.covers(bs) and not tiers.explore_eager(bs)  # (one plan without)
        self.session.policy.cost = self._tiered_cost if use else self._base_cost

    def _observe_forward(self, batch, result, tokens: int, end: float | None = None) -> None:
        """The verify's seconds (launch to ``end``, the host sync after the tree walk;
        default now): into the host stats' ``verify`` clock, and with its ``tokens`` to
        the tiers."""
        t0, self._forward_start = self._forward_start, None
        if t0 is None or not batch.reqs:
            return
        seconds = (time.perf_counter() if end is None else end) - t0
        add_verify(self.stats["host"], seconds)
        if self.graph_tiers is None:
            return
        bs = len(batch.reqs)
        # (rank 0's time on every TP rank: the widths planned from it must agree)
        seconds = self.tp.agree_value(seconds, self.device)
        self.graph_tiers.observe(bs, max(tokens // bs - 1, 0), bool(result.can_run_cuda_graph),
                                 seconds, tokens=tokens)
        self.stats["graph_tiers"] = self.graph_tiers.stats()

    def _prepare_verify(self, batch, trees, width: int | None = None):
        """Drafts -> uniform TARGET_VERIFY batch (tokens, KV slots, mask, positions,
        links): every request padded to ``width`` draft tokens (default: the batch's
        widest tree)."""
        bs = len(batch.reqs)
        widest = int(tree_lens(trees).max(initial=0))
        width = widest if width is None else max(int(width), widest)
        seq_lens = batch.seq_lens_cpu.numpy()  # (int64, no copy: see _verify_ragged)
        roots = self._roots(batch)
        layout = build_layout(roots, trees, seq_lens, width)
        n, dev = layout.n, self.device
        draft_tokens = torch.from_numpy(layout.tokens).to(dev)
        batch.forward_mode = ForwardMode.TARGET_VERIFY
        batch.input_ids = draft_tokens
        batch.out_cache_loc = self._verify_cache_locs(batch, batch.seq_lens + n, n)
        batch.spec_info = NgramVerifyInput(
            draft_token=draft_tokens,
            custom_mask=custom_mask(layout, seq_lens, self.device),
            positions=torch.from_numpy(layout.positions).to(dev),
            retrieve_index=torch.from_numpy(layout.retrieve_index).to(dev),
            retrieve_next_token=torch.from_numpy(layout.next_token).to(dev),
            retrieve_next_sibling=torch.from_numpy(layout.next_sibling).to(dev),
            draft_token_num=n,
        )
        self.stats["verify_steps"] += 1
        self.stats["verify_tokens"] += bs * n
        self._forward_tokens = bs * n
        return layout

    def _budget_form(self) -> str:
        """How the policy plans (stats): one width for the batch, or per request."""
        return "batch-width" if self.options.policy.uniform_width else "per-request"

    def _verify_cache_locs(self, batch, end_offset, n: int):
        """KV slots of the verify rows: SGLang's kernel, each request's slots from its
        ``seq_len`` up to ``end_offset`` (``n`` = the most rows one request verifies)."""
        return assign_extend_cache_locs_func(
            req_pool_indices=batch.req_pool_indices,
            req_to_token=batch.req_to_token_pool.req_to_token,
            start_offset=batch.seq_lens,
            end_offset=end_offset,
            batch_size=len(batch.reqs),
            draft_token_num=n,
            device=self.device,
        )

    # ---------------------------------------------------------------- ragged verify
    def _verify_ragged(self, batch, trees, on_publish, pp_proxy_tensors, t_in):
        """One TARGET_VERIFY forward where request ``b`` verifies ``len(trees[b]) + 1``
        tokens (sglang/ragged.py): same sampling, walk and KV mover as the uniform
        path, over ragged rows."""
        dev, stride = self.device, self.draft_token_num
        # (SGLang's int64 CPU tensor viewed as numpy: the layout and the mask index read it
        # as is, where a list -- .tolist() -- was converted back twice: ~50 us at 512 rows)
        seq_lens = batch.seq_lens_cpu.numpy()
        roots = self._roots(batch)
        rl = build_ragged_layout(roots, trees, seq_lens, mask_zeros=str(dev) != "cpu")
        # every integer input in one host-to-device copy (views of it), SGLang's layout
        # from its host-built qo arrays
        d = ragged_device_inputs(rl, seq_lens, dev)
        verify_lens, offsets, tokens = d.verify_lens, d.offsets, d.tokens
        batch.forward_mode = ForwardMode.TARGET_VERIFY
        batch.input_ids = tokens
        # allocation bound rl.n: bs * n >= total rows
        batch.out_cache_loc = self._verify_cache_locs(batch, batch.seq_lens + verify_lens, rl.n)[: rl.total]
        links = [d.candidates, d.retrieve_index, d.next_token, d.next_sibling]
        batch.spec_info = DasVerifyInput(
            layout=layout_from_inputs(d, rl.total),
            total_tokens=rl.total,
            draft_token=tokens,
            custom_mask=d.custom_mask,
            positions=d.positions,
            retrieve_index=links[1],
            retrieve_next_token=links[2],
            retrieve_next_sibling=links[3],
            draft_token_num=rl.n,
        )
        self.stats["verify_steps"] += 1
        self.stats["ragged_steps"] += 1
        self.stats["verify_tokens"] += rl.total
        self._forward_tokens = rl.total
        add_plan(self.stats["host"], time.perf_counter() - t_in, len(batch.reqs))
        result = self._launch_verify(batch, pp_proxy_tensors)
        logits_output = result.logits_output
        target = self.target_tokens(logits_output.next_token_logits, batch.sampling_info,
                                    batch.spec_info.positions, verify_lens)
        self.tp.agree(target)  # decided once, on TP rank 0 (see tp.py)
        predict, accept_index, num_correct = walk_ragged(
            links[0], links[1], links[2], links[3], target, stride,
            greedy_accept=getattr(target, "greedy_accept", None),
        )
        return self._commit(
            batch, trees, result, predict, accept_index, num_correct, on_publish,
            lambda k: move_accepted_kv(batch, offsets, verify_lens, accept_index, k,
                                       self.token_to_kv_pool_allocator, stride),
        )

    def _register(self, req) -> None:
        if req.rid in self._reqs:
            return
        origin = req.origin_input_ids_unpadded
        prompt = tuple(origin)
        self.session.start(
            req.rid,
            req.sampling_params.custom_params,
            prompt,
            list(req.output_ids),
            req.sampling_params.max_new_tokens or 1 << 30,
            root_only=needs_root_only(req),
        )
        # The prompt as started (an immutable copy) and the object SGLang holds: the
        # finish passes that same tuple while SGLang still holds that object, and the
        # session then skips comparing the prompt (DasSession.finished).
        self._reqs[req.rid] = (req, origin, prompt)
        self._stop_rules.add(req.rid, req)

    def _feed_back(self, batch, trees, accept_tokens, accept_lens) -> None:
        # One device->host copy each, then flat arrays (TokenRows): no Python list per
        # request, which at 512 requests cost as much as the rest of the feedback.
        t = time.perf_counter()  # (the flat form is DAS's host work too: timed with it)
        lens = accept_lens.numpy()
        rows = TokenRows.from_padded(accept_tokens.numpy(), lens)
        proposed = tree_lens(trees)
        # (the counts as the int64 array they are: a list made here was made an array again)
        finishing, self._finishing = self._finishing, None
        self.session.committed_batch(self._rids(batch), proposed, rows, finishing=finishing)
        cut_s, self._cut_s = self._cut_s, 0.0  # (the stop cut's host time, this step's)
        add_feedback(self.stats["host"], time.perf_counter() - t + cut_s)
        self.stats["plans_ahead"] = self.session.counters["plans_ahead"]
        self.stats["plans_ahead_kept"] = self.session.counters["plans_ahead_kept"]
        self.stats["launched_first"] = self.session.counters["launched_first"]
        self.stats["launch_mismatch"] = self.session.counters["launch_mismatch"]
        self.stats["proposed"] += int(proposed.sum())
        self.stats["accepted"] += int(lens.sum()) - len(lens)
        if self.options.server.stats_path:
            write_json_atomic(self.options.server.stats_path, self.stats)

    def _relay(self, new_seq_lens, accept_tokens, accept_lens):
        # Fixed stride (speculative_num_draft_tokens) so SGLang's filter/merge of
        # batches never mixes widths, whatever width each step used.
        return NgramVerifyInput(
            draft_token_num=self.draft_token_num,
            new_seq_lens=new_seq_lens,
            accept_tokens=accept_tokens,
            accept_lens=accept_lens,
        )

    # ---------------------------------------------------------------- prefill
    def _forward_extend(self, batch, on_publish, pp_proxy_tensors):
        result = self.target_worker.forward_batch_generation(
            batch, pp_proxy_tensors=pp_proxy_tensors
        )
        bs = len(batch.reqs)
        predict = result.next_token_ids
        new_seq_lens = batch.seq_lens.clone()
        accept_tokens = torch.zeros(
            bs, self.draft_token_num, dtype=torch.int32, device=self.device
        )
        accept_tokens[:, 0] = predict
        accept_tokens = accept_tokens.flatten()
        accept_lens = torch.ones(bs, dtype=torch.int32, device=self.device)
        if on_publish is not None:
            on_publish(new_seq_lens)
        return GenerationBatchResult(
            logits_output=result.logits_output,
            next_token_ids=predict,
            can_run_cuda_graph=result.can_run_cuda_graph,
            accept_lens=accept_lens,
            new_seq_lens=new_seq_lens,
            next_draft_input=self._relay(new_seq_lens, accept_tokens, accept_lens),
            speculative_num_draft_tokens=self.draft_token_num,
        )

    # ---------------------------------------------------------------- finished
    def note_request_finished(self, *, rid: str, natural_stop: bool) -> None:
        entry = self._reqs.pop(rid, None)
        self._stop_rules.remove(rid)
        if entry is None:
            return
        req, origin, prompt = entry
        if isinstance(req.finished_reason, FINISH_ABORT) or is_server_warmup(req):
            self.session.drop(rid)  # an aborted rollout / warmup is not a policy sample
            return
        if req.origin_input_ids_unpadded is not origin:
            prompt = list(req.origin_input_ids_unpadded)  # (another prompt object: compared)
        self.session.finished(rid, prompt, delivered_output(req))
