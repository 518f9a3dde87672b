"""Rollout records in verl's ``trainer.rollout_data_dir`` format (the writer).

verl dumps every training step as ``<dir>/<step>.jsonl``, one JSON object per generated
sample with the fields ``input`` (prompt text), ``output`` (response text), ``score``
(reward), ``step`` and ``request_id``. `das rollout` writes the same layout so its output
feeds anything that reads verl dumps (including `das replay`); the reader lives in
`das_sglang.replay.datasets`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from das_sglang.core.atomic import atomic_file


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    """One generated sample. ``score`` is None when no reward was computed."""

    input: str
    output: str
    score: float | None
    step: int
    request_id: str

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"invalid step={self.step!r}: must be an int >= 0")
        if not self.request_id:
            raise ValueError(f"invalid request_id={self.request_id!r}: must be a non-empty string")


def step_file(out_dir: str | os.PathLike[str], step: int) -> Path:
    """verl names each step's dump by the bare step number."""
    return Path(out_dir) / f"{step}.jsonl"


def write_step(out_dir: str | os.PathLike[str], step: int, records: Iterable[RolloutRecord]) -> Path:
    """Write one step's records to ``<out_dir>/<step>.jsonl`` atomically.

    A crash mid-write never leaves a torn step file that a later replay would half-read.
    Raises ValueError when a record's step differs from ``step``.
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for rec in records:
        if rec.step != step:
            raise ValueError(f"record {rec.request_id!r} has step={rec.step}, writing step {step}")
        lines.append(json.dumps(asdict(rec), ensure_ascii=False))
    target = step_file(directory, step)
    with atomic_file(target, binary=False, tmp_prefix=f".{step}-") as f:
        f.write("".join(line + "\n" for line in lines))
    return target
