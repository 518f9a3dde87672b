"""`das replay`: replay recorded rollouts under no speculation, SuffixDecoding, DAS and its
ablations, and report accepted tokens per step, forward passes and modelled makespan.

With no arguments it replays the bundled SkyThought long-trace series (see ``DATASETS`` for
the default subset, chosen so the run takes minutes on two CPU cores), once with and once
without the outputs that hit the 32k length cap.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from das_sglang.cli.options import CacheDir, CostPreset, JsonOut, PlotsDir, TokenizerPath, fail
from das_sglang.core.cost_model import CostModel, CostTable
from das_sglang.core.tokenize import TextTokenizer
from das_sglang.replay import datasets as ds
from das_sglang.replay.contenders import (
    CONTENDER_HELP, CONTENDER_NAMES, DEFAULT_CONTENDERS, build_contenders,
)
from das_sglang.replay.report import TABLE_HEADER, run_summary, table_rows
from das_sglang.replay.simulator import DEFAULT_GRAPHS, ENGINES, GRAPHS, replay as run_replay


class Dataset(str, Enum):
    skythought = "skythought"
    skythought_short = "skythought-short"
    verl = "verl"
    jsonl = "jsonl"


class Capped(str, Enum):
    both = "both"  # two runs: all outputs, then without the capped ones
    include = "include"
    exclude = "exclude"


@dataclass(frozen=True)
class DatasetDefaults:
    """What `das replay --dataset X` does when no other flag is given."""

    steps: str  # see parse_steps
    problems: Optional[int]
    cost_preset: str
    max_new_tokens: Optional[int]


DATASETS = {
    # 10 of 30 AIME problems (the first ten: easy and hard ones, capped and uncapped, no
    # cherry-picking); steps 0-7 feed history, the last 3 checkpoints (8-10) are decoded.
    # The generator is a 32B model, hence the 32B cost preset.
    Dataset.skythought: DatasetDefaults("8-10", 10, "h100-32b", ds.SKYTHOUGHT_MAX_NEW_TOKENS),
    Dataset.skythought_short: DatasetDefaults("8-10", None, "h100-32b", ds.SKYTHOUGHT_MAX_NEW_TOKENS),
    Dataset.verl: DatasetDefaults("all", None, "h100-7b", None),
    Dataset.jsonl: DatasetDefaults("all", None, "h100-7b", None),
}


def parse_steps(spec: str, present: list[int]) -> list[int]:
    """``all``, ``last:N``, or a comma list of steps and ``A-B`` ranges (inclusive)."""
    spec = spec.strip()
    if spec == "all":
        return present
    if spec.startswith("last:"):
        n = _int(spec[5:], spec)
        if n < 1:
            raise ValueError(f"--steps {spec!r}: N must be >= 1")
        return present[-n:]
    out: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        a = _int(lo, spec)
        b = _int(hi, spec) if hi else a
        if b < a:
            raise ValueError(f"--steps {spec!r}: range {part!r} is empty")
        out.update(range(a, b + 1))
    missing = sorted(out - set(present))
    if missing:
        raise ValueError(f"--steps {spec!r}: steps {missing} are not in the data (present: {present})")
    return sorted(out)


def _int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--steps {spec!r}: {text!r} is not a step number "
                         "(use all, last:N, or e.g. 3,5-7)") from None


def load_texts(dataset: Dataset, inputs: list[Path], fields: dict[str, Optional[str]]) -> list[ds.TextRollout]:
    if dataset in (Dataset.skythought, Dataset.skythought_short):
        if inputs:
            raise ValueError(f"--input is not used with --dataset {dataset.value} (bundled data)")
        return ds.load_skythought("long" if dataset is Dataset.skythought else "short")
    if dataset is Dataset.verl:
        return ds.load_verl(inputs or [ds.VERL_SAMPLE])  # default: the bundled one-step dump
    if not inputs:
        raise ValueError(f"--dataset {dataset.value} needs --input PATH (file or directory)")
    return ds.load_jsonl(inputs, fields["prompt"], fields["response"], fields["group"], fields["step"],
                         capped_field=fields.get("capped"))


def replay(
    dataset: Annotated[Dataset, typer.Option(help="Which rollouts to replay.")] = Dataset.skythought,
    input: Annotated[Optional[list[Path]], typer.Option(
        "--input", help="verl dump dir/files (default: the bundled GSM8K dump) or JSONL files.")] = None,
    prompt_field: Annotated[str, typer.Option(help="JSONL: prompt text field.")] = "prompt",
    response_field: Annotated[str, typer.Option(
        help="JSONL: response field (a string or list of strings).")] = "response",
    group_field: Annotated[Optional[str], typer.Option(
        help="JSONL: problem/group field (default: same prompt).")] = None,
    step_field: Annotated[Optional[str], typer.Option(
        help="JSONL: training-step field (default: all step 0).")] = None,
    capped_field: Annotated[Optional[str], typer.Option(
        help="JSONL: field saying a response hit the length cap: a bool or a finish reason "
             f"({'/'.join(sorted(ds.CAP_REASONS))} = capped), or a list of those, one per response "
             f"(default: {ds.CAPPED_FIELD!r} where present).")] = None,
    steps: Annotated[Optional[str], typer.Option(help="Steps to decode: all, last:N, or e.g. 7-10; "
                                                      "earlier steps only feed history.")] = None,
    problems: Annotated[Optional[int], typer.Option(help="Replay only the first N problems.")] = None,
    all_problems: Annotated[bool, typer.Option("--all-problems", help="Ignore the dataset's default subset.")] = False,
    capped: Annotated[Capped, typer.Option(
        help="Outputs that hit the length cap: both (two runs), include, exclude.")] = Capped.both,
    exclude_capped: Annotated[bool, typer.Option("--exclude-capped", help="Same as --capped exclude.")] = False,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        help="Generation cap (flags outputs without a recorded finish reason that reach it); default: the "
             "dataset's, else inferred from the data (the longest output marked capped, else the longest).")] = None,
    policies: Annotated[str, typer.Option(
        help=f"Comma list from: {', '.join(CONTENDER_NAMES)}; or all (each one is described below).")
    ] = ",".join(DEFAULT_CONTENDERS),
    engine: Annotated[str, typer.Option(
        help="ragged: per-request budgets, each request verifies only its own drafts (the "
             "SGLang worker on FlashInfer / CPU torch_native); uniform: one batch width, rows "
             "padded to it (other backends); ragged-width: the batch-width budgets verified "
             "ragged.")] = "ragged",
    cost_preset: CostPreset = None,
    score: Annotated[str, typer.Option(
        help="What forwards are charged with: table (the roofline cost table of the preset's "
             "GPU and model: nonlinear, CUDA-graph tiers; docs/cost_model.md), linear (the "
             "preset the policies plan with), or a CSV batch,tokens_per_request,cuda_graph,ms "
             "(e.g. a GPU run's timings).")] = "table",
    host_time: Annotated[bool, typer.Option(
        "--host-time/--no-host-time", help="Add each decode step's measured host time "
                                           "(drafter + policy + feedback) to its modeled cost.")] = True,
    graphs: Annotated[str, typer.Option(
        help="Which verify forwards a cost table charges as CUDA graphs: stock (SGLang 0.5.23: "
             "only a batch verifying exactly the captured width, max budget + 1 tokens; every "
             "other verify, ragged or a step without drafts, eager) or buckets (a graph at "
             "every bucket width and ragged token count).")] = DEFAULT_GRAPHS,
    tokenizer: TokenizerPath = None,
    cache_dir: CacheDir = None,
    json_out: JsonOut = None,
    plots: PlotsDir = None,
) -> None:
    """Replay recorded rollouts: DAS vs no speculation vs SuffixDecoding (and ablations)."""
    console = Console(stderr=True)
    try:
        defaults = DATASETS[dataset]
        if engine not in ENGINES:
            raise ValueError(f"--engine {engine!r}: choose one of {list(ENGINES)}")
        if graphs not in GRAPHS:
            raise ValueError(f"--graphs {graphs!r}: choose one of {list(GRAPHS)}")
        cost = CostModel.preset(cost_preset or defaults.cost_preset)
        scorer = _scorer(score, cost)
        names = list(CONTENDER_NAMES) if policies.strip() == "all" else [
            n.strip() for n in policies.split(",") if n.strip()]
        contenders = build_contenders(names, cost, engine)  # validates the names early
        fields = {"prompt": prompt_field, "response": response_field, "group": group_field, "step": step_field,
                  "capped": capped_field}
        if capped_field is not None and dataset is not Dataset.jsonl:
            raise ValueError(f"--capped-field is only read with --dataset jsonl (not {dataset.value})")
        texts = load_texts(dataset, input or [], fields)
        tok = TextTokenizer(tokenizer, cache_dir)
        with console.status("tokenising (cached after the first run)"):
            cap = max_new_tokens or defaults.max_new_tokens
            rollouts = ds.tokenize_rollouts(texts, tok, cap)
        cap_note = _cap_note(texts, rollouts, max_new_tokens, defaults.max_new_tokens)
        n_problems = None if all_problems else (problems if problems is not None else defaults.problems)
        decode = parse_steps(steps or defaults.steps, ds.steps_of(rollouts))
        variants = _variants(Capped.exclude if exclude_capped else capped)
        runs = []
        for label, excl in variants:
            if excl and len(variants) > 1 and not any(r.hit_length_cap for r in rollouts):
                console.print("no output hit the length cap: the second run would repeat the first")
                continue
            selected = ds.select(rollouts, n_problems, exclude_capped=excl)
            present = [s for s in decode if any(r.step == s for r in selected)]
            if not present:
                raise ValueError(f"no rollouts left in steps {decode} ({label})")
            if not runs:
                console.print(f"max_new_tokens {rollouts[0].max_new_tokens}: {cap_note}")
            info = _info(dataset, label, selected, present, cost, engine)
            info["max_new_tokens"] = rollouts[0].max_new_tokens
            info["max_new_tokens_source"] = cap_note
            info["scored_with"] = scorer.name if scorer is not None else f"linear:{cost.name}"
            info["host_time"] = host_time
            info["graphs"] = graphs if scorer is not None else None  # (the linear model has no graph tiers)
            results = _run(console, selected, build_contenders(names, cost, engine), cost, engine, present,
                           label, scorer, host_time, graphs)
            runs.append((run_summary(results, info), results))
    except ValueError as e:
        raise fail(str(e)) from None
    _print_tables(runs)
    if json_out is not None:
        _write_json(json_out, runs)
        console.print(f"wrote {json_out}")
    if plots is not None:
        from das_sglang.cli.replay_plots import write_plots

        for path in write_plots(plots, runs):
            console.print(f"wrote {path}")


replay.__doc__ = (replay.__doc__ or "") + "\n\nPolicies (--policies; default " + ", ".join(DEFAULT_CONTENDERS) + "):\n\n" + "\n\n".join(
    f"{name}: {CONTENDER_HELP[name]}" for name in CONTENDER_NAMES)


def _cap_note(texts, rollouts, flag: Optional[int], default: Optional[int]) -> str:
    """Where the generation cap came from, and how capped outputs were told apart."""
    recorded = sum(t.capped is not None for t in texts)
    how = (f"capped outputs from the recorded finish reason ({recorded} of {len(texts)} outputs say)"
           if recorded else "no finish reason recorded")
    if flag is not None:
        return f"--max-new-tokens; {how}, else length >= {ds.CAP_SLACK} x cap"
    if default is not None:
        return f"the dataset's generation cap; {how}, else length >= {ds.CAP_SLACK} x cap"
    if not recorded:
        return ("inferred: the longest output; no finish reason recorded, so no output counts as capped "
                "(pass --max-new-tokens or --capped-field to flag them)")
    return f"inferred: the longest output marked capped, else the longest; {how}"


def _variants(capped: Capped) -> list[tuple[str, bool]]:
    return {
        Capped.both: [("all outputs", False), ("without capped outputs", True)],
        Capped.include: [("all outputs", False)],
        Capped.exclude: [("without capped outputs", True)],
    }[capped]


def _info(dataset, label, selected, decode, cost, engine) -> dict:
    decoded = [r for r in selected if r.step in decode]
    return {
        "dataset": dataset.value,
        "variant": label,
        "decoded_steps": decode,
        "history_steps": sorted({r.step for r in selected if r.step < decode[0]}),
        "problems": len(ds.problem_ids(selected)),
        "rollouts_decoded": len(decoded),
        "tokens_decoded": sum(r.length for r in decoded),
        "capped_decoded": sum(r.hit_length_cap for r in decoded),
        "engine": engine,
        "cost_model": {"name": cost.name, "c_base_s": cost.c_base_s, "c_tok_s": cost.c_tok_s, "c_kv_s": cost.c_kv_s},
    }


def _scorer(score: str, cost: CostModel):
    """``--score`` -> the object forwards are charged with (None: the linear preset)."""
    if score == "linear":
        return None
    if score == "table":
        gpu, _, model = cost.name.partition("-")
        try:
            return CostTable.roofline(gpu, model)
        except (KeyError, ValueError):
            raise ValueError(f"--score table: no roofline table for cost preset {cost.name!r}; "
                             "use --score linear or a CSV") from None
    path = Path(score)
    if not path.is_file():
        raise ValueError(f"--score {score!r}: not table, linear, or an existing CSV file")
    return CostTable.from_csv(path)


def _run(console, selected, contenders, cost, engine, decode, label, scorer=None, host_time=False,
         graphs=DEFAULT_GRAPHS):
    columns = (TextColumn("{task.description:<40}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        tasks = {c.name: progress.add_task(f"{label}: {c.name}", total=1.0, start=False) for c in contenders}

        def on_progress(name: str, done: int, total: int) -> None:
            if done == 0:
                progress.start_task(tasks[name])  # the clock runs from the contender's start
            progress.update(tasks[name], completed=done / max(total, 1))

        t0 = time.perf_counter()
        results = run_replay(selected, contenders, cost, engine, decode, on_progress, score=scorer,
                             host_time=host_time, graphs=graphs)
        console.print(f"{label}: replayed in {time.perf_counter() - t0:.1f} s")
    return results


def _print_tables(runs) -> None:
    out = Console()
    for summary, _ in runs:
        t = Table(title=f"das replay: {summary['dataset']}, {summary['variant']} "
                        f"(steps {summary['decoded_steps']}, {summary['rollouts_decoded']} rollouts, "
                        f"{summary['tokens_decoded']:,} tokens, planned with {summary['cost_model']['name']}, "
                        f"scored with {summary.get('scored_with', summary['cost_model']['name'])}"
                        f"{' + host time' if summary.get('host_time') else ''}, {summary['engine']}"
                        f"{', graphs ' + summary['graphs'] if summary.get('graphs') else ''})")
        for i, col in enumerate(TABLE_HEADER):
            t.add_column(col, justify="left" if i == 0 else "right")
        for row in table_rows(summary):
            t.add_row(*row)
        out.print(t)


def _write_json(path: Path, runs) -> None:
    """Top level = the first run (all outputs unless excluded); every run under ``runs``."""
    summaries = [s for s, _ in runs]
    doc = {**summaries[0], "runs": summaries}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2))
    except OSError as e:
        raise fail(f"--json {path}: cannot write ({e.strerror})") from None
