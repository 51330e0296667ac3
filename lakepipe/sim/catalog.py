"""The static sky of the virtual survey: stars, variables, vanished and appeared sources.

Star counts follow a power law in magnitude, ``dN/dm ∝ 10^(α m)`` with
``α = 0.33 dex/mag``, the slope of high-latitude star counts at ``V≈15–21``
(Bahcall & Soneira 1980, ApJS 44, 73; Reid & Majewski 1993), sampled between
``mag_bright`` and ``mag_faint`` (Gaia G) uniformly over the survey area (uniform in
``sin dec``). Colours ``bp_rp`` are normal about 1.0 (σ 0.4), proper motions normal
(σ 6 mas/yr per axis), positions at the Gaia DR3 reference epoch J2016.0.

Survey magnitudes use a simple linear colour model of our own (not a published
transformation; tuned to give Solar-type ``g-G≈0.4``, ``r-G≈0.05``, ``i-G≈-0.25`` at
``BP-RP=0.82``): ``m_f = G + a_f + b_f (BP-RP - 0.82)``, see :data:`COLOUR_TERMS`.

``source_id`` is Gaia-like: the nested HEALPix level-12 index of the position times
2^35 plus a running number (Gaia DR3 documentation, §14.1.1, ``source_id``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pyarrow as pa

from lakepipe.astro.healpix import healpix_index
from lakepipe.sim.survey import MJD_2016, Survey

COUNT_SLOPE_DEX_PER_MAG = 0.33
COLOUR_TERMS = {"zg": (0.40, 0.95), "zr": (0.05, 0.35), "zi": (-0.25, -0.10)}
REF_EPOCH = 2016.0

KIND_STAR = "star"
KIND_VARIABLE = "variable"
KIND_VANISHED = "vanished"
KIND_APPEARED = "appeared"


def filter_mag(g_mag: np.ndarray, bp_rp: np.ndarray, flt: str) -> np.ndarray:
    """Survey magnitude in filter ``flt`` from Gaia G and BP-RP (linear colour model)."""
    a, b = COLOUR_TERMS[flt]
    return np.asarray(g_mag) + a + b * (np.asarray(bp_rp) - 0.82)


def sample_power_law_mags(
    rng: np.random.Generator, n: int, m_bright: float, m_faint: float, slope: float
) -> np.ndarray:
    """Magnitudes with ``dN/dm ∝ 10^(slope m)`` on [m_bright, m_faint] (inverse CDF)."""
    k = slope * math.log(10.0)
    u = rng.uniform(0.0, 1.0, n)
    lo, hi = math.exp(k * (m_bright - m_faint)), 1.0
    return m_faint + np.log(lo + u * (hi - lo)) / k


def propagate_pm(
    ra: np.ndarray, dec: np.ndarray, pmra: np.ndarray, pmdec: np.ndarray, mjd: float
) -> tuple[np.ndarray, np.ndarray]:
    """Positions at ``mjd`` from J2016.0 with proper motion (mas/yr; pmra = μα cos δ).

    Linear in the tangent directions; exact to < 0.1 mas for |μ| < 1″/yr over decades.
    """
    dt_yr = (mjd - MJD_2016) / 365.25
    dec_new = dec + pmdec * dt_yr / 3.6e6
    ra_new = ra + pmra * dt_yr / 3.6e6 / np.cos(np.radians(dec))
    return ra_new % 360.0, dec_new


class SkyModel:
    """Stars (catalogued or not), variables and the transient of one survey."""

    def __init__(self, survey: Survey) -> None:
        self.survey = survey
        self.config = survey.config

    @functools.cached_property
    def region(self) -> tuple[float, float, float, float]:
        """(ra_min, ra_max, dec_min, dec_max) covering every field with a 0.05° margin."""
        w, h = self.survey.footprint_deg
        half_diag = 0.5 * math.hypot(w, h) + 0.05
        ras = [f.ra for f in self.survey.fields]
        decs = [f.dec for f in self.survey.fields]
        dec_min, dec_max = min(decs) - half_diag, max(decs) + half_diag
        cosd = math.cos(math.radians(max(abs(dec_min), abs(dec_max))))
        # unwrap RA about the survey centre
        ra0 = self.config.ra
        rel = [((r - ra0 + 180.0) % 360.0) - 180.0 for r in ras]
        return (
            ra0 + min(rel) - half_diag / cosd,
            ra0 + max(rel) + half_diag / cosd,
            dec_min,
            dec_max,
        )

    @functools.cached_property
    def objects(self) -> pa.Table:
        """Every static point source: stars, variables, vanished and appeared.

        Columns: ``source_id, ra, dec, pmra, pmdec, phot_g_mean_mag, bp_rp, ref_epoch,
        kind, in_catalog, rendered``. ``ra``/``dec`` at J2016.0 (deg ICRS).
        """
        c = self.config
        rng = self.survey.rng(2)
        ra_min, ra_max, dec_min, dec_max = self.region
        w, h = self.survey.footprint_deg
        area = (
            math.radians(ra_max - ra_min)
            * (math.sin(math.radians(dec_max)) - math.sin(math.radians(dec_min)))
            * (180.0 / math.pi) ** 2
        )
        n = round(c.n_stars * area / (w * h))
        n_total = n + c.n_appeared
        ra = (ra_min + rng.uniform(0.0, 1.0, n_total) * (ra_max - ra_min)) % 360.0
        sin_dec = rng.uniform(
            math.sin(math.radians(dec_min)), math.sin(math.radians(dec_max)), n_total
        )
        dec = np.degrees(np.arcsin(sin_dec))
        g = sample_power_law_mags(rng, n_total, c.mag_bright, c.mag_faint, COUNT_SLOPE_DEX_PER_MAG)
        bp_rp = np.clip(rng.normal(1.0, 0.4, n_total), -0.3, 4.0)
        pmra = rng.normal(0.0, 6.0, n_total)
        pmdec = rng.normal(0.0, 6.0, n_total)
        kind = np.full(n_total, KIND_STAR, dtype=object)
        # appeared: the last n_appeared, moderately bright, inside a field
        if c.n_appeared:
            g[n:] = rng.uniform(16.0, 18.5, c.n_appeared)
            kind[n:] = KIND_APPEARED
            fi = rng.integers(0, len(self.survey.fields), c.n_appeared)
            ra[n:], dec[n:] = self._inside_fields(rng, fi)
        candidates = np.flatnonzero(
            (g[:n] > 14.0) & (g[:n] < 18.5) & self._in_fields(ra[:n], dec[:n])
        )
        pick = rng.permutation(candidates)
        n_var = min(c.n_variables, len(pick))
        kind[pick[:n_var]] = KIND_VARIABLE
        vanish = [i for i in pick[n_var:] if 15.0 < g[i] < 18.5][: c.n_vanished]
        kind[vanish] = KIND_VANISHED
        hp12 = healpix_index(ra, dec, order=12)
        order = np.lexsort((g, hp12))
        source_id = np.empty(n_total, dtype=np.int64)
        running = np.zeros(n_total, dtype=np.int64)
        sorted_hp = hp12[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_hp)) + 1]
        counts = np.diff(np.r_[starts, n_total])
        running[order] = np.arange(n_total) - np.repeat(starts, counts) + 1
        source_id[:] = hp12 * (2**35) + running
        return pa.table(
            {
                "source_id": pa.array(source_id, pa.int64()),
                "ra": pa.array(ra, pa.float64()),
                "dec": pa.array(dec, pa.float64()),
                "pmra": pa.array(pmra, pa.float64()),
                "pmdec": pa.array(pmdec, pa.float64()),
                "phot_g_mean_mag": pa.array(g, pa.float64()),
                "bp_rp": pa.array(bp_rp, pa.float64()),
                "ref_epoch": pa.array(np.full(n_total, REF_EPOCH), pa.float64()),
                "kind": pa.array(kind.tolist(), pa.string()),
                "in_catalog": pa.array(kind != KIND_APPEARED, pa.bool_()),
                "rendered": pa.array(kind != KIND_VANISHED, pa.bool_()),
            }
        )

    def _in_fields(self, ra: np.ndarray, dec: np.ndarray, margin_deg: float = 0.02) -> np.ndarray:
        """Whether positions fall inside some field's nominal footprint (minus a margin)."""
        w, h = self.survey.footprint_deg
        out = np.zeros(len(ra), dtype=bool)
        for f in self.survey.fields:
            dra = (((ra - f.ra + 180.0) % 360.0) - 180.0) * np.cos(np.radians(dec))
            out |= (np.abs(dra) < w / 2 - margin_deg) & (np.abs(dec - f.dec) < h / 2 - margin_deg)
        return out

    def _inside_fields(self, rng: np.random.Generator, field_index: np.ndarray) -> tuple:
        """Random positions well inside the given fields (central 80 %)."""
        w, h = self.survey.footprint_deg
        ras, decs = [], []
        for i in field_index:
            f = self.survey.fields[int(i)]
            d = f.dec + rng.uniform(-0.4, 0.4) * h
            r = f.ra + rng.uniform(-0.4, 0.4) * w / math.cos(math.radians(d))
            ras.append(r % 360.0)
            decs.append(d)
        return np.array(ras), np.array(decs)

    def catalog(self) -> pa.Table:
        """The reference catalog: Gaia-like columns of every catalogued star."""
        t = self.objects
        t = t.filter(t.column("in_catalog"))
        return t.select(
            ["source_id", "ra", "dec", "pmra", "pmdec", "phot_g_mean_mag", "bp_rp", "ref_epoch"]
        ).sort_by("source_id")

    @functools.cached_property
    def variables(self) -> pa.Table:
        """Periodic variables: ``source_id, var_type, period_d, amplitude_mag, epoch_mjd``."""
        rng = self.survey.rng(3)
        t = self.objects
        ids = np.asarray(t.column("source_id"))[np.asarray(t.column("kind")) == KIND_VARIABLE]
        n = len(ids)
        var_type = np.where(rng.uniform(0, 1, n) < 0.5, "rrlyrae", "sinusoid")
        period = np.where(
            var_type == "rrlyrae",
            rng.uniform(0.45, 0.75, n),
            10 ** rng.uniform(math.log10(0.2), math.log10(8.0), n),
        )
        amp = np.where(var_type == "rrlyrae", rng.uniform(0.5, 1.0, n), rng.uniform(0.15, 0.6, n))
        epoch = self.survey.exposures[0].mjd + rng.uniform(0.0, 1.0, n) * period
        return pa.table(
            {
                "source_id": pa.array(ids, pa.int64()),
                "var_type": pa.array(var_type.tolist(), pa.string()),
                "period_d": pa.array(period, pa.float64()),
                "amplitude_mag": pa.array(amp, pa.float64()),
                "epoch_mjd": pa.array(epoch, pa.float64()),
            }
        )

    @functools.cached_property
    def transient(self) -> dict | None:
        """The fading transient: position (deg), t0 (MJD UTC), peak mags, decline index."""
        if not self.config.transient:
            return None
        rng = self.survey.rng(4)
        fi = np.array([rng.integers(0, len(self.survey.fields))])
        ra, dec = self._inside_fields(rng, fi)
        t0 = self.survey.exposures[0].mjd + rng.uniform(0.5, 2.0)
        peak_r = rng.uniform(16.5, 17.5)
        return {
            "object_id": 1,
            "ra": float(ra[0]),
            "dec": float(dec[0]),
            "t0_mjd": float(t0),
            "alpha": 1.2,
            "peak_mag": {"zg": peak_r - 0.2, "zr": peak_r, "zi": peak_r + 0.15},
        }
