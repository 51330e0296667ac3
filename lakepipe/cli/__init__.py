"""The ``lakepipe`` command line (typer): parse, call the library, render, map errors.

Commands live one concern a module and register on the shared app at import.
"""

from __future__ import annotations

import sys

import typer

from lakepipe import __version__
from lakepipe.cli import lake as _lake  # noqa: F401  (registers commands)
from lakepipe.cli import plot as _plot  # noqa: F401
from lakepipe.cli import query as _query  # noqa: F401
from lakepipe.cli import run as _run  # noqa: F401
from lakepipe.cli import sim as _sim  # noqa: F401
from lakepipe.cli import spec as _spec  # noqa: F401
from lakepipe.cli.common import STATE, app, silence_stdout
from lakepipe.config import LOG_LEVEL_ENV, LOG_LEVELS, configure_logging, log_level
from lakepipe.errors import UserError

__all__ = ["app", "main"]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lakepipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(
        False, "--debug", help="Show tracebacks for errors and log at DEBUG to stderr"
    ),
    level: str | None = typer.Option(
        None,
        "--log-level",
        help=f"Log the lakepipe logger to stderr at this level ({', '.join(LOG_LEVELS)}; "
        f"default ${LOG_LEVEL_ENV}, else warnings only)",
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version"
    ),
) -> None:
    """lakepipe: YAML pipeline specs → partitioned Parquet lake → DuckDB."""
    STATE["debug"] = debug
    try:
        configure_logging(log_level(level, debug))
    except UserError as exc:
        typer.echo(f"lakepipe: error: {exc}", err=True)
        raise typer.Exit(2) from None


def normalise_argv(argv: list[str]) -> list[str]:
    """A bare ``--force`` (no stage after it) means every stage: ``--force-all``;
    ``--debug`` and ``--log-level LEVEL`` may come after the command too
    (``lakepipe run demo --debug``)."""
    end = argv.index("--") if "--" in argv else len(argv)
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if i < end and arg == "--debug":
            front.append(arg)
        elif i < end and arg == "--log-level" and i + 1 < end:
            front += [arg, argv[i + 1]]
            i += 1
        elif i < end and arg.startswith("--log-level="):
            front.append(arg)
        else:
            rest.append(arg)
        i += 1
    argv = front + rest
    out = []
    for i, arg in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--force" and (nxt is None or nxt.startswith("-")):
            out.append("--force-all")
        else:
            out.append(arg)
    return out


def main() -> None:
    """Console-script entry point; tolerates a closed stdout (``| head``)."""
    try:
        try:
            app(args=normalise_argv(sys.argv[1:]), prog_name="lakepipe")
            code: int | str | None = 0
        except SystemExit as exc:
            code = exc.code
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
        code = 0
    sys.exit(code)
