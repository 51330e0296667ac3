"""``crossmatch``: match each night's detections against a reference catalogue."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from lakepipe.astro.crossmatch import angular_separation_arcsec, crossmatch, unit_vectors
from lakepipe.catalogs import CatalogConfig, Cone, ReferenceCatalog, open_catalog
from lakepipe.stages.base import Partition, Stage, StageContext, StageParams, register_stage

CONE_MARGIN_ARCSEC = 30.0  # read the catalogue this far beyond the outermost detection


class BandMap(BaseModel):
    """How a survey filter's reference magnitude is made from catalogue columns.

    ``ref_mag = mag_<band> + offset_mag + colour_term · (colour - colour_pivot)``, a linear
    photometric transformation (e.g. Gaia G and BP-RP to a survey band).
    """

    model_config = ConfigDict(extra="forbid")

    band: str = Field(..., description="Catalogue band (a key of catalog.columns.mags)")
    colour: str | tuple[str, str] | None = Field(
        None,
        description="Colour: a mapped band that already is a colour (bp_rp), or [a, b] "
        "for mag_a - mag_b",
    )
    colour_term: float = Field(0.0, description="Colour coefficient (mag per mag of colour)")
    colour_pivot: float = Field(0.0, description="Colour at which the term vanishes (mag)")
    offset_mag: float = Field(0.0, description="Constant offset (mag)")


@register_stage("crossmatch")
class CrossmatchStage(Stage):
    """Match every detection of a night to a reference catalogue.

    Reads ``sources`` (one night per partition; forced-photometry rows are skipped
    unless ``include_forced``) and the reference catalogue around each exposure's
    detections, with proper motions applied to the night's mean epoch. Writes
    ``crossmatches``: one row per (detection, catalogue star) pair within
    ``radius_arcsec`` — the nearest only (``mode: nearest``) or all, ranked by
    separation (``mode: all``) — with the separation (arcsec), the catalogue position at
    the epoch, the reference magnitude in the detection's filter (``bands``), the
    colour, and ``ref_neighbours``: other catalogue stars within ``isolation_arcsec``
    (blends; calibration wants 0). Detections without a counterpart have no row: anti-
    join ``sources`` to find them. Matching is exact at the poles and across RA 0/360.

    Example::

        crossmatches:
          kind: crossmatch
          inputs: [sources]
          catalog:
            path: refcat/catalog.parquet
            columns: {id: source_id, mags: {G: phot_g_mean_mag, bp_rp: bp_rp},
                      pmra: pmra, pmdec: pmdec, epoch: ref_epoch}
          radius_arcsec: 1.5
          bands:
            zg: {band: G, colour: bp_rp, colour_term: 0.95, colour_pivot: 0.82, offset_mag: 0.40}
            zr: {band: G, colour: bp_rp, colour_term: 0.35, colour_pivot: 0.82, offset_mag: 0.05}
    """

    reads = ("sources",)
    writes = ("crossmatches",)
    version = "1"

    @property
    def uses_archive(self) -> bool:  # type: ignore[override]
        """The archive is an input only when it is also the reference catalog."""
        return self.params.catalog.kind == "archive"

    class Params(StageParams):
        catalog: CatalogConfig = Field(..., description="Reference catalogue and its columns")
        radius_arcsec: float = Field(1.5, gt=0, le=3600, description="Match radius (arcsec)")
        mode: Literal["nearest", "all"] = Field("nearest", description="nearest or all pairs")
        bands: dict[str, BandMap] = Field(
            default_factory=dict, description="Survey filter → reference magnitude recipe"
        )
        isolation_arcsec: float = Field(
            6.0, ge=0, description="Count catalogue neighbours within this radius (arcsec)"
        )
        include_forced: bool = Field(False, description="Also match forced-photometry rows")

    def input_files(self, ctx: StageContext) -> list[Path]:
        path = self.params.catalog.path
        return [ctx.resolve(path)] if path else []

    def partitions(self, ctx: StageContext) -> list[Partition]:
        return [
            Partition.of(reads={"sources": [f"night={n}"]}, night=n)
            for n in ctx.lake.partition_values("sources", "night")
        ]

    def run(self, ctx: StageContext, partition: Partition) -> pa.Table:
        p = self.params
        sources = ctx.lake.read("sources", partitions=[partition.key])
        catalog = open_catalog(p.catalog, ctx.spec_dir, ctx.archive)
        out = match_sources(
            sources,
            catalog,
            radius_arcsec=p.radius_arcsec,
            mode=p.mode,
            bands=p.bands,
            isolation_arcsec=p.isolation_arcsec,
            include_forced=p.include_forced,
        )
        ctx.log.debug(
            "%s: %d matches; catalogue read %d/%d files, %d/%d row groups",
            partition.key,
            out.num_rows,
            catalog.stats.files_read,
            catalog.stats.files_total,
            catalog.stats.row_groups_read,
            catalog.stats.row_groups_total,
        )
        return out


def exposure_cones(sources: pa.Table, margin_arcsec: float = CONE_MARGIN_ARCSEC) -> list[Cone]:
    """One cone per exposure enclosing its detections (centre: mean unit vector)."""
    exp = sources.column("exposure_id").to_numpy(zero_copy_only=False)
    ra = sources.column("ra").to_numpy(zero_copy_only=False)
    dec = sources.column("dec").to_numpy(zero_copy_only=False)
    cones = []
    for e in np.unique(exp):
        m = exp == e
        v = unit_vectors(ra[m], dec[m]).sum(axis=0)
        cra = float(np.degrees(np.arctan2(v[1], v[0])) % 360.0)
        cdec = float(np.degrees(np.arctan2(v[2], np.hypot(v[0], v[1]))))
        r = float(np.max(angular_separation_arcsec(ra[m], dec[m], cra, cdec)))
        cones.append(Cone(cra, cdec, (r + margin_arcsec) / 3600.0))
    return cones


def reference_mags(ref: pa.Table, band: BandMap) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ref_mag, ref_mag_err, colour - pivot) of catalogue rows for one filter's recipe."""

    def col(name: str) -> np.ndarray:
        if name not in ref.column_names:
            bands = [c[4:] for c in ref.column_names if c.startswith("mag_") and "err" not in c]
            raise KeyError(f"catalogue band {name[4:]!r} is not mapped; mapped bands: {bands}")
        return ref.column(name).to_numpy(zero_copy_only=False).astype(np.float64)

    mag = col(f"mag_{band.band}")
    n = len(mag)
    err_name = f"mag_err_{band.band}"
    err = col(err_name) if err_name in ref.column_names else np.full(n, np.nan)
    if band.colour is None:
        colour = np.full(n, np.nan)
    elif isinstance(band.colour, str):
        colour = col(f"mag_{band.colour}") - band.colour_pivot
    else:
        colour = col(f"mag_{band.colour[0]}") - col(f"mag_{band.colour[1]}") - band.colour_pivot
    ref_mag = mag + band.offset_mag
    if band.colour is not None and band.colour_term != 0.0:
        ref_mag = ref_mag + band.colour_term * colour
    return ref_mag, err, colour


def match_sources(
    sources: pa.Table,
    catalog: ReferenceCatalog,
    *,
    radius_arcsec: float,
    mode: Literal["nearest", "all"] = "nearest",
    bands: dict[str, BandMap] | None = None,
    isolation_arcsec: float = 6.0,
    include_forced: bool = False,
) -> pa.Table:
    """The ``crossmatches`` rows of one night's ``sources`` against ``catalog``."""
    bands = bands or {}
    if not include_forced and "forced" in sources.column_names:
        sources = sources.filter(pc.invert(pc.fill_null(sources.column("forced"), False)))
    sources = sources.filter(pc.field("ra").is_valid() & pc.field("dec").is_valid())
    if sources.num_rows == 0:
        return _empty()
    mjd = sources.column("mjd").to_numpy(zero_copy_only=False)
    ref = catalog.read(exposure_cones(sources), epoch_mjd=float(np.mean(mjd)))
    if ref.num_rows == 0:
        return _empty()
    m = crossmatch(
        sources.column("ra").to_numpy(zero_copy_only=False),
        sources.column("dec").to_numpy(zero_copy_only=False),
        ref.column("ra").to_numpy(),
        ref.column("dec").to_numpy(),
        radius_arcsec,
        mode=mode,
        workers=1,  # the runner parallelises over partitions
    )
    rra, rdec = ref.column("ra").to_numpy(), ref.column("dec").to_numpy()
    if isolation_arcsec > 0:
        near = crossmatch(rra, rdec, rra, rdec, isolation_arcsec, mode="all", workers=1)
        neighbours = np.bincount(near.idx1, minlength=ref.num_rows) - 1
    else:
        neighbours = np.zeros(ref.num_rows, dtype=np.int64)

    filters = sources.column("filter").to_numpy(zero_copy_only=False)[m.idx1]
    ref_mag = np.full(len(m), np.nan)
    ref_err = np.full(len(m), np.nan)
    colour = np.full(len(m), np.nan)
    for flt, recipe in bands.items():
        sel = filters == flt
        if sel.any():
            mag_all, err_all, col_all = reference_mags(ref, recipe)
            j = m.idx2[sel]
            ref_mag[sel], ref_err[sel], colour[sel] = mag_all[j], err_all[j], col_all[j]

    take1 = pa.array(m.idx1)
    take2 = pa.array(m.idx2)

    def nullable(x: np.ndarray) -> pa.Array:
        return pa.array(x, mask=~np.isfinite(x))

    return pa.table(
        {
            "night": sources.column("night").take(take1),
            "source_id": sources.column("source_id").take(take1),
            "exposure_id": sources.column("exposure_id").take(take1),
            "filter": sources.column("filter").take(take1),
            "mjd": sources.column("mjd").take(take1),
            "ra": sources.column("ra").take(take1),
            "dec": sources.column("dec").take(take1),
            "ref_id": ref.column("ref_id").take(take2),
            "ref_ra": ref.column("ra").take(take2),
            "ref_dec": ref.column("dec").take(take2),
            "sep_arcsec": pa.array(m.sep_arcsec),
            "match_rank": pa.array(m.rank, pa.int32()),
            "ref_mag": nullable(ref_mag),
            "ref_mag_err": nullable(ref_err),
            "ref_colour": nullable(colour),
            "ref_neighbours": pa.array(neighbours[m.idx2].astype(np.int32)),
        }
    )


def _empty() -> pa.Table:
    from lakepipe.tables import get_contract

    return get_contract("crossmatches").empty().drop_columns(["_healpix_29"])
