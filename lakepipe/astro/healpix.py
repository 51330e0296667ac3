"""HEALPix indexing used across the lake.

Every positional table carries ``_healpix_29``: the nested HEALPix index of (ra, dec)
at order 29 (nside = 2**29), the convention of the HATS format (LSDB), so row-group
statistics on it prune cone and box queries and a HATS export needs no re-sorting.
"""

from __future__ import annotations

import numpy as np
from astropy import units as u
from astropy_healpix.core import healpix_to_lonlat, lonlat_to_healpix

HATS_ORDER = 29


def healpix_index(ra_deg: np.ndarray, dec_deg: np.ndarray, order: int = HATS_ORDER) -> np.ndarray:
    """Nested HEALPix index (int64) of ICRS positions in degrees at ``order``."""
    ra = np.asarray(ra_deg, dtype=np.float64)
    dec = np.asarray(dec_deg, dtype=np.float64)
    return lonlat_to_healpix(ra * u.deg, dec * u.deg, 2**order, order="nested").astype(np.int64)


def healpix_center(index: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees of the centres of nested pixels at ``order``."""
    lon, lat = healpix_to_lonlat(np.asarray(index, dtype=np.int64), 2**order, order="nested")
    return lon.to_value(u.deg), lat.to_value(u.deg)


def degrade(index29: np.ndarray, order: int) -> np.ndarray:
    """Parent pixel at a coarser ``order`` of order-29 nested indices (drop 2 bits a level)."""
    return np.asarray(index29, dtype=np.int64) >> (2 * (HATS_ORDER - order))
