"""The `das` typer app. Each command lives in its own module; registering one is one line."""

from __future__ import annotations

import typer

from das_sglang.cli import replay, rollout

app = typer.Typer(name="das", help="Distribution-aware speculative decoding for RL rollouts.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.command("replay")(replay.replay)
app.command("rollout")(rollout.rollout)


def main() -> None:
    app()
