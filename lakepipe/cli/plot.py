"""``lakepipe plot …``: PNG figures from the lake."""

from __future__ import annotations

from pathlib import Path

import typer

from lakepipe.cli.common import (
    LAKE_OPT,
    PIPELINE_OPT,
    app,
    err_console,
    handle_errors,
    lake_for,
    require_lake,
)
from lakepipe.sql import LakeSQL

plot_app = typer.Typer(
    help="Draw figures from the lake (PNG).\n\n"
    "Example: lakepipe plot lightcurve transient -p demo -o lc.png",
    no_args_is_help=True,
)
app.add_typer(plot_app, name="plot")


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


@plot_app.command("lightcurve")
@handle_errors
def lightcurve(
    target: str = typer.Argument(..., help="object_id in the lightcurves table"),
    out: Path = typer.Option(..., "--output", "-o", help="PNG file to write"),
    t0: str | None = typer.Option(None, "--t0", help="Plot days since T0 (ISO UTC or MJD)"),
    lake: str | None = LAKE_OPT,
    pipeline: str | None = PIPELINE_OPT,
) -> None:
    """Plot a target's lightcurve: error bars, upper-limit arrows, a colour per filter.

    Example: lakepipe plot lightcurve transient -p demo -o lc.png --t0 2025-01-02T00:00:00
    """
    from lakepipe.export.gcn import parse_t0
    from lakepipe.plots import plot_lightcurve

    lk = require_lake(lake_for(lake, pipeline))
    rows = LakeSQL(lk).query(
        f"select * from lightcurves where object_id = {_sql_str(target)} order by mjd"
    )
    t0_mjd = parse_t0(t0) if t0 is not None else None
    path = plot_lightcurve(rows, target, out, t0_mjd=t0_mjd)
    err_console().print(f"wrote {path} ({rows.num_rows} points)", markup=False)


@plot_app.command("cutouts")
@handle_errors
def cutouts(
    target: str = typer.Argument(
        ..., help="A cutouts target_id, or an object_id of the lightcurves table"
    ),
    out: Path = typer.Option(..., "--output", "-o", help="PNG file to write"),
    size_arcsec: float = typer.Option(
        60.0, "--size-arcsec", help="Side of each stamp around the target (0: whole cutout)"
    ),
    aperture_arcsec: float | None = typer.Option(
        None,
        "--aperture-arcsec",
        help="Circle radius (default: the aperture the sources stage used, else 5)",
    ),
    lake: str | None = LAKE_OPT,
    pipeline: str | None = PIPELINE_OPT,
) -> None:
    """Plot a grid of stamps of a target (zscale) with the aperture drawn.

    TARGET is a cutout target (e.g. `center`) or an object of the lightcurves table (a
    lightcurve target such as `transient`, or a catalogue id): then every cutout whose
    square holds its position is used.

    Example: lakepipe plot cutouts transient -p demo -o stamps.png
    """
    from lakepipe.plots import plot_cutouts

    lk = require_lake(lake_for(lake, pipeline))
    sql = LakeSQL(lk)
    t = _sql_str(target)
    aperture = (  # the radius the sources stage used on each image, when it ran
        "(select max(s.aperture_radius_pix * s.pixscale_arcsec) from image_stats s "
        "where s.cutout_id = c.cutout_id) as aperture_arcsec"
    )
    base = (
        f"select c.*, e.mjd, e.filter, {aperture} from cutouts c "
        "left join exposures e using (exposure_id) where c.status in ('ok', 'partial')"
    )
    rows = sql.query(f"{base} and c.target_id = {t} order by e.mjd")
    position = None
    if rows.num_rows == 0:  # an object: the cutouts whose square holds its position
        obj = sql.query(f"select ra, dec from lightcurves where object_id = {t} limit 1")
        if obj.num_rows:
            ra, dec = obj.column("ra")[0].as_py(), obj.column("dec")[0].as_py()
            position = (ra, dec)
            rows = sql.query(
                f"{base} and abs(c.dec - {dec!r}) < c.size_arcsec / 7200.0 and "
                f"abs(((c.ra - {ra!r} + 540) % 360) - 180) * cos(radians({dec!r})) "
                "< c.size_arcsec / 7200.0 order by e.mjd"
            )
    path = plot_cutouts(
        rows,
        lk.files.abspath,
        target,
        out,
        position=position,
        size_arcsec=size_arcsec or None,
        aperture_arcsec=aperture_arcsec,
    )
    err_console().print(f"wrote {path} ({min(rows.num_rows, 36)} stamps)", markup=False)


@plot_app.command("tube")
@handle_errors
def tube(
    designation: str = typer.Argument(..., help="designation in the tube_nodes table"),
    out: Path = typer.Option(..., "--output", "-o", help="PNG file to write"),
    lake: str | None = LAKE_OPT,
    pipeline: str | None = PIPELINE_OPT,
) -> None:
    """Plot an object's ephemeris tube, the planned exposures' footprints and detections.

    Example: lakepipe plot tube SIM0001 -p neo-recovery -o tube.png
    """
    from lakepipe.plots_tube import plot_tube

    lk = require_lake(lake_for(lake, pipeline))
    sql = LakeSQL(lk)
    d = _sql_str(designation)
    nodes = sql.query(f"select * from tube_nodes where designation = {d} order by mjd")
    tables = set(
        sql.query("select table_name from information_schema.tables").column(0).to_pylist()
    )
    footprints = detections = None
    if {"plan", "exposures"} <= tables:
        footprints = sql.query(
            "select distinct e.* from exposures e join plan p using (exposure_id) "
            f"where p.designation = {d}"
        )
    if "recoveries" in tables:
        detections = sql.query(f"select * from recoveries where designation = {d}")
    path = plot_tube(nodes, out, designation=designation, footprints=footprints,
                     detections=detections)  # fmt: skip
    n_fp = 0 if footprints is None else footprints.num_rows
    err_console().print(f"wrote {path} ({nodes.num_rows} nodes, {n_fp} footprints)", markup=False)
