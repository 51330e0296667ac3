"""WCS helpers: exposure footprints, point-in-footprint tests and cutouts.

Conventions: ``ra``/``dec`` in degrees ICRS; pixel positions 0-based (numpy/astropy
``pixel`` convention) unless a name says ``fits`` (1-based, FITS convention).
Footprint corners are the centres of the four corner pixels, FITS (1, 1), (NAXIS1, 1),
(NAXIS1, NAXIS2), (1, NAXIS2), as declared by ``schemas/tables/exposures.yaml``.

Cutouts are pixel-exact sub-arrays of the original image, never resampled: the cutout
keeps the exposure's whole header (its WCS included, with distortion terms such as SIP
or TPV untouched) and only shifts ``CRPIXn`` by the cutout's origin, which is exact for
every projection and distortion convention because each is defined relative to CRPIX
(Calabretta & Greisen 2002, A&A 395, 1077, eq. 1-3; Shupe et al. 2005 for SIP).
"""

from __future__ import annotations

import io
import math
import re
import warnings

import numpy as np
import pyarrow as pa
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

CUTOUT_STATUSES = ("ok", "partial", "off_chip")

# Keywords that describe the HDU's structure or storage, not the observation: astropy
# writes them itself for a new HDU, and scaling keywords no longer apply once pixel
# values are floats.
_STRUCTURAL = re.compile(
    r"^(SIMPLE|XTENSION|BITPIX|NAXIS\d*|EXTEND|PCOUNT|GCOUNT|GROUPS|BSCALE|BZERO|BLANK|"
    r"CHECKSUM|DATASUM|ZIMAGE|ZBITPIX|ZNAXIS\d*|ZTILE\d*|ZCMPTYPE|ZNAME\d*|ZVAL\d*|"
    r"ZQUANTIZ|ZDITHER0|ZSIMPLE|ZTENSION|ZEXTEND|ZBLOCKED|ZPCOUNT|ZGCOUNT|ZHECKSUM|"
    r"ZDATASUM|TFIELDS|TTYPE\d+|TFORM\d+|THEAP|EXTNAME|EXTVER|INHERIT)$"
)
_CRPIX = re.compile(r"^CRPIX([12])([A-Z]?)$")


def celestial_wcs(header: fits.Header) -> WCS:
    """The celestial WCS of an image header (distortions included).

    Raises ``ValueError`` when the header has no celestial (RA/Dec-like) axes.
    """
    # WCSLIB's header fixers (datfix, unitfix) report harmless normalisations such as
    # "set MJD-OBS from DATE-OBS" as FITSFixedWarning; the fixed values are what we use.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(header, relax=True)
    if not wcs.has_celestial:
        raise ValueError("header has no celestial WCS (CTYPE1/2 like RA---TAN/DEC--TAN)")
    return wcs.celestial


def pixel_to_sky(wcs: WCS, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees of 0-based pixel positions, distortions included."""
    ra, dec = wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
    return np.asarray(ra, float) % 360.0, np.asarray(dec, float)


def sky_to_pixel(wcs: WCS, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel positions of (ra, dec) in degrees, distortions included."""
    x, y = wcs.all_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
    return np.asarray(x, float), np.asarray(y, float)


def footprint_corners(wcs: WCS, naxis1: int, naxis2: int) -> tuple[np.ndarray, np.ndarray]:
    """RA and Dec (deg, 4 each) of the corner-pixel centres in ``exposures`` order.

    Corner k of the contract: 1 = FITS pixel (1, 1), 2 = (NAXIS1, 1),
    3 = (NAXIS1, NAXIS2), 4 = (1, NAXIS2); they go once around the image.
    """
    x = np.array([0.0, naxis1 - 1.0, naxis1 - 1.0, 0.0])
    y = np.array([0.0, 0.0, naxis2 - 1.0, naxis2 - 1.0])
    return pixel_to_sky(wcs, x, y)


def image_center(wcs: WCS, naxis1: int, naxis2: int) -> tuple[float, float]:
    """(ra, dec) in degrees of the image centre, FITS pixel ((N1+1)/2, (N2+1)/2)."""
    ra, dec = pixel_to_sky(wcs, np.array([(naxis1 - 1) / 2.0]), np.array([(naxis2 - 1) / 2.0]))
    return float(ra[0]), float(dec[0])


def pixel_scale_arcsec(wcs: WCS) -> float:
    """Mean pixel scale (arcsec/pixel) of the linear part of the WCS at CRPIX."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(wcs)) * 3600.0)


def _unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    r, d = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(d) * np.cos(r), np.cos(d) * np.sin(r), np.sin(d)], axis=-1)


def point_in_footprint(
    ra: np.ndarray, dec: np.ndarray, ra_corners: np.ndarray, dec_corners: np.ndarray
) -> np.ndarray:
    """Whether points lie inside footprints whose edges are great-circle arcs.

    ``ra``/``dec`` broadcast against the leading axes of the ``(..., 4)`` corner arrays
    (degrees, corners in order around the footprint, either winding). Exact on the
    sphere: the point is inside when the triple products p · (c_k × c_k+1) all share a
    sign (the same test as the gnomonic cross products; footprints smaller than a
    hemisphere).
    """
    p = _unit_vectors(np.asarray(ra, float), np.asarray(dec, float))
    c = _unit_vectors(np.asarray(ra_corners, float), np.asarray(dec_corners, float))
    s = np.stack(
        [np.sum(p * np.cross(c[..., k, :], c[..., (k + 1) % 4, :]), axis=-1) for k in range(4)],
        axis=-1,
    )
    near = np.sum(p[..., None, :] * c, axis=-1).min(axis=-1) > 0  # same hemisphere
    return near & (np.all(s >= 0, axis=-1) | np.all(s <= 0, axis=-1))


def tangent_plane(
    ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gnomonic (TAN) plane coordinates about (ra0, dec0) (Calabretta & Greisen 2002):
    (ξ east, η north) in degrees and cos c, the cosine of the angular distance (points
    with cos c ≤ 0 are on the far hemisphere, where ξ, η mean nothing). Keeps the
    inputs' shape."""
    a, d = np.radians(np.asarray(ra, np.float64)), np.radians(np.asarray(dec, np.float64))
    a0, d0 = math.radians(ra0), math.radians(dec0)
    cosc = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a - a0)
    with np.errstate(divide="ignore", invalid="ignore"):
        xi = np.cos(d) * np.sin(a - a0) / cosc
        eta = (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a - a0)) / cosc
    return np.degrees(xi), np.degrees(eta), cosc


def gnomonic(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> np.ndarray:
    """:func:`tangent_plane` (ξ, η) in degrees as shape ``(n, 2)``; points more than 90°
    away come out as NaN."""
    xi, eta, cosc = tangent_plane(ra, dec, ra0, dec0)
    out = np.column_stack([xi, eta])
    out[cosc <= 0] = np.nan
    return out


def inside_polygon(points: np.ndarray, corners: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Whether tangent-plane points lie inside a convex polygon, ``margin`` inside its edges.

    ``corners`` in order (either sense); units of ``points`` (degrees).
    """
    c = np.asarray(corners, np.float64)
    nxt = np.roll(c, -1, axis=0)
    edge = nxt - c
    length = np.hypot(edge[:, 0], edge[:, 1])
    # signed distance of each point to each edge line, positive on the polygon's side
    cross = (edge[None, :, 0] * (points[:, None, 1] - c[None, :, 1])
             - edge[None, :, 1] * (points[:, None, 0] - c[None, :, 0]))  # fmt: skip
    area2 = np.sum(c[:, 0] * nxt[:, 1] - nxt[:, 0] * c[:, 1])
    dist = np.sign(area2) * cross / length[None, :]
    return np.all(dist >= margin, axis=1)


def image_corners(exposure: dict, cutout: dict | None, ra0: float, dec0: float) -> list[np.ndarray]:
    """Polygons (tangent plane about ra0, dec0; deg) whose intersection is the measured area.

    The exposure's footprint from its corners; a cutout adds a square of side
    ``size_arcsec`` about its centre, aligned with the exposure's pixel axes.
    """
    ras = [exposure[f"ra{i}"] for i in range(1, 5)]
    decs = [exposure[f"dec{i}"] for i in range(1, 5)]
    foot = gnomonic(np.array(ras), np.array(decs), ra0, dec0)
    polys = [foot]
    if cutout is not None:
        ux = foot[1] - foot[0]
        ux = ux / np.hypot(*ux)
        uy = foot[3] - foot[0]
        uy = uy - ux * np.dot(uy, ux)
        uy = uy / np.hypot(*uy)
        centre = gnomonic(np.array([cutout["ra"]]), np.array([cutout["dec"]]), ra0, dec0)[0]
        h = cutout["size_arcsec"] / 7200.0
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        polys.append(np.array([centre + h * (sx * ux + sy * uy) for sx, sy in corners]))
    return polys


def inside_image(
    xy: np.ndarray, exposure: dict, cutout: dict | None, margin: float = 0.0
) -> np.ndarray:
    """Whether tangent-plane points ``xy`` (:func:`gnomonic` about the exposure's centre
    ``ra``/``dec``; deg) lie ``margin`` (deg) inside the area measured on ``exposure``:
    its footprint, intersected with ``cutout``'s square when one is given (see
    :func:`image_corners`). Points behind the tangent plane (NaN) are outside."""
    inside = np.isfinite(xy[:, 0])
    points = np.nan_to_num(xy)
    for poly in image_corners(exposure, cutout, exposure["ra"], exposure["dec"]):
        inside &= inside_polygon(points, poly, margin)
    return inside


def measured_images(exposure_ids: pa.Array, cutout_ids: pa.Array) -> dict[int, list]:
    """Per exposure, the images its sources were measured on: cutout ids in the order
    first seen (None: the full exposure). One pass in Arrow, not a loop over rows."""
    t = pa.table({"e": exposure_ids, "c": cutout_ids, "i": np.arange(len(exposure_ids))})
    pairs = t.group_by(["e", "c"], use_threads=False).aggregate([("i", "min")]).sort_by("i_min")
    out: dict[int, list] = {}
    for e, c in zip(pairs.column("e").to_pylist(), pairs.column("c").to_pylist(), strict=True):
        out.setdefault(e, []).append(c)
    return out


def measured_areas(
    measured: dict[int, list], exposure_id: int, cutouts_by_id: dict
) -> list[tuple[int | None, dict | None]]:
    """(cutout id, cutout row) of each image ``exposure_id`` was measured on, from
    :func:`measured_images`: (None, None) for the full exposure, also when it has no
    sources at all; a cutout without a row is left out (no footprint, no claim)."""
    out = []
    for cut_id in measured.get(exposure_id, [None]):
        cut = cutouts_by_id.get(cut_id) if cut_id is not None else None
        if cut_id is None or cut is not None:
            out.append((cut_id, cut))
    return out


def footprint_contains_sql(ra: float, dec: float, prefix: str = "") -> str:
    """A DuckDB predicate: the ``exposures`` footprint (ra1..dec4) contains (ra, dec).

    The exact spherical test of :func:`point_in_footprint` written out in SQL: each
    corner k becomes tangent-plane coordinates (xk, yk) about the point (gnomonic
    projection numerators, Calabretta & Greisen 2002 eq. 54 without the common positive
    denominator), and the point (the origin) is inside when the four cross products
    xk*yk+1 - xk+1*yk share a sign (a point exactly on an edge counts as outside).
    ``prefix`` qualifies the columns (``"e."``).
    """
    r0, d0 = math.radians(ra), math.radians(dec)
    s0, c0 = math.sin(d0), math.cos(d0)
    xs, ys = [], []
    for k in range(1, 5):
        dr = f"radians({prefix}ra{k}) - {r0!r}"
        dk = f"radians({prefix}dec{k})"
        xs.append(f"(cos({dk}) * sin({dr}))")
        ys.append(f"({c0!r} * sin({dk}) - {s0!r} * cos({dk}) * cos({dr}))")
    d1, dr1 = f"radians({prefix}dec1)", f"radians({prefix}ra1) - {r0!r}"
    z1 = f"({s0!r} * sin({d1}) + {c0!r} * cos({d1}) * cos({dr1}))"  # cos(distance) to corner 1
    cross = [f"{xs[i]} * {ys[(i + 1) % 4]} - {xs[(i + 1) % 4]} * {ys[i]}" for i in range(4)]
    signs = " + ".join(f"sign({c})" for c in cross)
    # one corner on the point's hemisphere rules out the antipodal footprint (footprints
    # are far smaller than 90 deg); each cross product appears once, so DuckDB plans it fast
    return f"({z1} > 0 and abs({signs}) = 4)"


# -- cutouts ------------------------------------------------------------------------------


def cutout_size_pix(size_arcsec: float, scale_arcsec: float) -> int:
    """Cutout side in pixels: ``size_arcsec`` over the pixel scale, rounded, at least 1."""
    return max(1, round(size_arcsec / scale_arcsec))


def cutout_header(header: fits.Header, x0: int, y0: int) -> fits.Header:
    """The image header for a sub-array starting at 0-based pixel (x0, y0).

    Structural and scaling keywords are dropped (astropy writes its own) and every
    ``CRPIXn[a]`` (primary and alternate WCSs) is shifted by the origin; ``LTV1/2``
    record the offset in the IRAF physical-pixel convention.
    """
    out = fits.Header()
    for card in header.cards:
        key = card.keyword
        if not key or _STRUCTURAL.match(key):
            continue
        m = _CRPIX.match(key)
        if m:
            value = float(card.value) - (x0 if m.group(1) == "1" else y0)
            out.append((key, value, card.comment))
        else:
            out.append(card)
    out["LTV1"] = (float(out.get("LTV1", 0.0)) - x0, "image x = physical x + LTV1 (IRAF)")
    out["LTV2"] = (float(out.get("LTV2", 0.0)) - y0, "image y = physical y + LTV2 (IRAF)")
    return out


def make_cutout(
    header: fits.Header, data: np.ndarray, ra: float, dec: float, size_arcsec: float
) -> tuple[fits.Header, np.ndarray | None, str]:
    """Cut a square of ``size_arcsec`` centred on (ra, dec) out of an image.

    Returns ``(header, data, status)``: ``ok`` when the whole square lies on the image,
    ``partial`` when the target is on the image but the square crosses its edge (the
    missing pixels are NaN, so every cutout has the requested size with the target at
    its centre pixel), ``off_chip`` when the target itself is off the image (``data``
    is None). Pixels are copied, never resampled; see :func:`cutout_header` for the WCS.
    """
    wcs = celestial_wcs(header)
    ny, nx = data.shape
    x, y = sky_to_pixel(wcs, np.array([ra]), np.array([dec]))
    xc, yc = float(x[0]), float(y[0])
    n = cutout_size_pix(size_arcsec, pixel_scale_arcsec(wcs))
    hdr_extra = {"CUTRA": ra, "CUTDEC": dec, "CUTSIZE": size_arcsec}
    on_chip = np.isfinite(xc) and np.isfinite(yc) and -0.5 <= xc < nx - 0.5
    on_chip = on_chip and -0.5 <= yc < ny - 0.5
    if not on_chip:
        return _with_cut_keys(cutout_header(header, 0, 0), hdr_extra), None, "off_chip"
    # the pixel containing the target sits at index n // 2 of the cutout
    x0 = math.floor(xc + 0.5) - n // 2
    y0 = math.floor(yc + 0.5) - n // 2
    sx0, sx1 = max(x0, 0), min(x0 + n, nx)
    sy0, sy1 = max(y0, 0), min(y0 + n, ny)
    dtype = np.float64 if data.dtype == np.float64 else np.float32
    out = np.full((n, n), np.nan, dtype=dtype)
    out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = data[sy0:sy1, sx0:sx1]
    status = "ok" if (sx0, sx1, sy0, sy1) == (x0, x0 + n, y0, y0 + n) else "partial"
    return _with_cut_keys(cutout_header(header, x0, y0), hdr_extra), out, status


def _with_cut_keys(header: fits.Header, values: dict[str, float]) -> fits.Header:
    header["CUTRA"] = (float(values["CUTRA"]), "[deg] cutout target RA (ICRS)")
    header["CUTDEC"] = (float(values["CUTDEC"]), "[deg] cutout target Dec (ICRS)")
    header["CUTSIZE"] = (float(values["CUTSIZE"]), "[arcsec] requested cutout side")
    return header


def fits_bytes(header: fits.Header, data: np.ndarray) -> bytes:
    """One-HDU FITS file (bytes) of ``data`` with ``header``; deterministic output.

    Structural and scaling keywords of ``header`` are dropped; astropy writes the ones
    that describe ``data``.
    """
    clean = fits.Header([c for c in header.cards if not _STRUCTURAL.match(c.keyword or "")])
    hdu = fits.PrimaryHDU(data=data, header=clean)
    buf = io.BytesIO()
    hdu.writeto(buf, output_verify="silentfix")
    return buf.getvalue()
