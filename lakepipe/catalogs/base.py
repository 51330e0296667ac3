"""Reference catalogs: configuration, column mapping, regions and the common read path.

A reference catalog is configured in a spec as::

    catalog:
      kind: parquet            # parquet | csv | fits | hats | auto (from the path)
      path: refcat/            # file or folder, relative to the spec
      columns: {ra: ra, dec: dec, id: source_id,
                mags: {g: phot_g_mean_mag, r: r_mag}, mag_errs: {g: g_err},
                pmra: pmra, pmdec: pmdec, epoch: 2016.0}

``kind: cds`` reads a VizieR table by cone instead, and takes the CDS client's knobs
(:class:`lakepipe.archives.cds.CdsParams`: defaults there, one place) directly::

    catalog: {kind: cds, table: I/355/gaiadr3, vizier_url: https://vizier.cds.unistra.fr,
              row_limit: 1000000, http: {rate_limit_per_s: 2, contact: me@example.org}}

Every reader returns the same *reference table*, whatever the source columns are:

=============== ======= ====== ==============================================
column          type    unit   meaning
=============== ======= ====== ==============================================
``ref_id``      int64          catalogue id (strings hashed to a stable int64)
``ra``, ``dec`` float64 deg    ICRS position at the requested epoch
``pmra``        float64 mas/yr μα* = μα cos δ (0 when the catalogue has none)
``pmdec``       float64 mas/yr μδ
``epoch_jyear`` float64 yr     epoch of the returned positions (Julian year)
``mag_<band>``  float64 mag    one per mapped band
``mag_err_<b>`` float64 mag    one per mapped band error
=============== ======= ====== ==============================================

Readers never load a whole large catalogue: a region (union of cones) becomes HEALPix
order-29 index ranges, which prune HATS partitions and Parquet row groups through their
``_healpix_29`` statistics; without that column, declination (and RA) box filters prune
row groups of files sorted by position.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Literal

import astropy.units as u
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from astropy_healpix import HEALPix
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lakepipe.archives.cds import CdsParams
from lakepipe.archives.http import HttpParams, reject_userinfo
from lakepipe.astro.crossmatch import angular_separation_arcsec
from lakepipe.astro.healpix import HATS_ORDER
from lakepipe.catalogs.epoch import mjd_to_jyear, propagate_proper_motion

CatalogKind = Literal["auto", "parquet", "csv", "fits", "hats", "archive", "cds"]
_CDS = CdsParams.model_fields
#: CatalogConfig keys that are CdsParams knobs (only meaningful with ``kind: cds``). The
#: XMatch knobs are not among them: a catalog reads reference rows by cone (VizieR);
#: the XMatch upload is ``CdsClient.xmatch``, for Python callers.
CDS_KEYS = ("table", "vizier_url", "row_limit", "http")
MAX_RANGES = 64  # coarsen the HEALPix cover until a filter has at most this many ranges


class ColumnMap(BaseModel):
    """Which source columns hold the reference quantities."""

    model_config = ConfigDict(extra="forbid")

    ra: str = Field("ra", description="RA column (deg, ICRS, at the catalogue epoch)")
    dec: str = Field("dec", description="Dec column (deg, ICRS)")
    id: str | None = Field(None, description="Id column; strings are hashed to int64")
    mags: dict[str, str] = Field(
        default_factory=dict, description="Band name → magnitude column (e.g. {g: gmag})"
    )
    mag_errs: dict[str, str] = Field(
        default_factory=dict, description="Band name → magnitude error column"
    )
    pmra: str | None = Field(None, description="μα* = μα cos δ column (mas/yr)")
    pmdec: str | None = Field(None, description="μδ column (mas/yr)")
    epoch: float | str | None = Field(
        None,
        description="Catalogue epoch: a Julian year (2016.0) or a column of Julian years",
    )
    healpix29: str = Field(
        "_healpix_29", description="Order-29 nested HEALPix column used for pruning, if present"
    )

    def source_columns(self, available: list[str]) -> list[str]:
        """Source columns to read (those named and present)."""
        names = [self.ra, self.dec, self.id, self.pmra, self.pmdec]
        names += list(self.mags.values()) + list(self.mag_errs.values())
        if isinstance(self.epoch, str):
            names.append(self.epoch)
        out: list[str] = []
        for n in names:
            if n is not None and n not in out:
                out.append(n)
        missing = [n for n in out if n not in available]
        if missing:
            from lakepipe.errors import InputNotFoundError
            from lakepipe.registry import did_you_mean

            hints = "".join(did_you_mean(n, available) for n in missing)
            raise InputNotFoundError(
                f"reference catalogue has no column(s) {', '.join(missing)}.{hints} "
                f"Available: {', '.join(available)}. Fix the catalog 'columns:' mapping."
            )
        return out


class CatalogConfig(BaseModel):
    """A reference catalogue in a spec: where it is and how its columns map."""

    model_config = ConfigDict(extra="forbid")

    kind: CatalogKind = Field(
        "auto",
        description="Format; auto guesses from the path. 'archive': the pipeline archive's "
        "own reference catalog (the virtual survey's); 'cds': a VizieR table by cone",
    )
    path: str | None = Field(None, description="File or folder (relative to the spec file)")
    columns: ColumnMap = Field(default_factory=ColumnMap)
    # -- kind: cds (defaults and checks from CdsParams) --
    table: str = Field(_CDS["table"].default, description="kind: cds: " + _CDS["table"].description)
    vizier_url: str = Field(
        _CDS["vizier_url"].default, description="kind: cds: " + _CDS["vizier_url"].description
    )
    row_limit: int = Field(
        _CDS["row_limit"].default, gt=0, description="kind: cds: " + _CDS["row_limit"].description
    )
    http: HttpParams = Field(default_factory=HttpParams, description="kind: cds: polite HTTP knobs")
    max_pm_mas_yr: float = Field(
        10500.0,
        ge=0,
        description="Largest proper motion expected (mas/yr; Barnard's star, the fastest, "
        "moves 10.4 arcsec/yr); widens reads so stars moving into a region by the requested "
        "epoch are not missed",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_login_in_urls(cls, data: object) -> object:
        # model level, so that error reports never echo the URL (and its password)
        if isinstance(data, dict):
            for key in ("vizier_url",):
                if isinstance(data.get(key), str):
                    reject_userinfo(data[key], key)
        return data

    @model_validator(mode="after")
    def _path_for_files(self) -> CatalogConfig:
        if self.kind not in ("archive", "cds") and not self.path:
            raise ValueError(f"catalog kind {self.kind!r} needs a path (file or folder)")
        stray = [k for k in CDS_KEYS if k in self.model_fields_set]
        if self.kind != "cds" and stray:
            raise ValueError(
                f"{', '.join(stray)}: only for catalog kind 'cds' (this one is "
                f"{self.kind!r}); remove them or set kind: cds"
            )
        return self

    def cds_params(self) -> CdsParams:
        """The CDS client's parameters from this config (``kind: cds``)."""
        return CdsParams(**{k: getattr(self, k) for k in CDS_KEYS})


@dataclass(frozen=True)
class Cone:
    """A sky cone: centre (deg, ICRS) and radius (deg)."""

    ra: float
    dec: float
    radius_deg: float


@dataclass
class ReadStats:
    """What a read touched, for tests and logs: files and row groups opened, rows read."""

    files_total: int = 0
    files_read: int = 0
    row_groups_total: int = 0
    row_groups_read: int = 0
    rows_read: int = 0
    files: list[str] = field(default_factory=list)


_TRAFFIC: dict[str, float] = {}
_TRAFFIC_LOCK = threading.Lock()


def record_traffic(**deltas: float) -> None:
    """Add a catalog service's traffic (requests, bytes, query rows, …) to this
    process's cumulative counters (see :func:`catalog_traffic`)."""
    with _TRAFFIC_LOCK:
        for k, v in deltas.items():
            _TRAFFIC[k] = _TRAFFIC.get(k, 0) + v


def catalog_traffic() -> dict[str, float]:
    """Cumulative traffic of every catalog service read in this process (requests,
    retries, bytes, cache hits, rate-limit wait, rows returned by queries). Like
    ``Archive.stats()``, it only grows: a caller takes the difference around a call."""
    with _TRAFFIC_LOCK:
        return dict(_TRAFFIC)


def healpix_ranges(cones: list[Cone], *, max_ranges: int = MAX_RANGES) -> np.ndarray:
    """Order-29 index ranges ``[start, stop)`` (shape (n, 2)) covering the cones.

    The cover is taken at the order whose pixels are ~¼ of the smallest radius (the
    astropy-healpix cone search returns every pixel that overlaps); contiguous pixels
    merge into ranges, and when there are more than ``max_ranges`` the smallest gaps
    between ranges are filled, which keeps the cover tight and the filter short.
    """
    if not cones:
        return np.empty((0, 2), dtype=np.int64)
    rmin = max(min(c.radius_deg for c in cones), 1e-6)
    # pixel size ≈ 58.6° / 2**order (sqrt of the pixel area 4π / (12·4**order))
    order = int(np.clip(np.floor(np.log2(58.6 / (rmin / 4.0))), 0, 20))
    hp = HEALPix(nside=2**order, order="nested")
    pix = np.unique(
        np.concatenate(
            [
                hp.cone_search_lonlat(c.ra * u.deg, c.dec * u.deg, c.radius_deg * u.deg)
                for c in cones
            ]
        )
    ).astype(np.int64)
    shift = 2 * (HATS_ORDER - order)
    breaks = np.flatnonzero(np.diff(pix) != 1)
    starts = np.r_[pix[:1], pix[breaks + 1]]
    stops = np.r_[pix[breaks], pix[-1:]] + 1
    if len(starts) > max_ranges:
        gaps = starts[1:] - stops[:-1]
        keep = np.sort(np.argsort(gaps, kind="stable")[len(gaps) - (max_ranges - 1) :])
        starts = np.r_[starts[:1], starts[1:][keep]]
        stops = np.r_[stops[:-1][keep], stops[-1:]]
    return np.column_stack([starts << shift, stops << shift]).astype(np.int64)


def stable_id(values: pa.Array) -> np.ndarray:
    """int64 ids: integers as they are, anything else hashed (blake2b, 63 bits)."""
    if pa.types.is_integer(values.type):
        return values.to_numpy(zero_copy_only=False).astype(np.int64)
    out = np.empty(len(values), dtype=np.int64)
    for i, v in enumerate(values.to_pylist()):
        digest = hashlib.blake2b(str(v).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF
    return out


def reference_schema(columns: ColumnMap) -> pa.Schema:
    """Schema of the reference table for this column mapping."""
    fields = [
        pa.field("ref_id", pa.int64()),
        pa.field("ra", pa.float64()),
        pa.field("dec", pa.float64()),
        pa.field("pmra", pa.float64()),
        pa.field("pmdec", pa.float64()),
        pa.field("epoch_jyear", pa.float64()),
    ]
    fields += [pa.field(f"mag_{b}", pa.float64()) for b in columns.mags]
    fields += [pa.field(f"mag_err_{b}", pa.float64()) for b in columns.mag_errs]
    return pa.schema(fields)


def _f64(table: pa.Table, name: str | None, n: int, fill: float = np.nan) -> np.ndarray:
    if name is None:
        return np.full(n, fill)
    return pc.cast(table.column(name), pa.float64()).to_numpy(zero_copy_only=False)


def to_reference(
    raw: pa.Table,
    columns: ColumnMap,
    cones: list[Cone],
    epoch_mjd: float | None,
) -> pa.Table:
    """Map source columns to the reference table, propagate to ``epoch_mjd``, cut to cones.

    Without ``epoch_mjd`` positions stay at the catalogue epoch.
    """
    n = raw.num_rows
    ra = _f64(raw, columns.ra, n)
    dec = _f64(raw, columns.dec, n)
    pmra = np.nan_to_num(_f64(raw, columns.pmra, n, 0.0))
    pmdec = np.nan_to_num(_f64(raw, columns.pmdec, n, 0.0))
    if isinstance(columns.epoch, str):
        cat_epoch = _f64(raw, columns.epoch, n)
    else:
        cat_epoch = np.full(n, np.nan if columns.epoch is None else float(columns.epoch))
    if epoch_mjd is not None and np.any(np.isfinite(cat_epoch)):
        target = float(mjd_to_jyear(epoch_mjd))
        dt = np.where(np.isfinite(cat_epoch), target - cat_epoch, 0.0)
        ra, dec = propagate_proper_motion(ra, dec, pmra, pmdec, dt)
        epoch = np.where(np.isfinite(cat_epoch), target, cat_epoch)
    else:
        epoch = cat_epoch
    keep = np.zeros(n, dtype=bool)
    for c in cones:
        keep |= angular_separation_arcsec(ra, dec, c.ra, c.dec) <= c.radius_deg * 3600.0
    ids = (
        stable_id(raw.column(columns.id).combine_chunks())
        if columns.id is not None
        else np.full(n, -1, dtype=np.int64)
    )
    data: dict[str, np.ndarray] = {
        "ref_id": ids,
        "ra": ra,
        "dec": dec,
        "pmra": pmra,
        "pmdec": pmdec,
        "epoch_jyear": epoch,
    }
    for band, col in columns.mags.items():
        data[f"mag_{band}"] = _f64(raw, col, n)
    for band, col in columns.mag_errs.items():
        data[f"mag_err_{band}"] = _f64(raw, col, n)
    schema = reference_schema(columns)
    out = pa.Table.from_arrays([pa.array(data[f.name][keep]) for f in schema], schema=schema)
    if columns.id is None:  # no id column: the order-29 pixel of the catalogue position
        from lakepipe.astro.healpix import healpix_index

        ra0, dec0 = _f64(raw, columns.ra, n)[keep], _f64(raw, columns.dec, n)[keep]
        out = out.set_column(0, "ref_id", pa.array(healpix_index(ra0, dec0)))
    return out


def widen(
    cones: list[Cone],
    columns: ColumnMap,
    max_pm_mas_yr: float,
    epoch_mjd: float | None,
    catalog_epoch_jyear: float | None,
) -> list[Cone]:
    """Cones grown by the largest distance a star can move between the two epochs."""
    if epoch_mjd is None or columns.pmra is None or max_pm_mas_yr <= 0:
        return cones
    if catalog_epoch_jyear is None:
        dt = 50.0  # per-row epochs: assume at most 50 years apart
    else:
        dt = abs(float(mjd_to_jyear(epoch_mjd)) - catalog_epoch_jyear)
    pad_deg = max_pm_mas_yr * dt / 3.6e6
    return [Cone(c.ra, c.dec, c.radius_deg + pad_deg) for c in cones]
