"""Vectorised gnomonic (TAN) projection, as FITS WCS defines it.

Source: Calabretta & Greisen 2002, A&A 395, 1077 (FITS WCS Paper II), zenithal TAN with
the default ``LONPOLE = 180`` for a reference point off the pole; intermediate world
coordinates from the ``CD`` matrix (Greisen & Calabretta 2002, Paper I). Pixel
coordinates here are **0-based** (numpy / astropy ``*_pix2world(..., 0)`` convention):
the centre of the first pixel is (0, 0); FITS ``CRPIX`` is 1-based, so
``x0 = CRPIX1 - 1``. Angles in degrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TanWcs:
    """A TAN WCS: reference point, 1-based reference pixel, CD matrix (deg/pixel)."""

    crval1: float
    crval2: float
    crpix1: float
    crpix2: float
    cd: tuple[tuple[float, float], tuple[float, float]]

    @property
    def cd_matrix(self) -> np.ndarray:
        return np.asarray(self.cd, dtype=np.float64)

    def shifted(self, dx: float, dy: float) -> TanWcs:
        """The WCS of a sub-image whose pixel (0, 0) is this image's pixel (dx, dy)."""
        return TanWcs(self.crval1, self.crval2, self.crpix1 - dx, self.crpix2 - dy, self.cd)

    def pix2world(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """0-based pixel → (ra, dec) in degrees."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        cd = self.cd_matrix
        dx = x - (self.crpix1 - 1.0)
        dy = y - (self.crpix2 - 1.0)
        xi = np.radians(cd[0, 0] * dx + cd[0, 1] * dy)
        eta = np.radians(cd[1, 0] * dx + cd[1, 1] * dy)
        d0 = np.radians(self.crval2)
        den = np.cos(d0) - eta * np.sin(d0)
        ra = self.crval1 + np.degrees(np.arctan2(xi, den))
        dec = np.degrees(np.arctan2(eta * np.cos(d0) + np.sin(d0), np.hypot(xi, den)))
        return ra % 360.0, dec

    def world2pix(self, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ra, dec) in degrees → 0-based pixel (NaN behind the tangent plane)."""
        a = np.radians(np.asarray(ra, dtype=np.float64) - self.crval1)
        d = np.radians(np.asarray(dec, dtype=np.float64))
        d0 = np.radians(self.crval2)
        cosc = np.sin(d0) * np.sin(d) + np.cos(d0) * np.cos(d) * np.cos(a)
        with np.errstate(divide="ignore", invalid="ignore"):
            xi = np.where(cosc > 0, np.cos(d) * np.sin(a) / cosc, np.nan)
            eta = np.where(
                cosc > 0,
                (np.cos(d0) * np.sin(d) - np.sin(d0) * np.cos(d) * np.cos(a)) / cosc,
                np.nan,
            )
        inv = np.linalg.inv(self.cd_matrix)
        xi_deg, eta_deg = np.degrees(xi), np.degrees(eta)
        x = inv[0, 0] * xi_deg + inv[0, 1] * eta_deg + (self.crpix1 - 1.0)
        y = inv[1, 0] * xi_deg + inv[1, 1] * eta_deg + (self.crpix2 - 1.0)
        return x, y


def cd_from_scale_rotation(pixscale_arcsec: float, rotation_deg: float) -> tuple:
    """CD matrix (deg/pixel) for north up, east left, rotated by ``rotation_deg`` (N→E)."""
    s = pixscale_arcsec / 3600.0
    c, n = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
    return ((-s * c, s * n), (s * n, s * c))
