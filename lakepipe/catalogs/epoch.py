"""Reference-catalog epochs: Julian years, MJD, and proper-motion propagation."""

from __future__ import annotations

import numpy as np

MJD_J2000 = 51544.5  # MJD of J2000.0 (2000-01-01 12:00 TT)
DAYS_PER_JULIAN_YEAR = 365.25
MAS_TO_RAD = np.pi / (180.0 * 3600.0 * 1000.0)


def jyear_to_mjd(jyear: float | np.ndarray) -> float | np.ndarray:
    """MJD of a Julian epoch (e.g. Gaia DR3's ``ref_epoch`` 2016.0): IAU 1976 definition.

    The epoch is TT/TCB; treating it as UTC errs by ~1 min, irrelevant for proper motion.
    """
    return MJD_J2000 + (np.asarray(jyear, dtype=np.float64) - 2000.0) * DAYS_PER_JULIAN_YEAR


def mjd_to_jyear(mjd: float | np.ndarray) -> float | np.ndarray:
    """Julian epoch (years) of an MJD."""
    return 2000.0 + (np.asarray(mjd, dtype=np.float64) - MJD_J2000) / DAYS_PER_JULIAN_YEAR


def propagate_proper_motion(
    ra_deg: np.ndarray,
    dec_deg: np.ndarray,
    pmra_mas_yr: np.ndarray,
    pmdec_mas_yr: np.ndarray,
    dt_yr: np.ndarray | float,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``dt_yr`` Julian years after the catalogue epoch.

    ``pmra_mas_yr`` is μα* = μα cos δ (the Gaia/Hipparcos convention), ``pmdec_mas_yr``
    is μδ, both mas/yr. Uniform space motion with zero parallax and radial velocity
    (ESA 1997, The Hipparcos and Tycho Catalogues, SP-1200 Vol. 1, Sect. 1.5.5)::

        p = (-sin α, cos α, 0),  q = (-sin δ cos α, -sin δ sin α, cos δ)
        u(t) = (r0 + t (p μα* + q μδ)) / |r0 + t (p μα* + q μδ)|

    Vector form, so it is exact at the poles and across RA = 0/360. Missing (NaN)
    proper motions are treated as zero.
    """
    ra = np.radians(np.asarray(ra_deg, dtype=np.float64))
    dec = np.radians(np.asarray(dec_deg, dtype=np.float64))
    pmra = np.nan_to_num(np.asarray(pmra_mas_yr, dtype=np.float64)) * MAS_TO_RAD
    pmdec = np.nan_to_num(np.asarray(pmdec_mas_yr, dtype=np.float64)) * MAS_TO_RAD
    dt = np.asarray(dt_yr, dtype=np.float64)
    sa, ca = np.sin(ra), np.cos(ra)
    sd, cd = np.sin(dec), np.cos(dec)
    x = cd * ca + dt * (-sa * pmra - sd * ca * pmdec)
    y = cd * sa + dt * (ca * pmra - sd * sa * pmdec)
    z = sd + dt * (cd * pmdec)
    ra_out = np.degrees(np.arctan2(y, x)) % 360.0
    dec_out = np.degrees(np.arctan2(z, np.hypot(x, y)))
    return ra_out, dec_out
