"""The `das` typer app. Each command lives in its own module; registering one is one line."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from das_sglang.cli import replay, rollout


class _Group(TyperGroup):
    """Every kind of bad input exits 1 with a message and no traceback.

    Click reports unparseable options (``--n many``) as usage errors with exit code 2; the
    brief asks for one convention for all bad input, so they exit 1 like the commands' own
    validation errors.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        except typer.TyperException as e:  # typer's click: usage and parameter errors
            e.show()
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(name="das", help="Distribution-aware speculative decoding for RL rollouts.",
                  cls=_Group, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
app.command("replay")(replay.replay)
app.command("rollout")(rollout.rollout)


def main() -> None:
    app()
