"""Per-request DAS parameters: parsed without ever raising into the scheduler.

A request tags itself with ``custom_params = {"das_problem_id": ..., "das_step": ...}``.
Those values come straight from clients (HTTP, the OpenAI routes), so anything may
arrive: strings, negative or fractional steps, booleans, lists, nested objects, huge
strings, a ``custom_params`` that is not an object at all.

- :func:`parse_tag` checks one request's tag and raises a ``ValueError`` naming the bad
  value (the API helpers ``das_sglang.api.tag`` / ``tagged`` use it, so a bad tag fails
  in the caller's process, before anything is sent).
- Inside the scheduler :meth:`DasSession.start` calls it and, on a bad tag, serves the
  request *untagged* (problem = hash of the prompt, current step) with a rate-limited
  warning and a counter: one bad request never raises in the scheduler.
- :class:`StepClock` maps ``das_step`` values to the drafter's step clock so that no
  request can move the clock by more than one step (``docs/sglang.md``, "Step clock").
"""

from __future__ import annotations

import logging
import time
from typing import Any

PROBLEM_KEY = "das_problem_id"
STEP_KEY = "das_step"
MAX_PROBLEM_ID_CHARS = 1024  # ids are names/hashes; a longer one is a client bug
MAX_STEP = 2**63 - 1  # what msgpack/JSON int64 carries

_log = logging.getLogger(__name__)


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_tag(custom_params: Any) -> tuple[str | None, int | None]:
    """``(problem_id, step)`` of a request, each None when absent.

    Raises ValueError naming the bad value for: a ``custom_params`` that is not a dict;
    a ``das_step`` that is not an int in ``[0, 2**63)`` (bools, floats, strings refused);
    a ``das_problem_id`` that is not a str/int or is longer than 1024 characters.
    """
    if custom_params is None:
        return None, None
    if not isinstance(custom_params, dict):
        raise ValueError(
            f"invalid custom_params={_short(custom_params)}: must be a JSON object "
            f"(got {type(custom_params).__name__})"
        )
    step = custom_params.get(STEP_KEY)
    if step is not None and (
        isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP
    ):
        raise ValueError(
            f"invalid custom_params {STEP_KEY}={_short(step)}: must be an int in [0, 2**63)"
        )
    pid = custom_params.get(PROBLEM_KEY)
    if pid is None or pid == "":
        return None, step
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise ValueError(
            f"invalid custom_params {PROBLEM_KEY}={_short(pid)}: must be a string or an int"
        )
    pid = str(pid)
    if len(pid) > MAX_PROBLEM_ID_CHARS:
        raise ValueError(
            f"invalid custom_params {PROBLEM_KEY}={_short(pid)}: {len(pid)} characters, "
            f"at most {MAX_PROBLEM_ID_CHARS}"
        )
    return pid, step


class RateLimitedWarning:
    """At most one log line per ``every_s`` seconds; the rest are counted in it."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self.logger, self.every_s = logger, every_s
        self._last = float("-inf")
        self._suppressed = 0

    def __call__(self, msg: str, *args: Any) -> bool:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._suppressed += 1
            return False
        if self._suppressed:
            msg += f" ({self._suppressed} similar warnings suppressed)"
            self._suppressed = 0
        self._last = now
        self.logger.warning(msg, *args)
        return True


class StepClock:
    """``das_step`` values -> the drafter's step clock, at most one step per request.

    The clock counts *distinct training steps seen*: a ``das_step`` value not seen
    before opens the next clock step, whatever its size; a value seen before maps to
    the clock step it opened. So the drafter's window (``window_steps``) holds the last
    W training steps the server saw, and one request can age history by one step at
    most. For a trainer counting 0, 1, 2, ... the clock equals ``das_step``; a jump
    (``das_step=10**12``, or a trainer resuming at step 100 over a step-3 snapshot)
    ends the current step and keeps the last window. While nothing is stored yet
    (``history_empty``) a new value sets the clock to itself when it is ahead (no
    history to lose), so snapshots carry the trainer's own step numbers.

    Memory is bounded: only the values of the last ``window_steps + 1`` clock steps
    are remembered (an older value seen again opens a new step).
    """

    def __init__(self, window_steps: int, current: int = 0,
                 known: dict[int, int] | None = None) -> None:
        self.window_steps = window_steps
        self.current = current
        self._steps: dict[int, int] = dict(known or {})  # das_step -> clock step

    def resolve(self, step: int | None, history_empty=lambda: False) -> tuple[int, bool]:
        """``(clock step, opened)`` for a request's ``das_step`` (None = current);
        ``opened`` is True when the request starts a new clock step. ``history_empty``
        is called only when ``step`` is a new value."""
        if step is None:
            return self.current, False
        known = self._steps.get(step)
        if known is not None:
            return known, False
        # Nothing stored yet: adopt the trainer's own number (the very first value too,
        # even when it is not ahead of the clock's initial 0).
        adopt = (step > self.current or not self._steps) and history_empty()
        self.current = step if adopt else self.current + 1
        self._steps[step] = self.current
        oldest = self.current - self.window_steps
        for value in [v for v, c in self._steps.items() if c < oldest]:
            del self._steps[value]
        return self.current, True

    def tick(self) -> int:
        """Open the next clock step without a ``das_step`` (an untagged step boundary,
        e.g. a weight update); returns it."""
        self.current += 1
        return self.current

    def known(self) -> dict[int, int]:
        """The remembered ``das_step -> clock step`` map (saved with snapshots)."""
        return dict(self._steps)
