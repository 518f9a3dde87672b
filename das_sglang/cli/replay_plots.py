"""PNG plots for `das replay --plots DIR` (matplotlib, headless)."""

from __future__ import annotations

import math
import re
from pathlib import Path

from das_sglang.cli.options import fail


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
    """The long-tail picture: how many requests are still decoding at each iteration, one
    panel per replayed training step."""
    import matplotlib.pyplot as plt

    steps = summary["decoded_steps"]
    cols = min(len(steps), 4)
    rows = math.ceil(len(steps) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for k, step in enumerate(steps):
        ax = axes[k // cols][k % cols]
        for r in results:
            s = next((x for x in r.steps if x.step == step), None)
            if s is not None:
                ax.step(range(len(s.batch_sizes)), s.batch_sizes, where="post", label=r.name, lw=1.1)
        ax.set_title(f"step {step}", fontsize=9)
        ax.set_xlabel("decode iteration")
    for k in range(len(steps), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].set_ylabel("active requests")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{summary['dataset']}, {summary['variant']}: effective batch size vs iteration")
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
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
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
