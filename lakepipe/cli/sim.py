"""``lakepipe sim …``: the virtual survey outside a pipeline (reference catalog, emulator)."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from lakepipe.cli.common import app, err_console, handle_errors, parse_options
from lakepipe.errors import InputNotFoundError, UserError

if TYPE_CHECKING:
    from lakepipe.archives.sim import SimArchive
    from lakepipe.sim.emulator import ArchiveEmulator

sim_app = typer.Typer(
    help=(
        "The embedded virtual survey (`archive: {kind: sim}`) outside a pipeline.\n\n"
        "Example: lakepipe sim serve --port 8765 --param seed=7\n\n"
        "Example: lakepipe sim catalog -p demo -o refcat.parquet"
    ),
    no_args_is_help=True,
)
app.add_typer(sim_app, name="sim")

PIPELINE_OPT = typer.Option(
    None,
    "--pipeline",
    "-p",
    "--spec",
    help="Use the survey of this pipeline's `archive: {kind: sim}` (a name or a spec file)",
)
PARAM_OPT = typer.Option(
    None, "--param", help="Survey parameter KEY=VALUE (seed=7, naxis1=1024, …); overrides -p"
)
CATALOG_FORMATS = ("parquet", "hats")


def survey_params(pipeline: str | None, param: list[str] | None) -> dict[str, Any]:
    """Survey knobs: the pipeline's ``archive: {kind: sim}`` block, then ``--param``."""
    params = parse_options(param)
    if pipeline:
        from lakepipe.spec import load_spec

        archive = load_spec(pipeline).model.archive
        if archive is None or archive.kind != "sim":
            raise UserError(f"pipeline {pipeline!r} has no `archive: {{kind: sim}}` survey")
        params = {**archive.model_dump(exclude={"kind"}), **params}
    return params


def _validated(model: Any, values: dict[str, Any], what: str) -> Any:
    """``model(**values)``, pydantic errors turned into a one-line UserError."""
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{what} {loc}: {first['msg']}; see `lakepipe kinds sim`") from None


def make_archive(pipeline: str | None, param: list[str] | None) -> SimArchive:
    from lakepipe.archives.sim import SimArchive

    params = _validated(SimArchive.Params, survey_params(pipeline, param), "survey parameter")
    return SimArchive(params)


@sim_app.command("catalog")
@handle_errors
def catalog(
    out: Path = typer.Option(..., "--out", "-o", help="Output Parquet file (or HATS folder)"),
    pipeline: str | None = PIPELINE_OPT,
    param: list[str] | None = PARAM_OPT,
    fmt: str = typer.Option(
        "parquet", "--format", "-f", help="parquet (one file) or hats (a new HATS folder)"
    ),
) -> None:
    """Write the survey's Gaia-like reference catalog, to use like a real one.

    Columns ``source_id, ra, dec, pmra, pmdec, phot_g_mean_mag, bp_rp, ref_epoch``
    (J2016.0 positions, mas/yr proper motions). It lists the "vanished" stars and not
    the "appeared" sources, like a real catalog against new images. Point a crossmatch
    stage at it with ``catalog: {kind: parquet, path: refcat.parquet, columns: {id:
    source_id, mags: {G: phot_g_mean_mag}, pmra: pmra, pmdec: pmdec, epoch: ref_epoch}}``.

    Example: lakepipe sim catalog -p demo -o refcat.parquet (or --format hats -o refcat/)
    """
    if fmt not in CATALOG_FORMATS:
        raise UserError(f"--format must be one of {', '.join(CATALOG_FORMATS)} (got {fmt!r})")
    if not out.parent.exists():
        raise InputNotFoundError(f"output folder {out.parent} does not exist; create it")
    archive = make_archive(pipeline, param)
    table = archive.catalog()
    if fmt == "parquet":
        if out.is_dir():
            raise UserError(f"{out} is a folder; pass a file name (-o refcat.parquet)")
        archive.write_catalog(out, table)
        kind = "parquet"
    else:
        from lakepipe.catalogs.hats import write_hats

        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UserError(f"{out} exists and is not an empty folder; HATS needs a new folder")
        parts = write_hats(table, out, name=out.name)
        kind = f"hats ({len(parts)} partitions)"
    err_console().print(
        f"wrote {table.num_rows} reference stars (seed {archive.config.seed}) to {out} as "
        f"{kind}; use it with `catalog: {{kind: {fmt}, path: {out}}}`",
        markup=False,
    )


@sim_app.command("serve")
@handle_errors
def serve(
    port: int = typer.Option(8765, "--port", help="TCP port on --host (0: any free port)"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on"),
    pipeline: str | None = PIPELINE_OPT,
    param: list[str] | None = PARAM_OPT,
    fault: list[str] | None = typer.Option(
        None, "--fault", help="Fault injection KEY=VALUE (error_503_prob=0.2, latency_s=0.05, …)"
    ),
    log_file: Path | None = typer.Option(
        None,
        "--log",
        help="Append every request as a JSON line (timestamp, method, path, query, status, "
        "bytes, fault, range, HTTP Basic user name; never a password) to this file",
    ),
) -> None:
    """Serve the virtual survey over HTTP through the real archives' APIs (IRSA IBE for
    ZTF, CDS XMatch and VizieR), for testing archive clients offline.

    Example: lakepipe sim serve --port 8765 --param seed=7 --fault error_503_prob=0.2
    """
    from lakepipe.sim.emulator import Faults
    from lakepipe.sim.emulator import serve as run_server

    archive = make_archive(pipeline, param)
    faults = _validated(Faults, parse_options(fault), "fault")
    if log_file is not None and not log_file.parent.exists():
        raise InputNotFoundError(f"log folder {log_file.parent} does not exist; create it")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bound = False

    def ready(emu: ArchiveEmulator) -> None:
        nonlocal bound
        bound = True
        err_console().print(
            f"serving the virtual survey (seed {archive.config.seed}) on {emu.url} — point a "
            f"spec at it with `archive: {{kind: ztf, base_url: {emu.url}}}`; Ctrl-C stops",
            markup=False,
        )

    try:
        run_server(archive, host=host, port=port, faults=faults, ready=ready, log_file=log_file)
    except OSError as exc:
        if bound:
            raise
        why = {
            errno.EADDRINUSE: "is already in use; stop the other server or pick another "
            "--port (--port 0 takes any free one)",
            errno.EACCES: "needs privileges; use a port above 1023",
            errno.EADDRNOTAVAIL: "is not an address of this machine; try --host 127.0.0.1",
        }.get(exc.errno or 0, f"cannot be opened ({exc.strerror})")
        raise UserError(f"cannot listen on {host}:{port}: the address {why}") from None
