"""Topocentric astrometric ephemerides and the IAU (H, G) magnitude system."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lakepipe.astro import ephem, nbody, observatories, observe
from tests.astro.test_nbody import EPOCH, close_approach_state, replica_cloud

MJD0 = EPOCH - 2400000.5


def _radec(vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ra = np.degrees(np.arctan2(vec[..., 1], vec[..., 0])) % 360.0
    dec = np.degrees(np.arcsin(vec[..., 2] / np.linalg.norm(vec, axis=-1)))
    return ra, dec


def _sep_arcsec(ra1, dec1, ra2, dec2) -> np.ndarray:
    r1, d1, r2, d2 = (np.radians(x) for x in (ra1, dec1, ra2, dec2))
    # haversine
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(h))) * 3600


def test_light_time_matches_direct_propagation_to_retarded_time() -> None:
    """Truth: propagate the body with the N-body integrator straight to t - tau and take
    the direction from the observer at t; tau must satisfy c tau = |rho| exactly."""
    state = close_approach_state()
    mjd = MJD0 + np.array([0.3, 12.7, 29.9, 41.2])
    eph = observe.ephemeris(state, EPOCH, mjd, obs_code="I41")
    jd1, jd2 = observatories.utc_to_tdb_jd(mjd)
    tau = eph["light_time_d"][0]
    obs, _ = observatories.observer_state("I41", mjd, heliocentric=False)
    for k in range(mjd.size):
        ret = nbody.propagate(state, EPOCH, [jd1[k] + jd2[k] - tau[k]])[0, 0]
        sun, _ = ephem.body_state("sun", jd1[k], jd2[k] - tau[k])
        rho = ret[:3] + sun - obs[k]
        ra, dec = _radec(rho)
        assert _sep_arcsec(ra, dec, eph["ra_deg"][0, k], eph["dec_deg"][0, k]) < 1e-3
        c = observe.speed_of_light_au_d()
        assert np.linalg.norm(rho) / c == pytest.approx(tau[k], rel=1e-10)
        assert eph["delta_au"][0, k] == pytest.approx(np.linalg.norm(rho), rel=1e-10)
    # light time is distance / c, 499.004784 s per au (IAU 2012 au, exact c)
    assert np.all(
        eph["light_time_d"] * 86400 == pytest.approx(eph["delta_au"] * 499.004784, rel=1e-6)
    )


def test_planet_geometry_from_de421_directly() -> None:
    """Truth: the geocentric astrometric place of Mars computed straight from DE421 with
    its own light-time iteration (independent of the propagator and the Kepler backdating)."""
    mjd = np.array([MJD0])
    jd1, jd2 = observatories.utc_to_tdb_jd(mjd)
    mars, vmars = ephem.heliocentric_state("mars", jd1, jd2)
    eph = observe.ephemeris(np.hstack([mars, vmars]), float(jd1[0] + jd2[0]), mjd, obs_code="500")
    earth, _ = ephem.body_state("earth", jd1, jd2)
    tau = 0.0
    for _ in range(5):
        rho = ephem.body_state("mars", jd1, jd2 - tau)[0] - earth
        tau = float(np.linalg.norm(rho) / observe.speed_of_light_au_d())
    ra, dec = _radec(rho[0])
    # Mars as a test particle drifts from the Mars-system barycentre by its own (tiny)
    # mass and its moons only; over minutes of light time that is far below 1 mas.
    assert _sep_arcsec(ra, dec, eph["ra_deg"][0, 0], eph["dec_deg"][0, 0]) < 1e-3
    sun, _ = ephem.body_state("sun", jd1, jd2 - tau)
    r_mars = np.linalg.norm(ephem.body_state("mars", jd1, jd2 - tau)[0] - sun)
    assert eph["r_au"][0, 0] == pytest.approx(r_mars, rel=1e-9)


def test_mars_matches_jpl_horizons_astrometric_place() -> None:
    """Truth: JPL Horizons' geocentric astrometric (ICRF, light-time corrected) place of
    Mars at 2020-06-02 00:00 UTC, 23h01m20.93s -08d51m51.6s, as quoted in Skyfield's
    documentation (elongation example). Horizons rounds to 0.01 s and 0.1 arcsec."""
    mjd = np.array([59002.0])
    jd1, jd2 = observatories.utc_to_tdb_jd(mjd)
    pos, vel = ephem.heliocentric_state("mars", jd1, jd2)
    eph = observe.ephemeris(np.hstack([pos, vel]), float(jd1[0] + jd2[0]), mjd, obs_code="500")
    want_ra = (23 + 1 / 60 + 20.93 / 3600) * 15
    want_dec = -(8 + 51 / 60 + 51.6 / 3600)
    assert _sep_arcsec(eph["ra_deg"][0, 0], eph["dec_deg"][0, 0], want_ra, want_dec) < 0.2


def test_topocentric_parallax_of_a_near_earth_object() -> None:
    """Truth: the shift between geocentric (500) and I41 directions equals the site's
    geocentric offset perpendicular to the line of sight divided by the distance."""
    state = close_approach_state()
    mjd = MJD0 + np.array([29.6, 30.0, 30.4])  # closest approach, ~0.023 au
    geo = observe.ephemeris(state, EPOCH, mjd, obs_code="500")
    topo = observe.ephemeris(state, EPOCH, mjd, obs_code="I41")
    sep = _sep_arcsec(geo["ra_deg"][0], geo["dec_deg"][0], topo["ra_deg"][0], topo["dec_deg"][0])
    site, _ = observatories.observer_state("I41", mjd, heliocentric=False)
    centre, _ = observatories.observer_state("500", mjd, heliocentric=False)
    offset = site - centre
    ra, dec = np.radians(geo["ra_deg"][0]), np.radians(geo["dec_deg"][0])
    u = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)
    perp = np.linalg.norm(offset - np.sum(offset * u, axis=1)[:, None] * u, axis=1)
    want = np.degrees(perp / topo["delta_au"][0]) * 3600
    np.testing.assert_allclose(sep, want, rtol=2e-3)
    assert np.all(sep > 10.0)  # tens of arcsec to arcminutes at 0.023 au


def test_opposition_geometry() -> None:
    """A body 2 au from the Sun straight behind the Earth: phase ~ 0, r = 2, delta = 2 - |E|."""
    mjd = np.array([MJD0])
    jd1, jd2 = observatories.utc_to_tdb_jd(mjd)
    jd = float(jd1[0] + jd2[0])
    earth, _ = ephem.heliocentric_state("earth", jd)
    u = earth / np.linalg.norm(earth)
    speed = math.sqrt(ephem.gm_au3_d2("sun") / 2.0)
    vel = np.cross([0.0, 0.0, 1.0], u)
    state = np.hstack([2.0 * u, speed * vel / np.linalg.norm(vel)])
    eph = observe.ephemeris(state, jd, mjd, obs_code="500", perturbers=())
    assert eph["phase_deg"][0, 0] < 0.05
    assert eph["r_au"][0, 0] == pytest.approx(2.0, abs=1e-5)
    assert eph["delta_au"][0, 0] == pytest.approx(2.0 - np.linalg.norm(earth), abs=1e-5)
    ra, dec = _radec(earth)
    assert _sep_arcsec(ra, dec, eph["ra_deg"][0, 0], eph["dec_deg"][0, 0]) < 30.0


def test_many_replicas_and_epochs_shapes_and_spread() -> None:
    cloud = replica_cloud(200, seed=2)
    mjd = MJD0 + np.linspace(0.0, 30.0, 12)
    eph = observe.ephemeris(cloud, EPOCH, mjd, obs_code="I41")
    for key in ("ra_deg", "dec_deg", "delta_au", "r_au", "phase_deg", "light_time_d"):
        assert eph[key].shape == (200, 12)
        assert np.all(np.isfinite(eph[key]))
    # precomputed states give the same answer
    again = observe.ephemeris(
        cloud,
        EPOCH,
        mjd,
        obs_code="I41",
        states_at_times=nbody.propagate(cloud, EPOCH, eph["jd_tdb"]),
    )
    np.testing.assert_array_equal(again["ra_deg"], eph["ra_deg"])
    # the cloud spreads as it approaches Earth: sky scatter grows from first to last epoch
    spread = np.std(eph["dec_deg"], axis=0)
    assert spread[-1] > 3 * spread[0]


def test_predicted_v_mag() -> None:
    """Truth: V = H at r = delta = 1 au and zero phase; distance modulus 5 log10(r delta);
    and the Bowell et al. (1989) phase functions evaluated by hand at 20 deg, G = 0.15."""
    assert observe.predicted_v_mag(18.0, 0.15, 1.0, 1.0, 0.0) == pytest.approx(18.0, abs=1e-12)
    assert observe.predicted_v_mag(18.0, 0.15, 2.0, 1.5, 0.0) == pytest.approx(
        18.0 + 5 * math.log10(3.0), abs=1e-12
    )
    t = math.tan(math.radians(10.0))
    phi1 = math.exp(-3.33 * t**0.63)
    phi2 = math.exp(-1.87 * t**1.22)
    want = 18.0 - 2.5 * math.log10(0.85 * phi1 + 0.15 * phi2)
    assert observe.predicted_v_mag(18.0, 0.15, 1.0, 1.0, 20.0) == pytest.approx(want, abs=1e-12)
    assert 0.99 < want - 18.0 < 1.01  # the familiar ~1 mag of phase darkening at 20 deg
    v = observe.predicted_v_mag(np.array([15.0, 20.0]), 0.25, np.array([1.2, 2.5]), 0.3, 30.0)
    assert v.shape == (2,) and v[1] - v[0] == pytest.approx(5 + 5 * math.log10(2.5 / 1.2))
