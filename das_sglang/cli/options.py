"""Option aliases shared by `das` commands (declared once, reused by every command)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from das_sglang.core.cost_model import PRESETS

JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Write the full results as JSON to this file.",
                                                 dir_okay=False)]
PlotsDir = Annotated[Optional[Path], typer.Option("--plots", help="Write PNG plots into this directory.",
                                                  file_okay=False)]
TokenizerPath = Annotated[Optional[Path], typer.Option(
    "--tokenizer", help="A tokenizer.json (optionally .gz); default: the bundled offline Qwen2 BPE.")]
CacheDir = Annotated[Optional[Path], typer.Option(
    "--cache-dir", help="Token-id cache directory (default $XDG_CACHE_HOME/das-sglang or ~/.cache/das-sglang).", file_okay=False)]
CostPreset = Annotated[Optional[str], typer.Option(
    "--cost-preset", help=f"Forward-cost model preset: {', '.join(sorted(PRESETS))}.")]


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` to stderr; ``raise fail(...) from None`` exits 1, no traceback."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)
