"""``calibrate``: per-exposure photometric zeropoints and calibrated magnitudes."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from lakepipe.astro.calibration import (
    calibrated_mag,
    fit_zeropoint,
    instrumental_mag,
    limiting_mag,
)
from lakepipe.stages.base import Partition, Stage, StageContext, StageParams, register_stage


class CalibrateParams(StageParams):
    """Parameters of :class:`CalibrateStage` (units in the names)."""

    mag_system: Literal["AB", "Vega"] = Field(
        "AB", description="Magnitude system of the reference magnitudes (recorded)"
    )
    match_radius_arcsec: float = Field(
        1.0, gt=0, description="Calibration stars: detection-star separation at most (arcsec)"
    )
    min_snr: float = Field(10.0, ge=0, description="Calibration stars: S/N at least")
    flags_mask: int = Field(
        -1, description="Calibration stars: (flags & flags_mask) == 0; -1 rejects any flag"
    )
    ref_mag_range: tuple[float, float] | None = Field(
        None, description="Calibration stars: reference magnitude within [bright, faint]"
    )
    fit_colour_term: bool = Field(
        False, description="Fit a residual colour term on ref_colour with the zeropoint"
    )
    clip_sigma: float = Field(3.0, gt=0, description="Sigma clipping threshold")
    max_iter: int = Field(10, ge=1, description="Clipping iterations at most")
    err_floor_mag: float = Field(0.005, ge=0, description="Per-star error floor (mag)")
    min_stars: int = Field(5, ge=1, description="Fewer usable stars: no zeropoint")
    aperture_index: int = Field(
        0, ge=0, description="Which aperture of the sources stage to calibrate (multi mode)"
    )
    limit_nsigma: float = Field(5.0, gt=0, description="Limiting magnitude significance")
    limit_max_snr: float = Field(
        20.0, gt=0, description="Rows with S/N below this give the blank-sky flux error"
    )


@register_stage("calibrate")
class CalibrateStage(Stage):
    """Fit a photometric zeropoint per exposure and calibrate every source.

    Reads ``sources`` and ``crossmatches`` of a night. Calibration stars are detections
    matched (rank 1, within ``match_radius_arcsec``) to an isolated catalogue star
    (``ref_neighbours == 0``) with a reference magnitude in the exposure's filter,
    unflagged, with S/N >= ``min_snr`` and optionally within ``ref_mag_range`` (to avoid
    saturated or faint stars); each catalogue star counts once. The zeropoint is the
    inverse-variance weighted mean of ``ref_mag - m_inst`` (``m_inst = -2.5 log10(flux/ADU)``)
    after iterative sigma clipping, with its error (Birge-scaled), star counts, scatter and
    χ²/dof, optionally with a residual colour term; the calibrated 5σ limiting magnitude
    uses the median flux error of low-S/N apertures. Writes ``calibrations`` (one row per
    exposure; ``status`` says ``ok`` or ``too_few_stars``) and ``calibrated_sources``
    (every source row of aperture ``aperture_index``: ``mag``, ``mag_err`` including the
    zeropoint error, and its own ``mag_upper_limit`` = ZP - 2.5 log10(5 σ_F) for
    non-detections).

    Example::

        calibrations:
          kind: calibrate
          inputs: [sources, crossmatches]
          mag_system: AB
          ref_mag_range: [14.0, 19.5]
    """

    reads = ("sources", "crossmatches")
    writes = ("calibrations", "calibrated_sources")
    version = "1"

    Params = CalibrateParams

    def partitions(self, ctx: StageContext) -> list[Partition]:
        return [
            Partition.of(reads={"sources": [f"night={n}"], "crossmatches": [f"night={n}"]}, night=n)
            for n in ctx.lake.partition_values("sources", "night")
        ]

    def run(self, ctx: StageContext, partition: Partition) -> dict[str, pa.Table]:
        sources = ctx.lake.read("sources", partitions=[partition.key])
        matches = ctx.lake.read("crossmatches", partitions=[partition.key])
        cal, phot = calibrate_night(sources, matches, self.params)  # type: ignore[arg-type]
        return {"calibrations": cal, "calibrated_sources": phot}


def _np(t: pa.Table, name: str, dtype: type = np.float64) -> np.ndarray:
    """A column as numpy: nulls become NaN (floats), False (bools) or 0 (integers)."""
    fill = {np.float64: np.nan, bool: False}.get(dtype, 0)
    col = t.column(name)
    if dtype is np.float64 and not pa.types.is_floating(col.type):
        col = pc.cast(col, pa.float64())
    return pc.fill_null(col, fill).to_numpy(zero_copy_only=False).astype(dtype)


def calibration_stars(sources: pa.Table, matches: pa.Table, p: CalibrateParams) -> pa.Table:
    """Matched, isolated, unflagged, bright-enough detections with reference magnitudes."""
    m = matches.filter(
        (pc.field("match_rank") == 1)
        & (pc.field("sep_arcsec") <= p.match_radius_arcsec)
        & (pc.field("ref_neighbours") == 0)
        & pc.field("ref_mag").is_valid()
    )
    if p.ref_mag_range is not None:
        lo, hi = p.ref_mag_range
        m = m.filter((pc.field("ref_mag") >= lo) & (pc.field("ref_mag") <= hi))
    # a catalogue star claimed by two detections of one exposure is ambiguous: drop it
    e = m.column("exposure_id").to_numpy()
    r = m.column("ref_id").to_numpy()
    order = np.lexsort((r, e))
    same = (e[order][1:] == e[order][:-1]) & (r[order][1:] == r[order][:-1])
    dup = np.zeros(len(e), dtype=bool)
    dup[order[1:][same]] = True
    dup[order[:-1][same]] = True
    m = m.filter(pa.array(~dup))
    src = sources.select(["source_id", "flux", "flux_err", "snr", "flags", "forced"])
    joined = m.select(["source_id", "exposure_id", "ref_mag", "ref_mag_err", "ref_colour"]).join(
        src, "source_id", join_type="inner"
    )
    flags = _np(joined, "flags", np.int64)
    ok = (
        ((flags & p.flags_mask) == 0)
        & (_np(joined, "snr") >= p.min_snr)
        & ~_np(joined, "forced", bool)
        & (_np(joined, "flux") > 0)
    )
    return joined.filter(pa.array(ok)).sort_by([("exposure_id", "ascending"),
                                                ("source_id", "ascending")])  # fmt: skip


def calibrate_night(
    sources: pa.Table, matches: pa.Table, p: CalibrateParams
) -> tuple[pa.Table, pa.Table]:
    """(``calibrations``, ``calibrated_sources``) of one night."""
    if "aperture_index" in sources.column_names:
        sources = sources.filter(pc.field("aperture_index") == p.aperture_index)
    stars = calibration_stars(sources, matches, p)
    star_exp = _np(stars, "exposure_id", np.int64)
    exp = _np(sources, "exposure_id", np.int64)
    snr = _np(sources, "snr")
    flux_err = _np(sources, "flux_err")
    mi_all, ei_all = instrumental_mag(_np(sources, "flux"), flux_err)

    rows: dict[str, list] = {k: [] for k in (
        "night", "exposure_id", "filter", "mjd", "zeropoint_mag", "zeropoint_err_mag",
        "colour_term", "n_stars", "n_used", "scatter_mag", "chi2_dof", "mag_lim",
        "mag_system", "status")}  # fmt: skip
    zp_of: dict[int, tuple[float, float, float]] = {}
    first = {}
    for i, e in enumerate(exp.tolist()):
        first.setdefault(e, i)
    for e in sorted(first):
        i0 = first[e]
        sel = star_exp == e
        s = stars.filter(pa.array(sel))
        mi, ei = instrumental_mag(_np(s, "flux"), _np(s, "flux_err"))
        zp = zp_err = c = scatter = chi2 = mag_lim = float("nan")
        n_used, status = 0, "too_few_stars"
        colour = _np(s, "ref_colour")
        try:
            fit = fit_zeropoint(
                mi,
                ei,
                _np(s, "ref_mag"),
                _np(s, "ref_mag_err"),
                colour=colour if p.fit_colour_term else None,
                colour_term=None if p.fit_colour_term else 0.0,
                clip_sigma=p.clip_sigma,
                max_iter=p.max_iter,
                err_floor_mag=p.err_floor_mag,
                min_stars=p.min_stars,
            )
        except ValueError:
            pass
        else:
            zp, zp_err, c = fit.zeropoint_mag, fit.zeropoint_err_mag, fit.colour_term
            scatter, chi2, n_used, status = fit.scatter_mag, fit.chi2_dof, fit.n_used, "ok"
            faint = (exp == e) & (snr < p.limit_max_snr)
            mag_lim = limiting_mag(zp, flux_err[faint], p.limit_nsigma)
            zp_of[e] = (zp, zp_err, c)
        rows["night"].append(sources.column("night")[i0].as_py())
        rows["exposure_id"].append(e)
        rows["filter"].append(sources.column("filter")[i0].as_py())
        rows["mjd"].append(sources.column("mjd")[i0].as_py())
        values = {"zeropoint_mag": zp, "zeropoint_err_mag": zp_err, "colour_term": c,
                  "scatter_mag": scatter, "chi2_dof": chi2, "mag_lim": mag_lim}  # fmt: skip
        for k, v in values.items():
            rows[k].append(None if not np.isfinite(v) else float(v))
        rows["n_stars"].append(int(sel.sum()))
        rows["n_used"].append(n_used)
        rows["mag_system"].append(p.mag_system)
        rows["status"].append(status)
    calibrations = pa.table(
        {
            k: pa.array(v, pa.int32() if k in ("n_stars", "n_used") else None)
            for k, v in rows.items()
        }
    )

    # every source: mag = m_inst + ZP (+ colour term where the star's colour is known)
    zp = np.array([zp_of.get(e, (np.nan,) * 3)[0] for e in exp.tolist()])
    zp_err = np.array([zp_of.get(e, (np.nan,) * 3)[1] for e in exp.tolist()])
    cterm = np.nan_to_num(np.array([zp_of.get(e, (np.nan,) * 3)[2] for e in exp.tolist()]))
    colour = _colour_by_source(sources, matches)
    mag, mag_err = calibrated_mag(mi_all, ei_all, 0.0, 0.0)
    mag = mag + zp + cterm * np.nan_to_num(colour)
    mag_err = np.hypot(mag_err, zp_err)
    with np.errstate(divide="ignore", invalid="ignore"):
        upper = zp - 2.5 * np.log10(p.limit_nsigma * flux_err)

    def nullable(x: np.ndarray) -> pa.Array:
        return pa.array(x, mask=~np.isfinite(x))

    keep = ["night", "source_id", "exposure_id", "filter", "mjd", "ra", "dec", "forced",
            "flags", "snr", "flux", "flux_err"]  # fmt: skip
    phot = sources.select(keep)
    phot = phot.append_column("mag", nullable(mag))
    phot = phot.append_column("mag_err", nullable(mag_err))
    phot = phot.append_column("mag_upper_limit", nullable(upper))
    phot = phot.append_column("mag_system", pa.array([p.mag_system] * phot.num_rows))
    return calibrations, phot


def _colour_by_source(sources: pa.Table, matches: pa.Table) -> np.ndarray:
    """ref_colour of each source's nearest counterpart (NaN when unmatched)."""
    first = matches.filter(pc.field("match_rank") == 1).select(["source_id", "ref_colour"])
    ids = sources.column("source_id").to_numpy(zero_copy_only=False)
    out = np.full(len(ids), np.nan)
    if first.num_rows:
        mid = first.column("source_id").to_numpy()
        col = _np(first, "ref_colour")
        order = np.argsort(mid)
        pos = np.searchsorted(mid[order], ids)
        pos = np.clip(pos, 0, len(mid) - 1)
        hit = mid[order][pos] == ids
        out[hit] = col[order][pos[hit]]
    return out
