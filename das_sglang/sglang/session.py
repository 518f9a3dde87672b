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

PROBLEM_KEY = "das_problem_id"
STEP_KEY = "das_step"
_log = logging.getLogger(__name__)


def problem_of(custom_params: dict | None, prompt: Sequence[int]) -> tuple[str, int | None]:
    """``(problem_id, step)`` from a request's custom params; the problem id falls back to
    a hash of the prompt tokens, the step to None (= the current step)."""
    params = custom_params or {}
    step = params.get(STEP_KEY)
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"invalid custom_params {STEP_KEY}={step!r}: must be an int >= 0")
    pid = params.get(PROBLEM_KEY)
    if pid is None or pid == "":
        digest = hashlib.blake2b(np.asarray(prompt, dtype=np.int32).tobytes(), digest_size=8)
        pid = "prompt-" + digest.hexdigest()
    return str(pid), step


@dataclass
class _Live:
    problem_id: str
    step: int
    prompt_len: int
    max_new_tokens: int
    generated: int  # response tokens the drafter has seen


class DasSession:
    """Drafter + policy + the live requests of one worker process."""

    def __init__(self, options: DasOptions, drafter=None, policy=None, engine_id: str | None = None):
        from das_sglang.core.drafter import SuffixDrafter

        self.options = options
        self.drafter = drafter if drafter is not None else SuffixDrafter(options.drafter)
        self.policy = policy if policy is not None else make_policy(
            options.server.policy, config=options.policy
        )
        self.step = 0
        self.live: dict[str, _Live] = {}
        self.snapshot = self._open_snapshot()
        self.worker_stats: dict | None = None  # the worker's verify counters, for shard stats
        self.shards = self._open_shards(engine_id)

    # ------------------------------------------------------------ requests
    def start(self, req_id: str, custom_params, prompt: Sequence[int], output: Sequence[int],
              max_new_tokens: int) -> None:
        """First sight of a decoding request: its prompt and the output so far."""
        pid, step = problem_of(custom_params, prompt)
        if step is not None and step > self.step:
            self.advance_step(step)
        self.drafter.start_request(req_id, pid, np.asarray(prompt, dtype=np.int32))
        if len(output):
            self.drafter.extend_request(req_id, np.asarray(output, dtype=np.int32))
        step = self.step if step is None else step
        self.live[req_id] = _Live(pid, step, len(prompt), max_new_tokens, len(output))
        if self.shards is not None:
            self.shards.on_start(pid, step)  # lazy load of a problem this engine lacks

    def advance_step(self, step: int) -> None:
        self.step = step
        self.drafter.advance_step(step)
        self.policy.advance_step(step)
        if self.shards is not None:
            self.shards.advance_step(step)
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
        rollout = np.asarray(list(prompt) + output, dtype=np.int32)
        self.drafter.add_history(live.problem_id, live.step, rollout)
        if self.shards is not None:
            self.shards.on_finished(live.problem_id, live.step, rollout)
        self.policy.observe_finished(live.problem_id, len(output))
        if self.snapshot is not None:
            self.snapshot.note_finished()

    def drop(self, req_id: str) -> None:
        """A request left without finishing (aborted, retracted): forget its text."""
        live = self.live.pop(req_id, None)
        if live is not None:
            self.drafter.finish_request(req_id, keep=False)
            if self.shards is not None:
                self.shards.on_drop(live.problem_id)

    # ------------------------------------------------------------ history
    def _open_snapshot(self):
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
        return PeriodicSnapshot(
            server.history_path, self.drafter.history, every_n=server.snapshot_interval
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
        d = self.drafter.stats()
        stats.problems_held, stats.history_tokens, stats.step = d.problems, d.tokens, self.step
        w = self.worker_stats
        if w is not None:
            stats.verify_steps = w.get("verify_steps", 0)
            stats.draft_tokens_proposed = w.get("proposed", 0)
            stats.draft_tokens_accepted = w.get("accepted", 0)

    def close(self) -> None:
        if self.shards is not None:
            self.shards.close()
        if self.snapshot is not None:
            self.snapshot.close()
