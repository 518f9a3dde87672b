"""DAS makespan under both verify engines, side by side, on every bundled dataset.

    python benchmarks/replay_engines.py --json benchmarks/results/replay_engines.json

Runs ``das replay --policies none,das --engine {ragged,uniform,ragged-width}
--no-host-time`` (the CLI itself, so exactly what users run) on each bundled dataset and
writes one JSON::

    {"datasets": {<dataset>: {"cost_model": <preset>, <variant>: {
        "ragged":  {"das_makespan_s", "none_makespan_s", "das_makespan_ratio_vs_none",
                    "padded_tokens", "tokens_per_step"},
        "uniform": {...same keys...},
        "ragged-width": {...},
        "ragged_vs_uniform": das makespan ragged / uniform}}}}

``ragged`` is what the SGLang worker does where its attention backend verifies ragged
(FlashInfer, CPU torch_native) and is the replay's default engine: per-request budgets
priced by the tokens each request submits; ``uniform`` plans one batch width, padding
paid, and pads every request to it (the worker on other backends); ``ragged-width``
verifies those batch-width budgets ragged (``policy.uniform_width`` true on a ragged
backend). Scored with the preset's roofline cost table (a ragged verify as a graph
forward at its mean tokens per request). Host time is left out (``--no-host-time``):
the engines share the drafter, and this machine's host timings would add noise of the
size of the differences compared.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DATASETS = ("skythought", "skythought-short", "verl")
ENGINES = ("ragged", "uniform", "ragged-width")


def run_one(dataset: str, engine: str, out: Path) -> list[dict]:
    das = Path(sys.executable).with_name("das")
    cmd = [str(das), "replay", "--dataset", dataset, "--policies", "none,das",
           "--engine", engine, "--no-host-time", "--json", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["runs"]  # one per variant (all / without capped)


def summarize(run: dict) -> dict:
    das, none = run["policies"]["das"], run["policies"]["none"]  # none: same every engine
    return {
        "das_makespan_s": das["makespan_s"],
        "none_makespan_s": none["makespan_s"],
        "das_makespan_ratio_vs_none": das["makespan_s"] / none["makespan_s"],
        "padded_tokens": das["padded_tokens"],
        "tokens_per_step": das["tokens_per_step"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, type=Path)
    p.add_argument("--datasets", default=",".join(DATASETS))
    args = p.parse_args(argv)
    report: dict = {"datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in [d for d in args.datasets.split(",") if d]:
            per_variant: dict = {}
            for engine in ENGINES:
                for run in run_one(dataset, engine, Path(tmp) / f"{dataset}-{engine}.json"):
                    cost_model = run["cost_model"]["name"]
                    per_variant.setdefault(run["variant"], {})[engine] = summarize(run)
            for variant, engines in per_variant.items():
                engines["ragged_vs_uniform"] = (
                    engines["ragged"]["das_makespan_s"] / engines["uniform"]["das_makespan_s"])
                print(f"{dataset:17s} {variant:24s} DAS makespan vs none: ragged "
                      f"{engines['ragged']['das_makespan_ratio_vs_none']:.3f}  uniform "
                      f"{engines['uniform']['das_makespan_ratio_vs_none']:.3f}  ragged-width "
                      f"{engines['ragged-width']['das_makespan_ratio_vs_none']:.3f}  "
                      f"(ragged/uniform {engines['ragged_vs_uniform']:.3f})")
            report["datasets"][dataset] = {"cost_model": cost_model, **per_variant}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
