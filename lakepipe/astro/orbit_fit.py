"""Orbit determination: initial orbit, least-squares differential correction, replicas.

The fitted quantity is the heliocentric state (x, y, z in au; vx, vy, vz in au/day; ICRS
equatorial axes) at a chosen epoch (``epoch_mjd_tdb``, MJD in TDB). Predictions are the
project's dynamics: N-body propagation under the Sun and the chosen DE421 perturbers with
light-time corrected, topocentric astrometric positions (:mod:`lakepipe.astro.observe`).

Method (Milani & Gronchi 2010, *Theory of Orbit Determination*, ch. 5):

1. Initial orbit by Gauss's method on three observations spread over the arc
   (:mod:`lakepipe.astro.iod`), each root moved to the epoch; the roots are corrected
   in order of their weighted residuals until one fits.
2. Differential correction: residuals xi = observed - predicted in (RA*cos(Dec), Dec),
   arcsec, weights W = diag(1/sigma^2); design matrix B = d(prediction)/d(state) from the
   full model by central finite differences, or from the variational state transition
   matrix of the N-body integrator (:meth:`DynamicsModel.predict_with_partials`); normal
   matrix C = B^T W B (column-scaled to be dimensionless), correction dx = C^-1 B^T W xi,
   with Levenberg-Marquardt damping while the weighted chi^2 does not decrease. The
   covariance of the state is Gamma = C^-1.
3. Outlier rejection after Carpino, Milani & Chesley 2003 (Icarus 166, 248, "Error
   statistics of asteroid optical astrometric observations", sec. 3): each observation's
   chi^2_i = xi_i^T Gamma_xi^-1 xi_i with the residual covariance Gamma_xi = W_i^-1 -/+
   B_i Gamma B_i^T (minus for observations in the fit, plus for excluded ones); an
   observation in the fit with chi^2_i > ``chi2_reject`` (8) is rejected (per pass only
   those within a factor 4 of the worst, which inflates its neighbours), excluded ones
   with chi^2_i < ``chi2_recover`` (7) come back; fit and select alternate until the
   selection is stable.

Replicas (:func:`sample_replicas`) are draws from the linearised posterior N(x, Gamma).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import pyarrow as pa

from lakepipe.astro.iod import gauss_iod
from lakepipe.astro.kepler import propagate_kepler, propagate_kepler_each
from lakepipe.errors import OrbitFitError

__all__ = [
    "DEFAULT_PERTURBERS",
    "DynamicsModel",
    "ObservationArrays",
    "OrbitFit",
    "OrbitFitError",
    "fit_orbit",
    "initial_orbits",
    "sample_replicas",
]

DEFAULT_PERTURBERS = ("earth", "mars", "jupiter", "saturn")
ARCSEC_PER_RAD = 180.0 / math.pi * 3600.0
MJD_TO_JD = 2400000.5


class Predictor(Protocol):
    """What the fit needs from the dynamics (see :class:`DynamicsModel`)."""

    def predict(
        self, states: np.ndarray, epoch_jd_tdb: float, mjd_utc: np.ndarray, obs_code: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def propagate(
        self, states: np.ndarray, epoch_jd_tdb: float, targets_jd_tdb: np.ndarray
    ) -> np.ndarray: ...

    def observer_position(self, mjd_utc: np.ndarray, obs_code: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class DynamicsModel:
    """The project's dynamics behind the fit: N-body + light-time + topocentric observers.

    ``perturbers`` are DE421 body names (``earth``, ``mars``, ``jupiter``, ...).
    ``partials`` selects the design matrix: ``fd`` central differences of the full model
    (13 states integrated together; exact light-time partials) or ``stm`` the variational
    state transition matrix. They agree to ~5e-5 relative (the dropped d tau/d x term is
    of order v/c); ``fd`` is the default because it ran ~3x faster here. Predictions
    are :func:`lakepipe.astro.observe.ephemeris`'s: one N-body propagation of all states to
    the TDB of every observation, then its light-time corrected astrometric geometry.
    Observer and Sun positions depend only on the observation times, so they are computed
    once per (code, times) and reused across the fit's iterations.
    """

    perturbers: tuple[str, ...] = DEFAULT_PERTURBERS
    partials: Literal["fd", "stm"] = "fd"
    _sites: dict = field(default_factory=dict, compare=False, repr=False)

    def _site(self, code: str, mjd_utc: np.ndarray) -> tuple[np.ndarray, ...]:
        """(observer barycentric, Sun position, Sun velocity, TDB JD) at the times; cached."""
        key = (code, mjd_utc.tobytes())
        if key not in self._sites:
            from lakepipe.astro import ephem, observatories

            jd1, jd2 = observatories.utc_to_tdb_jd(mjd_utc)
            obs_bary, _ = observatories.observer_state(code, mjd_utc, heliocentric=False)
            sun_p, sun_v = ephem.body_state("sun", jd1, jd2)
            if len(self._sites) > 64:
                self._sites.clear()
            self._sites[key] = (obs_bary, sun_p, sun_v, jd1 + jd2)
        return self._sites[key]

    def predict(
        self,
        states: np.ndarray,
        epoch_jd_tdb: float,
        mjd_utc: np.ndarray,
        obs_code: np.ndarray,
        *,
        two_body: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Astrometric (RA, Dec) in degrees of ``states`` (N, 6) at each observation: (N, M).

        ``two_body`` propagates with the Sun alone (universal variables): cheap and safe
        for scoring trial orbits, some of which (spurious Gauss roots) graze the Earth and
        would make the N-body integrator crawl.
        """
        from lakepipe.astro.observe import apparent_geometry

        states = np.atleast_2d(np.asarray(states, dtype=np.float64))
        mjd_utc = np.ascontiguousarray(mjd_utc, dtype=np.float64)
        codes = np.asarray(obs_code).astype(str)
        groups = {str(c): np.flatnonzero(codes == c) for c in np.unique(codes)}
        sites = {c: self._site(c, mjd_utc[idx]) for c, idx in groups.items()}
        jd_tdb = np.empty(mjd_utc.size)
        for c, idx in groups.items():
            jd_tdb[idx] = sites[c][3]
        if two_body:
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                helio_t = propagate_kepler(states, jd_tdb - epoch_jd_tdb)
        else:
            helio_t = self.propagate(states, epoch_jd_tdb, jd_tdb)
        ra = np.empty((states.shape[0], mjd_utc.size))
        dec = np.empty_like(ra)
        for c, idx in groups.items():
            obs_bary, sun_p, sun_v, _ = sites[c]
            geo = apparent_geometry(np.ascontiguousarray(helio_t[:, idx]), obs_bary, sun_p, sun_v)
            ra[:, idx], dec[:, idx] = geo["ra_deg"], geo["dec_deg"]
        return ra, dec

    def predict_with_partials(
        self, state: np.ndarray, epoch_jd_tdb: float, mjd_utc: np.ndarray, obs_code: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(RA, Dec) in degrees of one state at each observation and their partials.

        Returns ``ra (M,)``, ``dec (M,)`` and the derivatives of RA*cos(Dec) and Dec (arcsec)
        with respect to the state at the epoch, ``(M, 6)`` each. The partials chain the
        variational STM of :func:`lakepipe.astro.nbody.propagate_with_stm` with the
        derivatives of the direction of the topocentric vector rho (Milani & Gronchi 2010
        sec. 5.6): d(alpha cos delta)/d rho = (-sin a, cos a, 0)/|rho|,
        d delta/d rho = (-sin d cos a, -sin d sin a, cos d)/|rho|, with the retarded position
        r(t - tau) ~ r(t) - tau v(t) (the partial of tau itself, of order v/c, is dropped).
        """
        from lakepipe.astro.nbody import propagate_with_stm
        from lakepipe.astro.observe import apparent_geometry

        mjd_utc = np.ascontiguousarray(mjd_utc, dtype=np.float64)
        codes = np.asarray(obs_code).astype(str)
        groups = {str(c): np.flatnonzero(codes == c) for c in np.unique(codes)}
        sites = {c: self._site(c, mjd_utc[idx]) for c, idx in groups.items()}
        jd_tdb = np.empty(mjd_utc.size)
        for c, idx in groups.items():
            jd_tdb[idx] = sites[c][3]
        states_t, stm = propagate_with_stm(
            np.asarray(state, dtype=np.float64), epoch_jd_tdb, jd_tdb, list(self.perturbers)
        )
        m = mjd_utc.size
        ra, dec, tau, delta = (np.empty(m) for _ in range(4))
        for c, idx in groups.items():
            obs_bary, sun_p, sun_v, _ = sites[c]
            geo = apparent_geometry(states_t[None, idx], obs_bary, sun_p, sun_v)
            ra[idx], dec[idx] = geo["ra_deg"][0], geo["dec_deg"][0]
            tau[idx], delta[idx] = geo["light_time_d"][0], geo["delta_au"][0]
        a, d = np.radians(ra), np.radians(dec)
        d_rho = stm[:, :3, :] - tau[:, None, None] * stm[:, 3:, :]  # (M, 3, 6)
        g_ra = np.stack([-np.sin(a), np.cos(a), np.zeros(m)], axis=1) / delta[:, None]
        g_dec = np.stack([-np.sin(d) * np.cos(a), -np.sin(d) * np.sin(a), np.cos(d)], axis=1)
        g_dec /= delta[:, None]
        p_ra = np.einsum("mi,mij->mj", g_ra, d_rho) * ARCSEC_PER_RAD
        p_dec = np.einsum("mi,mij->mj", g_dec, d_rho) * ARCSEC_PER_RAD
        return ra, dec, p_ra, p_dec

    def propagate(
        self, states: np.ndarray, epoch_jd_tdb: float, targets_jd_tdb: np.ndarray
    ) -> np.ndarray:
        """States (N, 6) at ``epoch_jd_tdb`` propagated to each target: (N, T, 6)."""
        from lakepipe.astro.nbody import propagate

        return propagate(
            np.atleast_2d(states),
            epoch_jd_tdb,
            np.atleast_1d(np.asarray(targets_jd_tdb, dtype=np.float64)),
            list(self.perturbers),
        )

    def observer_position(self, mjd_utc: np.ndarray, obs_code: np.ndarray) -> np.ndarray:
        """Heliocentric ICRS observer positions (M, 3), au."""
        mjd_utc = np.ascontiguousarray(mjd_utc, dtype=np.float64)
        codes = np.asarray(obs_code).astype(str)
        out = np.empty((mjd_utc.size, 3))
        for code in np.unique(codes):
            idx = np.flatnonzero(codes == code)
            obs_bary, sun_p, _, _ = self._site(str(code), mjd_utc[idx])
            out[idx] = obs_bary - sun_p
        return out


def utc_mjd_to_tdb_jd(mjd_utc: np.ndarray | float) -> np.ndarray:
    """TDB Julian dates of UTC MJDs (astropy, offline)."""
    from lakepipe.astro.observatories import utc_to_tdb_jd

    jd1, jd2 = utc_to_tdb_jd(np.atleast_1d(np.asarray(mjd_utc, dtype=np.float64)))
    return jd1 + jd2


@dataclass(frozen=True)
class ObservationArrays:
    """Astrometry as arrays: what the fit consumes (see ``astrometry.ASTROMETRY_SCHEMA``)."""

    mjd_utc: np.ndarray
    ra_deg: np.ndarray
    dec_deg: np.ndarray
    sigma_ra_arcsec: np.ndarray  # of RA*cos(Dec)
    sigma_dec_arcsec: np.ndarray
    obs_code: np.ndarray
    designation: str = ""

    @classmethod
    def from_table(cls, table: pa.Table) -> ObservationArrays:
        """From the normalised astrometry table, sorted by time."""
        order = np.argsort(np.asarray(table.column("mjd")), kind="stable")

        def col(name: str) -> np.ndarray:
            return np.asarray(table.column(name).to_numpy(zero_copy_only=False))[order]

        designations = table.column("designation").unique().to_pylist()
        if len(designations) > 1:
            shown = ", ".join(map(str, designations[:5]))
            raise OrbitFitError(
                f"the astrometry holds {len(designations)} objects ({shown}); fit one "
                "designation at a time (filter the table on its designation column)"
            )
        return cls(
            mjd_utc=col("mjd").astype(np.float64),
            ra_deg=col("ra").astype(np.float64),
            dec_deg=col("dec").astype(np.float64),
            sigma_ra_arcsec=col("sigma_ra_arcsec").astype(np.float64),
            sigma_dec_arcsec=col("sigma_dec_arcsec").astype(np.float64),
            obs_code=col("obs_code").astype(str),
            designation=designations[0] if designations else "",
        )

    def __len__(self) -> int:
        return int(self.mjd_utc.size)


@dataclass
class OrbitFit:
    """Result of :func:`fit_orbit`.

    ``state`` is heliocentric ICRS (au, au/day) at ``epoch_mjd_tdb``; ``covariance`` its
    6x6 covariance in the same units; residuals are observed - predicted in arcsec
    (``dra_cosdec_arcsec`` is Delta RA * cos(Dec)); ``chi2`` the weighted sum of squared
    residuals of the observations used; ``rms_arcsec`` the RMS over both coordinates of the
    used residuals; ``obs_chi2`` Carpino et al.'s per-observation chi^2.
    """

    designation: str
    epoch_mjd_tdb: float
    state: np.ndarray
    covariance: np.ndarray
    chi2: float
    rms_arcsec: float
    n_used: int
    n_rejected: int
    iterations: int
    converged: bool
    perturbers: tuple[str, ...]
    mjd_utc: np.ndarray
    obs_code: np.ndarray
    dra_cosdec_arcsec: np.ndarray
    ddec_arcsec: np.ndarray
    obs_chi2: np.ndarray
    used: np.ndarray
    elements: dict[str, float] = field(default_factory=dict)

    @property
    def epoch_jd_tdb(self) -> float:
        """The epoch as a TDB Julian date."""
        return self.epoch_mjd_tdb + MJD_TO_JD

    @property
    def arc_days(self) -> float:
        """Time span of the observations used (days)."""
        t = self.mjd_utc[self.used]
        return float(t.max() - t.min()) if t.size else 0.0

    def sigma(self) -> np.ndarray:
        """1-sigma uncertainties of the six state components."""
        return np.sqrt(np.diag(self.covariance))

    def predict_sky(
        self,
        mjd_utc: np.ndarray,
        obs_code: str = "500",
        model: Predictor | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted (RA, Dec) in degrees at UTC MJDs and their linearised covariance.

        Returns ``ra (T,)``, ``dec (T,)`` and ``cov (T, 2, 2)`` in arcsec^2 of
        (RA*cos(Dec), Dec): B Gamma B^T with B the partials of the prediction with respect
        to the state at the epoch (linear propagation of the fit's covariance).
        """
        model = model or DynamicsModel(self.perturbers)
        mjd = np.atleast_1d(np.asarray(mjd_utc, dtype=np.float64))
        codes = np.full(mjd.size, obs_code)
        ra, dec = model.predict(self.state, self.epoch_jd_tdb, mjd, codes)
        ones = np.ones(mjd.size)
        at = ObservationArrays(mjd, ra[0], dec[0], ones, ones, codes)
        _, design, _ = _design(model, self.state, self.epoch_jd_tdb, at)
        b = design.reshape(mjd.size, 2, 6)
        cov = np.einsum("tik,kl,tjl->tij", b, self.covariance, b)
        return ra[0], dec[0], cov

    def residuals_table(self) -> pa.Table:
        """One row per observation: time, code, residuals (arcsec), chi^2, used flag."""
        return pa.table(
            {
                "designation": pa.array([self.designation] * self.mjd_utc.size, pa.string()),
                "mjd": pa.array(self.mjd_utc),
                "obs_code": pa.array(self.obs_code.astype(str).tolist(), pa.string()),
                "dra_cosdec_arcsec": pa.array(self.dra_cosdec_arcsec),
                "ddec_arcsec": pa.array(self.ddec_arcsec),
                "chi2": pa.array(self.obs_chi2),
                "used": pa.array(self.used),
            }
        )

    def to_row(self) -> dict[str, object]:
        """A flat record for the ``orbits`` table (state, elements, covariance, statistics)."""
        row: dict[str, object] = {
            "designation": self.designation,
            "epoch_mjd_tdb": self.epoch_mjd_tdb,
            "x_au": float(self.state[0]),
            "y_au": float(self.state[1]),
            "z_au": float(self.state[2]),
            "vx_au_d": float(self.state[3]),
            "vy_au_d": float(self.state[4]),
            "vz_au_d": float(self.state[5]),
            "covariance": [float(v) for v in self.covariance.ravel()],
            "rms_arcsec": self.rms_arcsec,
            "chi2": self.chi2,
            "n_used": self.n_used,
            "n_rejected": self.n_rejected,
            "arc_days": self.arc_days,
            "converged": self.converged,
            "perturbers": ",".join(self.perturbers),
        }
        row.update(self.elements)
        return row


# --------------------------------------------------------------------------- helpers


def _residuals(
    obs: ObservationArrays, ra_pred: np.ndarray, dec_pred: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(Delta RA * cos(Dec), Delta Dec) in arcsec, observed - predicted, with RA wrapped."""
    dra = (obs.ra_deg - ra_pred + 180.0) % 360.0 - 180.0
    return dra * np.cos(np.radians(obs.dec_deg)) * 3600.0, (obs.dec_deg - dec_pred) * 3600.0


# Finite-difference steps of the state components (au, au/day): large enough to lift the
# partials above the propagator's round-off, small enough to stay linear.
_FD_STEP = np.array([1e-7, 1e-7, 1e-7, 1e-9, 1e-9, 1e-9])


def _design(
    model: Predictor, state: np.ndarray, epoch_jd: float, obs: ObservationArrays
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nominal residuals (2M,) and the design matrix d(prediction)/d(state) (2M, 6), arcsec.

    From the model's variational partials when it asks for them (``partials="stm"``),
    else central differences of the full model, all 13 states in one vectorised call.
    """
    m = len(obs)
    if getattr(model, "partials", "fd") == "stm":
        ra0, dec0, p_ra, p_dec = model.predict_with_partials(
            state, epoch_jd, obs.mjd_utc, obs.obs_code
        )
        dra0, ddec0 = _residuals(obs, ra0, dec0)
        design = np.empty((2 * m, 6))
        design[0::2], design[1::2] = p_ra, p_dec
        xi = np.empty(2 * m)
        xi[0::2], xi[1::2] = dra0, ddec0
        return xi, design, np.stack([dra0, ddec0], axis=1)
    states = np.repeat(state[None, :], 13, axis=0)
    for k in range(6):
        states[1 + 2 * k, k] += _FD_STEP[k]
        states[2 + 2 * k, k] -= _FD_STEP[k]
    ra, dec = model.predict(states, epoch_jd, obs.mjd_utc, obs.obs_code)
    dra0, ddec0 = _residuals(obs, ra[0], dec[0])
    cosd = np.cos(np.radians(obs.dec_deg))
    design = np.empty((2 * m, 6))
    for k in range(6):
        dra = (ra[1 + 2 * k] - ra[2 + 2 * k] + 180.0) % 360.0 - 180.0
        design[0::2, k] = dra * cosd * 3600.0 / (2 * _FD_STEP[k])
        design[1::2, k] = (dec[1 + 2 * k] - dec[2 + 2 * k]) * 3600.0 / (2 * _FD_STEP[k])
    xi = np.empty(2 * m)
    xi[0::2], xi[1::2] = dra0, ddec0
    return xi, design, np.stack([dra0, ddec0], axis=1)


def _weights(obs: ObservationArrays) -> np.ndarray:
    w = np.empty(2 * len(obs))
    w[0::2] = 1.0 / obs.sigma_ra_arcsec**2
    w[1::2] = 1.0 / obs.sigma_dec_arcsec**2
    return w


def _solve_normal(design: np.ndarray, w: np.ndarray, xi: np.ndarray, damping: float = 0.0):
    """(correction, covariance, condition number) of the weighted normal equations.

    Columns are scaled to unit norm first (Jacobi preconditioning) so that the condition
    number measures the geometry, not the units of position vs velocity.
    """
    c = design.T @ (w[:, None] * design)
    b = design.T @ (w * xi)
    scale = np.sqrt(np.diag(c))
    if np.any(scale == 0) or not np.all(np.isfinite(scale)):
        return None, None, math.inf
    cs = c / np.outer(scale, scale)
    cond = float(np.linalg.cond(cs))
    if not np.isfinite(cond) or cond > 1e15:
        return None, None, cond
    gamma_s = np.linalg.inv(cs)
    damped = cs + damping * np.diag(np.diag(cs)) if damping else cs
    dx = np.linalg.solve(damped, b / scale) / scale
    gamma = gamma_s / np.outer(scale, scale)
    return dx, 0.5 * (gamma + gamma.T), cond


def _obs_chi2(
    xi2: np.ndarray, design: np.ndarray, gamma: np.ndarray, obs: ObservationArrays, used: np.ndarray
) -> np.ndarray:
    """Carpino et al. (2003) per-observation chi^2 with the residual covariance (2x2)."""
    m = len(obs)
    out = np.empty(m)
    b = design.reshape(m, 2, 6)
    proj = np.einsum("mik,kl,mjl->mij", b, gamma, b)
    wi = np.zeros((m, 2, 2))
    wi[:, 0, 0] = obs.sigma_ra_arcsec**2
    wi[:, 1, 1] = obs.sigma_dec_arcsec**2
    cov = np.where(used[:, None, None], wi - proj, wi + proj)
    for i in range(m):
        ci = cov[i]
        if np.linalg.det(ci) <= 1e-12 * np.linalg.det(wi[i]):
            ci = wi[i]  # residual fully absorbed by the fit: fall back to the a-priori weight
        out[i] = float(xi2[i] @ np.linalg.solve(ci, xi2[i]))
    return out


# --------------------------------------------------------------------------- main entry


def _triplets(t: np.ndarray) -> list[tuple[int, int, int]]:
    """Observation triplets for Gauss: ends and middle first, then shrinking spans."""
    n = t.size
    mid_t = 0.5 * (t[0] + t[-1])
    candidates: list[tuple[int, int, int]] = []
    for lo, hi in ((0, n - 1), (0, (2 * n) // 3), (n // 3, n - 1), (0, n // 2), (n // 2, n - 1)):
        if hi - lo < 2:
            continue
        mid_target = 0.5 * (t[lo] + t[hi]) if (lo, hi) != (0, n - 1) else mid_t
        inner = np.arange(lo + 1, hi)
        j = int(inner[np.argmin(np.abs(t[inner] - mid_target))])
        if t[j] - t[lo] > 0 and t[hi] - t[j] > 0 and (lo, j, hi) not in candidates:
            candidates.append((lo, j, hi))
    return candidates


def initial_orbits(
    obs: ObservationArrays,
    epoch_mjd_tdb: float,
    model: Predictor,
    max_candidates: int = 4,
    good_score: float = 10.0,
) -> list[tuple[np.ndarray, float]]:
    """Candidate initial states at the epoch by Gauss's method, best first.

    Every root of observation triplets (ends and middle first) is moved to the epoch and
    scored by the weighted RMS of all residuals (two-body motion with light time: the
    scores only rank the starts); near-duplicates are dropped. Triplets stop once a
    candidate scores below ``good_score`` (RMS in sigmas).
    Returns up to ``max_candidates`` (state, weighted RMS) pairs.
    """
    t_tdb = utc_mjd_to_tdb_jd(obs.mjd_utc)
    observer = model.observer_position(obs.mjd_utc, obs.obs_code)
    epoch_jd = epoch_mjd_tdb + MJD_TO_JD
    w = _weights(obs)
    candidates: list[tuple[np.ndarray, float]] = []
    for i, j, k in _triplets(t_tdb):
        idx = [i, j, k]
        # spurious roots can be hyperbolic or degenerate; they are filtered by finiteness
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            sols = gauss_iod(t_tdb[idx], obs.ra_deg[idx], obs.dec_deg[idx], observer[idx])
            if not sols:
                continue
            # to the epoch by two-body motion: days of planetary perturbations are far
            # below the accuracy of an initial orbit; the correction uses the full model
            starts = np.array([s.state for s in sols])
            at_epoch = propagate_kepler_each(starts, np.array([epoch_jd - s.t2_emit for s in sols]))
        ok = np.all(np.isfinite(at_epoch), axis=1) & (np.linalg.norm(at_epoch[:, :3], axis=1) < 100)
        if not ok.any():
            continue
        at_epoch = at_epoch[ok]
        if isinstance(model, DynamicsModel):
            ra, dec = model.predict(at_epoch, epoch_jd, obs.mjd_utc, obs.obs_code, two_body=True)
        else:
            ra, dec = model.predict(at_epoch, epoch_jd, obs.mjd_utc, obs.obs_code)
        for n in range(at_epoch.shape[0]):
            dra, ddec = _residuals(obs, ra[n], dec[n])
            xi = np.empty(2 * len(obs))
            xi[0::2], xi[1::2] = dra, ddec
            score = float(np.sqrt(np.mean(w * xi**2)))
            if not np.isfinite(score):
                continue
            dup = any(
                np.linalg.norm(at_epoch[n, :3] - c[0][:3]) < 1e-4 * np.linalg.norm(c[0][:3])
                for c in candidates
            )
            if not dup:
                candidates.append((at_epoch[n], score))
        if candidates and min(c[1] for c in candidates) < good_score:
            break  # a start this close converges; further triplets are not needed
    if not candidates:
        raise OrbitFitError(
            f"Gauss's method found no orbit for {obs.designation or 'the object'} from "
            f"{len(obs)} observations over {np.ptp(obs.mjd_utc):.2f} days: the lines of "
            "sight are (nearly) coplanar or the arc too short; add observations on other nights"
        )
    candidates.sort(key=lambda c: c[1])
    return candidates[:max_candidates]


def fit_orbit(
    observations: pa.Table | ObservationArrays,
    *,
    epoch_mjd_tdb: float | None = None,
    perturbers: Sequence[str] = DEFAULT_PERTURBERS,
    model: Predictor | None = None,
    initial_state: np.ndarray | None = None,
    reject_outliers: bool = True,
    chi2_reject: float = 8.0,
    chi2_recover: float = 7.0,
    max_iter: int = 25,
    min_arc_days: float = 0.5,
    min_observations: int = 3,
    max_condition: float = 1e13,
    good_fit_chi2: float = 4.0,
) -> OrbitFit:
    """Fit a heliocentric orbit to optical astrometry (see the module docstring).

    Parameters
    ----------
    observations
        The normalised astrometry table (:mod:`lakepipe.astro.astrometry`) of one object.
    epoch_mjd_tdb
        Epoch of the fitted state, MJD (TDB); default the middle of the arc.
    perturbers
        DE421 bodies perturbing the heliocentric two-body motion.
    model
        The dynamics (default :class:`DynamicsModel` with ``perturbers``).
    initial_state
        A starting state at the epoch (skips Gauss's method).
    reject_outliers, chi2_reject, chi2_recover
        Carpino et al. (2003) rejection and recovery thresholds on per-observation chi^2.
    max_iter
        Differential-correction iterations per selection pass.
    min_arc_days, min_observations
        Below these an :class:`OrbitFitError` explains that the arc cannot constrain an orbit.
    max_condition
        Largest condition number accepted for the (column-scaled) normal matrix.
    good_fit_chi2
        Gauss candidates are corrected best first until one reaches a robust chi^2 per
        residual (median-based) below this; otherwise the smallest of all wins.

    Raises
    ------
    OrbitFitError
        Too few observations, too short an arc, no initial orbit, a singular normal matrix,
        or no convergence.
    """
    obs = (
        observations
        if isinstance(observations, ObservationArrays)
        else ObservationArrays.from_table(observations)
    )
    name = obs.designation or "the object"
    n_times = np.unique(obs.mjd_utc).size
    if len(obs) < min_observations or n_times < 3:
        raise OrbitFitError(
            f"{name}: {len(obs)} observations at {n_times} distinct times cannot constrain an "
            f"orbit (need at least {max(min_observations, 3)} at 3 distinct times)"
        )
    arc = float(np.ptp(obs.mjd_utc))
    if arc < min_arc_days:
        raise OrbitFitError(
            f"{name}: the arc spans {arc * 24:.2f} h, shorter than min_arc_days={min_arc_days} "
            "(a short arc leaves the distance unconstrained); add observations from other "
            "nights or lower min_arc_days"
        )
    if np.any(~(obs.sigma_ra_arcsec > 0)) or np.any(~(obs.sigma_dec_arcsec > 0)):
        raise OrbitFitError(f"{name}: every observation needs sigma > 0 arcsec")
    model = model or DynamicsModel(tuple(perturbers))
    perturbers = tuple(getattr(model, "perturbers", perturbers))
    if epoch_mjd_tdb is None:
        mid = 0.5 * (obs.mjd_utc.min() + obs.mjd_utc.max())
        epoch_mjd_tdb = float(utc_mjd_to_tdb_jd(mid)[0] - MJD_TO_JD)
    epoch_jd = epoch_mjd_tdb + MJD_TO_JD
    w = _weights(obs)
    m = len(obs)
    used = np.ones(m, dtype=bool)
    iterations, converged = 0, False
    if initial_state is None:
        # Short arcs admit several local minima (Milani & Gronchi 2010 ch. 8): correct
        # every distinct Gauss candidate and keep the smallest chi^2.
        best = None
        errors = []
        for start, _score in initial_orbits(obs, epoch_mjd_tdb, model):
            try:
                res = _correct(model, start, epoch_jd, obs, w, used, max_iter, max_condition, name)
            except OrbitFitError as exc:
                errors.append(str(exc))
                continue
            iterations += res[5]
            # robust goodness of fit: the median weighted squared residual over its
            # expectation for Gaussian noise (median of chi^2 with 1 dof = 0.4549), so
            # that a few outliers (rejected later) do not disqualify the right minimum
            chi2_c = float(np.median(w * res[2] ** 2)) / 0.4549
            if best is None or chi2_c < best[0]:
                best = (chi2_c, res)
            if chi2_c < good_fit_chi2:
                break  # a statistically acceptable minimum: no need to try the others
        if best is None:
            raise OrbitFitError(errors[0])
        first = best[1]
        state = first[0]
    else:
        first = None
        state = np.asarray(initial_state, dtype=np.float64).copy()

    seen_selections: set[bytes] = set()
    for _pass in range(20):
        if first is not None:  # the winning candidate's correction, all observations in
            state, gamma, xi, design, converged, its = first
            first, its = None, 0
        else:
            state, gamma, xi, design, converged, its = _correct(
                model, state, epoch_jd, obs, w, used, max_iter, max_condition, name
            )
        last_used = used.copy()
        iterations += its
        if not reject_outliers:
            break
        xi2 = xi.reshape(m, 2)
        chi2_i = _obs_chi2(xi2, design, gamma, obs, used)
        new_used = used.copy()
        new_used[~used & (chi2_i < chi2_recover)] = True
        over = used & (chi2_i > chi2_reject)
        if over.any():
            # worst first: an outlier inflates its neighbours' chi^2 too, so only those
            # within a factor 4 of the worst go in this pass; the rest are re-judged
            worst = float(np.max(chi2_i[over]))
            new_used[over & (chi2_i >= 0.25 * worst)] = False
        if new_used.sum() < max(min_observations, 3):
            break  # never reject below what an orbit needs
        key = new_used.tobytes()
        if np.array_equal(new_used, used) or key in seen_selections:
            break
        seen_selections.add(used.tobytes())
        used = new_used

    if reject_outliers and not np.array_equal(used, last_used):
        # the selection changed after the last correction: correct once more without rejection
        state, gamma, xi, design, converged, its = _correct(
            model, state, epoch_jd, obs, w, used, max_iter, max_condition, name
        )
        iterations += its
    sel = np.repeat(used, 2)
    res2 = xi.reshape(m, 2)
    chi2_i = _obs_chi2(res2, design, gamma, obs, used)
    chi2 = float(np.sum(w[sel] * xi[sel] ** 2))
    rms = float(np.sqrt(np.mean(xi[sel] ** 2)))
    fit = OrbitFit(
        designation=obs.designation,
        epoch_mjd_tdb=float(epoch_mjd_tdb),
        state=state,
        covariance=gamma,
        chi2=chi2,
        rms_arcsec=rms,
        n_used=int(used.sum()),
        n_rejected=int((~used).sum()),
        iterations=iterations,
        converged=converged,
        perturbers=perturbers,
        mjd_utc=obs.mjd_utc,
        obs_code=obs.obs_code,
        dra_cosdec_arcsec=res2[:, 0],
        ddec_arcsec=res2[:, 1],
        obs_chi2=chi2_i,
        used=used,
    )
    fit.elements = _elements(state)
    return fit


def _correct(
    model: Predictor,
    state: np.ndarray,
    epoch_jd: float,
    obs: ObservationArrays,
    w: np.ndarray,
    used: np.ndarray,
    max_iter: int,
    max_condition: float,
    name: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool, int]:
    """Damped Gauss-Newton on the observations in ``used``; returns the final linearisation."""
    sel = np.repeat(used, 2)
    xi, design, _ = _design(model, state, epoch_jd, obs)
    chi2 = float(np.sum(w[sel] * xi[sel] ** 2))
    damping = 0.0
    it = 0
    for it in range(1, max_iter + 1):
        dx, gamma, cond = _solve_normal(design[sel], w[sel], xi[sel], damping)
        if dx is None or cond > max_condition:
            raise OrbitFitError(
                f"{name}: the normal matrix is singular (condition number {cond:.2e} > "
                f"{max_condition:.0e}); the observations cannot constrain all six orbital "
                "parameters: extend the arc or add observations"
            )
        trial = state + dx
        try:
            xi_t, design_t, _ = _design(model, trial, epoch_jd, obs)
        except (FloatingPointError, ValueError):
            xi_t = None
        chi2_t = float(np.sum(w[sel] * xi_t[sel] ** 2)) if xi_t is not None else math.inf
        if np.isfinite(chi2_t) and chi2_t <= chi2 * (1 + 1e-9):
            # converged when the step is small against the uncertainty it produced
            # (Milani & Gronchi 2010 sec. 5.2: dx^T C dx small)
            step_norm = float(dx @ np.linalg.solve(gamma, dx)) / 6.0
            state, xi, design, chi2 = trial, xi_t, design_t, chi2_t
            damping = damping / 10.0 if damping > 1e-6 else 0.0
            if step_norm < 1e-6:
                _, gamma, _ = _solve_normal(design[sel], w[sel], xi[sel])
                return state, gamma, xi, design, True, it
        else:
            damping = max(damping * 10.0, 1e-3)
            if damping > 1e8:
                break
    _, gamma, cond = _solve_normal(design[sel], w[sel], xi[sel])
    if gamma is None:
        raise OrbitFitError(f"{name}: the normal matrix is singular (condition {cond:.2e})")
    if chi2 / max(1, sel.sum()) > 1e6:
        raise OrbitFitError(
            f"{name}: differential correction did not converge in {max_iter} iterations "
            f"(chi^2 per residual {chi2 / sel.sum():.3g}); the initial orbit is too far off"
        )
    return state, gamma, xi, design, False, it


def _elements(state: np.ndarray) -> dict[str, float]:
    """Heliocentric osculating ecliptic-J2000 elements of ``state`` (kepler module names)."""
    from lakepipe.astro.kepler import state_to_elements

    return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in state_to_elements(state).items()}


def sample_replicas(
    state: np.ndarray, covariance: np.ndarray, n: int, seed: int, *, include_nominal: bool = False
) -> np.ndarray:
    """``n`` states drawn from N(state, covariance), seeded; (n, 6).

    Uses the symmetric eigen-decomposition so a covariance that is positive semi-definite
    within round-off still samples; with ``include_nominal`` row 0 is the nominal state.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 (got {n})")
    cov = 0.5 * (np.asarray(covariance, float) + np.asarray(covariance, float).T)
    vals, vecs = np.linalg.eigh(cov)
    if vals.min() < -1e-9 * max(vals.max(), 0.0):
        raise OrbitFitError(
            f"covariance is not positive semi-definite (eigenvalue {vals.min():.3g})"
        )
    root = vecs * np.sqrt(np.clip(vals, 0.0, None))
    rng = np.random.default_rng(seed)
    draws = np.asarray(state, float)[None, :] + rng.standard_normal((n, 6)) @ root.T
    if include_nominal:
        draws[0] = state
    return draws
