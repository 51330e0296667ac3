"""Two-body orbits: Keplerian elements <-> Cartesian state, universal-variable propagation.

Conventions: states are heliocentric, ICRS equatorial axes, position in au and velocity
in au/day, shape ``(..., 6)``. Elements are heliocentric osculating elements referred to
the mean ecliptic and equinox of J2000 (as the MPC and JPL publish them): semi-major axis
``a_au`` (negative for hyperbolic orbits), eccentricity ``e``, inclination ``inc_deg``,
longitude of the ascending node ``node_deg``, argument of perihelion ``argperi_deg`` and
mean anomaly ``mean_anomaly_deg`` (hyperbolic mean anomaly for e > 1).

The ecliptic -> equatorial rotation uses the IAU 1976 obliquity of J2000,
epsilon = 84381.448 arcsec (Lieske et al. 1977, A&A 58, 1), the value the MPC uses.
The two-body propagator solves the universal Kepler equation with Stumpff functions
(Battin 1987 ch. 4; Vallado, *Fundamentals of Astrodynamics*, Algorithm 8), vectorised
over states and time steps.
"""

from __future__ import annotations

import numpy as np

from lakepipe.astro import ephem

OBLIQUITY_J2000_ARCSEC = 84381.448
_EPS = np.radians(OBLIQUITY_J2000_ARCSEC / 3600.0)
_CE, _SE = np.cos(_EPS), np.sin(_EPS)
# Rotation taking ecliptic-J2000 vectors to equatorial (ICRS) vectors: R_x(-epsilon).
ECL_TO_EQ = np.array([[1.0, 0.0, 0.0], [0.0, _CE, -_SE], [0.0, _SE, _CE]])
EQ_TO_ECL = ECL_TO_EQ.T

ELEMENT_NAMES = ("a_au", "e", "inc_deg", "node_deg", "argperi_deg", "mean_anomaly_deg")


def gm_sun() -> float:
    """GM of the Sun in au^3/day^2 (DE421)."""
    return ephem.gm_au3_d2("sun")


def ecliptic_to_equatorial(vec: np.ndarray) -> np.ndarray:
    """Rotate ``(..., 3)`` or ``(..., 6)`` ecliptic-J2000 vectors to ICRS equatorial axes."""
    return _rotate(np.asarray(vec, dtype=np.float64), ECL_TO_EQ)


def equatorial_to_ecliptic(vec: np.ndarray) -> np.ndarray:
    """Rotate ``(..., 3)`` or ``(..., 6)`` ICRS equatorial vectors to ecliptic-J2000 axes."""
    return _rotate(np.asarray(vec, dtype=np.float64), EQ_TO_ECL)


def _rotate(vec: np.ndarray, m: np.ndarray) -> np.ndarray:
    if vec.shape[-1] == 3:
        return vec @ m.T
    if vec.shape[-1] == 6:
        return np.concatenate([vec[..., :3] @ m.T, vec[..., 3:] @ m.T], axis=-1)
    raise ValueError(f"last axis must have 3 or 6 components, got {vec.shape}")


def solve_kepler(mean_anomaly_rad: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Eccentric anomaly E (rad) from M = E - e sin E (e < 1); H from M = e sinh H - H (e > 1)."""
    m = np.asarray(mean_anomaly_rad, dtype=np.float64)
    e = np.broadcast_to(np.asarray(e, dtype=np.float64), m.shape)
    hyper = e > 1.0
    out = np.empty(m.shape)
    if np.any(~hyper):
        me = np.mod(m[~hyper] + np.pi, 2 * np.pi) - np.pi
        ee = e[~hyper]
        # Starting values of Danby (1987): M + e sin M, or +-pi for high eccentricity.
        x = np.where(ee < 0.8, me + ee * np.sin(me), np.pi * np.sign(me))
        for _ in range(60):
            f = x - ee * np.sin(x) - me
            dx = f / (1.0 - ee * np.cos(x))
            x = x - dx
            if np.all(np.abs(dx) < 1e-15):
                break
        out[~hyper] = x + (m[~hyper] - me)
    if np.any(hyper):
        mh = m[hyper]
        eh = e[hyper]
        x = np.arcsinh(mh / eh)
        for _ in range(100):
            f = eh * np.sinh(x) - x - mh
            dx = f / (eh * np.cosh(x) - 1.0)
            x = x - dx
            if np.all(np.abs(dx) < 1e-15 * np.maximum(1.0, np.abs(x))):
                break
        out[hyper] = x
    return out


def elements_to_state(
    a_au: np.ndarray,
    e: np.ndarray,
    inc_deg: np.ndarray,
    node_deg: np.ndarray,
    argperi_deg: np.ndarray,
    mean_anomaly_deg: np.ndarray,
    gm: float | None = None,
) -> np.ndarray:
    """Heliocentric ICRS state ``(N, 6)`` (au, au/day) from ecliptic-J2000 Keplerian elements.

    Elliptic (0 <= e < 1, a > 0) and hyperbolic (e > 1, a < 0) orbits; parabolic orbits
    are not representable with (a, M). ``gm`` defaults to the Sun's GM from DE421.
    """
    mu = gm_sun() if gm is None else gm
    a, e, inc, node, w, m = np.broadcast_arrays(
        *(
            np.atleast_1d(np.asarray(x, dtype=np.float64))
            for x in (a_au, e, inc_deg, node_deg, argperi_deg, mean_anomaly_deg)
        )
    )
    if np.any(np.abs(e - 1.0) < 1e-12) or np.any((e < 1) & (a <= 0)) or np.any((e > 1) & (a >= 0)):
        raise ValueError("need a > 0 for e < 1 and a < 0 for e > 1 (parabolic orbits unsupported)")
    anom = solve_kepler(np.radians(m), e)
    aa = np.abs(a)
    n = np.sqrt(mu / aa**3)
    x = np.empty(a.shape)
    y = np.empty(a.shape)
    vx = np.empty(a.shape)
    vy = np.empty(a.shape)
    ell = e < 1.0
    # Perifocal coordinates (Battin 1987, eqs. 4.26 and 4.47)
    ce, se = np.cos(anom[ell]), np.sin(anom[ell])
    b = np.sqrt(1.0 - e[ell] ** 2)
    den = 1.0 - e[ell] * ce
    x[ell] = aa[ell] * (ce - e[ell])
    y[ell] = aa[ell] * b * se
    vx[ell] = -n[ell] * aa[ell] * se / den
    vy[ell] = n[ell] * aa[ell] * b * ce / den
    hy = ~ell
    ch, sh = np.cosh(anom[hy]), np.sinh(anom[hy])
    b = np.sqrt(e[hy] ** 2 - 1.0)
    den = e[hy] * ch - 1.0
    x[hy] = aa[hy] * (e[hy] - ch)
    y[hy] = aa[hy] * b * sh
    vx[hy] = -n[hy] * aa[hy] * sh / den
    vy[hy] = n[hy] * aa[hy] * b * ch / den
    # Perifocal -> ecliptic: R_z(-node) R_x(-inc) R_z(-argperi)
    co, so = np.cos(np.radians(node)), np.sin(np.radians(node))
    ci, si = np.cos(np.radians(inc)), np.sin(np.radians(inc))
    cw, sw = np.cos(np.radians(w)), np.sin(np.radians(w))
    p = np.stack([co * cw - so * sw * ci, so * cw + co * sw * ci, sw * si], axis=-1)
    q = np.stack([-co * sw - so * cw * ci, -so * sw + co * cw * ci, cw * si], axis=-1)
    r_ecl = x[:, None] * p + y[:, None] * q
    v_ecl = vx[:, None] * p + vy[:, None] * q
    return ecliptic_to_equatorial(np.concatenate([r_ecl, v_ecl], axis=-1))


def state_to_elements(states: np.ndarray, gm: float | None = None) -> dict[str, np.ndarray]:
    """Ecliptic-J2000 osculating elements of heliocentric ICRS states ``(N, 6)``.

    Returns a dict of arrays keyed by :data:`ELEMENT_NAMES` plus ``q_au`` (perihelion
    distance). Angles in degrees in [0, 360); for i = 0 the node is set to 0, for e = 0
    the argument of perihelion is set to 0 (anomalies then count from the node).
    """
    mu = gm_sun() if gm is None else gm
    s = equatorial_to_ecliptic(np.atleast_2d(np.asarray(states, dtype=np.float64)))
    r, v = s[:, :3], s[:, 3:]
    rn = np.linalg.norm(r, axis=1)
    v2 = np.sum(v * v, axis=1)
    rv = np.sum(r * v, axis=1)
    h = np.cross(r, v)
    hn = np.linalg.norm(h, axis=1)
    evec = ((v2 - mu / rn)[:, None] * r - rv[:, None] * v) / mu
    e = np.linalg.norm(evec, axis=1)
    a = 1.0 / (2.0 / rn - v2 / mu)
    inc = np.arccos(np.clip(h[:, 2] / hn, -1.0, 1.0))
    nvec = np.stack([-h[:, 1], h[:, 0], np.zeros_like(hn)], axis=1)
    nn = np.linalg.norm(nvec, axis=1)
    flat = nn < 1e-14 * hn
    nhat = np.where(flat[:, None], np.array([1.0, 0.0, 0.0]), nvec / np.where(flat, 1, nn)[:, None])
    hhat = h / hn[:, None]
    node = np.arctan2(nhat[:, 1], nhat[:, 0])
    circ = e < 1e-14
    ehat = np.where(circ[:, None], nhat, evec / np.where(circ, 1, e)[:, None])
    argp = np.arctan2(np.sum(np.cross(nhat, ehat) * hhat, axis=1), np.sum(nhat * ehat, axis=1))
    nu = np.arctan2(np.sum(np.cross(ehat, r) * hhat, axis=1), np.sum(ehat * r, axis=1))
    mean = np.empty_like(e)
    ell = e < 1.0
    # True -> eccentric -> mean anomaly (Battin 1987, eqs. 4.30, 4.82)
    ea = 2.0 * np.arctan2(
        np.sqrt(1 - e[ell]) * np.sin(nu[ell] / 2), np.sqrt(1 + e[ell]) * np.cos(nu[ell] / 2)
    )
    mean[ell] = ea - e[ell] * np.sin(ea)
    eh = e[~ell]
    hh = 2.0 * np.arctanh(np.sqrt((eh - 1) / (eh + 1)) * np.tan(nu[~ell] / 2))
    mean[~ell] = eh * np.sinh(hh) - hh
    deg = np.degrees
    return {
        "a_au": a,
        "e": e,
        "inc_deg": deg(inc),
        "node_deg": np.mod(deg(node), 360.0),
        "argperi_deg": np.mod(deg(argp), 360.0),
        "mean_anomaly_deg": np.where(ell, np.mod(deg(mean), 360.0), deg(mean)),
        "q_au": a * (1.0 - e),
    }


def stumpff(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stumpff functions C(z), S(z) (Battin 1987 sec. 4.5), series near z = 0."""
    z = np.asarray(z, dtype=np.float64)
    c = np.empty_like(z)
    s = np.empty_like(z)
    small = np.abs(z) < 1e-2
    zs = z[small]
    # Taylor series: C = sum (-z)^k/(2k+2)!, S = sum (-z)^k/(2k+3)!
    c[small] = 1 / 2 - zs * (
        1 / 24 - zs * (1 / 720 - zs * (1 / 40320 - zs * (1 / 3628800 - zs / 479001600)))
    )
    s[small] = 1 / 6 - zs * (
        1 / 120 - zs * (1 / 5040 - zs * (1 / 362880 - zs * (1 / 39916800 - zs / 6227020800)))
    )
    pos = (z > 0) & ~small
    sq = np.sqrt(z[pos])
    c[pos] = (1.0 - np.cos(sq)) / z[pos]
    s[pos] = (sq - np.sin(sq)) / sq**3
    neg = (z < 0) & ~small
    sq = np.sqrt(-z[neg])
    c[neg] = (np.cosh(sq) - 1.0) / -z[neg]
    s[neg] = (np.sinh(sq) - sq) / sq**3
    return c, s


def propagate_kepler(
    states: np.ndarray, dt_days: np.ndarray, gm: float | None = None
) -> np.ndarray:
    """Two-body propagation of ``(N, 6)`` states by each of ``(T,)`` time steps -> ``(N, T, 6)``.

    Universal-variable Kepler equation solved by Newton iteration with the Lagrange f, g
    functions (Vallado Algorithm 8); valid for elliptic, parabolic and hyperbolic orbits
    and negative time steps.
    """
    st = np.atleast_2d(np.asarray(states, dtype=np.float64))
    dt = np.atleast_1d(np.asarray(dt_days, dtype=np.float64))
    return _universal(st, np.broadcast_to(dt[None, :], (st.shape[0], dt.size)), gm)


def propagate_kepler_each(
    states: np.ndarray, dt_days: np.ndarray, gm: float | None = None
) -> np.ndarray:
    """Two-body propagation of each of ``(M, 6)`` states by its own step ``(M,)`` -> ``(M, 6)``."""
    st = np.atleast_2d(np.asarray(states, dtype=np.float64))
    dt = np.asarray(dt_days, dtype=np.float64).reshape(-1, 1)
    return _universal(st, dt, gm)[:, 0]


def _universal(st: np.ndarray, dtm: np.ndarray, gm: float | None) -> np.ndarray:
    """Universal-variable solution for states ``(N, 6)`` and steps ``dtm (N, T)``."""
    mu = gm_sun() if gm is None else gm
    r0v = st[:, None, :3]
    v0v = st[:, None, 3:]
    r0 = np.linalg.norm(st[:, :3], axis=1)[:, None]
    v02 = np.sum(st[:, 3:] ** 2, axis=1)[:, None]
    sigma0 = (np.sum(st[:, :3] * st[:, 3:], axis=1) / np.sqrt(mu))[:, None]  # r.v / sqrt(mu)
    alpha = 2.0 / r0 - v02 / mu  # 1/a
    smu = np.sqrt(mu)
    # F(chi) is monotonic with F'(chi) = r(chi) in [q, Q] (Q = inf when unbound), so the root
    # lies in [sqrt(mu) dt / Q, sqrt(mu) dt / q]: safeguarded Newton inside that bracket.
    hvec = np.cross(st[:, :3], st[:, 3:])
    p_semi = (np.sum(hvec * hvec, axis=1) / mu)[:, None]  # semi-latus rectum
    ecc = np.sqrt(np.maximum(1.0 - p_semi * alpha, 0.0))
    q = p_semi / (1.0 + ecc)
    big_q = np.where(alpha > 0, p_semi / np.maximum(1.0 - ecc, 1e-300), np.inf)
    target = smu * dtm
    lo = np.where(dtm >= 0, target / big_q, target / q)
    hi = np.where(dtm >= 0, target / q, target / big_q)
    lo = np.nan_to_num(lo, nan=0.0, posinf=0.0, neginf=0.0)
    hi = np.nan_to_num(hi, nan=0.0, posinf=0.0, neginf=0.0)
    chi = np.where(alpha > 1e-8, smu * alpha * dtm, smu * dtm / r0)
    chi = np.clip(chi, lo, hi)
    done_after = -1
    for it in range(200):
        z = alpha * chi * chi
        c, s = stumpff(z)
        chi2 = chi * chi
        f = sigma0 * chi2 * c + (1.0 - alpha * r0) * chi2 * chi * s + r0 * chi - target
        r = sigma0 * chi * (1.0 - z * s) + (1.0 - alpha * r0) * chi2 * c + r0
        lo = np.where(f < 0, chi, lo)
        hi = np.where(f > 0, chi, hi)
        new = chi - f / r
        outside = (new < lo) | (new > hi) | ~np.isfinite(new)
        new = np.where(outside, 0.5 * (lo + hi), new)
        step = np.abs(new - chi)
        chi = new
        # Newton converges quadratically: one more step after 1e-10 is at round-off.
        if it == done_after:
            break
        if done_after < 0 and np.all(step <= 1e-10 * np.abs(chi)):
            done_after = it + 1
    z = alpha * chi * chi
    c, s = stumpff(z)
    chi2 = chi * chi
    ff = 1.0 - chi2 / r0 * c
    gg = dtm - chi2 * chi * s / smu
    rv = ff[..., None] * r0v + gg[..., None] * v0v
    rn = np.linalg.norm(rv, axis=-1)
    fdot = smu / (rn * r0) * chi * (z * s - 1.0)
    gdot = 1.0 - chi2 / rn * c
    vv = fdot[..., None] * r0v + gdot[..., None] * v0v
    return np.concatenate([rv, vv], axis=-1)


def orbital_energy(states: np.ndarray, gm: float | None = None) -> np.ndarray:
    """Specific orbital energy v^2/2 - mu/r (au^2/day^2) of ``(..., 6)`` states."""
    mu = gm_sun() if gm is None else gm
    s = np.asarray(states, dtype=np.float64)
    return 0.5 * np.sum(s[..., 3:] ** 2, axis=-1) - mu / np.linalg.norm(s[..., :3], axis=-1)
