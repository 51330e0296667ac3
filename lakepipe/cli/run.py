"""``lakepipe run``: plan and execute a pipeline with a progress bar on stderr."""

from __future__ import annotations

import sys

import pyarrow as pa
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lakepipe.cli.common import LAKE_OPT, app, err_console, handle_errors, write_output
from lakepipe.export import ExportMeta
from lakepipe.runner import PartitionPlan, RunObserver, StageReport, run_pipeline


class ProgressObserver(RunObserver):
    """A rich progress bar per stage (a line per stage when stderr is not a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.console = err_console()
        self.enabled = enabled and self.console.is_terminal
        self.progress: Progress | None = None
        self.task = None

    def stage_started(self, name: str, plans: list[PartitionPlan]) -> None:
        todo = sum(p.action == "run" for p in plans)
        if self.enabled and todo:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task(f"{name}", total=todo)

    def partition_done(self, name: str, key: str, status: str, rows: int, error: str) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task)
        if status == "failed":
            first = error.splitlines()[0] if error else ""
            self.console.print(f"  {name} [{key}] failed: {first}", markup=False)

    def stage_finished(self, report: StageReport) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.console.print(
            f"{report.name}: {report.ok} ran, {report.skipped} skipped, {report.failed} failed"
            + (f", {report.removed} removed" if report.removed else "")
            + f" ({report.rows} rows, {report.seconds:.1f} s)",
            markup=False,
        )


def _stage_list(values: list[str] | None) -> list[str] | None:
    """Stage names from repeated and/or comma-separated options."""
    if values is None:
        return None
    return [name.strip() for v in values for name in v.split(",") if name.strip()]


@app.command()
@handle_errors
def run(
    spec: str = typer.Argument(..., help="Pipeline name (see `lakepipe pipelines`) or spec file"),
    lake: str | None = LAKE_OPT,
    set_: list[str] | None = typer.Option(
        None, "--set", help="Override a spec value: stages.sources.aperture.scale=2.5"
    ),
    only: list[str] | None = typer.Option(
        None, "--only", help="Run only these stages: --only exposures,cutouts (or repeat it)"
    ),
    force: list[str] | None = typer.Option(
        None,
        "--force",
        help="Re-run these stages even if unchanged: --force a,b (bare --force: every stage)",
    ),
    force_all: bool = typer.Option(False, "--force-all", help="Re-run every stage"),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print, per stage and partition, run or skip and why"
    ),
    workers: int | None = typer.Option(
        None, "--workers", "-j", min=1, help="Worker processes (default: one per core)"
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar"),
    fmt: str = typer.Option("table", "--format", "-f", help="Summary format on stdout"),
) -> None:
    """Run a pipeline: only what changed since the last run is computed.

    Example: lakepipe run demo --set stages.cutouts.size_arcsec=300 --workers 2
    """
    report = run_pipeline(
        spec,
        lake=lake,
        overrides=set_ or (),
        only=_stage_list(only),
        force=True if force_all else (_stage_list(force) or None),
        dry_run=dry_run,
        workers=workers,
        observer=RunObserver() if dry_run else ProgressObserver(progress),
    )
    if dry_run:
        rows = (
            [
                {
                    "stage": p.stage,
                    "partition": p.key or "(all)",
                    "action": p.action,
                    "reason": p.reason,
                }
                for s in report.stages
                for p in s.plans
            ]
            + [
                {"stage": s.name, "partition": "*", "action": "fail", "reason": s.errors["*"]}
                for s in report.stages
                if "*" in s.errors
            ]
            + [
                {"stage": s.name, "partition": "*", "action": "unknown", "reason": s.note}
                for s in report.stages
                if s.note
            ]
        )
        table = pa.Table.from_pylist(
            rows,
            schema=pa.schema(
                [(k, pa.string()) for k in ("stage", "partition", "action", "reason")]
            ),
        )
    else:
        table = pa.Table.from_pylist(
            [
                {
                    "stage": s.name,
                    "kind": s.kind,
                    "ran": s.ok,
                    "skipped": s.skipped,
                    "failed": s.failed,
                    "removed": s.removed,
                    "rows": s.rows,
                    "seconds": round(s.seconds, 2),
                }
                for s in report.stages
            ]
        )
    write_output(table, fmt, None, ExportMeta(options={"width": 200}))
    if report.exit_code == 2:  # every failure was bad input: say which, like other user errors
        err_console().print(f"lakepipe: error: {report.user_errors[0]}", markup=False)
    for s in report.stages if report.exit_code != 2 else []:  # failed while listing its
        if "*" in s.errors:  # partitions: none ran, so no progress line showed the error
            first = s.errors["*"].strip().splitlines()[0] if s.errors["*"].strip() else "failed"
            err_console().print(f"lakepipe: stage {s.name!r} failed: {first}", markup=False)
    if not dry_run:
        err_console().print(
            f"run {report.run_id}: lake {report.lake}"
            + (
                f"; {report.failed} partition(s) failed — see `lakepipe runs --lake "
                f"{report.lake}`; rerun to retry only those"
                if report.failed
                else ""
            ),
            markup=False,
        )
    sys.stdout.flush()
    raise typer.Exit(report.exit_code)
