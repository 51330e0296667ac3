"""Issue 6 item 10 on the virtual survey's own asteroids.

Truth: the sim archive's asteroid states and the positions it rendered (per exposure,
I41, light-time corrected). Twelve of those positions over ten nights, with 0.3"
Gaussian noise, are fitted; 30 days after the last observation the true position
(the true state propagated by the same N-body model) must lie inside the fit's
predicted 3-sigma ellipse, for every asteroid.
"""

from __future__ import annotations

import numpy as np
import pytest

from lakepipe.archives.sim import SimArchive
from lakepipe.astro.orbit_fit import DynamicsModel, ObservationArrays, fit_orbit

CHI2_2_3SIGMA = 11.829  # chi^2 with 2 dof at the 3-sigma level (0.9973)
SIGMA_ARCSEC = 0.3
MODEL = DynamicsModel(("earth", "mars", "jupiter", "saturn"))


@pytest.fixture(scope="module")
def truth() -> dict:
    return SimArchive.from_config(naxis1=256, naxis2=256, n_nights=12).asteroid_truth()


def test_sim_asteroids_30_days_later_inside_3sigma(truth) -> None:
    states = truth["asteroids"].to_pylist()
    positions = truth["positions"].to_pylist()
    assert len(states) >= 3
    rng = np.random.default_rng(2025)
    for ast in states:
        rows = sorted(
            (p for p in positions if p["number"] == ast["number"]), key=lambda p: p["mjd"]
        )
        nights = sorted({p["night"] for p in rows})[:10]
        # one position per night plus two more on the first and last night: 12 over 10
        pick = [next(p for p in rows if p["night"] == n) for n in nights]
        pick += [p for p in rows if p["night"] == nights[0]][1:2]
        pick += [p for p in rows if p["night"] == nights[-1]][1:2]
        pick.sort(key=lambda p: p["mjd"])
        assert len(pick) == 12
        mjd = np.array([p["mjd"] for p in pick])
        dec = np.array([p["dec"] for p in pick])
        n = len(pick)
        obs = ObservationArrays(
            mjd_utc=mjd,
            ra_deg=(np.array([p["ra"] for p in pick])
                    + rng.normal(0, SIGMA_ARCSEC, n) / 3600 / np.cos(np.radians(dec))) % 360,
            dec_deg=dec + rng.normal(0, SIGMA_ARCSEC, n) / 3600,
            sigma_ra_arcsec=np.full(n, SIGMA_ARCSEC),
            sigma_dec_arcsec=np.full(n, SIGMA_ARCSEC),
            obs_code=np.array(["I41"] * n),
            designation=ast["designation"],
        )  # fmt: skip
        fit = fit_orbit(obs, model=MODEL)
        assert fit.converged and fit.rms_arcsec < 0.6
        later = np.array([mjd.max() + 30.0])
        true_state = np.array(
            [
                ast[k]
                for k in ("x_au", "y_au", "z_au", "vx_au_per_day", "vy_au_per_day", "vz_au_per_day")
            ]
        )
        ra_t, dec_t = MODEL.predict(true_state, ast["epoch_jd_tdb"], later, np.array(["I41"]))
        ra, dec_p, cov = fit.predict_sky(later, "I41", model=MODEL)
        dra = ((ra_t[0, 0] - ra[0] + 180) % 360 - 180) * np.cos(np.radians(dec_p[0]))
        xi = np.array([dra, dec_t[0, 0] - dec_p[0]]) * 3600.0
        d2 = float(xi @ np.linalg.solve(cov[0], xi))
        assert d2 < CHI2_2_3SIGMA, (ast["designation"], xi, np.sqrt(np.diag(cov[0])))
