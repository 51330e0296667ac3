"""Shared CLI plumbing: the app, error → exit-code mapping, lake resolution, output."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import pyarrow as pa
import typer
from rich.console import Console

from lakepipe.config import resolve_lake
from lakepipe.errors import InputNotFoundError, LakepipeError, UnknownKindError, UserError
from lakepipe.export import ExportMeta, format_for_path, formats
from lakepipe.lake import Lake
from lakepipe.spec import parse_option_value

app = typer.Typer(
    name="lakepipe",
    help="Turn YAML pipeline specs into partitioned-Parquet astronomy data products, "
    "and query them with DuckDB.\n\nExample: lakepipe run demo && "
    'lakepipe query --pipeline demo "select filter, count(*) from exposures group by 1"',
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)
lake_app = typer.Typer(
    help="Inspect and maintain a lake: tables, contracts, partitions, vacuum.\n\n"
    "Example: lakepipe lake tables -p demo && lakepipe lake vacuum -p demo",
    no_args_is_help=True,
)
app.add_typer(lake_app, name="lake")

STATE: dict[str, Any] = {"debug": False}
F = TypeVar("F", bound=Callable[..., Any])

LAKE_OPT = typer.Option(
    None, "--lake", help="Lake root (default: the pipeline's lake, $LAKEPIPE_LAKE, ./lake)"
)
PIPELINE_OPT = typer.Option(
    None, "--pipeline", "-p", help="Use this pipeline's lake (a name or a spec file)"
)


def err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def handle_errors(fn: F) -> F:
    """Map LakepipeError to its exit code with a one-paragraph message (``--debug``: traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LakepipeError as exc:
            if STATE["debug"]:  # the traceback in addition; the exit code stays the same
                sys.stderr.write(traceback.format_exc())
            label = "error" if isinstance(exc, UserError) else "failed"
            err_console().print(f"lakepipe: {label}: {exc}", markup=False)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def lake_for(lake: str | None, pipeline: str | None) -> Lake:
    """The lake a read command works on (``--lake``, ``--pipeline``, env, ./lake)."""
    model = None
    if pipeline and not lake:
        from lakepipe.spec import load_spec

        model = load_spec(pipeline).model
    return Lake(resolve_lake(lake, model))


def require_lake(lake: Lake) -> Lake:
    if not lake.root.exists():
        raise InputNotFoundError(
            f"lake {lake.root} does not exist; run a pipeline first (lakepipe run demo) or "
            "point at a lake with --lake PATH or --pipeline NAME"
        )
    return lake


def output_format(fmt: str | None, out: str | None, default: str) -> str:
    """Explicit --format, else inferred from the output file's suffix, else ``default``."""
    if fmt:
        formats.get(fmt)  # unknown → UnknownKindError listing the formats
        return fmt
    if out:
        inferred = format_for_path(out)
        if inferred is None:
            raise UnknownKindError(
                f"cannot infer a format from {out!r}; pass --format ({', '.join(formats.names())})"
            )
        return inferred
    return default


def write_output(table: pa.Table, fmt: str, out: str | None, meta: ExportMeta) -> Path | None:
    """Write ``table`` in ``fmt`` to ``out`` (atomically) or stdout."""
    writer = formats.get(fmt)
    if out and out != "-":
        path = Path(out)
        if not path.parent.exists():
            raise InputNotFoundError(f"output folder {path.parent} does not exist; create it")
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as fh:
            writer.write(table, fh, meta)
        os.replace(tmp, path)
        return path
    stream: BinaryIO = sys.stdout.buffer
    if writer.binary and sys.stdout.isatty():
        raise UserError(f"format {fmt!r} is binary; write it to a file with -o FILE")
    try:
        writer.write(table, stream, meta)
        stream.flush()
    except BrokenPipeError:  # the reader went away (`| head`): not an error
        silence_stdout()
        raise typer.Exit(0) from None
    return None


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def parse_options(opts: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in opts or []:
        if "=" not in item:
            raise UserError(f"--opt {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_option_value(item, v, flag="--opt", example="--opt 'KEY=[1, 2]'")
    return out
