"""``lakepipe query`` and ``lakepipe export``: SQL over the lake, data on stdout or a file."""

from __future__ import annotations

import sys

import typer

from lakepipe.cli.common import (
    LAKE_OPT,
    PIPELINE_OPT,
    app,
    err_console,
    handle_errors,
    lake_for,
    output_format,
    parse_options,
    require_lake,
    write_output,
)
from lakepipe.errors import UserError
from lakepipe.export import ExportMeta, formats
from lakepipe.sql import LakeSQL
from lakepipe.tables import get_contract


def _read_sql(sql: str) -> str:
    if sql == "-":
        text = sys.stdin.read()
        if not text.strip():
            raise UserError("no SQL on standard input")
        return text
    return sql


@app.command()
@handle_errors
def query(
    sql: str = typer.Argument(..., help="SQL (DuckDB dialect), or - to read it from stdin"),
    lake: str | None = LAKE_OPT,
    pipeline: str | None = PIPELINE_OPT,
    fmt: str | None = typer.Option(
        None, "--format", "-f", help="table (default), csv, json, jsonl, parquet, ecsv, …"
    ),
    out: str | None = typer.Option(None, "--output", "-o", help="Write to FILE, not stdout"),
    max_rows: int = typer.Option(200, "--max-rows", help="Rows shown by --format table"),
) -> None:
    """Run read-only SQL over the lake: one view per table, plus _runs (the run log).

    Example: lakepipe query -p demo "select night, count(*) from exposures group by 1"
    """
    lk = require_lake(lake_for(lake, pipeline))
    text = _read_sql(sql)
    result = LakeSQL(lk).query(text)
    fmt = output_format(fmt, out, "table")
    meta = ExportMeta.for_columns(result.column_names, max_rows=max_rows)
    path = write_output(result, fmt, out, meta)
    if path:
        err_console().print(f"wrote {result.num_rows} rows to {path}", markup=False)


@app.command()
@handle_errors
def export(
    table: str | None = typer.Argument(None, help="Table to export (or use --sql)"),
    sql: str | None = typer.Option(None, "--sql", help="Export a query's result instead"),
    out: str = typer.Option(..., "--output", "-o", help="Output file (- for stdout)"),
    fmt: str | None = typer.Option(
        None, "--format", "-f", help="csv, ecsv, parquet, json, votable, … (default: suffix)"
    ),
    lake: str | None = LAKE_OPT,
    pipeline: str | None = PIPELINE_OPT,
    target: str | None = typer.Option(None, "--target", help="Target name (gcn, plots)"),
    t0: str | None = typer.Option(None, "--t0", help="Reference time T0 (ISO UTC) for gcn"),
    opt: list[str] | None = typer.Option(None, "--opt", help="Format option KEY=VALUE"),
) -> None:
    """Export a table or a query to a file; ECSV and VOTable keep units from the contracts.

    Example: lakepipe export exposures -p demo -o exposures.ecsv
    """
    if bool(table) == bool(sql):
        raise UserError('give a TABLE or --sql "…" (exactly one)')
    lk = require_lake(lake_for(lake, pipeline))
    options = parse_options(opt)
    if target is not None:
        options["target"] = target
    if t0 is not None:
        options["t0"] = t0
    fmt = output_format(fmt, out if out != "-" else None, "csv")
    if table:
        get_contract(table)  # unknown table → clear error listing the tables
        source = formats.get(fmt).source
        query_sql = (source(table, options) if source else None) or f'select * from "{table}"'
        result = LakeSQL(lk).query(query_sql)
    else:
        result = LakeSQL(lk).query(_read_sql(sql or ""))
    meta = ExportMeta.for_columns(result.column_names, table_name=table, **options)
    path = write_output(result, fmt, out, meta)
    if path:
        err_console().print(f"wrote {result.num_rows} rows ({fmt}) to {path}", markup=False)
