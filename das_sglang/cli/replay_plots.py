"""PNG plots for `das replay --plots DIR` (matplotlib, headless)."""

from __future__ import annotations

import re
from pathlib import Path

from das_sglang.cli.options import fail
from das_sglang.core.replay_report import batch_size_series


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_plots(out_dir: Path, runs) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fail(f"--plots {out_dir}: cannot create ({e.strerror})") from None
    paths = []
    for summary, results in runs:
        tag = _slug(summary["variant"])
        paths.append(_batch_size_plot(out_dir / f"batch_size_{tag}.png", summary, results))
        paths.append(_tokens_per_step_plot(out_dir / f"tokens_per_step_{tag}.png", summary))
        paths.append(_makespan_plot(out_dir / f"makespan_{tag}.png", summary))
    return paths


def _batch_size_plot(path: Path, summary, results) -> Path:
    """The long-tail picture: how many requests are still decoding at each iteration."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in results:
        ax.plot(batch_size_series(r), label=r.name, lw=1.2)
    ax.set_xlabel("decode iteration (replayed steps back to back)")
    ax.set_ylabel("effective batch size (active requests)")
    ax.set_xscale("symlog", linthresh=1000)
    ax.set_title(f"{summary['dataset']}, {summary['variant']}: batch size vs iteration")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _tokens_per_step_plot(path: Path, summary) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, p in summary["policies"].items():
        ax.plot([s["step"] for s in p["steps"]], [s["tokens_per_step"] for s in p["steps"]], marker="o", label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("tokens per verify step (incl. bonus)")
    ax.set_title(f"{summary['dataset']}, {summary['variant']}: accepted tokens/step")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _makespan_plot(path: Path, summary) -> Path:
    import matplotlib.pyplot as plt

    names = list(summary["policies"])
    ratios = [summary["policies"][n]["makespan_ratio_vs_none"] or 1.0 for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(names, ratios, color=["#888" if n == "none" else "#3a7" if n.startswith("das") else "#c63"
                                        for n in names])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("modelled makespan / no speculation")
    ax.set_title(f"{summary['dataset']}, {summary['variant']} ({summary['cost_model']['name']}, {summary['engine']})")
    ax.tick_params(axis="x", rotation=30)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
