"""DE421 planetary positions and MPC observatory positions against independent answers."""

from __future__ import annotations

import erfa
import numpy as np
import pytest

from lakepipe.astro import ephem, observatories
from lakepipe.errors import InputNotFoundError

AU_KM = 149597870.7


@pytest.mark.parametrize("jd_tdb", [2451545.0, 2455197.5, 2460676.5, 2461041.5])
def test_earth_matches_erfa_epv00(jd_tdb: float) -> None:
    """Truth: ERFA epv00 (VSOP2000-based, fitted to DE405; documented max error 4.6 km in
    position, 1.4 mm/s in velocity for 1900-2100). DE421 must agree to that level."""
    pos, vel = ephem.body_state("earth", jd_tdb)
    helio, _ = ephem.heliocentric_state("earth", jd_tdb)
    pvh, pvb = erfa.epv00(jd_tdb, 0.0)
    assert np.linalg.norm(pos - pvb["p"]) * AU_KM < 10.0
    assert np.linalg.norm(helio - pvh["p"]) * AU_KM < 10.0
    assert np.linalg.norm(vel - pvb["v"]) * AU_KM / 86400.0 < 5e-6  # km/s


def test_earth_sun_distance_perihelion_aphelion_2025() -> None:
    """Truth: 2025 perihelion Jan 4 13:28 UT at 0.983327 au, aphelion Jul 3 19:55 UT at
    1.016644 au (USNO / Meeus-style published values, rounded to 1e-6 au)."""
    jd = 2460676.5 + np.arange(0.0, 365.0, 0.01)  # 2025-01-01 .. 2025-12-31
    r = np.linalg.norm(ephem.heliocentric_state("earth", jd)[0], axis=1)
    i_min = int(np.argmin(r[:1000]))  # the January perihelion, not next year's
    i_max = int(np.argmax(r))
    assert r[i_min] == pytest.approx(0.983327, abs=2e-6)
    assert r[i_max] == pytest.approx(1.016644, abs=2e-6)
    assert abs(jd[i_min] - 2460680.061) < 0.1  # 2025-01-04 13:28 UT
    assert abs(jd[i_max] - 2460860.330) < 0.1  # 2025-07-03 19:55 UT


def test_moon_and_earth_relative_to_emb() -> None:
    """The EMB is the mass-weighted mean of Earth and Moon; geocentric Moon 356-407 Mm."""
    jd = 2460700.5 + np.arange(30.0)
    pe, _ = ephem.body_state("earth", jd)
    pm, _ = ephem.body_state("moon", jd)
    pb, _ = ephem.body_state("earthmoon", jd)
    me, mm = ephem.gm_au3_d2("earth"), ephem.gm_au3_d2("moon")
    np.testing.assert_allclose((me * pe + mm * pm) / (me + mm), pb, atol=1e-15)
    d_km = np.linalg.norm(pm - pe, axis=1) * AU_KM
    assert d_km.min() > 356_000 and d_km.max() < 407_000
    assert me / mm == pytest.approx(81.30057, rel=1e-6)


def test_gm_values_are_de421() -> None:
    """GM_sun = k^2 (Gauss constant 0.01720209895) and GM_jupiter/GM_sun = 1/1047.3486."""
    assert ephem.gm_au3_d2("sun") == pytest.approx(0.01720209895**2, rel=1e-12)
    assert ephem.gm_au3_d2("sun") / ephem.gm_au3_d2("jupiter") == pytest.approx(1047.3486, rel=1e-6)


def test_velocity_is_derivative_of_position() -> None:
    """Five-point central difference of positions (h = 0.02 d) equals the velocity."""
    jd = 2460700.5
    h = 0.02
    for body in ("mars", "jupiter", "moon", "earth"):
        p = [ephem.body_state(body, jd, k * h)[0] for k in (-2, -1, 1, 2)]
        deriv = (p[0] - 8 * p[1] + 8 * p[2] - p[3]) / (12 * h)
        _, v = ephem.body_state(body, jd)
        np.testing.assert_allclose(deriv, v, rtol=0, atol=2e-11)


def test_planet_table_matches_body_state() -> None:
    bodies = ("earth", "moon", "mars", "jupiter", "saturn")
    table = ephem.PlanetTable(bodies)
    jd = 2460700.5 + 17.123
    got = table.helio_positions(jd)
    for i, b in enumerate(bodies):
        np.testing.assert_allclose(got[i], ephem.heliocentric_state(b, jd)[0], atol=1e-15)


def test_array_shapes_broadcast() -> None:
    jd = 2460700.5 + np.arange(6.0).reshape(2, 3)
    pos, vel = ephem.body_state("jupiter", jd, 0.25)
    assert pos.shape == vel.shape == (2, 3, 3)
    np.testing.assert_array_equal(pos[1, 2], ephem.body_state("jupiter", 2460705.5, 0.25)[0])


def test_errors() -> None:
    with pytest.raises(InputNotFoundError, match="pluto"):
        ephem.body_state("vulcan", 2451545.0)
    with pytest.raises(InputNotFoundError, match="outside DE421"):
        ephem.body_state("earth", 2600000.0)
    _, end = ephem.coverage_jd_tdb()
    table = ephem.PlanetTable(("mars",))
    with pytest.raises(InputNotFoundError, match="outside DE421"):
        table.helio_positions(end, 0.5)
    assert np.all(np.isfinite(table.helio_positions(end)))


def test_site_geocentric_distance_and_rotation_speed() -> None:
    """I41 lies rho = |(0.836322, 0.546875)| Earth radii from the geocentre and moves at
    omega * R * rho cos phi' (omega = 7.292115e-5 rad/s) relative to it."""
    mjd = np.array([60680.2, 60695.4, 60710.9])
    p, v = observatories.observer_state("I41", mjd)
    g, gv = observatories.observer_state("500", mjd)
    rho = np.hypot(0.836322, 0.546875) * 6378.137
    np.testing.assert_allclose(np.linalg.norm(p - g, axis=1) * ephem.au_km(), rho, rtol=1e-6)
    speed = np.linalg.norm(v - gv, axis=1) * ephem.au_km() / 86400.0
    np.testing.assert_allclose(speed, 7.292115e-5 * 6378.137 * 0.836322, rtol=1e-4)


def test_site_matches_astropy_itrs_to_gcrs() -> None:
    """Independent route: the site's geodetic coordinates -> astropy ITRS -> GCRS."""
    from astropy import units as u
    from astropy.coordinates import GCRS, ITRS, CartesianRepresentation
    from astropy.time import Time
    from astropy.utils import iers

    obs = observatories.get_observatory("F51")
    mjd = np.array([60700.25, 60700.5])
    p, _ = observatories.observer_state("F51", mjd, heliocentric=False)
    g, _ = observatories.observer_state("500", mjd, heliocentric=False)
    t = Time(mjd, format="mjd", scale="utc")
    xyz = obs.geocentric_km()
    with iers.conf.set_temp("auto_download", False):
        itrs = ITRS(CartesianRepresentation(*(np.repeat(c, 2) for c in xyz), unit=u.km), obstime=t)
        gcrs = itrs.transform_to(GCRS(obstime=t))
    want = gcrs.cartesian.xyz.to_value(u.km).T
    np.testing.assert_allclose((p - g) * ephem.au_km(), want, atol=1e-3)


def test_unknown_code_and_registration(tmp_path, monkeypatch) -> None:
    with pytest.raises(InputNotFoundError, match=r"'Z99'.*register_observatory"):
        observatories.get_observatory("Z99")
    text = (
        "Code  Long.   cos      sin    Name\n"
        "Z98 359.5216 0.77156 +0.63405 Observatorio TRZ, Betera\n"
        "250                           Hubble Space Telescope\n"
    )
    f = tmp_path / "ObsCodes.html"
    f.write_text(text)
    monkeypatch.setattr(observatories, "OBSERVATORIES", dict(observatories.OBSERVATORIES))
    assert observatories.load_obscodes(f) == 1
    o = observatories.get_observatory("Z98")
    assert (o.lon_deg, o.rho_cos_phi, o.rho_sin_phi) == (359.5216, 0.77156, 0.63405)
    bad = tmp_path / "bad.txt"
    bad.write_text("Z97 12.x456 0.77156 +0.63405 Broken\n")
    from lakepipe.errors import ParseError

    with pytest.raises(ParseError, match=r"bad\.txt:1"):
        observatories.load_obscodes(bad)


def test_obscodes_from_environment(tmp_path, monkeypatch) -> None:
    f = tmp_path / "codes.txt"
    f.write_text("Y99 343.4906 0.88148 +0.47142 Test site, Teide\n")
    monkeypatch.setattr(observatories, "OBSERVATORIES", dict(observatories.OBSERVATORIES))
    monkeypatch.setattr(observatories, "_ENV_LOADED", False)
    monkeypatch.setenv("LAKEPIPE_OBSCODES", str(f))
    assert observatories.get_observatory("Y99").name == "Test site, Teide"


def test_topocentric_parallax_of_nearby_object() -> None:
    """A NEO at 0.05 au seen from I41 vs the geocentre differs by up to
    asin(6373 km / 0.05 au) = 176 arcsec; check the observed shift is of that size."""
    mjd = np.array([60700.3])
    p, _ = observatories.observer_state("I41", mjd)
    g, _ = observatories.observer_state("500", mjd)
    target = g[0] + np.array([0.05, 0.0, 0.0])
    u1 = (target - p[0]) / np.linalg.norm(target - p[0])
    u2 = (target - g[0]) / np.linalg.norm(target - g[0])
    sep_arcsec = np.degrees(np.arccos(np.clip(u1 @ u2, -1, 1))) * 3600
    assert 1.0 < sep_arcsec < 177.0
