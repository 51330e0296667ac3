"""``fits_dir``: a folder of FITS images from any telescope, served as an archive.

See :class:`FitsDirArchive` (also ``lakepipe kinds fits_dir``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning
from pydantic import BaseModel, ConfigDict, Field

from lakepipe.archives.base import Archive, ArchiveParams, register_archive
from lakepipe.archives.query import ExposureQuery, night_of, to_mjd
from lakepipe.astro import wcs as wcsu
from lakepipe.errors import InputNotFoundError, ParseError

_MJD_JD = 2400000.5

log = logging.getLogger("lakepipe.archives.fits_dir")

# Default header keywords per quantity, most specific first.
_KEYS: dict[str, tuple[str, ...]] = {
    "filter": ("FILTER", "FILTNAM", "FILTNAME", "FILTER1", "BAND", "FILTERID"),
    "exptime_s": ("EXPTIME", "EXPOSURE", "EXP_TIME", "ITIME", "TEXPTIME"),
    "zeropoint_mag": ("MAGZP", "MAGZPT", "PHOTZP", "MAGZERO", "ZEROPT", "ZP"),
    "seeing_fwhm_arcsec": ("SEEING", "FWHMSEE"),
    "airmass": ("AIRMASS", "SECZ", "AMSTART"),
    "sky_adu": ("SKYLEVEL", "SKY", "BACKGND"),
    "mag_lim": ("MAGLIM", "LIMMAG", "MAGLIMIT"),
    "gain_e_per_adu": ("GAIN", "EGAIN", "CCDGAIN"),
    "rdnoise_e": ("RDNOISE", "READNOIS", "RON", "READNOISE"),
    "saturate_adu": ("SATURATE", "SATLEVEL", "SATURATN"),
    "field": ("FIELDID", "FIELD"),
    "ccdid": ("CCDID", "CCD_ID", "CCDNUM"),
    "qid": ("QID", "AMP_ID"),
}
_NUMERIC = [k for k in _KEYS if k != "filter"]

# (keyword, format, which instant of the exposure it marks)
_TIME_KEYS: tuple[tuple[str, str, str], ...] = (
    ("MJD-AVG", "mjd", "mid"),
    ("DATE-AVG", "iso", "mid"),
    ("MJD-BEG", "mjd", "start"),
    ("DATE-BEG", "iso", "start"),
    ("MJD-OBS", "mjd", "start"),
    ("DATE-OBS", "iso", "start"),
    ("JD", "jd", "start"),
    ("EXPSTART", "mjd", "start"),
    ("MJD-END", "mjd", "end"),
    ("DATE-END", "iso", "end"),
)
_CLOCK_KEYS = ("TIME-OBS", "UT", "UTSTART", "UT-START")

# EXTNAMEs of per-pixel planes that accompany a science image (bad-pixel masks, data
# quality, weights, variance): never exposures themselves. The first five are masks.
_MASK_EXTNAMES = ("MASK", "BPM", "DQ", "FLAGS", "BADPIX")
_AUX_EXTNAMES = (*_MASK_EXTNAMES, "WEIGHT", "WHT", "ERR", "VAR", "VARIANCE", "RMS")


class KeywordOverrides(BaseModel):
    """Header keyword names to use instead of the defaults (one per quantity)."""

    model_config = ConfigDict(extra="forbid")

    time: str | None = Field(None, description="Keyword of the observation time")
    time_format: Literal["auto", "iso", "mjd", "jd"] = Field(
        "auto", description="How to read the time keyword (auto: by its name and value)"
    )
    time_refers_to: Literal["start", "mid", "end"] | None = Field(
        None, description="Which instant the time keyword marks (default: by keyword)"
    )
    timesys: str | None = Field(None, description="Time scale (utc, tai, tt); default TIMESYS")
    filter: str | None = None
    exptime_s: str | None = None
    zeropoint_mag: str | None = None
    seeing_fwhm_arcsec: str | None = Field(None, description="Keyword of the FWHM in arcsec")
    airmass: str | None = None
    sky_adu: str | None = None
    mag_lim: str | None = None
    gain_e_per_adu: str | None = None
    rdnoise_e: str | None = None
    saturate_adu: str | None = None
    field: str | None = None
    ccdid: str | None = None
    qid: str | None = None


class HeaderDefaults(BaseModel):
    """Values used when no header keyword gives them."""

    model_config = ConfigDict(extra="forbid")

    filter: str = Field("unknown", description="Filter code")
    exptime_s: float | None = Field(None, ge=0, description="Exposure time (s)")
    zeropoint_mag: float | None = Field(None, description="Photometric zeropoint (mag)")
    seeing_fwhm_arcsec: float | None = Field(None, gt=0)
    airmass: float | None = Field(None, ge=1)
    sky_adu: float | None = None
    mag_lim: float | None = None
    gain_e_per_adu: float | None = Field(None, gt=0)
    rdnoise_e: float | None = Field(None, ge=0)
    saturate_adu: float | None = None
    field: int | None = None
    ccdid: int | None = None
    qid: int | None = None


@dataclass(frozen=True)
class _Entry:
    """One exposure of the folder: where it is and its contract row."""

    relpath: str
    hdu: int
    row: dict[str, Any]
    mask_hdu: int | None = None  # the HDU holding this image's bad-pixel mask


def exposure_id_for(relpath: str, hdu: int) -> int:
    """Stable int64 id: first 63 bits of SHA-256 of ``'<relpath>:<hdu>'``."""
    digest = hashlib.sha256(f"{relpath}:{hdu}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def night_label(mjd_utc: float, longitude_deg: float | None = None) -> str:
    """Night of an observation (``YYYY-MM-DD``).

    Without a longitude: the UTC date (right for Pacific and Atlantic sites whose nights
    fit in one UTC day). With the site's east longitude: the UTC date of the preceding
    local mean noon plus 6 h, i.e. of the start of that night, so exposures before and
    after UTC midnight share a night everywhere.
    """
    if longitude_deg is None:
        return night_of(mjd_utc)
    noon_frac = (0.5 - longitude_deg / 360.0) % 1.0  # local mean noon as a UTC day fraction
    prev_noon = mjd_utc - ((mjd_utc - noon_frac) % 1.0)
    return night_of(prev_noon + 0.25)


def _merged_header(primary: fits.Header, ext: fits.Header) -> fits.Header:
    """The extension header plus primary keywords it lacks (FITS INHERIT convention)."""
    out = ext.copy()
    for card in primary.cards:
        key = card.keyword
        if key and key not in ("COMMENT", "HISTORY") and key not in out:
            if wcsu._STRUCTURAL.match(key):
                continue
            out.append(card)
    return out


@register_archive("fits_dir")
class FitsDirArchive(Archive):
    """A folder of FITS images (any telescope) as an archive.

    Every 2-D image HDU with a celestial WCS in the files matching ``pattern`` under
    ``path`` is one exposure (multi-extension files give one exposure per selected HDU;
    tile-compressed ``.fz`` images work too). Images without one are skipped with a
    warning naming them, or, with ``no_wcs: pixels``, served with null ``ra``/``dec``
    and corners for measurement in pixel coordinates. Observation metadata comes from common header
    keywords, the extension's header first and then the primary header's; ``keywords``
    overrides the keyword names and ``defaults`` fills values no header has::

        archive:
          kind: fits_dir
          path: data/night1           # relative to the spec file
          pattern: "**/*.fits*"
          hdu: all                    # or an index, a list of indices, or an EXTNAME
          keywords: {time: UTSTART, time_refers_to: start, filter: FILTER2}
          defaults: {filter: r, gain_e_per_adu: 1.6}
          mask_hdu: BPM               # auto (default), none, an index or an EXTNAME
          mask_bits: 5                # bad where mask & 5 != 0 (default: any non-zero)

    Extensions named MASK, BPM, DQ, FLAGS, BADPIX, WEIGHT, WHT, ERR, VAR, VARIANCE or
    RMS are per-pixel companions of an image, not exposures. A mask extension of the
    image's shape (``mask_hdu``) is served by :meth:`mask`, which the ``sources`` stage
    uses to ignore bad pixels and flag the sources on them.

    Time (converted to MJD UTC at mid-exposure), in order of preference (FITS Standard
    4.0 §9.4; Rots et al. 2015, A&A 574, A36): ``MJD-AVG``/``DATE-AVG`` (mid-exposure, used
    as is); ``MJD-BEG``/``DATE-BEG``, ``MJD-OBS``, ``DATE-OBS`` (with ``TIME-OBS``/``UT``/
    ``UTSTART`` when DATE-OBS holds only a date), ``JD``, ``EXPSTART`` — all the start of
    the exposure, so half of ``EXPTIME`` is added; ``MJD-END``/``DATE-END`` (the end, so
    half of EXPTIME is subtracted). ``TIMESYS`` (default UTC) gives the time scale.

    ``exposure_id`` is the first 63 bits of SHA-256 of ``<path relative to the folder>:<hdu
    index>``, so it is stable as long as the folder layout is. Nights are UTC dates of the
    mid-exposure time, or with ``night_longitude_deg`` the UTC date at the start of the
    local night (local noon + 6 h), which keeps a whole night together at any site.
    """

    class Params(ArchiveParams):
        path: str = Field(description="Folder of FITS files (relative to the spec file)")
        pattern: str = Field("**/*.fits*", description="Glob of files under path")
        hdu: Literal["all"] | int | list[int] | str = Field(
            "all",
            description="Which HDUs are exposures: all (every 2-D image with a celestial "
            "WCS), an index, a list of indices, or an EXTNAME",
        )
        keywords: KeywordOverrides = Field(default_factory=KeywordOverrides)
        defaults: HeaderDefaults = Field(default_factory=HeaderDefaults)
        night_longitude_deg: float | None = Field(
            None, ge=-180, le=360, description="Site east longitude for night labels (deg)"
        )
        on_bad_file: Literal["error", "skip"] = Field(
            "error", description="A corrupt file fails the run (error) or is left out (skip)"
        )
        no_wcs: Literal["skip", "pixels"] = Field(
            "skip",
            description="Images without a celestial WCS: skip them (a warning names each) "
            "or serve them with null ra/dec/corners (pixel positions only; region queries "
            "never select them)",
        )
        mask_hdu: Literal["auto", "none"] | int | str = Field(
            "auto",
            description="HDU holding each image's bad-pixel mask: auto (an extension named "
            "MASK, BPM, DQ, FLAGS or BADPIX with the image's EXTVER, or the only one), none, "
            "an index, or an EXTNAME (matched on EXTVER when several share it)",
        )
        mask_bits: int | None = Field(
            None,
            ge=1,
            description="Bits of the mask that mark bad pixels (bad where mask & bits != 0); "
            "default: any non-zero value",
        )

    params: Params

    @property
    def root(self) -> Path:
        p = Path(self.params.path).expanduser()
        return p if p.is_absolute() else (self.spec_dir / p).resolve()

    # -- discovery ------------------------------------------------------------------------

    def files(self) -> list[Path]:
        """Matching files, sorted by relative path."""
        root = self.root
        if not root.is_dir():
            raise InputNotFoundError(
                f"fits_dir archive: folder {root} does not exist; fix `archive.path` "
                "(relative paths are relative to the spec file)"
            )
        return sorted(p for p in root.glob(self.params.pattern) if p.is_file())

    def _stats(self) -> list[tuple[str, int, int]]:
        """(relative path, size, mtime_ns) of every matched file: the folder's state."""
        out = []
        for p in self.files():
            st = p.stat()
            out.append((p.relative_to(self.root).as_posix(), st.st_size, st.st_mtime_ns))
        return out

    def fingerprint(self) -> str:
        """Params plus every matched file's path, size and modification time."""
        h = hashlib.sha256(super().fingerprint().encode())
        for rel, size, mtime in self._stats():
            h.update(f"{rel}|{size}|{mtime}\n".encode())
        return f"fits_dir:{h.hexdigest()}"

    @property
    def _index(self) -> list[_Entry]:
        """Every exposure of the folder, rescanned when a file was added, removed or
        rewritten since the last scan (an archive can outlive one run)."""
        state = self._stats()
        if getattr(self, "_state", None) != state:
            entries: list[_Entry] = []
            for rel, _size, _mtime in state:
                try:
                    entries.extend(self._scan(self.root / rel, rel))
                except ParseError:
                    if self.params.on_bad_file == "error":
                        raise
            self._entries = entries
            self._ids = {e.row["exposure_id"]: e for e in entries}
            self._state = state
            self._last_image = None
        return self._entries

    def _entry(self, exposure_id: int) -> _Entry:
        ids = getattr(self, "_ids", None)
        if ids is None or int(exposure_id) not in ids:
            self._index  # noqa: B018 - (re)scan: the folder may have changed
        try:
            return self._ids[int(exposure_id)]
        except KeyError:
            raise InputNotFoundError(
                f"fits_dir archive {self.root}: no exposure with id {exposure_id}; the folder "
                "changed since the exposures table was made? Rerun the exposures stage"
            ) from None

    def _scan(self, path: Path, rel: str) -> list[_Entry]:
        # Real headers carry non-standard cards (ESO-LOG, blank CTYPEs) that astropy
        # reports (AstropyUserWarning) whenever it parses one, i.e. during this header scan;
        # it keeps them as they are, which is what we want.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyUserWarning)
            return list(self._scan_headers(path, rel))

    def _scan_headers(self, path: Path, rel: str) -> Iterator[_Entry]:
        with _open_fits(path) as hdul:
            primary = hdul[0].header
            masks = self._mask_hdus(hdul, path)
            for i, hdu in enumerate(hdul):
                if i in masks.values() or not self._selected(i, hdu):
                    continue
                header = _merged_header(primary, hdu.header) if i else hdu.header.copy()
                try:
                    wcs = wcsu.celestial_wcs(header)
                except ValueError as exc:
                    if self.params.no_wcs == "skip":
                        if self.params.hdu != "all":
                            raise ParseError(
                                f"{path}[{i}]: selected HDU has no celestial WCS; choose "
                                "another `archive.hdu`, add CTYPE/CRVAL/CRPIX/CD keywords or "
                                "set `archive.no_wcs: pixels`"
                            ) from None
                        log.warning(
                            "fits_dir: %s[%d] skipped: %s; set `archive.no_wcs: pixels` to "
                            "measure it in pixel coordinates (ra/dec null)",
                            path,
                            i,
                            exc,
                        )
                        continue
                    wcs = None
                yield _Entry(rel, i, self._row(path, rel, i, header, wcs), masks.get(i))

    def _mask_hdus(self, hdul: fits.HDUList, path: Path) -> dict[int, int]:
        """{image HDU index: its mask HDU index} for the file (``mask_hdu``)."""
        sel = self.params.mask_hdu
        if sel == "none":
            return {}
        images = [
            i
            for i, h in enumerate(hdul)
            if _is_image(h) and h.header.get("NAXIS", 0) == 2 and _extname(h) not in _AUX_EXTNAMES
        ]
        if isinstance(sel, int):
            if not 0 <= sel < len(hdul) or not _is_image(hdul[sel]):
                raise ParseError(
                    f"{path}: archive.mask_hdu {sel} is not an image HDU of the file "
                    f"(it has {len(hdul)} HDUs); fix `archive.mask_hdu`"
                )
            return {i: sel for i in images if i != sel}
        names = _MASK_EXTNAMES if sel == "auto" else (sel.strip().upper(),)
        cands = [i for i, h in enumerate(hdul) if _is_image(h) and _extname(h) in names]
        if not cands:
            if sel != "auto":
                raise ParseError(
                    f"{path}: no HDU named {sel!r} (archive.mask_hdu); the file has "
                    f"{', '.join(_extname(h) or '(unnamed)' for h in hdul)}"
                )
            return {}
        out = {}
        for i in images:
            ver = hdul[i].header.get("EXTVER", 1)
            same = [c for c in cands if hdul[c].header.get("EXTVER", 1) == ver]
            pick = same[0] if same else (cands[0] if len(cands) == 1 else None)
            if pick is not None and pick != i:
                out[i] = pick
        return out

    def _selected(self, i: int, hdu: Any) -> bool:
        sel = self.params.hdu
        if not _is_image(hdu) or hdu.header.get("NAXIS", 0) != 2:
            if isinstance(sel, int) and sel == i:
                raise ParseError(
                    f"HDU {i} is not a 2-D image (it is {type(hdu).__name__}); choose another "
                    "`archive.hdu`"
                )
            return False
        if sel == "all":
            return _extname(hdu) not in _AUX_EXTNAMES
        if isinstance(sel, int):
            return i == sel
        if isinstance(sel, list):
            return i in sel
        return str(hdu.header.get("EXTNAME", "")).strip().upper() == sel.strip().upper()

    # -- header interpretation ------------------------------------------------------------

    def _value(self, header: fits.Header, name: str) -> Any:
        override = getattr(self.params.keywords, name)
        keys = (override,) if override else _KEYS[name]
        for key in keys:
            if key in header and header[key] not in (None, ""):
                return header[key]
        return getattr(self.params.defaults, name)

    def _row(self, path: Path, rel: str, hdu: int, header: fits.Header, wcs: Any) -> dict:
        naxis1, naxis2 = int(header["NAXIS1"]), int(header["NAXIS2"])
        if header.get("ZIMAGE"):
            naxis1, naxis2 = int(header["ZNAXIS1"]), int(header["ZNAXIS2"])
        exptime = _as_float(self._value(header, "exptime_s"), path, "exptime_s")
        mjd = self._mid_mjd(header, path, hdu, exptime)
        if wcs is None:  # no_wcs: pixels
            ra_c = dec_c = None
            rc = dc = [None] * 4
        else:
            ra_c, dec_c = wcsu.image_center(wcs, naxis1, naxis2)
            rc, dc = wcsu.footprint_corners(wcs, naxis1, naxis2)
        row: dict[str, Any] = {
            "night": night_label(mjd, self.params.night_longitude_deg),
            "exposure_id": exposure_id_for(rel, hdu),
            "archive": "fits_dir",
            "image_uri": f"{path}[{hdu}]",
            "filter": str(self._value(header, "filter")).strip(),
            "mjd": mjd,
            "naxis1": naxis1,
            "naxis2": naxis2,
            "pixscale_arcsec": None if wcs is None else wcsu.pixel_scale_arcsec(wcs),
            "ra": ra_c,
            "dec": dec_c,
        }
        for name in _NUMERIC:
            if name == "exptime_s":
                row[name] = exptime
                continue
            v = _as_float(self._value(header, name), path, name)
            row[name] = None if v is None else (int(v) if name in ("field", "ccdid", "qid") else v)
        for k in range(4):
            row[f"ra{k + 1}"] = None if rc[k] is None else float(rc[k])
            row[f"dec{k + 1}"] = None if dc[k] is None else float(dc[k])
        return row

    def _mid_mjd(self, header: fits.Header, path: Path, hdu: int, exptime: float | None) -> float:
        kw = self.params.keywords
        if kw.time:
            if kw.time not in header:
                raise ParseError(
                    f"{path}[{hdu}]: time keyword {kw.time!r} (archive.keywords.time) is not in "
                    "the header; set it to a keyword the files have"
                )
            fmt = kw.time_format
            candidates = [(kw.time, fmt, kw.time_refers_to or "start")]
        else:
            candidates = [(k, f, w) for k, f, w in _TIME_KEYS if k in header]
            if not candidates:
                raise ParseError(
                    f"{path}[{hdu}]: no observation time keyword (looked for "
                    f"{', '.join(k for k, _f, _w in _TIME_KEYS)}); name yours with "
                    "`archive.keywords.time` (and `time_refers_to: start|mid|end`)"
                )
        key, fmt, refers = candidates[0]
        if kw.time_refers_to:
            refers = kw.time_refers_to
        try:
            mjd = _parse_time(header, key, fmt)
        except (ValueError, TypeError) as exc:
            raise ParseError(
                f"{path}[{hdu}]: cannot read time keyword {key}={header[key]!r} ({exc}); set "
                "`archive.keywords.time_format` (iso, mjd, jd) or another keyword"
            ) from None
        scale = (kw.timesys or str(header.get("TIMESYS", "UTC"))).strip().lower()
        mjd = _to_utc(mjd, scale, path)
        if refers != "mid":
            if exptime is None:
                raise ParseError(
                    f"{path}[{hdu}]: {key} marks the {refers} of the exposure but there is no "
                    "exposure time to find mid-exposure; set `archive.keywords.exptime_s` or "
                    "`archive.defaults.exptime_s`"
                )
            half = 0.5 * exptime / 86400.0
            mjd += half if refers == "start" else -half
        return mjd

    # -- archive methods ------------------------------------------------------------------

    def _select(self, where: ExposureQuery | None) -> pa.Table:
        """Selected exposures (``exposures`` columns without ``_healpix_29``), in time order.

        The selection is :meth:`ExposureQuery.select`, the one every archive applies;
        ``no_wcs: pixels`` rows have null corners, so they fall outside every region.
        """
        from lakepipe.tables import get_contract

        q = where or ExposureQuery()
        contract = get_contract("exposures")
        schema = pa.schema([f for f in contract.schema if f.name != "_healpix_29"])
        rows = sorted((e.row for e in self._index), key=lambda r: (r["mjd"], r["exposure_id"]))
        table = pa.Table.from_pylist(rows, schema=schema)
        picked = table.filter(pa.array(q.select(table), type=pa.bool_()))
        return picked.slice(0, q.max_rows) if q.max_rows else picked

    def exposures(self, where: ExposureQuery | None = None) -> pa.Table:
        """Selected exposures as rows of ``exposures`` (without ``_healpix_29``)."""
        return self._select(where)

    def nights(self, where: ExposureQuery | None = None) -> list[str]:
        """Sorted nights with at least one selected exposure."""
        return sorted(set(self._select(where).column("night").to_pylist()))

    def image(self, exposure_id: int) -> tuple[fits.Header, np.ndarray]:
        """The exposure's merged header and pixel data (BSCALE/BZERO applied, float).

        The last image read is kept, so many cutouts of one exposure read it once.
        """
        e = self._entry(exposure_id)
        st = (self.root / e.relpath).stat()
        key = (int(exposure_id), st.st_size, st.st_mtime_ns)
        cached = getattr(self, "_last_image", None)
        if cached is not None and cached[0] == key:
            return cached[1].copy(), cached[2]
        header, data = self._read_image(exposure_id)
        data.flags.writeable = False
        self._last_image = (key, header, data)
        return header.copy(), data

    def _read_image(self, exposure_id: int) -> tuple[fits.Header, np.ndarray]:
        e = self._entry(exposure_id)
        path = self.root / e.relpath
        with _open_fits(path) as hdul:
            hdu = hdul[e.hdu]
            # non-standard cards warn when parsed, as in _scan; they are kept as-is
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", AstropyUserWarning)
                header = _merged_header(hdul[0].header, hdu.header) if e.hdu else hdu.header.copy()
            compressed = isinstance(hdu, fits.CompImageHDU)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    data = np.asarray(hdu.data)
                except Exception as exc:
                    raise ParseError(
                        f"{path}[{e.hdu}]: cannot read image data ({type(exc).__name__}: "
                        f"{exc}); the file is corrupt or truncated: replace it or remove it"
                    ) from None
            _raise_on_truncation(caught, path)
        if data.ndim != 2:
            raise ParseError(f"{path}[{e.hdu}]: image data is not 2-D (shape {data.shape})")
        dtype = np.float64 if data.dtype == np.float64 else np.float32
        if compressed:
            header = fits.Header([c for c in header.cards if not c.keyword.startswith("Z")])
        return header, data.astype(dtype, copy=False)

    def mask(self, exposure_id: int) -> np.ndarray | None:
        """Bad pixels (True = bad) of the exposure from its mask HDU, or None.

        A pixel is bad where ``mask & mask_bits`` is non-zero (any non-zero value when
        ``mask_bits`` is unset, or when the mask holds non-integer values).
        """
        e = self._entry(exposure_id)
        if e.mask_hdu is None:
            return None
        path = self.root / e.relpath
        with _open_fits(path) as hdul:
            try:
                values = np.asarray(hdul[e.mask_hdu].data)
            except Exception as exc:
                raise ParseError(
                    f"{path}[{e.mask_hdu}]: cannot read the mask ({type(exc).__name__}: "
                    f"{exc}); fix the file or set `archive.mask_hdu: none`"
                ) from None
            shape = tuple(int(hdul[e.hdu].header.get(f"NAXIS{k}", 0)) for k in (2, 1))
        if values.shape != shape:
            raise ParseError(
                f"{path}[{e.mask_hdu}]: mask shape {values.shape} differs from image "
                f"[{e.hdu}] shape {shape}; set `archive.mask_hdu` to the right extension "
                "or none"
            )
        bits = self.params.mask_bits
        if bits is not None and np.issubdtype(values.dtype, np.integer):
            return (values.astype(np.int64) & int(bits)) != 0
        return values != 0

    def image_fits(self, exposure_id: int) -> bytes:
        """The exposure as a one-HDU FITS file (merged header, float data)."""
        header, data = self.image(exposure_id)
        return wcsu.fits_bytes(wcsu.cutout_header(header, 0, 0), data)

    def cutout(
        self, exposure_id: int, ra: float, dec: float, size_arcsec: float
    ) -> tuple[fits.Header, np.ndarray | None, str]:
        """A ``size_arcsec`` square around (ra, dec): (header, data, ok|partial|off_chip)."""
        header, data = self.image(exposure_id)
        return wcsu.make_cutout(header, data, ra, dec, size_arcsec)


@contextlib.contextmanager
def _open_fits(path: Path) -> Iterator[fits.HDUList]:
    """Open a FITS file, turning every way it can be malformed into a ParseError."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            # astropy reports truncation (and non-standard cards) as warnings; truncation
            # is fatal for us, card-format complaints about real-world headers are not.
            warnings.simplefilter("always")
            hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
    except Exception as exc:
        raise ParseError(
            f"{path}: not a readable FITS file ({type(exc).__name__}: {exc}); replace or remove "
            "it, narrow `archive.pattern`, or set `archive.on_bad_file: skip`"
        ) from None
    try:
        _raise_on_truncation(caught, path)
    except ParseError:
        hdul.close()
        raise
    try:
        yield hdul
    finally:
        hdul.close()


def _is_image(hdu: Any) -> bool:
    return isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU)


def _extname(hdu: Any) -> str:
    return str(hdu.header.get("EXTNAME", "")).strip().upper()


def _raise_on_truncation(caught: list[warnings.WarningMessage], path: Path) -> None:
    for w in caught:
        if "truncat" in str(w.message).lower():
            raise ParseError(
                f"{path}: FITS file is truncated ({w.message}); replace it (re-download) or "
                "remove it, or set `archive.on_bad_file: skip`"
            )


def _as_float(value: Any, path: Path, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ParseError(f"{path}: {name} keyword holds a boolean ({value!r}), not a number")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ParseError(
            f"{path}: {name} value {value!r} is not a number; set `archive.keywords.{name}` to "
            f"the right keyword or `archive.defaults.{name}`"
        ) from None
    return v if math.isfinite(v) else None


def _parse_time(header: fits.Header, key: str, fmt: str) -> float:
    value = header[key]
    if fmt == "auto":
        if isinstance(value, str) and not _is_number(value):
            fmt = "iso"
        else:
            fmt = "jd" if key.upper().startswith("JD") or float(value) > 2_000_000 else "mjd"
    if fmt == "mjd":
        return float(value)
    if fmt == "jd":
        return float(value) - _MJD_JD
    text = str(value).strip()
    if "T" not in text and len(text) <= 10:
        clock = next((str(header[k]).strip() for k in _CLOCK_KEYS if k in header), None)
        if clock is None:
            raise ValueError(f"{key} holds only a date and no TIME-OBS/UT/UTSTART keyword")
        text = f"{_fix_date(text)}T{clock}"
    return to_mjd(_trim_fraction(text))


def _fix_date(text: str) -> str:
    """Old FITS ``DD/MM/YY`` dates (pre-2000 convention) to ISO."""
    if "/" in text:
        d, m, y = (int(p) for p in text.split("/"))
        return dt.date(1900 + y if y < 100 else y, m, d).isoformat()
    return text


def _trim_fraction(text: str) -> str:
    """Python's ISO parser takes at most 6 fractional digits."""
    if "." in text:
        head, frac = text.rsplit(".", 1)
        digits = "".join(ch for ch in frac if ch.isdigit())
        rest = frac[len(digits) :]
        return f"{head}.{digits[:6]}{rest}"
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _to_utc(mjd: float, scale: str, path: Path) -> float:
    if scale in ("utc", "ut", "gmt", "z"):
        return mjd
    from astropy.time import Time

    if scale not in ("tai", "tt", "tdb", "tcg", "tcb", "gps"):
        raise ParseError(
            f"{path}: unsupported TIMESYS {scale!r}; set `archive.keywords.timesys` to utc, "
            "tai, tt or tdb"
        )
    if scale == "gps":  # GPS = TAI - 19 s
        return Time(mjd + 19.0 / 86400.0, format="mjd", scale="tai").utc.mjd
    return float(Time(mjd, format="mjd", scale=scale).utc.mjd)
