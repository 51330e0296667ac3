"""``ExposureQuery``: the ``where`` block that selects exposures from any archive.

A query is a sky region (a cone *or* a box, or neither for the whole sky), a time range,
and optional filters, field ids, CCD and quadrant ids, one night and a row cap::

    where: {ra: 150.0, dec: 2.2, radius_deg: 1.0, start: 2025-01-01, end: 2025-01-12,
            filters: [zg, zr], ccd_ids: [4, 5], quadrant_ids: [1]}

Times are ISO dates (``2025-01-01``; as ``end`` a bare date includes that whole UTC day),
ISO date-times (UTC) or MJD floats; :meth:`ExposureQuery.mjd_range` resolves them to
MJD UTC. Footprint helpers test points (:meth:`ExposureQuery.contains`) and exposure
footprints given by their four corners (:meth:`ExposureQuery.overlaps`); every archive
uses the same geometry, so ``sim``, ``ztf`` and ``fits_dir`` select the same way.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    import pyarrow as pa

_MJD_EPOCH = dt.datetime(1858, 11, 17, tzinfo=dt.UTC)
_NIGHT_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")

TimeValue = dt.datetime | dt.date | float | str


def to_mjd(value: TimeValue, *, end_of_day: bool = False) -> float:
    """MJD (UTC) of a date, a date-time (naive = UTC), an ISO string or an MJD float.

    A bare date means 00:00 UTC of that day, or the end of that day (the next midnight)
    when ``end_of_day`` is true, so ``end: 2025-01-12`` includes the 12th.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        if _NIGHT_RE.match(text):
            value = dt.date.fromisoformat(text)
        else:
            try:
                value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(
                    f"not a time: {value!r}; use an ISO date (2025-01-03), an ISO "
                    "date-time in UTC (2025-01-03T04:05:06) or an MJD number (60678.5)"
                ) from None
    if isinstance(value, dt.datetime):
        t = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return (t - _MJD_EPOCH).total_seconds() / 86400.0
    if isinstance(value, dt.date):
        days = (value - _MJD_EPOCH.date()).days
        return float(days + (1 if end_of_day else 0))
    raise ValueError(f"not a time: {value!r}")


def night_of(mjd_utc: float) -> str:
    """Night label ``YYYY-MM-DD``: the UTC date of ``mjd_utc``.

    For a Pacific-time site (Palomar) a whole night (about 01–14 h UTC) falls inside one
    UTC date, which is therefore also the UTC date at the start of the night.
    """
    return (_MJD_EPOCH + dt.timedelta(days=math.floor(mjd_utc))).date().isoformat()


def angular_sep_deg(ra1: np.ndarray, dec1: np.ndarray, ra2: float, dec2: float) -> np.ndarray:
    """Great-circle separation in degrees (Vincenty formula, stable at all distances)."""
    r1, d1, r2, d2 = (np.radians(np.asarray(a, dtype=np.float64)) for a in (ra1, dec1, ra2, dec2))
    dra = r1 - r2
    num = np.hypot(
        np.cos(d1) * np.sin(dra), np.cos(d2) * np.sin(d1) - np.sin(d2) * np.cos(d1) * np.cos(dra)
    )
    den = np.sin(d2) * np.sin(d1) + np.cos(d2) * np.cos(d1) * np.cos(dra)
    return np.degrees(np.arctan2(num, den))


def _seg_point_dist(ax, ay, bx, by, px: float, py: float) -> np.ndarray:
    """Distance from point p to segments a→b (arrays), planar."""
    dx, dy = bx - ax, by - ay
    l2 = dx * dx + dy * dy
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(l2 > 0, ((px - ax) * dx + (py - ay) * dy) / l2, 0.0)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(ax + t * dx - px, ay + t * dy - py)


def _point_in_quads(qx: np.ndarray, qy: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Whether points (N,) lie inside convex quadrilaterals (N,4), any winding."""
    cross = []
    for i in range(4):
        j = (i + 1) % 4
        cross.append(
            (qx[:, j] - qx[:, i]) * (py - qy[:, i]) - (qy[:, j] - qy[:, i]) * (px - qx[:, i])
        )
    c = np.stack(cross, axis=1)
    return np.all(c >= 0, axis=1) | np.all(c <= 0, axis=1)


class ExposureQuery(BaseModel):
    """Which exposures to select: region, time range, filters, fields, CCD/quadrant ids,
    night, row cap."""

    model_config = ConfigDict(extra="forbid")

    ra: float | None = Field(None, ge=0.0, lt=360.0, description="Cone centre RA (deg, ICRS)")
    dec: float | None = Field(None, ge=-90.0, le=90.0, description="Cone centre Dec (deg, ICRS)")
    radius_deg: float | None = Field(None, gt=0.0, le=180.0, description="Cone radius (deg)")
    box: tuple[float, float, float, float] | None = Field(
        None,
        description="[ra_min, ra_max, dec_min, dec_max] in deg; ra_min > ra_max wraps through 0",
    )
    start: TimeValue | None = Field(None, description="Earliest mid-exposure time (ISO or MJD)")
    end: TimeValue | None = Field(
        None, description="Latest mid-exposure time (ISO or MJD; a bare date includes that day)"
    )
    filters: list[str] | None = Field(None, description="Filter codes, e.g. [zg, zr]")
    field_ids: list[int] | None = Field(None, description="Survey field ids")
    ccd_ids: list[int] | None = Field(
        None, description="CCD ids (ZTF ccdid, 1-16); exposures on other CCDs are skipped"
    )
    quadrant_ids: list[int] | None = Field(
        None, description="CCD quadrant (readout channel) ids (ZTF qid, 1-4)"
    )
    night: str | None = Field(None, description="Restrict to one night (YYYY-MM-DD)")
    max_rows: int | None = Field(None, gt=0, description="At most this many exposures")

    @field_validator("night")
    @classmethod
    def _check_night(cls, v: str | None) -> str | None:
        if v is not None and not _NIGHT_RE.match(v):
            raise ValueError(f"night must be YYYY-MM-DD (got {v!r})")
        if v is not None:
            dt.date.fromisoformat(v)
        return v

    @field_validator("start", "end")
    @classmethod
    def _check_time(cls, v: TimeValue | None) -> TimeValue | None:
        if v is not None:
            to_mjd(v)
        return v

    @field_validator("box")
    @classmethod
    def _check_box(cls, v: tuple[float, float, float, float] | None) -> tuple | None:
        if v is None:
            return v
        ra_min, ra_max, dec_min, dec_max = v
        if not (0.0 <= ra_min <= 360.0 and 0.0 <= ra_max <= 360.0):
            raise ValueError(f"box RA limits must be in [0, 360] deg (got {ra_min}, {ra_max})")
        if not (-90.0 <= dec_min < dec_max <= 90.0):
            raise ValueError(
                f"box Dec limits must satisfy -90 <= dec_min < dec_max <= 90 (got {dec_min}, "
                f"{dec_max})"
            )
        return v

    @model_validator(mode="after")
    def _check_region(self) -> ExposureQuery:
        cone = [self.ra, self.dec, self.radius_deg]
        if any(c is not None for c in cone) and not all(c is not None for c in cone):
            raise ValueError("a cone needs all of ra, dec and radius_deg")
        if self.ra is not None and self.box is not None:
            raise ValueError("give either a cone (ra, dec, radius_deg) or a box, not both")
        lo, hi = self.mjd_range()
        if lo > hi:
            raise ValueError(f"start ({self.start}) is after end ({self.end})")
        return self

    # -- time ---------------------------------------------------------------------------

    def mjd_range(self) -> tuple[float, float]:
        """(start, end) as MJD UTC, inclusive; open ends are -inf / +inf."""
        lo = -math.inf if self.start is None else to_mjd(self.start)
        hi = math.inf if self.end is None else to_mjd(self.end, end_of_day=True)
        if self.night is not None:
            n0 = to_mjd(self.night)
            lo, hi = max(lo, n0), min(hi, n0 + 1.0)
        return lo, hi

    def matches_time(self, mjd: np.ndarray) -> np.ndarray:
        """Whether each MJD (UTC) lies in the query's time range (and night)."""
        lo, hi = self.mjd_range()
        m = np.asarray(mjd, dtype=np.float64)
        ok = (m >= lo) & (m <= hi)
        if self.night is not None:
            ok &= m < hi  # a night is [00:00, 24:00) UTC
        return ok

    # -- region -------------------------------------------------------------------------

    @property
    def has_region(self) -> bool:
        return self.ra is not None or self.box is not None

    def center(self) -> tuple[float, float] | None:
        """The region's centre (cone centre, or box centre), or None without a region."""
        if self.ra is not None and self.dec is not None:
            return self.ra, self.dec
        if self.box is not None:
            ra_min, ra_max, dec_min, dec_max = self.box
            width = (ra_max - ra_min) % 360.0 if ra_max != ra_min else 0.0
            return (ra_min + width / 2.0) % 360.0, (dec_min + dec_max) / 2.0
        return None

    def contains(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """Whether points (deg) lie in the cone or box (all True without a region)."""
        ra = np.asarray(ra, dtype=np.float64)
        dec = np.asarray(dec, dtype=np.float64)
        if self.ra is not None:
            return angular_sep_deg(ra, dec, self.ra, self.dec) <= self.radius_deg
        if self.box is not None:
            ra_min, ra_max, dec_min, dec_max = self.box
            in_dec = (dec >= dec_min) & (dec <= dec_max)
            r = ra % 360.0
            in_ra = (
                (r >= ra_min) & (r <= ra_max) if ra_min <= ra_max else (r >= ra_min) | (r <= ra_max)
            )
            return in_dec & in_ra
        return np.ones(np.broadcast(ra, dec).shape, dtype=bool)

    def overlaps(self, ra_corners: np.ndarray, dec_corners: np.ndarray) -> np.ndarray:
        """Whether footprints overlap the region (ZTF IBE ``INTERSECT=OVERLAPS``).

        ``ra_corners``/``dec_corners`` are (N, 4) arrays of corners in order around each
        footprint (deg). Geometry is planar in the gnomonic projection about the region
        centre, exact for great-circle edges (they project to straight lines).
        """
        rc = np.atleast_2d(np.asarray(ra_corners, dtype=np.float64))
        dc = np.atleast_2d(np.asarray(dec_corners, dtype=np.float64))
        n = rc.shape[0]
        if not self.has_region:
            return np.ones(n, dtype=bool)
        if self.ra is not None:
            return self._overlaps_cone(rc, dc)
        return self._overlaps_box(rc, dc)

    def _overlaps_cone(self, rc: np.ndarray, dc: np.ndarray) -> np.ndarray:
        ra0, dec0, rad = float(self.ra), float(self.dec), float(self.radius_deg)
        # corner inside the cone
        hit = np.any(angular_sep_deg(rc, dc, ra0, dec0) <= rad, axis=1)
        from lakepipe.astro.wcs import tangent_plane  # astropy.wcs: off the start-up path

        x, y, cosc = tangent_plane(rc, dc, ra0, dec0)
        front = np.all(cosc > 0, axis=1)  # the whole footprint on the near hemisphere
        xs, ys = np.where(front[:, None], x, 0.0), np.where(front[:, None], y, 0.0)
        # cone centre inside the footprint
        hit |= front & _point_in_quads(xs, ys, np.zeros(len(xs)), np.zeros(len(xs)))
        # an edge passes within the radius (tangent-plane distance r = tan(theta))
        r_plane = math.degrees(math.tan(math.radians(min(rad, 89.9))))
        for i in range(4):
            j = (i + 1) % 4
            d = _seg_point_dist(xs[:, i], ys[:, i], xs[:, j], ys[:, j], 0.0, 0.0)
            hit |= front & (d <= r_plane)
        return hit

    def _overlaps_box(self, rc: np.ndarray, dc: np.ndarray) -> np.ndarray:
        # sample each footprint edge densely and its centre; plus box corners in the footprint
        from lakepipe.astro.wcs import tangent_plane  # astropy.wcs: off the start-up path

        t = np.linspace(0.0, 1.0, 17)[:-1]
        pts_ra, pts_dec = [], []
        for i in range(4):
            j = (i + 1) % 4
            dra = ((rc[:, j] - rc[:, i] + 180.0) % 360.0) - 180.0
            pts_ra.append(rc[:, i, None] + dra[:, None] * t[None, :])
            pts_dec.append(dc[:, i, None] + (dc[:, j] - dc[:, i])[:, None] * t[None, :])
        pr = np.concatenate(pts_ra, axis=1) % 360.0
        pd = np.concatenate(pts_dec, axis=1)
        hit = np.any(self.contains(pr, pd), axis=1)
        ra_min, ra_max, dec_min, dec_max = self.box
        for bra, bdec in (
            (ra_min, dec_min),
            (ra_max, dec_min),
            (ra_max, dec_max),
            (ra_min, dec_max),
        ):
            x, y, cosc = tangent_plane(rc, dc, bra, bdec)
            ok = np.all(cosc > 0, axis=1)
            xs, ys = np.where(ok[:, None], x, 0.0), np.where(ok[:, None], y, 0.0)
            hit |= ok & _point_in_quads(xs, ys, np.zeros(len(xs)), np.zeros(len(xs)))
        return hit

    # -- other selections ---------------------------------------------------------------

    def matches_filter(self, filters: np.ndarray) -> np.ndarray:
        """Whether each filter code is selected."""
        f = np.asarray(filters, dtype=object)
        if self.filters is None:
            return np.ones(f.shape, dtype=bool)
        return np.isin(f, list(self.filters))

    def matches_field(self, field_ids: np.ndarray) -> np.ndarray:
        """Whether each field id is selected."""
        f = np.asarray(field_ids)
        if self.field_ids is None:
            return np.ones(f.shape, dtype=bool)
        return np.isin(f, list(self.field_ids))

    def matches_chip(self, ccdids: np.ndarray, qids: np.ndarray) -> np.ndarray:
        """Whether each (CCD id, quadrant id) pair is selected."""
        c, q = np.asarray(ccdids), np.asarray(qids)
        ok = np.ones(np.broadcast(c, q).shape, dtype=bool)
        if self.ccd_ids is not None:
            ok &= np.isin(c, list(self.ccd_ids))
        if self.quadrant_ids is not None:
            ok &= np.isin(q, list(self.quadrant_ids))
        return ok

    @property
    def has_chip(self) -> bool:
        """Whether the query selects by CCD or quadrant."""
        return self.ccd_ids is not None or self.quadrant_ids is not None

    def select(self, exposures: pa.Table) -> np.ndarray:
        """The exact selection on an ``exposures``-shaped table (``mjd``, ``filter``,
        ``field``, ``ccdid``, ``qid``, corners ``ra1..dec4``) as a boolean mask: what
        every archive applies, so they all select the same rows."""
        if exposures.num_rows == 0:
            return np.zeros(0, dtype=bool)

        def col(name: str) -> np.ndarray:
            return exposures.column(name).to_numpy(zero_copy_only=False)

        keep = self.matches_time(col("mjd"))
        keep &= self.matches_filter(np.array(exposures.column("filter").to_pylist(), object))
        keep &= self.matches_field(col("field"))
        if self.has_chip:
            keep &= self.matches_chip(col("ccdid"), col("qid"))
        if self.has_region:
            rc = np.stack([col(f"ra{i}") for i in (1, 2, 3, 4)], axis=1)
            dc = np.stack([col(f"dec{i}") for i in (1, 2, 3, 4)], axis=1)
            keep &= self.overlaps(rc, dc)
        return keep
