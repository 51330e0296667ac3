"""Generators of small, real FITS images for the fits_dir and cutouts tests.

Each image renders Gaussian stars at known sky positions through its own WCS (TAN with
SIP distortion, or TPV), so tests can check that pixel positions and WCSs agree; the
first extension stores integers with BSCALE/BZERO scaling, as many archives do.
Nothing is committed: tests call these into ``tmp_path``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from lakepipe.astro.wcs import celestial_wcs, sky_to_pixel

PIXSCALE_ARCSEC = 1.0
FWHM_PIX = 2.5


@dataclass
class Star:
    ra: float
    dec: float
    flux: float  # total counts (physical units, after BSCALE/BZERO)


@dataclass
class ImageSpec:
    """One image extension: centre, size, WCS flavour, stars, scaling."""

    ra: float
    dec: float
    naxis1: int = 120
    naxis2: int = 100
    distortion: str = "sip"  # sip | tpv | none
    stars: list[Star] = field(default_factory=list)
    scaled_int16: bool = False
    sky: float = 100.0
    extname: str = "SCI"


def wcs_header(spec: ImageSpec) -> fits.Header:
    """A celestial WCS header at 1″/px with a small rotation and the chosen distortion."""
    h = fits.Header()
    h["NAXIS"] = 2
    h["NAXIS1"] = spec.naxis1
    h["NAXIS2"] = spec.naxis2
    s = PIXSCALE_ARCSEC / 3600.0
    rot = np.radians(3.0)
    cd = s * np.array([[-np.cos(rot), np.sin(rot)], [np.sin(rot), np.cos(rot)]])
    h["CRPIX1"] = (spec.naxis1 + 1) / 2.0 + 3.3
    h["CRPIX2"] = (spec.naxis2 + 1) / 2.0 - 2.1
    h["CRVAL1"] = spec.ra
    h["CRVAL2"] = spec.dec
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = cd[0, 0], cd[0, 1], cd[1, 0], cd[1, 1]
    h["RADESYS"] = "ICRS"
    if spec.distortion == "sip":
        # SIP (Shupe et al. 2005): polynomial in pixel offsets from CRPIX, up to ~0.5 px here
        h["CTYPE1"], h["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
        h["A_ORDER"], h["B_ORDER"] = 2, 2
        h["A_2_0"], h["A_0_2"], h["A_1_1"] = 4e-5, -2e-5, 1e-5
        h["B_2_0"], h["B_0_2"], h["B_1_1"] = -1e-5, 3e-5, 2e-5
    elif spec.distortion == "tpv":
        # TPV: polynomial in intermediate world coordinates (degrees), cubic terms
        h["CTYPE1"], h["CTYPE2"] = "RA---TPV", "DEC--TPV"
        h["PV1_0"], h["PV1_1"], h["PV1_2"], h["PV1_7"] = 0.0, 1.0, 0.0, 40.0
        h["PV2_0"], h["PV2_1"], h["PV2_2"], h["PV2_9"] = 0.0, 1.0, 0.0, -30.0
    else:
        h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    return h


def render(spec: ImageSpec, header: fits.Header) -> np.ndarray:
    """Noise-free image: flat sky plus Gaussian stars at their WCS pixel positions."""
    wcs = celestial_wcs(header)
    yy, xx = np.mgrid[0 : spec.naxis2, 0 : spec.naxis1].astype(float)
    img = np.full((spec.naxis2, spec.naxis1), spec.sky, dtype=np.float64)
    sigma = FWHM_PIX / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    for st in spec.stars:
        x, y = sky_to_pixel(wcs, np.array([st.ra]), np.array([st.dec]))
        img += (
            st.flux
            / (2 * np.pi * sigma**2)
            * np.exp(-((xx - x[0]) ** 2 + (yy - y[0]) ** 2) / (2 * sigma**2))
        )
    return img


def write_mef(
    path: Path,
    images: list[ImageSpec],
    *,
    date_obs: str | None = "2025-01-03T05:00:00",
    exptime_s: float = 30.0,
    filt: str = "r",
    extra_primary: dict | None = None,
    with_table: bool = True,
) -> list[np.ndarray]:
    """Write a multi-extension FITS file; returns the physical pixel arrays written."""
    primary = fits.PrimaryHDU()
    if date_obs is not None:
        primary.header["DATE-OBS"] = (date_obs, "UTC start of exposure")
    primary.header["EXPTIME"] = (exptime_s, "[s]")
    primary.header["FILTER"] = filt
    primary.header["TELESCOP"] = "TEST"
    primary.header["GAIN"] = 1.5
    for k, v in (extra_primary or {}).items():
        primary.header[k] = v
    hdus: list[fits.hdu.base._BaseHDU] = [primary]
    arrays = []
    for spec in images:
        header = wcs_header(spec)
        data = render(spec, header)
        hdu = fits.ImageHDU(data=data.astype(np.float32), name=spec.extname)
        for card in header.cards:
            if card.keyword not in ("NAXIS", "NAXIS1", "NAXIS2"):
                hdu.header[card.keyword] = card.value
        if spec.scaled_int16:
            hdu.scale("int16", bscale=0.25, bzero=3000.0)
        arrays.append(data)
        hdus.append(hdu)
    if with_table:
        hdus.append(fits.BinTableHDU.from_columns([fits.Column("x", "E", array=np.zeros(3))]))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return arrays
