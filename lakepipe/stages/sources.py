"""``sources``: sep extraction, aperture and forced photometry, seeing and depth per image."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from lakepipe.astro import photometry as ph
from lakepipe.errors import InputNotFoundError, LakepipeError, SQLError, StageError
from lakepipe.stages.base import Partition, Stage, StageContext, StageParams, register_stage

OK_CUTOUT_STATUSES = ("ok", "partial")
# exposures columns that override the image header's GAIN, RDNOISE and SATURATE
DETECTOR_COLUMNS = ("gain_e_per_adu", "rdnoise_e", "saturate_adu")


class ForcedPosition(BaseModel):
    """A sky position to measure in every image that contains it."""

    model_config = ConfigDict(extra="forbid")
    id: str | int = Field(description="Position id (stored as text in sources.forced_id)")
    ra: float = Field(ge=0.0, lt=360.0, description="Right ascension (deg, ICRS)")
    dec: float = Field(ge=-90.0, le=90.0, description="Declination (deg, ICRS)")


class ForcedParams(BaseModel):
    """Forced photometry positions: fixed ones and/or a query over the lake."""

    model_config = ConfigDict(extra="forbid")
    positions: list[ForcedPosition] = Field(default_factory=list, description="Fixed positions")
    sql: str | None = Field(
        None,
        description="SQL over the lake returning ra, dec [, id] [, exposure_id]: a row with "
        "exposure_id applies to that exposure only (e.g. predicted asteroid positions)",
    )


def source_id_for(image_id: int, aperture_index: int, tag: str) -> int:
    """Stable int64: first 63 bits of SHA-256 of ``'<image_id>:<aperture_index>:<tag>'``."""
    digest = hashlib.sha256(f"{int(image_id)}:{int(aperture_index)}:{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@register_stage("sources")
class SourcesStage(Stage):
    """Detect and measure sources in every cutout or full exposure, with sep.

    SExtractor's algorithms in-process (sep): a background mesh, detection above
    ``detect.threshold_sigma`` × the background rms after filtering, deblending, windowed
    centroids, circular-aperture photometry with CCD-equation errors (source Poisson via
    the gain, sky and read noise per pixel, annulus error), optional Kron flux, flags
    (blended, near edge, saturated, masked, …), ``ra``/``dec`` from the image WCS (null,
    with the note "pixel positions only", when there is none), forced photometry at given
    sky positions (``forced = true`` rows, measured whether or not anything is there),
    and per image the seeing FWHM (Moffat fits to bright, unsaturated, isolated stars),
    the aperture correction and the 5σ limiting magnitude.

    Reads ``cutouts`` (their FITS files in the lake; ``image: cutout``, the default) or
    ``exposures`` (full images from the archive; ``image: exposure``), one night per
    partition. With an ``exposures`` table in the lake, its ``mjd``, ``filter``,
    ``zeropoint_mag``, ``gain_e_per_adu``, ``rdnoise_e`` and ``saturate_adu`` are used
    where set, else the FITS header's (MJD-AVG, FILTER, MAGZP, GAIN, RDNOISE, SATURATE).
    Writes ``sources`` (one row per detection or forced position, per aperture) and
    ``image_stats`` (one row per image). NaN pixels (the missing part of a partial
    cutout) are masked; for full exposures so are the archive's bad pixels when it has
    a ``mask(exposure_id)`` (fits_dir: ``mask_hdu``, ``mask_bits``), and in every image
    the dead and hot columns found from column medians (``detect.bad_column_sigma``,
    3σ of the background rms; null turns it off). Masked pixels are
    ignored by the background and detection, interpolated for photometry, and flag the
    sources on them; pixels at or above the saturation level flag theirs.

    Parameters
    ----------
    image : ``cutout`` or ``exposure``: what to measure.
    background : ``mesh_pix`` (64), ``filter_size`` (3), ``mode``: ``global`` (the mesh
        map) or ``local`` (annulus ``annulus_pix`` [inner, outer] px, default 3/5 FWHM,
        without the pixels of other detections grown by ``annulus_mask_fwhm`` × FWHM,
        bad or saturated pixels; the map where less than ``annulus_min_fraction`` is left).
    detect : ``threshold_sigma`` (4.5, in σ of the filtered image — the matched-filter
        SNR — unless ``threshold_on: image``, SExtractor's DETECT_THRESH convention:
        with default.conv, 1.5 image-σ = 4.0 filtered-σ; on pure noise 4.5 gives ~0.4
        false detections per 10⁶ pixels at FWHM 3 px and ~1 at 4-6 px, 5.0 below 0.1),
        ``threshold_rms`` global|local (rms map), ``minarea`` (3 px),
        ``deblend_nthresh`` (32), ``deblend_cont`` (0.005), ``clean`` (off: CLEAN's Moffat
        wings delete real neighbours of bright stars in Gaussian-PSF images),
        ``clean_param``, ``filter`` seeing|default|none (a Gaussian of the image's FWHM,
        SExtractor's default.conv, or none), ``centroid`` windowed|isophotal,
        ``edge_buffer_pix``, ``bad_column_sigma``.
    aperture : ``mode`` fixed (``radius`` in ``unit`` pix|arcsec) | fwhm (``scale`` ×
        FWHM, default 2.0) | multi (``radii``; ``keep`` all rows, or the ``best`` radius
        per image from the curve of growth); ``kron`` (AUTO flux in the ellipse of
        K·a, K·b with K = max(``kron_factor`` × Kron radius, ``kron_min_radius``):
        SExtractor's PHOT_AUTOPARAMS, default 2.5, 3.5), ``subpix`` (0 = exact overlap),
        ``error_model`` empirical (measured rms) | ccd (B/g + (RN/g)²).
    seeing : ``max_stars``, ``min_snr``, ``isolation_fwhm``, ``default_fwhm_pix``;
        ``use_prior`` (on): the seeing kernel starts from the archive's seeing
        (``exposures.seeing_fwhm_arcsec``), the FWHM is measured on the detections, and
        they are redone with it when it is more than ``prior_tolerance`` (0.2) off; with
        no archive seeing, a ≥10σ pre-pass on the image's centre gives the FWHM first.
    limiting_mag : ``mode`` analytic | random (``n_apertures`` blank-sky apertures with
        sources masked and dilated by ``dilate_fwhm`` × FWHM, MAD σ, ``seed``), ``nsigma``.
    forced : ``positions: [{id, ra, dec}]`` and/or ``sql`` returning ``ra, dec`` [, ``id``]
        [, ``exposure_id``]; list the stage writing the queried table in ``inputs``.

    Example::

        sources:
          kind: sources
          inputs: [cutouts]
          detect: {threshold_sigma: 5.0, minarea: 3}
          aperture: {mode: fwhm, scale: 2.0, kron: true}
          background: {mode: local}
          limiting_mag: {mode: random, n_apertures: 500, seed: 1}
          forced: {positions: [{id: sn, ra: 150.11, dec: 2.21}]}
    """

    reads = ()
    optional_reads = ("cutouts", "exposures")
    writes = ("sources", "image_stats")
    version = "1"

    class Params(StageParams):
        image: Literal["cutout", "exposure"] = Field(
            "cutout", description="Measure cutouts (FITS in the lake) or full exposures"
        )
        background: ph.BackgroundParams = Field(default_factory=ph.BackgroundParams)
        detect: ph.DetectParams = Field(default_factory=ph.DetectParams)
        aperture: ph.ApertureParams = Field(default_factory=ph.ApertureParams)
        seeing: ph.SeeingParams = Field(default_factory=ph.SeeingParams)
        limiting_mag: ph.LimitingMagParams = Field(default_factory=ph.LimitingMagParams)
        forced: ForcedParams | None = Field(None, description="Forced photometry positions")

    @property
    def uses_archive(self) -> bool:  # type: ignore[override]
        """Full exposures come from the archive; cutouts are files in the lake."""
        return self.params.image == "exposure"

    @property
    def input_table(self) -> str:
        return "cutouts" if self.params.image == "cutout" else "exposures"

    def partitions(self, ctx: StageContext) -> list[Partition]:
        """One partition per night of the input table (cutouts or exposures).

        Each reads its night of the input (and of ``exposures`` for metadata); with a
        forced ``sql`` every committed table, since the query may read any of them.
        """
        table = self.input_table
        nights = ctx.lake.partition_values(table, "night")
        forced_sql = self.params.forced is not None and self.params.forced.sql
        out = []
        for n in nights:
            key = f"night={n}"
            reads = {table: [key]}
            if table == "cutouts" and "exposures" in ctx.lake.tables():
                reads["exposures"] = [key]
            out.append(Partition.of(reads=None if forced_sql else reads, night=n))
        return out

    # -- run ------------------------------------------------------------------------------

    def run(self, ctx: StageContext, partition: Partition) -> dict[str, pa.Table]:
        """Measure every image of one night; see the class docstring."""
        night = partition.values["night"]
        meta = self._exposure_meta(ctx, partition.key)
        forced = self._forced_positions(ctx)
        src_pieces: list[pa.Table] = []
        stat_rows: list[dict[str, Any]] = []
        for item in self._images(ctx, partition.key):
            image_id, exposure_id, cutout_id, load = item
            try:
                image = load()
            except LakepipeError:
                raise
            except (OSError, ValueError) as exc:
                raise StageError(
                    f"stage {self.name!r}: cannot read image {image_id} "
                    f"(exposure {exposure_id}): {type(exc).__name__}: {exc}",
                    stage=self.name,
                    partition=partition.key,
                ) from None
            _use_exposure_detector(image, meta.get(exposure_id))
            info = self._image_info(image, meta.get(exposure_id))
            fra, fdec, fid = _forced_for(forced, exposure_id)
            if len(fra) and image.wcs is None:
                ctx.log.warning("image %s has no celestial WCS: forced positions skipped", image_id)
                fra, fdec, fid = fra[:0], fdec[:0], fid[:0]
            p = self.params
            try:
                m = ph.measure_image(
                    image,
                    background_params=p.background,
                    detect_params=p.detect,
                    aperture_params=p.aperture,
                    limiting_params=p.limiting_mag,
                    seeing_params=p.seeing,
                    forced_radec=(fra, fdec) if len(fra) else None,
                    fwhm_prior_pix=_seeing_prior_pix(image, meta.get(exposure_id)),
                    seed=int(image_id) % (2**32),
                )
            except LakepipeError:
                raise
            except Exception as exc:
                # Only expected failures become a StageError: a ValueError (e.g. no pixel
                # scale / WCS) and sep's bare Exception ("invalid aperture ..."). Anything
                # else is a bug and keeps its traceback.
                if not (isinstance(exc, ValueError) or ph.is_sep_error(exc)):
                    raise
                raise StageError(
                    f"stage {self.name!r}: measuring image {image_id} (exposure "
                    f"{exposure_id}) failed: {type(exc).__name__}: {exc}",
                    stage=self.name,
                    partition=partition.key,
                ) from exc
            src_pieces.append(self._sources_table(m, image_id, exposure_id, cutout_id, info, fid))
            stat_rows.append(self._stats_row(m, image, image_id, exposure_id, cutout_id, info))
        sources = (
            pa.concat_tables(src_pieces) if src_pieces else _file_schema("sources").empty_table()
        )
        stats = (
            pa.Table.from_pylist(stat_rows, schema=_file_schema("image_stats"))
            if stat_rows
            else _file_schema("image_stats").empty_table()
        )
        return {
            "sources": _with_night(sources, night),
            "image_stats": _with_night(stats, night),
        }

    # -- inputs ---------------------------------------------------------------------------

    def _exposure_meta(self, ctx: StageContext, key: str) -> dict[int, dict[str, Any]]:
        if "exposures" not in ctx.lake.tables():
            return {}
        cols = [
            "exposure_id",
            "mjd",
            "filter",
            "zeropoint_mag",
            "seeing_fwhm_arcsec",
            *DETECTOR_COLUMNS,
        ]
        t = ctx.lake.read("exposures", partitions=[key], columns=cols)
        return {int(r["exposure_id"]): r for r in t.to_pylist()}

    def _images(self, ctx: StageContext, key: str) -> list[tuple[int, int, int | None, Any]]:
        """(image_id, exposure_id, cutout_id, loader) for every image of the night."""
        out: list[tuple[int, int, int | None, Any]] = []
        if self.params.image == "cutout":
            t = ctx.lake.read(
                "cutouts",
                partitions=[key],
                columns=["cutout_id", "exposure_id", "path", "sha256", "status"],
            )
            rows = [r for r in t.to_pylist() if r["status"] in OK_CUTOUT_STATUSES and r["path"]]
            for r in sorted(rows, key=lambda r: r["cutout_id"]):
                out.append(
                    (
                        int(r["cutout_id"]),
                        int(r["exposure_id"]),
                        int(r["cutout_id"]),
                        lambda r=r: self._load_cutout(ctx, r),
                    )
                )
            return out
        if ctx.archive is None:
            raise StageError(
                f"stage {self.name!r}: image: exposure needs an archive", stage=self.name
            )
        t = ctx.lake.read("exposures", partitions=[key], columns=["exposure_id"])
        for eid in sorted(int(v) for v in t.column("exposure_id").to_pylist()):
            out.append((eid, eid, None, lambda eid=eid: self._load_exposure(ctx, eid)))
        return out

    def _load_cutout(self, ctx: StageContext, row: dict[str, Any]) -> ph.Image:
        if not ctx.files.verify(row["path"], row["sha256"]):
            raise InputNotFoundError(
                f"stage {self.name!r}: cutout file {row['path']} (cutout {row['cutout_id']}) is "
                "missing or does not match its checksum; rerun the cutouts stage "
                "(`lakepipe run SPEC --force cutouts`)"
            )
        return ph.read_fits_image(ctx.files.abspath(row["path"]))

    def _load_exposure(self, ctx: StageContext, exposure_id: int) -> ph.Image:
        header, data = ctx.archive.image(exposure_id)  # type: ignore[union-attr]
        # archives that know bad pixels (a mask HDU, mask bits) offer mask(exposure_id)
        mask_of = getattr(ctx.archive, "mask", None)
        mask = mask_of(exposure_id) if callable(mask_of) else None
        return ph.image_from_array(data, header, mask=mask)

    def _forced_positions(self, ctx: StageContext) -> dict[str, Any]:
        f = self.params.forced
        ras: list[float] = []
        decs: list[float] = []
        ids: list[str] = []
        eids: list[int | None] = []
        if f is None:
            return {"ra": np.zeros(0), "dec": np.zeros(0), "id": [], "exposure_id": []}
        for p in f.positions:
            ras.append(p.ra)
            decs.append(p.dec)
            ids.append(str(p.id))
            eids.append(None)
        if f.sql:
            try:
                t = ctx.lake.sql(f.sql)
            except LakepipeError:
                raise
            except Exception as exc:  # DuckDB's own errors name the problem
                raise SQLError(f"stage {self.name!r}: forced.sql failed: {exc}") from None
            names = set(t.column_names)
            if not {"ra", "dec"} <= names:
                raise SQLError(
                    f"stage {self.name!r}: forced.sql must return ra, dec (optionally id, "
                    f"exposure_id); got {', '.join(t.column_names)}"
                )
            n = t.num_rows
            tid = t.column("id").to_pylist() if "id" in names else [f"sql{i}" for i in range(n)]
            te = t.column("exposure_id").to_pylist() if "exposure_id" in names else [None] * n
            for r, d, i, e in zip(
                t.column("ra").to_pylist(), t.column("dec").to_pylist(), tid, te, strict=True
            ):
                if r is None or d is None:
                    continue
                ras.append(float(r) % 360.0)
                decs.append(float(d))
                ids.append(str(i))
                eids.append(None if e is None else int(e))
        return {
            "ra": np.array(ras, float),
            "dec": np.array(decs, float),
            "id": ids,
            "exposure_id": eids,
        }

    def _image_info(self, image: ph.Image, meta: dict[str, Any] | None) -> dict[str, Any]:
        h = image.header
        mjd = None
        flt = None
        zp = image.zeropoint_mag
        if meta is not None:
            mjd, flt = meta.get("mjd"), meta.get("filter")
            if meta.get("zeropoint_mag") is not None:
                zp = float(meta["zeropoint_mag"])
        if mjd is None:
            mjd = ph.header_float(h, ("MJD-AVG", "MJD_AVG", "MJD-MID"))
            if mjd is None:
                start = ph.header_float(h, ("MJD-OBS", "MJD_OBS"))
                exptime = ph.header_float(h, ("EXPTIME", "EXPOSURE")) or 0.0
                mjd = None if start is None else start + exptime / 2.0 / 86400.0
        if flt is None and "FILTER" in h:
            flt = str(h["FILTER"]).strip()
        return {"mjd": mjd, "filter": flt, "zeropoint_mag": zp}

    # -- outputs --------------------------------------------------------------------------

    def _sources_table(
        self,
        m: ph.ImageMeasurement,
        image_id: int,
        exposure_id: int,
        cutout_id: int | None,
        info: dict[str, Any],
        forced_ids: list[str],
    ) -> pa.Table:
        s = m.sources
        n = len(s["x"])
        forced = s["forced"].astype(bool)
        tags = [
            f"f{fi}" if fo else f"d{di}"
            for fo, fi, di in zip(
                forced, s["forced_index"].astype(int), s["detection_index"].astype(int), strict=True
            )
        ]
        sid = [
            source_id_for(image_id, ai, tag)
            for ai, tag in zip(s["aperture_index"].astype(int), tags, strict=True)
        ]
        fid = [
            forced_ids[int(i)] if fo else None
            for fo, i in zip(forced, s["forced_index"], strict=True)
        ]
        fwhm = m.stats["fwhm_used_pix"]

        def f64(name: str) -> pa.Array:
            return pa.array(np.asarray(s[name], float), pa.float64(), from_pandas=True)

        cols = {
            "source_id": pa.array(sid, pa.int64()),
            "image_id": pa.array([image_id] * n, pa.int64()),
            "exposure_id": pa.array([exposure_id] * n, pa.int64()),
            "cutout_id": pa.array([cutout_id] * n, pa.int64()),
            "forced": pa.array(forced, pa.bool_()),
            "forced_id": pa.array(fid, pa.string()),
            "x": f64("x"),
            "y": f64("y"),
            "ra": f64("ra"),
            "dec": f64("dec"),
            "flux": f64("flux"),
            "flux_err": f64("flux_err"),
            "mag_inst": f64("mag_inst"),
            "mag_inst_err": f64("mag_inst_err"),
            "snr": f64("snr"),
            "aperture_radius_pix": f64("aperture_radius_pix"),
            "aperture_index": pa.array(s["aperture_index"].astype(np.int16), pa.int16()),
            "background_adu": f64("background_adu"),
            "flux_auto": f64("flux_auto"),
            "flux_auto_err": f64("flux_auto_err"),
            "kron_radius_pix": f64("kron_radius_pix"),
            "a_pix": f64("a_pix"),
            "b_pix": f64("b_pix"),
            "theta_deg": f64("theta_deg"),
            "npix": pa.array(
                [None if not np.isfinite(v) else int(v) for v in s["npix"]], pa.int32()
            ),
            "peak_adu": f64("peak_adu"),
            "fwhm_pix": pa.array([fwhm] * n, pa.float64()),
            "flags": pa.array(s["flags"].astype(np.int32), pa.int32()),
            "sep_flags": pa.array(s["sep_flags"].astype(np.int32), pa.int32()),
            "mjd": pa.array([info["mjd"]] * n, pa.float64()),
            "filter": pa.array([info["filter"]] * n, pa.string()),
            "zeropoint_mag": pa.array([info["zeropoint_mag"]] * n, pa.float64()),
        }
        return pa.table(cols)

    def _stats_row(
        self,
        m: ph.ImageMeasurement,
        image: ph.Image,
        image_id: int,
        exposure_id: int,
        cutout_id: int | None,
        info: dict[str, Any],
    ) -> dict[str, Any]:
        st = m.stats
        ny, nx = image.data.shape
        ra = dec = None
        if image.wcs is not None:
            from lakepipe.astro.wcs import pixel_to_sky

            r, d = pixel_to_sky(image.wcs, np.array([(nx - 1) / 2.0]), np.array([(ny - 1) / 2.0]))
            ra, dec = float(r[0]), float(d[0])
        zp = info["zeropoint_mag"]
        lim = _num(st["mag_lim_inst"])
        return {
            "image_id": image_id,
            "exposure_id": exposure_id,
            "cutout_id": cutout_id,
            "image_kind": "cutout" if cutout_id is not None else "exposure",
            "mjd": info["mjd"],
            "filter": info["filter"],
            "naxis1": nx,
            "naxis2": ny,
            "ra": ra,
            "dec": dec,
            "background_adu": _num(st["background_adu"]),
            "background_rms_adu": _num(st["background_rms_adu"]),
            "fwhm_pix": _num(st["fwhm_pix"]),
            "fwhm_used_pix": float(st["fwhm_used_pix"]),
            "fwhm_prior_pix": _num(st["fwhm_prior_pix"]),
            "fwhm_arcsec": _num(st["fwhm_arcsec"]),
            "n_fwhm_stars": int(st["n_fwhm_stars"]),
            "pixscale_arcsec": _num(st["pixscale_arcsec"]),
            "aperture_radius_pix": float(st["aperture_radius_pix"]),
            "apcorr": float(st["apcorr"]),
            "n_detected": int(st["n_detected"]),
            "n_forced": int(st["n_forced"]),
            "n_saturated": int(st["n_saturated"]),
            "mag_lim_analytic_inst": float(st["mag_lim_analytic_inst"]),
            "mag_lim_random_inst": _num(st["mag_lim_random_inst"]),
            "n_random_apertures": int(st["n_random_apertures"]),
            "mag_lim_mode": self.params.limiting_mag.mode,
            "mag_lim_inst": lim,
            "zeropoint_mag": zp,
            "mag_lim": None if (lim is None or zp is None) else lim + zp,
            "gain_e_per_adu": image.gain_e_per_adu,
            "rdnoise_e": image.rdnoise_e,
            "saturate_adu": image.saturate_adu,
            "has_wcs": bool(st["has_wcs"]),
            "masked_fraction": float(st["masked_fraction"]),
            "note": st["note"] or None,
        }


def _num(v: Any) -> float | None:
    """Finite float or None (NaN means 'not measured': stored as null)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _use_exposure_detector(image: ph.Image, meta: dict[str, Any] | None) -> None:
    """Gain, read noise and saturation from the exposures row where it has them (the
    archive may know better than the header, e.g. fits_dir keyword overrides and
    defaults); the header's values stay where the row has none."""
    if meta is None:
        return
    for name in DETECTOR_COLUMNS:
        v = _num(meta.get(name))
        if v is not None and (name != "gain_e_per_adu" or v > 0):
            setattr(image, name, v)


def _seeing_prior_pix(image: ph.Image, meta: dict[str, Any] | None) -> float | None:
    """The archive's seeing FWHM (exposures.seeing_fwhm_arcsec) in the image's pixels."""
    seeing = _num((meta or {}).get("seeing_fwhm_arcsec"))
    if seeing is None or seeing <= 0:
        return None
    scale = ph.pixel_scale_arcsec(image)
    return seeing / scale if scale else None


def _forced_for(
    forced: dict[str, Any], exposure_id: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Forced positions that apply to one exposure (general ones and its own)."""
    keep = [i for i, e in enumerate(forced["exposure_id"]) if e is None or e == exposure_id]
    idx = np.array(keep, int)
    if not len(idx):
        return np.zeros(0), np.zeros(0), []
    return forced["ra"][idx], forced["dec"][idx], [forced["id"][i] for i in idx]


def _file_schema(table: str) -> pa.Schema:
    """The table's file columns without the runner-added ``_healpix_29``."""
    from lakepipe.tables import get_contract

    c = get_contract(table)
    return pa.schema(
        [pa.field(col.name, col.type) for col in c.file_columns if col.name != "_healpix_29"]
    )


def _with_night(table: pa.Table, night: str) -> pa.Table:
    return table.append_column("night", pa.array([night] * table.num_rows, pa.string()))
