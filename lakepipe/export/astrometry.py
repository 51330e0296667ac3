"""Astrometry for the Minor Planet Center: ADES PSV and MPC 80-column records.

The table needs the columns of :data:`lakepipe.astro.astrometry.ASTROMETRY_SCHEMA`
(``designation, mjd, ra, dec, sigma_ra_arcsec, sigma_dec_arcsec, mag, band, obs_code``);
common lake names are accepted too (``object_id`` for ``designation``, ``sigma_arcsec``
for both sigmas, ``filter`` for ``band``), and ``--opt obs_code=I41`` supplies a station
for tables without one. The record layouts are written by ``lakepipe.astro.astrometry``.

ADES options fill the obsContext header the ADES submit schema requires and the
astrometric catalogue of every record (:class:`lakepipe.astro.astrometry.AdesContext`)::

    lakepipe export --sql "select * from recoveries where accepted" -f ades -o rec.psv \
        --opt submitter="A. Observer" --opt observers="A. Observer, B. Helper" \
        --opt measurers="A. Observer" --opt institution="Some Observatory" \
        --opt telescope_design=Schmidt --opt telescope_aperture=1.22 \
        --opt telescope_detector=CCD --opt astCat=Gaia3

Designations that ADES (trkSub: 8 characters) or the 80-column records (7) cannot hold
are refused with the fix instead of being truncated.
"""

from __future__ import annotations

from typing import Any, BinaryIO

import pyarrow as pa

from lakepipe.astro.astrometry import AdesContext, format_ades_psv, format_mpc80, make_astrometry
from lakepipe.errors import UserError
from lakepipe.export.base import ExportMeta, register_format

ALIASES = {
    "designation": ("designation", "object_id", "target_id", "provisional_id"),
    "sigma_ra_arcsec": ("sigma_ra_arcsec", "sigma_arcsec", "ra_err_arcsec"),
    "sigma_dec_arcsec": ("sigma_dec_arcsec", "sigma_arcsec", "dec_err_arcsec"),
    "band": ("band", "filter"),
    "obs_code": ("obs_code", "stn", "station"),
}


def _column(table: pa.Table, name: str, options: dict[str, Any]) -> Any:
    for alias in ALIASES.get(name, (name,)):
        if alias in table.column_names:
            return table.column(alias).to_pylist()
    if name in options:
        return options[name]
    return None


def as_astrometry(table: pa.Table, options: dict[str, Any]) -> pa.Table:
    """The normalised astrometry table from a lake table or query result."""
    missing = [
        c
        for c in ("designation", "mjd", "ra", "dec", "obs_code")
        if _column(table, c, options) is None
    ]
    if missing:
        raise UserError(
            f"astrometry export needs column(s) {', '.join(missing)} (have: "
            f"{', '.join(table.column_names)}); rename them in --sql or pass --opt obs_code=I41"
        )
    band = _column(table, "band", options)
    if band is not None and not isinstance(band, str):
        band = [{"zg": "g", "zr": "r", "zi": "i"}.get(b, b) if b else None for b in band]
    kwargs = {
        "designation": _column(table, "designation", options),
        "mjd": _column(table, "mjd", options),
        "ra": _column(table, "ra", options),
        "dec": _column(table, "dec", options),
        "obs_code": _column(table, "obs_code", options),
        "mag": _column(table, "mag", options),
        "band": band,
    }
    sig_ra = _column(table, "sigma_ra_arcsec", options)
    if sig_ra is not None:
        kwargs["sigma_ra_arcsec"] = sig_ra
        kwargs["sigma_dec_arcsec"] = _column(table, "sigma_dec_arcsec", options)
    return make_astrometry(**kwargs)


@register_format("ades", suffixes=(".psv", ".ades"))
def write_ades(table: pa.Table, out: BinaryIO, meta: ExportMeta) -> None:
    """IAU ADES PSV (version 2017) astrometry for submission to the MPC."""
    context = AdesContext.from_options(meta.options)
    lines = format_ades_psv(as_astrometry(table, meta.options), context)
    out.write(("\n".join(lines) + "\n").encode())


@register_format("mpc80", suffixes=(".obs", ".mpc"))
def write_mpc80(table: pa.Table, out: BinaryIO, meta: ExportMeta) -> None:
    """MPC 80-column optical astrometry records."""
    lines = format_mpc80(as_astrometry(table, meta.options))
    out.write(("\n".join(lines) + "\n").encode())
