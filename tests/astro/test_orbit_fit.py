"""Orbit determination against simulated truth.

Truth: a near-Earth orbit propagated with the project's dynamics (N-body with DE421
perturbers, light time, topocentric ZTF site I41); observations are its predicted
positions plus seeded Gaussian noise of known sigma. The fit must recover the truth within
its own covariance, and the truth 30 days after the arc must lie in the predicted 3-sigma
ellipse.
"""

from __future__ import annotations

import numpy as np
import pytest

from lakepipe.astro.astrometry import make_astrometry, parse_ades_psv, write_ades_psv
from lakepipe.astro.iod import C_AU_PER_DAY, gauss_iod
from lakepipe.astro.kepler import elements_to_state, propagate_kepler, state_to_elements
from lakepipe.astro.observatories import observer_state, utc_to_tdb_jd
from lakepipe.astro.orbit_fit import (
    DynamicsModel,
    ObservationArrays,
    OrbitFitError,
    _design,
    fit_orbit,
    sample_replicas,
)

EPOCH_MJD_TDB = 60000.0
EPOCH_JD = EPOCH_MJD_TDB + 2400000.5
# chi^2 quantiles (scipy.stats.chi2.ppf): 6 dof at 0.999, 2 dof at the 3-sigma level 0.9973
CHI2_6_999 = 22.458
CHI2_2_3SIGMA = 11.829


def _truth_state() -> np.ndarray:
    """An Apollo-like NEO near opposition in late February 2023 (ecliptic J2000 elements)."""
    return elements_to_state(1.45, 0.32, 11.0, 330.0, 120.0, 8.5)[0]


MODEL = DynamicsModel(("earth", "mars", "jupiter", "saturn"))


def _simulate(
    truth: np.ndarray, mjd: np.ndarray, codes: np.ndarray, sigma_arcsec: float, seed: int
) -> tuple[ObservationArrays, np.ndarray, np.ndarray]:
    ra, dec = MODEL.predict(truth, EPOCH_JD, mjd, codes)
    rng = np.random.default_rng(seed)
    n = mjd.size
    dra = rng.normal(0.0, sigma_arcsec, n) / 3600.0 / np.cos(np.radians(dec[0]))
    ddec = rng.normal(0.0, sigma_arcsec, n) / 3600.0
    obs = ObservationArrays(
        mjd_utc=mjd,
        ra_deg=(ra[0] + dra) % 360.0,
        dec_deg=dec[0] + ddec,
        sigma_ra_arcsec=np.full(n, sigma_arcsec),
        sigma_dec_arcsec=np.full(n, sigma_arcsec),
        obs_code=codes,
        designation="SIM0001",
    )
    return obs, ra[0], dec[0]


def _twelve_over_ten_nights(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """12 observations on 6 of 10 nights (pairs ~30 min apart), mixed I41 and F51."""
    rng = np.random.default_rng(seed)
    nights = np.sort(rng.choice(np.arange(10), 6, replace=False))
    nights[0], nights[-1] = 0, 9  # the arc spans the ten nights
    base = EPOCH_MJD_TDB - 5.0 + nights + 0.25
    mjd = np.sort(np.concatenate([base, base + 0.02]))
    codes = np.where(np.arange(12) % 3 == 2, "F51", "I41")
    return mjd, codes


@pytest.fixture(scope="module")
def nominal_fit():
    truth = _truth_state()
    mjd, codes = _twelve_over_ten_nights(seed=3)
    obs, _, _ = _simulate(truth, mjd, codes, sigma_arcsec=0.3, seed=11)
    return truth, obs, fit_orbit(obs, epoch_mjd_tdb=EPOCH_MJD_TDB, model=MODEL)


def test_gauss_recovers_an_exact_two_body_orbit() -> None:
    # truth: pure two-body motion (kepler.propagate_kepler) seen from I41 with light time;
    # Gauss's method with exact f, g is exact for it
    truth = _truth_state()
    mjd = EPOCH_MJD_TDB + np.array([-4.0, 0.5, 5.0])
    tt = np.sum(utc_to_tdb_jd(mjd), axis=0)
    site = observer_state("I41", mjd)[0]
    te = tt.copy()
    for _ in range(4):  # light-time iteration
        pos = np.array([propagate_kepler(truth, [t - EPOCH_JD])[0, 0, :3] for t in te])
        te = tt - np.linalg.norm(pos - site, axis=1) / C_AU_PER_DAY
    d = pos - site
    ra = np.degrees(np.arctan2(d[:, 1], d[:, 0])) % 360
    dec = np.degrees(np.arcsin(d[:, 2] / np.linalg.norm(d, axis=1)))
    sols = gauss_iod(tt, ra, dec, site)
    assert sols and sols[0].converged
    best = min(sols, key=lambda s: np.linalg.norm(s.rho_au - np.linalg.norm(d, axis=1)))
    assert best.t2_emit == pytest.approx(te[1], abs=1e-9)
    at_t2 = propagate_kepler(truth, [best.t2_emit - EPOCH_JD])[0, 0]
    assert np.linalg.norm(best.state[:3] - at_t2[:3]) < 1e-7  # au (15 km)
    assert np.linalg.norm(best.state[3:] - at_t2[3:]) < 1e-9  # au/day


def test_fit_recovers_truth_within_covariance(nominal_fit) -> None:
    truth, _, fit = nominal_fit
    assert fit.converged
    assert fit.n_used + fit.n_rejected == 12 and fit.n_rejected <= 1
    d = fit.state - truth
    mahalanobis2 = float(d @ np.linalg.solve(fit.covariance, d))
    assert mahalanobis2 < CHI2_6_999  # truth within the 99.9% ellipsoid of the fit
    # the noise was 0.3" per coordinate: the residual RMS must be close to it
    assert 0.15 < fit.rms_arcsec < 0.45
    dof = 2 * fit.n_used - 6
    assert 0.2 * dof < fit.chi2 < 2.5 * dof
    # the position at the epoch is known to far better than 0.01 au from 10 nights
    assert np.linalg.norm(d[:3]) < 0.01
    # covariance: symmetric positive definite
    np.testing.assert_allclose(fit.covariance, fit.covariance.T, rtol=0, atol=1e-30)
    assert np.all(np.linalg.eigvalsh(fit.covariance) > 0)
    # elements are the kepler module's of the fitted state
    el = state_to_elements(fit.state)
    assert fit.elements["a_au"] == pytest.approx(float(el["a_au"][0]))
    assert fit.elements["e"] == pytest.approx(0.32, abs=0.05)


def test_truth_30_days_later_inside_predicted_3sigma_ellipse(nominal_fit) -> None:
    truth, _, fit = nominal_fit
    mjd = np.array([EPOCH_MJD_TDB + 5.0 + 30.0])  # 30 days after the last night
    ra_t, dec_t = MODEL.predict(truth, EPOCH_JD, mjd, np.array(["I41"]))
    ra, dec, cov = fit.predict_sky(mjd, "I41", model=MODEL)
    dra = ((ra_t[0, 0] - ra[0] + 180) % 360 - 180) * np.cos(np.radians(dec[0]))
    xi = np.array([dra, dec_t[0, 0] - dec[0]]) * 3600.0  # truth - prediction, arcsec
    d2 = float(xi @ np.linalg.solve(cov[0], xi))
    assert d2 < CHI2_2_3SIGMA, (xi, np.sqrt(np.diag(cov[0])))
    # and the prediction is informative: the 3-sigma ellipse is smaller than 1 degree
    assert 3 * np.sqrt(np.max(np.linalg.eigvalsh(cov[0]))) < 3600.0


def test_stm_partials_match_finite_differences(nominal_fit) -> None:
    # truth: the variational STM and central differences must give the same design matrix
    # up to the light-time partial the STM path drops (order v/c ~ 1e-4)
    _, obs, fit = nominal_fit
    stm_model = DynamicsModel(MODEL.perturbers, partials="stm")
    xi_fd, b_fd, _ = _design(MODEL, fit.state, EPOCH_JD, obs)
    xi_stm, b_stm, _ = _design(stm_model, fit.state, EPOCH_JD, obs)
    np.testing.assert_allclose(xi_stm, xi_fd, atol=1e-6)  # arcsec
    assert np.max(np.abs(b_stm - b_fd) / np.abs(b_fd).max(axis=0)) < 5e-4
    refit = fit_orbit(obs, epoch_mjd_tdb=EPOCH_MJD_TDB, model=stm_model, initial_state=fit.state)
    assert np.all(np.abs(refit.state - fit.state) < 0.01 * fit.sigma())


def test_outlier_is_rejected_and_fit_unchanged(nominal_fit) -> None:
    truth, obs, fit = nominal_fit
    ra = obs.ra_deg.copy()
    ra[4] += 8.0 / 3600.0 / np.cos(np.radians(obs.dec_deg[4]))  # 8" = 27 sigma off
    bad = ObservationArrays(
        obs.mjd_utc, ra, obs.dec_deg, obs.sigma_ra_arcsec, obs.sigma_dec_arcsec, obs.obs_code
    )
    refit = fit_orbit(bad, epoch_mjd_tdb=EPOCH_MJD_TDB, model=MODEL, initial_state=fit.state)
    assert not refit.used[4]
    assert refit.obs_chi2[4] > 8.0  # Carpino et al. 2003 rejection threshold
    assert refit.dra_cosdec_arcsec[4] == pytest.approx(8.0, abs=1.0)
    d = refit.state - truth
    assert float(d @ np.linalg.solve(refit.covariance, d)) < CHI2_6_999
    table = refit.residuals_table()
    assert table.num_rows == 12 and table.column("used").to_pylist()[4] is False
    row = refit.to_row()
    assert row["n_rejected"] == refit.n_rejected >= 1
    assert len(row["covariance"]) == 36


@pytest.mark.parametrize(
    ("mjd", "pattern"),
    [
        (np.array([60000.1, 60001.1]), r"2 observations at 2 distinct times cannot constrain"),
        (np.array([60000.1, 60000.1, 60000.1, 60001.2]), r"at 2 distinct times"),
        (np.array([60000.10, 60000.11, 60000.12, 60000.13]), r"the arc spans 0\.72 h"),
    ],
)
def test_unconstrained_arcs_raise(mjd: np.ndarray, pattern: str) -> None:
    n = mjd.size
    obs = ObservationArrays(
        mjd, np.linspace(150, 150.1, n), np.full(n, 2.0), np.ones(n), np.ones(n),
        np.array(["I41"] * n), "SHORT",
    )  # fmt: skip
    with pytest.raises(OrbitFitError, match=pattern) as info:
        fit_orbit(obs, model=MODEL)
    assert info.value.exit_code == 2


def test_replicas_are_seeded_draws_from_the_covariance() -> None:
    rng = np.random.default_rng(5)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T * 1e-10
    state = _truth_state()
    r1 = sample_replicas(state, cov, 20000, seed=1)
    r2 = sample_replicas(state, cov, 20000, seed=1)
    r3 = sample_replicas(state, cov, 20000, seed=2)
    assert r1.shape == (20000, 6)
    np.testing.assert_array_equal(r1, r2)
    assert not np.array_equal(r1, r3)
    # sample moments: mean within 5 standard errors, covariance within 5%
    se = np.sqrt(np.diag(cov) / 20000)
    assert np.all(np.abs(r1.mean(axis=0) - state) < 5 * se)
    emp = np.cov(r1.T)
    assert np.max(np.abs(emp - cov) / np.sqrt(np.outer(np.diag(cov), np.diag(cov)))) < 0.05
    r4 = sample_replicas(state, cov, 3, seed=1, include_nominal=True)
    np.testing.assert_array_equal(r4[0], state)
    with pytest.raises(OrbitFitError, match="not positive semi-definite"):
        sample_replicas(state, -cov, 3, seed=1)


def test_fit_from_an_ades_file(nominal_fit, tmp_path) -> None:
    # the same observations written as ADES PSV and read back fit to the same orbit
    _, obs, fit = nominal_fit
    table = make_astrometry(
        designation="SIM0001", mjd=obs.mjd_utc, ra=obs.ra_deg, dec=obs.dec_deg,
        obs_code=obs.obs_code.tolist(), sigma_ra_arcsec=obs.sigma_ra_arcsec,
        sigma_dec_arcsec=obs.sigma_dec_arcsec,
    )  # fmt: skip
    back = parse_ades_psv(write_ades_psv(table, tmp_path / "sim.psv"))
    refit = fit_orbit(back, epoch_mjd_tdb=EPOCH_MJD_TDB, model=MODEL, initial_state=fit.state)
    assert refit.designation == "SIM0001"
    # ADES rounding (1 ms, 1e-8 deg) moves the solution by far less than its uncertainty
    assert np.all(np.abs(refit.state - fit.state) < 0.05 * fit.sigma())


def test_minutes_long_arc_gives_a_singular_normal_matrix() -> None:
    # truth: four observations within 45 minutes fix a direction and a rate, not a
    # distance; with the arc-length guard off the normal matrix itself must refuse
    mjd = EPOCH_MJD_TDB + np.array([0.0, 0.01, 0.02, 0.03])
    obs, _, _ = _simulate(_truth_state(), mjd, np.array(["I41"] * 4), sigma_arcsec=0.3, seed=1)
    with pytest.raises(OrbitFitError, match=r"normal matrix is singular \(condition number"):
        fit_orbit(obs, epoch_mjd_tdb=EPOCH_MJD_TDB, model=MODEL, min_arc_days=0.0)


def test_mixed_designations_are_refused() -> None:
    table = make_astrometry(
        designation=["A1", "B2", "A1"], mjd=[60000.1, 60001.1, 60002.1], ra=[1.0, 2.0, 3.0],
        dec=[0.0, 0.0, 0.0], obs_code="I41",
    )  # fmt: skip
    with pytest.raises(OrbitFitError, match=r"holds 2 objects \(A1, B2\); fit one designation"):
        fit_orbit(table, model=MODEL)
