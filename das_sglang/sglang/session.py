"""Per-process DAS state the SGLang worker drives: drafter, policy, request identity.

Plain Python over ints and numpy arrays (no torch, no SGLang objects), so the request
bookkeeping is testable without an engine. The worker translates SGLang's ``Req``
objects into the calls below.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from das_sglang.core.draft_tree import DraftTree
from das_sglang.core.drafter import truncate_trusted
from das_sglang.core.policy import BudgetRow, make_policy
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


def problem_of(custom_params: dict | None, prompt: Sequence[int]) -> tuple[str, int | None]:
    """``(problem_id, step)`` from a request's custom params; the problem id falls back to
    a hash of the prompt tokens, the step to None (= the current step). Raises
    ValueError naming a bad value (``request_params.parse_tag``)."""
    pid, step = parse_tag(custom_params)
    return (prompt_problem_id(prompt) if pid is None else pid), step


def prompt_problem_id(prompt: Sequence[int]) -> str:
    digest = hashlib.blake2b(np.asarray(prompt, dtype=np.int32).tobytes(), digest_size=8)
    return "prompt-" + digest.hexdigest()


@dataclass
class _Live:
    problem_id: str
    step: int
    prompt_len: int
    max_new_tokens: int
    generated: int  # response tokens the drafter has seen
    root_only: bool = False  # verified exactly at width 0 (request_constraints)


class DasSession:
    """Drafter + policy + the live requests of one worker process."""

    def __init__(self, options: DasOptions, drafter=None, policy=None,
                 write_snapshots: bool = True):
        """``write_snapshots`` False (tensor-parallel ranks other than 0) still loads the
        history snapshot, so every rank drafts alike, but never writes it."""
        from das_sglang.core.drafter import SuffixDrafter

        self.options = options
        self.drafter = drafter if drafter is not None else SuffixDrafter(options.drafter)
        self.policy = policy if policy is not None else make_policy(
            options.server.policy, config=options.policy
        )
        self.step = 0
        self.live: dict[str, _Live] = {}
        # Readable counters (saved in the snapshot's meta as "das_counters"):
        # bad_params = requests served untagged because of a bad DAS tag,
        # steps_opened = new clock steps, root_only = requests verified at width 0.
        self.counters = {"bad_params": 0, "steps_opened": 0, "root_only": 0}
        self.clock = StepClock(options.drafter.window_steps)
        self.snapshot = self._open_snapshot(write_snapshots)

    # ------------------------------------------------------------ requests
    def start(self, req_id: str, custom_params, prompt: Sequence[int], output: Sequence[int],
              max_new_tokens: int, root_only: bool = False) -> None:
        """First sight of a decoding request: its prompt and the output so far.

        A bad DAS tag never raises here (this runs inside SGLang's scheduler): the
        request is served untagged, with a rate-limited warning and a counter.
        ``root_only`` requests are never drafted for (budget 0, see ``plan``).
        """
        try:
            pid, step = parse_tag(custom_params)
        except ValueError as e:
            self.counters["bad_params"] += 1
            _warn_bad_params("DAS: request %s served untagged: %s", req_id, e)
            pid, step = None, None
        if pid is None:
            pid = prompt_problem_id(prompt)
        step, opened = self.clock.resolve(step, self._history_empty)
        if opened:
            self.counters["steps_opened"] += 1
            self.advance_step(step)
        self.drafter.start_request(req_id, pid, np.asarray(prompt, dtype=np.int32))
        if len(output):
            self.drafter.extend_request(req_id, np.asarray(output, dtype=np.int32))
        self.counters["root_only"] += bool(root_only)
        self.live[req_id] = _Live(pid, step, len(prompt), max_new_tokens, len(output), root_only)

    def _history_empty(self) -> bool:
        # Finished rollouts = indexed sequences minus the live requests' own.
        return self.drafter.stats().sequences <= len(self.live)

    def advance_step(self, step: int) -> None:
        self.step = step
        self.drafter.advance_step(step)
        self.policy.advance_step(step)
        if self.snapshot is not None:
            self.snapshot.save()  # a step boundary is a natural checkpoint

    def plan(self, req_ids: Sequence[str], max_nodes: int) -> tuple[list[DraftTree], int]:
        """Draft trees truncated to the policy's budgets, and the batch width."""
        trees = self.drafter.speculate_batch(list(req_ids), [max_nodes] * len(req_ids))
        rows = []
        for rid, tree in zip(req_ids, trees):
            live = self.live[rid]
            rows.append(BudgetRow(
                req_id=rid, problem_id=live.problem_id, generated_len=live.generated,
                max_new_tokens=live.max_new_tokens, node_probs=tree.probs,
                prompt_len=live.prompt_len,
            ))
        plan = self.policy.plan(rows)
        keep = np.minimum(np.asarray(plan.budgets, dtype=np.int64), max_nodes).tolist()
        keep = [0 if self.live[rid].root_only else k for rid, k in zip(req_ids, keep)]
        trees = [truncate_trusted(t, k) for t, k in zip(trees, keep)]
        width = max((len(t) for t in trees), default=0)
        return trees, width

    def committed(self, req_id: str, proposed: int, tokens: Sequence[int]) -> None:
        """After verify: ``tokens`` = accepted drafts + the bonus token."""
        live = self.live[req_id]
        self.drafter.extend_request(req_id, np.asarray(tokens, dtype=np.int32))
        live.generated += len(tokens)
        self.policy.observe_verify(live.problem_id, proposed, len(tokens) - 1)

    def committed_batch(self, req_ids: Sequence[str], proposed: Sequence[int],
                        tokens: Sequence[Sequence[int]]) -> None:
        """:meth:`committed` for a whole decode batch."""
        self.drafter.extend_batch(req_ids, tokens)  # one native call for the batch
        observe = self.policy.observe_verify
        for rid, p, t in zip(req_ids, proposed, tokens):
            live = self.live[rid]
            live.generated += len(t)
            observe(live.problem_id, p, len(t) - 1)

    def finished(self, req_id: str, prompt: Sequence[int], output: Sequence[int]) -> None:
        """A request finished: its returned text becomes history of its problem.

        The drafter's copy may run past what was returned (tokens accepted after a stop
        token or beyond max_new_tokens), so it is replaced by the returned text.
        """
        live = self.live.pop(req_id, None)
        if live is None:
            return
        output = list(output)[: live.max_new_tokens]
        self.drafter.finish_request(req_id, keep=False)
        self.drafter.add_history(
            live.problem_id, live.step, np.asarray(list(prompt) + output, dtype=np.int32)
        )
        self.policy.observe_finished(live.problem_id, len(output))
        if self.snapshot is not None:
            self.snapshot.note_finished()

    def drop(self, req_id: str) -> None:
        """A request left without finishing (aborted, retracted): forget its text."""
        if self.live.pop(req_id, None) is not None:
            self.drafter.finish_request(req_id, keep=False)

    # ------------------------------------------------------------ history
    def _open_snapshot(self, write: bool = True):
        server = self.options.server
        if server.history_path is None:
            return None
        from das_sglang.core.snapshot import PeriodicSnapshot, load_history_or_empty

        history, meta = load_history_or_empty(server.history_path, strict=server.strict_snapshot)
        if history:
            # Advance first: the drafter refuses history from steps after its current one.
            self.step = max((s for steps in history.values() for s in steps), default=0)
            self.drafter.advance_step(self.step)
            self.drafter.load_history(history)
            _log.info("DAS: loaded history of %d problems from %s", len(history),
                      server.history_path)
            saved = (meta or {}).get("das_step_clock") or {str(self.step): self.step}
            self.clock = StepClock(
                self.options.drafter.window_steps, self.step,
                {int(k): int(v) for k, v in saved.items()},
            )
        if not write:
            return None
        return PeriodicSnapshot(
            server.history_path, self.drafter.history, every_n=server.snapshot_interval,
            get_meta=self._snapshot_meta,
        )

    def _snapshot_meta(self) -> dict:
        return {
            "das_step_clock": {str(k): v for k, v in self.clock.known().items()},
            "das_counters": dict(self.counters),
        }

    def close(self) -> None:
        if self.snapshot is not None:
            self.snapshot.close()
