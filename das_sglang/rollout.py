"""Offline RL rollouts on an SGLang engine: K steps of "every prompt x n samples".

This module drives any object with SGLang's ``Engine`` surface (``loop``,
``async_generate(prompt=, sampling_params=, rid=)``) and never imports sglang, so its logic
is testable with a stand-in engine. `das rollout` is a thin CLI over it.

Counting (SGLang 0.5.23 ``meta_info``, per request):

- ``completion_tokens``        tokens generated;
- ``spec_verify_ct``           target forward passes that verified drafts (absent without
                               speculation);
- ``spec_num_correct_drafts``  draft tokens accepted, bonus token not included.

A request's *forward passes* are 1 (prefill) + ``spec_verify_ct`` with speculation and
``completion_tokens`` without (one per token). ``accepted_per_verify`` never includes the
bonus token; ``tokens_per_forward`` does (it is the speed-up in forward passes).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from das_sglang.api import prompt_key, tag
from das_sglang.core.records import RolloutRecord


class Engine(Protocol):
    """The part of ``sglang.Engine`` a rollout uses."""

    loop: asyncio.AbstractEventLoop

    async def async_generate(self, *, prompt: str, sampling_params: dict, rid: str) -> dict: ...

    def get_server_info(self) -> dict: ...  # a round trip through the scheduler

    def shutdown(self) -> None: ...


# ------------------------------------------------------------------ prompts


@dataclass(frozen=True, slots=True)
class Prompt:
    problem_id: str
    text: str
    answer: str | None = None  # reference answer; enables the built-in 0/1 score


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a JSONL file (or .jsonl.gz, e.g. a verl dump): one object per line with
    ``prompt`` (or verl's ``input``),
    optional ``problem_id`` (or ``id``; default: a hash of the prompt, as `das replay`
    groups verl dumps) and optional ``answer``. Repeated lines of the same prompt (one
    per sample in verl dumps) count once.

    Raises ValueError naming the file, line and field of the first problem.
    """
    from das_sglang.replay.datasets import read_jsonl

    prompts: list[Prompt] = []
    seen: dict[str, tuple[int, Prompt]] = {}
    for lineno, obj in read_jsonl(Path(path)):
        prompt = _parse_prompt(f"{path}:{lineno}", obj, lineno)
        if prompt.problem_id in seen:
            first_line, first = seen[prompt.problem_id]
            if first.text == prompt.text:
                continue  # a verl dump lists each prompt once per sample: keep one
            raise ValueError(
                f"{path}:{lineno}: duplicate problem_id {prompt.problem_id!r} with a different prompt "
                f"(first on line {first_line})"
            )
        seen[prompt.problem_id] = (lineno, prompt)
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty)")
    return prompts


def _parse_prompt(where: str, obj: Any, lineno: int) -> Prompt:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text = obj.get("prompt", obj.get("input"))
    if not isinstance(text, str) or not text:
        raise ValueError(f"{where}: field 'prompt' must be a non-empty string, got {text!r}")
    pid = obj.get("problem_id", obj.get("id", prompt_key(text)))
    if isinstance(pid, bool) or not isinstance(pid, (str, int)) or pid == "":
        raise ValueError(f"{where}: field 'problem_id' must be a non-empty string or int, got {pid!r}")
    answer = obj.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise ValueError(f"{where}: field 'answer' must be a string or number, got {answer!r}")
    return Prompt(str(pid), text, None if answer is None else str(answer))


# ------------------------------------------------------------------ scoring


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def final_answer(text: str) -> str | None:
    """The answer a response commits to: after the last ``####`` (GSM8K/verl style), else
    the last ``\\boxed{...}``; None if neither."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().splitlines()
        return tail[0].strip() if tail else ""
    boxed = _BOXED.findall(text)
    return boxed[-1].strip() if boxed else None


def _normalize(ans: str) -> str:
    return ans.replace(",", "").replace("$", "").strip().rstrip(".")


def score(output: str, answer: str | None) -> float | None:
    """1.0 / 0.0 exact match of the final answer; None without a reference answer."""
    if answer is None:
        return None
    got = final_answer(output)
    return float(got is not None and _normalize(got) == _normalize(answer))


# ------------------------------------------------------------------ requests and statistics


def request_id(problem_id: str, step: int, sample: int) -> str:
    return f"{problem_id}/s{step}/{sample}"


def sampling_seed(seed: int, rid: str) -> int:
    """A stable per-request seed (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{rid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True, slots=True)
class Sampling:
    max_new_tokens: int
    temperature: float
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"invalid max_new_tokens={self.max_new_tokens!r}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"invalid temperature={self.temperature!r}: must be >= 0")

    def params(self, problem_id: str, step: int, rid: str) -> dict[str, Any]:
        p: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "custom_params": tag(problem_id, step),
        }
        if self.seed is not None:
            p["sampling_seed"] = sampling_seed(self.seed, rid)
        return p


@dataclass(frozen=True, slots=True)
class RequestStats:
    completion_tokens: int
    verify_steps: int  # spec_verify_ct; 0 without speculation
    accepted_tokens: int  # bonus token not included

    @property
    def forward_passes(self) -> int:
        return 1 + self.verify_steps if self.verify_steps else self.completion_tokens

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> RequestStats:
        completion = int(meta.get("completion_tokens", 0))
        verify = int(meta.get("spec_verify_ct", 0) or 0)
        if "spec_num_correct_drafts" in meta:
            accepted = int(meta["spec_num_correct_drafts"])
        else:
            # prefill yields 1 token and every verify accepted+1 (bonus): solve for accepted.
            accepted = max(0, completion - 1 - verify) if verify else 0
        return cls(completion, verify, accepted)


@dataclass(frozen=True, slots=True)
class StepStats:
    step: int
    requests: int
    completion_tokens: int
    verify_steps: int
    accepted_tokens: int
    forward_passes: int  # summed over requests
    max_forward_passes: int  # the longest request's: bounds the step's decode length
    makespan_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.makespan_s if self.makespan_s > 0 else 0.0

    @property
    def accepted_per_verify(self) -> float:
        return self.accepted_tokens / self.verify_steps if self.verify_steps else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.completion_tokens / self.forward_passes if self.forward_passes else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in self.__slots__}
        d |= {
            "tokens_per_s": self.tokens_per_s,
            "accepted_per_verify": self.accepted_per_verify,
            "tokens_per_forward": self.tokens_per_forward,
        }
        return d

    @classmethod
    def aggregate(cls, step: int, reqs: Sequence[RequestStats], makespan_s: float) -> StepStats:
        return cls(
            step=step,
            requests=len(reqs),
            completion_tokens=sum(r.completion_tokens for r in reqs),
            verify_steps=sum(r.verify_steps for r in reqs),
            accepted_tokens=sum(r.accepted_tokens for r in reqs),
            forward_passes=sum(r.forward_passes for r in reqs),
            max_forward_passes=max((r.forward_passes for r in reqs), default=0),
            makespan_s=makespan_s,
        )


# ------------------------------------------------------------------ driving one step


@dataclass
class StepResult:
    records: list[RolloutRecord]
    stats: StepStats
    outputs: list[dict] = field(repr=False, default_factory=list)


def run_step(
    engine: Engine,
    prompts: Sequence[Prompt],
    n: int,
    step: int,
    sampling: Sampling,
    on_done: Callable[[], None] = lambda: None,
) -> StepResult:
    """Submit every prompt x ``n`` at once (the engine batches them), wait for all."""
    if n < 1:
        raise ValueError(f"invalid n={n!r}: must be >= 1")
    jobs = [(p, request_id(p.problem_id, step, k)) for p in prompts for k in range(n)]

    async def one(p: Prompt, rid: str) -> dict:
        out = await engine.async_generate(
            prompt=p.text, sampling_params=sampling.params(p.problem_id, step, rid), rid=rid
        )
        on_done()
        return out

    async def all_jobs() -> list[dict]:
        return await asyncio.gather(*(one(p, rid) for p, rid in jobs))

    start = time.perf_counter()
    outputs = engine.loop.run_until_complete(all_jobs())
    makespan = time.perf_counter() - start
    records = [
        RolloutRecord(p.text, out["text"], score(out["text"], p.answer), step, rid)
        for (p, rid), out in zip(jobs, outputs)
    ]
    stats = StepStats.aggregate(step, [RequestStats.from_meta(o.get("meta_info", {})) for o in outputs], makespan)
    return StepResult(records, stats, outputs)
