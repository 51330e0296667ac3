"""The virtual ZTF-like survey: configuration, field grid and observing schedule.

Everything here is a deterministic function of :class:`SurveyConfig` (and its ``seed``).
The survey observes a grid of fields around (``ra``, ``dec``); each field is one
CCD-quadrant-sized image (default 3072×3080 pixels at 1.01″/px, like a ZTF quadrant).
Every night each field is visited ``visits_per_night`` times around its meridian transit,
kept inside the dark window (Sun below -12°; low-precision solar position of the
Astronomical Almanac), the filter cycling through ``filters``. Per exposure the
conditions vary realistically:

- airmass from the true altitude at Palomar (MPC I41) via Greenwich mean sidereal time
  (IAU 1982 expression, Meeus, *Astronomical Algorithms* eq. 12.4; UT1≈UTC, <1 s error)
  and the Kasten & Young (1989, Appl. Opt. 28, 4735) airmass formula;
- seeing FWHM lognormal about 2.0″ (median) scaled by airmass^0.6 (Kolmogorov);
- moon-free sky brightness by filter, brightening with airmass, with night-to-night
  scatter (airglow);
- zeropoint ``MAGZP = ZP0 + 2.5 log10(t/30 s) - k (X - 1) - cloud`` with ZTF-typical
  ``ZP0`` for 30 s
  (~26.3 zg, 26.2 zr, 25.8 zi; Masci et al. 2019, PASP 131, 018003) and Palomar
  extinction coefficients ``k`` (~0.20 zg, 0.11 zr, 0.06 zi mag/airmass; cf. Ofek et al.
  2012, PASP 124, 62 for PTF at Palomar);
- 5σ depth from the same sky, seeing, zeropoint, gain and read noise
  (:func:`limiting_mag`);
- a TAN WCS with pointing jitter (σ 2″ per axis) and a small rotation jitter.

Exposure ids are ZTF-like: ``filefracday * 1000 + ccdid * 10 + qid`` where
``filefracday = YYYYMMDDffffff`` is the UTC start date and six-digit day fraction.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lakepipe.archives.query import night_of, to_mjd
from lakepipe.sim.tan import TanWcs, cd_from_scale_rotation

# Palomar / ZTF (MPC code I41), geodetic; from the MPC observatory list.
SITE_LON_DEG = -116.8599
SITE_LAT_DEG = 33.3563

# Per-filter survey constants (see module docstring for sources).
FILTERS = ("zg", "zr", "zi")
FILTER_ID = {"zg": 1, "zr": 2, "zi": 3}
ZP0_MAG = {"zg": 26.30, "zr": 26.20, "zi": 25.80}  # MAGZP at airmass 1, 30 s exposure
EXTINCTION_MAG_PER_AIRMASS = {"zg": 0.20, "zr": 0.11, "zi": 0.06}
SKY_MAG_ARCSEC2 = {"zg": 21.3, "zr": 20.8, "zi": 19.9}  # moon-free zenith sky brightness

FIELD_ID_BASE = 600
MJD_2016 = 57388.5  # J2016.0 = JD 2457389.0 (Gaia DR3 reference epoch), TDB ≈ UTC here


class SurveyConfig(BaseModel):
    """Knobs of the virtual survey; every output is a deterministic function of them."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(7, description="Random seed of the whole survey")
    ra: float = Field(150.0, ge=0.0, lt=360.0, description="Survey centre RA (deg)")
    dec: float = Field(2.2, ge=-80.0, le=80.0, description="Survey centre Dec (deg)")
    n_fields: int = Field(4, ge=1, le=64, description="Number of fields (near-square grid)")
    field_overlap: float = Field(
        0.05, ge=0.0, lt=0.5, description="Fractional overlap of neighbouring fields"
    )
    start: dt.date = Field(dt.date(2025, 1, 1), description="First night (UTC date)")
    n_nights: int = Field(12, ge=1, le=3650, description="Number of consecutive nights")
    visits_per_night: int = Field(3, ge=1, le=20, description="Exposures per field per night")
    filters: list[str] = Field(["zg", "zr", "zi"], min_length=1, description="Filter cycle")
    naxis1: int = Field(3072, ge=64, le=8192, description="Image width (pixels)")
    naxis2: int = Field(3080, ge=64, le=8192, description="Image height (pixels)")
    pixscale_arcsec: float = Field(1.01, gt=0.1, lt=10.0, description="Pixel scale (arcsec)")
    exptime_s: float = Field(30.0, gt=0.0, description="Exposure time (s)")
    gain_e_per_adu: float = Field(6.2, gt=0.0, description="Gain (e-/ADU), ZTF-like")
    rdnoise_e: float = Field(8.0, ge=0.0, description="Read noise (e-), ZTF-like")
    saturate_adu: float = Field(50000.0, gt=0.0, description="Saturation level (ADU)")
    seeing_median_arcsec: float = Field(2.0, gt=0.3, description="Median zenith seeing FWHM")
    n_stars: int = Field(
        5000, ge=0, description="Catalog stars per field-sized area, down to mag_faint"
    )
    mag_bright: float = Field(11.0, description="Brightest catalog star (Gaia G)")
    mag_faint: float = Field(21.5, description="Catalog depth (Gaia G)")
    n_variables: int = Field(12, ge=0, description="Periodic variable stars")
    transient: bool = Field(True, description="Include the fading transient")
    n_vanished: int = Field(6, ge=0, description="Catalog stars absent from the images")
    n_appeared: int = Field(6, ge=0, description="Image sources absent from the catalog")
    n_asteroids: int = Field(3, ge=0, description="Asteroids")
    defects: bool = Field(True, description="Cosmic rays, hot pixels, a bad column")
    cosmic_rays: int = Field(
        60, ge=0, description="Cosmic-ray hits per full-size (3072×3080) exposure"
    )

    @field_validator("filters")
    @classmethod
    def _check_filters(cls, v: list[str]) -> list[str]:
        bad = [f for f in v if f not in FILTERS]
        if bad:
            raise ValueError(f"unknown filter(s) {bad}; known: {', '.join(FILTERS)}")
        return v


@dataclass(frozen=True)
class Field_:
    """One survey field: id, detector ids and nominal centre (deg)."""

    field: int
    ccdid: int
    qid: int
    ra: float
    dec: float


@dataclass(frozen=True)
class Exposure:
    """One exposure's metadata (a row of the ``exposures`` table, plus WCS and ids)."""

    exposure_id: int
    index: int
    night: str
    field: int
    ccdid: int
    qid: int
    filter: str
    mjd: float
    exptime_s: float
    seeing_fwhm_arcsec: float
    airmass: float
    sky_adu: float
    zeropoint_mag: float
    mag_lim: float
    gain_e_per_adu: float
    rdnoise_e: float
    saturate_adu: float
    naxis1: int
    naxis2: int
    pixscale_arcsec: float
    wcs: TanWcs
    filefracday: int

    @property
    def fwhm_pix(self) -> float:
        return self.seeing_fwhm_arcsec / self.pixscale_arcsec

    @property
    def sigma_pix(self) -> float:
        """Gaussian PSF sigma in pixels: FWHM / (2 sqrt(2 ln 2))."""
        return self.fwhm_pix / (2.0 * math.sqrt(2.0 * math.log(2.0)))

    @property
    def mjd_start(self) -> float:
        return self.mjd - self.exptime_s / 2.0 / 86400.0

    def corners(self) -> tuple[np.ndarray, np.ndarray]:
        """RA, Dec of pixels (1,1), (N1,1), (N1,N2), (1,N2) (FITS 1-based), deg."""
        x = np.array([0.0, self.naxis1 - 1.0, self.naxis1 - 1.0, 0.0])
        y = np.array([0.0, 0.0, self.naxis2 - 1.0, self.naxis2 - 1.0])
        return self.wcs.pix2world(x, y)

    def center(self) -> tuple[float, float]:
        """RA, Dec of the image centre, deg."""
        ra, dec = self.wcs.pix2world(
            np.array([(self.naxis1 - 1) / 2.0]), np.array([(self.naxis2 - 1) / 2.0])
        )
        return float(ra[0]), float(dec[0])


def gmst_deg(mjd_ut: np.ndarray) -> np.ndarray:
    """Greenwich mean sidereal time (deg) at MJD UT; Meeus eq. 12.4 (IAU 1982)."""
    jd = np.asarray(mjd_ut, dtype=np.float64) + 2400000.5
    t = (jd - 2451545.0) / 36525.0
    g = 280.46061837 + 360.98564736629 * (jd - 2451545.0) + 0.000387933 * t**2 - t**3 / 38710000.0
    return g % 360.0


def altitude_deg(ra: np.ndarray, dec: np.ndarray, mjd_ut: np.ndarray) -> np.ndarray:
    """Geometric altitude (deg) at Palomar: sin h = sin φ sin δ + cos φ cos δ cos H."""
    ha = np.radians(gmst_deg(mjd_ut) + SITE_LON_DEG - np.asarray(ra))
    phi = math.radians(SITE_LAT_DEG)
    d = np.radians(dec)
    return np.degrees(np.arcsin(np.sin(phi) * np.sin(d) + np.cos(phi) * np.cos(d) * np.cos(ha)))


def airmass_kasten_young(alt_deg: np.ndarray) -> np.ndarray:
    """Relative airmass, Kasten & Young 1989: 1 / (sin h + 0.50572 (h + 6.07995°)^-1.6364)."""
    h = np.asarray(alt_deg, dtype=np.float64)
    return 1.0 / (np.sin(np.radians(h)) + 0.50572 * (h + 6.07995) ** -1.6364)


def limiting_mag(
    zeropoint_mag: float | np.ndarray,
    fwhm_pix: float | np.ndarray,
    sky_adu: float | np.ndarray,
    gain_e_per_adu: float,
    rdnoise_e: float,
    snr: float = 5.0,
) -> np.ndarray:
    """Point-source limiting magnitude at ``snr`` for PSF-fit photometry.

    Noise-equivalent area of a Gaussian PSF ``NEA = 4π σ²`` (King 1983, PASP 95, 163),
    with ``σ² = (FWHM / 2.3548)² + 1/12`` to include the pixel-box integration. With
    flux ``F`` (ADU) the variance in ADU² is
    ``F/g + NEA (sky/g + (RN/g)²)``; solving ``F² = snr² × variance`` gives
    ``F = [snr²/g + sqrt(snr⁴/g² + 4 snr² NEA B)] / 2`` with ``B = sky/g + (RN/g)²``,
    and ``mag_lim = ZP - 2.5 log10 F``.
    """
    g = gain_e_per_adu
    sigma2 = (np.asarray(fwhm_pix) / (2.0 * math.sqrt(2.0 * math.log(2.0)))) ** 2 + 1.0 / 12.0
    nea = 4.0 * math.pi * sigma2
    b = np.asarray(sky_adu) / g + (rdnoise_e / g) ** 2
    s2 = snr * snr
    flux = (s2 / g + np.sqrt((s2 / g) ** 2 + 4.0 * s2 * nea * b)) / 2.0
    return np.asarray(zeropoint_mag) - 2.5 * np.log10(flux)


def _filefracday(mjd_utc: float) -> int:
    """ZTF ``filefracday``: YYYYMMDD and the six-digit fraction of the UTC day."""
    day = math.floor(mjd_utc)
    frac = math.floor((mjd_utc - day) * 1e6)
    date = dt.date(1858, 11, 17) + dt.timedelta(days=day)
    return int(date.strftime("%Y%m%d")) * 1_000_000 + frac


def _transit_mjd(ra_deg: float, night_mjd0: float) -> float:
    """MJD UT of the upper meridian transit of ``ra_deg`` at Palomar during a UTC date."""
    t = night_mjd0 + 0.5
    for _ in range(3):
        ha = (gmst_deg(np.array([t]))[0] + SITE_LON_DEG - ra_deg + 180.0) % 360.0 - 180.0
        t -= ha / 360.98564736629
    # keep it inside the UTC date
    return night_mjd0 + ((t - night_mjd0) % 0.99726957)


def sun_radec_deg(mjd_ut: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apparent RA, Dec of the Sun (deg, equator and equinox of date), precision ~0.01°.

    Astronomical Almanac "low-precision formulas for the Sun" (section C): mean
    longitude ``L``, mean anomaly ``g``, ecliptic longitude ``λ = L + 1.915 sin g +
    0.020 sin 2g`` and obliquity ``ε = 23.439 - 4e-7 n`` with ``n`` days from J2000.
    """
    n = np.asarray(mjd_ut, dtype=np.float64) + 2400000.5 - 2451545.0
    g = np.radians(357.528 + 0.9856003 * n)
    lam = np.radians(280.460 + 0.9856474 * n + 1.915 * np.sin(g) + 0.020 * np.sin(2 * g))
    eps = np.radians(23.439 - 4e-7 * n)
    ra = np.degrees(np.arctan2(np.cos(eps) * np.sin(lam), np.cos(lam))) % 360.0
    dec = np.degrees(np.arcsin(np.sin(eps) * np.sin(lam)))
    return ra, dec


def dark_window(night_mjd0: float, sun_alt_max_deg: float = -12.0) -> tuple[float, float]:
    """(start, end) MJD of the longest stretch of a UTC date with the Sun below
    ``sun_alt_max_deg`` at Palomar (nautical twilight by default), sampled every 2 min."""
    t = night_mjd0 + np.arange(720) / 720.0
    ra, dec = sun_radec_deg(t)
    dark = altitude_deg(ra, dec, t) < sun_alt_max_deg
    best, start, best_span = (night_mjd0, night_mjd0), None, -1
    for k, d in enumerate(np.append(dark, False)):
        if d and start is None:
            start = k
        elif not d and start is not None:
            if k - start > best_span:
                best_span, best = k - start, (float(t[start]), float(t[k - 1]))
            start = None
    return best


class Survey:
    """The virtual survey defined by a :class:`SurveyConfig`."""

    def __init__(self, config: SurveyConfig) -> None:
        self.config = config

    def rng(self, *tags: int) -> np.random.Generator:
        """A generator seeded by (seed, *tags): independent deterministic streams."""
        return np.random.default_rng([self.config.seed, *tags])

    @property
    def footprint_deg(self) -> tuple[float, float]:
        """Image width and height on the sky (deg)."""
        c = self.config
        return c.naxis1 * c.pixscale_arcsec / 3600.0, c.naxis2 * c.pixscale_arcsec / 3600.0

    @functools.cached_property
    def fields(self) -> list[Field_]:
        """The field grid: near-square, centred on (ra, dec), spaced by the footprint."""
        c = self.config
        ncol = math.ceil(math.sqrt(c.n_fields))
        nrow = math.ceil(c.n_fields / ncol)
        w, h = self.footprint_deg
        sx, sy = w * (1.0 - c.field_overlap), h * (1.0 - c.field_overlap)
        out = []
        for i in range(c.n_fields):
            col, row = i % ncol, i // ncol
            dec = c.dec + (row - (nrow - 1) / 2.0) * sy
            ra = (c.ra + (col - (ncol - 1) / 2.0) * sx / math.cos(math.radians(dec))) % 360.0
            out.append(
                Field_(FIELD_ID_BASE + i, ccdid=1 + i % 16, qid=1 + (i // 16) % 4, ra=ra, dec=dec)
            )
        return out

    @functools.cached_property
    def exposures(self) -> list[Exposure]:
        """Every exposure of the survey, in time order."""
        c = self.config
        rng = self.rng(1)
        night0 = to_mjd(c.start)
        visit_gap_d = 1.3 / 24.0  # between visits of the same field
        slot_d = 45.0 / 86400.0  # exposure + overhead
        out: list[Exposure] = []
        n_f = len(self.fields)
        n_v = c.visits_per_night
        for n in range(c.n_nights):
            # visits centred on the meridian transit, kept inside the dark window
            transit = _transit_mjd(c.ra, night0 + n)
            dark0, dark1 = dark_window(night0 + n)
            gap = visit_gap_d
            span = (n_v - 1) * gap + n_f * slot_d
            if span > dark1 - dark0 and n_v > 1:
                gap = max(0.0, (dark1 - dark0 - n_f * slot_d) / (n_v - 1))
                span = (n_v - 1) * gap + n_f * slot_d
            centre = min(max(transit, dark0 + span / 2.0), dark1 - span / 2.0)
            for v in range(n_v):
                flt = c.filters[(v + n) % len(c.filters)]
                block = centre + (v - (n_v - 1) / 2.0) * gap
                for fi, fld in enumerate(self.fields):
                    mjd = block + (fi - (n_f - 1) / 2.0) * slot_d + rng.uniform(-5.0, 5.0) / 86400
                    out.append(self._make_exposure(len(out), fld, flt, float(mjd), rng))
        return out

    def _make_exposure(
        self, index: int, fld: Field_, flt: str, mjd: float, rng: np.random.Generator
    ) -> Exposure:
        c = self.config
        alt = float(altitude_deg(np.array([fld.ra]), np.array([fld.dec]), np.array([mjd]))[0])
        airmass = float(airmass_kasten_young(np.array([max(alt, 5.0)]))[0])
        seeing = c.seeing_median_arcsec * math.exp(rng.normal(0.0, 0.2)) * airmass**0.6
        seeing = float(np.clip(seeing, 1.0, 5.0))
        cloud = float(rng.exponential(0.03))
        # MAGZP is for the counts of the whole exposure: + 2.5 log10(t / 30 s)
        zp = (
            ZP0_MAG[flt]
            + 2.5 * math.log10(c.exptime_s / 30.0)
            - EXTINCTION_MAG_PER_AIRMASS[flt] * (airmass - 1.0)
            - cloud
        )
        # sky: zenith brightness, brighter by ~2.5 log10(X) towards the horizon, airglow scatter
        sky_mag = SKY_MAG_ARCSEC2[flt] - 2.5 * math.log10(airmass) + rng.normal(0.0, 0.15)
        sky_adu = 10.0 ** (-0.4 * (sky_mag - zp)) * c.pixscale_arcsec**2
        fwhm_pix = seeing / c.pixscale_arcsec
        mag_lim = float(limiting_mag(zp, fwhm_pix, sky_adu, c.gain_e_per_adu, c.rdnoise_e))
        # pointing jitter (2" rms per axis) and rotation jitter (0.005 deg rms)
        jra = rng.normal(0.0, 2.0) / 3600.0 / math.cos(math.radians(fld.dec))
        jdec = rng.normal(0.0, 2.0) / 3600.0
        rot = rng.normal(0.0, 0.005)
        wcs = TanWcs(
            crval1=(fld.ra + jra) % 360.0,
            crval2=fld.dec + jdec,
            crpix1=(c.naxis1 + 1) / 2.0,
            crpix2=(c.naxis2 + 1) / 2.0,
            cd=cd_from_scale_rotation(c.pixscale_arcsec, rot),
        )
        ffd = _filefracday(mjd - c.exptime_s / 2.0 / 86400.0)
        return Exposure(
            exposure_id=ffd * 1000 + fld.ccdid * 10 + fld.qid,
            index=index,
            night=night_of(mjd),
            field=fld.field,
            ccdid=fld.ccdid,
            qid=fld.qid,
            filter=flt,
            mjd=mjd,
            exptime_s=c.exptime_s,
            seeing_fwhm_arcsec=seeing,
            airmass=airmass,
            sky_adu=float(sky_adu),
            zeropoint_mag=float(zp),
            mag_lim=mag_lim,
            gain_e_per_adu=c.gain_e_per_adu,
            rdnoise_e=c.rdnoise_e,
            saturate_adu=c.saturate_adu,
            naxis1=c.naxis1,
            naxis2=c.naxis2,
            pixscale_arcsec=c.pixscale_arcsec,
            wcs=wcs,
            filefracday=ffd,
        )

    @functools.cached_property
    def _by_id(self) -> dict[int, Exposure]:
        return {e.exposure_id: e for e in self.exposures}

    def exposure(self, exposure_id: int) -> Exposure:
        """One exposure by id; KeyError when the survey has no such exposure."""
        return self._by_id[int(exposure_id)]

    def exposure_table(self, archive: str = "sim") -> pa.Table:
        """All exposures as rows of the ``exposures`` contract (without ``_healpix_29``)."""
        exps = self.exposures
        corners = [e.corners() for e in exps]
        centers = [e.center() for e in exps]
        cols: dict[str, pa.Array] = {
            "night": pa.array([e.night for e in exps], pa.string()),
            "exposure_id": pa.array([e.exposure_id for e in exps], pa.int64()),
            "archive": pa.array([archive] * len(exps), pa.string()),
            "image_uri": pa.array([f"sim://{e.exposure_id}" for e in exps], pa.string()),
            "field": pa.array([e.field for e in exps], pa.int32()),
            "ccdid": pa.array([e.ccdid for e in exps], pa.int16()),
            "qid": pa.array([e.qid for e in exps], pa.int16()),
            "filter": pa.array([e.filter for e in exps], pa.string()),
        }
        for name in (
            "mjd",
            "exptime_s",
            "seeing_fwhm_arcsec",
            "airmass",
            "sky_adu",
            "zeropoint_mag",
            "mag_lim",
            "gain_e_per_adu",
            "rdnoise_e",
            "saturate_adu",
        ):
            cols[name] = pa.array([getattr(e, name) for e in exps], pa.float64())
        cols["naxis1"] = pa.array([e.naxis1 for e in exps], pa.int32())
        cols["naxis2"] = pa.array([e.naxis2 for e in exps], pa.int32())
        cols["pixscale_arcsec"] = pa.array([e.pixscale_arcsec for e in exps], pa.float64())
        cols["ra"] = pa.array([c[0] for c in centers], pa.float64())
        cols["dec"] = pa.array([c[1] for c in centers], pa.float64())
        for k in range(4):
            cols[f"ra{k + 1}"] = pa.array([float(c[0][k]) for c in corners], pa.float64())
            cols[f"dec{k + 1}"] = pa.array([float(c[1][k]) for c in corners], pa.float64())
        return pa.table(cols)
