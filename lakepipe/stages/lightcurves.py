"""``lightcurves``: per-object calibrated lightcurves and variability statistics."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from lakepipe.astro.crossmatch import crossmatch
from lakepipe.astro.variability import lightcurve_stats
from lakepipe.astro.wcs import gnomonic, inside_image, measured_areas, measured_images
from lakepipe.stages.base import Partition, Stage, StageContext, StageParams, register_stage

SOURCE_COLUMNS = [
    "source_id",
    "exposure_id",
    "filter",
    "mjd",
    "ra",
    "dec",
    "forced",
    "snr",
    "mag",
    "mag_err",
    "mag_upper_limit",
    "mag_system",
    "flags",
]


class LightcurveTarget(BaseModel):
    """A named position (deg, ICRS)."""

    model_config = ConfigDict(extra="forbid")
    id: str | int = Field(description="Target name or id (stored as text)")
    ra: float = Field(ge=0.0, lt=360.0, description="Right ascension (deg)")
    dec: float = Field(ge=-90.0, le=90.0, description="Declination (deg)")


def bucket_of(object_id: str, buckets: int) -> int:
    """Stable hash bucket of an object id (first 8 bytes of SHA-256, modulo ``buckets``)."""
    digest = hashlib.sha256(object_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % buckets


@register_stage("lightcurves")
class LightcurvesStage(Stage):
    """Lightcurves (one row per object per exposure) and per-object, per-filter statistics.

    Objects, all that are given:

    - ``targets``: named positions ``[{id, ra, dec}]``;
    - ``targets_sql``: a query over the lake returning ``id, ra, dec`` (list the stage
      writing the queried table in ``inputs``);
    - ``catalog_min_detections``: every reference-catalogue star matched (rank 1) to at
      least this many detections (reads ``crossmatches``).

    For a target, each exposure contributes its nearest detection within
    ``match_radius_arcsec`` with S/N >= ``detection_snr``, or else a forced-photometry
    row at the position (the ``sources`` stage's ``forced`` positions), or else its
    nearest fainter detection; rows with S/N below ``detection_snr`` are upper limits at
    the row's own 5σ limit (``mag_upper_limit``). Catalogue objects
    get their matched detections (the nearest per exposure). Every other calibrated
    exposure whose measured area (the ``exposures`` footprint, or the cutouts the
    ``sources`` stage measured) covers an object, ``coverage_margin_arcsec`` inside, adds
    an upper limit at the exposure's calibrated 5σ limit (``calibrations.mag_lim``;
    ``source_id`` and ``forced`` null): an object that vanished still gets a row.
    Reads ``calibrated_sources`` (all nights); writes
    ``lightcurves`` and ``lightcurve_stats`` (weighted mean, χ²/dof, amplitude, Stetson
    J, von Neumann η, upper-limit counts; see :mod:`lakepipe.astro.variability`),
    partitioned by a hash ``bucket`` of the object id.

    Example::

        lightcurves:
          kind: lightcurves
          inputs: [calibrations, crossmatches]
          targets: [{id: sn2025abc, ra: 150.1123, dec: 2.3051}]
          catalog_min_detections: 5

    Variables then stand out in one query::

        select object_id, filter, n_det, chi2_dof, stetson_j from lightcurve_stats
        where n_det >= 5 order by stetson_j desc limit 20
    """

    reads = ("calibrated_sources",)
    optional_reads = ("crossmatches", "calibrations", "exposures", "cutouts", "sources")
    writes = ("lightcurves", "lightcurve_stats")
    version = "1"

    class Params(StageParams):
        targets: list[LightcurveTarget] = Field(default_factory=list, description="Positions")
        targets_sql: str | None = Field(None, description="SQL returning id, ra, dec")
        catalog_min_detections: int | None = Field(
            None, ge=1, description="Also every catalogue star with this many detections"
        )
        match_radius_arcsec: float = Field(1.5, gt=0, description="Target-source radius")
        detection_snr: float = Field(5.0, gt=0, description="Below: an upper limit")
        buckets: int = Field(4, ge=1, le=256, description="Hash buckets of object ids")
        coverage_limits: bool = Field(
            True,
            description="Exposures whose measured area (footprint or cutout) covers an "
            "object but have no row for it get an upper limit at calibrations.mag_lim",
        )
        coverage_margin_arcsec: float = Field(
            5.0, ge=0, description="Coverage: the object at least this far inside (arcsec)"
        )
        stats_flags_mask: int = Field(
            -1,
            description="Detections with (flags & mask) != 0 (blends, edges, saturation...) "
            "stay in lightcurves but not in lightcurve_stats; -1: any flag, 0: keep all",
        )

    def partitions(self, ctx: StageContext) -> list[Partition]:
        return [Partition.of(bucket=f"{b:02d}") for b in range(self.params.buckets)]

    def run(self, ctx: StageContext, partition: Partition) -> dict[str, pa.Table]:
        p = self.params
        bucket = int(partition.values["bucket"])
        src = ctx.lake.read("calibrated_sources", columns=SOURCE_COLUMNS)
        pieces = []
        targets = [(str(t.id), t.ra, t.dec) for t in p.targets]
        if p.targets_sql:
            t = ctx.lake.sql(p.targets_sql)
            targets += list(
                zip(
                    pc.cast(t.column("id"), pa.string()).to_pylist(),
                    t.column("ra").to_pylist(),
                    t.column("dec").to_pylist(),
                    strict=True,
                )
            )
        targets = [x for x in targets if bucket_of(x[0], p.buckets) == bucket]
        if targets:
            pieces.append(target_lightcurves(src, targets, p.match_radius_arcsec, p.detection_snr))
        if p.catalog_min_detections is not None and "crossmatches" in ctx.lake.tables():
            xm = ctx.lake.read(
                "crossmatches", columns=["source_id", "ref_id", "ref_ra", "ref_dec", "match_rank"]
            )
            lc = catalog_lightcurves(src, xm, p.catalog_min_detections, p.detection_snr)
            keep = [bucket_of(o, p.buckets) == bucket for o in lc.column("object_id").to_pylist()]
            pieces.append(lc.filter(pa.array(keep, pa.bool_())))
        lc = pa.concat_tables(pieces) if pieces else _empty_lightcurves()
        if p.coverage_limits and "exposures" in ctx.lake.tables():
            objects = list(targets)  # targets with no row at all still count
            names = {t[0] for t in targets}
            for o, ra, dec in zip(lc.column("object_id").to_pylist(),
                                  lc.column("ra").to_pylist(), lc.column("dec").to_pylist(),
                                  strict=True):  # fmt: skip
                if o not in names:
                    names.add(o)
                    objects.append((o, ra, dec))
            limits = coverage_limits(ctx, lc, objects, p.coverage_margin_arcsec)
            lc = pa.concat_tables([lc, limits.cast(lc.schema)])
        lc = lc.sort_by([("object_id", "ascending"), ("mjd", "ascending")])
        stats = summarise(lc, p.stats_flags_mask)
        # flags stay in sources (join on source_id); the contract keeps lightcurves lean
        return {"lightcurves": lc.drop_columns(["flags"]), "lightcurve_stats": stats}


def _empty_lightcurves() -> pa.Table:
    from lakepipe.tables import get_contract

    c = get_contract("lightcurves")
    empty = c.empty().drop_columns(["bucket", "_healpix_29"])
    return empty.add_column(empty.num_columns - 1, "flags", pa.array([], pa.int32()))


def _assemble(
    object_id: list[str],
    obj_ra: np.ndarray,
    obj_dec: np.ndarray,
    rows: pa.Table,
    sep: np.ndarray,
    detection_snr: float,
) -> pa.Table:
    snr = pc.fill_null(rows.column("snr"), np.nan).to_numpy(zero_copy_only=False)
    mag = pc.fill_null(rows.column("mag"), np.nan).to_numpy(zero_copy_only=False)
    upper = ~(snr >= detection_snr) | ~np.isfinite(mag)
    limit = pc.fill_null(rows.column("mag_upper_limit"), np.nan).to_numpy(zero_copy_only=False)

    def nullable(x: np.ndarray) -> pa.Array:
        return pa.array(x, mask=~np.isfinite(x))

    mag_err = pc.fill_null(rows.column("mag_err"), np.nan).to_numpy(zero_copy_only=False)
    return pa.table(
        {
            "object_id": pa.array(object_id, pa.string()),
            "ra": pa.array(obj_ra),
            "dec": pa.array(obj_dec),
            "exposure_id": rows.column("exposure_id"),
            "source_id": rows.column("source_id"),
            "mjd": rows.column("mjd"),
            "filter": rows.column("filter"),
            "mag": nullable(np.where(upper, np.nan, mag)),
            "mag_err": nullable(np.where(upper, np.nan, mag_err)),
            "upper_limit": pa.array(upper),
            "limit_mag": nullable(np.where(upper, limit, np.nan)),
            "snr": rows.column("snr"),
            "forced": rows.column("forced"),
            "sep_arcsec": pa.array(sep),
            "flags": rows.column("flags"),
            "mag_system": rows.column("mag_system"),
        }
    )


def target_lightcurves(
    src: pa.Table,
    targets: list[tuple[str, float, float]],
    radius_arcsec: float,
    detection_snr: float,
) -> pa.Table:
    """One row per (target, exposure): the nearest detection with S/N >= ``detection_snr``,
    else the forced row, else the nearest faint detection."""
    tra = np.array([t[1] for t in targets], dtype=np.float64)
    tdec = np.array([t[2] for t in targets], dtype=np.float64)
    sra = pc.fill_null(src.column("ra"), np.nan).to_numpy(zero_copy_only=False)
    sdec = pc.fill_null(src.column("dec"), np.nan).to_numpy(zero_copy_only=False)
    m = crossmatch(tra, tdec, sra, sdec, radius_arcsec, mode="all", workers=1)
    if len(m) == 0:
        return _empty_lightcurves()
    exp = src.column("exposure_id").to_numpy()[m.idx2]
    forced = pc.fill_null(src.column("forced"), False).to_numpy(zero_copy_only=False)[m.idx2]
    # per (target, exposure), in this order: a significant detection, the forced row
    # (measured at the very position), a faint detection; nearest first within each
    snr = pc.fill_null(src.column("snr"), np.nan).to_numpy(zero_copy_only=False)[m.idx2]
    rank = np.where(forced, 1, np.where(snr >= detection_snr, 0, 2))
    order = np.lexsort((m.sep_arcsec, rank, exp, m.idx1))
    t_sorted, e_sorted = m.idx1[order], exp[order]
    first = np.r_[True, (t_sorted[1:] != t_sorted[:-1]) | (e_sorted[1:] != e_sorted[:-1])]
    pick = order[first]
    rows = src.take(pa.array(m.idx2[pick]))
    ids = [targets[i][0] for i in m.idx1[pick]]
    return _assemble(
        ids, tra[m.idx1[pick]], tdec[m.idx1[pick]], rows, m.sep_arcsec[pick], detection_snr
    )


def catalog_lightcurves(
    src: pa.Table, xm: pa.Table, min_detections: int, detection_snr: float
) -> pa.Table:
    """Lightcurves of catalogue stars with at least ``min_detections`` matched detections."""
    first = xm.filter(pc.field("match_rank") == 1)
    # one thread: a threaded hash aggregation sums in the order rows reach its threads,
    # and the mean position then differs in the last bits from run to run
    counts = first.group_by("ref_id", use_threads=False).aggregate(
        [("source_id", "count"), ("ref_ra", "mean"), ("ref_dec", "mean")]
    )
    counts = counts.filter(pc.field("source_id_count") >= min_detections)
    if counts.num_rows == 0:
        return _empty_lightcurves()
    sel = first.join(counts, "ref_id", join_type="inner")
    rows = sel.join(src, "source_id", join_type="inner").sort_by("source_id")
    ids = pc.cast(rows.column("ref_id"), pa.string()).to_pylist()
    # position of the row relative to the catalogue star
    from lakepipe.astro.crossmatch import angular_separation_arcsec

    ora = rows.column("ref_ra_mean").to_numpy()
    odec = rows.column("ref_dec_mean").to_numpy()
    sep = angular_separation_arcsec(
        ora, odec, rows.column("ra").to_numpy(), rows.column("dec").to_numpy()
    )
    # one row per (star, exposure): the nearest of the detections matched to it
    rid = rows.column("ref_id").to_numpy()
    exp = rows.column("exposure_id").to_numpy()
    order = np.lexsort((sep, exp, rid))
    first = np.r_[True, (rid[order][1:] != rid[order][:-1]) | (exp[order][1:] != exp[order][:-1])]
    pick = np.sort(order[first])
    rows = rows.take(pa.array(pick))
    ids = [ids[i] for i in pick]
    return _assemble(ids, ora[pick], odec[pick], rows, sep[pick], detection_snr)


def coverage_limits(
    ctx: StageContext,
    lc: pa.Table,
    objects: list[tuple[str, float, float]],
    margin_arcsec: float,
) -> pa.Table:
    """Upper-limit rows at ``calibrations.mag_lim`` for every calibrated exposure whose
    measured area covers one of ``objects`` (id, ra, dec) that has no row there in ``lc``."""
    if not objects:
        return _empty_lightcurves()
    tables = ctx.lake.tables()
    if "calibrations" not in tables:
        return _empty_lightcurves()
    cal = ctx.lake.read("calibrations").filter(
        (pc.field("status") == "ok") & pc.field("mag_lim").is_valid()
    )
    exps = {r["exposure_id"]: r for r in ctx.lake.read("exposures").to_pylist()}
    cutouts = (
        {r["cutout_id"]: r for r in ctx.lake.read("cutouts").to_pylist()}
        if "cutouts" in tables
        else {}
    )
    measured: dict[int, list] = {}
    if "sources" in tables:
        pairs = ctx.lake.sql("select distinct exposure_id, cutout_id from sources")
        measured = measured_images(pairs.column("exposure_id"), pairs.column("cutout_id"))
    oid = [o[0] for o in objects]
    ora = np.array([o[1] for o in objects], np.float64)
    odec = np.array([o[2] for o in objects], np.float64)
    have = set(
        zip(lc.column("object_id").to_pylist(), lc.column("exposure_id").to_pylist(), strict=True)
    )
    rows: dict[str, list] = {k: [] for k in ("object_id", "ra", "dec", "exposure_id", "mjd",
                                             "filter", "limit_mag", "mag_system")}  # fmt: skip
    for c in cal.to_pylist():
        e = exps.get(c["exposure_id"])
        if e is None or e.get("ra1") is None:
            continue
        xy = gnomonic(ora, odec, e["ra"], e["dec"])
        covered = np.zeros(len(oid), dtype=bool)
        for _, cut in measured_areas(measured, c["exposure_id"], cutouts):
            covered |= inside_image(xy, e, cut, margin_arcsec / 3600.0)
        for i in np.flatnonzero(covered):
            if (oid[i], c["exposure_id"]) in have:
                continue
            for k, v in (("object_id", oid[i]), ("ra", ora[i]), ("dec", odec[i]),
                         ("exposure_id", c["exposure_id"]), ("mjd", c["mjd"]),
                         ("filter", c["filter"]), ("limit_mag", c["mag_lim"]),
                         ("mag_system", c["mag_system"])):  # fmt: skip
                rows[k].append(v)
    n = len(rows["object_id"])
    if n == 0:
        return _empty_lightcurves()
    nulls = pa.nulls(n, pa.float64())
    out = pa.table(
        {
            "object_id": pa.array(rows["object_id"], pa.string()),
            "ra": pa.array(rows["ra"], pa.float64()),
            "dec": pa.array(rows["dec"], pa.float64()),
            "exposure_id": pa.array(rows["exposure_id"], pa.int64()),
            "source_id": pa.nulls(n, pa.int64()),
            "mjd": pa.array(rows["mjd"], pa.float64()),
            "filter": pa.array(rows["filter"], pa.string()),
            "mag": nulls,
            "mag_err": nulls,
            "upper_limit": pa.array(np.ones(n, dtype=bool)),
            "limit_mag": pa.array(rows["limit_mag"], pa.float64()),
            "snr": nulls,
            "forced": pa.nulls(n, pa.bool_()),
            "sep_arcsec": nulls,
            "flags": pa.array(np.zeros(n, np.int32)),
            "mag_system": pa.array(rows["mag_system"], pa.string()),
        }
    )
    return out


def summarise(lc: pa.Table, flags_mask: int = -1) -> pa.Table:
    """``lightcurve_stats``: one row per (object, filter), from upper limits and the
    detections without any of the ``flags_mask`` bits."""
    flagged: dict[tuple[str, str], int] = {}  # rows left out, per (object, filter)
    if lc.num_rows:
        flags = pc.fill_null(lc.column("flags"), 0).to_numpy(zero_copy_only=False)
        upper = lc.column("upper_limit").to_numpy(zero_copy_only=False)
        keep = upper | ((flags & flags_mask) == 0)
        out_rows = lc.filter(pa.array(~keep))
        for k in zip(
            out_rows.column("object_id").to_pylist(),
            out_rows.column("filter").to_pylist(),
            strict=True,
        ):
            flagged[k] = flagged.get(k, 0) + 1
        lc = lc.filter(pa.array(keep))
    if lc.num_rows == 0:
        from lakepipe.tables import get_contract

        return get_contract("lightcurve_stats").empty().drop_columns(["bucket", "_healpix_29"])
    keys = pa.table({"o": lc.column("object_id"), "f": lc.column("filter")})
    uniq = keys.group_by(["o", "f"]).aggregate([]).sort_by([("o", "ascending"), ("f", "ascending")])
    index = {
        k: i
        for i, k in enumerate(
            zip(uniq.column("o").to_pylist(), uniq.column("f").to_pylist(), strict=True)
        )
    }
    group = np.array(
        [
            index[k]
            for k in zip(keys.column("o").to_pylist(), keys.column("f").to_pylist(), strict=True)
        ]
    )

    def f64(name: str) -> np.ndarray:
        return pc.fill_null(lc.column(name), np.nan).to_numpy(zero_copy_only=False)

    s = lightcurve_stats(
        group,
        f64("mjd"),
        f64("mag"),
        f64("mag_err"),
        upper_limit=lc.column("upper_limit").to_numpy(zero_copy_only=False),
        limit_mag=f64("limit_mag"),
    )
    g = s.pop("group")
    first_row = np.array([np.flatnonzero(group == k)[0] for k in g])
    out = {
        "object_id": uniq.column("o").take(pa.array(g)),
        "filter": uniq.column("f").take(pa.array(g)),
        "ra": lc.column("ra").take(pa.array(first_row)),
        "dec": lc.column("dec").take(pa.array(first_row)),
    }
    for name, values in s.items():
        arr = np.asarray(values)
        out[name] = pa.array(arr, mask=~np.isfinite(arr)) if arr.dtype.kind == "f" else arr
    out["n_flagged"] = pa.array(
        [
            flagged.get(k, 0)
            for k in zip(out["object_id"].to_pylist(), out["filter"].to_pylist(), strict=True)
        ],
        pa.int32(),
    )
    return pa.table(out)
