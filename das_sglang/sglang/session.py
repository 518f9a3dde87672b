"""Per-process DAS state the SGLang worker drives: drafter, policy, request identity.

Plain Python over ints and numpy arrays (no torch, no SGLang objects), so the request
bookkeeping is testable without an engine. The worker translates SGLang's ``Req``
objects into the calls below.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import queue
import threading
import time
from array import array
from typing import NamedTuple, Sequence

import numpy as np

from das_sglang.core.budget_rows import (
    ROWMAP_MIN_ROWS, BudgetRows, kept_back, kept_rows, seed_gather_map, seed_row_map,
)
from das_sglang.core.draft_tree import DraftBatch
from das_sglang.core.drafter import TokenRows, _flat_tokens, as_tokens
from das_sglang.core.policy import make_policy
from das_sglang.core.snapshot import TokenGroup, gil_pause
from das_sglang.native import gather_list, int32_tokens, outcome_rows
from das_sglang.sglang.options import DasOptions
from das_sglang.sglang.request_params import (
    PROBLEM_KEY,  # noqa: F401  (re-exported)
    STEP_KEY,  # noqa: F401
    RateLimitedWarning,
    StepClock,
    parse_tag,
)

_log = logging.getLogger(__name__)
_warn_bad_params = RateLimitedWarning(_log)
_warn_bad_finish = RateLimitedWarning(_log)


def problem_of(custom_params: dict | None, prompt: Sequence[int]) -> tuple[str, int | None]:
    """``(problem_id, step)`` from a request's custom params; the problem id falls back to
    a hash of the prompt tokens, the step to None (= the current step). Raises
    ValueError naming a bad value (``request_params.parse_tag``)."""
    pid, step = parse_tag(custom_params)
    return (prompt_problem_id(prompt) if pid is None else pid), step


def _same_tokens(arr: np.ndarray, seq: Sequence[int]) -> bool:
    """``arr.tolist() == list(seq)`` (``arr`` int32): a list of Python ints is converted
    and compared in C (a 300-token prompt: ~2 us instead of ~6)."""
    if type(seq) is list or type(seq) is tuple:
        conv = int32_tokens(seq)
        if conv is not None:
            return bool(np.array_equal(arr, conv))
    return arr.tolist() == list(seq)


def prompt_problem_id(prompt: Sequence[int]) -> str:
    digest = hashlib.blake2b(np.asarray(prompt, dtype=np.int32).tobytes(), digest_size=8)
    return "prompt-" + digest.hexdigest()


class _Done:
    """Set once by the update thread when its item has run; waited for by any thread, any
    number of times. A lock held until then: made and waited for in C, where a
    ``threading.Event`` is a Condition in Python code (~20 us a step at 512 rows under a
    line profiler; the step times showed no difference, docs/design.md stop 47)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        self._lock.release()

    def is_set(self) -> bool:
        return not self._lock.locked()

    def wait(self) -> None:
        self._lock.acquire()
        self._lock.release()


class _Updates:
    """One background thread applying the drafter's mutations in submission order.

    The native index's batch extend releases the GIL, so the scheduler thread goes on with
    SGLang's own per-step Python while the accepted tokens are indexed. Reads stay
    consistent: every drafter read or other mutation on the scheduler thread first calls
    :meth:`flush`, so a request's next draft always sees all its accepted tokens, and no
    two calls ever touch an index at once. An error in a background update is logged and
    re-raised by the next ``flush`` (it is a bug, not bad request input: inputs are
    validated before submission).

    Items are submitted from one thread (the scheduler's). The queue is a C
    ``SimpleQueue`` and each item carries a :class:`_Done`: the thread runs them in order,
    so the latest item done means every item done (``busy``, ``flush``). A
    ``queue.Queue`` runs a put, a ``task_done`` and the ``unfinished_tasks`` test as Python
    under a Condition (20-60 us a put at 512 rows under a line profiler; no difference in
    the step times, docs/design.md stop 47)."""

    def __init__(self, name: str = "das-history-updates", what: str = "history update") -> None:
        self._what = what  # (in the error messages)
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._last: _Done | None = None  # the latest item's (None: nothing submitted yet)
        self._error: BaseException | None = None
        # Native work started off the GIL (see set_native): the callable that waits for it.
        self._native = None
        self._native_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        # Drain before interpreter shutdown: a daemon thread stopped inside a native call
        # (threads of its own, the GIL released) must not be torn down mid-update.
        atexit.register(self._drain)

    def _drain(self) -> None:
        self._finish_native_keeping_errors()
        last = self._last
        if self._thread.is_alive() and last is not None:
            last.wait()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            done = None
            try:
                if item is None:
                    return
                fn, args, done = item
                self._finish_native_keeping_errors()  # (inside this item: flush waits for both)
                fn(*args)
            except BaseException as e:  # noqa: BLE001 (re-raised on the scheduler thread)
                _log.exception("DAS: background %s failed", self._what)
                self._error = e
            finally:
                item = fn = args = None  # no reference to the session while idle
                if done is not None:
                    done.set()

    def submit(self, fn, *args) -> _Done:
        """Queue ``fn(*args)``; returns what is set once it has run."""
        return self._put(fn, args)

    def _put(self, fn, args: tuple) -> _Done:
        self._last = done = _Done()
        self._q.put((fn, args, done))
        return done

    def submit_each(self, items: list) -> None:
        """Queue ``fn(*args)`` for every ``(fn, args)`` of ``items``, in order, as one item:
        each runs whatever the others do (an error is logged and kept, as for items queued
        one by one; a flush then raises the last one)."""
        self._put(self._run_each, (items,))

    def _run_each(self, items: list) -> None:
        for fn, args in items:
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 (re-raised on the scheduler thread)
                _log.exception("DAS: background %s failed", self._what)
                self._error = e

    def busy(self) -> bool:
        """Some update is queued or running."""
        last = self._last
        return (last is not None and not last.is_set()) or self._native is not None

    def set_native(self, done) -> None:
        """Native work already running on a thread of its own, first in order: ``done()``
        waits for it (without the GIL) and keeps its result. Called while not busy. It is
        not queued: a queued item would wake this thread, which would take the GIL from
        the scheduler thread only to start waiting. The next item or flush runs it."""
        self._native = done

    def _finish_native(self) -> None:
        # Under the lock until it is done: the other thread (flush / the next item) must
        # not go on while the native work still runs.
        with self._native_lock:
            done, self._native = self._native, None
            if done is not None:
                done()

    def _finish_native_keeping_errors(self) -> None:
        """Finish the native work, if any; its error is kept like a background update's
        (raised by the next flush), so what was queued after it still runs. Always through
        the lock: the other thread may be finishing it right now."""
        try:
            self._finish_native()
        except BaseException as e:  # noqa: BLE001 (re-raised on the scheduler thread)
            _log.exception("DAS: background history update failed")
            self._error = e

    def flush(self) -> None:
        self._finish_native_keeping_errors()
        last = self._last
        if last is not None and not last.is_set():
            last.wait()
        self.raise_error()

    def raise_error(self) -> None:
        """Re-raise a failed background update's error (without waiting for the rest)."""
        if self._error is not None:
            e, self._error = self._error, None
            raise RuntimeError(f"DAS background {self._what} failed: {e!r}") from e

    def close(self) -> None:
        self._finish_native_keeping_errors()
        self._q.put(None)
        self._thread.join(timeout=30)


class _Finished(NamedTuple):
    """A finished request's length, pending for the policy with the verify outcomes."""

    problem_id: str
    length: int


class _Advanced(NamedTuple):
    """A step boundary for the policy (its length window), pending with the verify
    outcomes, in order with the finished lengths around it."""

    step: int


class _Forget(NamedTuple):
    """Problems whose policy statistics go (neither history nor a live request: see
    ``DasSession._forget_stale``), pending with the verify outcomes, in order with the
    finished lengths before them (a length recorded after would bring its problem back)."""

    problem_ids: frozenset


# What _record_finishes records in order before what reads the lengths (the rest of the
# pending items are verify outcomes)
_LENGTH_EVENTS = (_Finished, _Advanced, _Forget)


def _check_outcomes(proposed: np.ndarray, accepted: np.ndarray, req_ids: list, rows=None) -> None:
    """Verify outcomes kept for the policy (recorded later): a bad row raises now, naming
    its request (``0 <= accepted <= proposed``, as the statistics require). ``rows``: the
    outcomes' rows of ``req_ids`` (None: one outcome per entry)."""
    bad = (proposed < 0) | (accepted < 0) | (accepted > proposed)
    if bad.any():
        i = int(np.argmax(bad))
        rid = req_ids[i if rows is None else int(rows[i])]
        raise ValueError(f"invalid verify outcome for req_id={rid!r}: proposed="
                         f"{int(proposed[i])}, accepted={int(accepted[i])} (need 0 <= accepted "
                         "<= proposed)")


def _trim_heap() -> None:
    """glibc ``malloc_trim(0)``: return the freed pages of evicted history to the OS, so the
    process's RSS follows the history's size (freed memory otherwise stays in the malloc
    arenas of whichever thread freed it). No-op off glibc; ctypes drops the GIL for it."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None
_TRIMMER = None


def _trim_heap_later() -> None:
    """``_trim_heap`` on its own thread: it touches no index, so nothing waits for it (on
    the update thread a large heap's trim would delay the next plan's sync)."""
    global _TRIMMER
    if _TRIMMER is None:
        from concurrent.futures import ThreadPoolExecutor

        _TRIMMER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="das-malloc-trim")
    _TRIMMER.submit(_trim_heap)


class _Counts:
    """The live requests' generated-token counts (and their max_new_tokens and prompt
    lengths), int64 arrays indexed by a slot per request: a decode step reads its rows'
    columns with one gather each and adds its accepted tokens with one scatter, not a
    Python pass over request objects per column (~0.2 ms at 512 rows in the plan and the
    feedback together, ~0.1 ms more where a start or finish changed the batch)."""

    __slots__ = ("gen", "max_new", "prompt_len", "_free")

    def __init__(self, capacity: int = 64) -> None:
        self.gen = np.zeros(capacity, np.int64)
        self.max_new = np.zeros(capacity, np.int64)
        self.prompt_len = np.zeros(capacity, np.int64)
        self._free = list(range(capacity - 1, -1, -1))  # (pop: the lowest slot first)

    def take(self, generated: int, max_new: int, prompt_len: int) -> int:
        if not self._free:
            n = len(self.gen)
            more = np.zeros(n, np.int64)
            self.gen, self.max_new, self.prompt_len = (np.concatenate([a, more])
                                                       for a in (self.gen, self.max_new, self.prompt_len))
            self._free = list(range(2 * n - 1, n - 1, -1))
        slot = self._free.pop()
        self.gen[slot], self.max_new[slot], self.prompt_len[slot] = generated, max_new, prompt_len
        return slot

    def give(self, slot: int) -> None:
        self._free.append(slot)


class _Live:
    """A live request: its problem, step, sizes, and its slot in the session's counts."""

    __slots__ = ("problem_id", "step", "prompt_len", "max_new_tokens", "root_only", "prompt",
                 "given", "slot", "_counts")

    def __init__(self, problem_id: str, step: int, prompt_len: int, max_new_tokens: int,
                 generated: int, counts: _Counts, root_only: bool = False,
                 prompt: np.ndarray | None = None, given: tuple | None = None) -> None:
        self.problem_id, self.step = problem_id, step
        self.prompt_len, self.max_new_tokens = prompt_len, max_new_tokens
        self.root_only = root_only  # verified exactly at width 0 (request_constraints)
        self.prompt = prompt  # the prompt as validated at the start (int32)
        self.given = given  # the prompt tuple the start was given (immutable), if it was one
        self._counts = counts
        self.slot = counts.take(generated, max_new_tokens, prompt_len)

    @property
    def generated(self) -> int:
        """Response tokens the drafter has seen."""
        return int(self._counts.gen[self.slot])

    @generated.setter
    def generated(self, value: int) -> None:
        self._counts.gen[self.slot] = value


class DasSession:
    """Drafter + policy + the live requests of one worker process."""

    def __init__(self, options: DasOptions, drafter=None, policy=None,
                 write_snapshots: bool = True, engine_id: str | None = None):
        """``write_snapshots`` False (tensor-parallel ranks other than 0) still loads the
        history snapshot, so every rank drafts alike, but never writes it. ``engine_id``
        names this engine in ``server.shard_path`` (scale-out)."""
        from das_sglang.core.drafter import SuffixDrafter

        self.options = options
        self.drafter = drafter if drafter is not None else SuffixDrafter(options.drafter)
        self.policy = policy if policy is not None else make_policy(
            options.server.policy, config=options.policy
        )
        self.step = 0
        self.live: dict[str, _Live] = {}
        self._counts = _Counts()  # the live requests' generated tokens and sizes, by slot
        # The latest batch's rows resolved once (_rows): (req_ids, _live_version, records,
        # problem ids, max_new_tokens, prompt lengths, slots, each request once); stale once
        # a request starts or ends.
        self._rows_memo: tuple | None = None
        self._kept_hit = False  # (the latest plan gathered its rows through the caller's kept map)
        self._live_version = 0
        self._rows_dead: set[str] = set()  # requests ended since the memo was made
        self._root_only: set[str] = set()  # live requests verified at width 0
        # Starts and finishes not yet handed to the drafter (_release_deferred): (function,
        # arguments) in event order, and the deferred starts' req_ids.
        self._deferred: list[tuple] = []
        self._deferred_ids: set[str] = set()
        # Finishes whose work waits for the next call (finished, DEFER_FINISH_WORK):
        # (req_id, its live record, prompt, output) in finish order.
        self._finish_work: list[tuple] = []
        # Readable counters (saved in the snapshot's meta as "das_counters"):
        # bad_params = requests served untagged because of a bad DAS tag,
        # steps_opened = new clock steps, root_only = requests verified at width 0.
        # plans_ahead: plans that used the plan the feedback's job made (_plan_ahead), of
        # them plans_ahead_kept for rows that changed since (finishes, deferred starts)
        # launched_first: steps that verified the plan made ahead before their plan ran
        # (launch_plan), launch_mismatch: of them, those whose plan drafted other trees;
        # finish_errors: finished requests whose text was bad, not kept (_finish_one)
        self.counters = {"bad_params": 0, "steps_opened": 0, "root_only": 0, "plans_ahead": 0,
                         "plans_ahead_kept": 0, "plan_ahead_errors": 0, "launched_first": 0,
                         "launch_mismatch": 0, "finish_errors": 0}
        self.clock = StepClock(options.drafter.window_steps)
        # History mirror for snapshots (problem -> step -> TokenGroup: immutable, so a
        # background writer can hold a view while the scheduler thread goes on, and one
        # array per problem-step, so the writer's encode has no Python step per sequence).
        self._mirror: dict[str, dict[int, TokenGroup]] | None = None
        # Which problems the mirror holds per step (a problem may have left since): a step
        # boundary visits only the problems of the steps that leave the window, not every
        # problem (~1.8 -> 0.6 ms at 2,048 problems x 4 steps).
        self._mirror_steps: dict[int, set[str]] = {}
        self._tagged_since_flush = False
        self._updates = _Updates() if options.server.async_updates else None
        # The policy's recording of verify outcomes (Python, ~3 ms at 512 rows) runs on a
        # thread of its own during the verify forward (POLICY_THREAD): on the update thread
        # it ran before the native registrations and eviction queued behind it, serially,
        # while the scheduler thread's core sat idle waiting on the device.
        self._policy_updates = (_Updates("das-policy-updates", "policy recording")
                                if options.server.async_updates and self.POLICY_THREAD else None)
        if options.server.async_updates:
            from das_sglang.native import set_background_nice

            set_background_nice(options.server.background_nice)  # (the started jobs' threads)
        self.snapshot = self._open_snapshot(write_snapshots)
        lengths = getattr(self.policy, "lengths", None)
        if options.server.async_updates and lengths is not None:
            lengths.background = True  # rebuilt off the scheduler thread, double-buffered
        if options.server.async_updates:
            # Out-of-window history leaves the index in chunks on the background thread,
            # while the forward runs (one chunk per plan, started at before_forward).
            self.drafter.lazy_eviction = True
        self._evicting = False
        self._advance_due = False  # a deferred step advance ran: _after_advance is due
        # The worker calls before_forward() once the verify inputs are built: from then on
        # plan leaves the step's eviction chunk due there (_evict_due), not submitted itself.
        self._forward_hook = False
        self._evict_due = False
        self._snapshot_skip = False  # a held boundary save waits one more forward to be encoded
        self._boundary_save = False  # a boundary's save is made by the next before_forward
        self._trim_due = False  # a heap trim waits for no request to be live (_trim_when_idle)
        # Pre-drafting (SuffixDrafter.predraft): the latest plan's node cap. A pre-draft
        # queued before a step advance still runs (under the weights it was made for): the
        # first plan after the boundary reuses it (SuffixDrafter.REUSE_ACROSS_BOUNDARY).
        self._plan_nodes: int | None = None
        self._empty_drafts: DraftBatch | None = None  # (see _no_drafts)
        self._ahead_pending = False  # the latest feedback's job also plans ahead (_plan_ahead)
        # Verify outcomes and finished lengths reach the policy one step late
        # (committed_batch, finished): those not yet recorded, in event order, and the
        # event of a recording running on the update thread (set when done).
        self._outcomes: list[tuple] = []
        self._outcomes_job: _Done | None = None
        # Set by a feedback waiting for the update thread: yieldable work (eviction chunks,
        # shared-index removals) stops at its next unit and leaves the rest for later.
        self._yield_updates = threading.Event()
        self.worker_stats: dict | None = None  # the worker's verify counters, for shard stats
        self.shards = self._open_shards(engine_id)

    def sync(self) -> None:
        """Apply pending background history updates (before any other drafter access),
        the starts not yet registered included."""
        self._release_deferred()
        if self._updates is not None:
            self._updates.flush()
        if self._advance_due:
            self._after_advance()

    # Plans of at least this many rows leave the requests started since the previous plan
    # out of the drafter until the plan is made (_release_deferred): at RL scale a few start
    # each step, and indexing a prompt takes ~0.5-1 ms (native; bench_host_path, 512 rows),
    # which the plan waited for after the extend job (the update thread runs in order).
    # Such a request's first plan has an empty tree (a plain decode step, once per
    # request) and the other rows' trees do not see its prompt yet; its registration runs
    # during the verify forward (before_forward) and precedes its first extend. Smaller
    # batches register before drafting. Which rule applies depends on the plan's row count
    # only, so inline and background updates still draft alike.
    DEFER_START_MIN_ROWS = 64
    # Finishes wait with the deferred starts (same rule, same queue, in event order). A
    # finish's drafter part is Python (the returned text checked against the indexed copy,
    # the history's bookkeeping: ~50-100 us each); submitted at once it ran on the update
    # thread beside the scheduler's own Python (SGLang's result processing, the next plan's
    # policy), and the two took turns at the GIL: at 512 rows a step with finishes spent
    # 1-2 ms more in the policy's Python than its CPU time (bench_host_path). Deferred, it
    # runs during the verify forward, where the scheduler thread waits on the device. The
    # index is the same either way in the common case (the finished text is already
    # indexed as the request's own, ``SuffixDrafter.finish_as`` keeps it); what a plan's
    # drafts see depends only on the order of events and its row count, never on timing.
    DEFER_FINISHES = True

    def _release_deferred(self) -> None:
        """Hand the deferred starts and finishes to the drafter, in order (on the update
        thread when there is one, ahead of anything submitted after this)."""
        items = self._take_deferred()
        if not items:
            return
        if self._updates is not None:
            # One queue item for all of them (a step's finishes and starts: ~10 at batch
            # 512), not one each: every put locks the queue and may wake the update thread
            # (5-50 us each on the scheduler thread, bench_host_path).
            self._updates.submit_each(items)
            return
        for fn, args in items:
            fn(*args)

    def _take_deferred(self) -> list:
        """The deferred starts and finishes, in order, handed over (no longer deferred)."""
        self._settle_finishes()
        if not self._deferred:
            return []
        items, self._deferred = self._deferred, []
        self._deferred_ids = set()
        return items

    # ------------------------------------------------------------ requests
    def start(self, req_id: str, custom_params, prompt: Sequence[int], output: Sequence[int],
              max_new_tokens: int, root_only: bool = False) -> None:
        """First sight of a decoding request: its prompt and the output so far.

        A bad DAS tag never raises here (this runs inside SGLang's scheduler): the
        request is served untagged, with a rate-limited warning and a counter.
        ``root_only`` requests are never drafted for (budget 0, see ``plan``).
        A ``prompt`` tuple is kept: :meth:`finished` given that same tuple skips comparing
        it with the start's tokens (what the worker does).
        """
        self._settle_finishes()
        try:
            pid, step = parse_tag(custom_params)
        except ValueError as e:
            self.counters["bad_params"] += 1
            _warn_bad_params("DAS: request %s served untagged: %s", req_id, e)
            pid, step = None, None
        if pid is None:
            pid = prompt_problem_id(prompt)
        if step is not None:
            self._tagged_since_flush = True
        # The drafter registers the request later (_release_deferred: on the update thread
        # when there is one, in order after the pending updates), so the scheduler thread
        # does not wait for them. The drafter is read here only for a new das_step
        # (history_empty), after a sync; shard sync reads it on every start, so it keeps
        # the inline path.
        if self.shards is not None:
            self.sync()  # before any drafter read (history_empty) -- finishes may be pending
        step, opened = self.clock.resolve(step, self._history_empty_now)
        if opened:
            self.counters["steps_opened"] += 1
        if step > self.step:  # (a clock restored from a snapshot may map ahead of it)
            self.advance_step(step)
        if req_id in self.live:
            raise ValueError(f"duplicate req_id={req_id!r}: already started")
        prompt_arr = as_tokens(prompt, f"prompt_tokens of req_id={req_id!r}")
        output_arr = as_tokens(output, f"tokens of req_id={req_id!r}") if len(output) else None
        if self.shards is None:
            # Registered with the drafter by the next plan or anything before it that reads
            # or changes the drafter (DEFER_START_MIN_ROWS), in start order.
            self._deferred.append((self._start_in_drafter, (req_id, pid, prompt_arr, output_arr)))
            self._deferred_ids.add(req_id)
        else:
            self._start_in_drafter(req_id, pid, prompt_arr, output_arr)
        self.counters["root_only"] += bool(root_only)
        if root_only:
            self._root_only.add(req_id)
        self.live[req_id] = _Live(pid, step, len(prompt), max_new_tokens, len(output), self._counts,
                                  root_only, prompt_arr, prompt if type(prompt) is tuple else None)
        self._live_version += 1  # (the memo's rows stay theirs: see _rows_from)
        if self.shards is not None:
            self.shards.on_start(pid, step)  # lazy load of a problem this engine lacks

    def _start_in_drafter(self, req_id, problem_id, prompt, output) -> None:
        self.drafter.start_request(req_id, problem_id, prompt)
        if output is not None:
            self.drafter.extend_request(req_id, output)

    def _history_empty_now(self) -> bool:
        self.sync()  # pending finishes and starts first
        return self._history_empty()

    def _history_empty(self) -> bool:
        # Finished rollouts = indexed sequences minus the live requests' own.
        return self.drafter.stats().sequences <= len(self.live)

    # A step boundary while a batch decodes (between two forwards) does not wait for the
    # step's deferred starts and finishes: the drafter's advance is queued behind them (their
    # requests belong to the step that ends) and runs with them during the next verify
    # forward (before_forward). At 512 rows the boundary waited ~1 ms for them and the
    # plan after it drafted their rows and their siblings again (bench_host_path); now
    # that plan is an ordinary step's, from the trees pre-drafted before the boundary (as
    # REUSE_ACROSS_BOUNDARY already had it for the other rows). What a draft sees still
    # depends only on the order of events: the drafter's state at the plan is the one
    # before the boundary, on every path that defers starts (DEFER_START_MIN_ROWS).
    DEFER_ADVANCE = True
    # ... and its snapshot is saved by the boundary's forward hook (before_forward, in the
    # forward's shadow), not by the boundary itself: the save's meta records the pending
    # finished lengths (_snapshot_meta), which changes the policy's inputs, so the plan
    # right after the boundary dropped the plan made ahead and made its own (bench_host_path,
    # 512 rows: 5 of 8 boundary plans, ~1.0-1.3 ms vs ~0.3-0.8 with it). Nothing changes
    # the view or the lengths it saves in between (the plan only; a finish there is in it).
    # The advance itself queues behind the pending finished lengths (_Advanced), so they
    # are filed under the step they finished in without recording them first. False: saved
    # (and the lengths recorded) at the boundary, as before.
    DEFER_BOUNDARY_SAVE = True

    def advance_step(self, step: int) -> None:
        # (idle -- nothing decodes, the usual RL boundary -- the advance is applied at once)
        defer = (self.DEFER_ADVANCE and self.DEFER_FINISHES and self._updates is not None
                 and self.shards is None and bool(self.live))
        later = defer and self.DEFER_BOUNDARY_SAVE and self._forward_hook and self.snapshot is not None
        if not (defer and self.DEFER_BOUNDARY_SAVE):
            self._record_finishes(advances=not defer)  # (applied now: the earlier ones first)
        if not defer:
            self.sync()
        self.step = step
        if defer:
            self._deferred.append((self._advance_drafter, (step,)))
            # The policy's advance (its length window drops the oldest step's lengths:
            # ~0.5 ms at 2,048 x 16 lengths) is queued with the verify outcomes, in order
            # with the finished lengths, and recorded during the next forward like them:
            # the plan right after the boundary reads the lengths as they were before it
            # -- on every path, so plans never depend on thread timing.
            self._outcomes.append(_Advanced(step))
        else:
            self._advance_drafter(step, deferred=False)
            self.policy.advance_step(step)
        if self._mirror is not None:
            oldest = step - self.drafter.config.window_steps
            mirror = self._mirror
            for s in [s for s in self._mirror_steps if s < oldest]:
                for pid in self._mirror_steps.pop(s):
                    steps = mirror.get(pid)
                    if steps is not None and s in steps:
                        # (a new dict: a snapshot's view may hold the old one, _history_view)
                        rest = {k: g for k, g in steps.items() if k != s}
                        if rest:
                            mirror[pid] = rest
                        else:
                            del mirror[pid]
        if not defer:  # (else by the first plan after the drafter advanced: _after_advance)
            self._after_advance()
        if self.shards is not None:
            self.shards.advance_step(step)
        if later:
            self._boundary_save = True  # (by the next before_forward, held as below)
        elif self.snapshot is not None:
            hold = self._hold_snapshot()
            self.snapshot.save(hold)  # a step boundary is a natural checkpoint
            # Deferred, the boundary's forward already carries the drafter's advance, the
            # step's registrations and the policy's window step on the background threads;
            # the writer (a core for ~10 ms at RL scale, 2,048 x 16 rollouts) then starts a
            # forward later, so they do not run past this one (the feedback waited for them
            # 1.1-1.5 ms, bench_host_path at 512 rows).
            self._snapshot_skip = hold and defer

    def _advance_drafter(self, step: int, deferred: bool = True) -> None:
        """The drafter's part of a step boundary (on the update thread when deferred)."""
        self.drafter.advance_step(step)
        self._evicting = bool(self.drafter._evicting)
        if deferred:
            self._advance_due = True  # (read by the scheduler thread after a flush only)

    def _after_advance(self, deferred: bool = False) -> None:
        """What a boundary does once the drafter has advanced (with its deferred starts and
        finishes applied): the history cap, the statistics of problems without history or
        live requests, and a heap trim when no eviction follows. ``deferred`` (the plan
        after a boundary mid-batch): the statistics go with the verify outcomes (see
        ``_forget_stale``)."""
        self._advance_due = False
        self._check_cap()
        self._forget_stale(defer=deferred and self.DEFER_FORGET)
        if not self._evicting:  # (else once the last eviction chunk has run)
            self._trim_when_idle()

    def weights_updated(self) -> None:
        """The RL step boundary: SGLang flushed its cache (``update_weights_from_*``).
        Untagged traffic gets a sliding window this way; when tagged requests
        (``das_step``) advanced the step since the last flush, they drive it instead."""
        self._settle_finishes()
        if not self._tagged_since_flush:
            self.advance_step(self.clock.tick())
        self._tagged_since_flush = False

    # Batches this large extend (and pre-draft) off the scheduler thread: the native job
    # starts on a thread of its own (tens of us) and overlaps the engine's own work; A/B
    # in one process (bench_host_path): p50 -5 % at 8 rows, -20 % at 16, -5 to -16 % at 32
    # vs the inline extend. Below it, the thread start costs about what the extend does.
    ASYNC_MIN_ROWS = 8
    POLICY_THREAD = True  # record verify outcomes on a thread of their own (see __init__)
    PREPARE_AHEAD = True  # plan: the policy's draft-free inputs before waiting for the drafts
    # Out-of-window history removed per decode step, inside the forward's shadow (~1.5-2 ms
    # of native removals on the 2-core VM, bench_host_path: ~2,700 tokens per CPU ms). A
    # chunk runs to its end: a feedback that comes first waits for the rest (at 8,192
    # tokens 1-4 of 210 feedbacks a run waited 1.1-2.5 ms on one; at 4,096 none).
    EVICT_CHUNK_TOKENS = 4096
    UNSHARE_CHUNK = 8  # shared-index copies removed per native call in the forward's shadow

    def _remove_shared(self, ids: np.ndarray) -> None:
        """The shared-index copies past ``shared_max_tokens``, removed during the forward a
        few at a time; if a feedback waits, the rest is left for its extend job (which
        removes them natively before its appends: the drafts are the same either way)."""
        step = self.UNSHARE_CHUNK
        for i in range(0, len(ids), step):
            if i and self._yield_updates.is_set():
                self.drafter.defer_unshare(ids[i:].tolist())
                return
            self.drafter.remove_shared(ids[i:i + step])

    def _evict_chunk(self) -> None:
        """One forward's share of the out-of-window history's removal: rollouts, oldest step
        first, until ``EVICT_CHUNK_TOKENS`` tokens left. A fixed amount, not a time budget:
        what a plan's drafts read must depend only on the order of events, never on timing
        (TP ranks each run their own and must draft the same trees; a time-bounded chunk
        left the index in a state that depended on the machine's speed at that moment,
        and a tree's recency order with it)."""
        drafter = self.drafter
        target = drafter.history_tokens - self.EVICT_CHUNK_TOKENS

        def stop() -> bool:  # asked between rollouts
            return drafter.history_tokens <= target

        if drafter.evict_pending(self.EVICT_CHUNK_TOKENS, stop):
            self._evicting = False
            self._trim_due = True  # a step's history went: hand its pages back once idle

    def _trim_when_idle(self) -> None:
        """Hand freed heap pages back to the OS (``malloc_trim``) while no request decodes.

        The trim walks the whole heap holding the allocator's locks: every other thread's
        malloc waits for it (~20 ms at 0.5 GB, 100 ms and more at RL scale), so run beside
        decoding it stalls a step's drafts, layout and tensors. It runs now when no request
        is live (an RL loop's weight update comes between rollout phases), else when the
        last live request leaves. The index's large arrays are mapped straight from the OS
        and unmapped when freed (``MappedAlloc``); the trim returns the small blocks (token
        storage, Python and numpy) that evicted history freed. Under traffic that never
        drains, freed blocks are reused by new history instead: RSS stays flat, only higher
        (docs/design.md "Memory")."""
        if self.live:
            self._trim_due = True
            return
        self._trim_due = False
        if self._updates is not None:
            _trim_heap_later()  # off the scheduler thread: a request may arrive meanwhile
        else:
            _trim_heap()

    def drain(self) -> None:
        """Apply pending updates and finish pending evictions now (tests, benchmarks,
        shutdown); serving spreads the evictions over the step's forwards instead. The
        verify outcomes not yet recorded are recorded now."""
        self._settle_finishes()
        self._settle_outcomes(record_pending=True)
        self.sync()
        if self._evicting:
            self.drafter.evict_pending(None)
            self._evicting = False
            self._trim_due = False
            _trim_heap()

    # The plan after a boundary mid-batch (its deferred advance has run) finds the stale
    # problems and leaves forgetting them to the recording of the verify outcomes, in the
    # forward's shadow and in order after the finished lengths pending before it (each
    # policy call as inline, one step later). Forgotten inline, the finished lengths were
    # recorded on this thread first and the policy's inputs changed, so that plan dropped
    # the plan made ahead and made its own: _after_advance 0.3-1.6 ms and the plan ~0.5-0.8
    # at 512 rows vs ~50 us and the plan made ahead (bench_host_path, 400 steps: the steps
    # right after boundaries ~1.6-2.0 ms median vs ~2.5-2.9). Those problems have no live
    # request: the plan never reads them. False: inline (the reference; both forget the
    # same problems, tests/sglang/test_plan_ahead.py).
    DEFER_FORGET = True

    def _forget_stale(self, defer: bool = False) -> None:
        """Bounded memory: statistics of problems with neither history nor live requests.
        ``defer``: found now, forgotten with the next recording of the verify outcomes."""
        tracker = getattr(self.policy, "acceptance", None)
        forget = getattr(self.policy, "forget_problems", None)
        if tracker is None or forget is None:
            return
        if defer:
            self._settle_outcomes()  # (the tracker is read here: no recording runs)
        else:
            self._record_finishes()
        # (set differences in C, not a union of every window step's problems and a Python
        # pass over every tracked one: ~0.3 ms of the plan after a boundary at 2,048 problems)
        ids = getattr(tracker, "problem_id_set", None)
        stale = self.drafter.without_history(ids() if ids is not None else set(tracker.problem_ids()))
        if stale:
            stale.difference_update(lv.problem_id for lv in self.live.values())
        if not stale:
            return
        if defer:
            self._outcomes.append(_Forget(frozenset(stale)))
        else:
            self._forget_now(stale)

    def _forget_now(self, stale) -> None:
        tracker = self.policy.acceptance
        self.policy.forget_problems([p for p in tracker.problem_ids() if p in stale])  # (in the tracker's order)

    def _enforce_cap(self) -> None:
        gone = self.drafter.enforce_cap()
        if gone:
            self._record_finishes()
            live = {lv.problem_id for lv in self.live.values()}
            gone = [p for p in gone if p not in live]
            forget = getattr(self.policy, "forget_problems", None)
            if forget is not None and gone:
                forget(gone)
            if self._mirror is not None:
                for p in gone:
                    self._mirror.pop(p, None)

    def _rows(self, req_ids: Sequence[str], kept: tuple | None = None) -> tuple:
        """(records, problem ids, max_new_tokens, prompt lengths, count slots, each request
        once) of these live requests, in row order; an unknown one raises naming it. The
        plan and the feedback of a decode step (and the next steps while no request starts
        or ends) ask for the same batch: rows resolved for an equal ``req_ids`` list are
        reused, not looked up per row again."""
        memo = self._rows_memo
        if memo is not None and memo[1] == self._live_version and memo[0] == req_ids:
            return memo[2:]
        if memo is not None and len(memo[0]) and type(req_ids) is list and len(req_ids) >= self.ROWMAP_MIN_ROWS:
            return self._rows_from(memo, req_ids, kept)
        live = self.live
        try:
            lives = [live[r] for r in req_ids]
        except KeyError:
            bad = next(r for r in req_ids if r not in live)
            raise ValueError(f"unknown req_id={bad!r}: not started or already finished") from None
        n = len(lives)
        slots = np.fromiter((lv.slot for lv in lives), np.int64, n)
        counts = self._counts
        rows = (lives, [lv.problem_id for lv in lives], counts.max_new[slots], counts.prompt_len[slots],
                slots, len(set(req_ids)) == n)
        if type(req_ids) is list:
            self._rows_memo = (list(req_ids), self._live_version, *rows)
            self._rows_dead = set()
        return rows

    # Rows resolved through the latest memo (_rows_from) from this many rows on.
    ROWMAP_MIN_ROWS = ROWMAP_MIN_ROWS

    def _rows_from(self, memo: tuple, req_ids: list, kept: tuple | None = None) -> tuple:
        """:meth:`_rows` when requests started or ended since the memo: the rows it
        resolved are gathered from it (``row_map``, one C pass), only the others (new
        requests, and those that ended since -- ``_rows_dead``: an id may come back as
        another request) are looked up. The same records, columns and slots."""
        m_ids, _, m_lives, m_pids, _, _, m_slots, _ = memo
        back = kept_back(kept, m_ids, req_ids) if kept is not None else None
        self._kept_hit = back is not None
        if back is not None:  # (the caller's map of its batches: see plan's kept)
            unique = kept[2]
            seed_row_map(m_ids, req_ids, back, unique)  # (the policy's parts ask for it next)
        else:
            back, unique = kept_rows(m_ids, req_ids, self._rows_dead)
        lives = gather_list(m_lives, back, None)
        pids = gather_list(m_pids, back, None)
        slots = m_slots[np.maximum(back, 0)]
        live = self.live
        for i in (back < 0).nonzero()[0].tolist():
            lv = live.get(req_ids[i])
            if lv is None:
                raise ValueError(f"unknown req_id={req_ids[i]!r}: not started or already finished")
            lives[i], pids[i], slots[i] = lv, lv.problem_id, lv.slot
        # (a kept row is the same request, so the same problem: the policy's per-problem
        # reads of these ids gather through this map too)
        seed_gather_map(m_pids, pids, back)
        counts = self._counts
        rows = (lives, pids, counts.max_new[slots], counts.prompt_len[slots], slots, unique)
        self._rows_memo = (list(req_ids), self._live_version, *rows)
        self._rows_dead = set()
        return rows

    def plan(self, req_ids: Sequence[str], max_nodes: int, kept: tuple | None = None) -> tuple[DraftBatch, int]:
        """Draft trees truncated to the policy's budgets (a flat :class:`DraftBatch`, a
        sequence of DraftTree), and the batch width.

        One native call drafts every row (flat arrays, node depths included), the policy
        reads the rows as columns (:class:`BudgetRows`), and the truncation is one numpy
        pass: no Python object per row on this per-step path. Same trees and width as
        drafting row by row (tests/sglang/test_session_flat.py).

        ``kept``: ``(previous req_ids, back, unique)`` when the caller knows each row's row
        in its previous batch (-1: a new request) as the same live request -- the worker
        maps SGLang's batch lists by object identity (``batch_rows.BatchRows.kept``). Where
        the previous batch is the rows the session (and the drafter) resolved last, their
        per-row state is gathered through it instead of a map of the ids: the same rows
        (tests/sglang/test_batch_rows.py), without reading 512 request ids after a start or
        a finish."""
        self._settle_finishes()
        req_ids = list(req_ids)
        self._kept_hit = False
        lives, problem_ids, max_new, prompt_len, slots, _ = self._rows(req_ids, kept)
        # (the drafter's rows are the session's: it takes the map where the session did;
        # a drafter is asked for it only then)
        drafter_kw = {"kept": kept} if self._kept_hit else {}
        self._settle_outcomes()  # (the policy is read from here on)
        n = len(lives)
        # (the memo's columns are shared by plans of the same rows: no policy changes them;
        # the generated counts are a fresh gather)
        columns = (req_ids, problem_ids, self._counts.gen[slots], max_new, prompt_len)
        ahead, self._ahead_pending = self._ahead_pending, False
        if ahead and self._updates is not None:
            self._updates.flush()  # (the feedback's job planned ahead: prepare reads its results)
        prepare = getattr(self.policy, "prepare", None)
        if prepare is not None and self.PREPARE_AHEAD and n:
            # The policy's Python that does not read the drafts runs now, while the update
            # thread's native job may still be drafting them (the same plan either way).
            prepare(BudgetRows(*columns, self._no_drafts(n)))
        sizes = self._draft_sizes(req_ids, max_nodes)  # (also before the wait)
        new = self._deferred_ids
        if self._deferred and n < self.DEFER_START_MIN_ROWS:
            self._release_deferred()  # (the deferred finishes too)
            new = ()
        if self._updates is not None:
            self._updates.flush()  # (the deferred starts stay out: see DEFER_START_MIN_ROWS)
        if self._advance_due:
            self._after_advance(deferred=True)  # (a deferred step advance has run meanwhile)
        else:
            self._check_cap()
        self._plan_nodes = max_nodes
        if new and not new.isdisjoint(req_ids):
            drafts = self._speculate_registered(req_ids, sizes, new, **drafter_kw)
        else:
            drafts = self.drafter.speculate_flat(req_ids, sizes, **drafter_kw)
        if ahead:  # (the job's own trees, every one reused: the plan it made ahead is of them)
            if drafts is self.drafter.predrafted_trees():
                self.policy.ahead_drafts(drafts)
            else:  # (rows changed since: its trees gathered by row, new rows empty -- or None)
                rows_at = self.drafter.predrafted_rows(drafts)
                self.policy.ahead_drafts(None if rows_at is None else (drafts, rows_at))
        # (a gather not made yet: the nodes it takes them from; the pre-draft job's trees
        # were checked by the job)
        if not drafts.probs_in_range():
            raise ValueError("drafter returned node probabilities outside [0, 1]")
        plan = self.policy.plan(BudgetRows(*columns, drafts))
        if ahead and self.policy.ahead_used:
            self.counters["plans_ahead"] += 1
            self.counters["plans_ahead_kept"] += bool(getattr(self.policy, "ahead_kept", False))
        cut = None
        if ahead and self.policy.ahead_used and not self._root_only:
            # (the job's plan of its own trees: it also cut them to the plan's budgets,
            # capped at max_nodes -- the truncate below, made off this thread)
            cut = self.policy.take_ahead_cut(max_nodes)
        if cut is not None:
            drafts = cut
        else:
            keep = np.minimum(np.asarray(plan.budgets, dtype=np.int64), max_nodes)
            if self._root_only:
                for i in [i for i, r in enumerate(req_ids) if r in self._root_only]:
                    keep[i] = 0  # constrained requests are verified at the root only
            drafts = drafts.truncate(keep)
        if self._evicting and self._updates is not None:
            # The index is not read again until the next plan or update: remove a chunk of
            # out-of-window history meanwhile (native removals, during the forward).
            # Submitted after the policy's Python (the chunk's bookkeeping takes the GIL);
            # with the worker's before_forward hook, only once the verify inputs are built:
            # run beside them, the chunk (removals that free and unmap memory, plus its
            # bookkeeping under the GIL) slowed the layout and mask on this thread by up
            # to ~3 ms a step (measured; bench_host_path).
            if self._forward_hook:
                self._evict_due = True
            else:
                self._updates.submit(self._evict_chunk)
        if not self._forward_hook:
            self._release_deferred()  # (with the hook: at before_forward, in the forward's shadow)
        return drafts, self._width(drafts, int(getattr(plan, "width", 0) or 0), max_nodes)

    def _width(self, drafts: DraftBatch, planned: int, max_nodes: int) -> int:
        """The verify width of a plan's trees (``planned``: the plan's own width)."""
        width = drafts.width
        buckets = self.options.policy.buckets(max_nodes)
        if buckets is not None and width not in buckets:
            # Policies that do not price buckets themselves: pad up to the next bucket
            # (rows keep their trees; the padding is never linked, so never accepted).
            width = next(b for b in buckets if b >= width)
        cost = getattr(self.policy, "cost", None)
        if width < planned <= max_nodes and cost is not None and cost.is_graph_width(planned):
            # The policy chose a CUDA-graph width (cheaper, padding included, than an eager
            # forward at the trees' own width): verify at it even where the trees are shorter.
            width = planned
        return width

    # -------------------------------------------------------- launch first, plan after
    # Where the verify forward is launched asynchronously (the worker's forward hook after
    # the launch, a CUDA device), a step whose plan would be the one the feedback's job made
    # ahead verifies the job's trees at once (launch_plan) and the plan itself runs in the
    # forward's shadow (settle_launch), before the step's background work: on the path to
    # the launch only the job's wait and a read of its trees. False: every plan before its
    # launch (the reference).
    LAUNCH_FIRST = True

    def launch_plan(self, req_ids: list, max_nodes: int, kept: tuple | None = None
                    ) -> tuple[DraftBatch, int] | None:
        """The trees and width :meth:`plan` of these rows would give, where that plan would
        take the plan the latest feedback's job made ahead (its budgets, its trees cut to
        them, a new row none) -- read without running it and without changing what it reads
        --, else None (then :meth:`plan` runs as before). The caller verifies them and then,
        in the forward's shadow, has the plan made by :meth:`settle_launch` (the new requests
        registered first, as before a plan): every bookkeeping part is the plan's own, and it
        checks that its trees are these. Verification is exact whatever the trees, so a plan
        that would have drafted otherwise (not expected: counted as ``launch_mismatch``)
        costs only acceptance. ``kept``: ``(previous req_ids, back, unique)`` where the rows
        changed since the feedback (``back``: each row's row there, -1 a new request not
        registered yet), None where they are the feedback's rows."""
        if not (self.LAUNCH_FIRST and self._ahead_pending) or self._updates is None:
            return None
        n = len(req_ids)
        # (what the plan does first otherwise: starts drafted at once, the history cap
        # applied -- checked below --, constrained rows verified at the root only; a step
        # advance's bookkeeping (_after_advance) changes no draft and no input of the plan
        # where stale problems are forgotten with the next recording (DEFER_FORGET), so the
        # step right after a boundary launches first too since stop 58)
        if (n < self.DEFER_START_MIN_ROWS or self._root_only or (self._advance_due and not self.DEFER_FORGET)
                or self.shards is not None):
            return None
        launch = getattr(self.policy, "launch_trees", None)
        if launch is None:
            return None
        generated = at = None
        if kept is None:
            memo = self._rows_memo
            if memo is None or memo[1] != self._live_version or not (memo[0] is req_ids or memo[0] == req_ids):
                return None
            generated = self._counts.gen[memo[6]]
        else:
            prev, at, unique = kept
            if not unique:
                return None
        self._updates.flush()  # (the job's trees and plan)
        cap = self.drafter.config.max_history_tokens
        if (cap and self.drafter.history_tokens > cap) or not self.drafter.predraft_current():
            return None
        got = launch(req_ids, at, max_nodes, generated, None if kept is None else prev)
        if got is None:
            return None
        drafts, planned = got
        return drafts, self._width(drafts, planned, max_nodes)

    def settle_launch(self, launched: tuple, req_ids: list, max_nodes: int,
                      kept: tuple | None = None) -> tuple[DraftBatch, int]:
        """:meth:`plan` of the rows whose trees were verified from :meth:`launch_plan`
        (``launched``: what it returned), made in the verify forward's shadow; counts the
        step (``launched_first``) and, where its trees or width are not the verified ones,
        ``launch_mismatch`` (logged once). Returns the plan's."""
        drafts, width = self.plan(req_ids, max_nodes, kept=kept)
        self.counters["launched_first"] += 1
        ran, ran_width = launched
        if width != ran_width or not drafts.same_trees(ran):
            self.counters["launch_mismatch"] += 1
            if self.counters["launch_mismatch"] == 1:
                _log.warning("DAS: a step verified the trees of the plan made ahead where its plan "
                             "drafted others (exact all the same; counted as launch_mismatch)")
        return drafts, width

    def _no_drafts(self, n: int) -> DraftBatch:
        """``DraftBatch.empty(n)`` for the policy's ``prepare`` (which never reads the
        drafts), kept while the row count stays (read-only): six fresh arrays a plan cost
        ~15 us at 512 rows."""
        kept = self._empty_drafts
        if kept is None or len(kept) != n:
            kept = DraftBatch.empty(n)
            for a in (kept.tokens, kept.parents, kept.probs, kept.depths, kept.offsets, kept.match_len):
                a.flags.writeable = False
            self._empty_drafts = kept
        return kept

    def _speculate_registered(self, req_ids: list, sizes, new: set, **drafter_kw) -> DraftBatch:
        """The plan's trees when some rows' starts are still deferred: those rows get an
        empty tree, the others are drafted as usual."""
        # (the drafter resolves the whole list, the new rows as placeholders: the feedback
        # after this plan then looks up only those rows, once they are registered)
        return self.drafter.speculate_flat(req_ids, sizes, skip=new, **drafter_kw)

    def before_forward(self) -> None:
        """The worker is about to run the verify forward (its inputs are built): background
        work that would compete with building them starts now, in the forward's shadow --
        the step's chunk of out-of-window history removal, and the removal of the finished
        rollouts that left the shared index's token cap (``shared_max_tokens``: at RL scale
        a few per step, ~1 ms each). Callers that never call it get the chunk submitted by
        :meth:`plan` itself and the removal done by the next feedback's extend. Nothing
        drafts between here and the feedback, so every draft sees what it saw before."""
        self._settle_finishes()
        self._forward_hook = True
        if self._boundary_save:
            # A boundary's save (DEFER_BOUNDARY_SAVE): its view and lengths as at the
            # boundary, before this forward's recording job starts; held, as a boundary's
            # save made there is, until the next forward.
            self._boundary_save = False
            self.snapshot.save(True)
            self._snapshot_skip = True
        lengths = getattr(self.policy, "lengths", None)
        if getattr(lengths, "background", False) and hasattr(lengths, "rebuild_if_stale"):
            # The length index's background rebuild (~4 ms of numpy and Python at 2,048 x
            # 16 lengths) starts here, in the forward's shadow; started by a query it ran
            # beside the next plan, and the GIL it took made the plan's calls wait (policy
            # prepare up to 38 ms at 512 rows, bench_host_path). It copies the lengths now,
            # while no recording runs (after a plan none does), before the one below starts
            # adding finished lengths on its own thread.
            self._settle_outcomes()
            lengths.rebuild_on_query = False
            lengths.rebuild_if_stale()
        # What the update thread does during this forward, in order, as one queue item: a
        # put may wake the thread it hands work to, 5-50 us on the scheduler thread here
        # (before, one put each: a step's registrations, its eviction chunk, removals).
        work: list = []
        plan_pending = getattr(self.policy, "plan_pending", None)
        if ((self._outcomes or (plan_pending is not None and plan_pending()))
                and self._updates is not None and self._outcomes_job is None):
            # First in the queue: the step's other background work (eviction chunk, shared
            # removals) may take the whole forward; this plan's bookkeeping and the previous
            # feedback's recording take ~1.5 ms at 512 rows. (On a thread of its own, so a
            # busy update thread never holds it up.)
            outcomes, self._outcomes = self._outcomes, []
            self._outcomes_job = (self._policy_updates or self._updates).submit(
                self._record_then_look_ahead, outcomes, gil_pause)
        if self._updates is not None:
            work.extend(self._take_deferred())  # the plan's new requests: registered now
        else:
            self._release_deferred()
        if self.snapshot is not None:
            if self._snapshot_skip:
                self._snapshot_skip = False  # (a boundary's save: from the next forward on)
            else:
                self.snapshot.release()  # a held save: encoded during the forward (_hold_snapshot)
        if self._evict_due:
            self._evict_due = False
            if self._evicting and self._updates is not None:
                work.append((self._evict_chunk, ()))
        if self._updates is not None:
            take = getattr(self.drafter, "take_unshare", None)
            ids = take() if take is not None else None
            if ids is not None:
                work.append((self._remove_shared, (ids,)))
            if work:
                self._updates.submit_each(work)

    def _draft_sizes(self, req_ids: Sequence[str], max_nodes: int):
        """Nodes to draft per row: the policy's ``draft_sizes`` (small trees for rows with
        small budgets), else ``max_nodes`` for every row. The pre-draft job asks the same
        at the feedback, so its trees are reused by the next plan."""
        sizes = getattr(self.policy, "draft_sizes", None)
        return max_nodes if sizes is None else sizes(req_ids, max_nodes)

    def committed(self, req_id: str, proposed: int, tokens: Sequence[int]) -> None:
        """After verify: ``tokens`` = accepted drafts + the bonus token."""
        live = self.live[req_id]
        p, a = np.array([proposed], np.int64), np.array([len(tokens) - 1], np.int64)
        _check_outcomes(p, a, [req_id])  # (before anything changes)
        self._settle_outcomes(record_pending=True)
        self.sync()
        self.drafter.extend_request(req_id, np.asarray(tokens, dtype=np.int32))
        live.generated += len(tokens)
        if p[0] or a[0]:
            self._outcomes.append(([live.problem_id], p, a, None))

    def committed_batch(self, req_ids: Sequence[str], proposed: Sequence[int],
                        tokens: Sequence[Sequence[int]], finishing: np.ndarray | None = None) -> None:
        """:meth:`committed` for a whole decode batch. The drafter's extend (one native
        call for the batch) runs on the background thread without the GIL; the next
        :meth:`plan` waits for it. ``tokens``: one sequence of ids per row, or a
        :class:`~das_sglang.core.drafter.TokenRows` (flat, validated once: what the worker
        passes). ``finishing``: per row (bool), whether its request finishes with this
        step, where the caller can tell (the worker's stop cut): the plan the feedback's job
        makes ahead leaves those rows' outcomes out of its calibration update, as the next
        plan -- without those requests -- does."""
        self._settle_finishes()
        live = self.live
        self._settle_outcomes(record_pending=True)  # (the previous step's, if not yet)
        self._release_deferred()  # (a row's registration precedes its extend)
        flat = None
        memo = self._rows_memo
        known = memo is not None and memo[1] == self._live_version and memo[0] == req_ids
        background = (self._updates is not None and len(req_ids) >= self.ASYNC_MIN_ROWS
                      and (known or all(r in live for r in req_ids))
                      and (flat := _flat_tokens(tokens)) is not None)
        if background:  # inputs checked here: a bad row raises now, naming itself, below
            # The queue keeps the order; an earlier update's error is raised now, without
            # waiting for the ones still running (the next plan waits for them). The
            # arguments are prepared here, so the update thread only runs native code
            # (without the GIL: it never holds up the scheduler thread's Python).
            self._updates.raise_error()
            if self._updates.busy():
                # The forward's background work (eviction chunk, shared-index removals) ran
                # past the forward. Queued behind it, this step's extend job would start as a
                # Python item, first waiting for the GIL that SGLang's result processing holds
                # (5 ms switch intervals: the job took 18 ms p50 that way vs ~6 started
                # natively, and up to 60). So that work stops at its next rollout (the rest
                # stays for the next forward) and the job starts natively once it has.
                self._yield_updates.set()
                try:
                    self._updates.flush()
                finally:
                    self._yield_updates.clear()
            prepared = self.drafter.prepare_extend(req_ids, tokens, flat)
            if self._plan_nodes is not None and hasattr(self.drafter, "predraft"):
                sizes = self._draft_sizes(req_ids, self._plan_nodes)
                # With the extend, the next plan's trees: drafted while the engine processes
                # this step's results (exact: rows whose index changes meanwhile, by a finish
                # or a start, are drafted again by the plan). With nothing queued before it,
                # the work starts now on a native thread: queued, it would wait for the GIL
                # until this thread blocks. The job also makes the policy's next plan of these
                # rows on those trees (plan_ahead), used if the rows are the same then.
                done = None
                if not self._updates.busy():
                    ahead = self._plan_ahead(req_ids, tokens, finishing)
                    done = self.drafter.start_extend(prepared, sizes, ahead=ahead)
                    if ahead is not None:
                        if done is None:
                            self.policy.drop_ahead()
                        else:
                            self._ahead_pending = True
                if done is not None:
                    self._updates.set_native(done)
                else:
                    self._updates.submit(self.drafter.apply_extend, prepared, sizes)
            else:
                self._updates.submit(self.drafter.apply_extend, prepared)
        else:  # small batches (the hand-off costs more than the extend), or a bad row
            self.sync()
            if self._plan_nodes is not None and hasattr(self.drafter, "predraft"):
                # the same pre-draft as the background path, inline: the next plan's trees
                # do not depend on which path ran (the shared index's part of a reused tree
                # is as of this point in both, see SuffixDrafter.predraft)
                self.drafter.apply_extend(self.drafter.prepare_extend(req_ids, tokens, flat),
                                          self._draft_sizes(req_ids, self._plan_nodes))
            else:
                self.drafter.extend_batch(req_ids, tokens)
        _, problem_ids, _, _, slots, unique = self._rows(req_ids)
        if type(tokens) is TokenRows:
            n = tokens.lens()
        else:
            n = np.fromiter((len(t) for t in tokens), np.int64, len(tokens))
        if unique:
            self._counts.gen[slots] += n
        else:  # (a request twice in the rows: each row's tokens count)
            np.add.at(self._counts.gen, slots, n)
        p = np.asarray(proposed, dtype=np.int64).reshape(-1)
        # The rows with an outcome (nothing drafted and only the bonus token: none), their
        # counts and the first invalid one, in one native pass (numpy's ~10 operations
        # before stop 58). Kept for the policy's statistics and recorded one step late,
        # during the next verify forward (before_forward hands them to the update thread;
        # without that hook, or without the thread, the next feedback records them first):
        # the plan after a feedback reads the statistics of the steps before it, whichever
        # path runs -- the same plans, never timing-dependent -- and the recording (~1 ms of
        # per-row Python at 512 rows) leaves the path from a verify result to the next
        # forward. The statistics average hundreds of outcomes per problem; one step of lag
        # changes a budget by the weight of one. A bad outcome raises now, naming its
        # request (the rows' problem ids are picked when recorded: off this path).
        rows, p_rows, a_rows, bad = outcome_rows(p, np.ascontiguousarray(n, dtype=np.int64))
        if rows.size:
            if bad >= 0:
                _check_outcomes(p_rows, a_rows, req_ids, rows)  # (raises naming the request)
            self._outcomes.append((problem_ids, p_rows, a_rows, rows))

    # The feedback's job also makes the policy's next plan of its rows (plan_ahead).
    PLAN_AHEAD = True
    # ... and cuts its trees to that plan's budgets (the plan's truncate, off this thread:
    # policy.take_ahead_cut); False: the plan truncates them (the same trees).
    JOB_CUTS = True

    def _plan_ahead(self, req_ids, tokens, finishing=None):
        """The policy's ``plan_ahead`` of a feedback's rows, their generated counts after it
        (a ``native.PlanAhead`` for the feedback's job), or None. ``finishing``: the rows
        whose requests finish with this step (bool per row; a bad one is the plan made
        ahead's failure: logged naming it, counted, the feature off -- the step goes on)."""
        make = getattr(self.policy, "plan_ahead", None)
        if not self.PLAN_AHEAD or make is None or type(tokens) is not TokenRows:
            return None
        _, _, _, _, slots, unique = self._rows(req_ids)
        if not unique:
            return None
        try:
            if finishing is not None and not (isinstance(finishing, np.ndarray) and finishing.dtype == bool
                                              and finishing.shape == (len(req_ids),)):
                raise ValueError(f"invalid finishing={finishing!r}: expected a bool numpy array of one entry "
                                 f"per row ({len(req_ids)})")
            return make(req_ids, self._counts.gen[slots] + tokens.lens(), self._updates._finish_native_keeping_errors,
                        finishing, cut=self._plan_nodes if self.JOB_CUTS and self._plan_nodes is not None else -1)
        except Exception:  # noqa: BLE001 (an optimisation: the plans go on without it)
            self._plan_ahead_failed("plan_ahead")
            return None

    def _plan_ahead_failed(self, where: str) -> None:
        """The plan made ahead raised (never expected: its inputs are the policy's own):
        logged and counted, and switched off for this session; every plan is then made
        the usual way, so no request is affected."""
        self.counters["plan_ahead_errors"] += 1
        self.PLAN_AHEAD = False
        drop = getattr(self.policy, "drop_ahead", None)
        if drop is not None:
            drop()
        _log.exception("DAS: the plan made ahead failed in %s; plans are made without it from now on", where)

    def _record_then_look_ahead(self, outcomes: list, pause=None) -> None:
        """The forward's recording job (:meth:`_record_outcomes`), then the policy's
        ``prepare_ahead`` of the latest plan's rows (its next plan's inputs that the
        verify outcomes do not change, for the feedback's job): both in the forward's
        shadow."""
        self._record_outcomes(outcomes, pause)
        ahead = getattr(self.policy, "prepare_ahead", None)
        if ahead is not None and self.PLAN_AHEAD:
            try:
                ahead()
            except Exception:  # noqa: BLE001 (an optimisation: the plans go on without it)
                self._plan_ahead_failed("prepare_ahead")

    def _record_outcomes(self, outcomes: list, pause=None) -> None:
        """Record pending verify outcomes, finished lengths and step advances, in order.
        ``pause`` (on a background thread): called between the items, so the scheduler
        thread waiting for the GIL (the feedback after the forward) gets it within one
        item, not at the interpreter's forced switch (5 ms): at a step boundary the job
        held it ~2-10 ms in one go (the plan's bookkeeping, the outcomes, the length
        window's step)."""
        settle = getattr(self.policy, "settle_plan", None)
        if settle is not None:
            settle()  # the latest plan's bookkeeping first (policy.settle_plan: its order)
        many = getattr(self.policy, "observe_verify_many", None)
        lengths_many = getattr(self.policy, "observe_finished_many", None)
        at, n_items = 0, len(outcomes)
        while at < n_items:
            item = outcomes[at]
            if type(item) is _Finished:
                # a run of finished lengths in one call (a boundary's wave of finishes is
                # recorded on the scheduler thread: ~10 us a length one by one)
                j = at + 1
                while j < n_items and type(outcomes[j]) is _Finished:
                    j += 1
                if lengths_many is not None and j - at > 1:
                    run = outcomes[at:j]
                    lengths_many([f.problem_id for f in run], [f.length for f in run])
                else:
                    for f in outcomes[at:j]:
                        self.policy.observe_finished(f.problem_id, f.length)
                at = j
                continue
            at += 1
            if pause is not None:
                pause()
            if type(item) is _Advanced:
                self.policy.advance_step(item.step)
                continue
            if type(item) is _Forget:
                self._forget_now(item.problem_ids)
                continue
            pids, p, a, rows = item
            if rows is not None:
                pids = [pids[i] for i in rows.tolist()]
            if many is not None:
                many(pids, p, a)
            else:
                observe = self.policy.observe_verify
                for pid, pi, ai in zip(pids, p.tolist(), a.tolist()):
                    observe(pid, pi, ai)

    def _record_finishes(self, advances: bool = False) -> None:
        """Record the pending finished lengths now, in order (the verify outcomes stay
        pending): before the policy's step advances (a length belongs to the step it
        finished in), a snapshot's meta reads the lengths, or problems are forgotten (a
        later record would bring one back), and when the batch drained (no forward or
        feedback comes to record them). A pending step advance (``_Advanced``) queued
        before one of them is recorded first, in order (the length is filed under the step
        it finished in); one after the last stays pending -- what reads the lengths here
        does not need it (a snapshot's lengths are restored up to the session's step, and
        forgetting a problem's lengths and a window's drop give the same lengths in either
        order) -- unless ``advances`` (the batch drained: every pending advance too)."""
        self._settle_outcomes()
        pending = self._outcomes
        kinds = _LENGTH_EVENTS if advances else (_Finished,)
        last = max((i for i, o in enumerate(pending) if type(o) in kinds), default=-1)
        if last < 0:
            return
        now = [o for o in pending[: last + 1] if type(o) in _LENGTH_EVENTS]
        self._outcomes = [o for i, o in enumerate(pending)
                          if i > last or type(o) not in _LENGTH_EVENTS]
        self._record_outcomes(now)

    def _settle_outcomes(self, record_pending: bool = False) -> None:
        """Wait for a recording running on the update thread (before the policy is read or
        changed on this thread); ``record_pending`` also records, inline, the outcomes no
        forward took yet (a feedback, ``drain``, ``close``)."""
        self._settle_finishes()
        done = self._outcomes_job
        if done is not None:
            done.wait()
            self._outcomes_job = None
            if self._policy_updates is not None:
                self._policy_updates.raise_error()  # (the update thread's flush raises its own)
        if record_pending and self._outcomes:
            outcomes, self._outcomes = self._outcomes, []
            self._record_outcomes(outcomes)

    def finished(self, req_id: str, prompt: Sequence[int], output: Sequence[int]) -> None:
        """A request finished: its returned text becomes history of its problem.

        The drafter's copy may run past what was returned (tokens accepted after a stop
        token or beyond max_new_tokens): then it is replaced by the returned text; else it
        is kept (``SuffixDrafter.finish_as``).
        """
        live = self.live.pop(req_id, None)
        if live is None:
            return
        self._counts.give(live.slot)
        self._live_version += 1
        if self._rows_memo is not None:
            self._rows_dead.add(req_id)  # (its memo row, if any, is stale now: see _rows_from)
        self._root_only.discard(req_id)
        if not isinstance(output, (list, tuple, np.ndarray, array)):
            output = list(output)  # (any iterable; held until the work below runs)
        if self.DEFER_FINISH_WORK and self.live and self.shards is None:
            self._finish_work.append((req_id, live, prompt, output))
            return
        self._settle_finishes()
        self._finish_one(req_id, live, prompt, output)

    # A finish's work beyond taking the request out of the live rows -- its text checked
    # and made history, the history mirror, the length the policy learns, the snapshot's
    # count -- waits for the session's next call (a start, a plan, the forward hook, a
    # feedback, a step advance, a snapshot's view ...: _settle_finishes), in finish order,
    # before anything that call does: what every call sees is what it saw when the work ran
    # in ``finished``. SGLang reports finishes while processing a step's results; the next
    # call is the next step's plan, or with launch first (launch_plan) the plan after the
    # verify's launch, in the forward's shadow (~20 us a finish at 512 rows, bench_host_path).
    # Not with scale-out shards (their hand-off runs in the finish) or when the batch drained.
    DEFER_FINISH_WORK = True

    def _settle_finishes(self) -> None:
        """The finishes' work left by :meth:`finished`, in order (see DEFER_FINISH_WORK)."""
        work = self._finish_work
        if work:
            self._finish_work = []
            for item in work:
                self._finish_one(*item)

    def _finish_one(self, req_id: str, live, prompt, output) -> None:
        """:meth:`_finished_work`; a finish whose text is bad (a token id out of range) is
        logged, counted (``finish_errors``) and not made history -- that request only: the
        other finishes, and the call that runs them, go on."""
        try:
            self._finished_work(req_id, live, prompt, output)
        except ValueError as e:
            self.counters["finish_errors"] += 1
            _warn_bad_finish("DAS: finished request %s not kept as history: %s", req_id, e)

    def _finished_work(self, req_id: str, live, prompt: Sequence[int], output) -> None:
        """:meth:`finished`'s work once the request left the live rows."""
        defer = self.DEFER_FINISHES and self._updates is not None and self.shards is None
        if not defer:
            self._release_deferred()  # (its own start, if still deferred, comes first)
        # (``finished`` made any other iterable a list; SGLang's array("q") and lists are
        # sliced as they are)
        output = output[: live.max_new_tokens]
        what = f"text of req_id={req_id!r}"
        head = live.prompt
        # The very tuple the start was given (immutable: the same tokens; the worker passes
        # it again) needs no compare: a compare reads every token's int object, cold by
        # the time a request ends (~15 us a 300-token prompt at batch 512, bench_host_path).
        if head is not None and ((prompt is live.given and prompt is not None)
                                 or (len(prompt) == len(head) and _same_tokens(head, prompt))):
            # the prompt validated at the start: only the output is converted and checked
            tokens = np.concatenate([head, as_tokens(output, what)]) if len(output) else head
        else:
            tokens = as_tokens(list(prompt) + list(output), what)
        # (the session's step: the drafter's may still be advancing, see DEFER_ADVANCE)
        stored = live.step >= self.step - self.drafter.config.window_steps
        if defer:
            # Handed to the update thread with the deferred starts, in event order: by the
            # next plan when it has few rows, else once its verify inputs are built (see
            # DEFER_FINISHES).
            self._deferred.append((self._finish_in_drafter, (req_id, live.problem_id, live.step, tokens)))
            if not self.live:
                self._release_deferred()  # the batch drained: no forward comes to release it
        elif self._updates is not None:
            # The native removal + insertion (~us per token) run on the update thread, in
            # order with the extends; the next drafter read waits for them.
            self._updates.submit(self._finish_in_drafter, req_id, live.problem_id, live.step, tokens)
        else:
            self._finish_in_drafter(req_id, live.problem_id, live.step, tokens)
            self._check_cap()
        if stored and self._mirror is not None:
            # (a new dict per change, never one changed in place: a snapshot's view holds
            # the problems' dicts as they were, _history_view)
            old = self._mirror.get(live.problem_id)
            steps = dict(old) if old is not None else {}
            group = steps.get(live.step)
            steps[live.step] = group.plus(tokens) if group is not None else TokenGroup.single(tokens)
            self._mirror[live.problem_id] = steps
            if group is None:
                self._mirror_steps.setdefault(live.step, set()).add(live.problem_id)
        if self.shards is not None:
            self.shards.on_finished(live.problem_id, live.step, tokens)
        # The policy learns the length with the verify outcomes: recorded during the next
        # forward (before_forward), else by the next feedback -- one step late on every
        # path, and off this one (~16 us a finish at batch 512). What reads the lengths
        # before (a step boundary, a snapshot's meta, forgetting problems) records the
        # pending ones first (_record_finishes).
        self._outcomes.append(_Finished(live.problem_id, len(output)))
        if not self.live:
            self._record_finishes(advances=True)  # the batch drained: no forward or feedback records them
        if self._trim_due:
            self._trim_when_idle()
        if self.snapshot is not None:
            if not self.live:
                self._save_boundary_drained()
            self.snapshot.note_finished(hold=self._hold_snapshot())
            if not self.live:
                # The batch drained: nothing waits on the scheduler, so make the requested
                # save durable now (an engine stopped right after its last request -- by a
                # signal, without atexit -- then still leaves every finished rollout).
                self.snapshot.wait()
                self._snapshot_skip = False  # (a boundary's held save went with it)

    def _save_boundary_drained(self) -> None:
        """The batch drained before the forward that was to make a boundary's save
        (DEFER_BOUNDARY_SAVE): made now, not held (no forward comes to release it)."""
        if self._boundary_save:
            self._boundary_save = False
            self.snapshot.save(False)

    def _hold_snapshot(self) -> bool:
        """A snapshot requested while requests decode under the worker's forward hook is
        encoded from the next ``before_forward`` on: the writer's encoding (Python, a few
        ms at RL scale) then runs while this thread waits on the device, not beside the
        next plan's policy Python (at a step boundary it slowed the plan's outcome update
        ~155 -> ~610 us p50, up to 3 ms, in bench_host_path). The view is taken now."""
        return self._forward_hook and bool(self.live)

    def _finish_in_drafter(self, req_id, problem_id, step, tokens) -> None:
        self.drafter.finish_as(req_id, problem_id, step, tokens)

    def _check_cap(self) -> None:
        cap = self.drafter.config.max_history_tokens
        if cap and self.drafter.history_tokens > cap:
            self._enforce_cap()

    def drop(self, req_id: str) -> None:
        """A request left without finishing (aborted, retracted): forget its text."""
        self._settle_finishes()
        live = self.live.pop(req_id, None)
        self._root_only.discard(req_id)
        if live is not None:
            self._counts.give(live.slot)
            self._live_version += 1
            if self._rows_memo is not None:
                self._rows_dead.add(req_id)
            self.sync()
            self.drafter.finish_request(req_id, keep=False)
            if self.shards is not None:
                self.shards.on_drop(live.problem_id)
            if not self.live:
                self._snapshot_skip = False  # (a held save starts at the next batch's first forward)
                self._save_boundary_drained()
            if self._trim_due:
                self._trim_when_idle()

    # ------------------------------------------------------------ history
    def _open_snapshot(self, write: bool = True):
        server = self.options.server
        if server.history_path is None:
            return None
        from das_sglang.core.snapshot import PeriodicSnapshot, load_history_or_empty

        # (an unusable snapshot is renamed aside, not overwritten, by the rank that writes)
        history, meta = load_history_or_empty(server.history_path, strict=server.strict_snapshot,
                                              keep_aside=write)
        self._mirror = {}
        if history:
            # Advance first: the drafter refuses history from steps after its current one.
            self.step = max((s for steps in history.values() for s in steps), default=0)
            self.drafter.advance_step(self.step)
            self.drafter.load_history(history)
            self._mirror = {p: {s: TokenGroup.of(seqs) for s, seqs in steps.items()}
                            for p, steps in self.drafter.history().items()}
            for p, steps in self._mirror.items():
                for s in steps:
                    self._mirror_steps.setdefault(s, set()).add(p)
            _log.info("DAS: loaded history of %d problems from %s", len(history),
                      server.history_path)
            saved = (meta or {}).get("das_step_clock") or {str(self.step): self.step}
            self.clock = StepClock(
                self.options.drafter.window_steps, self.step,
                {int(k): int(v) for k, v in saved.items()},
            )
        self._restore_lengths(meta, server.strict_snapshot)  # (at the restored step)
        if not write:
            self._mirror = None  # nothing to write: no copy of the history to keep
            return None
        return PeriodicSnapshot(
            server.history_path, self._history_view, every_n=server.snapshot_interval,
            get_meta=self._snapshot_meta, background=server.async_updates,
        )

    def _open_shards(self, engine_id: str | None):
        server = self.options.server
        if server.shard_path is None:
            return None
        from das_sglang.core.shards import ShardSync, default_engine_id

        engine_id = server.engine_id or engine_id or default_engine_id(0)
        return ShardSync(server.shard_path, engine_id, self.drafter,
                         self.options.drafter.window_steps, extra_stats=self._shard_stats)

    def _shard_stats(self, stats) -> None:
        """Fill the engine-wide numbers of the shard stats (called rate-limited)."""
        self.sync()  # the drafter is read here: no background update may run meanwhile
        d = self.drafter.stats()
        stats.problems_held, stats.history_tokens, stats.step = d.problems, d.tokens, self.step
        w = self.worker_stats
        if w is not None:
            stats.verify_steps = w.get("verify_steps", 0)
            stats.draft_tokens_proposed = w.get("proposed", 0)
            stats.draft_tokens_accepted = w.get("accepted", 0)

    def _history_view(self):
        """The history as immutable per-step TokenGroups, safe for the background writer to
        read afterwards: a copy of the outer dict only -- a problem's dict of groups is
        never changed once in the mirror (a finish or a window step puts a new one in its
        place), so the view shares them. (A copy of each problem's dict took 0.27-0.48 ms
        of every snapshot on the scheduler thread at 2,048 problems.)"""
        self._settle_finishes()
        return dict(self._mirror)

    def _snapshot_meta(self) -> dict:
        self._record_finishes()  # (every finished rollout in the history has its length)
        meta = {
            "das_step_clock": {str(k): v for k, v in self.clock.known().items()},
            "das_counters": dict(self.counters),
        }
        state = getattr(getattr(self.policy, "lengths", None), "state", None)
        if state is not None:  # the length predictor's finished lengths (restored at start)
            meta["das_lengths"] = state()
        return meta

    def _restore_lengths(self, meta: dict | None, strict: bool) -> None:
        """Give the length predictor the finished lengths a snapshot saved, so requests are
        classified from their problems' history from the first plan on. A bad entry is
        logged and the lengths ignored (the history still loads), or raises with
        ``strict_snapshot``."""
        state = (meta or {}).get("das_lengths")
        restore = getattr(getattr(self.policy, "lengths", None), "restore", None)
        if state is None or restore is None:
            return
        try:
            n = restore(state, self.step)
        except ValueError as e:
            if strict:
                raise ValueError(f"snapshot in {self.options.server.history_path}: {e}") from None
            _log.warning("DAS: the snapshot's finished lengths were ignored: %s", e)
            return
        _log.info("DAS: restored %d finished lengths for the length predictor", n)

    def close(self) -> None:
        """Idempotent (atexit may call it after an explicit close)."""
        self._settle_outcomes(record_pending=True)
        self._release_deferred()
        if self._policy_updates is not None:
            self._policy_updates.close()
            self._policy_updates = None
        if self._updates is not None:
            self._updates.flush()
            self._updates.close()
            self._updates = None
        if self.shards is not None:
            self.shards.close()
            self.shards = None
        if self.snapshot is not None:
            self.snapshot.close()
            self.snapshot = None
