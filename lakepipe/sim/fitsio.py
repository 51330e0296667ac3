"""FITS headers and files of the virtual survey's images and cutouts.

Headers follow what a ZTF science image carries (IRSA ZTF Science Data System
explanatory supplement; Masci et al. 2019, PASP 131, 018003) where it matters to users:
``DATE-OBS``/``MJD-OBS`` (UTC, **start** of exposure, FITS standard 4.0 §4.4.2.1),
``DATE-AVG``/``MJD-AVG`` (mid-exposure, as in the lake's ``mjd``), ``EXPTIME`` (s),
``FILTER`` (``zg``/``zr``/``zi``), ``FILTERID``, ``MAGZP`` (mag for counts in ADU),
``SEEING`` (FWHM, arcsec), ``AIRMASS``, ``GAIN`` (e-/ADU), ``RDNOISE`` (e-),
``SATURATE`` (ADU), ``MAGLIM``, ``SKYLEV``, field/CCD/quadrant ids and a full TAN WCS
(``CTYPE``, ``CRVAL``, ``CRPIX``, ``CD``, ``RADESYS = ICRS``; Calabretta & Greisen 2002).
"""

from __future__ import annotations

import datetime as dt
import io
import math

import numpy as np
from astropy.io import fits

from lakepipe.sim.survey import FILTER_ID, Exposure
from lakepipe.sim.tan import TanWcs

_MJD0 = dt.datetime(1858, 11, 17, tzinfo=dt.UTC)


def isot(mjd_utc: float) -> str:
    """ISO 8601 UTC string with milliseconds of an MJD (UTC)."""
    t = _MJD0 + dt.timedelta(microseconds=round(mjd_utc * 86400e6 / 1000) * 1000)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}"


def wcs_cards(wcs: TanWcs) -> list[tuple[str, object, str]]:
    """FITS cards of a TAN WCS."""
    cd = wcs.cd_matrix
    return [
        ("WCSAXES", 2, "Number of WCS axes"),
        ("CTYPE1", "RA---TAN", "Gnomonic projection"),
        ("CTYPE2", "DEC--TAN", "Gnomonic projection"),
        ("CUNIT1", "deg", ""),
        ("CUNIT2", "deg", ""),
        ("CRVAL1", float(wcs.crval1), "[deg] RA at reference pixel"),
        ("CRVAL2", float(wcs.crval2), "[deg] Dec at reference pixel"),
        ("CRPIX1", float(wcs.crpix1), "Reference pixel x (1-based)"),
        ("CRPIX2", float(wcs.crpix2), "Reference pixel y (1-based)"),
        ("CD1_1", float(cd[0, 0]), "[deg/pix] WCS CD matrix"),
        ("CD1_2", float(cd[0, 1]), "[deg/pix]"),
        ("CD2_1", float(cd[1, 0]), "[deg/pix]"),
        ("CD2_2", float(cd[1, 1]), "[deg/pix]"),
        ("RADESYS", "ICRS", "Celestial reference frame"),
    ]


def exposure_header(exp: Exposure, *, seed: int) -> fits.Header:
    """The science-image header of one exposure (float32 image of NAXIS1 x NAXIS2)."""
    h = fits.Header()
    cards: list[tuple[str, object, str]] = [
        ("SIMPLE", True, "conforms to FITS standard"),
        ("BITPIX", -32, "array data type"),
        ("NAXIS", 2, "number of array dimensions"),
        ("NAXIS1", exp.naxis1, ""),
        ("NAXIS2", exp.naxis2, ""),
        ("ORIGIN", "lakepipe.sim", "Virtual ZTF-like survey"),
        ("TELESCOP", "P48", "Palomar 48-inch (virtual)"),
        ("INSTRUME", "ZTF-SIM", "Simulated ZTF-like camera"),
        ("OBSERVAT", "Palomar", "MPC code I41"),
        ("SIMSEED", seed, "Survey seed"),
        ("EXPID", exp.exposure_id, "Exposure id (lake exposure_id)"),
        ("FILEFRAC", exp.filefracday, "ZTF-like filefracday (UTC start)"),
        ("FIELDID", exp.field, "Survey field id"),
        ("CCDID", exp.ccdid, "CCD id"),
        ("QID", exp.qid, "Quadrant id"),
        ("FILTER", exp.filter, "Filter code"),
        ("FILTERID", FILTER_ID[exp.filter], "1=zg 2=zr 3=zi"),
        ("TIMESYS", "UTC", "Time scale of DATE-*/MJD-*"),
        ("DATE-OBS", isot(exp.mjd_start), "UTC start of exposure"),
        ("MJD-OBS", round(exp.mjd_start, 8), "[d] MJD (UTC) start of exposure"),
        ("DATE-AVG", isot(exp.mjd), "UTC mid-exposure"),
        ("MJD-AVG", round(exp.mjd, 8), "[d] MJD (UTC) mid-exposure"),
        ("EXPTIME", exp.exptime_s, "[s] Exposure time"),
        ("AIRMASS", round(exp.airmass, 5), "Airmass at mid-exposure"),
        ("SEEING", round(exp.seeing_fwhm_arcsec, 4), "[arcsec] Seeing FWHM (Gaussian PSF)"),
        ("FWHMPIX", round(exp.fwhm_pix, 4), "[pix] Seeing FWHM"),
        ("SKYLEV", round(exp.sky_adu, 4), "[ADU] Mean sky level"),
        ("MAGZP", round(exp.zeropoint_mag, 5), "[mag] Zeropoint: m = MAGZP - 2.5 log10(ADU)"),
        ("MAGLIM", round(exp.mag_lim, 4), "[mag] 5-sigma point-source limit"),
        ("GAIN", exp.gain_e_per_adu, "[e-/ADU] Detector gain"),
        ("RDNOISE", exp.rdnoise_e, "[e-] Read noise"),
        ("SATURATE", exp.saturate_adu, "[ADU] Saturation level"),
        ("PIXSCALE", exp.pixscale_arcsec, "[arcsec/pix] Pixel scale"),
        ("BUNIT", "adu", "Pixel unit"),
        *wcs_cards(exp.wcs),
    ]
    for key, value, comment in cards:
        h[key] = (value, comment)
    return h


def fits_bytes(header: fits.Header, data: np.ndarray) -> bytes:
    """A one-HDU FITS file of ``data`` with ``header`` (deterministic bytes)."""
    hdu = fits.PrimaryHDU(data=data, header=header)
    buf = io.BytesIO()
    hdu.writeto(buf, output_verify="exception")
    return buf.getvalue()


def cutout_window(
    x_pix: float, y_pix: float, size_pix: int, nx: int, ny: int
) -> tuple[int, int, str]:
    """Origin (x0, y0) of an ``size_pix`` square cutout whose centre pixel holds (x, y).

    The pixel containing the target sits at index ``size_pix // 2``; status is ``ok``
    (entirely on the image), ``partial`` (target on the image, square crosses an edge)
    or ``off_chip`` (target off the image). Positions 0-based.
    """
    on = math.isfinite(x_pix) and math.isfinite(y_pix)
    on = on and -0.5 <= x_pix < nx - 0.5 and -0.5 <= y_pix < ny - 0.5
    if not on:
        return 0, 0, "off_chip"
    x0 = math.floor(x_pix + 0.5) - size_pix // 2
    y0 = math.floor(y_pix + 0.5) - size_pix // 2
    inside = x0 >= 0 and y0 >= 0 and x0 + size_pix <= nx and y0 + size_pix <= ny
    return x0, y0, "ok" if inside else "partial"


def cutout_header(
    header: fits.Header,
    x0: int,
    y0: int,
    size_pix: int,
    ra: float,
    dec: float,
    size_arcsec: float,
) -> fits.Header:
    """Header of a ``size_pix`` square cutout with origin (x0, y0).

    ``CRPIX`` shifted by the origin (exact for any projection), IRAF ``LTV1/2`` offsets,
    and the requested target and size (``CUTRA``, ``CUTDEC``, ``CUTSIZE``).
    """
    out = header.copy()
    out["NAXIS1"] = size_pix
    out["NAXIS2"] = size_pix
    out["CRPIX1"] = float(header["CRPIX1"]) - x0
    out["CRPIX2"] = float(header["CRPIX2"]) - y0
    out["LTV1"] = (float(header.get("LTV1", 0.0)) - x0, "physical x = image x - LTV1")
    out["LTV2"] = (float(header.get("LTV2", 0.0)) - y0, "physical y = image y - LTV2")
    out["CUTRA"] = (float(ra), "[deg] cutout target RA (ICRS)")
    out["CUTDEC"] = (float(dec), "[deg] cutout target Dec (ICRS)")
    out["CUTSIZE"] = (float(size_arcsec), "[arcsec] requested cutout side")
    return out
