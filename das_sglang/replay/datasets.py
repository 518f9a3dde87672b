"""Recorded rollouts for trace replay: loaders for verl dumps, the bundled SkyThought series
and generic JSONL, all producing the same ``Rollout`` records.

Loading happens in two stages so errors name the place they come from: each loader reads
text records (``TextRollout``, which remember ``file:line``) and validates them; then
``tokenize_rollouts`` turns them into ``Rollout``s with token ids (cached, see
``core.tokenize``). Every malformed input raises ``ValueError`` naming the file, line and field.

A *group* is the set of rollouts of one problem (GRPO siblings share ``problem_id``); a
*step* is one training step, i.e. one rollout batch decoded together.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from das_sglang.core.tokenize import TextTokenizer

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
SKYTHOUGHT_DIR = DATA_DIR / "skythought_aime24"
VERL_SAMPLE = DATA_DIR / "verl_gsm8k_multiturn" / "2.jsonl.gz"

# The SkyThought eval harness's "Sky-T1" prompt (skythought/Qwen2.5-Math/evaluation/utils.py
# @ 6b8f472, PROMPT_TEMPLATES["Sky-T1"]); the dump stores only the question, and the prompt
# tokens matter because the request's own index (and SuffixDecoding's) matches against them.
SKY_T1_SYSTEM = (
    "Your role as an assistant involves thoroughly exploring questions through a systematic long "
    "thinking process before providing the final precise and accurate solutions. This requires "
    "engaging in a comprehensive cycle of analysis, summarizing, exploration, reassessment, reflection, "
    "backtracing, and iteration to develop well-considered thinking process. "
    "Please structure your response into two main sections: Thought and Solution. "
    "In the Thought section, detail your reasoning process using the specified format: "
    "<|begin_of_thought|> "
    "thought with steps separated with '\n\n' "
    "<|end_of_thought|> "
    "Each step should include detailed considerations such as analisying questions, summarizing "
    "relevant findings, brainstorming new ideas, verifying the accuracy of the current steps, refining "
    "any errors, and revisiting previous steps. "
    "In the Solution section, based on various attempts, explorations, and reflections from the Thought "
    "section, systematically present the final solution that you deem correct. The solution should "
    "remain a logical, accurate, concise expression style and detail necessary step needed to reach the "
    "conclusion, formatted as follows: "
    "<|begin_of_solution|> "
    "final formatted, precise, and clear solution "
    "<|end_of_solution|> "
    "Now, try to solve the following question through the above guidelines:"
)
SKY_T1_TEMPLATE = (
    "<|im_start|>system\n" + SKY_T1_SYSTEM + "<|im_end|>\n"
    "<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
)
SKYTHOUGHT_RUNS = {
    "long": "Sky-T1-math-correct-5K-32B-ckpts",
    "short": "Sky-T1-math-correct-5K-32B-short-ckpts",
}
SKYTHOUGHT_MAX_NEW_TOKENS = 32768  # the harness's max_tokens
# The recorded text is re-tokenised with the bundled BPE, which need not split it exactly as
# the generator did, so an output that hit the cap can come back a few hundred tokens short.
CAP_SLACK = 0.98


@dataclass(frozen=True)
class TextRollout:
    """One recorded rollout as text, with where it came from (for error messages)."""

    req_id: str
    problem_id: str
    step: int
    prompt: str
    response: str
    score: float | None
    source: str  # "file:line"
    capped: bool | None = None  # recorded: stopped by the length cap (None: not recorded)


@dataclass(frozen=True)
class Rollout:
    """One recorded rollout as token ids: the unit the replay decodes."""

    req_id: str
    problem_id: str
    step: int
    prompt_ids: np.ndarray  # int32
    response_ids: np.ndarray  # int32, what the target model produced (greedy / seeded)
    max_new_tokens: int
    hit_length_cap: bool  # stopped by max_new_tokens, not by EOS
    score: float | None = None

    @property
    def length(self) -> int:
        return len(self.response_ids)


# ---------------------------------------------------------------------------- file reading


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line; ValueError on anything else."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield lineno, obj
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ValueError(f"{path}: cannot read as (gzipped) UTF-8 JSONL: {e}") from None


def _jsonl_files(paths: Iterable[Path | str]) -> list[Path]:
    """Expand directories into their ``*.jsonl``/``*.jsonl.gz`` files (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.name.endswith((".jsonl", ".jsonl.gz")))
            if not found:
                raise ValueError(f"{p}: directory holds no .jsonl or .jsonl.gz files")
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise ValueError(f"{p}: no such file or directory")
    if not out:
        raise ValueError("no input files given")
    return out


def _field(obj: dict[str, Any], name: str, where: str, kinds: tuple[type, ...]) -> Any:
    if name not in obj:
        raise ValueError(f"{where}: missing field {name!r} (fields present: {sorted(obj)})")
    value = obj[name]
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        want = "/".join(k.__name__ for k in kinds)
        raise ValueError(f"{where}: field {name!r} must be {want}, got {type(value).__name__}")
    return value


def _score(value: Any) -> float | None:
    if isinstance(value, list):  # SkyThought stores [True]
        value = value[0] if value else None
    if isinstance(value, (bool, int, float)):
        return float(value)
    return None


# ``finish_reason`` values that mean "stopped by the generation cap" (OpenAI / vLLM / SGLang
# use "length"; others name the token limit). Any other string means the model stopped.
CAP_REASONS = frozenset({"length", "max_tokens", "max_length", "max_new_tokens", "truncated"})
CAPPED_FIELD = "finish_reason"  # read when present unless another field is named


def _capped(obj: dict[str, Any], name: str | None, where: str, k: int, n: int, required: bool) -> bool | None:
    """Response ``k`` (of ``n``) hit the length cap? From a bool or a finish-reason string, or
    a list of those (one per response); None when the record does not say."""
    if name is None:
        return None
    if name not in obj:
        if required:
            raise ValueError(f"{where}: missing field {name!r} (fields present: {sorted(obj)})")
        return None
    value = obj[name]
    label = repr(name)
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"{where}: field {name!r} holds {len(value)} values for {n} responses")
        value, label = value[k], f"{name!r}[{k}]"
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.strip().lower() in CAP_REASONS
    raise ValueError(f"{where}: field {label} must be a finish reason (str) or bool, "
                     f"got {type(value).__name__} {value!r}")


def prompt_key(prompt: str) -> str:
    """A stable problem id for a prompt text: how `das replay` groups verl dumps, and what
    `das rollout` / ``das_sglang.tag`` use, so live rollouts and replays name problems alike."""
    return "p" + hashlib.sha1(prompt.encode()).hexdigest()[:12]


def _step_from_name(path: Path) -> int | None:
    m = re.match(r"(\d+)", path.name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------- loaders


def load_verl(paths: Sequence[Path | str]) -> list[TextRollout]:
    """verl ``trainer.rollout_data_dir`` dumps: one ``{step}.jsonl`` per step with fields
    ``input, output, score, step, request_id``; rollouts with identical ``input`` form a group.
    ``step`` falls back to the file name's number, ``request_id`` to ``file:line``."""
    out: list[TextRollout] = []
    for path in _jsonl_files(paths):
        file_step = _step_from_name(path)
        for lineno, obj in read_jsonl(path):
            where = f"{path}:{lineno}"
            prompt = _field(obj, "input", where, (str,))
            response = _field(obj, "output", where, (str,))
            if "step" in obj:
                step = _field(obj, "step", where, (int,))
            elif file_step is not None:
                step = file_step
            else:
                raise ValueError(f"{where}: missing field 'step' and file name has no step number")
            rid = obj.get("request_id") or where
            out.append(_text_rollout(str(rid), prompt_key(prompt), step, prompt, response,
                                     _score(obj.get("score")), where, "output",
                                     _capped(obj, CAPPED_FIELD, where, 0, 1, False)))
    return _checked(out, "verl dump")


def load_jsonl(
    paths: Sequence[Path | str],
    prompt_field: str = "prompt",
    response_field: str = "response",
    group_field: str | None = None,
    step_field: str | None = None,
    score_field: str | None = "score",
    capped_field: str | None = None,
) -> list[TextRollout]:
    """Generic JSONL: one object per line. The response field may hold one string or a list of
    strings (n samples of the prompt). Groups default to identical prompts, steps to 0.

    Which responses hit the length cap: ``capped_field`` (every record must have it), else
    ``finish_reason`` where a record has one: a bool, or a finish reason ("length" and the
    other ``CAP_REASONS`` = capped, any other string = stopped), or a list of those, one per
    response. Records without it leave the decision to ``tokenize_rollouts``."""
    out: list[TextRollout] = []
    for path in _jsonl_files(paths):
        for lineno, obj in read_jsonl(path):
            where = f"{path}:{lineno}"
            prompt = _field(obj, prompt_field, where, (str,))
            responses = _field(obj, response_field, where, (str, list))
            if isinstance(responses, str):
                responses = [responses]
            if not responses:
                raise ValueError(f"{where}: field {response_field!r} is an empty list")
            group = _group(obj, group_field, where) if group_field else prompt_key(prompt)
            step = _field(obj, step_field, where, (int,)) if step_field else 0
            score = _score(obj.get(score_field)) if score_field else None
            for k, resp in enumerate(responses):
                if not isinstance(resp, str):
                    raise ValueError(f"{where}: field {response_field!r}[{k}] must be str, got {type(resp).__name__}")
                rid = f"{path.name}:{lineno}" + (f":{k}" if len(responses) > 1 else "")
                capped = _capped(obj, capped_field or CAPPED_FIELD, where, k, len(responses),
                                 required=capped_field is not None)
                out.append(_text_rollout(rid, group, step, prompt, resp, score, where, response_field, capped))
    return _checked(out, "JSONL input")


def load_skythought(run: str = "long", data_dir: Path | str = SKYTHOUGHT_DIR) -> list[TextRollout]:
    """The bundled SkyThought AIME24 series: checkpoint ``k``-th in numeric order = step ``k``;
    problem = ``idx``; prompt = the question in the Sky-T1 template; one greedy sample each."""
    if run not in SKYTHOUGHT_RUNS:
        raise ValueError(f"unknown SkyThought run {run!r}: choose one of {sorted(SKYTHOUGHT_RUNS)}")
    prefix = SKYTHOUGHT_RUNS[run] + "__checkpoint-"
    files = sorted(Path(data_dir).glob(prefix + "*.jsonl.gz"), key=lambda p: _checkpoint(p, prefix))
    if not files:
        raise ValueError(f"{data_dir}: no SkyThought files named {prefix}*.jsonl.gz")
    out: list[TextRollout] = []
    for step, path in enumerate(files):
        ckpt = _checkpoint(path, prefix)
        for lineno, obj in read_jsonl(path):
            where = f"{path}:{lineno}"
            idx = _field(obj, "idx", where, (str, int))
            question = _field(obj, "question", where, (str,))
            code = _field(obj, "code", where, (list,))
            if not code or not isinstance(code[0], str):
                raise ValueError(f"{where}: field 'code' must be a non-empty list of str")
            pid = f"aime24-{idx}"
            out.append(_text_rollout(f"{pid}@ckpt{ckpt}", pid, step, SKY_T1_TEMPLATE.format(question=question),
                                     code[0], _score(obj.get("score")), where, "code"))
    return _checked(out, f"SkyThought {run}")


def _checkpoint(path: Path, prefix: str) -> int:
    return int(path.name[len(prefix):].split("__", 1)[0])


def _group(obj: dict[str, Any], name: str, where: str) -> str:
    value = _field(obj, name, where, (str, int))
    if isinstance(value, str) and not value.strip():
        raise ValueError(f"{where}: field {name!r} is empty (a rollout needs a group)")
    return str(value)


def _text_rollout(rid: str, pid: str, step: int, prompt: str, response: str, score: float | None,
                  where: str, response_field: str, capped: bool | None = None) -> TextRollout:
    if step < 0:
        raise ValueError(f"{where}: step={step} must be >= 0")
    if not response:
        raise ValueError(f"{where}: field {response_field!r} is empty (nothing to replay)")
    return TextRollout(rid, pid, step, prompt, response, score, where, capped)


def _checked(rollouts: list[TextRollout], what: str) -> list[TextRollout]:
    if not rollouts:
        raise ValueError(f"{what}: no rollouts found (empty files?)")
    seen: dict[str, str] = {}
    for r in rollouts:
        if r.req_id in seen:
            raise ValueError(f"{r.source}: duplicate request id {r.req_id!r} (first at {seen[r.req_id]})")
        seen[r.req_id] = r.source
    return rollouts


def write_generic_jsonl(rollouts: Sequence[TextRollout | Rollout], path: Path | str,
                        capped: Sequence[bool | None] | None = None) -> Path:
    """Write rollouts in the generic JSONL format ``load_jsonl`` reads (fields ``prompt``,
    ``response``, ``group``, ``step``, ``finish_reason`` = "length" when capped, "stop" when
    not, omitted when unknown; ``score`` when known): how the bundled datasets are handed to
    `das replay --dataset jsonl` (``--group-field group --step-field step``). Text rollouts
    only (``Rollout`` token ids are not text); ``capped`` overrides their recorded flags."""
    path = Path(path)
    lines = []
    for i, r in enumerate(rollouts):
        if not isinstance(r, TextRollout):
            raise ValueError(f"write_generic_jsonl: rollout {i} is a {type(r).__name__}, not a TextRollout")
        flag = r.capped if capped is None else capped[i]
        obj: dict[str, Any] = {"prompt": r.prompt, "response": r.response, "group": r.problem_id, "step": r.step}
        if flag is not None:
            obj["finish_reason"] = "length" if flag else "stop"
        if r.score is not None:
            obj["score"] = r.score
        lines.append(json.dumps(obj))
    text = "".join(line + "\n" for line in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


# ---------------------------------------------------------------------------- tokenising


def tokenize_rollouts(
    texts: Sequence[TextRollout],
    tokenizer: TextTokenizer,
    max_new_tokens: int | None = None,
    use_cache: bool = True,
) -> list[Rollout]:
    """Token ids for every rollout.

    Which rollouts hit the length cap (``hit_length_cap``): what the record says
    (``TextRollout.capped``, e.g. from ``finish_reason``) wherever it says something; else,
    when ``max_new_tokens`` is given, a response at least ``CAP_SLACK * max_new_tokens`` long
    is taken to have been cut by the cap rather than ended by EOS; else not capped.
    ``max_new_tokens`` (the cap the policy plans with) is inferred when absent: the longest
    recorded-capped response if any (those stopped *at* the cap), else the longest response
    (see ``infer_max_new_tokens``)."""
    prompts = tokenizer.encode_many([t.prompt for t in texts], use_cache)
    responses = tokenizer.encode_many([t.response for t in texts], use_cache)
    longest = max(len(r) for r in responses)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    cap = max_new_tokens or infer_max_new_tokens(texts, responses)[0]
    limit = max(cap, longest)  # never let a recorded response exceed its own budget
    return [
        Rollout(t.req_id, t.problem_id, t.step, p, r, limit,
                t.capped if t.capped is not None
                else max_new_tokens is not None and len(r) >= CAP_SLACK * cap, t.score)
        for t, p, r in zip(texts, prompts, responses)
    ]


def infer_max_new_tokens(texts: Sequence[TextRollout], responses: Sequence[np.ndarray]) -> tuple[int, str]:
    """(cap, how it was found) when no ``max_new_tokens`` is given: the longest response the
    records mark as capped (the cap itself, up to re-tokenisation), else the longest response."""
    capped = [len(r) for t, r in zip(texts, responses) if t.capped]
    if capped:
        return max(capped), "longest response marked capped"
    return max(len(r) for r in responses), "longest response (no capped response recorded)"


# ---------------------------------------------------------------------------- selection


def problem_ids(rollouts: Sequence[Rollout | TextRollout]) -> list[str]:
    """Problem ids in order of first appearance (deterministic, input order)."""
    return list(dict.fromkeys(r.problem_id for r in rollouts))


def steps_of(rollouts: Sequence[Rollout | TextRollout]) -> list[int]:
    return sorted({r.step for r in rollouts})


def select(
    rollouts: Sequence[Rollout],
    problems: int | None = None,
    exclude_capped: bool = False,
) -> list[Rollout]:
    """The first ``problems`` problems (input order), optionally without capped rollouts.
    Excluded capped rollouts vanish entirely: neither decoded nor used as history."""
    if problems is not None:
        if problems < 1:
            raise ValueError(f"problems={problems} must be >= 1")
        keep = set(problem_ids(rollouts)[:problems])
        rollouts = [r for r in rollouts if r.problem_id in keep]
    if exclude_capped:
        rollouts = [r for r in rollouts if not r.hit_length_cap]
    return list(rollouts)
