"""Host path of the DAS SGLang worker per decode step, at RL scale, without a model forward.

    python benchmarks/bench_host_path.py --json out.json [--png out.png]

What the scheduler thread does for DAS per decode step, timed per step (critical path):
``DasSession.plan`` (speculate + policy plan + truncation/buckets), the verify layout and
the tensors the worker hands SGLang (``tree_inputs.build_layout`` + GPU-form mask), the
feedback (``TokenRows.from_padded`` of the verify's accepted-token array and
``committed_batch``, as the worker calls them), and the step's finishes / starts, step boundaries
(``weights_updated``: window eviction + snapshot) and periodic snapshots.

Scale: ``--problems`` (default 2048) problems x ``--samples`` (16) history rollouts, built
from the bundled SkyThought AIME24 rollouts (30 problems x 22 checkpoint outputs, cut to
``--max-tokens``) repeated and perturbed: problem ``j`` is base problem ``j mod 30`` with
its token ids shifted by a per-problem offset and ``--perturb`` of them replaced at random,
so no two problems share an index. ``batch`` live requests (spread over the problems;
they start in GRPO groups of ``--group`` (16) consecutive requests of one problem, as an RL
rollout queue holds each prompt's samples together -- until this version every start drew a
random problem, so a start's prompt was almost never already indexed by a sibling, which
``DrafterConfig.dedup_prompts`` relies on) replay held-out outputs token by token, accepting what the draft tree matches; a request
that reaches the end of its text finishes (its text becomes history) and a new one starts
(which requests finish is one vectorised test, as SGLang hands the worker its finished
requests: until this version a Python pass over every slot was timed too, 0.4-1.2 ms
per step at batch 512, bench bookkeeping charged to DAS).
Every ``--step-every`` steps the RL step boundary (``weights_updated``) comes; history is
snapshotted to a temp dir every ``--snapshot-every`` finishes.

Between two steps the engine's own work is modelled, so background work has what it has
in the real worker: the forward (``--forward-ms``, GIL released: the scheduler thread
waits on the GPU) and SGLang's own work between two decode steps -- result processing,
output streaming, scheduling the next batch -- as ``--engine-fixed-ms`` per step plus
``--engine-us`` per request (a GIL-holding Python loop: a fixed amount of time's work,
its loop rate measured before every block of steps while no DAS thread works,
``--engine-calibration``; until this version once at the start, so a slow phase of the VM
was charged to DAS as engine delay). The defaults are what the installed SGLang was
measured to take on this 2-core VM (``measure_engine_gap.py``: 1.21 ms + 15.6 us per
request, 9.2 ms a step at 512 requests); until this version the model was 2 us per
request and nothing fixed, an estimate ~8x below that. Neither is counted in the step time, except what the engine's Python took
beyond its nominal time (``engine_delay``): DAS's background threads competing for its
core slow it down, and that is DAS's cost. The feedback
starts the native extend + pre-draft of the next plan's trees on a thread of its own
(``SuffixDrafter.start_extend``); it overlaps that engine work and the next step's Python
up to the plan's wait (below), and the plan drafts again every row whose index changed
meanwhile (finishes, starts).

Baseline (``baseline_p50_ms``): the same loop with the host path as it was before this
benchmark's changes, in the same process: updates inline on the scheduler thread, a
validating BudgetRow per row, the length predictor rebuilt from scratch after every finish
(``legacy_length_predictor.py``), snapshots copied and written on the scheduler thread.
Both sessions are built first (then ``gc.freeze()``: the set-up objects leave the cyclic
GC, as a server does after warm-up) and run interleaved in blocks of ``--interleave`` (10)
steps each, so machine load hits both alike; update-thread work still pending at a switch
is waited for and charged to the current path's next step (what its next plan would have
waited). Within a block a session runs as in the worker: the next step's finishes, starts
and the policy's ``prepare`` overlap the update thread's job, and the plan waits for what
is left of it (in ``plan``; ``carried`` is then the wait after a switch). ``--interleave
1`` is the earlier step-by-step protocol, where every step ends with that wait.

The verify mask is built in the GPU form (``[seq_len prefix ones | tree]`` rows), on the
``meta`` device by default (``--mask-device``): on a GPU the fill of the ones and the
scatter of the tree blocks are device kernels the host only launches, so the host's part
is the native scatter index and the tensor ops' dispatch, which meta tensors still run.
Until this version the bench filled the mask on the CPU (``--mask-device cpu``): a 1.6M-entry
fill at 512 rows, 0.08 ms warm in isolation, more in the bench where the fresh pages fault
in (up to ~0.4 ms a call under a profiler), charged to the host path although a GPU host
never does it; the mask phase p50 went 0.46-0.48 -> 0.42-0.45 ms at 512 rows (the rest of
that phase is the forward hook and the tensors' wrapping).

The session's forward hook (``before_forward``: the step's background work -- the policy's
recording, the eviction chunk, the new requests' registration) is called where the worker
calls it on a GPU (``--forward-hook after_launch``, ``server.forward_hook`` ``auto`` on CUDA):
once the verify forward is launched, so its host time (~0.05-0.07 ms at 512 rows) overlaps
the modelled forward (whose sleep is shortened by it) and counts in a step only past the
forward's end (phase ``hook``); per batch ``forward_hook`` gives its own p50 / max. Until
this version it was timed in the mask phase, before the forward (``--forward-hook
before_launch``, the CPU worker's placement: its forward is synchronous).

With the hook after the launch (the default) a step runs as the worker runs it on a CUDA
device since stop 57: where its plan is the one the feedback's job made ahead, the job's
trees are verified first (``DasSession.launch_plan``) and the new requests' registration
and the plan itself run in the forward's shadow (``settle_launch``, in the ``hook`` time);
``--no-launch-first`` plans every step before its launch, as before. Per batch ``plans``
counts the plans made ahead, of them for rows that changed, the steps launched first and
their mismatches.

JSON: ``{"batches": {"32": {"p50_ms", "p99_ms", "max_ms", "baseline_p50_ms", ...}, ...},
"config": ...}``; per batch also ``phases_p50_ms`` (the step split into carried update-thread
wait, finishes/starts, boundary, plan, layout, mask, feedback, engine_delay; the phases
add up to the step; ``hook``: the forward hook past the forward's end), ``worst_steps`` (the five slowest steps with the same split), and per
step kind (decode / finish / boundary) its steps, p50 and max (``decode_p50_ms`` ...) with
``per_step_kind`` beside ``per_step_ms``, and ``decode_p50_by_block_position_ms`` (the
decode steps' p50 at each position of the ``--interleave`` blocks: the first positions
after the baseline's block run colder). ``engine_wait``: per step, how long the scheduler
thread waited for a core during the engine's work (its run-queue wait, Linux schedstat),
with how many steps over 5 ms would not be without it (``steps_over_5ms_less_wait``):
reported beside the step times, never subtracted from them -- a wait behind another
process (the VM's kdamond, say) is charged to DAS like one behind a DAS thread. Time the
hypervisor took the whole vCPU away (steal) is not in it: to the guest the thread was
running (``machine`` reports steal per block).

Which engine delay a step is charged (``--delay-rule``, ``headline_rule``): by default
(``off_cpu``) the part where the engine's thread was off the CPU (wall less thread CPU
time: preempted -- by a DAS thread on its core or by anything else --, or waiting for the
GIL a DAS thread held), the ways a DAS thread takes the engine's time; not where the
engine's loop ran slower on the CPU. Until this version the headline charged all of it
(``all``: wall time over the fastest calibration run), and an earlier version measured
that on-CPU slowdown at ~5 % with no DAS thread running. The bench now measures it in
the same process (``engine_control``: before every block of the current path's steps,
``--control-gaps`` engine gaps run alone, and as many at its end, no DAS call around
them and DAS's threads idle; delay p50 / p90 / p99 / max, all and off the CPU) beside the steps' own
(``engine_delay``, the same keys): on 2026-12-06 the engine model alone lost p50 0.29 /
p90 2.85 / p99 3.3 ms per 9.2 ms gap, all of it on the CPU (the VM's speed moving within
a block), as much as in the steps -- under the old rule that alone set the p99 of every
configuration. Both rules' p50 / p99 / max (and per kind) are kept (``rules``: ``off_cpu``,
``all``; ``baseline_rules_p50_ms``), as are ``per_step_all_ms`` and, per worst step,
``ms_all_delay`` and ``engine_off_cpu``.

The requests are SGLang's own ``Req`` objects (the model's EOS as their stop token; CPU
development mode is switched on to import SGLang where no GPU is), and the worker's reads
of them are timed as the worker does them (``das_sglang/sglang/batch_rows.py``): the
request ids and their stop rules once per ``batch.reqs`` list -- a new list on every step
with a finish or a start, as SGLang's ``filter_batch`` / ``merge_batch`` rebind it --, the
roots (``req.output_ids[-1]``) every step, and the stop cut (``BatchRows.cut``) over the
accepted runs on every step where a draft was accepted (feedback phase; the texts hold
no EOS, so it never cuts here). The end of a text stands for its EOS: the rows whose text
ends with a step are the rows the worker's stop cut says finish (``BatchRows.finishing``,
passed to the feedback as ``finishing``: the feedback's job leaves their outcomes out of
the next plan's calibration; until this version nothing was passed). The verify inputs are made as the worker makes them: the
host arrays in one packed buffer (``build_ragged_layout(..., mask_zeros=True)``, layout
phase), then one copy of it to the device (meta here), views of it, the mask, and SGLang's
ragged layout object from the buffer's host-built int32 qo arrays
(``ragged_device_inputs``, ``ragged.layout_from_inputs``; mask phase). Until this version
the worker copied each array on its own and made SGLang's layout with device ops from the
lengths (``from_verify_lens_device``: ~0.18 ms a step in the bench, made on the CPU since
meta tensors here run Python meta kernels (~1 ms a step). Sequence lengths are ``batch.seq_lens_cpu.numpy()``. A
request's first root is its prompt's last token, as before (it stands as the ``Req``'s
first output token; the requests' length limit is far off). Until this version the
requests were a stand-in holding a Python list of tokens, the ids were made every step
and the stop cut was not modelled at all, although the worker ran ``finish.stop_cut``
per request on every step: ~2 ms a step at 512 rows with EOS stops only, ~6.6 ms with a
stop string (per batch ``worker_rows``: that read, before and after ``BatchRows``, in
this process, with rows of both kinds).

What else the machine did (``machine_load.py``), so a slow tail can be told from a slow
host path: per batch ``machine`` -- per configuration the CPU other tasks took, DAMON's
``kdamond`` thread and hypervisor steal, in ms per step, and per block of the current path's
steps (``--interleave``) its slowest step beside the CPU other tasks / kdamond took in that
block (10 ms ticks), and ``quiet``: p50 / p99 / max over the blocks where other tasks and
steal took at most 10 % of one CPU (the host path when the machine leaves it alone; the issue's keys stay
over every step) -- and ``machine_info`` (CPUs, DAMON monitors: a ``paddr`` monitor with a
``pageout`` scheme took 11-26 ms of CPU per step on the issue-12 VM; docs/design.md
"Host path").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from array import array
from itertools import chain
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_drafter import load_problems  # noqa: E402
from legacy_length_predictor import LegacyLengthPredictor  # noqa: E402
from machine_load import MachineLoad, add, damon  # noqa: E402

from das_sglang.core.drafter import TokenRows  # noqa: E402
from das_sglang.core.policy import BudgetRow  # noqa: E402
from das_sglang.sglang.options import for_layout, load_options  # noqa: E402
from das_sglang.sglang.session import DasSession, _trim_heap  # noqa: E402
from das_sglang.sglang.tree_inputs import (  # noqa: E402
    build_layout, build_ragged_layout, custom_mask, ragged_device_inputs, tree_lens,
)

if not torch.cuda.is_available():  # (SGLang's own Req: importable here in CPU development mode)
    from das_sglang.sglang import cpu as _cpu  # noqa: E402

    _cpu.activate()
from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

from das_sglang.sglang.batch_rows import BatchRows, StopRules  # noqa: E402
from das_sglang.sglang.ragged import layout_from_inputs  # noqa: E402
from das_sglang.sglang.finish import stop_cut  # noqa: E402

EOS = 151_643  # Qwen2's <|endoftext|>: the requests' EOS (the bundled tokenizer's)

VOCAB = 151_000


def make_problems(base, n_problems, samples, perturb, seed):
    """``n_problems`` perturbed copies of the base problems: (prompt, history, live texts)."""
    rng = np.random.default_rng(seed)
    keys = sorted(base)
    out = {}
    for j in range(n_problems):
        prompt, responses = base[keys[j % len(keys)]]
        shift = (j // len(keys)) * 7919 % VOCAB

        def pert(a):
            a = (a.astype(np.int64) + shift) % VOCAB
            hit = rng.random(len(a)) < perturb
            a[hit] = rng.integers(0, VOCAB, int(hit.sum()))
            return a.astype(np.int32)

        rot = [responses[(k + j) % len(responses)] for k in range(len(responses))]
        hist = [pert(r) for r in rot[:samples]]
        live = [pert(r) for r in rot[samples:]] or [pert(rot[0])]
        out[f"q{j}"] = (pert(prompt), hist, live)
    return out


def history_of(problems, window: int) -> tuple[dict, dict]:
    """The samples of every problem as history spread over the window's past steps
    (``{problem: {step: [prompt + response]}}``), and per step the (problem, response
    length) pairs that finished in it."""
    finished_at: dict[int, list[tuple[str, int]]] = {}
    history: dict[str, dict[int, list[np.ndarray]]] = {}
    for n, pid in enumerate(sorted(problems)):
        prompt, hist, _ = problems[pid]
        for k, resp in enumerate(hist):
            step = 1 + (k + n) % window
            history.setdefault(pid, {}).setdefault(step, []).append(np.concatenate([prompt, resp]))
            finished_at.setdefault(step, []).append((pid, len(resp)))
    return history, finished_at


class Legacy:
    """The host path before issue 12, on the same DasSession object."""

    @staticmethod
    def plan(session, rids, max_nodes):
        session.sync()  # (starts were registered at once then: the deferred ones now)
        trees = session.drafter.speculate_batch(list(rids), [max_nodes] * len(rids))
        rows = [BudgetRow(req_id=r, problem_id=session.live[r].problem_id,
                          generated_len=session.live[r].generated,
                          max_new_tokens=session.live[r].max_new_tokens, node_probs=t.probs,
                          prompt_len=session.live[r].prompt_len) for r, t in zip(rids, trees)]
        plan = session.policy.plan(rows)
        trees = [t.truncate(min(int(b), max_nodes)) for t, b in zip(trees, plan.budgets)]
        return trees, max((len(t) for t in trees), default=0)

    @staticmethod
    def finished(session, rid, prompt, output):
        # A list (compared with the start's prompt, as every finish was then), and the
        # policy observes the length at once (since issue 12 it is queued with the verify
        # outcomes and recorded during the next forward).
        session.finished(rid, list(prompt), output)
        session._record_finishes()

    @staticmethod
    def committed_batch(session, rids, proposed, tokens):
        session.drafter.extend_batch(rids, tokens)
        for rid, p, t in zip(rids, proposed, tokens):
            lv = session.live[rid]
            lv.generated += len(t)
            session.policy.observe_verify(lv.problem_id, p, len(t) - 1)


def sglang_req(rid: str, prompt: list, first: int, stop: list | None = None, tokenizer=None):
    """An SGLang ``Req`` as the scheduler hands a decoding request to the worker: its
    prompt, its first output token (the prefill's) and sampling parameters with the
    model's EOS (``stop`` strings need ``tokenizer``)."""
    sp = SamplingParams(max_new_tokens=1 << 20, stop=stop)
    sp.normalize(tokenizer)
    req = Req(rid, "", list(prompt), sp, eos_token_ids={EOS})
    req.tokenizer = tokenizer
    req.output_ids.append(int(first))
    return req


_SPINS_PER_US = 0.0  # the engine model's loop iterations per microsecond (calibrate_engine)


def _spin(n: int) -> int:
    x = 0
    for _ in range(n):
        x += 1
    return x


def calibrate_engine(runs: int = 5, spins: int = 200_000) -> None:
    """Iterations per microsecond of the engine model's loop while no DAS thread works: the
    fastest of a few runs (the least disturbed), so the model is a fixed amount of time's
    work at the machine's current speed. Run at the start, and (``--engine-calibration
    block``) again before every block of steps, after the previous block's background work
    has finished: the VM's speed moves by 1.5-2x within minutes, and a rate measured once
    charged a slow phase's whole slowdown of the engine's Python (up to ~4.5 ms a step at
    512 rows, the baseline alike) to DAS as ``engine_delay``, which is meant to be what
    DAS's threads take from it."""
    global _SPINS_PER_US
    best = 0.0
    for _ in range(runs):
        t = time.perf_counter()
        _spin(spins)
        best = max(best, spins / ((time.perf_counter() - t) * 1e6))
    _SPINS_PER_US = best


def _run_queue_wait_s() -> float | None:
    """This thread's time spent runnable but not running so far (Linux schedstat), or
    None where the kernel does not say."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) * 1e-9
    except (OSError, ValueError, IndexError):
        return None


class EngineGap(NamedTuple):
    delay: float  # s the engine's work took beyond nominal (>= 0): charged to DAS
    wait: float | None  # s of it the thread waited for a core (run queue), None if unknown
    off_cpu: float  # s the thread was off the CPU meanwhile (wall - thread CPU time)


def engine_gap(rows: int, forward_ms: float, engine_us: float, fixed_ms: float = 0.0) -> EngineGap:
    """The engine's own work between two DAS calls: how much longer than nominal its
    Python took (``delay``, s, >= 0): a fixed amount of work (``fixed_ms`` per step plus
    ``engine_us`` per request), so DAS's background threads taking its core slow it down,
    and that delay is charged to DAS. Also how much of the time the thread waited for a
    core (``wait``: preempted, by anything) or was off the CPU at all (``off_cpu``):
    reported, not subtracted."""
    time.sleep(forward_ms * 1e-3)  # the GPU forward: the scheduler thread waits, GIL free
    nominal = fixed_ms * 1e-3 + rows * engine_us * 1e-6
    if nominal <= 0:
        return EngineGap(0.0, 0.0, 0.0)
    w0 = _run_queue_wait_s()
    c = time.thread_time()
    t = time.perf_counter()
    _spin(int(nominal * 1e6 * _SPINS_PER_US))  # SGLang's per-request Python: holds the GIL
    wall = time.perf_counter() - t
    off_cpu = max(0.0, wall - (time.thread_time() - c))
    w1 = _run_queue_wait_s()
    return EngineGap(max(0.0, wall - nominal), None if w0 is None or w1 is None else w1 - w0, off_cpu)


def run(problems, batch, args, legacy: bool, snap_dir: Path, out: dict):
    """One configuration as a generator: yields once built, then after every
    ``args.interleave`` steps, so the current and the baseline host path can run
    interleaved in short blocks (the same machine load for both)."""
    cfg = {"drafter": {"max_budget": args.max_nodes, "window_steps": args.window},
           "policy": {"length_window_steps": args.window},
           "server": {"policy": args.policy, "history_path": str(snap_dir),
                      "snapshot_interval": args.snapshot_every, "async_updates": not legacy}}
    # the worker's options on its verify layout (ragged: per-request budgets)
    session = DasSession(for_layout(load_options(args.max_nodes + 1, json.dumps(cfg)), args.layout))
    if args.async_min_rows is not None:
        session.ASYNC_MIN_ROWS = args.async_min_rows
    if legacy:
        lengths = LegacyLengthPredictor(session.policy.config)
        session.policy.lengths = lengths
        session.snapshot.get_history = session.drafter.history  # copy from the index, inline
    pids = sorted(problems)
    t0 = time.perf_counter()
    session.drafter.advance_step(args.window)
    history, finished_at = history_of(problems, args.window)
    session.drafter.load_history(history)  # as a restore from a snapshot loads it
    # The predictor's lengths at the steps they finished in, as a running server records
    # them: its window then drops them step by step at the boundaries, not all at once.
    for step in sorted(finished_at):
        session.policy.lengths.advance_step(step)
        for pid, n_tok in finished_at[step]:
            session.policy.lengths.observe_finished(pid, n_tok)
    session.step = session.clock.current = args.window
    session.policy.advance_step(args.window)
    build_s = time.perf_counter() - t0
    stats = session.drafter.stats()
    rng = np.random.default_rng(args.seed)
    slots, counter = [None] * batch, [0]
    # Where each slot's text stands and ends: the simulated scheduler finds the requests
    # that finish this step with one vectorised test, not a Python pass over every slot
    # (at 512 rows that pass took 0.4-1.2 ms, which the step time charged to DAS; SGLang
    # tells the worker which requests finished, it does not scan the batch for it).
    pos_at, end_at = np.zeros(batch, np.int64), np.zeros(batch, np.int64)
    # What the worker reads roots and sequence lengths from, kept as SGLang keeps them (not
    # timed: SGLang's own bookkeeping): each request as SGLang's ``Req`` (its
    # ``output_ids``) and the batch's ``seq_lens_cpu`` array. ``batch_reqs[0]`` is the
    # batch's list of requests, a new list whenever requests finish or start (SGLang's
    # ``filter_batch`` / ``merge_batch`` rebind ``batch.reqs``), on which the worker's
    # ``BatchRows`` keys the request ids and stop rules it reads per step.
    reqs = [None] * batch
    batch_reqs = [None]
    seq_lens_cpu = np.zeros(batch, np.int64)
    rules = StopRules()  # the worker's stop rules of its registered requests
    rows = BatchRows(rules)
    registered: dict = {}  # the worker's _reqs (rid -> its Req)

    prompt_lists: dict[str, tuple] = {}  # (a problem's prompt, as the tuple the worker passes)
    group_pid = [None]

    def new_request():
        """The next request as SGLang would hand it over (not timed): its id, tag, prompt
        as a Python list, and the text it will decode."""
        if counter[0] % args.group == 0:  # the next GRPO group's problem
            group_pid[0] = pids[int(rng.integers(len(pids)))]
        pid = group_pid[0]
        prompt, _, live = problems[pid]
        text = live[counter[0] % len(live)][: args.live_tokens]
        rid = f"r{counter[0]}"
        counter[0] += 1
        plist = prompt_lists.get(pid)
        if plist is None:
            # (the worker starts and finishes a request with one tuple of its prompt)
            plist = prompt_lists[pid] = tuple(prompt.tolist())
        tlist = text.tolist()
        # (the root of its first step is the prompt's last token, as in earlier versions of
        # this bench: it stands as the Req's first output token, so the worker reads it
        # where it reads every later root, and the steps match earlier runs')
        return rid, pid, prompt, plist, text, tlist, sglang_req(rid, plist, int(prompt[-1]))

    unregistered: dict = {}  # rid -> (problem id, prompt tuple) of requests the worker has not seen

    def start(b, req):
        rid, pid, prompt, plist, text, tlist, sreq = req
        if legacy:
            session.start(rid, {"das_problem_id": pid}, plist, [], 1 << 30)
        else:  # (registered where the worker registers it: register_new)
            unregistered[rid] = (pid, plist)
        # (id, text, tokens decoded, the text as the Python list SGLang keeps, the prompt
        # as the tuple the worker starts and finishes a request with)
        slots[b] = [rid, text, 0, tlist, plist]
        pos_at[b], end_at[b] = 0, len(text)
        reqs[b] = sreq
        seq_lens_cpu[b] = len(prompt)

    def end(rid):  # the worker's note_request_finished: its stop rule goes
        if not legacy:
            rules.remove(rid)
            registered.pop(rid, None)

    def register_new(breqs, changed):
        """The worker's _register_new: the requests new in a changed batch list (the
        session's start and, since BatchRows, the stop rule)."""
        if not changed:
            return
        rule = rows.lookup_rules()
        missing = np.flatnonzero(rule < 0).tolist()
        rids_now = rows.rids
        for i in missing:
            rid, sreq = rids_now[i], breqs[i]
            pid, plist = unregistered.pop(rid)
            session.start(rid, {"das_problem_id": pid}, plist, [], 1 << 30)
            rules.add(rid, sreq)
            registered[rid] = sreq
            rule[i] = rules.rule.get(rid, -1)
        if missing:
            rows.set_rules(rule)

    for b in range(batch):
        start(b, new_request())
    batch_reqs[0] = list(reqs)
    if not legacy:
        rows.update(batch_reqs[0])
        register_new(batch_reqs[0], True)
    plan = Legacy.plan if legacy else DasSession.plan
    feed = Legacy.committed_batch if legacy else DasSession.committed_batch
    finish = Legacy.finished if legacy else DasSession.finished
    times, kinds, finishes, phases, cpus, hooks, waits, off_cpu_delays = [], [], 0, [], [], [], [], []
    carried = 0.0  # update-thread work still pending when the other configuration ran
    yield  # built
    for step in range(args.warmup + args.steps):
        # This step's finishes and the requests that replace them, with their prompts as
        # the worker passes them (its start's tuple) and outputs as SGLang keeps them
        # (``req.output_ids``): made
        # before the step's clock starts (until this version the bench's own conversions
        # of its numpy texts, ~30 us a finish, were timed as DAS's).
        # (the output as the worker hands it over, delivered_output: a slice of SGLang's
        # array("q") of the request's tokens)
        ending = [(b, slots[b][0], slots[b][4], array("q", slots[b][3][:slots[b][2]]), new_request())
                  for b in np.flatnonzero(pos_at + 1 >= end_at).tolist()]
        if ending:  # (SGLang's filter and merge of the batch: a new list of its requests)
            batch_reqs[0] = list(batch_reqs[0])
            for b, *_, req in ending:
                batch_reqs[0][b] = req[-1]
        t_begin = time.perf_counter() - carried
        c_begin = time.thread_time()
        carried_in = carried
        kind = "decode"
        ph, cpu = {}, {}
        # finishes and starts of this step (the scheduler calls them between forwards)
        for b, rid, plist, output, req in ending:
            finish(session, rid, plist, output)
            end(rid)
            finishes += 1
            kind = "finish"
            start(b, req)
        t1, c1 = time.perf_counter(), time.thread_time()
        ph["starts"] = t1 - t_begin - carried_in  # (the carried wait is its own phase)
        cpu["starts"] = c1 - c_begin
        if step and step % args.step_every == 0:
            session.weights_updated()
            kind = "boundary"
        breqs = batch_reqs[0]
        changed = False
        if legacy:
            rids = [s[0] for s in slots]
        else:  # the worker's _plan: ids when the list changed
            changed = rows.changed(breqs)
            if changed:
                rows.update(breqs)
            rids = rows.rids
        t2, c2 = time.perf_counter(), time.thread_time()
        ph["boundary"], cpu["boundary"] = t2 - t1, c2 - c1
        fast = None
        if legacy:
            trees, width = plan(session, rids, args.max_nodes)
        else:
            if args.forward_hook == "after_launch" and args.launch_first:
                # (the worker's _plan with its hook after the launch: the plan made ahead
                # verified at once, the registration and the plan in the forward's shadow)
                fast = session.launch_plan(rids, args.max_nodes, kept=rows.kept if changed else None)
            if fast is None:  # (with the worker's map of its batch lists: BatchRows.kept)
                register_new(breqs, changed)
                trees, width = plan(session, rids, args.max_nodes, kept=rows.kept)
            else:
                trees, width = fast
        t3, c3 = time.perf_counter(), time.thread_time()
        ph["plan"], cpu["plan"] = t3 - t2, c3 - c2
        # As the worker reads them (``_verify_ragged``): ``[req.output_ids[-1] for req in
        # batch.reqs]`` and ``batch.seq_lens_cpu.numpy()`` (a view of SGLang's int64 array).
        if legacy:
            roots = [r.output_ids[-1] for r in breqs]
        else:  # (with the output lengths, for this step's stop cut)
            roots, committed = rows.tails()
        seq_lens = seq_lens_cpu
        if args.layout == "ragged" and not legacy:  # what the worker builds there
            # (the host arrays in one packed buffer, with the device mask's positions)
            layout = build_ragged_layout(roots, trees, seq_lens, mask_zeros=True)
            t4 = time.perf_counter()
            # The worker's device inputs: one copy of the buffer (to the meta device here:
            # no data moves), views of it, the mask, and SGLang's layout object from the
            # buffer's int32 qo arrays (ragged_device_inputs, layout_from_inputs).
            inputs = ragged_device_inputs(layout, seq_lens, "cuda", target=args.mask_device)
            tensors = [inputs, layout_from_inputs(inputs, layout.total)]
            mask = inputs.custom_mask
        else:
            layout = build_layout(roots, trees, seq_lens, width)
            t4 = time.perf_counter()
            tensors = [torch.from_numpy(a) for a in (layout.tokens, layout.positions, layout.retrieve_index,
                                                      layout.next_token, layout.next_sibling)]
            mask = custom_mask(layout, seq_lens, "cuda", target=args.mask_device)
        ph["layout"] = t4 - t3
        hook_now = not legacy and args.forward_hook == "before_launch"
        if hook_now:
            session.before_forward()  # as the worker does once the verify inputs are built
        t_mid, c_mid = time.perf_counter(), time.thread_time()
        ph["mask"] = t_mid - t4
        cpu["layout+mask"] = c_mid - c3
        # Not timed: the forward and what verification accepts (from the recorded text).
        # With the hook after the launch (the worker on a CUDA device), the hook runs while
        # the device computes: its time overlaps the forward; what it takes beyond the
        # forward is the step's ("hook").
        hook_s = 0.0
        if not legacy and not hook_now:
            t_h = time.perf_counter()
            if fast is not None:  # (the worker's _settle_launch)
                register_new(breqs, changed)
                session.settle_launch(fast, rows.rids, args.max_nodes, kept=rows.kept)
            session.before_forward()
            hook_s = time.perf_counter() - t_h
        engine_gap(0, max(0.0, args.forward_ms - hook_s * 1e3), 0.0)
        commits, proposed = [], []
        for s, tree in zip(slots, trees):
            text, pos = s[1], s[2]
            k = tree.accept_length(text[pos: pos + len(tree) + 1].tolist())
            commits.append(text[pos: pos + k + 1].tolist())
            proposed.append(len(tree))
        if not legacy:
            # What the verify hands the worker: the accepted tokens as a [batch, stride]
            # array and their counts (made untimed, as the device makes them); the worker's
            # host part -- TokenRows.from_padded and the feedback -- is timed.
            n_acc = np.fromiter(map(len, commits), np.int64, batch)
            padded = np.zeros((batch, args.max_nodes + 1), np.int64)
            padded[np.arange(args.max_nodes + 1)[None, :] < n_acc[:, None]] = np.fromiter(
                chain.from_iterable(commits), np.int64, int(n_acc.sum()))
            # (the rows whose text ends with this step: the end of a text stands for its
            # EOS, which the worker's stop cut sees in the accepted run -- untimed, the
            # bench's own bookkeeping)
            ends = pos_at + n_acc + 1 >= end_at
        t_fb, c_fb = time.perf_counter(), time.thread_time()
        finishing = None
        if not legacy and int(n_acc.max()) > 1:
            # The worker's stop cut (_cut_at_stops: BatchRows.cut over the accepted runs,
            # on every step where a draft was accepted). The texts hold no EOS: it never
            # cuts here, but a cut is applied as the worker applies it; the rows it says
            # finish (BatchRows.finishing) are those whose text ends.
            cut = rows.cut(padded, n_acc, committed)
            for b in np.flatnonzero(cut < n_acc).tolist():
                n_acc[b] = cut[b]
                commits[b] = commits[b][: cut[b]]
            finishing = rows.finishing | ends
        # (the worker passes the trees' node counts as tree_lens gives them: an int64 array)
        if legacy:
            feed(session, rids, proposed, commits)
        else:
            feed(session, rids, tree_lens(trees), TokenRows.from_padded(padded, n_acc), finishing=finishing)
        t_end, c_end = time.perf_counter(), time.thread_time()
        cpu["feedback"] = c_end - c_fb
        for s, r, c in zip(slots, reqs, commits):
            s[2] += len(c)
            r.output_ids.extend(c)
        n_commit = np.fromiter(map(len, commits), np.int64, batch)
        pos_at += n_commit
        seq_lens_cpu += n_commit
        del tensors, mask
        gap = engine_gap(batch, 0.0, args.engine_us, args.engine_fixed_ms)
        delay = gap.delay
        if step >= args.warmup:
            waits.append(None if gap.wait is None else gap.wait * 1e3)
            # (the same step with only the engine delay spent off the CPU charged: see
            # off_cpu_rule)
            off_cpu_delays.append(min(delay, gap.off_cpu) * 1e3)
            over = max(0.0, hook_s - args.forward_ms * 1e-3)  # (the hook past the forward's end)
            times.append(((t_mid - t_begin) + (t_end - t_fb) + delay + over) * 1e3)
            kinds.append(kind)
            hooks.append(hook_s * 1e3)
            ph["hook"] = over
            ph["feedback"] = t_end - t_fb
            ph["engine_delay"] = delay
            ph["carried"] = carried_in
            phases.append({k: v * 1e3 for k, v in ph.items()})
            cpus.append({k: v * 1e3 for k, v in cpu.items()})
        carried = 0.0
        if (step + 1) % args.interleave == 0:
            # Before the other configuration's steps: what the update thread still has to
            # do would have delayed this session's next plan, so that wait is charged to
            # it; the truly background work (length-index rebuild, snapshot write) is let
            # finish uncharged, so it does not run during the other configuration's timed
            # steps. Within a block the session runs as in the worker: its next step's
            # Python (finishes, starts, the policy's prepare) overlaps the update thread.
            t0 = time.perf_counter()
            session.sync()
            carried = time.perf_counter() - t0
            lengths = session.policy.lengths
            if hasattr(lengths, "_wait"):
                lengths._wait()
            if session.snapshot is not None:
                session.snapshot.wait()
            yield
    counters = {k: session.counters.get(k, 0) for k in ("plans_ahead", "plans_ahead_kept", "launched_first",
                                                          "launch_mismatch")}
    session.close()
    cpu_ms = [sum(c.values()) for c in cpus]
    # (each step with its engine delay charged only where the engine was off the CPU)
    off_cpu_times = [t - p["engine_delay"] + d for t, p, d in zip(times, phases, off_cpu_delays)]
    head = off_cpu_times if args.delay_rule == "off_cpu" else times
    worst = sorted(range(len(head)), key=lambda i: -head[i])[:5]
    out.update(counters=counters, off_cpu_delays=off_cpu_delays, hooks=hooks, times=times, kinds=kinds, waits=waits, off_cpu_times=off_cpu_times, finishes=finishes, build_s=build_s, stats=stats, phase_rows=phases,
               phases={k: float(np.percentile([p[k] for p in phases], 50)) for k in phases[0]},
               cpu_ms=cpu_ms, cpu_phases={k: float(np.percentile([c[k] for c in cpus], 50)) for k in cpus[0]},
               worst=[{"step": i, "kind": kinds[i], "ms": head[i], "ms_all_delay": times[i], **phases[i],
                       "engine_off_cpu": off_cpu_delays[i], "engine_wait": waits[i]}
                      for i in worst])


def _text_tokenizer():
    """The bundled Qwen2 tokenizer as transformers loads it (what SGLang gives a request:
    its ``decode`` reads stop strings)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from das_sglang.core.tokenize import BUNDLED_TOKENIZER, _read_tokenizer_json

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_read_tokenizer_json(BUNDLED_TOKENIZER)))


def worker_rows(batch: int, problems: dict, tokenizer, reps: int = 40, seed: int = 0) -> dict:
    """What the worker reads of ``batch.reqs`` in one decode step, before and after
    ``BatchRows`` (``das_sglang/sglang/batch_rows.py``), in this process, ms p50:
    ``before`` -- a registration check per request, the request ids twice (plan and
    feedback), the roots and ``finish.stop_cut`` per request over the accepted runs made
    Python lists (the worker until this version); ``after`` -- the ids kept for the batch's
    list, the roots, ``BatchRows.cut``; ``after_new_list`` -- the same on a step whose list
    is new (a start or a finish: the ids, the registration check and the cut's rows made
    again). Rows with EOS stops only (``eos``) and with a stop string too
    (``stop_string``: ``"</answer>"``, decoded with the bundled tokenizer). Accepted runs:
    1 + Geometric accepted drafts (mean ~2), 17 wide; outputs of 256 tokens from the
    bundled texts. ``before`` runs ``stop_cut`` as it is now, which no longer copies the
    whole output per call: with a stop string the worker's cost then was higher still."""
    rng = np.random.default_rng(seed)
    texts = [t for _, (_, _, live) in sorted(problems.items())[:64] for t in live]
    out = {}
    for label, stop in (("eos", None), ("stop_string", ["</answer>"])):
        reqs = []
        for i in range(batch):
            text = texts[i % len(texts)][:256].tolist()
            req = sglang_req(f"w{i}", [1, 2, 3], text[0], stop, tokenizer)
            req.output_ids.extend(text[1:])
            reqs.append(req)
        known = {r.rid: r for r in reqs}
        rules = StopRules()
        for r in reqs:
            rules.add(r.rid, r)
        rows = BatchRows(rules)
        rows.update(reqs)
        times = {"before": [], "after": [], "after_new_list": []}
        for _ in range(reps):
            lens = np.minimum(rng.geometric(0.45, batch), 17).astype(np.int64)
            runs = rng.integers(1000, 30000, (batch, 17)).astype(np.int64)
            t = time.perf_counter()
            _ = [req.rid in known for req in reqs]
            _ = [req.rid for req in reqs]
            _ = [req.output_ids[-1] for req in reqs]
            a = [stop_cut(req, run[:k]) for req, run, k in zip(reqs, runs.tolist(), lens.tolist())]
            _ = [req.rid for req in reqs]
            times["before"].append(time.perf_counter() - t)
            t = time.perf_counter()
            _ = rows.update(reqs)
            _, committed = rows.tails()
            c = rows.cut(runs, lens, committed)
            times["after"].append(time.perf_counter() - t)
            fresh = list(reqs)
            t = time.perf_counter()
            rows.update(fresh)
            rows.lookup_rules()
            _, committed = rows.tails()
            c2 = rows.cut(runs, lens, committed)
            times["after_new_list"].append(time.perf_counter() - t)
            reqs = fresh
            if c.tolist() != a or c2.tolist() != a:
                raise AssertionError("BatchRows.cut differs from stop_cut")
        out[label] = {k: float(np.percentile(v[5:], 50) * 1e3) for k, v in times.items()}
    return out


def _delay_stats(rows: list) -> dict | None:
    """p50 / p90 / p99 / max (ms) of engine delays, all of each and its off-CPU part."""
    if not rows:
        return None
    a = np.asarray(rows, dtype=float).reshape(-1, 2)
    out = {"gaps": len(a)}
    for name, col in (("delay", a[:, 0]), ("off_cpu", a[:, 1])):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = float(np.percentile(col, q))
        out[f"{name}_max_ms"] = float(col.max())
    return out


def summarize(times, kinds):
    a = np.asarray(times)
    out = {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
           "max_ms": float(a.max()), "mean_ms": float(a.mean()), "steps": len(a)}
    for k in ("decode", "finish", "boundary"):
        sel = [t for t, kk in zip(times, kinds) if kk == k]
        if sel:
            out[f"{k}_max_ms"] = float(max(sel))
            out[f"{k}_steps"] = len(sel)
            # (each kind's own p50: the step p50 at 512 rows sits between the decode steps'
            # and the finish steps', about half of each)
            out[f"{k}_p50_ms"] = float(np.percentile(sel, 50))
    return out


def _machine(loads: dict, n_blocks: dict, blocks: list, times: list, args) -> dict:
    """Per configuration, what else the machine did during its blocks of steps (ms per
    step; ``machine_load``), and per block of the current path's steps its slowest step
    beside the CPU other tasks and kdamond took meanwhile (10 ms ticks: a block, not a step)."""
    out = {}
    for legacy, total in loads.items():
        steps = n_blocks[legacy] * args.interleave  # (warm-up steps included)
        per = {}
        for k in ("others_cpu_s", "kdamond_cpu_s", "steal_s", "own_cpu_s"):
            v = total.get(k)
            per[k.replace("_s", "_ms_per_step")] = None if v is None else v * 1e3 / max(1, steps)
        out["baseline" if legacy else "current"] = per
    rows, quiet = [], []
    for k, used in enumerate(blocks):
        lo, hi = k * args.interleave - args.warmup, (k + 1) * args.interleave - args.warmup
        sel = times[max(0, lo):max(0, hi)]
        if not sel:
            continue
        others = used["others_cpu_s"]
        rows.append({"steps": [max(0, lo), hi], "max_ms": max(sel),
                     "others_cpu_ms": None if others is None else others * 1e3,
                     "kdamond_cpu_ms": None if used["kdamond_cpu_s"] is None else used["kdamond_cpu_s"] * 1e3})
        taken = None if others is None else others + (used["steal_s"] or 0.0)
        if taken is not None and taken <= QUIET_SHARE * used["wall_s"]:
            quiet.append(sel)
    out["blocks"] = rows
    # The same run's steps in the blocks where other tasks and the hypervisor (steal) took
    # at most QUIET_SHARE of one CPU: what this host path costs when the machine leaves it
    # alone (not the keys, which are over every step).
    q = [t for sel in quiet for t in sel]
    out["quiet"] = {"rule": f"blocks where other tasks + steal took <= {QUIET_SHARE:.0%} of one CPU",
                    "blocks": len(quiet), "steps": len(q),
                    **({"p50_ms": float(np.percentile(q, 50)), "p99_ms": float(np.percentile(q, 99)),
                        "max_ms": float(max(q))} if q else {"p50_ms": None, "p99_ms": None, "max_ms": None})}
    return out


QUIET_SHARE = 0.1  # _machine's "quiet" blocks: other tasks' CPU + steal <= this share of the wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--png", help="also plot per-step host ms here")
    ap.add_argument("--batches", default="32,128,512")
    ap.add_argument("--policy", default="length-aware")
    ap.add_argument("--problems", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=16, help="history rollouts per problem")
    ap.add_argument("--max-tokens", type=int, default=768, help="tokens kept per base rollout")
    ap.add_argument("--live-tokens", type=int, default=256, help="tokens a live request decodes")
    ap.add_argument("--perturb", type=float, default=0.02, help="share of tokens replaced")
    ap.add_argument("--group", type=int, default=16,
                    help="requests start in GRPO groups: this many consecutive starts share a "
                         "problem (and its prompt), as an RL rollout queue holds each prompt's n "
                         "samples together; 1 = every start a random problem (until this version)")
    ap.add_argument("--window", type=int, default=4, help="history window in steps")
    ap.add_argument("--max-nodes", type=int, default=16, help="draft nodes per request (N-1)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--step-every", type=int, default=50, help="decode steps per RL step")
    ap.add_argument("--snapshot-every", type=int, default=256, help="finishes between snapshots")
    ap.add_argument("--forward-ms", type=float, default=8.0, help="modelled forward (7B, H100)")
    # SGLang's own host work between two decode steps, measured on the installed SGLang
    # (benchmarks/measure_engine_gap.py, benchmarks/results/engine_gap/engine_gap.json:
    # 1.21 ms + 15.6 us per request on this 2-core VM; the earlier default, 2 us per
    # request and nothing fixed, was an estimate ~8x below it)
    ap.add_argument("--engine-us", type=float, default=15.6, help="SGLang's own Python per request")
    ap.add_argument("--engine-fixed-ms", type=float, default=1.21,
                    help="SGLang's own Python per decode step besides --engine-us")
    ap.add_argument("--engine-calibration", choices=("block", "start"), default="block",
                    help="when the engine model's loop rate is measured: before every block of "
                         "steps (the VM's current speed; engine_delay is then what DAS's threads "
                         "take from it) or once at the start (until this version)")
    ap.add_argument("--control-gaps", type=int, default=3,
                    help="engine gaps run alone (no DAS step around them) before and after every "
                         "block of the current path's steps: the engine model's own delay on this machine "
                         "(engine_control), against which the steps' engine_delay is read")
    ap.add_argument("--delay-rule", choices=("off_cpu", "all"), default="off_cpu",
                    help="which engine delay the headline keys charge to DAS: off_cpu (default: "
                         "where the engine's thread was off the CPU -- preempted, or waiting for "
                         "the GIL --, the ways a DAS thread takes its time) or all (wall time over "
                         "nominal, including the engine loop running slower on the CPU, which it "
                         "does as much with no DAS code running: engine_control; the headline "
                         "rule until this version)")
    ap.add_argument("--layout", choices=("ragged", "uniform"), default="ragged",
                    help="the worker's verify layout (sets the budgets' form: options.for_layout)")
    ap.add_argument("--mask-device", choices=("meta", "cpu"), default="meta",
                    help="where the GPU form of the verify mask is made: meta (default) keeps the "
                         "host's part (the native scatter index, the tensor ops' dispatch) and "
                         "leaves the fills to the device, as on a GPU; cpu fills it on the CPU "
                         "(the accounting until this version: the fill, with its page faults, at 512 rows)")
    ap.add_argument("--no-launch-first", dest="launch_first", action="store_false",
                    help="plan every step before its verify is launched (DasSession.LAUNCH_FIRST off: "
                         "the worker before this version); by default, with --forward-hook after_launch, "
                         "a step whose plan is the one made ahead verifies that plan's trees at once and "
                         "the plan runs in the forward's shadow (DasSession.launch_plan)")
    ap.add_argument("--forward-hook", choices=("after_launch", "before_launch"), default="after_launch",
                    help="where the worker calls DasSession.before_forward (server.forward_hook): "
                         "after_launch (default: the worker on a CUDA device, whose launch returns "
                         "while the forward runs; the hook overlaps the modelled forward) or "
                         "before_launch (the CPU worker's placement; until this version the "
                         "bench's: timed in the mask phase)")
    ap.add_argument("--interleave", type=int, default=10,
                    help="steps of one configuration before the other's (1: step by step)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--async-min-rows", type=int, default=None,
                    help="override DasSession.ASYNC_MIN_ROWS (batches extended on the update thread)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None, help="tokenizer cache (default: the package's)")
    args = ap.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        print(f"error: invalid --batches={args.batches!r}", file=sys.stderr)
        return 1
    if args.group < 1:
        print(f"error: invalid --group={args.group}: must be >= 1", file=sys.stderr)
        return 1
    if args.interleave < 1:
        print(f"error: invalid --interleave={args.interleave}: must be >= 1", file=sys.stderr)
        return 1
    if args.control_gaps < 0:
        print(f"error: invalid --control-gaps={args.control_gaps}: must be >= 0", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    calibrate_engine()
    base = load_problems(30, args.max_tokens, args.cache_dir)
    problems = make_problems(base, args.problems, args.samples, args.perturb, args.seed)
    text_tokenizer = _text_tokenizer()
    results = {"config": vars(args), "batches": {},
               "machine_info": {"cpus": os.cpu_count(), "damon": damon()}}
    for batch in batches:
        entry = {}
        modes = (False,) if args.no_baseline else (False, True)
        outs = {legacy: {} for legacy in modes}
        with tempfile.TemporaryDirectory(prefix="das-bench-snap-") as d:
            gens = [run(problems, batch, args, legacy, Path(d) / str(legacy), outs[legacy]) for legacy in modes]
            for g in gens:  # build both
                next(g)
            # The built history is long-lived: freeze it out of the cyclic GC, as a server
            # does after warm-up, so a full collection over millions of set-up objects does
            # not land in a random step of either path. Then hand the set-up's freed heap
            # (and the previous batch's sessions') back to the OS, as an idle server does
            # (DasSession trims only while no request is live): a heap full of freed blocks
            # can make glibc's malloc stall for tens of ms in a random step.
            gc.collect()
            _trim_heap()
            gc.freeze()
            # Interleaved: a block of steps of each configuration in turn. What else the
            # machine did meanwhile is summed per configuration (and per block of the
            # current path's steps): CPU taken by other tasks, DAMON's kdamond, steal.
            loads = {legacy: {} for legacy in modes}
            n_blocks = {legacy: 0 for legacy in modes}
            blocks = []
            control = []  # (delay, off-CPU part) of the engine gaps run alone, ms

            def alone() -> None:
                """The engine model alone, as in a step (the forward's wait, then its
                Python), with no DAS call around it and DAS's threads idle (a block ends
                once its background work is done): its delay is the machine's."""
                for _ in range(args.control_gaps):
                    engine_gap(0, args.forward_ms, 0.0)
                    cg = engine_gap(batch, 0.0, args.engine_us, args.engine_fixed_ms)
                    control.append((cg.delay * 1e3, min(cg.delay, cg.off_cpu) * 1e3))

            def block(legacy, g) -> bool:
                if args.engine_calibration == "block":
                    calibrate_engine(3, 40_000)  # (~1 ms each; no DAS work is running now)
                if not legacy:
                    alone()
                before = MachineLoad.now()
                try:
                    next(g)
                except StopIteration:
                    return False
                if not legacy:
                    alone()  # (and at its end: as far from the calibration as its last steps)
                used = MachineLoad.now().since(before)
                add(loads[legacy], used)
                n_blocks[legacy] += 1
                if not legacy:
                    blocks.append(used)
                return True

            while block(False, gens[0]):
                for legacy, g in zip(modes[1:], gens[1:]):
                    block(legacy, g)
            for legacy, g in zip(modes[1:], gens[1:]):
                while block(legacy, g):
                    pass
        gc.unfreeze()
        for legacy in modes:
            o = outs[legacy]
            times, kinds, fin, build_s, st = o["times"], o["kinds"], o["finishes"], o["build_s"], o["stats"]
            strict = summarize(times, kinds)
            off = summarize(o["off_cpu_times"], kinds)
            # The headline keys under --delay-rule; both rules' summaries kept (rules).
            s = off if args.delay_rule == "off_cpu" else strict
            rules = {name: {k: r[k] for k in ("p50_ms", "p99_ms", "max_ms", "decode_p50_ms", "finish_p50_ms")
                            if k in r} for name, r in (("off_cpu", off), ("all", strict))}
            if legacy:
                entry["baseline_p50_ms"] = s["p50_ms"]
                entry["baseline"] = s
                entry["baseline_rules_p50_ms"] = {name: r["p50_ms"] for name, r in rules.items()}
            else:
                entry.update(s)
                entry["headline_rule"] = args.delay_rule
                entry["rules"] = rules
                entry["per_step_ms"] = o["off_cpu_times"] if args.delay_rule == "off_cpu" else times
                entry["per_step_all_ms"] = times
                entry["per_step_kind"] = kinds  # (decode / finish / boundary, step by step)
                # The decode steps' p50 by position in their block of --interleave steps
                # (0: the first after the baseline's block): with the baseline the first
                # positions run colder (its work between them), docs/design.md stop 47.
                # (Timed steps start after --warmup steps: position = (warmup + i) mod block.)
                blk = max(1, args.interleave)
                entry["decode_p50_by_block_position_ms"] = [
                    float(np.percentile(v, 50)) if v else None
                    for pos in range(blk)
                    for v in [[t for i, (t, k) in enumerate(zip(times, kinds))
                               if k == "decode" and (args.warmup + i) % blk == pos]]]
                entry["phases_p50_ms"] = o["phases"]
                # Where the slow steps' time goes: each phase's p50 and max over the steps
                # of each kind (decode / finish / boundary).
                entry["phases_by_kind_ms"] = {
                    kind: {ph: {"p50": float(np.percentile(v, 50)), "max": float(np.max(v))}
                           for ph in o["phase_rows"][0]
                           for v in [[r[ph] for r, k in zip(o["phase_rows"], kinds) if k == kind]]}
                    for kind in sorted(set(kinds))}
                # The scheduler thread's own CPU time in the timed phases (no waits, and on a
                # VM not the time the hypervisor took from it: steal): what the host path
                # computes there, steadier than the wall-clock split on a shared machine.
                c = np.asarray(o["cpu_ms"])
                entry["thread_cpu"] = {"p50_ms": float(np.percentile(c, 50)), "p99_ms": float(np.percentile(c, 99)),
                                       "max_ms": float(c.max()), "phases_p50_ms": o["cpu_phases"]}
                entry["worst_steps"] = o["worst"]  # the slowest steps, by phase (ms)
                # The engine model's delay in the steps (all of it; the part off the CPU)
                # beside the same model's delay run alone (engine_control): where the two
                # match, what the steps' engine loop lost on the CPU is the machine's, not
                # what a DAS thread took from it.
                entry["engine_delay"] = _delay_stats([(p["engine_delay"], d) for p, d in
                                                      zip(o["phase_rows"], o["off_cpu_delays"])])
                entry["engine_control"] = _delay_stats(control)
                # Of each step's engine_delay, the time the scheduler thread waited for a
                # core during the engine's work (run-queue wait: preempted by another
                # process, or by a DAS thread on its core; the pool's threads keep off it).
                # Reported, not subtracted: the step times charge all of engine_delay.
                wt = [w for w in o["waits"] if w is not None]
                entry["engine_wait"] = None if not wt else {
                    "per_step_ms": o["waits"], "p50_ms": float(np.percentile(wt, 50)), "max_ms": float(max(wt)),
                    "steps_over_1ms": int(sum(w > 1.0 for w in wt)),
                    "steps_over_5ms_less_wait": int(sum(t > 5.0 and t - (w or 0.0) <= 5.0
                                                        for t, w in zip(times, o["waits"])))}
                # The forward hook's own time (--forward-hook after_launch: during the
                # forward, not in the step unless past its end, phase "hook")
                hk = np.asarray(o["hooks"])
                entry["forward_hook"] = {"placement": args.forward_hook, "p50_ms": float(np.percentile(hk, 50)),
                                         "max_ms": float(hk.max())}
                entry.update(finishes=fin, history_tokens=st.tokens, history_sequences=st.sequences,
                             index_bytes_per_token=st.bytes_per_token, build_s=build_s)
                # (plans: made ahead by the feedback's job; of them for rows changed since;
                # verified before the plan ran, and of those whose plan drafted otherwise)
                entry["plans"] = o["counters"]
                entry["machine"] = _machine(loads, n_blocks, blocks, entry["per_step_ms"], args)
            print(f"batch {batch:4d} {'baseline' if legacy else 'now     '} p50 {s['p50_ms']:.3f} "
                  f"p99 {s['p99_ms']:.3f} max {s['max_ms']:.3f} ms "
                  f"(finish max {s.get('finish_max_ms', 0):.2f}, boundary max "
                  f"{s.get('boundary_max_ms', 0):.2f}); history {st.tokens} tokens; phases p50 "
                  + " ".join(f"{k} {v:.2f}" for k, v in o["phases"].items()), flush=True)
            if not legacy:
                print(f"           plans: {o['counters']}", flush=True)
                tc = entry["thread_cpu"]
                print(f"           scheduler thread CPU: p50 {tc['p50_ms']:.3f} p99 {tc['p99_ms']:.3f} ms; phases p50 "
                      + " ".join(f"{k} {v:.2f}" for k, v in tc["phases_p50_ms"].items()), flush=True)
                ed, ec = entry["engine_delay"], entry["engine_control"]
                print(f"           headline rule {args.delay_rule}; under the other rule p50 / p99 / max "
                      + " / ".join(f"{rules['all' if args.delay_rule == 'off_cpu' else 'off_cpu'][k]:.3f}"
                                   for k in ("p50_ms", "p99_ms", "max_ms"))
                      + f"; engine delay in the steps p50 / p90 / p99 {ed['delay_p50_ms']:.2f} / "
                      f"{ed['delay_p90_ms']:.2f} / {ed['delay_p99_ms']:.2f} ms (off the CPU "
                      f"{ed['off_cpu_p50_ms']:.2f} / {ed['off_cpu_p90_ms']:.2f} / {ed['off_cpu_p99_ms']:.2f})"
                      + ("" if ec is None else f", alone (no DAS) {ec['delay_p50_ms']:.2f} / "
                         f"{ec['delay_p90_ms']:.2f} / {ec['delay_p99_ms']:.2f} ms over {ec['gaps']} gaps"),
                      flush=True)
        m = entry["machine"]["current"]
        qt = entry["machine"]["quiet"]
        if qt["steps"]:
            print(f"           quiet blocks ({qt['blocks']}, {qt['steps']} steps): p50 {qt['p50_ms']:.3f} "
                  f"p99 {qt['p99_ms']:.3f} max {qt['max_ms']:.3f} ms", flush=True)
        if m.get("others_cpu_ms_per_step") is not None:
            kd = m["kdamond_cpu_ms_per_step"]
            print(f"           machine during the current path's steps: other tasks took "
                  f"{m['others_cpu_ms_per_step']:.2f} ms CPU per step (DAMON's kdamond "
                  f"{'n/a' if kd is None else f'{kd:.2f}'}), steal {m['steal_ms_per_step']:.2f}", flush=True)
        entry["worker_rows"] = worker_rows(batch, problems, text_tokenizer)
        wr = entry["worker_rows"]
        print("           worker's reads of the batch (ms p50, before -> after BatchRows): "
              + "; ".join(f"{k} {v['before']:.3f} -> {v['after']:.3f} (new list {v['after_new_list']:.3f})"
                          for k, v in wr.items()), flush=True)
        results["batches"][str(batch)] = entry
    Path(args.json).write_text(json.dumps(results, indent=1))
    if args.png:
        _plot(results, args.png)
    return 0


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for b, e in results["batches"].items():
        ax.plot(e["per_step_ms"], label=f"batch {b} (p50 {e['p50_ms']:.2f}, baseline p50 "
                f"{e.get('baseline_p50_ms', float('nan')):.2f} ms)")
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.axhline(5.0, color="red", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("decode step")
    ax.set_ylabel("DAS host ms on the scheduler thread")
    rule = next((e.get("headline_rule") for e in results["batches"].values()), None)
    ax.set_title("DAS host path per decode step" + (f" (engine delay charged: {rule})" if rule else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
