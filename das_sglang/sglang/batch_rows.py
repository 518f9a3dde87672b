"""What the worker reads of a decode batch's requests each step, made once per batch
composition, and the stop cut over the whole batch.

Until stop 48 the worker read ``batch.reqs`` request by request in Python several times
a step: a registration check per request, the request ids twice (plan and feedback), the
roots, and :func:`~das_sglang.sglang.finish.stop_cut` per request on every step with an
accepted draft (its stop-token set rebuilt each call; the accepted runs made Python lists
first). With SGLang's own ``Req`` objects at 512 rows that was ~2.0 ms a step with EOS
stops only and ~5.3 ms with a stop string (``benchmarks/bench_host_path.py``,
``worker_rows``), more than the rest of DAS's host path.

SGLang rebinds ``ScheduleBatch.reqs`` to a new list whenever the batch's requests change
(``filter_batch``, ``merge_batch``, retraction; nothing in ``sglang.srt`` changes the
list in place), so :class:`BatchRows` keys what it derives from the requests -- their
ids, their stop rules -- on the list object itself (held, so its id is never reused).
A decode step without a start or a finish reads only each request's last output token
and output length, in one native pass over the rows' output arrays (``native.seq_tails``).

A request's stop rule (:func:`stop_rule`: its stop-token ids, whether it has stop
strings or regexes, ``max_new_tokens``) is fixed for its life; :class:`StopRules` keeps
it from the request's registration to its finish, interned and counted, so a batch's
rows share a few rules (usually one). :meth:`BatchRows.cut` gives what ``stop_cut``
gives row for row: token stops and the length limit of every row in one native pass
(``native.stop_rows``); rows with stop strings or regexes (which need the tokenizer's
text) through :class:`~das_sglang.sglang.finish.TextStops` (``stop_cut`` with the
request's parameters read once), rows without a rule kept through ``stop_cut`` itself.
"""

from __future__ import annotations

from itertools import repeat

import numpy as np

from das_sglang.core.budget_rows import ROWMAP_MIN_ROWS
from das_sglang.native import gather_list, row_map, seq_tails, stop_rows
from das_sglang.sglang.finish import TextStops, _stop_token_ids, stop_cut

NO_LIMIT = np.iinfo(np.int64).max // 4  # max_new_tokens None: no length limit


def stop_rule(req) -> tuple[frozenset, bool, int]:
    """(stop-token ids, has stop strings or regexes, max_new_tokens) of ``req``: what
    :func:`~das_sglang.sglang.finish.stop_cut` reads of it besides its output."""
    sp = req.sampling_params
    text = bool(sp.stop_strs or sp.stop_regex_strs)
    max_new = sp.max_new_tokens
    return frozenset(_stop_token_ids(req)), text, NO_LIMIT if max_new is None else int(max_new)


class StopRules:
    """The live requests' stop rules, interned: per request id the index of its rule
    (stop-token set, stop text or not, ``max_new_tokens``) in small tables, and for a
    request with stop strings or regexes its :class:`TextStops`. A batch's rows share a
    few rules (an RL rollout batch usually one: the model's EOS and one
    ``max_new_tokens``), each counted, so a rule no live request uses is dropped: memory
    stays bounded by the live requests whatever rules a stream of requests brings."""

    def __init__(self) -> None:
        self.rule: dict = {}  # rid -> rule index
        self.text: dict = {}  # rid -> TextStops (requests with stop strings or regexes)
        self.set_ids: list = []  # rule index -> its sorted int64 stop-token ids (None: free)
        self._index: dict[tuple, int] = {}
        self._keys: list = []
        self._count: list[int] = []
        self._free: list[int] = []
        self._tables: tuple | None = None

    def add(self, rid, req) -> None:
        """Keep ``req``'s rule under ``rid`` (replacing one kept under it)."""
        self.remove(rid)
        key = stop_rule(req)
        j = self._index.get(key)
        if j is None:
            j = self._free.pop() if self._free else len(self.set_ids)
            if j == len(self.set_ids):
                self.set_ids.append(None)
                self._keys.append(None)
                self._count.append(0)
            self._index[key] = j
            self._keys[j] = key
            self.set_ids[j] = np.array(sorted(key[0]), dtype=np.int64)
            self._tables = None
        self._count[j] += 1
        self.rule[rid] = j
        if key[1]:
            self.text[rid] = TextStops(req, key[0])

    def remove(self, rid) -> None:
        j = self.rule.pop(rid, None)
        if j is None:
            return
        self.text.pop(rid, None)
        self._count[j] -= 1
        if not self._count[j]:
            del self._index[self._keys[j]]
            self._keys[j] = self.set_ids[j] = None
            self._free.append(j)
            self._tables = None

    def of(self, rids: list) -> np.ndarray:
        """Each request's rule index (-1: none kept), int64."""
        n = len(rids)
        return np.fromiter(map(self.rule.get, rids, repeat(-1, n)), np.int64, n)

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(max_new_tokens, stop text) per rule index; one more entry at the end for
        "no rule kept" (no limit, cut one by one)."""
        if self._tables is None:
            keys = [k if k is not None else (frozenset(), False, NO_LIMIT) for k in self._keys]
            self._tables = (np.array([k[2] for k in keys] + [NO_LIMIT], dtype=np.int64),
                            np.array([k[1] for k in keys] + [True], dtype=bool))
        return self._tables

    def __len__(self) -> int:
        return len(self.rule)

    def rules_held(self) -> int:
        """Distinct rules kept (those of live requests)."""
        return len(self._index)


class BatchRows:
    """The decode batch's rows as the worker reads them: request ids and the stop cut's
    per-row rules (made once per ``batch.reqs`` list object), roots and output lengths
    (read each step). ``rules``: the registered requests' stop rules; a row without one
    is cut by ``stop_cut`` itself."""

    def __init__(self, rules: StopRules) -> None:
        self.rules = rules
        self.reqs: list | None = None  # the list object the rows were made from (held)
        self.rids: list = []
        self._outs: list = []  # each row's req.output_ids (the object SGLang appends to)
        self._rule: np.ndarray | None = None
        self._known: tuple | None = None  # (update: rules kept from the previous list)
        # (update of a new list mapped from the previous one: (previous ids, back, unique)
        # for DasSession.plan's ``kept``; None otherwise)
        self.kept: tuple | None = None
        self._cut_plan: tuple | None = None
        self.finishing: np.ndarray | None = None  # (the latest cut's: see cut)

    def changed(self, reqs: list) -> bool:
        """Whether ``reqs`` is another list than the one the rows were made from."""
        return reqs is not self.reqs

    def update(self, reqs: list) -> list:
        """The request ids of ``reqs`` (the same list object while ``reqs`` is).

        For a new list the ids and the output arrays of the rows the previous list also
        had are taken from it: its rows are mapped to the new list's by object identity
        (``native.row_map(..., identity=True)``: only the lists' pointers are read, no
        ``Req``) and only the new requests are read. Reading every ``Req`` of a new list cost
        ~0.19 ms at 512 rows in bench_host_path (a real ``Req``'s attribute dict is large
        and cold by then), more than the rest of a finish step's batch reads.

        SGLang appends a decoding request's tokens to its ``output_ids`` array in place and
        rebinds it only when the request leaves the batch (retraction) or outside decoding
        (tests/sglang/test_batch_rows.py reads the installed SGLang for it): the arrays are
        held for the list's life, so a step reads them, not each ``Req``'s attribute
        dict."""
        if reqs is self.reqs:
            return self.rids
        prev, n = self.reqs, len(reqs)
        self.kept = None
        if prev and n >= ROWMAP_MIN_ROWS:
            # (fresh: the new rows, from the same native pass)
            back, unique, fresh = row_map(prev, reqs, identity=True, fresh=True)
            back.flags.writeable = False
            self.kept = (self.rids, back, unique)
            rids = gather_list(self.rids, back, None)
            outs = gather_list(self._outs, back, None)
            for i in fresh.tolist():
                req = reqs[i]
                rids[i], outs[i] = req.rid, req.output_ids
            if self._rule is not None:
                rule = self._rule[np.maximum(back, 0)]
                rule[fresh] = -1
                self._known = (rule, fresh)
            else:
                self._known = None
        else:
            rids = [req.rid for req in reqs]
            outs = [req.output_ids for req in reqs]
            self._known = None
        self.rids, self._outs, self.reqs = rids, outs, reqs
        self._rule = None
        self._cut_plan = None
        return self.rids

    def lookup_rules(self) -> np.ndarray:
        """After :meth:`update` of a new list: each row's rule index (-1: no rule kept, a
        request the caller registers and then sets with :meth:`set_rules`). The rows kept
        from the previous list take theirs from it; only the others are looked up
        (``StopRules.of`` of every row where the list was not mapped)."""
        known, rids = self._known, self.rids
        self._known = None
        if known is None:
            rule = self.rules.of(rids)
        else:
            rule, fresh = known
            get = self.rules.rule.get
            for i in fresh.tolist():
                rule[i] = get(rids[i], -1)
        self.set_rules(rule)
        return rule

    def set_rules(self, rule: np.ndarray) -> None:
        """The rows' rule indexes (``StopRules.of`` of :attr:`rids`), if the caller has
        them (else read at the first cut)."""
        self._rule = rule
        self._cut_plan = None

    def tails(self) -> tuple[np.ndarray, np.ndarray]:
        """(each request's last output token -- the verify's roots --, its output length)
        now, int64 each: one native pass over the rows' output arrays (``native.seq_tails``)."""
        return seq_tails(self._outs)

    def roots(self) -> np.ndarray:
        """Each request's last output token (the verify's roots; int64)."""
        return seq_tails(self._outs)[0]

    def committed(self) -> np.ndarray:
        """Each request's output length so far (int64)."""
        return seq_tails(self._outs)[1]

    def _plan(self) -> tuple:
        """(max_new per row, [(row, TextStops or None)] of the rows cut one by one -- stop
        strings or regexes, or no rule kept --, each other row's stop-token set (-1:
        none) and those sets flat with their offsets) for the current list."""
        if self._cut_plan is None:
            rules, n = self.rules, len(self.rids)
            rule = self._rule if self._rule is not None else self.lookup_rules()
            max_new_t, text_t = rules.tables()
            if n and rule[0] >= 0 and not text_t[rule[0]] and (rule == rule[0]).all():
                # one rule for the whole batch (the usual RL batch): no per-row tables
                ids = rules.set_ids[int(rule[0])]
                self._cut_plan = (np.full(n, max_new_t[rule[0]], dtype=np.int64), [],
                                  np.full(n, 0 if len(ids) else -1, dtype=np.int64), ids,
                                  np.array([0, len(ids)], dtype=np.int64))
            else:
                at = np.where(rule < 0, len(max_new_t) - 1, rule)
                each = np.flatnonzero(text_t[at])
                used = np.unique(rule).tolist()
                row_set = np.searchsorted(np.asarray(used, dtype=np.int64), rule)
                flat = [rules.set_ids[j] if j >= 0 else np.zeros(0, dtype=np.int64) for j in used]
                empty = np.array([not len(f) for f in flat] + [True])
                row_set[empty[row_set]] = -1
                row_set[each] = -1
                offsets = np.zeros(len(flat) + 1, dtype=np.int64)
                np.cumsum([len(f) for f in flat], out=offsets[1:])
                ids = np.concatenate(flat) if flat else np.zeros(0, dtype=np.int64)
                text, rids = rules.text, self.rids
                self._cut_plan = (max_new_t[at], [(b, text.get(rids[b])) for b in each.tolist()],
                                  row_set, ids, offsets)
        return self._cut_plan

    def cut(self, runs: np.ndarray, lens: np.ndarray, committed: np.ndarray | None = None) -> np.ndarray:
        """Per row, how many tokens of its accepted run (``runs[b, :lens[b]]``, bonus
        included; ``lens`` >= 1) one-token-at-a-time decoding would emit before the
        request finishes: ``stop_cut(req, runs[b, :lens[b]])`` for every row (int64).
        ``committed``: the output lengths (:meth:`tails`) if read since the last tokens
        were appended (else read now). Token stops and the length limit in one native
        pass (``native.stop_rows``); the rows with stop text one by one
        (``TextStops.cut``; ``stop_cut`` for a row without a rule kept).

        Also sets ``finishing``: per row, whether its request finishes with this run as cut
        (a stop token ends it, or the length limit; a row with stop text where the cut
        ended the run early) -- what SGLang's finish check will find, for the rows it can
        tell (a stop text matching at the run's very end is not among them)."""
        max_new, each, row_set, ids, offsets = self._plan()
        runs = np.ascontiguousarray(runs, dtype=np.int64)
        lens = np.ascontiguousarray(lens, dtype=np.int64)
        if committed is None:
            committed = self.committed()
        # (finishing: a stop token ends the run, or the length limit -- committed + cut >=
        # max_new --, in the same native pass)
        cut, limit, finishing = stop_rows(runs, lens, max_new, committed, row_set, ids, offsets)
        self.finishing = finishing
        if each:
            # (Python ints once for all such rows: a numpy slice and tolist per row cost
            # more; the held output arrays, not each Req's attribute)
            runs_l, lens_l, limit_l, outs = runs.tolist(), lens.tolist(), limit.tolist(), self._outs
            for b, stops in each:
                run = runs_l[b][: lens_l[b]]
                if stops is None:  # (no rule kept for it)
                    cut[b] = stop_cut(self.reqs[b], run)
                else:
                    cut[b] = stops.cut(outs[b], run, limit_l[b])
                finishing[b] = cut[b] < lens_l[b] or committed[b] + cut[b] >= max_new[b]
        return cut
