"""``changes``: catalogue stars that vanished and detections that appeared, per night."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from lakepipe.astro.crossmatch import angular_separation_arcsec, crossmatch
from lakepipe.astro.wcs import gnomonic, inside_image, measured_areas, measured_images
from lakepipe.catalogs import CatalogConfig, Cone, open_catalog
from lakepipe.stages.base import Partition, Stage, StageContext, StageParams, register_stage
from lakepipe.stages.crossmatch import BandMap, reference_mags

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))  # Gaussian FWHM / σ ≈ 2.3548


class ChangesParams(StageParams):
    """Parameters of :class:`ChangesStage` (units in the names)."""

    catalog: CatalogConfig = Field(..., description="Reference catalogue and its columns")
    bands: dict[str, BandMap] = Field(
        default_factory=dict, description="Survey filter → reference magnitude recipe"
    )
    margin_mag: float = Field(
        1.0, ge=0, description="Vanished: star brighter than the exposure's mag_lim by this"
    )
    radius_arcsec: float = Field(
        2.0,
        gt=0,
        description="Vanished: no detection of the exposure within this radius, or within "
        "the seeing FWHM (exposures.seeing_fwhm_arcsec) when larger",
    )
    edge_margin_arcsec: float = Field(
        15.0, ge=0, description="Vanished: star at least this far inside the image/cutout"
    )
    blend_arcsec: float = Field(
        5.0,
        ge=0,
        description="Vanished: skip stars with a catalogue neighbour within this radius "
        "brighter than the star + 1 mag (the two blend into one detection), or within "
        "blend_fwhm seeing FWHMs when larger",
    )
    blend_fwhm: float = Field(2.0, ge=0, description="See blend_arcsec (FWHM units)")
    isolation_arcsec: float = Field(
        10.0,
        ge=0,
        description="Vanished: skip stars with a catalogue neighbour within this radius "
        "brighter than the star - bright_neighbour_dmag (lost in its halo)",
    )
    bright_neighbour_dmag: float = Field(2.0, ge=0, description="See isolation_arcsec (mag)")
    confusion_arcsec: float = Field(
        5.0,
        ge=0,
        description="Vanished: skip stars with a detection without catalogue counterpart "
        "within this radius (a defect or a displaced centroid may have taken the star)",
    )
    min_snr: float = Field(7.0, gt=0, description="Appeared: S/N at least")
    flags_mask: int = Field(
        254,
        description="Appeared: (flags & flags_mask) == 0; the default 254 allows only the "
        "blend bit (1: a new source next to a star is deblended from it); -1: no flag",
    )
    size_ratio_range: tuple[float, float] = Field(
        (0.8, 1.5),
        description="Appeared: the detection's size √(a b) over the median size of "
        "catalogue-matched stars of similar S/N in the exposure (1 for a point source; "
        "hot pixels and cosmic rays are sharper than the PSF)",
    )
    min_axis_ratio: float = Field(
        0.6, ge=0, le=1, description="Appeared: b/a at least (rejects trails and columns)"
    )
    counterpart_max_dmag: float = Field(
        2.0,
        gt=0,
        description="Appeared: a catalogue counterpart fainter than the detection by more "
        "than this does not explain it (a chance faint neighbour, or a flare/transient "
        "on a faint star): the detection is listed, with the counterpart",
    )
    min_repeats: int = Field(
        2,
        ge=1,
        description="Appeared: detected (passing the cuts, uncatalogued) in at least this "
        "many exposures of the night within repeat_radius_arcsec (rejects asteroids)",
    )
    repeat_radius_arcsec: float = Field(1.5, gt=0, description="Appeared: repeat radius")


@register_stage("changes")
class ChangesStage(Stage):
    """List catalogue stars that should have been seen but were not, and real new sources.

    One partition per night. ``vanished``: one row per (calibrated exposure, catalogue
    star) where the star lies inside the measured image — the exposure footprint
    (``exposures`` corners) or the cutout measured from it (``cutouts``), at least
    ``edge_margin_arcsec`` inside — is brighter than the exposure's calibrated 5σ
    limit (``calibrations.mag_lim``) by ``margin_mag`` in the exposure's filter
    (``bands``), has no catalogue neighbour that could swallow it within
    ``isolation_arcsec``, and has no detection (forced rows excluded) within
    ``radius_arcsec``. ``appeared``: one row per detection with no ``crossmatches``
    counterpart that is unflagged, has S/N >= ``min_snr``, is PSF-like (FWHM over the
    image FWHM within ``fwhm_ratio_range``, axis ratio >= ``min_axis_ratio``: not a
    cosmic ray, hot pixel or column) and repeats in ``min_repeats`` exposures of the
    night (not an asteroid). The catalogue is read only around the night's exposures,
    proper motions applied to the night's mean epoch.

    Reads: exposures, sources, crossmatches, calibrations, calibrated_sources (and
    cutouts when the sources were measured on cutouts). Writes: vanished, appeared.

    Example::

        changes:
          kind: changes
          inputs: [exposures, cutouts, sources, crossmatches, calibrations]
          catalog: {kind: archive, columns: {id: source_id, mags: {G: phot_g_mean_mag}}}
          bands: {zr: {band: G, offset_mag: 0.05}}
          margin_mag: 1.0

    Then ``select ref_id, count(*) as n_missed from vanished group by 1 order by 2 desc``.
    """

    reads = ("exposures", "sources", "crossmatches", "calibrations", "calibrated_sources")
    optional_reads = ("cutouts",)
    writes = ("vanished", "appeared")
    version = "1"

    Params = ChangesParams

    @property
    def uses_archive(self) -> bool:  # type: ignore[override]
        """The archive is an input only when it is also the reference catalog."""
        return self.params.catalog.kind == "archive"

    def input_files(self, ctx: StageContext) -> list[Path]:
        path = self.params.catalog.path
        return [ctx.resolve(path)] if path else []

    def partitions(self, ctx: StageContext) -> list[Partition]:
        tables = [t for t in (*self.reads, *self.optional_reads) if t in ctx.lake.tables()]
        return [
            Partition.of(reads={t: [f"night={n}"] for t in tables}, night=n)
            for n in ctx.lake.partition_values("calibrations", "night")
        ]

    def run(self, ctx: StageContext, partition: Partition) -> dict[str, pa.Table]:
        p: ChangesParams = self.params  # type: ignore[assignment]
        key = [partition.key]

        def read(table: str) -> pa.Table:
            return ctx.lake.read(table, partitions=key)

        sources = read("sources")
        cutouts = read("cutouts") if "cutouts" in ctx.lake.tables() else None
        catalog = open_catalog(p.catalog, ctx.spec_dir, ctx.archive)
        matches = read("crossmatches")
        vanished = find_vanished(read("exposures"), cutouts, sources, matches,
                                 read("calibrations"), catalog, p)  # fmt: skip
        appeared = find_appeared(sources, read("calibrated_sources"), matches, p)
        return {"vanished": vanished, "appeared": appeared}


# -- vanished ----------------------------------------------------------------------------


def _f64(t: pa.Table, name: str) -> np.ndarray:
    col = t.column(name)
    if not pa.types.is_floating(col.type):
        col = pc.cast(col, pa.float64())
    return pc.fill_null(col, np.nan).to_numpy(zero_copy_only=False)


def find_vanished(
    exposures: pa.Table,
    cutouts: pa.Table | None,
    sources: pa.Table,
    matches: pa.Table,
    calibrations: pa.Table,
    catalog: object,
    p: ChangesParams,
) -> pa.Table:
    """``vanished`` rows of one night (see :class:`ChangesStage`)."""
    cal = calibrations.filter(
        (pc.field("status") == "ok") & pc.field("mag_lim").is_valid()
    ).to_pylist()
    exp_by_id = {r["exposure_id"]: r for r in exposures.to_pylist()}
    cal = [c for c in cal if c["exposure_id"] in exp_by_id and c["filter"] in p.bands]
    if not cal:
        return _empty("vanished")
    det = sources.filter(~pc.field("forced") & pc.field("ra").is_valid())
    cut_by_id = {r["cutout_id"]: r for r in cutouts.to_pylist()} if cutouts is not None else {}
    measured = measured_images(sources.column("exposure_id"), sources.column("cutout_id"))

    cones, epochs = [], []
    for c in cal:
        e = exp_by_id[c["exposure_id"]]
        r = angular_separation_arcsec(
            np.array([e[f"ra{i}"] for i in range(1, 5)]),
            np.array([e[f"dec{i}"] for i in range(1, 5)]),
            e["ra"],
            e["dec"],
        )
        cones.append(Cone(e["ra"], e["dec"], float(np.nanmax(r)) / 3600.0 + 0.01))
        epochs.append(e["mjd"])
    ref = catalog.read(cones, epoch_mjd=float(np.mean(epochs)))  # type: ignore[attr-defined]
    if ref.num_rows == 0:
        return _empty("vanished")
    rra, rdec = ref.column("ra").to_numpy(), ref.column("dec").to_numpy()
    rid = ref.column("ref_id").to_numpy()
    mags = {f: reference_mags(ref, b)[0] for f, b in p.bands.items()}
    i1 = i2 = np.empty(0, np.int64)
    sep12 = np.empty(0)
    seeing = [exp_by_id[c["exposure_id"]].get("seeing_fwhm_arcsec") or 0.0 for c in cal]
    reach = max(p.isolation_arcsec, p.blend_arcsec, p.blend_fwhm * max(seeing))
    if reach > 0:
        near = crossmatch(rra, rdec, rra, rdec, reach, mode="all", workers=1)
        other = near.idx1 != near.idx2
        i1, i2, sep12 = near.idx1[other], near.idx2[other], near.sep_arcsec[other]

    dexp = det.column("exposure_id").to_numpy()
    dra, ddec = _f64(det, "ra"), _f64(det, "dec")
    known = matches.column("source_id").combine_chunks()
    dlone = ~pc.is_in(det.column("source_id"), value_set=known).to_numpy(zero_copy_only=False)
    rows: dict[str, list] = {k: [] for k in (
        "night", "exposure_id", "cutout_id", "filter", "mjd", "ref_id", "ra", "dec",
        "ref_mag", "mag_lim", "depth_margin_mag", "nearest_sep_arcsec")}  # fmt: skip
    seen: set[tuple[int, int]] = set()
    for c in cal:
        eid = c["exposure_id"]
        e = exp_by_id[eid]
        mag = mags[c["filter"]]
        fwhm = e.get("seeing_fwhm_arcsec") or 0.0
        radius = max(p.radius_arcsec, fwhm)
        blend_radius = max(p.blend_arcsec, p.blend_fwhm * fwhm)
        bright = np.isfinite(mag) & (mag <= c["mag_lim"] - p.margin_mag)
        swallowed = np.zeros(len(mag), bool)
        if len(i1):
            blend = (sep12 <= blend_radius) & (mag[i2] < mag[i1] + 1.0)
            halo = (sep12 <= p.isolation_arcsec) & (mag[i2] < mag[i1] - p.bright_neighbour_dmag)
            swallowed[i1[blend | halo]] = True
        xy = gnomonic(rra, rdec, e["ra"], e["dec"])
        here = dexp == eid
        for cut_id, cut in measured_areas(measured, eid, cut_by_id):
            inside = inside_image(xy, e, cut, p.edge_margin_arcsec / 3600.0)
            cand = np.flatnonzero(bright & inside & ~swallowed)
            if cand.size == 0:
                continue
            sep = np.full(cand.size, np.nan)
            if here.any():
                m = crossmatch(rra[cand], rdec[cand], dra[here], ddec[here], 3600.0,
                               mode="nearest", workers=1)  # fmt: skip
                sep[m.idx1] = m.sep_arcsec
            miss = ~(sep <= radius)
            lone = here & dlone
            if p.confusion_arcsec > 0 and lone.any() and miss.any():
                c2 = crossmatch(rra[cand], rdec[cand], dra[lone], ddec[lone],
                                p.confusion_arcsec, mode="nearest", workers=1)  # fmt: skip
                miss[c2.idx1] = False
            for j, s in zip(cand[miss], sep[miss], strict=True):
                if (eid, j) in seen:
                    continue  # overlapping cutouts of one exposure: list the star once
                seen.add((eid, j))
                rows["night"].append(c["night"])
                rows["exposure_id"].append(eid)
                rows["cutout_id"].append(cut_id)
                rows["filter"].append(c["filter"])
                rows["mjd"].append(c["mjd"])
                rows["ref_id"].append(int(rid[j]))
                rows["ra"].append(float(rra[j]))
                rows["dec"].append(float(rdec[j]))
                rows["ref_mag"].append(float(mag[j]))
                rows["mag_lim"].append(float(c["mag_lim"]))
                rows["depth_margin_mag"].append(float(c["mag_lim"] - mag[j]))
                rows["nearest_sep_arcsec"].append(None if not np.isfinite(s) else float(s))
    if not rows["night"]:
        return _empty("vanished")
    types = {"cutout_id": pa.int64(), "exposure_id": pa.int64(), "ref_id": pa.int64()}
    return pa.table({k: pa.array(v, types.get(k)) for k, v in rows.items()})


# -- appeared ----------------------------------------------------------------------------


def find_appeared(
    sources: pa.Table, calibrated: pa.Table, matches: pa.Table, p: ChangesParams
) -> pa.Table:
    """``appeared`` rows of one night (see :class:`ChangesStage`)."""
    if "aperture_index" in sources.column_names:
        sources = sources.filter(pc.field("aperture_index") == 0)
    det = sources.filter(~pc.field("forced") & pc.field("ra").is_valid())
    det = det.join(calibrated.select(["source_id", "mag", "mag_err"]), "source_id")
    first = matches.filter(pc.field("match_rank") == 1)
    det = det.join(
        first.select(["source_id", "ref_id", "ref_mag", "sep_arcsec"]), "source_id"
    ).sort_by([("exposure_id", "ascending"), ("source_id", "ascending")])
    if det.num_rows == 0:
        return _empty("appeared")
    flags = pc.fill_null(det.column("flags"), 0).to_numpy(zero_copy_only=False)
    snr = _f64(det, "snr")
    a, b = _f64(det, "a_pix"), _f64(det, "b_pix")
    size = np.sqrt(a * b)
    mag, ref_mag = _f64(det, "mag"), _f64(det, "ref_mag")
    has_ref = ~pc.is_null(det.column("ref_id")).to_numpy(zero_copy_only=False)
    explained = has_ref & ~(ref_mag > mag + p.counterpart_max_dmag)
    exp = det.column("exposure_id").to_numpy()
    # the point-source size at each S/N, from the exposure's clean catalogued stars
    ratio = np.full(det.num_rows, np.nan)
    clean = explained & (flags == 0) & np.isfinite(size) & (snr > 0)
    for e in np.unique(exp):
        ref = clean & (exp == e)
        if ref.sum() < 10:
            continue
        order = np.argsort(snr[ref])
        lsnr, rsize = np.log10(snr[ref][order]), size[ref][order]
        here = np.flatnonzero(exp == e)
        pos = np.searchsorted(lsnr, np.log10(np.maximum(snr[here], 1e-3)))
        # median over the 2k catalogued stars nearest in S/N: every window's median once
        k = 15
        w = min(2 * k, len(rsize))
        medians = np.median(np.lib.stride_tricks.sliding_window_view(rsize, w), axis=1)
        lo = np.minimum(np.maximum(pos - k, 0), len(rsize) - w)
        ratio[here] = size[here] / medians[lo]
    with np.errstate(divide="ignore", invalid="ignore"):
        axis = b / a
    lo, hi = p.size_ratio_range
    ok = (
        ~explained
        & ((flags & p.flags_mask) == 0)
        & (snr >= p.min_snr)
        & (ratio >= lo)
        & (ratio <= hi)
        & (axis >= p.min_axis_ratio)
    )
    det, ratio, axis = det.filter(pa.array(ok)), ratio[ok], axis[ok]
    if det.num_rows == 0:
        return _empty("appeared")
    ra, dec = _f64(det, "ra"), _f64(det, "dec")
    exp = det.column("exposure_id").to_numpy()
    pairs = crossmatch(ra, dec, ra, dec, p.repeat_radius_arcsec, mode="all", workers=1)
    # distinct exposures among each detection's neighbours (itself included)
    key = np.unique(np.column_stack([pairs.idx1, exp[pairs.idx2]]), axis=0)
    repeats = np.bincount(key[:, 0], minlength=det.num_rows)
    keep = repeats >= p.min_repeats
    det = det.filter(pa.array(keep))
    if det.num_rows == 0:
        return _empty("appeared")
    cols = ["night", "source_id", "exposure_id", "filter", "mjd", "ra", "dec", "mag",
            "mag_err", "snr", "flags"]  # fmt: skip
    out = det.select(cols)
    out = out.append_column("size_ratio", pa.array(ratio[keep]))
    out = out.append_column("axis_ratio", pa.array(axis[keep]))
    out = out.append_column("n_repeats", pa.array(repeats[keep].astype(np.int32)))
    for name in ("ref_id", "ref_mag", "sep_arcsec"):
        out = out.append_column(name if name != "sep_arcsec" else "ref_sep_arcsec",
                                det.column(name))  # fmt: skip
    return out


def _empty(table: str) -> pa.Table:
    from lakepipe.tables import get_contract

    return get_contract(table).empty().drop_columns(["_healpix_29"])
