"""Photometric calibration: per-exposure zeropoint against a reference catalogue.

Model (the usual one for survey photometry, e.g. Ofek 2008 PASP 120, 1128; ZTF's
``PSFZP`` fits, Masci et al. 2019 PASP 131, 018003 §5)::

    m_ref = m_inst + ZP + c · colour,     m_inst = -2.5 log10(flux / ADU)

with ``m_ref`` the reference magnitude mapped to the survey band, ``colour`` a reference
colour (e.g. g - r) and ``c`` a fixed or fitted colour term. The zeropoint is the
inverse-variance weighted mean of per-star ``m_ref - m_inst - c·colour`` after
iterative κ-σ clipping about the weighted mean; its error is the formal error scaled
up by sqrt(χ²/dof) when the scatter exceeds the errors (Birge ratio).

Calibrated magnitudes are ``m_inst + ZP + c·colour`` (colour term only when the colour
is known) with errors ``sqrt(σ_inst² + σ_ZP²)``; the 5σ limiting magnitude of an
exposure is ``ZP - 2.5 log10(5 σ_F)`` with σ_F the flux error of a point source on
blank sky (forced-photometry or faint-source flux errors).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAG_SYSTEMS = ("AB", "Vega")


@dataclass(frozen=True)
class ZeropointFit:
    """Result of :func:`fit_zeropoint`; magnitudes in mag."""

    zeropoint_mag: float
    zeropoint_err_mag: float
    colour_term: float
    n_stars: int  # candidates given (finite values)
    n_used: int  # left after clipping
    scatter_mag: float  # weighted rms of the residuals of the used stars
    chi2_dof: float
    iterations: int
    used: np.ndarray  # boolean mask over the inputs


def instrumental_mag(flux: np.ndarray, flux_err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """m_inst = -2.5 log10(flux) and its error 1.0857 σ_F/F (NaN where flux <= 0)."""
    flux = np.asarray(flux, dtype=np.float64)
    flux_err = np.asarray(flux_err, dtype=np.float64)
    pos = flux > 0
    safe = np.where(pos, flux, 1.0)
    mag = np.where(pos, -2.5 * np.log10(safe), np.nan)
    err = np.where(pos, 2.5 / np.log(10.0) * flux_err / safe, np.nan)
    return mag, err


def fit_zeropoint(
    mag_inst: np.ndarray,
    mag_inst_err: np.ndarray,
    mag_ref: np.ndarray,
    mag_ref_err: np.ndarray | None = None,
    *,
    colour: np.ndarray | None = None,
    colour_term: float | None = 0.0,
    clip_sigma: float = 3.0,
    max_iter: int = 10,
    err_floor_mag: float = 0.005,
    min_stars: int = 3,
) -> ZeropointFit:
    """Weighted, iteratively clipped zeropoint (and optionally colour term) of one exposure.

    Parameters
    ----------
    mag_inst, mag_inst_err
        Instrumental magnitudes of the matched calibration stars and their errors (mag).
    mag_ref, mag_ref_err
        Reference magnitudes in the survey band and their errors (mag; errors optional).
    colour, colour_term
        Reference colour per star (mag) and the colour term ``c``; ``colour_term=None``
        fits ``c`` with the zeropoint (weighted linear least squares).
    clip_sigma
        Residuals beyond ``clip_sigma`` times the weighted scatter (or the star's own
        error, whichever is larger) are rejected; repeated until nothing changes.
    err_floor_mag
        Added in quadrature to every star's error (unmodelled flat-field/PSF errors).
    min_stars
        Fewer usable stars raise ``ValueError``.
    """
    mi = np.asarray(mag_inst, dtype=np.float64)
    ei = np.asarray(mag_inst_err, dtype=np.float64)
    mr = np.asarray(mag_ref, dtype=np.float64)
    er = np.zeros_like(mr) if mag_ref_err is None else np.nan_to_num(np.asarray(mag_ref_err))
    col = np.zeros_like(mr) if colour is None else np.asarray(colour, dtype=np.float64)
    fit_colour = colour_term is None and colour is not None
    c_fixed = 0.0 if colour_term is None else float(colour_term)
    sigma = np.sqrt(ei**2 + er**2 + err_floor_mag**2)
    finite = np.isfinite(mi) & np.isfinite(mr) & np.isfinite(sigma) & (sigma > 0)
    if colour is not None and (fit_colour or c_fixed != 0.0):
        finite &= np.isfinite(col)
    n_stars = int(finite.sum())
    if n_stars < min_stars:
        raise ValueError(f"{n_stars} usable calibration star(s), need at least {min_stars}")
    w = 1.0 / sigma**2
    # robust start (median, MAD) so a crowd of outliers cannot drag the first mean
    y0 = np.where(finite, mr - mi - c_fixed * np.nan_to_num(col), np.nan)
    mad = 1.4826 * np.nanmedian(np.abs(y0 - np.nanmedian(y0)))
    used = finite & (
        np.abs(np.nan_to_num(y0 - np.nanmedian(y0))) <= clip_sigma * np.maximum(mad, sigma)
    )
    if used.sum() < min_stars:
        used = finite.copy()
    zp, c, iterations = 0.0, c_fixed, 0
    while iterations < max_iter:
        iterations += 1
        zp, c = _solve(mi, mr, col, w, used, fit_colour, c_fixed)
        resid = mr - mi - c * col - zp
        scatter = _weighted_rms(resid, w, used)
        limit = clip_sigma * np.maximum(scatter, sigma)
        new_used = finite & (np.abs(np.where(finite, resid, 0.0)) <= limit)
        if new_used.sum() < min_stars or np.array_equal(new_used, used):
            break
        used = new_used
    zp, c = _solve(mi, mr, col, w, used, fit_colour, c_fixed)
    resid = mr - mi - c * col - zp
    n_used = int(used.sum())
    npar = 2 if fit_colour else 1
    dof = max(n_used - npar, 1)
    chi2_dof = float(np.sum(w[used] * resid[used] ** 2) / dof)
    if fit_colour:
        cov = np.linalg.inv(_normal_matrix(col, w, used))
        formal = float(np.sqrt(cov[0, 0]))
    else:
        formal = float(1.0 / np.sqrt(np.sum(w[used])))
    err = formal * max(1.0, np.sqrt(chi2_dof))  # Birge ratio: scatter beyond the errors
    return ZeropointFit(
        zeropoint_mag=float(zp),
        zeropoint_err_mag=err,
        colour_term=float(c),
        n_stars=n_stars,
        n_used=n_used,
        scatter_mag=_weighted_rms(resid, w, used),
        chi2_dof=chi2_dof,
        iterations=iterations,
        used=used,
    )


def _normal_matrix(col: np.ndarray, w: np.ndarray, used: np.ndarray) -> np.ndarray:
    cw, ww = col[used], w[used]
    return np.array([[ww.sum(), (ww * cw).sum()], [(ww * cw).sum(), (ww * cw * cw).sum()]])


def _solve(
    mi: np.ndarray,
    mr: np.ndarray,
    col: np.ndarray,
    w: np.ndarray,
    used: np.ndarray,
    fit_colour: bool,
    c_fixed: float,
) -> tuple[float, float]:
    """Weighted least squares of ``mr - mi = zp + c·col`` (c fixed or fitted)."""
    y = (mr - mi)[used]
    ww = w[used]
    if not fit_colour:
        y = y - c_fixed * np.nan_to_num(col[used])
        return float(np.sum(ww * y) / np.sum(ww)), c_fixed
    cw = col[used]
    a = _normal_matrix(col, w, used)
    b = np.array([(ww * y).sum(), (ww * cw * y).sum()])
    zp, c = np.linalg.solve(a, b)
    return float(zp), float(c)


def _weighted_rms(resid: np.ndarray, w: np.ndarray, used: np.ndarray) -> float:
    if not used.any():
        return float("nan")
    return float(np.sqrt(np.sum(w[used] * resid[used] ** 2) / np.sum(w[used])))


def reference_band_mag(
    mags: dict[str, np.ndarray],
    band: str,
    *,
    colour: tuple[str, str] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The reference magnitude in ``band`` and, if asked, the colour ``mags[a] - mags[b]``.

    ``mags`` maps catalogue band names to arrays (e.g. ``{"g": ..., "r": ...}``).
    """
    if band not in mags:
        raise KeyError(f"reference band {band!r} not in catalogue bands {sorted(mags)}")
    c = None
    if colour is not None:
        a, b = colour
        for x in (a, b):
            if x not in mags:
                raise KeyError(f"colour band {x!r} not in catalogue bands {sorted(mags)}")
        c = np.asarray(mags[a], dtype=np.float64) - np.asarray(mags[b], dtype=np.float64)
    return np.asarray(mags[band], dtype=np.float64), c


def calibrated_mag(
    mag_inst: np.ndarray,
    mag_inst_err: np.ndarray,
    zeropoint_mag: float,
    zeropoint_err_mag: float,
    *,
    colour: np.ndarray | None = None,
    colour_term: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated magnitude and error (instrumental error ⊕ zeropoint error), mag.

    The colour term is applied where the source's colour is known (finite), else omitted.
    """
    mi = np.asarray(mag_inst, dtype=np.float64)
    mag = mi + zeropoint_mag
    if colour is not None and colour_term != 0.0:
        mag = mag + colour_term * np.nan_to_num(np.asarray(colour, dtype=np.float64))
    err = np.hypot(np.asarray(mag_inst_err, dtype=np.float64), zeropoint_err_mag)
    return mag, err


def limiting_mag(zeropoint_mag: float, flux_err: np.ndarray, nsigma: float = 5.0) -> float:
    """``nsigma`` point-source limiting magnitude: ZP - 2.5 log10(nsigma · median σ_F).

    ``flux_err`` are flux errors (ADU) of point-source apertures on blank sky (forced
    photometry at empty positions, or the faintest detections); the median is robust
    to the odd aperture on a star.
    """
    fe = np.asarray(flux_err, dtype=np.float64)
    fe = fe[np.isfinite(fe) & (fe > 0)]
    if fe.size == 0:
        return float("nan")
    return float(zeropoint_mag - 2.5 * np.log10(nsigma * np.median(fe)))


def isolated(ra_deg: np.ndarray, dec_deg: np.ndarray, radius_arcsec: float) -> np.ndarray:
    """True for positions with no other position within ``radius_arcsec`` (blends)."""
    from lakepipe.astro.crossmatch import crossmatch

    ra = np.asarray(ra_deg, dtype=np.float64)
    m = crossmatch(ra, dec_deg, ra, dec_deg, radius_arcsec, mode="all", workers=1)
    neighbours = np.bincount(m.idx1, minlength=ra.size)  # includes the position itself
    return neighbours <= 1
