"""SuffixDrafter: drafts from earlier rollouts of the same problem (docs/design.md, "Drafter").

Per ``problem_id`` one native :class:`~das_sglang.native.SuffixIndex` holds every sequence
(prompt + response tokens) of

- finished rollouts of the last ``window_steps`` training steps (history), and
- the live and finished rollouts of the current step: GRPO siblings feed each other, and
  a request's own text drafts its own repetitions.

Scores weigh a step ``a`` steps old by ``step_decay ** a``. With ``global_shard`` every
sequence is also indexed in one shared index, consulted when a problem's own index
proposes nothing (e.g. a problem seen for the first time).

Worked example (window 1, decay 0.5)::

    d = SuffixDrafter(DrafterConfig(window_steps=1))
    d.advance_step(0)
    d.add_history("p", 0, [1, 2, 3, 4])       # a finished step-0 rollout
    d.advance_step(1)
    d.start_request("r", "p", [1, 2])          # prompt shares "1 2" with it
    d.speculate("r", budget=2).tokens           # -> [3, 4]
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import Counter
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter
from typing import Iterable, Mapping, Sequence

import numpy as np

from das_sglang.core.budget_rows import ROWMAP_MIN_ROWS, kept_back, kept_rows
from das_sglang.core.config import DrafterConfig
from das_sglang.core.draft_tree import DraftBatch, DraftTree, RowsOf
from das_sglang.native import (
    MAX_STEPS, SuffixIndex, clip_budgets, draft_batch, draft_rows, extend_batch, extend_draft_rows, extend_draft_rows_start,
    gather_list, index_versions, int32_tokens, mutation_epoch, padded_rows,
)

# The step every sequence is filed under in the shared index: one native step slot, so it
# never runs out of them (a per-problem index holds at most MAX_STEPS steps); its sequences
# weigh 1 (it is a recency-bounded cache: shared_max_tokens, oldest out first).
SHARED_STEP = -(1 << 62)

# problem_id -> step -> finished rollouts (prompt + response), as int32 arrays
History = dict[str, dict[int, list[np.ndarray]]]


_CPUS = os.cpu_count() or 1  # read once: the call costs ~50 us (per-step path)

@dataclass(slots=True, eq=False)  # (identity: a batch's ``count(None)`` never calls a Python __eq__)
class _Live:
    """A request being decoded: which index and which sequence in it."""

    problem_id: str
    seq_id: int
    step: int
    shared_from: int = 0  # prompt tokens its shared-index copy leaves out
    # its problem's index (``_indices[problem_id]``, which lives at least as long as the
    # request: an index is dropped only once empty): the per-step paths read it from here,
    # not through a dict lookup per row
    index: SuffixIndex | None = None


@dataclass(frozen=True, slots=True)
class DrafterStats:
    problems: int
    live_requests: int
    sequences: int
    tokens: int  # tokens in the per-problem indexes (history + live)
    nodes: int
    bytes: int  # every index, the shared one included
    shared_tokens: int = 0  # tokens in the shared index (copies of recent sequences)

    @property
    def bytes_per_token(self) -> float:
        """Bytes per token stored in an index (a token the shared index also holds counts twice)."""
        n = self.tokens + self.shared_tokens
        return self.bytes / n if n else 0.0


def _native_tree(tokens: np.ndarray, parents: np.ndarray, probs: np.ndarray, match_len: int) -> DraftTree:
    """A DraftTree from native output without ``__post_init__``'s per-node Python check:
    the native index emits parents best-first (``-1 <= parents[i] < i``) by construction
    (checked against the validating constructor in tests/test_drafter.py). Saves ~1 us per
    node on the per-decode-step path."""
    tree = object.__new__(DraftTree)
    # One dict update instead of four frozen-dataclass setattrs (~0.2 us less per tree).
    tree.__dict__.update(tokens=tokens, parents=parents, probs=probs, match_len=match_len)
    return tree


def truncate_trusted(tree: DraftTree, k: int) -> DraftTree:
    """``tree.truncate(k)`` without re-validating the parents: a prefix of a valid
    best-first tree is valid, and the check is a per-node Python loop (per-step path)."""
    if k >= len(tree):
        return tree
    k = max(k, 0)
    return _native_tree(tree.tokens[:k], tree.parents[:k], tree.probs[:k], tree.match_len)


# Sequences int32_tokens converts in one pass (Python ints, or SGLang's array("q") of output
# ids; a numpy array of another int dtype too): None from it means the numpy path below.
_NATIVE_TOKENS = (list, tuple, array)


def as_tokens(tokens: object, what: str) -> np.ndarray:
    """Validated 1-D int32 copy-free view where possible; ValueError names the bad value."""
    if isinstance(tokens, np.ndarray) and tokens.dtype == np.int32 and tokens.ndim == 1:
        arr = tokens
    elif (type(tokens) in _NATIVE_TOKENS or type(tokens) is np.ndarray) and (arr := int32_tokens(tokens)) is not None:
        return arr  # (every item an int in range: converted in one C pass)
    else:
        arr = np.asarray(tokens)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(
                f"invalid {what}: expected a 1-D sequence of token ids, got "
                f"dtype={arr.dtype} shape={arr.shape}"
            )
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
            raise ValueError(f"invalid {what}: token ids must be in [0, 2**31), got {arr.min()}..{arr.max()}")
        arr = arr.astype(np.int32)
    return np.ascontiguousarray(arr)


_INT32_MAX = np.iinfo(np.int32).max


def _bad_token(flat: np.ndarray, offsets: np.ndarray) -> None:
    """Raise for the first token id outside [0, 2**31) of flat rows, naming it and its row."""
    hit = int(np.flatnonzero((flat < 0) | (flat > _INT32_MAX))[0])
    r = int(np.searchsorted(offsets, hit, side="right")) - 1
    raise ValueError(f"invalid token id {int(flat[hit])} in row {r}: token ids must be in [0, 2**31)")


class TokenRows:
    """Rows of token ids as one flat int32 array and row offsets: the form a verify result
    already has (the worker's accepted tokens of every request), validated once for the
    batch, so the per-step feedback neither builds a Python list per request nor flattens
    them again. Row ``r`` is ``flat[offsets[r]:offsets[r + 1]]``; a sequence of int32
    arrays (``len``, ``rows[r]``, iteration), so code written for lists of rows takes it."""

    __slots__ = ("flat", "offsets", "_lens")

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        flat = np.asarray(flat)
        offsets = np.asarray(offsets)
        if flat.ndim != 1 or flat.dtype != np.int32 or offsets.ndim != 1 or offsets.dtype != np.int64:
            raise ValueError(f"TokenRows needs a 1-D int32 flat array and 1-D int64 offsets, got flat "
                             f"dtype={flat.dtype} shape={flat.shape}, offsets dtype={offsets.dtype} "
                             f"shape={offsets.shape}")
        lens = np.diff(offsets)
        if not len(offsets) or offsets[0] != 0 or offsets[-1] != len(flat) or (lens < 0).any():
            raise ValueError(f"TokenRows offsets must rise from 0 to {len(flat)} (the flat length), got "
                             f"{offsets[:3].tolist()}...{offsets[-3:].tolist()}")
        if flat.size and flat.min() < 0:  # (int32: nothing above 2**31 - 1 to check)
            _bad_token(flat, offsets)
        self.flat, self.offsets, self._lens = flat, offsets, lens

    # from_padded of int64 / int32 arrays in one native pass (``native.padded_rows``, ~10
    # numpy operations otherwise); False: numpy, the reference (tests/test_host_path_flat.py).
    NATIVE = True

    @classmethod
    def from_padded(cls, tokens, lens) -> "TokenRows":
        """Row ``r`` = the first ``lens[r]`` entries of row ``r`` of a 2-D ``tokens`` array
        (any integer dtype: a verify's ``[requests, stride]`` accepted tokens)."""
        tokens, lens = np.asarray(tokens), np.asarray(lens, dtype=np.int64).reshape(-1)
        if (TokenRows.NATIVE and tokens.ndim == 2 and tokens.dtype in (np.int64, np.int32)
                and len(lens) == tokens.shape[0]):
            # (one native pass; None: a bad length or token, named by the numpy path below)
            got = padded_rows(np.ascontiguousarray(tokens), np.ascontiguousarray(lens))
            if got is not None:
                rows = object.__new__(cls)
                rows.flat, rows.offsets = got
                rows._lens = lens.copy()
                return rows
        if tokens.ndim != 2 or tokens.dtype.kind not in "iu" or len(lens) != tokens.shape[0]:
            raise ValueError(f"TokenRows.from_padded needs a 2-D integer tokens array with one row per "
                             f"length, got dtype={tokens.dtype} shape={tokens.shape} for {len(lens)} lengths")
        if len(lens) and (lens.min() < 0 or lens.max() > tokens.shape[1]):
            bad = np.flatnonzero((lens < 0) | (lens > tokens.shape[1]))
            raise ValueError(f"invalid length {int(lens[bad[0]])} in row {int(bad[0])}: must be in "
                             f"[0, {tokens.shape[1]}]")
        flat = tokens[np.arange(tokens.shape[1])[None, :] < lens[:, None]]
        offsets = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        if flat.size and (flat.min() < 0 or flat.max() > _INT32_MAX):
            _bad_token(flat, offsets)
        # Checked here already (the rows' lengths, every token): built without __init__'s
        # second pass over them (~40 us less at 512 rows, the worker's per-step feedback).
        rows = object.__new__(cls)
        rows.flat, rows.offsets, rows._lens = flat.astype(np.int32), offsets, offsets[1:] - offsets[:-1]
        return rows

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lens(self) -> np.ndarray:
        """Tokens per row (int64)."""
        return self._lens

    def __getitem__(self, r: int) -> np.ndarray:
        if not -len(self) <= r < len(self):
            raise IndexError(f"TokenRows row {r} out of range for {len(self)} rows")
        r %= len(self)
        return self.flat[self.offsets[r]:self.offsets[r + 1]]

    def __iter__(self):
        return (self[r] for r in range(len(self)))


# (C-level per-row reads of a batch's records; _HOLE: a placeholder row's record)
_index_of = attrgetter("index")
_seq_id_of = attrgetter("seq_id")
_HOLE = _Live("", -1, 0, 0, None)


def _positions(keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Where each of ``queries`` is in ``keys`` (int64 arrays; a repeated key: its last
    position), -1 where absent: ``dict(zip(keys, range(len(keys))))`` lookups, in numpy
    (a dict over a 512-row batch and its lookups took ~0.14 ms, this ~0.05)."""
    if not len(keys):
        return np.full(len(queries), -1, np.int64)
    order = np.argsort(keys, kind="stable")  # (equal keys keep their order: the last is rightmost)
    srt = keys[order]
    k = np.searchsorted(srt, queries, side="right") - 1
    kk = np.maximum(k, 0)
    return np.where((k >= 0) & (srt[kk] == queries), order[kk], -1)


def _flat_tokens(rows: Sequence[object]) -> np.ndarray | None:
    """All rows as one int32 array when every row is a list/tuple of valid token ids,
    converted and range-checked once for the batch (per-row ``as_tokens`` costs ~5 us a
    row); None otherwise, so the caller's per-row path names the bad row."""
    if type(rows) is TokenRows:
        return rows.flat
    if not all(type(r) in (list, tuple) for r in rows):
        return None
    arr = np.array(list(chain.from_iterable(rows)))
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        return None
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        return None
    return arr.astype(np.int32)


def _versions(indices) -> np.ndarray:
    """``native.index_versions`` of a row list (a sequence made a list; a placeholder's
    None reads version 0)."""
    return index_versions(indices if type(indices) is list else list(indices))


class SuffixDrafter:
    _mix_memo: tuple | None = None  # (config, its native mix tuple): _mix

    def __init__(self, config: DrafterConfig | None = None) -> None:
        self.config = config or DrafterConfig()
        if self.config.window_steps + 1 > MAX_STEPS:
            raise ValueError(
                f"invalid window_steps={self.config.window_steps}: the native index holds at "
                f"most {MAX_STEPS} steps (window_steps + 1 for the current step)"
            )
        self._step = 0
        self._indices: dict[str, SuffixIndex] = {}
        self._global = SuffixIndex(self.config.shared_index_depth) if self.config.global_shard else None
        # Finished sequences in the shared index, oldest first -> tokens (shared_max_tokens).
        self._shared_len: dict[int, int] = {}
        self._unshare_pending: list[int] = []  # past shared_max_tokens: leave at the next extend
        self.shared_tokens = 0
        self._live: dict[str, _Live] = {}
        # Prompt copies (config.dedup_prompts): (problem, prompt digest) -> [seq_id, step,
        # head] of a stored sequence that indexed that prompt whole (head: the tokens before
        # the prompt's last index_depth, copied once a second copy needs it; None before);
        # the head of every sequence that indexed only the rest (one array per prompt,
        # shared); and which key each whole copy holds (dropped with its sequence). Keyed
        # by a 16-byte digest, not the prompt (a stored rollout's entry costs ~0.2 kB, not
        # two prompt copies); a head is compared token by token before it is used.
        self._prompt_copies: dict[tuple[str, bytes], list] = {}
        self._heads: dict[int, np.ndarray] = {}
        self._whole_key: dict[int, tuple[str, bytes]] = {}
        # A batch's rows resolved once (see _rows): (req_ids, lives, indexes, seq_ids, rows
        # not registered yet); stale once one of its requests ends (a start only adds a
        # request, another's end leaves its rows what they are).
        self._rows_memo: tuple | None = None
        self._rows_dead: set[str] = set()  # requests ended since the memo was made
        # the latest read-only per-row budgets (a policy's draft_sizes) and their int32 form
        self._budget_memo: tuple | None = None
        self._finished: dict[str, dict[int, list[int]]] = {}  # problem -> step -> seq_ids
        self._step_seqs: Counter[int] = Counter()  # registered sequences per step
        # History accounting for the max_history_tokens cap: tokens per finished sequence,
        # and which problems hold finished rollouts of each step (insertion = age order).
        self._seq_len: dict[int, int] = {}
        self._by_step: dict[int, dict[str, None]] = {}
        self.history_tokens = 0
        self.lazy_eviction = False  # see advance_step / evict_pending
        self._evicting: set[int] = set()
        self._next_seq_id = 0
        self._predrafted: tuple | None = None  # see predraft
        self._reused: tuple | None = None  # (the latest reuse of its trees by row: predrafted_rows)
        self._boundary_trees = False  # the kept trees are the ones from before a boundary
        self._weights = (np.zeros(0, np.int64), np.zeros(0, np.float64))
        self._refresh_weights()

    # ------------------------------------------------------------------ steps

    @property
    def step(self) -> int:
        return self._step

    # The first ``speculate_flat`` after a step boundary reuses the trees pre-drafted before
    # it (under the previous step's weights) for every row whose index did not change
    # otherwise, as if the boundary had come right after that plan; the trees are proposals,
    # verified exactly, and one plan per request per boundary drafts from weights one step
    # old. Drafting every row again there took the boundary step's plan ~2.2 ms at 512 rows
    # (bench_host_path), the largest part of the slowest steps. Depends only on the order of
    # events: eager and lazy eviction reuse the same trees (see advance_step).
    REUSE_ACROSS_BOUNDARY = True

    def advance_step(self, step: int) -> None:
        """Start training step ``step``; evict finished rollouts older than the window."""
        if step < self._step:
            raise ValueError(f"invalid step={step}: steps only advance (current {self._step})")
        carry = self.REUSE_ACROSS_BOUNDARY and self._predrafted is not None and not self.lazy_eviction
        if carry:  # the kept rows' indexes, before the eager evictions below change them
            kept_idx = self._predrafted_indexes()
            before = index_versions(kept_idx)
        self._step = step
        oldest = step - self.config.window_steps
        old = sorted(x for x in self._by_step if x < oldest and x not in self._evicting)
        if self.lazy_eviction:
            # Out of the window now (weight 0: see evict_pending), removed from the index
            # later in chunks (``evict_pending``), e.g. on a background thread while the
            # GPU runs a forward: one step's history is ~1/window of everything stored.
            self._evicting.update(old)
            # A native index holds at most MAX_STEPS distinct steps. A problem's index that
            # would overflow evicts its own pending steps when the new step's first sequence
            # arrives (``_make_slot``: O(that problem)); the shared index files every
            # sequence under one step (SHARED_STEP), so it never overflows.
        else:
            for s in old:
                for problem_id in list(self._by_step.get(s, ())):
                    self._evict(problem_id, s)
        self._refresh_weights()
        self._boundary_trees = self.REUSE_ACROSS_BOUNDARY and self._predrafted is not None
        if carry:
            # Removals of out-of-window history made by the boundary itself do not count
            # as changes of a kept tree's index (lazy eviction makes them after the plan).
            versions = self._predrafted[2].copy()
            same = versions == before
            versions[same] = index_versions(kept_idx)[same]
            self._predrafted = (*self._predrafted[:2], versions, *self._predrafted[3:])

    def _predrafted_indexes(self) -> list:
        """The index of each entry of the kept trees' versions, in their order (an entry
        whose request has ended, or that no row reads -- a request predrafted twice keeps
        its later row -- gets a fresh empty index: its tree is never reused)."""
        rows, versions = self._predrafted[0], self._predrafted[2]
        by_seq = {lv.seq_id: lv.index for lv in self._live.values()}
        spare = SuffixIndex(2)
        if type(rows) is dict:  # (predraft: seq_id -> row)
            out = [spare] * len(versions)
            for q, i in rows.items():
                out[i] = by_seq.get(q, spare)
            return out
        return [by_seq.get(q, spare) for q in np.asarray(rows).tolist()]

    def evict_pending(self, max_tokens: int | None, stop=None) -> bool:
        """Remove out-of-window rollouts left by a lazy ``advance_step``, about
        ``max_tokens`` tokens' worth (None: all). ``stop``: a callable asked between
        rollouts (after the first); once it says True the call returns (the rest stays
        pending). Returns True
        when none are left. (Out-of-window history has weight 0: it never lengthens a
        match or blocks an anchor, but a draft still reads some of it -- a node's recency,
        the shared index's copies -- so callers remove it at points fixed by the events,
        never by time: ``DasSession._evict_chunk``.)"""
        removed, started = 0, False
        while self._evicting:
            s = min(self._evicting)
            problems = self._by_step.get(s)
            if not problems:
                self._evicting.discard(s)
                continue
            # (at least one rollout per call, whatever ``stop`` says: chunks make progress)
            if (max_tokens is not None and removed >= max_tokens) or (started and stop()):
                return False
            started = stop is not None
            problem_id = next(iter(problems))
            before = self.history_tokens
            self._evict(problem_id, s, stop)
            removed += before - self.history_tokens
        return True

    def _evict(self, problem_id: str, step: int, stop=None) -> None:
        """Drop every finished rollout of ``problem_id`` at ``step`` (one native call, GIL
        released); with ``stop``, one rollout per call, asking ``stop`` between them (a
        group of long rollouts took up to ~30 ms in one call at RL scale)."""
        by_step = self._finished.get(problem_id, {})
        seqs = by_step.get(step, [])
        while seqs:
            take = seqs if stop is None else seqs[:1]
            self._drop_finished(problem_id, step, take)
            seqs = seqs[len(take):]
            if seqs and stop():
                by_step[step] = seqs  # the rest leaves at a later call
                return
        by_step.pop(step, None)
        problems = self._by_step.get(step)
        if problems is not None:
            problems.pop(problem_id, None)
            if not problems:
                del self._by_step[step]
        if not by_step:
            self._finished.pop(problem_id, None)
        self._drop_index_if_empty(problem_id)

    def _drop_finished(self, problem_id: str, step: int, seqs: list[int]) -> None:
        self._indices[problem_id].remove_sequences(np.asarray(seqs, dtype=np.int64))
        if self._global is not None:
            self._unshare([q for q in seqs if q in self._shared_len])
        self._step_seqs[step] -= len(seqs)
        if self._step_seqs[step] <= 0:
            del self._step_seqs[step]
        for seq_id in seqs:
            self.history_tokens -= self._seq_len.pop(seq_id, 0)
            if self._whole_key or self._heads:
                self._forget_prompt(seq_id)

    def defer_unshare(self, seq_ids) -> None:
        """Shared-index copies :meth:`take_unshare` handed out but not removed: they leave
        with the next extend (before its appends) or the next :meth:`take_unshare`."""
        self._unshare_pending.extend(int(q) for q in seq_ids)

    def _note_finished(self, problem_id: str, step: int, seq_id: int, n_tokens: int,
                       n_shared: int | None) -> None:
        """A finished rollout of ``n_tokens`` (``n_shared`` of them in its shared-index
        copy; None: it has no copy) is history now."""
        self._finished.setdefault(problem_id, {}).setdefault(step, []).append(seq_id)
        self._by_step.setdefault(step, {})[problem_id] = None
        self._seq_len[seq_id] = n_tokens
        self.history_tokens += n_tokens
        if self._global is not None and n_shared is not None:
            self._shared_len[seq_id] = n_shared
            self.shared_tokens += n_shared
            cap = self.config.shared_max_tokens
            if cap and self.shared_tokens > cap:  # the oldest finished ones leave the shared index
                old, excess = [], self.shared_tokens - cap
                for q, n in self._shared_len.items():
                    if excess <= 0:
                        break
                    old.append(q)
                    excess -= n
                # ... at the next batch extend (inside the pre-draft job), or earlier when
                # a caller takes them (take_unshare: the session removes them during the
                # verify forward): ~1 ms per removed rollout at RL scale, off the
                # scheduler's critical path. Until then they still count in drafts: which
                # copies a draft sees depends only on the order of events.
                self._unshare(old, later=True)

    def _unshare(self, seq_ids: list[int], later: bool = False) -> None:
        """Finished sequences leave the shared index only (their problem's index keeps
        them): now, in one GIL-free call, or ``later``, at the next batch extend, before
        its appends (``_unshare_pending``). Counted out of ``shared_tokens`` at once."""
        if not seq_ids:
            return
        if later:
            self._unshare_pending.extend(seq_ids)
        else:
            self.remove_shared(np.asarray(seq_ids, dtype=np.int64))
        for q in seq_ids:
            self.shared_tokens -= self._shared_len.pop(q)

    def take_unshare(self) -> np.ndarray | None:
        """The shared-index copies :meth:`_unshare` left for the next extend, handed to the
        caller to remove now (:meth:`remove_shared`) instead: the session removes them
        during the verify forward, off the next step's critical path. None if none wait.
        Drafts made before :meth:`remove_shared` still see them."""
        if self._global is None or not self._unshare_pending:
            return None
        ids, self._unshare_pending = self._unshare_pending, []
        return np.asarray(ids, dtype=np.int64)

    def remove_shared(self, seq_ids: np.ndarray) -> None:
        """Remove :meth:`take_unshare`'s copies from the shared index (one GIL-free call)."""
        self._global.remove_sequences(seq_ids)

    def _apply_unshare(self) -> None:
        """Remove the copies ``_unshare(later=True)`` left for the next extend."""
        ids = self.take_unshare()
        if ids is not None:
            self.remove_shared(ids)

    def enforce_cap(self, max_tokens: int | None = None) -> list[str]:
        """Evict the oldest steps' rollouts (problem by problem, oldest added first) until
        history holds at most ``max_tokens`` (default ``config.max_history_tokens``; 0 = no
        cap). Returns the problems left without any history (their statistics can go)."""
        cap = self.config.max_history_tokens if max_tokens is None else max_tokens
        gone: list[str] = []
        if not cap:
            return gone
        while self.history_tokens > cap and self._by_step:
            s = min(self._by_step)
            problem_id = next(iter(self._by_step[s]))
            self._evict(problem_id, s)
            if problem_id not in self._finished:
                gone.append(problem_id)
        if gone:
            self._refresh_weights()
        return gone

    def history_problems(self) -> set[str]:
        """Problems with finished rollouts in the window."""
        if not self._evicting:
            return set(self._finished)
        # A problem has finished rollouts of step s exactly when it is in _by_step[s]: the
        # union over the steps still in the window (set unions, not a Python loop over
        # every problem's steps: ~2.5 ms at every step boundary with 2,048 problems).
        out: set[str] = set()
        for s, problems in self._by_step.items():
            if s not in self._evicting:
                out.update(problems)
        return out

    def without_history(self, problem_ids: set[str]) -> set[str]:
        """The problems of ``problem_ids`` with no finished rollout in the window: ``problem_ids
        - history_problems()`` without making the union (~0.3 ms at a step boundary with
        2,048 problems): C set differences over ``problem_ids``' own entries, newest step
        first (it holds the most problems, so the rest are differences of a small set)."""
        if not self._evicting:
            return problem_ids.difference(self._finished)
        out = set(problem_ids)
        for s in sorted(self._by_step, reverse=True):
            if not out:
                break
            if s not in self._evicting:
                out = out.difference(self._by_step[s])
        return out

    def _refresh_weights(self) -> None:
        # Every step still present is weighted (live requests of older steps included);
        # the native side maps steps to slots.
        steps = sorted(set(self._step_seqs) | {self._step})
        decay = self.config.step_decay
        w = [0.0 if s in self._evicting else decay ** (self._step - s) for s in steps]
        if self._global is not None:  # the shared index's one step (its sequences weigh 1)
            steps, w = [SHARED_STEP] + steps, [1.0] + w
        self._weights = (np.asarray(steps, dtype=np.int64), np.asarray(w, dtype=np.float64))
        self._weight_dict = dict(zip(steps, self._weights[1].tolist()))

    # ------------------------------------------------------------------ sequences

    def _index(self, problem_id: str) -> SuffixIndex:
        idx = self._indices.get(problem_id)
        if idx is None:
            idx = self._indices[problem_id] = SuffixIndex(self.config.index_depth)
        return idx

    def _make_slot(self, problem_id: str, step: int) -> None:
        """Lazy eviction: before ``problem_id``'s index takes a sequence of a step it does
        not hold, remove that problem's out-of-window steps (oldest first) while its index
        has no free native step slot."""
        idx = self._indices.get(problem_id)
        if idx is None or not self._evicting:
            return
        steps = idx.steps()
        if step in steps or len(steps) < MAX_STEPS:
            return
        for s in sorted(x for x in self._finished.get(problem_id, ()) if x in self._evicting):
            self._evict(problem_id, s)
            idx = self._indices.get(problem_id)
            if idx is None or len(idx.steps()) < MAX_STEPS:
                return

    def _add(self, problem_id: str, tokens: np.ndarray, step: int, shared_from: int | None = 0) -> int:
        """Index ``tokens`` as a new sequence of ``problem_id`` at ``step``; the shared
        index's copy starts at ``shared_from`` (None: no copy)."""
        self._make_slot(problem_id, step)
        seq_id = self._next_seq_id
        self._next_seq_id += 1
        self._index(problem_id).add_sequence(seq_id, tokens, step)
        if self._global is not None and shared_from is not None:
            self._global.add_sequence(seq_id, tokens[shared_from:], SHARED_STEP)
        if self._step_seqs[step] == 0:
            self._step_seqs[step] = 1
            self._refresh_weights()
        else:
            self._step_seqs[step] += 1
        return seq_id

    def _forget_prompt(self, seq_id: int) -> None:
        """A sequence left the index: its prompt head, or its place as a whole copy."""
        self._heads.pop(seq_id, None)
        key = self._whole_key.pop(seq_id, None)
        if key is not None:
            del self._prompt_copies[key]

    def _remove(self, problem_id: str, seq_id: int, step: int) -> None:
        self._forget_prompt(seq_id)
        self._indices[problem_id].remove_sequence(seq_id)
        if self._global is not None:
            self._global.remove_sequence(seq_id)
        self._step_seqs[step] -= 1
        if self._step_seqs[step] == 0:
            del self._step_seqs[step]

    def _drop_index_if_empty(self, problem_id: str) -> None:
        idx = self._indices.get(problem_id)
        if idx is not None and idx.num_sequences == 0:
            del self._indices[problem_id]

    def add_history(self, problem_id: str, step: int, tokens: Sequence[int] | np.ndarray,
                    shared: bool = True) -> bool:
        """Add a finished rollout; returns False (not stored) if ``step`` is outside the window.
        ``shared=False`` keeps it out of the shared index (:meth:`load_history`)."""
        if step > self._step:
            raise ValueError(f"invalid step={step}: after the current step {self._step}")
        if step < self._step - self.config.window_steps:
            return False
        arr = as_tokens(tokens, f"tokens of problem {problem_id!r}")
        seq_id = self._add(problem_id, arr, step, 0 if shared else None)
        self._note_finished(problem_id, step, seq_id, len(arr), len(arr) if shared else None)
        return True

    def start_request(self, req_id: str, problem_id: str, prompt_tokens: Sequence[int] | np.ndarray) -> None:
        if req_id in self._live:
            raise ValueError(f"duplicate req_id={req_id!r}: already started")
        tokens = as_tokens(prompt_tokens, f"prompt_tokens of req_id={req_id!r}")
        # The shared index gets the prompt's last shared_index_depth tokens only: the
        # request's cursors there, so its shared anchors, are those of the whole prompt
        # (no suffix it matches is longer). The question itself drafts through the
        # problem's own index, which keeps all of it; in the shared index it served only
        # other problems, which rarely quote it, and took a third of a start's indexing
        # (a GRPO group indexes its prompt 16 times) and, as history, part of the shared
        # token cap (shared_max_tokens) from the responses. bench_peers: tokens per step
        # 3.632 / 9.023 / 3.225 vs 3.631 / 9.022 / 3.217 with whole prompts.
        key = head = None
        k = self.config.index_depth
        if self.config.dedup_prompts and len(tokens) > k:
            # Another whole copy of this prompt in the problem's index, in a weighted step:
            # index only the last index_depth tokens (the cursors and every count a draft
            # reads past the prompt are the same; see DrafterConfig.dedup_prompts).
            key = (problem_id, hashlib.blake2b(tokens.tobytes(), digest_size=16).digest())
            whole = self._prompt_copies.get(key)
            if (whole is not None and whole[1] >= self._step - self.config.window_steps
                    and whole[1] not in self._evicting):
                head = self._prompt_head(problem_id, whole, tokens, len(tokens) - k)
                if head is not None:
                    tokens = tokens[len(head):]
        cut = self._shared_start(len(tokens))
        seq_id = self._add(problem_id, tokens, self._step, cut)
        if head is not None:
            self._heads[seq_id] = head
        elif key is not None:
            old = self._prompt_copies.get(key)
            if old is not None:
                self._whole_key.pop(old[0], None)
            self._prompt_copies[key] = [seq_id, self._step, None]
            self._whole_key[seq_id] = key
        self._live[req_id] = _Live(problem_id, seq_id, self._step, cut, self._indices[problem_id])

    def _prompt_head(self, problem_id: str, whole: list, tokens: np.ndarray, n: int) -> np.ndarray | None:
        """The first ``n`` tokens of the prompt ``tokens`` as the whole copy ``whole``
        stored them (copied once from the index, then shared), or None when they differ
        (a digest collision: the prompt is then indexed whole)."""
        head = whole[2]
        if head is None:
            stored = self._indices[problem_id].sequence_tokens(whole[0])
            if len(stored) < len(tokens) or not np.array_equal(stored[:len(tokens)], tokens):
                return None
            head = whole[2] = stored[:n].copy()
        elif len(head) != n or not np.array_equal(head, tokens[:n]):
            return None
        return head

    def _shared_start(self, n_prompt: int) -> int:
        return max(0, n_prompt - self.config.shared_index_depth) if self._global is not None else 0

    def _rows(self, req_ids: Sequence[str], skip: set | None = None,
              kept: tuple | None = None) -> tuple[list, list, np.ndarray]:
        """(records, indexes, seq_ids) of these live requests, in row order (an unknown one
        raises, naming it); the rows whose request is in ``skip`` are placeholders (record
        and index None, seq_id -1). A decode step asks for the same batch two or three
        times (the feedback's extend, the next plan's drafts): while none of its requests
        ended in between (a start only adds one), the rows resolved for an equal
        ``req_ids`` list are reused, not looked up again per row, and a plan's placeholders
        are looked up alone once their requests are registered (the caller must not change
        the arrays). ``kept``: see :meth:`speculate_flat`."""
        memo = self._rows_memo
        if kept is not None and memo is not None and type(req_ids) is list:
            back = kept_back(kept, memo[0], req_ids, skip)
            if back is not None:
                return self._rows_from(memo, req_ids, skip, back)
        if memo is not None and self._rows_dead:
            if self._rows_dead.isdisjoint(memo[0]):
                self._rows_dead = set()  # (only requests outside the memo's rows ended)
            elif skip is None and memo[0] == req_ids:
                memo = None  # (a request of these rows ended: look them up, so an unknown one raises)
        if memo is not None and not self._rows_dead and skip is None and memo[0] == req_ids:
            return self._fill_rows(memo) if memo[4] else (memo[1], memo[2], memo[3])
        if memo is not None and len(memo[0]) and type(req_ids) is list and len(req_ids) >= self.ROWMAP_MIN_ROWS:
            return self._rows_from(memo, req_ids, skip)
        live = self._live
        pending = []
        if skip:  # placeholders (seq_id -1, no index) for the rows in skip, registered or not
            get = live.get
            lives = [_HOLE if r in skip else get(r, _HOLE) for r in req_ids]
            seq_ids = np.fromiter(map(_seq_id_of, lives), dtype=np.int64, count=len(lives))
            pending = np.flatnonzero(seq_ids < 0).tolist()
            for i in pending:
                if req_ids[i] not in skip:
                    self._request(req_ids[i])  # raises, naming the unknown one
            idx = list(map(_index_of, lives))
        else:
            try:
                lives = [live[r] for r in req_ids]
            except KeyError:
                lives = [self._request(r) for r in req_ids]  # raises, naming the unknown one
            idx = list(map(_index_of, lives))
            seq_ids = np.fromiter(map(_seq_id_of, lives), dtype=np.int64, count=len(lives))
        if type(req_ids) is list:
            self._rows_memo = (list(req_ids), lives, idx, seq_ids, pending)
            self._rows_dead = set()
        return lives, idx, seq_ids

    # Rows resolved through the latest memo (_rows_from) from this many rows on; below it
    # looking every row up costs about as much.
    ROWMAP_MIN_ROWS = ROWMAP_MIN_ROWS

    def _rows_from(self, memo: tuple, req_ids: list, skip: set | None,
                   back: np.ndarray | None = None) -> tuple[list, list, np.ndarray]:
        """:meth:`_rows` when some rows changed since the memo (a start or a finish): the
        rows the memo resolved are gathered from it (``row_map``: one C pass), only the
        others are looked up -- the same records, indexes and seq_ids. A memo row whose
        request ended since (``_rows_dead``), or that was a placeholder there, is looked up
        again; a row in ``skip`` is a placeholder whatever the memo says. ``back``: the
        memo rows' map to these rows if the caller has it (``kept_back``)."""
        m_ids, m_lives, m_idx, m_seq, _ = memo
        if back is None:
            back, _ = kept_rows(m_ids, req_ids, self._rows_dead | skip if skip else self._rows_dead)
        seq_ids = np.where(back >= 0, m_seq[np.maximum(back, 0)], -1)
        look = (seq_ids < 0).nonzero()[0].tolist()  # (new rows, and the memo's placeholders)
        lives = gather_list(m_lives, back, _HOLE)
        idx = gather_list(m_idx, back, None)
        live = self._live
        pending = []
        for i in look:
            r = req_ids[i]
            lv = _HOLE if skip and r in skip else live.get(r, _HOLE)
            if lv is _HOLE:
                if not skip or r not in skip:
                    self._request(r)  # raises, naming the unknown one
                pending.append(i)
            lives[i], idx[i], seq_ids[i] = lv, lv.index, lv.seq_id
        self._rows_memo = (list(req_ids), lives, idx, seq_ids, pending)
        self._rows_dead = set()
        return lives, idx, seq_ids

    def _fill_rows(self, memo: tuple) -> tuple[list, list, np.ndarray]:
        """A memo's rows with its placeholders (the rows a plan left out while their start
        was deferred) resolved: only those rows are looked up (the feedback after such a
        plan, once they are registered), in place. Nothing holds the memo's lists or array
        past the call that read them (the plan drafts from them and keeps none: its trees,
        the pre-draft's rows and maps are other objects), so they are filled, not copied:
        until stop 58 two 512-row lists and the seq_ids were copied here on every step with
        a start (~25 us at 512 rows in bench_host_path: each copy writes every item's
        reference count). A placeholder still unknown raises before any row is filled."""
        req_ids, lives, idx, seq_ids, pending = memo
        found = [self._request(req_ids[i]) for i in pending]  # (one still unknown raises, naming it)
        for i, lv in zip(pending, found):
            lives[i], idx[i], seq_ids[i] = lv, lv.index, lv.seq_id
        self._rows_memo = (req_ids, lives, idx, seq_ids, [])
        return lives, idx, seq_ids

    def _request(self, req_id: str) -> _Live:
        live = self._live.get(req_id)
        if live is None:
            raise ValueError(f"unknown req_id={req_id!r}: not started or already finished")
        return live

    def extend_request(self, req_id: str, tokens: int | Sequence[int] | np.ndarray) -> None:
        """Append newly accepted tokens (bonus token included: it is real output)."""
        live = self._request(req_id)
        idx = self._indices[live.problem_id]
        if isinstance(tokens, (int, np.integer)):
            if not 0 <= tokens <= np.iinfo(np.int32).max:
                raise ValueError(f"invalid token={tokens} for req_id={req_id!r}: must be in [0, 2**31)")
            idx.append(live.seq_id, int(tokens))
            if self._global is not None:
                self._apply_unshare()
                self._global.append(live.seq_id, int(tokens))
            return
        arr = as_tokens(tokens, f"tokens of req_id={req_id!r}")
        idx.extend(live.seq_id, arr)
        if self._global is not None:
            self._apply_unshare()
            self._global.extend(live.seq_id, arr)

    def extend_batch(self, req_ids: Sequence[str], tokens: Sequence[Sequence[int] | np.ndarray]) -> None:
        """``extend_request`` for a whole decode batch in one native call per index set;
        every row is validated before any index changes."""
        self.apply_extend(self.prepare_extend(req_ids, tokens))

    def prepare_extend(self, req_ids: Sequence[str], tokens: Sequence[Sequence[int] | np.ndarray],
                       flat: np.ndarray | None = None) -> tuple:
        """The validated native arguments of :meth:`extend_batch` (raises ValueError naming
        a bad row). :meth:`apply_extend` then only runs native code, without the GIL: the
        session prepares on the scheduler thread and applies on its update thread.
        ``flat``: the rows already concatenated as int32 (``_flat_tokens``), if at hand."""
        if len(tokens) != len(req_ids):
            raise ValueError(f"tokens has {len(tokens)} rows for {len(req_ids)} req_ids")
        _, idx, seq_ids = self._rows(req_ids)
        if flat is None:
            flat = _flat_tokens(tokens)
        if flat is None:  # not plain int lists, or a bad value: validate row by row
            rows = [as_tokens(t, f"tokens of req_id={r!r}") for r, t in zip(req_ids, tokens)]
            flat = np.concatenate(rows) if rows else np.zeros(0, np.int32)
        if type(tokens) is TokenRows:
            offsets = tokens.offsets
        else:
            offsets = np.zeros(len(tokens) + 1, np.int64)
            np.cumsum(np.fromiter((len(t) for t in tokens), np.int64, len(tokens)), out=offsets[1:])
        return idx, seq_ids, flat, offsets

    def apply_extend(self, prepared: tuple, predraft=None) -> None:
        """Apply :meth:`prepare_extend`'s arguments; with ``predraft`` (a node budget, one
        int or one per row) also
        :meth:`predraft` the rows, in the same native call (``extend_draft_rows``: each row
        drafted right after its index's appends, while their nodes are in cache)."""
        idx, seq_ids, flat, offsets = prepared
        if predraft is not None and self._can_predraft() and len(idx):
            args, keep = self._extend_draft_args(prepared, predraft)
            result = extend_draft_rows(*args)
            if args[-1] is not None:
                self._unshare_pending = []  # removed by that call, before its appends
            keep(result)
            return
        extend_batch(idx, seq_ids, flat, offsets)
        if self._global is not None:
            self._apply_unshare()
            extend_batch([self._global] * len(idx), seq_ids, flat, offsets)

    def start_extend(self, prepared: tuple, predraft, ahead=None):
        """:meth:`apply_extend` with ``predraft``, started now on the native background pool
        (it never needs the GIL, so it runs while this thread goes on with Python). Returns
        a callable that waits for it and keeps the trees; until it has returned nothing may
        read or change this drafter's indices. None (nothing started) with ``global_shard``
        or no rows: use :meth:`apply_extend`. ``ahead``: a ``native.PlanAhead`` of the same
        rows (the policy's ``plan_ahead``), run by the job on its trees once drafted."""
        if not self._can_predraft() or not len(prepared[0]):
            return None
        # The caller's thread keeps running Python meanwhile: leave it a core. When it
        # waits (``wait()``), it drafts too: then every core works on the rest.
        args, keep = self._extend_draft_args(prepared, predraft, spare=1)
        pending = extend_draft_rows_start(*args, ahead=ahead)
        if args[-1] is not None:
            self._unshare_pending = []  # the job removes them, before its appends
        return lambda: keep(pending.wait())

    def _extend_draft_args(self, prepared: tuple, predraft, spare: int = 0):
        """(``extend_draft_rows`` arguments, a callable keeping its result as the
        :meth:`predraft` trees). The step weights are read now: trees drafted with them are
        reused only while they are still the drafter's."""
        idx, seq_ids, flat, offsets = prepared
        cfg = self.config
        token = self._weights
        steps, weights = token
        n = len(idx)
        b = self._budget_array(idx, predraft)  # (capped at max_budget, as every draft)
        cores = max(1, _CPUS - spare)
        threads = max(1, min(self.DRAFT_THREADS, cores, n // self.DRAFT_ROWS_PER_THREAD))
        # The appends: up to 8 tasks by index (64 rows each at least) plus the shared
        # index's, taken by the same threads (and, started, by the thread that waits).
        extend_threads = 0
        shared = self._shared()  # pre-drafting runs only with no shared index or a mixed one
        # (taken by the caller once the native call has accepted its arguments)
        unshare = np.asarray(self._unshare_pending, np.int64) if shared[0] is not None else None
        args = (idx, seq_ids, flat, offsets, b, cfg.min_token_prob, steps, weights, not cfg.tree,
                cfg.max_match_len, self._mix(), threads, extend_threads, *shared, unshare)

        def keep(result) -> None:
            *arrays, versions, probs_ok = result
            # (rows: the job's seq_ids array; a plan of the very same rows -- _rows' memo --
            # reads the trees in order, any other looks its rows up by seq_id; probs_ok: the
            # job checked the node probabilities, DraftBatch.probs_in_range)
            # (idx: the rows' indexes, for predraft_current where the epoch moved)
            self._predrafted = (seq_ids, DraftBatch(*arrays, probs_ok), versions, token, b.astype(np.int64),
                                mutation_epoch(), idx)
            self._boundary_trees = False

        return args, keep

    def predrafted_trees(self) -> DraftBatch | None:
        """The latest pre-draft's trees (the object a plan of its very rows gets back from
        :meth:`speculate_flat` when every tree is still exact), or None."""
        kept = self._predrafted
        return kept[1] if kept is not None else None

    def predraft_current(self) -> bool:
        """Whether every tree of the latest pre-draft still stands for a draft of its row now:
        no index changed since it was made (``mutation_epoch``) -- or, where some index did,
        not one of its rows' indexes (their versions, the rule :meth:`speculate_flat` reuses
        a tree by when the epoch moved) -- and the step weights are the same (what
        :meth:`speculate_flat` checks before it reuses them; the per-row budgets it also
        compares are the caller's). The epoch counts every index's changes in the process:
        another session's (two engines' sessions in one process; bench_host_path runs the
        previous host path beside this one) moved it, and the launch first of the plan made
        ahead then failed for no change of this drafter's (until stop 58)."""
        kept = self._predrafted
        if kept is None or kept[3] is not self._weights or not self._can_predraft():
            return False
        if kept[5] == mutation_epoch():
            return True
        idx = kept[6]  # (None for trees predraft drafted: no row list)
        return idx is not None and bool((kept[2] == _versions(idx)).all())

    def predrafted_rows(self, drafts: DraftBatch) -> np.ndarray | None:
        """Where ``drafts`` (what :meth:`speculate_flat` returned last) is the latest
        pre-draft's trees gathered by row -- every row's tree reused, the others empty
        placeholders (deferred starts) -- each row's row in them (-1: a placeholder); else
        None (some row was drafted now, or ``drafts`` is another batch)."""
        got = self._reused
        return got[1] if got is not None and got[0] is drafts else None

    def finish_request(self, req_id: str, keep: bool = True) -> None:
        """End a request; ``keep`` makes it history of its step, otherwise it is dropped."""
        live = self._request(req_id)
        del self._live[req_id]
        if self._rows_memo is not None:
            self._rows_dead.add(req_id)  # (its memo row, if any, is stale now: see _rows)
        in_window = live.step >= self._step - self.config.window_steps
        if keep and in_window:
            n = len(self._indices[live.problem_id].sequence_tokens(live.seq_id))
            self._note_finished(live.problem_id, live.step, live.seq_id, n, n - live.shared_from)
        else:
            self._remove(live.problem_id, live.seq_id, live.step)
            self._drop_index_if_empty(live.problem_id)

    def finish_as(self, req_id: str, problem_id: str, step: int, tokens: np.ndarray) -> None:
        """End a request whose returned text is ``tokens`` (prompt + output, int32): it
        becomes history of ``step`` for ``problem_id``. The live copy is kept where it is
        that text or a prefix of it (the rest is appended): no removal and re-insertion of
        the whole sequence, the common case. Otherwise (it ran past the returned text:
        tokens accepted after a stop token, another problem or step) it is replaced."""
        live = self._request(req_id)
        if live.problem_id == problem_id and live.step == step:
            have = self._indices[problem_id].sequence_tokens(live.seq_id)
            head = self._heads.get(live.seq_id)  # (the prompt's part it never indexed)
            h = 0 if head is None else len(head)
            n = h + len(have)
            if (n <= len(tokens) and np.array_equal(have, tokens[h:n])
                    and (head is None or np.array_equal(head, tokens[:h]))):
                if n < len(tokens):
                    self.extend_request(req_id, tokens[n:])
                self.finish_request(req_id, keep=True)
                return
        self.finish_request(req_id, keep=False)
        self.add_history(problem_id, step, tokens)

    # ------------------------------------------------------------------ drafting

    def speculate(self, req_id: str, budget: int | None = None) -> DraftTree:
        """Best-first draft tree (a chain if ``config.tree`` is False) of <= budget nodes."""
        return self.speculate_batch([req_id], None if budget is None else [budget])[0]

    def speculate_batch(
        self, req_ids: Sequence[str], budgets: Sequence[int] | np.ndarray | None = None
    ) -> list[DraftTree]:
        """One native call for the whole decode batch; ``budgets=None`` asks for max_budget."""
        n = len(req_ids)
        if n == 1 and (budgets is None or (type(budgets) is list and len(budgets) == 1
                                           and type(budgets[0]) is int)):
            tree = self._speculate_one(req_ids[0], self.config.max_budget if budgets is None else budgets[0])
            if tree is not None:
                return [tree]
        b = self._budget_array(req_ids, self.config.max_budget if budgets is None else budgets)
        _, indices, seq_ids = self._rows(req_ids)  # (an unknown request raises, naming it)
        trees = self._draft_rows(indices, seq_ids, b)
        if self._global is not None and not self._mixes_shared():
            empty = [r for r, t in enumerate(trees) if len(t) == 0 and b[r] > 0]
            if empty:
                fallback = self._draft_rows([self._global] * len(empty), seq_ids[empty], b[empty])
                for r, t in zip(empty, fallback):
                    trees[r] = t
        return trees

    def _speculate_one(self, req_id: str, budget: int) -> DraftTree | None:
        """One request's tree through its index's own one-row call (``speculate``, a one-
        request group): the same tree as a one-row ``draft_batch`` (the same parameters and
        step table; tests/test_drafter.py), ~2 us less native time without its argument and
        result arrays. None when the fallback-only shared index would have to fill an empty
        tree (the general path does that)."""
        if budget < 0:
            raise ValueError(f"invalid budget={budget} for req_id={req_id!r}: must be >= 0")
        lv = self._request(req_id)
        cfg = self.config
        budget = min(budget, cfg.max_budget)
        tokens, parents, probs, match = lv.index.draft_for_sequence(
            lv.seq_id, budget, cfg.min_token_prob, self._weight_dict, not cfg.tree, cfg.max_match_len,
            self._mix(), *self._shared())
        if not len(tokens) and budget > 0 and self._global is not None and not self._mixes_shared():
            return None
        return _native_tree(tokens, parents, probs, match)

    def _budget_array(self, req_ids: Sequence[str], budget) -> np.ndarray:
        """One int for every row, or one per row -> int32 per row, at most ``max_budget``
        (the most nodes one request gets; the index is built only as deep as that needs,
        ``DrafterConfig.index_depth``); a negative one (or a length mismatch) is refused
        naming it."""
        n = len(req_ids)
        cap = self.config.max_budget
        if isinstance(budget, (int, np.integer)):
            if budget < 0:
                raise ValueError(f"invalid budget={int(budget)}: must be >= 0")
            return np.full(n, min(int(budget), cap), dtype=np.int32)
        if len(budget) != n:
            raise ValueError(f"budgets has {len(budget)} entries for {n} req_ids")
        if n <= 8 and type(budget) is list and all(type(x) is int for x in budget):
            # A few Python ints (a small group's per-request call): checked in Python, ~3 us
            # less than the array round trip below (the same array).
            for x, r in zip(budget, req_ids):
                if x < 0:
                    raise ValueError(f"invalid budget={x} for req_id={r!r}: must be >= 0")
            return np.array([x if x < cap else cap for x in budget], dtype=np.int32)
        memo = self._budget_memo
        if memo is not None and memo[0] is budget:
            return memo[1]  # (the same read-only sizes: the feedback's pre-draft, then the plan)
        if type(budget) is np.ndarray and budget.dtype == np.int64 and budget.ndim == 1 \
                and budget.flags.c_contiguous:
            # (the policy's sizes: checked and clipped in one native pass, ~25 us -> ~3 cold)
            row, out = clip_budgets(budget, cap)
            if row >= 0:
                raise ValueError(f"invalid budget={int(budget[row])} for req_id={req_ids[row]!r}: must be >= 0")
        else:
            b = np.asarray(budget, dtype=np.int64)
            if n and b.min() < 0:
                row = int(np.argmin(b))
                raise ValueError(f"invalid budget={int(b[row])} for req_id={req_ids[row]!r}: must be >= 0")
            out = np.minimum(b, cap).astype(np.int32)
        if isinstance(budget, np.ndarray) and not budget.flags.writeable and budget.base is None:
            out.flags.writeable = False
            self._budget_memo = (budget, out)
        return out

    def _mix(self) -> tuple | None:
        """The native wide-tree parameters (one place: the tree list and flat paths must
        draft the same trees)."""
        cfg = self.config
        memo = self._mix_memo
        if memo is not None and memo[0] is cfg:  # (the config is frozen: one tuple per config)
            return memo[1]
        # skip_unseen only where the shared index (if any) is mixed into every draft: the
        # fallback-only one fills a row whose own tree is empty with a real match, which a
        # stand-in tree of the own index would pre-empt.
        skip = cfg.skip_discount if cfg.skip_unseen and (self._global is None or self._mixes_shared()) else 0.0
        mix = None if not cfg.mixture else (cfg.mix_alpha, cfg.mix_escape, cfg.mix_min_match,
                                            cfg.mix_max_fanout, cfg.mix_recency, cfg.mix_match_half,
                                            cfg.mix_min_ratio, skip)
        self._mix_memo = (cfg, mix)
        return mix

    def _can_predraft(self) -> bool:
        """Pre-drafted trees can stand for a later draft: no shared index, or one mixed into
        every draft (the fallback-only shared index drafts empty rows at plan time)."""
        return self._global is None or self._mixes_shared()

    def _mixes_shared(self) -> bool:
        """Every draft mixes in the shared index (else it only fills empty rows)."""
        cfg = self.config
        return self._global is not None and cfg.shared_weight > 0.0 and cfg.mixture and cfg.tree

    def _shared(self) -> tuple:
        """(shared index, weight, min match) for a native draft call: the shared index when
        every draft mixes it in (the fallback drafts of ``speculate_*`` run only otherwise)."""
        if not self._mixes_shared():
            return (None, 0.0, 1)
        return (self._global, self.config.shared_weight, self.config.shared_min_match)

    def _draft_rows(self, indices: list[SuffixIndex], seq_ids: np.ndarray, budgets: np.ndarray) -> list[DraftTree]:
        cfg = self.config
        steps, weights = self._weights
        mix = self._mix()
        tokens, parents, probs, offsets, match = draft_batch(
            indices, seq_ids, budgets, cfg.min_token_prob, steps, weights, not cfg.tree, cfg.max_match_len, mix,
            *self._shared())
        if len(match) == 1:  # (one row: its arrays are the whole output)
            return [_native_tree(tokens, parents, probs, int(match[0]))]
        bounds = offsets.tolist()
        return [
            _native_tree(tokens[a:z], parents[a:z], probs[a:z], m)
            for a, z, m in zip(bounds[:-1], bounds[1:], match.tolist())
        ]

    # Rows per drafting thread in speculate_flat (threads = rows // this, at most
    # DRAFT_THREADS): the split pays for its thread start-up from a few hundred rows on.
    DRAFT_ROWS_PER_THREAD = 192
    DRAFT_THREADS = max(1, min(4, _CPUS))

    def speculate_flat(self, req_ids: Sequence[str], budget: int | Sequence[int] | np.ndarray,
                       threads: int | None = None, skip: set | None = None,
                       kept: tuple | None = None) -> DraftBatch:
        """:meth:`speculate_batch` as one flat :class:`DraftBatch` (same trees, plus node
        depths): no Python object per row. ``budget`` is one int for every row or one per
        row; ``threads`` None picks by batch size (the result does not depend on it).
        ``skip``: requests whose rows get an empty tree, registered or not (a plan's
        deferred starts): the others' trees are those of drafting them alone.
        ``kept``: ``(previous req_ids, back, ...)`` -- each row's row in the caller's previous
        batch (-1: a new request), known to be the same live request there (the worker
        maps SGLang's batch lists by object identity, ``batch_rows.BatchRows``). Used when
        the previous batch is the rows this drafter resolved last: then its rows are
        gathered through ``back`` instead of a map of the ids (the same rows)."""
        b = self._budget_array(req_ids, budget)
        _, idx, seq_ids = self._rows(req_ids, skip, kept)
        return self._speculate_resolved(idx, seq_ids, b, threads, bool(skip))

    def _speculate_resolved(self, idx: list, seq_ids: np.ndarray, b: np.ndarray, threads,
                            holes: bool = False) -> DraftBatch:
        """:meth:`speculate_flat` of resolved rows (indexes, seq_ids, int32 budgets); with
        ``holes``, rows with seq_id -1 (placeholders, no index) get an empty tree."""
        n = len(seq_ids)
        if self._predrafted is not None and self._can_predraft():
            out = self._reuse_predrafted(idx, seq_ids, b, threads, holes)
            if out is not None:
                return out
        if holes:
            rows = np.flatnonzero(seq_ids >= 0)
            if len(rows) < n:
                sub = [idx[i] for i in rows.tolist()]
                return self._speculate_resolved(sub, seq_ids[rows], b[rows], threads).spread(rows, n)
        if threads is None:
            threads = max(1, min(self.DRAFT_THREADS, n // self.DRAFT_ROWS_PER_THREAD))
        out = self._draft_flat(idx, seq_ids, b, threads)
        if self._global is not None and not self._mixes_shared():
            empty = np.flatnonzero((out.lens() == 0) & (b > 0))
            if empty.size:
                fallback = self._draft_flat([self._global] * len(empty), seq_ids[empty], b[empty], 1)
                rows = np.arange(n, dtype=np.int64)
                rows[empty] = n + np.arange(len(empty))
                out = DraftBatch.concat([out, fallback]).take(rows)
        return out

    def predraft(self, req_ids: Sequence[str], budget: int) -> None:
        """Draft these rows now (:meth:`speculate_flat`) and keep the trees: a later
        ``speculate_flat`` reuses a row's tree while nothing it depends on has changed --
        the same sequence (seq_id) and budget, its index unchanged since (the native
        ``SuffixIndex.version``) and the same step weights -- and drafts only the other rows.
        The result is exactly what drafting then would give. The session calls it on its
        update thread right after a batch's accepted tokens are indexed (the nodes just
        touched are still in cache, and the engine's own per-step work runs meanwhile).
        With the shared index mixed into every draft (``global_shard``, ``shared_weight`` >
        0) a reused tree's shared-index part is as of the pre-draft (right after the batch's
        appends): the other requests' starts and finishes in between change only the shared
        index for this row and do not re-draft it; a row whose own index changed is drafted
        again and reads the shared index as it is then. It depends only on the order of
        events, never on timing. Not with a fallback-only shared index (``shared_weight``
        0: it drafts the rows whose own tree is empty at plan time)."""
        self._predrafted = None
        self._boundary_trees = False
        if not self._can_predraft() or not len(req_ids):
            return
        live = self._live
        req_ids = [r for r in req_ids if r in live]  # (a row may have left meanwhile)
        if not req_ids:
            return
        out = self.speculate_flat(req_ids, budget)
        lives = [live[r] for r in req_ids]
        seq_ids = [lv.seq_id for lv in lives]
        indices = self._indices
        versions = np.fromiter((indices[lv.problem_id].version for lv in lives), np.uint64, len(lives))
        self._predrafted = (dict(zip(seq_ids, range(len(seq_ids)))), out, versions, self._weights,
                            self._budget_array(seq_ids, int(budget)).astype(np.int64), mutation_epoch(), None)

    def _same_weights(self, token) -> bool:
        """Every step the weights ``token`` (an earlier ``_weights``) and the current ones
        share weighs the same. A draft reads only the weights of the steps its index holds,
        and an index whose steps changed has a new version: so then a tree whose index
        version is unchanged is still exact (e.g. after the first sequence of a new step
        arrived elsewhere)."""
        now = self._weight_dict
        return all(now.get(s, w) == w for s, w in zip(token[0].tolist(), token[1].tolist()))

    # The reused trees gathered by row are made when first read (draft_tree.RowsOf): a plan
    # that truncates them first cuts them in one pass from the pre-draft. False: gathered
    # at once (the same trees).
    LAZY_ROWS = True

    def _reuse_predrafted(self, idx, seq_ids: np.ndarray, b: np.ndarray, threads,
                          holes: bool = False) -> DraftBatch | None:
        """``speculate_flat`` from the :meth:`predraft` trees that are still exact (the
        others drafted now; with ``holes``, rows with seq_id -1 empty); None when none is."""
        rows, kept, versions, weights, budgets, epoch, _ = self._predrafted
        boundary, self._boundary_trees = self._boundary_trees, False
        self._reused = None
        # No index changed at all since the trees' versions were read (the usual case at a
        # plan: starts and finishes wait for the forward): a row's index is its seq_id's, so
        # its version is still the recorded one -- one read, not one per row (~20-50 us at
        # 512 rows, each a cache miss in another index).
        current = epoch == mutation_epoch()

        def versions_now() -> np.ndarray:  # (a placeholder's None index reads version 0)
            return _versions(idx)

        if weights is not self._weights and not boundary and not self._same_weights(weights):
            self._predrafted = None  # a step advanced since: every step's weight changed
            return None
        n = len(seq_ids)
        if rows is seq_ids and not holes and n == len(kept):
            # The rows the job drafted, in its order (a decode step): every tree is still
            # exact unless an index changed or a budget differs (then the general path).
            if (current or (versions == versions_now()).all()) and (budgets == b).all():
                return kept
        hole = seq_ids < 0 if holes else None
        if rows is seq_ids:  # the rows the job drafted, in its order
            at = np.arange(n, dtype=np.int64)
        elif type(rows) is dict:
            at = np.fromiter(map(rows.get, seq_ids.tolist(), repeat(-1, n)), np.int64, n)
        elif len(rows) == n and ((same := rows == seq_ids).all() or (hole is not None and (same | hole).all())):
            # The job's rows in the same places (a step whose finished rows were replaced
            # in place, or none): no search.
            at = np.arange(n, dtype=np.int64)
            if hole is not None:
                at[hole] = -1
        else:
            at = _positions(rows, seq_ids)  # (a placeholder's -1 is never a job row)
        ok = at >= 0
        j = at[ok]
        if current:
            ok[ok] = budgets[j] == b[ok]
        else:  # (a placeholder's row is not ok here anyway)
            ok[ok] = (versions[j] == versions_now()[ok]) & (budgets[j] == b[ok])
        if not ok.any():
            return None
        if ok.all():
            if n == len(kept) and np.array_equal(at, np.arange(n)):
                return kept
            out = RowsOf(kept, at) if self.LAZY_ROWS else kept.take(at)
            self._reused = (out, at)
            return out
        miss = ~ok if hole is None else ~ok & ~hole
        if not miss.any():  # (only placeholders besides the reused rows)
            rows = np.where(ok, at, -1)
            out = RowsOf(kept, rows) if self.LAZY_ROWS else kept.take_rows(rows)
            self._reused = (out, rows)
            return out
        miss = np.flatnonzero(miss)
        if threads is None:
            threads = max(1, min(self.DRAFT_THREADS, len(miss) // self.DRAFT_ROWS_PER_THREAD))
        fresh = self._draft_flat([idx[i] for i in miss.tolist()], seq_ids[miss], b[miss], threads)
        rows = np.where(ok, at, -1)
        rows[miss] = len(kept) + np.arange(len(miss))
        return DraftBatch.concat([kept, fresh]).take_rows(rows)

    def _draft_flat(self, indices, seq_ids: np.ndarray, budgets: np.ndarray, threads: int) -> DraftBatch:
        cfg = self.config
        steps, weights = self._weights
        mix = self._mix()
        tokens, parents, probs, depths, offsets, match = draft_rows(
            indices, seq_ids, budgets, cfg.min_token_prob, steps, weights, not cfg.tree, cfg.max_match_len,
            mix, threads, *self._shared())
        return DraftBatch(tokens, parents, probs, depths, offsets, match)

    # ------------------------------------------------------------------ snapshots, stats

    def history(self) -> History:
        """Finished rollouts per problem per step (what snapshots persist)."""
        out: History = {}
        for problem_id, by_step in self._finished.items():
            idx = self._indices[problem_id]
            steps = {s: [self._whole_text(idx, q) for q in seqs] for s, seqs in sorted(by_step.items())
                     if s not in self._evicting}
            if steps:
                out[problem_id] = steps
        return out

    def _whole_text(self, idx: SuffixIndex, seq_id: int) -> np.ndarray:
        """A stored sequence's text, with the prompt head it did not index (dedup_prompts)."""
        head = self._heads.get(seq_id)
        tokens = idx.sequence_tokens(seq_id)
        return tokens if head is None else np.concatenate([head, tokens])

    def load_history(self, history: Mapping[str, Mapping[int, Iterable[Sequence[int] | np.ndarray]]]) -> int:
        """Add every rollout of a :meth:`history` snapshot; returns how many were stored.

        The shared index ends as if they were added one by one (it keeps the newest
        ``shared_max_tokens`` finished tokens, the last added the newest), but the rollouts
        that would only pass through it -- most of an RL-scale snapshot: 35M history tokens
        against a 512k cap -- never enter it: adding and then removing them took ~14 s of
        update-thread time at the first forward after a restore (bench_host_path, 2,048
        problems x 16) and transient memory for the whole history's copy."""
        items = [(problem_id, int(step), tokens) for problem_id, by_step in history.items()
                 for step, rollouts in by_step.items() for tokens in rollouts]
        first_shared = self._first_shared(items)
        if first_shared:  # the loaded ones overflow the cap: every older copy leaves too
            self._unshare(list(self._shared_len), later=True)
        stored = 0
        for i, (problem_id, step, tokens) in enumerate(items):
            stored += self.add_history(problem_id, step, tokens, shared=i >= first_shared)
        return stored

    def _first_shared(self, items: list) -> int:
        """Index of the first of ``items`` (problem, step, tokens; in load order) that the
        shared index would still hold after loading them all: the newest stored ones whose
        tokens fit ``shared_max_tokens`` (what one-by-one loading leaves, oldest out first).
        0 when they all fit or there is no cap."""
        cap = self.config.shared_max_tokens
        if self._global is None or not cap:
            return 0
        oldest = self._step - self.config.window_steps
        total, first = 0, len(items)
        for i in range(len(items) - 1, -1, -1):
            _, step, tokens = items[i]
            if step > self._step or step < oldest:
                continue  # raises, or is not stored: no copy either way
            total += len(tokens) if hasattr(tokens, "__len__") else 0  # (bad ones: add_history names them)
            if total > cap:
                return first
            first = i
        return 0

    def stats(self) -> DrafterStats:
        shared = self._global is not None and self._global.num_sequences > 0
        idxs = list(self._indices.values()) + ([self._global] if shared else [])
        return DrafterStats(
            problems=len(self._indices),
            live_requests=len(self._live),
            sequences=sum(i.num_sequences for i in self._indices.values()),
            tokens=sum(i.num_tokens for i in self._indices.values()),
            nodes=sum(i.num_nodes for i in idxs),
            bytes=sum(i.memory_bytes() for i in idxs),
            shared_tokens=self._global.num_tokens if self._global is not None else 0,
        )
