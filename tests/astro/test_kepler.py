"""Two-body orbits: element conversions and the universal-variable propagator."""

from __future__ import annotations

import numpy as np
import pytest

from lakepipe.astro import kepler


def _random_elements(n: int, seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(0.6, 5.0, n),
        rng.uniform(0.0, 0.95, n),
        rng.uniform(0.0, 170.0, n),
        rng.uniform(0.0, 360.0, n),
        rng.uniform(0.0, 360.0, n),
        rng.uniform(0.0, 360.0, n),
    )


def test_elements_state_round_trip() -> None:
    els = _random_elements(500, seed=11)
    states = kepler.elements_to_state(*els)
    back = kepler.state_to_elements(states)
    for name, want in zip(kepler.ELEMENT_NAMES, els, strict=True):
        got = back[name]
        if name.endswith("_deg"):
            diff = np.mod(got - want + 180.0, 360.0) - 180.0
            assert np.abs(diff).max() < 1e-8, name
        else:
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)
    again = kepler.elements_to_state(*(back[n] for n in kepler.ELEMENT_NAMES))
    np.testing.assert_allclose(again, states, rtol=0, atol=1e-13)


def test_hyperbolic_round_trip() -> None:
    states = kepler.elements_to_state(-2.0, 1.5, 30.0, 40.0, 50.0, [-3.0, 0.5, 10.0])
    el = kepler.state_to_elements(states)
    np.testing.assert_allclose(el["a_au"], -2.0, rtol=1e-12)
    np.testing.assert_allclose(el["e"], 1.5, rtol=1e-12)
    np.testing.assert_allclose(el["mean_anomaly_deg"], [-3.0, 0.5, 10.0], atol=1e-9)
    np.testing.assert_allclose(el["q_au"], 1.0, rtol=1e-12)


# JPL Horizons, 1 Ceres, solution JPL#48 (2021-Apr-13): IAU76/J2000 heliocentric ecliptic
# osculating elements at EPOCH = 2458849.5 TDB and Horizons' "equivalent ICRF heliocentric
# cartesian coordinates" of the same elements (au, au/day).
CERES_ELEMENTS = {
    "a_au": 2.769289292143484,
    "e": 0.07687465013145245,
    "inc_deg": 10.59127767086216,
    "node_deg": 80.3011901917491,
    "argperi_deg": 73.80896808746482,
    "mean_anomaly_deg": 130.3159688200986,
}
CERES_ICRF_STATE = np.array(
    [
        1.007608869627324e00,
        -2.390064275218395e00,
        -1.332124522752835e00,
        9.201724467231788e-03,
        3.370381135450014e-03,
        -2.850337057427248e-04,
    ]
)


def test_ceres_elements_match_jpl_horizons_state() -> None:
    """Truth: JPL Horizons' own conversion of Ceres' elements to an ICRF state."""
    state = kepler.elements_to_state(*(CERES_ELEMENTS[k] for k in kepler.ELEMENT_NAMES))[0]
    assert np.abs(state[:3] - CERES_ICRF_STATE[:3]).max() < 1e-11  # au (1.5 m)
    assert np.abs(state[3:] - CERES_ICRF_STATE[3:]).max() < 1e-13  # au/day
    back = kepler.state_to_elements(CERES_ICRF_STATE)
    for k, v in CERES_ELEMENTS.items():
        assert back[k][0] == pytest.approx(v, rel=1e-9), k


def test_circular_orbit_in_ecliptic_known_state() -> None:
    """Truth: a circular ecliptic orbit at 1 au, M = 90 deg, node = argperi = 0, lies at
    ecliptic (0, 1, 0), i.e. equatorial (0, cos eps, sin eps), moving at sqrt(GM/a)."""
    s = kepler.elements_to_state(1.0, 0.0, 0.0, 0.0, 0.0, 90.0)[0]
    eps = np.radians(84381.448 / 3600.0)
    np.testing.assert_allclose(s[:3], [0.0, np.cos(eps), np.sin(eps)], atol=1e-15)
    np.testing.assert_allclose(s[3:], [-np.sqrt(kepler.gm_sun()), 0.0, 0.0], atol=1e-15)
    assert np.sqrt(kepler.gm_sun()) == pytest.approx(0.01720209895, rel=1e-10)  # Gauss k


def test_propagation_conserves_energy_and_follows_kepler_equation() -> None:
    """Truth: the mean anomaly advances by n dt with n = sqrt(GM / a^3), energy is constant."""
    els = _random_elements(300, seed=5)
    states = kepler.elements_to_state(*els)
    dt = np.linspace(-500.0, 500.0, 11)
    out = kepler.propagate_kepler(states, dt)
    assert out.shape == (300, 11, 6)
    energy = kepler.orbital_energy(out)
    e0 = kepler.orbital_energy(states)[:, None]
    assert np.abs(energy / e0 - 1.0).max() < 1e-12
    a = els[0]
    n_deg_per_day = np.degrees(np.sqrt(kepler.gm_sun() / a**3))
    for j, step in enumerate(dt):
        m = kepler.state_to_elements(out[:, j])["mean_anomaly_deg"]
        diff = np.mod(m - (els[5] + n_deg_per_day * step) + 180.0, 360.0) - 180.0
        assert np.abs(diff).max() < 1e-7
    # angular momentum is conserved too
    h0 = np.cross(states[:, :3], states[:, 3:])
    h = np.cross(out[..., :3], out[..., 3:])
    assert np.abs(h - h0[:, None, :]).max() < 1e-15


def test_propagation_forward_and_back_is_identity() -> None:
    states = kepler.elements_to_state(*_random_elements(100, seed=9))
    fwd = kepler.propagate_kepler(states, [123.4])[:, 0]
    back = kepler.propagate_kepler(fwd, [-123.4])[:, 0]
    assert np.abs(back[:, :3] - states[:, :3]).max() * 1.496e8 < 1e-3  # km
    zero = kepler.propagate_kepler(states, [0.0])[:, 0]
    np.testing.assert_array_equal(zero, states)


def test_hyperbolic_propagation_matches_elements() -> None:
    """Hyperbolic mean anomaly advances as n dt with n = sqrt(GM / |a|^3)."""
    s0 = kepler.elements_to_state(-1.3, 2.1, 12.0, 100.0, 200.0, -20.0)
    dt = np.array([-60.0, 30.0, 365.0])
    out = kepler.propagate_kepler(s0, dt)[0]
    n = np.degrees(np.sqrt(kepler.gm_sun() / 1.3**3))
    want = kepler.elements_to_state(-1.3, 2.1, 12.0, 100.0, 200.0, -20.0 + n * dt)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-12)


def test_stumpff_series_is_continuous() -> None:
    z = np.array([-1.0001e-2, -0.9999e-2, 0.9999e-2, 1.0001e-2, 0.0])
    c, s = kepler.stumpff(z)
    assert abs(c[0] - c[1]) < 1e-6 and abs(c[2] - c[3]) < 1e-6
    assert abs(s[0] - s[1]) < 1e-7 and abs(s[2] - s[3]) < 1e-7
    assert (c[4], s[4]) == (0.5, 1.0 / 6.0)


def test_parabolic_elements_rejected() -> None:
    with pytest.raises(ValueError, match="parabolic"):
        kepler.elements_to_state(1.0, 1.0, 0.0, 0.0, 0.0, 0.0)
