"""ZTF science images from IRSA through the Image Back End (IBE).

Facts from IRSA's documentation (irsa.ipac.caltech.edu/docs/program_interface/
ztf_api.html, ztf_metadata.html, ibe/cutouts.html):

- metadata search: ``GET {base}/ibe/search/ztf/products/sci`` with ``POS=ra,dec``
  (deg, ICRS), ``SIZE=width[,height]`` (deg, full widths), ``INTERSECT`` (``OVERLAPS``,
  ``CENTER``, ``COVERS``, ``ENCLOSED``), ``WHERE`` (an SQL condition on metadata
  columns) and ``ct=csv``; rows carry ``field, ccdid, qid, filtercode, obsjd,
  filefracday, imgtypecode, seeing, airmass, maglimit, exptime, pid, ra1..dec4, ...``;
  ``obsjd`` is the Julian date at the start of the exposure;
- science image:
  ``{base}/ibe/data/ztf/products/sci/YYYY/MMDD/ffffff/ztf_{filefracday}_{field:06d}_
  {filtercode}_c{ccdid:02d}_{imgtypecode}_q{qid}_sciimg.fits`` where YYYY, MMDD, ffffff
  are characters 1–4, 5–8 and 9–14 of ``filefracday``;
- cutout: the image URL with ``center=RA,DEC`` (deg), ``size=N arcsec`` and
  ``gzip=false``; HTTP 400 when the cutout misses the image, clipped at the edges;
- proprietary data needs an IRSA login (HTTP basic); here from ``$LAKEPIPE_IRSA_USER``
  / ``$LAKEPIPE_IRSA_PASSWORD`` or ``~/.netrc``, sent only to ``base_url``'s host (over
  https, or plain http on loopback for an emulator); a login inside ``base_url`` is an
  error, since the spec is recorded in the lake.

Workers that did not run the search (the cutouts and sources stages) take an
exposure's image URL from the lake's committed ``exposures`` rows (``image_uri``), so
they send no metadata search per exposure; only an exposure the lake does not know is
looked up, by ``pid``.

The search region is a box around the query's cone or box (IBE has no cone), then the
shared :class:`~lakepipe.archives.query.ExposureQuery` geometry selects exactly, so the
``ztf`` and ``sim`` archives select the same exposures. Columns IBE metadata lacks
(gain, read noise, saturation, sky, image size, pixel scale) come from the image header,
read with one HTTP Range request per exposure (``header_columns: true``).

Spec example::

    archive: {kind: ztf, base_url: https://irsa.ipac.caltech.edu,
              http: {rate_limit_per_s: 2, contact: me@example.org}}
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from astropy.io import fits
from pydantic import Field, field_validator, model_validator

from lakepipe.archives.base import Archive, ArchiveParams, register_archive
from lakepipe.archives.http import HttpClient, HttpParams, check_fits, reject_userinfo
from lakepipe.archives.query import ExposureQuery, night_of
from lakepipe.errors import ArchiveError

log = logging.getLogger("lakepipe.archives.ztf")

JD_MJD_OFFSET = 2400000.5  # JD = MJD + 2400000.5
SEARCH_PATH = "/ibe/search/ztf/products/sci"
DATA_PATH = "/ibe/data/ztf/products/sci"
#: IBE filtercode values: the filters a ZTF query can select
FILTER_CODES: tuple[str, ...] = ("zg", "zr", "zi")
_CCD_IDS = range(1, 17)  # ZTF camera: 16 CCDs
_QIDS = range(1, 5)  # 4 readout quadrants per CCD
#: margin (days) on the obsjd WHERE: obsjd is exposure start, the lake's mjd mid-exposure
_TIME_MARGIN_D = 1.0 / 24.0
#: header keyword → exposures column, for what IBE metadata does not carry
HEADER_COLUMNS = {
    "GAIN": "gain_e_per_adu",
    "RDNOISE": "rdnoise_e",
    "SATURATE": "saturate_adu",
    "SKYLEV": "sky_adu",
    "NAXIS1": "naxis1",
    "NAXIS2": "naxis2",
    "PIXSCALE": "pixscale_arcsec",
    "MAGZP": "zeropoint_mag",
}
HEADER_FALLBACKS = {"rdnoise_e": ("READNOI",), "sky_adu": ("SKYMED", "MEDSKY")}


def product_url(base_url: str, row: dict[str, Any], suffix: str = "sciimg.fits") -> str:
    """URL of a ZTF science product from its IBE metadata row."""
    ffd = str(row["filefracday"])
    if len(ffd) != 14 or not ffd.isdigit():
        raise ValueError(f"filefracday must be 14 digits (got {ffd!r})")
    return (
        f"{base_url.rstrip('/')}{DATA_PATH}/{ffd[:4]}/{ffd[4:8]}/{ffd[8:]}/"
        f"ztf_{ffd}_{int(row['field']):06d}_{row['filtercode']}_c{int(row['ccdid']):02d}_"
        f"{row['imgtypecode']}_q{int(row['qid'])}_{suffix}"
    )


def search_params(
    where: ExposureQuery, intersect: str = "OVERLAPS", extra_where: str | None = None
) -> dict[str, str]:
    """IBE search parameters for a query (a superset; refine with ``select_rows``)."""
    params: dict[str, str] = {"ct": "csv"}
    center = where.center()
    if center is not None:
        ra0, dec0 = center
        if where.ra is not None:
            # box of side 2r around the cone, widened in RA by 1/cos(dec) at its far edge
            half_dec = float(where.radius_deg)
            edge = min(89.0, abs(dec0) + half_dec)
            width = min(360.0, 2.0 * half_dec / math.cos(math.radians(edge)))
            height = 2.0 * half_dec
        else:
            # a span in RA degrees is at least the angular width anywhere: a superset
            ra_min, ra_max, dec_min, dec_max = where.box
            width = min(360.0, ((ra_max - ra_min) % 360.0 or 360.0) + 1e-6)
            height = dec_max - dec_min
        params.update(
            POS=f"{ra0:.8f},{dec0:.8f}",
            SIZE=f"{width:.8f},{height:.8f}",
            INTERSECT=intersect,
        )
    clauses = []
    lo, hi = where.mjd_range()
    if math.isfinite(lo):
        clauses.append(f"obsjd >= {lo + JD_MJD_OFFSET - _TIME_MARGIN_D:.6f}")
    if math.isfinite(hi):
        clauses.append(f"obsjd <= {hi + JD_MJD_OFFSET + _TIME_MARGIN_D:.6f}")
    if where.filters:
        for f in where.filters:
            if f not in FILTER_CODES:
                raise ValueError(f"ZTF filter codes are {', '.join(FILTER_CODES)} (got {f!r})")
        clauses.append("filtercode IN (" + ", ".join(f"'{f}'" for f in where.filters) + ")")
    if where.field_ids:
        clauses.append("field IN (" + ", ".join(str(int(f)) for f in where.field_ids) + ")")
    for name, column, ids, valid in (
        ("ccd_ids", "ccdid", where.ccd_ids, _CCD_IDS),
        ("quadrant_ids", "qid", where.quadrant_ids, _QIDS),
    ):
        if ids is None:
            continue
        bad = [i for i in ids if int(i) not in valid]
        if bad or not ids:
            raise ValueError(
                f"ZTF {name} are {valid.start}-{valid.stop - 1} (got {bad or 'an empty list'})"
            )
        clauses.append(f"{column} IN (" + ", ".join(str(int(i)) for i in ids) + ")")
    if extra_where:
        clauses.append(f"({extra_where})")
    if clauses:
        params["WHERE"] = " AND ".join(clauses)
    return params


def exposures_from_ibe(meta: pa.Table, base_url: str) -> pa.Table:
    """IBE ``sci`` metadata rows → rows of the lake's ``exposures`` table.

    ``mjd`` = obsjd − 2400000.5 + exptime/2 (obsjd is the exposure start);
    ``exposure_id`` = ``pid`` (IPAC's processed-image id, unique per CCD quadrant image).
    """
    rows = meta.to_pylist()
    out: dict[str, list] = {c: [] for c in _EXPOSURE_COLUMNS}
    for r in rows:
        exptime = _float(r.get("exptime"))
        mjd = float(r["obsjd"]) - JD_MJD_OFFSET + (exptime or 0.0) / 172800.0
        out["night"].append(night_of(mjd))
        out["exposure_id"].append(int(r["pid"]))
        out["archive"].append("ztf")
        out["image_uri"].append(product_url(base_url, r))
        out["field"].append(int(r["field"]))
        out["ccdid"].append(int(r["ccdid"]))
        out["qid"].append(int(r["qid"]))
        out["filter"].append(str(r["filtercode"]))
        out["mjd"].append(mjd)
        out["exptime_s"].append(exptime)
        out["seeing_fwhm_arcsec"].append(_float(r.get("seeing")))
        out["airmass"].append(_float(r.get("airmass")))
        out["zeropoint_mag"].append(_float(r.get("magzp")))
        out["mag_lim"].append(_float(r.get("maglimit")))
        for c in ("sky_adu", "gain_e_per_adu", "rdnoise_e", "saturate_adu", "pixscale_arcsec"):
            out[c].append(None)
        out["naxis1"].append(None)
        out["naxis2"].append(None)
        out["ra"].append(float(r["ra"]))
        out["dec"].append(float(r["dec"]))
        for i in range(1, 5):
            out[f"ra{i}"].append(_float(r.get(f"ra{i}")))
            out[f"dec{i}"].append(_float(r.get(f"dec{i}")))
    return pa.table({c: pa.array(v, _EXPOSURE_TYPES[c]) for c, v in out.items()})


_EXPOSURE_TYPES: dict[str, pa.DataType] = {
    "night": pa.string(),
    "exposure_id": pa.int64(),
    "archive": pa.string(),
    "image_uri": pa.string(),
    "field": pa.int32(),
    "ccdid": pa.int16(),
    "qid": pa.int16(),
    "filter": pa.string(),
    "mjd": pa.float64(),
    "exptime_s": pa.float64(),
    "seeing_fwhm_arcsec": pa.float64(),
    "airmass": pa.float64(),
    "sky_adu": pa.float64(),
    "zeropoint_mag": pa.float64(),
    "mag_lim": pa.float64(),
    "gain_e_per_adu": pa.float64(),
    "rdnoise_e": pa.float64(),
    "saturate_adu": pa.float64(),
    "naxis1": pa.int32(),
    "naxis2": pa.int32(),
    "pixscale_arcsec": pa.float64(),
    "ra": pa.float64(),
    "dec": pa.float64(),
    **{f"{a}{i}": pa.float64() for i in range(1, 5) for a in ("ra", "dec")},
}
_EXPOSURE_COLUMNS = list(_EXPOSURE_TYPES)


def _float(v: Any) -> float | None:
    if v is None or v == "":
        return None
    f = float(v)
    return None if math.isnan(f) else f


def read_ibe_csv(data: bytes) -> pa.Table:
    """Parse an IBE ``ct=csv`` answer (header row, then one row per image)."""
    if not data.strip():
        return pa.table({})
    opts = pacsv.ConvertOptions(
        column_types={"filefracday": pa.string(), "filtercode": pa.string(), "pid": pa.int64()},
        strings_can_be_null=True,
    )
    try:
        return pacsv.read_csv(io.BytesIO(data), convert_options=opts)
    except pa.ArrowInvalid as exc:
        raise ArchiveError(f"IBE answered something that is not CSV: {exc}") from exc


def parse_header_bytes(data: bytes) -> fits.Header | None:
    """The primary header from the first bytes of a FITS file, or None without END yet."""
    for end in range(0, len(data) - 2879, 2880):
        block = data[end : end + 2880]
        for i in range(0, 2880, 80):
            if block[i : i + 8] == b"END     ":
                return fits.Header.fromstring(data[: end + 2880].decode("ascii", "replace"))
    return None


@register_archive("ztf")
class ZtfArchive(Archive):
    """IRSA ZTF science exposures, images and cutouts through IBE (see module docstring)."""

    known_filters: tuple[str, ...] = FILTER_CODES

    class Params(ArchiveParams):
        base_url: str = Field(
            "https://irsa.ipac.caltech.edu", description="IRSA root (an emulator for tests)"
        )
        intersect: Literal["OVERLAPS", "CENTER", "COVERS", "ENCLOSED"] = Field(
            "OVERLAPS", description="IBE INTERSECT mode of the metadata search"
        )
        header_columns: bool = Field(
            True, description="Read gain/noise/saturation/sky/size from image headers (Range)"
        )
        header_bytes: int = Field(
            2880 * 12, gt=0, description="First bytes fetched to read a header (multiple of 2880)"
        )
        credentials_env: str = Field(
            "LAKEPIPE_IRSA", description="Env prefix of an IRSA login (<PREFIX>_USER/_PASSWORD)"
        )
        http: HttpParams = Field(default_factory=HttpParams, description="Polite HTTP knobs")

        @model_validator(mode="before")
        @classmethod
        def _no_login_in_base_url(cls, data: Any) -> Any:
            # model level, so that error reports never echo the URL (and its password)
            if isinstance(data, dict) and isinstance(data.get("base_url"), str):
                reject_userinfo(data["base_url"], "base_url")
            return data

        @field_validator("base_url")
        @classmethod
        def _check_base_url(cls, v: str) -> str:
            if urlsplit(v).scheme not in ("http", "https"):
                raise ValueError("base_url must be an http:// or https:// URL")
            return v

    params: Params

    def __init__(self, params: ArchiveParams, **kw: Any) -> None:
        super().__init__(params, **kw)
        self.base_url = self.params.base_url.rstrip("/")
        self.http = HttpClient(
            self.params.http,
            credentials_env=self.params.credentials_env,
            credentials_url=self.base_url,
        )
        self._rows: dict[int, dict[str, Any]] = {}
        self._urls: dict[int, str] = {}  # exposure_id → image URL known from lake rows
        self._lake_root: Path | None = None
        self._learned: dict[str, str] = {}  # exposures partition -> fingerprint read
        self._query_rows = 0

    def stats(self) -> dict[str, float]:
        """HTTP counters of this client plus rows returned by metadata searches."""
        return {**self.http.stats.counters(), "query_rows": self._query_rows}

    def use_lake(self, root: Path) -> None:
        """Cache responses and downloads under ``<lake>/_cache/http`` unless a cache is
        configured (``http.cache_dir`` or ``$LAKEPIPE_HTTP_CACHE``): reruns then fetch
        nothing already complete and resume partial files by Range."""
        if self.http.cache_dir is None:
            self.http.cache_dir = Path(root) / "_cache" / "http"
        self._lake_root = Path(root)

    def remember(self, exposures: pa.Table) -> int:
        """Learn image URLs from ``exposures`` rows this archive wrote (``exposure_id``,
        ``image_uri``), so fetching them needs no metadata search; returns how many.

        URLs are re-rooted on ``base_url`` (the lake may come from another mirror).
        """
        if not {"exposure_id", "image_uri"} <= set(exposures.column_names):
            return 0
        archive = (
            exposures.column("archive").to_pylist()
            if "archive" in exposures.column_names
            else ["ztf"] * exposures.num_rows
        )
        ids = exposures.column("exposure_id").to_pylist()
        uris = exposures.column("image_uri").to_pylist()
        n = 0
        for eid, uri, arc in zip(ids, uris, archive, strict=True):
            if arc != "ztf" or not uri or DATA_PATH + "/" not in uri:
                continue
            self._urls[int(eid)] = self.base_url + DATA_PATH + uri.split(DATA_PATH, 1)[1]
            n += 1
        return n

    def _learn_from_lake(self) -> None:
        """Read the committed ``exposures`` rows of the lake this archive serves: only the
        partitions not read yet (or recommitted since), so an id the lake cannot resolve
        costs a manifest read, not a read of the whole table."""
        if self._lake_root is None:
            return
        from lakepipe.lake import Lake

        reader = Lake(self._lake_root).reader()
        committed = {k: e.fingerprint for k, e in reader.manifest.partitions("exposures").items()}
        new = sorted(k for k, fp in committed.items() if self._learned.get(k) != fp)
        if not new:
            return
        table = reader.read(
            "exposures", partitions=new, columns=["exposure_id", "archive", "image_uri"]
        )
        self._learned.update((k, committed[k]) for k in new)
        log.debug("learned %d image URLs from the lake's exposures", self.remember(table))

    def fingerprint(self) -> str:
        """Content identity: the data source, not the politeness knobs or cache paths."""
        return f"ztf:{self.base_url}:{self.params.intersect}:{self.params.header_columns}"

    # -- metadata ---------------------------------------------------------------------------
    def search(self, where: ExposureQuery, extra_where: str | None = None) -> pa.Table:
        """Raw IBE metadata rows for a query (a superset of the exact selection)."""
        params = search_params(where, self.params.intersect, extra_where)
        resp = self.http.get(self.base_url + SEARCH_PATH, params)
        meta = read_ibe_csv(resp.content)
        log.info("IBE search %s returned %d rows", resp.url, meta.num_rows)
        self._query_rows += meta.num_rows
        if meta.num_rows and "pid" not in meta.column_names:
            raise ArchiveError("IBE answer lacks the pid column", url=resp.url)
        for r in meta.to_pylist():
            self._rows[int(r["pid"])] = r
        return meta

    def exposures(self, where: ExposureQuery | dict | None = None) -> pa.Table:
        """Exposures matching ``where``, in the ``exposures`` table's columns."""
        where = _as_query(where)
        meta = self.search(where)
        table = exposures_from_ibe(meta, self.base_url) if meta.num_rows else _empty()
        keep = where.select(table)  # the one selection every archive applies
        table = table.filter(pa.array(keep, pa.bool_()))
        table = table.sort_by([("mjd", "ascending"), ("exposure_id", "ascending")])
        if where.max_rows is not None:
            table = table.slice(0, where.max_rows)
        if self.params.header_columns and table.num_rows:
            table = self._add_header_columns(table)
        return table

    def nights(self, where: ExposureQuery | dict | None = None) -> list[str]:
        """Nights (YYYY-MM-DD) with at least one matching exposure, sorted."""
        where = _as_query(where)
        table = exposures_from_ibe(m, self.base_url) if (m := self.search(where)).num_rows else None
        if table is None:
            return []
        keep = where.select(table)
        return sorted(set(table.column("night").filter(pa.array(keep)).to_pylist()))

    def _row(self, exposure_id: int) -> dict[str, Any]:
        row = self._rows.get(int(exposure_id))
        if row is None:
            self.search(ExposureQuery(), extra_where=f"pid = {int(exposure_id)}")
            row = self._rows.get(int(exposure_id))
        if row is None:
            raise ArchiveError(f"IRSA has no ZTF science image with pid {exposure_id}")
        return row

    def image_url(self, exposure_id: int) -> str:
        """URL of an exposure's science image: from a search this archive ran, else from
        the lake's ``exposures`` rows, else from a ``pid`` search."""
        eid = int(exposure_id)
        if eid in self._rows:
            return product_url(self.base_url, self._rows[eid])
        if eid not in self._urls:
            self._learn_from_lake()
        if eid in self._urls:
            return self._urls[eid]
        return product_url(self.base_url, self._row(eid))

    def header(self, exposure_id: int) -> fits.Header:
        """The image's primary header from its first bytes (HTTP Range)."""
        url = self.image_url(exposure_id)
        n = self.params.header_bytes - self.params.header_bytes % 2880 or 2880
        start, data = 0, b""
        while True:
            data += self.http.get_range(url, start, start + n - 1).content
            hdr = parse_header_bytes(data)
            if hdr is not None:
                return hdr
            if len(data) < start + n:
                raise ArchiveError("FITS header has no END card", url=url)
            start += n

    def _add_header_columns(self, table: pa.Table) -> pa.Table:
        values: dict[str, list] = {c: [] for c in HEADER_COLUMNS.values()}
        for eid in table.column("exposure_id").to_pylist():
            hdr = self.header(eid)
            for key, col in HEADER_COLUMNS.items():
                v = hdr.get(key)
                for alt in HEADER_FALLBACKS.get(col, ()):
                    v = hdr.get(alt) if v is None else v
                values[col].append(v)
        for col, vals in values.items():
            i = table.column_names.index(col)
            old = table.column(col).to_pylist()
            merged = [o if o is not None else v for o, v in zip(old, vals, strict=True)]
            table = table.set_column(i, col, pa.array(merged, _EXPOSURE_TYPES[col]))
        return table

    # -- pixels -----------------------------------------------------------------------------
    def image_fits(self, exposure_id: int) -> bytes:
        """The full science image (FITS bytes; resumable download into the HTTP cache)."""
        return self.http.fetch(self.image_url(exposure_id), check=check_fits)

    def image(self, exposure_id: int) -> tuple[fits.Header, np.ndarray]:
        """(header, pixels) of the full science image."""
        return _open(self.image_fits(exposure_id))

    def cutout_url_params(
        self, exposure_id: int, ra: float, dec: float, size_arcsec: float
    ) -> tuple[str, dict[str, str]]:
        """(image URL, IBE cutout parameters) of a cutout."""
        params = {
            "center": f"{float(ra)!r},{float(dec)!r}",  # exact: pixel edges matter
            "size": f"{size_arcsec:g}arcsec",
            "gzip": "false",
        }
        return self.image_url(exposure_id), params

    def cutout_fits(
        self, exposure_id: int, ra: float, dec: float, size_arcsec: float
    ) -> tuple[bytes | None, str]:
        """(FITS bytes or None when off chip, status), as the sim archive gives them."""
        blob, _, _, status = self._cutout(exposure_id, ra, dec, size_arcsec)
        return blob, status

    def cutout(
        self, exposure_id: int, ra: float, dec: float, size_arcsec: float
    ) -> tuple[fits.Header | None, np.ndarray | None, str]:
        """(header, pixels, status) as the sim archive gives them.

        Status is ``ok`` (the full square), ``partial`` (IBE clipped it at the image
        edge, or it holds blank pixels) or ``off_chip`` (IBE's HTTP 400: no overlap).
        """
        _, header, data, status = self._cutout(exposure_id, ra, dec, size_arcsec)
        return header, data, status

    def _cutout(self, exposure_id: int, ra: float, dec: float, size_arcsec: float) -> tuple:
        url, params = self.cutout_url_params(exposure_id, ra, dec, size_arcsec)
        try:
            blob = self.http.fetch(url, params, check=check_fits)
        except ArchiveError as exc:
            if exc.status == 400:
                return None, None, None, "off_chip"
            raise
        header, data = _open(blob)
        return blob, header, data, _cutout_status(header, data, size_arcsec)


def _cutout_status(header: fits.Header, data: np.ndarray, size_arcsec: float) -> str:
    """``partial`` when a side is short of the requested size by > 1 pixel or blank."""
    from astropy.wcs import WCS
    from astropy.wcs.utils import proj_plane_pixel_scales

    # WCS() "fixes" and warns about harmless header conventions (DATE-OBS vs MJD-OBS);
    # we only need the pixel scale here, so those notes are not worth a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pix_arcsec = float(np.mean(proj_plane_pixel_scales(WCS(header).celestial))) * 3600
        except Exception:  # no usable WCS: fall back to the header's own scale
            pix_arcsec = float(header.get("PIXSCALE") or 0.0)
    if pix_arcsec > 0 and min(data.shape) < math.floor(size_arcsec / pix_arcsec) - 1:
        return "partial"
    if not np.all(np.isfinite(data)):
        return "partial"
    return "ok"


def _open(blob: bytes) -> tuple[fits.Header, np.ndarray]:
    with fits.open(io.BytesIO(blob)) as hdul:
        return hdul[0].header.copy(), np.array(hdul[0].data)


def _as_query(where: ExposureQuery | dict | None) -> ExposureQuery:
    if where is None:
        return ExposureQuery()
    return where if isinstance(where, ExposureQuery) else ExposureQuery(**where)


def _empty() -> pa.Table:
    return pa.table({c: pa.array([], t) for c, t in _EXPOSURE_TYPES.items()})
