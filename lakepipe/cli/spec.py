"""Spec commands: validate, pipelines, schema, kinds, check (diagnostics)."""

from __future__ import annotations

import inspect
import json

import pyarrow as pa
import typer

from lakepipe.cli.common import (
    LAKE_OPT,
    app,
    err_console,
    handle_errors,
    lake_for,
    require_lake,
    write_output,
)
from lakepipe.errors import SpecError, SQLError, UserError
from lakepipe.export import ExportMeta, formats
from lakepipe.resources import schemas_dir


@app.command()
@handle_errors
def validate(
    spec: str = typer.Argument(..., help="Pipeline name or spec file"),
    set_: list[str] | None = typer.Option(None, "--set", help="Override KEY.PATH=VALUE"),
) -> None:
    """Check a spec: prints ok, or every error as file:line: key.path: message (exit 2).

    Also runs each stage's input checks (files it names, SQL syntax) where they need
    no archive and no upstream rows.

    Example: lakepipe validate demo
    """
    from lakepipe.runner import preflight_spec
    from lakepipe.spec import load_spec

    try:
        loaded = load_spec(spec, tuple(set_ or ()))
        preflight_spec(loaded)
    except SpecError as exc:
        for line in exc.errors:
            typer.echo(line)
        raise typer.Exit(2) from None
    except UserError as exc:
        typer.echo(str(exc))
        raise typer.Exit(2) from None
    typer.echo(
        f"ok: {loaded.name} ({len(loaded.model.stages)} stages: "
        f"{' -> '.join(loaded.stage_order())})"
    )


@app.command()
@handle_errors
def pipelines(fmt: str = typer.Option("table", "--format", "-f")) -> None:
    """List the named pipelines shipped with lakepipe (run one with `lakepipe run NAME`).

    Example: lakepipe pipelines
    """
    import yaml

    from lakepipe.resources import pipelines_dir

    rows = []
    for path in sorted(pipelines_dir().glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        rows.append(
            {
                "name": path.stem,
                "stages": ", ".join((raw.get("stages") or {}).keys()),
                "description": str(raw.get("description", "")).strip(),
            }
        )
    write_output(pa.Table.from_pylist(rows), fmt, None, ExportMeta(options={"width": 200}))


@app.command()
@handle_errors
def schema(
    write: bool = typer.Option(False, "--write", help="Write schemas/pipeline.schema.json"),
    check: bool = typer.Option(False, "--check", help="Exit 1 if the file is stale"),
) -> None:
    """Print the JSON schema of pipeline specs (editors validate and autocomplete with it).

    Example: lakepipe schema --write
    """
    from lakepipe.spec import json_schema_text

    text = json_schema_text()
    path = schemas_dir() / "pipeline.schema.json"
    if check:
        current = path.read_text() if path.exists() else ""
        if current != text:
            err_console().print(f"{path} is stale; run `lakepipe schema --write`", markup=False)
            raise typer.Exit(1)
        typer.echo(f"{path} is up to date")
    elif write:
        path.write_text(text)
        err_console().print(f"wrote {path}", markup=False)
    else:
        typer.echo(text, nl=False)


@app.command()
@handle_errors
def kinds(
    name: str | None = typer.Argument(None, help="Show one stage/archive kind or format"),
) -> None:
    """List stage kinds, archive kinds and export formats, or show one's manual and params.

    Example: lakepipe kinds cutouts
    """
    from lakepipe.archives.base import archives
    from lakepipe.stages.base import stages

    if name is None:
        for family, reg in (("stage kinds", stages), ("archive kinds", archives)):
            typer.echo(f"{family}:")
            for k, cls in reg.items():
                doc = (cls.__doc__ or "").strip().splitlines()
                typer.echo(f"  {k:<16} {doc[0] if doc else ''}")
        typer.echo("export formats:")
        for k, f in formats.items():
            typer.echo(f"  {k:<16} {f.description}")
        return
    for reg in (stages, archives):
        if name in reg:
            cls = reg.get(name)
            typer.echo(inspect.cleandoc(cls.__doc__ or name))
            typer.echo("\nparameters (JSON schema):")
            typer.echo(json.dumps(cls.Params.model_json_schema(), indent=2))
            return
    if name in formats:
        typer.echo(formats.get(name).description)
        return
    names = stages.names() + archives.names() + formats.names()
    from lakepipe.registry import did_you_mean

    raise UserError(
        f"no kind or format {name!r}.{did_you_mean(name, names)} Known: {', '.join(names)}"
    )


@app.command()
@handle_errors
def check(
    spec: str = typer.Argument(..., help="Pipeline name or spec file"),
    lake: str | None = LAKE_OPT,
    fmt: str = typer.Option("table", "--format", "-f"),
) -> None:
    """Run the spec's diagnostics (named SQL checks); exit 1 if any fails.

    Example: lakepipe check demo
    """
    from lakepipe.config import resolve_lake
    from lakepipe.lake import Lake
    from lakepipe.spec import load_spec
    from lakepipe.sql import LakeSQL

    loaded = load_spec(spec)
    lk = require_lake(Lake(resolve_lake(lake, loaded.model)) if not lake else lake_for(lake, None))
    sql = LakeSQL(lk)
    rows = []
    for name, diag in loaded.model.diagnostics.items():
        try:
            result = sql.query(diag.sql)
            value = result.column(0)[0].as_py() if result.num_rows and result.num_columns else None
            error = ""
        except SQLError as exc:
            value, error = None, str(exc).splitlines()[0]
        exp = diag.expect
        if value is not None and not isinstance(value, int | float):
            try:
                value = float(value)
            except (TypeError, ValueError):
                error = error or f"expected a number, the query returned {value!r}"
                value = None
        if value is None:
            ok = False
        elif isinstance(exp, int | float):
            ok = float(value) == float(exp)
        else:
            ok = (exp.min is None or value >= exp.min) and (exp.max is None or value <= exp.max)
        expect = (
            str(exp)
            if isinstance(exp, int | float)
            else f"[{'' if exp.min is None else exp.min}, {'' if exp.max is None else exp.max}]"
        )
        rows.append(
            {
                "check": name,
                "value": None if value is None else str(value),
                "expect": expect,
                "status": "pass" if ok else "FAIL",
                "error": error,
            }
        )
    schema = pa.schema([(k, pa.string()) for k in ("check", "value", "expect", "status", "error")])
    write_output(
        pa.Table.from_pylist(rows, schema=schema), fmt, None, ExportMeta(options={"width": 200})
    )
    failed = sum(r["status"] != "pass" for r in rows)
    err_console().print(f"{len(rows) - failed}/{len(rows)} checks passed", markup=False)
    raise typer.Exit(1 if failed else 0)
