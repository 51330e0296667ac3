"""The photometry table astronomers paste into a GCN circular.

``lakepipe export lightcurves --format gcn --target NAME --t0 2025-01-03T04:05:06``
writes, for one object of the ``lightcurves`` table, a fixed-width text table::

    T-T0 (d) | Telescope | Filter | Exp (s) | Mag (AB)       | MJD
    ---------|-----------|--------|---------|----------------|-----------
       0.512 | ZTF       | r      |      30 | 19.23 +/- 0.05 | 60678.6841
       1.480 | ZTF       | g      |      30 | > 20.80        | 60679.6518

Upper limits are written ``> limit`` (5 sigma). Times since T0 are in the unit that
suits the span (s, min, h or d), magnitudes in the system the table records, not
corrected for Galactic extinction (said in a footer line, with T0 as ISO UTC and MJD).
Options (``--opt k=v``): ``rows=all|first`` (``first``: the first detection at or after
T0 in each filter; limits and earlier rows are left out), ``telescope=NAME`` (default
from the exposures' archive), ``decimals=2``. The layout follows the tables of
published GCN circulars (gcn.nasa.gov/circulars); there is no formal standard.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from lakepipe.errors import UserError
from lakepipe.export.base import ExportMeta, register_format
from lakepipe.sql import _sql_str

TELESCOPES = {"sim": "ZTF (sim)", "ztf": "ZTF", "fits_dir": "telescope"}
FILTER_NAMES = {"zg": "g", "zr": "r", "zi": "i"}


def _source(table: str, options: dict[str, Any]) -> str | None:
    """The target's lightcurve rows (``rows=first``: its first detection after T0 per
    filter) with exposure time and archive, selected in SQL so only they are read.

    When that selects nothing, the query returns instead the first object ids of the
    table (``object_id`` only, the other columns null) so that the error can list them.
    """
    if table != "lightcurves" or options.get("target") is None:
        return None
    target = _sql_str(str(options["target"]))
    rows = (
        "select l.*, e.exptime_s, e.archive from lightcurves l "
        f"left join exposures e using (exposure_id) where l.object_id = {target}"
    )
    if str(options.get("rows", "all")) == "first":
        t0 = parse_t0(options.get("t0"))
        rows = (
            f"select * exclude (_n) from (select *, row_number() over (partition by filter "
            f"order by mjd) as _n from ({rows}) where not upper_limit and mjd >= {t0!r}) "
            "where _n = 1"
        )
    others = (
        "select object_id from (select distinct object_id from lightcurves order by 1 "
        f"limit 11) where not exists ({rows})"
    )
    return f"{rows} union all by name {others}"


def parse_t0(value: Any) -> float:
    """T0 as MJD (UTC) from an ISO time or a number (MJD)."""
    if value is None:
        raise UserError(
            "the gcn format needs --t0 (ISO UTC time such as 2025-01-03T04:05:06, or MJD)"
        )
    if isinstance(value, int | float):
        return float(value)
    from astropy.time import Time

    try:
        return float(Time(str(value), scale="utc").mjd)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            raise UserError(
                f"--t0 {value!r} is neither an ISO time (2025-01-03T04:05:06) nor an MJD"
            ) from None


def time_unit(dt_days: np.ndarray) -> tuple[str, float]:
    """(unit label, days→unit factor) for a span of times since T0."""
    span = float(np.nanmax(np.abs(dt_days))) if len(dt_days) else 0.0
    if span < 600 / 86400:
        return "s", 86400.0
    if span < 2 / 24:
        return "min", 1440.0
    if span < 2.0:
        return "h", 24.0
    return "d", 1.0


def gcn_rows(table: pa.Table, target: str, t0_mjd: float, options: dict[str, Any]) -> list[dict]:
    """The rows of the GCN table for ``target`` (sorted by time); ``rows=first`` keeps the
    first detection at or after ``t0_mjd`` in each filter."""
    mode = str(options.get("rows", "all"))
    if mode not in ("all", "first"):
        raise UserError(
            f"--opt rows={mode!r}: use rows=all or rows=first (first detection after T0 per filter)"
        )
    all_rows = table.to_pylist()
    # rows without an exposure are the object list of _source (nothing selected)
    rows = [
        r
        for r in all_rows
        if str(r.get("object_id")) == str(target) and r.get("exposure_id") is not None
    ]
    if not rows:
        ids = sorted({str(r.get("object_id")) for r in all_rows})
        shown = ", ".join(ids[:10]) + (" …" if len(ids) > 10 else "")
        if mode == "first" and str(target) in ids:
            raise UserError(f"target {target!r} has no detection after T0 (MJD {t0_mjd:.5f})")
        raise UserError(f"no lightcurve rows for target {target!r}; objects: {shown or '(none)'}")
    rows.sort(key=lambda r: (r["mjd"] is None, r["mjd"]))
    if mode == "first":
        seen: set[str] = set()
        rows = [
            r
            for r in rows
            if not r.get("upper_limit")
            and r["mjd"] is not None
            and r["mjd"] >= t0_mjd
            and not (r["filter"] in seen or seen.add(r["filter"]))
        ]
        if not rows:
            raise UserError(f"target {target!r} has no detection after T0 (MJD {t0_mjd:.5f})")
    return rows


@register_format("gcn", suffixes=(".gcn", ".gcn.txt"), source=_source)
def write_gcn(table: pa.Table, out: BinaryIO, meta: ExportMeta) -> None:
    """GCN circular photometry table: time since T0, telescope, filter, mag or > limit;
    ``--opt rows=first`` keeps the first detection after T0 in each filter."""
    opts = meta.options
    target = opts.get("target")
    if target is None:
        raise UserError("the gcn format needs --target NAME (an object_id of lightcurves)")
    t0 = parse_t0(opts.get("t0"))
    rows = gcn_rows(table, str(target), t0, opts)
    decimals = int(opts.get("decimals", 2))
    dt = np.array([r["mjd"] - t0 for r in rows], dtype=float)
    unit, factor = time_unit(dt)
    systems = {r.get("mag_system") for r in rows if r.get("mag_system")}
    system = systems.pop() if len(systems) == 1 else "mixed"
    header = [f"T-T0 ({unit})", "Telescope", "Filter", "Exp (s)", f"Mag ({system})", "MJD"]
    body = []
    for r, t in zip(rows, dt * factor, strict=True):
        tel = opts.get("telescope") or TELESCOPES.get(str(r.get("archive")), r.get("archive") or "")
        if r.get("upper_limit"):
            lim = r.get("limit_mag")
            mag = f"> {lim:.{decimals}f}" if lim is not None else "not detected"
        else:
            mag = f"{r['mag']:.{decimals}f} +/- {r['mag_err']:.{decimals}f}"
        exp = r.get("exptime_s")
        body.append(
            [
                f"{t:.3f}",
                str(tel),
                FILTER_NAMES.get(r["filter"], r["filter"]),
                f"{exp:.0f}" if exp is not None else "",
                mag,
                f"{r['mjd']:.4f}",
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    right = {0, 3, 5}

    def line(cells: list[str]) -> str:
        return " | ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    lines = [line(header), "-|-".join("-" * w for w in widths)]
    lines += [line(b) for b in body]
    lines.append("")
    from astropy.time import Time

    iso = Time(t0, format="mjd", scale="utc").isot
    lines.append(
        f"T0 = {iso} UTC (MJD {t0:.5f}). Magnitudes are in the {system} system, not corrected for "
        "Galactic extinction; limits are 5-sigma."
    )
    out.write(("\n".join(lines) + "\n").encode())
