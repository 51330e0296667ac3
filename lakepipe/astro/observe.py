"""Topocentric astrometric positions and magnitudes of small bodies.

:func:`ephemeris` turns heliocentric states at an epoch into what an observatory sees:
the N-body propagation (:mod:`lakepipe.astro.nbody`) to each observation time, the
light-time correction, and the topocentric astrometric right ascension and declination.

Astrometric place: the direction from the observer at the observation time t to the
body at the retarded time t - tau, in the ICRS (barycentric) frame, where tau solves
``c tau = |r_body(t - tau) - r_obs(t)|`` (iterated to convergence; Explanatory Supplement
to the Astronomical Almanac, 3rd ed., sec. 7.2.2). Stellar aberration and gravitational
light deflection are *not* applied: astrometry reduced against a star catalogue, as
survey and MPC astrometry is, is astrometric in this sense (the annual aberration of the
body and of the reference stars is the same to first order), and the ~20" aberration
displacement is therefore correctly absent. The Sun's motion during tau is included
(linear in its DE421 velocity).
"""

from __future__ import annotations

import numpy as np

from lakepipe.astro import ephem, kepler, nbody, observatories

C_KM_S = 299792.458  # speed of light, km/s (exact, SI)
LIGHT_TIME_ITERATIONS = 3


def speed_of_light_au_d() -> float:
    """Speed of light in au/day with the DE421 astronomical unit (173.1446...)."""
    return C_KM_S * 86400.0 / ephem.au_km()


def ephemeris(
    states: np.ndarray,
    epoch_jd_tdb: float,
    mjd_utc: np.ndarray,
    obs_code: str = "I41",
    perturbers: tuple[str, ...] | list[str] = nbody.DEFAULT_PERTURBERS,
    *,
    states_at_times: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Topocentric astrometric positions of N bodies at T UTC epochs.

    Parameters
    ----------
    states
        ``(N, 6)`` heliocentric ICRS states (au, au/day) at ``epoch_jd_tdb``.
    epoch_jd_tdb
        TDB Julian date of ``states``.
    mjd_utc
        ``(T,)`` observation times, MJD UTC (mid-exposure).
    obs_code
        MPC observatory code (``500`` = geocentre).
    perturbers
        Planets included in the propagation (see :func:`lakepipe.astro.nbody.propagate`).
    states_at_times
        Optional ``(N, T, 6)`` heliocentric states already propagated to the TDB of each
        ``mjd_utc`` (skips the propagation, e.g. when the caller integrated once).

    Returns
    -------
    dict
        ``ra_deg``, ``dec_deg`` (astrometric ICRS, degrees), ``delta_au`` (observer-body
        distance at the retarded time), ``r_au`` (heliocentric distance of the body),
        ``phase_deg`` (Sun-body-observer angle), ``light_time_d`` (days), each ``(N, T)``;
        and ``jd_tdb`` ``(T,)``.
    """
    st = np.atleast_2d(np.asarray(states, dtype=np.float64))
    mjd = np.atleast_1d(np.asarray(mjd_utc, dtype=np.float64))
    jd1, jd2 = observatories.utc_to_tdb_jd(mjd)
    jd_tdb = jd1 + jd2
    if states_at_times is None:
        helio_t = nbody.propagate(st, epoch_jd_tdb, jd_tdb, perturbers)
    else:
        helio_t = np.asarray(states_at_times, dtype=np.float64)
        if helio_t.shape != (st.shape[0], mjd.size, 6):
            raise ValueError(
                f"states_at_times must have shape {(st.shape[0], mjd.size, 6)}, got {helio_t.shape}"
            )
    obs_bary, _ = observatories.observer_state(obs_code, mjd, heliocentric=False)
    sun_p, sun_v = ephem.body_state("sun", jd1, jd2)
    return apparent_geometry(helio_t, obs_bary, sun_p, sun_v) | {"jd_tdb": jd_tdb}


def apparent_geometry(
    helio_t: np.ndarray, obs_bary: np.ndarray, sun_p: np.ndarray, sun_v: np.ndarray
) -> dict[str, np.ndarray]:
    """Light-time corrected astrometric geometry of bodies already propagated to times t.

    Parameters
    ----------
    helio_t
        ``(N, T, 6)`` heliocentric ICRS states (au, au/day) at the observation TDBs.
    obs_bary
        ``(T, 3)`` barycentric observer positions (au) at those times
        (:func:`lakepipe.astro.observatories.observer_state` with ``heliocentric=False``).
    sun_p, sun_v
        ``(T, 3)`` barycentric Sun position (au) and velocity (au/day) at those times.

    Returns
    -------
    dict
        ``ra_deg``, ``dec_deg``, ``delta_au``, ``r_au``, ``phase_deg``, ``light_time_d``,
        each ``(N, T)`` (see :func:`ephemeris`).
    """
    n, t = helio_t.shape[:2]
    c = speed_of_light_au_d()
    flat = helio_t.reshape(n * t, 6)
    obs = np.broadcast_to(obs_bary[None], (n, t, 3)).reshape(n * t, 3)
    sp = np.broadcast_to(sun_p[None], (n, t, 3)).reshape(n * t, 3)
    sv = np.broadcast_to(sun_v[None], (n, t, 3)).reshape(n * t, 3)
    tau = np.linalg.norm(flat[:, :3] + sp - obs, axis=1) / c
    # Iterate tau with a second-order Taylor backdating, r(t - tau) = r - v tau + a tau^2/2
    # (two-body a; error ~ jerk tau^3 / 6, below a metre for tau < 0.03 d), then place the
    # body exactly with the universal-variable two-body solution for the converged tau
    # (planetary perturbations over minutes are far below a metre).
    r0, v0 = flat[:, :3], flat[:, 3:]
    acc = -kepler.gm_sun() * r0 / np.linalg.norm(r0, axis=1)[:, None] ** 3
    for _ in range(LIGHT_TIME_ITERATIONS):
        r_ret = r0 - v0 * tau[:, None] + 0.5 * acc * (tau * tau)[:, None]
        rho = r_ret + (sp - sv * tau[:, None]) - obs
        tau = np.linalg.norm(rho, axis=1) / c
    helio_ret = kepler.propagate_kepler_each(flat, -tau)
    rho = helio_ret[:, :3] + (sp - sv * tau[:, None]) - obs
    delta = np.linalg.norm(rho, axis=1)
    ra = np.degrees(np.arctan2(rho[:, 1], rho[:, 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(rho[:, 2] / delta, -1.0, 1.0)))
    r_vec = helio_ret[:, :3]
    r = np.linalg.norm(r_vec, axis=1)
    # Phase angle: between body->Sun (-r) and body->observer (-rho).
    cos_phase = np.sum(r_vec * rho, axis=1) / (r * delta)
    phase = np.degrees(np.arccos(np.clip(cos_phase, -1.0, 1.0)))
    shape = (n, t)
    return {
        "ra_deg": ra.reshape(shape),
        "dec_deg": dec.reshape(shape),
        "delta_au": delta.reshape(shape),
        "r_au": r.reshape(shape),
        "phase_deg": phase.reshape(shape),
        "light_time_d": tau.reshape(shape),
    }


# Kept for callers that imported the helper under its first name.
_apparent = apparent_geometry


def predicted_v_mag(
    h_mag: np.ndarray | float,
    g_slope: np.ndarray | float,
    r_au: np.ndarray,
    delta_au: np.ndarray,
    phase_deg: np.ndarray,
) -> np.ndarray:
    """Apparent V magnitude in the IAU (H, G) system.

    ``V = H + 5 log10(r delta) - 2.5 log10[(1 - G) Phi1 + G Phi2]`` with
    ``Phi_i = exp(-A_i tan(alpha/2)^B_i)``, A1 = 3.33, A2 = 1.87, B1 = 0.63, B2 = 1.22
    (Bowell et al. 1989, *Asteroids II*, p. 524; adopted by IAU Commission 20, 1985).
    ``r_au``, ``delta_au`` in au, ``phase_deg`` the Sun-body-observer angle in degrees.
    """
    r = np.asarray(r_au, dtype=np.float64)
    d = np.asarray(delta_au, dtype=np.float64)
    tan_half = np.tan(np.radians(np.asarray(phase_deg, dtype=np.float64)) / 2.0)
    phi1 = np.exp(-3.33 * tan_half**0.63)
    phi2 = np.exp(-1.87 * tan_half**1.22)
    g = np.asarray(g_slope, dtype=np.float64)
    return np.asarray(h_mag) + 5.0 * np.log10(r * d) - 2.5 * np.log10((1.0 - g) * phi1 + g * phi2)
