"""`das rollout`: offline RL rollouts with DAS on a stock SGLang engine.

Each step generates ``n`` samples of every prompt, tagged with its problem id and the step,
and writes them as verl's ``rollout_data_dir`` (``OUT/<step>.jsonl``); the drafter's history
carries from step to step (and across runs with ``--history``). ``--compare none`` reruns
the same steps without speculation and reports the ratio.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from das_sglang.api import TINY_MODEL
from das_sglang.core.records import write_step
from das_sglang.core.snapshot import SnapshotError, load_history
from das_sglang.rollout import Engine, Prompt, Sampling, StepStats, read_prompts, run_step

COMPARE_DIR = "compare-none"
SUMMARY_FILE = "summary.json"


class Compare(str, Enum):
    none = "none"


@dataclass(frozen=True, slots=True)
class EngineSpec:
    model: str
    history: Path | None = None
    strict_history: bool = False
    seed: int | None = None
    requests_per_step: int | None = None  # snapshot once per step (see _with_engine)
    engines: int = 1  # > 1: launch that many engines behind the SMG router (das_sglang.cluster)
    router: str | None = None  # URL of a running router (a cluster started elsewhere)
    shard_dir: Path | None = None  # the cluster's shared history shards


def make_engine(spec: EngineSpec, speculative: bool) -> Engine:
    """A started SGLang engine (the seam the CLI tests replace with a stand-in)."""
    from das_sglang import api

    if speculative and (spec.router or spec.engines > 1):
        return _cluster_engine(spec)

    # SGLang's CPU-only import warnings (AWQ, GGUF, Triton) would bury the progress bars;
    # the env var silences them in the engine's spawned processes too.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    warnings.filterwarnings("ignore", category=UserWarning)
    return api.rollout_engine(spec.model, speculative=speculative, history_dir=spec.history,
                              strict_history=spec.strict_history, seed=spec.seed,
                              snapshot_interval=spec.requests_per_step if spec.history else None)


def _cluster_engine(spec: EngineSpec) -> Engine:
    """Requests go through the SMG router with the problem id as routing key; the
    engine's ``engine_stats()`` reports each engine's DAS stats."""
    from das_sglang import cluster
    from das_sglang.router_client import RouterEngine

    if spec.router:
        engine = RouterEngine(spec.router)
        engine.engine_stats = lambda: _router_stats(spec.router, spec.shard_dir)
        return engine
    shard_dir = spec.shard_dir
    assert shard_dir is not None
    c = cluster.start_cluster(spec.model, spec.engines, shard_dir=shard_dir, port=_free_port_base(),
                              log_dir=shard_dir / "logs")
    engine = RouterEngine(c.url, on_shutdown=c.stop)
    engine.engine_stats = lambda: _settled_stats(c)
    return engine


def _settled_stats(c) -> dict:
    """The engines' stats once their shard writers are idle (they write asynchronously)."""
    import time

    stats = c.engine_stats()
    for _ in range(50):
        if stats and all(s.get("shard_pending", 0) == 0 for s in stats.values()):
            break
        time.sleep(0.1)
        stats = c.engine_stats()
    return stats


def _free_port_base() -> int:
    import socket

    with socket.socket() as s:  # a free port; the engines take the next ones
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1] % 20000 + 30000


def _router_stats(router: str, shard_dir: Path | None) -> dict:
    from das_sglang import cluster
    from das_sglang.core.shards import read_engine_stats

    if shard_dir is not None:
        return read_engine_stats(shard_dir)
    workers = cluster.http_json(router.rstrip("/") + "/workers").get("workers", [])
    return cluster.metrics_by_engine([w["url"] for w in workers])


def _engine_table(stats: dict) -> Table:
    table = Table(title="DAS per engine", caption="acc rate = accepted / proposed draft tokens; "
                  "lazy = problems looked up in the shards (hits found history)")
    for col in ("engine", "problems", "hist tokens", "reqs", "acc rate", "lazy hits/lookups", "shard writes"):
        table.add_column(col, justify="right", no_wrap=True)
    for name, st in sorted(stats.items()):
        proposed = st.get("draft_tokens_proposed", 0)
        acc = f"{st.get('draft_tokens_accepted', 0) / proposed:.2f}" if proposed else "-"
        table.add_row(name, f"{st.get('problems_held', 0):.0f}", f"{st.get('history_tokens', 0):.0f}",
                      f"{st.get('requests_finished', 0):.0f}", acc,
                      f"{st.get('lazy_load_hits', 0):.0f}/{st.get('lazy_loads', 0):.0f}",
                      f"{st.get('shard_writes', 0):.0f}")
    return table


def _validate(n: int, steps: int, start_step: int, prompts: Path, out: Path, history: Path | None) -> None:
    if n < 1:
        raise ValueError(f"invalid --n {n}: must be >= 1")
    if steps < 1:
        raise ValueError(f"invalid --steps {steps}: must be >= 1")
    if start_step < 0:
        raise ValueError(f"invalid --start-step {start_step}: must be >= 0")
    if not prompts.is_file():
        raise ValueError(f"--prompts {prompts}: no such file")
    for flag, d in (("--out", out), ("--history", history)):
        if d is not None and d.exists() and not d.is_dir():
            raise ValueError(f"{flag} {d}: exists and is not a directory")


def _check_history(history: Path, strict: bool) -> None:
    """Read the snapshot here too, so a bad one is reported by name before an engine
    starts: an error with ``--strict-history``, else a warning (the worker then starts
    with empty history and its next save replaces the bad file)."""
    try:
        load_history(history)
    except FileNotFoundError:
        return  # first run: the worker creates it
    except SnapshotError as e:
        if strict:
            raise
        typer.echo(f"warning: {e}; starting with empty history", err=True)


def _run_steps(
    console: Console,
    engine: Engine,
    prompts: list[Prompt],
    n: int,
    steps: range,
    sampling: Sampling,
    out: Path,
    label: str,
) -> list[StepStats]:
    stats = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        for step in steps:
            task = progress.add_task(f"{label} step {step}", total=len(prompts) * n)
            result = run_step(engine, prompts, n, step, sampling, on_done=lambda: progress.advance(task))
            write_step(out, step, result.records)
            stats.append(result.stats)
    return stats


def _with_engine(spec: EngineSpec, speculative: bool, body: Callable[[Engine], list[StepStats]],
                 engine_stats: dict | None = None) -> list[StepStats]:
    engine = make_engine(spec, speculative)
    try:
        stats = body(engine)
        # The DAS worker saves history when a step's last request finishes, inside the
        # scheduler loop; a round trip through that loop waits for the save to end
        # before shutdown SIGKILLs the scheduler.
        engine.get_server_info()
        if engine_stats is not None and hasattr(engine, "engine_stats"):
            engine_stats.update(engine.engine_stats())  # many engines: each one's DAS stats
        return stats
    finally:
        engine.shutdown()


def attention_path(model: str, speculative: bool) -> str:
    """Which attention code a run's forwards go through. In CPU development mode the DAS
    verify forward is das-sglang's tree-mask attention and the plain decode is SGLang's
    torch_native decode: two different code paths, so their wall-clock times are not a
    measure of speculation. On a GPU both runs use the engine's one backend."""
    from das_sglang.sglang import cpu

    if model == TINY_MODEL or cpu.requested():
        return "cpu: das tree-mask SDPA (verify)" if speculative else "cpu: torch_native decode"
    return "engine default"


def _table(das: list[StepStats], base: list[StepStats] | None, wall_clock: bool = True) -> Table:
    table = Table(title="das rollout", caption=_CAPTION if wall_clock else _CAPTION_NO_WALL_CLOCK)
    for col in ("step", "engine", "reqs", "tokens", "time s", "tok/s", "acc/verify", "fwd", "tok/fwd"):
        table.add_column(col, justify="right", no_wrap=True)
    for i, s in enumerate(das):
        table.add_row(*_row(s, "das"))
        if base:
            b = base[i]
            table.add_row(*_row(b, "none"))
            table.add_row(
                str(s.step), "das/none", "", "",
                _ratio(s.makespan_s, b.makespan_s) if wall_clock else "n/a",
                _ratio(s.tokens_per_s, b.tokens_per_s) if wall_clock else "n/a", "",
                _ratio(s.forward_passes, b.forward_passes),
                _ratio(s.tokens_per_forward, b.tokens_per_forward),
                end_section=True,
            )
    return table


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


_CAPTION = (
    "time = step makespan; acc/verify = accepted draft tokens per verify step (no bonus); "
    "fwd = forward passes summed over requests; das/none rows: ratios"
)
_CAPTION_NO_WALL_CLOCK = (
    _CAPTION + "; time and tok/s ratios n/a: the two runs used different attention paths"
)


def _row(s: StepStats, engine: str) -> list[str]:
    return [
        str(s.step), engine, str(s.requests), str(s.completion_tokens), f"{s.makespan_s:.2f}",
        f"{s.tokens_per_s:.1f}", f"{s.accepted_per_verify:.2f}" if s.verify_steps else "-",
        str(s.forward_passes), f"{s.tokens_per_forward:.2f}",
    ]


def rollout(
    model: Annotated[str, typer.Option(help=f"Model path or HF id; '{TINY_MODEL}' builds the tiny CPU test model.")],
    prompts: Annotated[Path, typer.Option(help="JSONL, one object per line: prompt (or input), optional problem_id (or id) and answer.")],
    out: Annotated[Path, typer.Option(help="Output dir: <step>.jsonl per step (verl rollout_data_dir) + summary.json.")],
    n: Annotated[int, typer.Option(help="Samples per prompt per step (GRPO group size).")] = 16,
    steps: Annotated[int, typer.Option(help="Number of steps K.")] = 2,
    start_step: Annotated[int, typer.Option(help="Number of the first step.")] = 0,
    compare: Annotated[Optional[Compare], typer.Option(help="Also run without speculation and report the ratio.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens generated per sample.")] = 256,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Base of the per-request sampling seeds.")] = 0,
    history: Annotated[Optional[Path], typer.Option(help="Snapshot dir: DAS history is loaded from and saved to it.")] = None,
    strict_history: Annotated[bool, typer.Option(help="Fail on an unusable --history snapshot instead of starting empty.")] = False,
    engines: Annotated[int, typer.Option(help="Engines to launch behind the SMG router (scale-out; problem id = routing key).")] = 1,
    router: Annotated[Optional[str], typer.Option(help="URL of a running SMG router in front of DAS engines (launch/scaleout.md).")] = None,
    shard_dir: Annotated[Optional[Path], typer.Option(help="Shared history shard dir of the engines (default with --engines: OUT/shards).")] = None,
) -> None:
    """Generate N samples of every prompt for K steps with DAS speculative decoding."""
    console = Console(stderr=True)
    try:
        _validate(n, steps, start_step, prompts, out, history)
        if engines < 1:
            raise ValueError(f"invalid --engines {engines}: must be >= 1")
        if router and engines > 1:
            raise ValueError("--router and --engines > 1 both given: use a running router or launch engines, not both")
        if (router or engines > 1) and history is not None:
            raise ValueError("--history is per engine; with several engines history lives in --shard-dir")
        if engines > 1 and shard_dir is None:
            shard_dir = out / "shards"
        sampling = Sampling(max_new_tokens, temperature, seed)
        prompt_list = read_prompts(prompts)
        if history is not None:
            _check_history(history, strict_history)
        step_range = range(start_step, start_step + steps)
        spec = EngineSpec(model, history, strict_history, seed, requests_per_step=len(prompt_list) * n,
                          engines=engines, router=router, shard_dir=shard_dir)
        per_engine: dict = {}
        das = _with_engine(
            spec, True,
            lambda eng: _run_steps(console, eng, prompt_list, n, step_range, sampling, out, "das"),
            per_engine,
        )
        base = None
        paths = {"das": attention_path(model, True)}
        if compare is Compare.none:
            base = _with_engine(
                EngineSpec(model, seed=seed), False,
                lambda eng: _run_steps(console, eng, prompt_list, n, step_range, sampling, out / COMPARE_DIR, "none"),
            )
            paths["none"] = attention_path(model, False)
    except ValueError as e:  # bad input anywhere (flags, prompts, model, snapshot): no traceback
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except RuntimeError as e:  # SGLang's "scheduler died during initialization" and kin
        typer.echo(f"error: SGLang engine failed: {e} (its log above names the cause)", err=True)
        raise typer.Exit(1) from None
    except ModuleNotFoundError as e:  # torchvision / sgl_kernel / vllm: a CPU-only machine
        typer.echo(f"error: SGLang could not import {e.name!r}; on a machine without a CUDA GPU "
                   f"run with DAS_SGLANG_CPU=1 (CPU development mode, docs/sglang.md)", err=True)
        raise typer.Exit(1) from None
    comparable = base is not None and paths["das"] == paths["none"]
    summary = {"das": [s.as_dict() for s in das], "none": [s.as_dict() for s in base] if base else None,
               "attention": paths, "wall_clock_comparable": comparable if base is not None else None}
    if per_engine:
        summary["engines"] = per_engine
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    Console().print(_table(das, base, wall_clock=comparable))
    if per_engine:
        Console().print(_engine_table(per_engine))
    if base is not None and not comparable:
        typer.echo(f"note: no wall-clock ratios: the runs used different attention paths (das: "
                   f"{paths['das']}; none: {paths['none']}), so their times say nothing about "
                   "speculation; compare forward passes (fwd) and tokens per forward instead",
                   err=True)
