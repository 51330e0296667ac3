"""``lakepipe lake …`` and ``lakepipe runs``: what is in a lake and how it got there."""

from __future__ import annotations

import pyarrow as pa
import typer

from lakepipe.cli.common import (
    LAKE_OPT,
    PIPELINE_OPT,
    app,
    err_console,
    handle_errors,
    lake_app,
    lake_for,
    require_lake,
    write_output,
)
from lakepipe.errors import InputNotFoundError
from lakepipe.export import ExportMeta
from lakepipe.sql import LakeSQL
from lakepipe.tables import contracts, get_contract

FMT_OPT = typer.Option("table", "--format", "-f", help="table, csv, json, …")


@lake_app.command("tables")
@handle_errors
def tables(
    lake: str | None = LAKE_OPT, pipeline: str | None = PIPELINE_OPT, fmt: str = FMT_OPT
) -> None:
    """List tables: partitions, rows, bytes, files (every contract, committed or not).

    Example: lakepipe lake tables -p demo
    """
    lk = require_lake(lake_for(lake, pipeline))
    m = lk.manifest()
    rows = []
    for name, c in sorted(contracts().items()):
        parts = m.partitions(name)
        rows.append(
            {
                "table": name,
                "partitions": len(parts),
                "rows": sum(e.rows for e in parts.values()),
                "bytes": sum(e.bytes for e in parts.values()),
                "files": sum(len(e.files) for e in parts.values()),
                "partition_by": ",".join(c.partition_by),
                "description": c.description.strip().split(". ")[0][:70],
            }
        )
    write_output(pa.Table.from_pylist(rows), fmt, None, ExportMeta())


@lake_app.command("schema")
@handle_errors
def schema(
    table: str = typer.Argument(..., help="Table name"),
    lake: str | None = LAKE_OPT,
    pipeline: str | None = PIPELINE_OPT,
    fmt: str = FMT_OPT,
) -> None:
    """Show a table's contract: columns, types, units, descriptions.

    Contracts do not depend on the lake (it need not exist yet); --lake and --pipeline
    are accepted like in the other lake commands, and --pipeline checks that pipeline's
    spec (loading the plug-ins whose contracts it uses).

    Example: lakepipe lake schema exposures -p demo
    """
    lake_for(lake, pipeline)
    c = get_contract(table)
    rows = [
        {
            "column": col.name,
            "type": str(col.type),
            "unit": col.unit or "",
            "key": "partition"
            if col.name in c.partition_by
            else ("key" if col.name in c.key else ""),
            "description": col.description,
        }
        for col in c.columns
    ]
    write_output(pa.Table.from_pylist(rows), fmt, None, ExportMeta(options={"width": 200}))


@lake_app.command("partitions")
@handle_errors
def partitions(
    table: str = typer.Argument(..., help="Table name"),
    lake: str | None = LAKE_OPT,
    pipeline: str | None = PIPELINE_OPT,
    fmt: str = FMT_OPT,
) -> None:
    """List a table's committed partitions with rows, bytes, stage, fingerprint, run.

    Example: lakepipe lake partitions exposures -p demo
    """
    get_contract(table)
    lk = require_lake(lake_for(lake, pipeline))
    rows = [
        {
            "partition": k,
            "rows": e.rows,
            "bytes": e.bytes,
            "files": len(e.files),
            "stage": e.stage,
            "fingerprint": e.fingerprint[:16],
            "run_id": e.run_id,
            "committed_at": e.committed_at,
        }
        for k, e in sorted(lk.manifest().partitions(table).items())
    ]
    schema = pa.schema(
        [
            ("partition", pa.string()),
            ("rows", pa.int64()),
            ("bytes", pa.int64()),
            ("files", pa.int64()),
            ("stage", pa.string()),
            ("fingerprint", pa.string()),
            ("run_id", pa.string()),
            ("committed_at", pa.string()),
        ]
    )
    write_output(pa.Table.from_pylist(rows, schema=schema), fmt, None, ExportMeta())


@lake_app.command("vacuum")
@handle_errors
def vacuum(
    lake: str | None = LAKE_OPT,
    pipeline: str | None = PIPELINE_OPT,
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would go"),
) -> None:
    """Delete files that no committed partition references (crash leftovers, old versions).

    Example: lakepipe lake vacuum -p demo
    """
    lk = require_lake(lake_for(lake, pipeline))
    paths, size = lk.vacuum(dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for p in paths:
        typer.echo(p)
    err_console().print(f"{verb} {len(paths)} file(s), {size} bytes", markup=False)


@app.command()
@handle_errors
def runs(
    lake: str | None = LAKE_OPT,
    pipeline: str | None = PIPELINE_OPT,
    run_id: str | None = typer.Option(None, "--run", help="Show one run's partitions"),
    fmt: str = FMT_OPT,
) -> None:
    """Summarise runs (or one run's partition attempts) from the run log `_runs`.

    Example: lakepipe runs -p demo; lakepipe runs -p demo --run 20250103T040506-ab12cd
    """
    lk = require_lake(lake_for(lake, pipeline))
    if run_id:
        sql = (
            "select stage, partition, status, reason, rows, round(seconds, 3) as seconds, "
            "error from _runs where run_id = '" + run_id.replace("'", "''") + "' "
            "order by started_at nulls first, stage, partition"
        )
    else:
        sql = (
            "select run_id, any_value(pipeline) as pipeline, min(finished_at) as first_at, "
            "count(*) filter (status = 'ok') as ran, count(*) filter (status = 'skipped') "
            "as skipped, count(*) filter (status = 'failed') as failed, sum(rows) as rows "
            "from _runs group by run_id order by run_id"
        )
    result = LakeSQL(lk).query(sql)
    if run_id and not result.num_rows:
        raise InputNotFoundError(
            f"no run {run_id!r} in the run log of lake {lk.root}; list its runs with "
            f"`lakepipe runs --lake {lk.root}`"
        )
    write_output(result, fmt, None, ExportMeta(options={"width": 200}))
