"""Initial orbit determination from three topocentric observations: Gauss's method.

Gauss's method with iterative refinement as in H. D. Curtis, *Orbital Mechanics for
Engineering Students* (3rd ed., 2014), Algorithms 5.5 (preliminary orbit from the
eighth-degree polynomial) and 5.6 (refinement with exact Lagrange f and g coefficients,
here from the project's universal-variable two-body propagator), plus the
light-time correction of the emission times (Milani & Gronchi 2010, *Theory of Orbit
Determination*, sec. 9.1).

Units: positions AU, velocities AU/day, times days (any uniform scale, TDB in practice),
GM of the Sun k**2 AU^3/day^2 with the Gaussian gravitational constant k. Vectors are in
the frame of the observer positions (ICRS equatorial, heliocentric, in lakepipe).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lakepipe.astro.kepler import propagate_kepler

__all__ = ["GM_SUN_AU3_D2", "GaussSolution", "gauss_iod", "unit_vectors"]

K_GAUSS = 0.01720209895  # Gaussian gravitational constant, AU^(3/2) / day (IAU 1976)
GM_SUN_AU3_D2 = K_GAUSS**2
C_AU_PER_DAY = 173.1446326846693  # speed of light: 299792.458 km/s * 86400 s / 149597870.7 km


@dataclass(frozen=True)
class GaussSolution:
    """One root of Gauss's method: the heliocentric state at the middle emission time.

    ``t2_emit`` is the middle observation time minus the light time (days, the time scale
    of the input times); ``rho_au`` the three topocentric distances; ``converged`` whether
    the refinement met its tolerance.
    """

    t2_emit: float
    state: np.ndarray  # (6,) AU, AU/day
    rho_au: np.ndarray  # (3,)
    converged: bool
    iterations: int


def unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """(…, 3) direction cosines of (ra, dec) in degrees."""
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)], axis=-1)


def _lagrange_fg(
    r0: np.ndarray, v0: np.ndarray, dt1: float, dt3: float, mu: float
) -> tuple[float, float, float, float]:
    """Exact two-body Lagrange f, g over ``dt1`` and ``dt3``: r(dt) = f r0 + g v0.

    The positions come from the project's universal-variable propagator
    (:func:`lakepipe.astro.kepler.propagate_kepler`); f and g are their coordinates in the
    orbital plane spanned by r0 and v0 (least squares, exact for two-body motion;
    Curtis eq. 2.135).
    """
    r = propagate_kepler(np.concatenate([r0, v0])[None, :], np.array([dt1, dt3]), gm=mu)[0]
    (f1, f3), (g1, g3) = np.linalg.lstsq(np.stack([r0, v0], axis=1), r[:, :3].T, rcond=None)[0]
    return float(f1), float(g1), float(f3), float(g3)


def gauss_iod(
    t: np.ndarray,
    ra_deg: np.ndarray,
    dec_deg: np.ndarray,
    observer_au: np.ndarray,
    *,
    mu: float = GM_SUN_AU3_D2,
    light_time: bool = True,
    max_iter: int = 60,
    tol: float = 1e-9,
) -> list[GaussSolution]:
    """Heliocentric states from three observations by Gauss's method (Curtis Alg. 5.5-5.6).

    Parameters
    ----------
    t : (3,) observation times in days (TDB, e.g. JD), increasing.
    ra_deg, dec_deg : (3,) observed astrometric directions, degrees.
    observer_au : (3, 3) heliocentric observer positions at ``t``, AU.
    mu : GM of the central body, AU^3/day^2.
    light_time : subtract rho/c from the times in the refinement.

    Returns
    -------
    One :class:`GaussSolution` per physically meaningful root of the eighth-degree
    polynomial (r2 > 0, all topocentric distances > 0), best-converged first; empty when
    the geometry admits none (coplanar lines of sight, D0 = 0).
    """
    t = np.asarray(t, dtype=np.float64)
    rhat = unit_vectors(np.asarray(ra_deg, float), np.asarray(dec_deg, float))
    big_r = np.asarray(observer_au, dtype=np.float64)
    tau1, tau3 = t[0] - t[1], t[2] - t[1]
    tau = tau3 - tau1
    p1, p2, p3 = np.cross(rhat[1], rhat[2]), np.cross(rhat[0], rhat[2]), np.cross(rhat[0], rhat[1])
    d0 = float(np.dot(rhat[0], p1))
    if abs(d0) < 1e-14:
        return []
    d = np.array([[np.dot(big_r[i], p) for p in (p1, p2, p3)] for i in range(3)])
    a_ = (-d[0, 1] * tau3 / tau + d[1, 1] + d[2, 1] * tau1 / tau) / d0
    b_ = (d[0, 1] * (tau3**2 - tau**2) * tau3 / tau + d[2, 1] * (tau**2 - tau1**2) * tau1 / tau) / (
        6 * d0
    )
    e_ = float(np.dot(big_r[1], rhat[1]))
    r2sq = float(np.dot(big_r[1], big_r[1]))
    a = -(a_**2 + 2 * a_ * e_ + r2sq)
    b = -2 * mu * b_ * (a_ + e_)
    c = -(mu**2) * b_**2
    roots = np.roots([1, 0, a, 0, 0, b, 0, 0, c])
    r2_roots = sorted(
        float(r.real) for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r)) and r.real > 0
    )
    solutions = []
    for r2 in r2_roots:
        r2c = r2**3
        rho1 = (
            (6 * (d[2, 0] * tau1 / tau3 + d[1, 0] * tau / tau3) * r2c
             + mu * d[2, 0] * (tau**2 - tau1**2) * tau1 / tau3)
            / (6 * r2c + mu * (tau**2 - tau3**2))
            - d[0, 0]
        ) / d0  # fmt: skip
        rho2 = a_ + mu * b_ / r2c
        rho3 = (
            (6 * (d[0, 2] * tau3 / tau1 - d[1, 2] * tau / tau1) * r2c
             + mu * d[0, 2] * (tau**2 - tau3**2) * tau3 / tau1)
            / (6 * r2c + mu * (tau**2 - tau1**2))
            - d[2, 2]
        ) / d0  # fmt: skip
        rho = np.array([rho1, rho2, rho3])
        if np.any(rho <= 0):
            continue
        # spurious roots can wander onto hyperbolic or degenerate orbits while refined;
        # their overflows are expected and their results dropped by the finiteness checks
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            sol = _refine(t, rhat, big_r, d, d0, rho, r2, mu, light_time, max_iter, tol)
        if sol is not None:
            solutions.append(sol)
    solutions.sort(key=lambda s: (not s.converged, s.iterations))
    return solutions


def _refine(
    t: np.ndarray,
    rhat: np.ndarray,
    big_r: np.ndarray,
    d: np.ndarray,
    d0: float,
    rho: np.ndarray,
    r2: float,
    mu: float,
    light_time: bool,
    max_iter: int,
    tol: float,
) -> GaussSolution | None:
    """Curtis Algorithm 5.6: refine rho with exact f, g; else the preliminary orbit.

    Curtis iterates the update rho -> G(rho) (averaging f, g with the previous ones); that
    converges only linearly and diverges where |G'| > 1 (objects at nearly the observer's
    heliocentric distance). Newton's method on G(rho) - rho is tried first, the plain
    undamped iteration second; when both fail the preliminary solution (truncated f, g
    series) is returned unconverged: the differential correction can still start from it.
    """
    tau1, tau3 = t[0] - t[1], t[2] - t[1]
    fg0 = (
        1 - 0.5 * mu * tau1**2 / r2**3,
        tau1 - mu * tau1**3 / (6 * r2**3),
        1 - 0.5 * mu * tau3**2 / r2**3,
        tau3 - mu * tau3**3 / (6 * r2**3),
    )
    newton = _newton(t, rhat, big_r, d, d0, rho, fg0, mu, light_time, tol)
    if newton is not None:
        return newton
    done = _iterate(t, rhat, big_r, d, d0, rho, fg0, mu, light_time, max_iter, tol, 0.0)
    if done is not None and done[2]:
        return _solution(t, rhat, big_r, *done, light_time=light_time)
    return _solution(t, rhat, big_r, rho, fg0, False, 0, light_time=light_time)


def _newton(
    t: np.ndarray,
    rhat: np.ndarray,
    big_r: np.ndarray,
    d: np.ndarray,
    d0: float,
    rho: np.ndarray,
    fg0: tuple[float, float, float, float],
    mu: float,
    light_time: bool,
    tol: float,
) -> GaussSolution | None:
    """Solve rho = G(rho) of Algorithm 5.6 by Newton's method (finite-difference Jacobian).

    G maps the three distances to new ones through the state at t2 and the exact f, g;
    where the plain iteration of G diverges (|G'| > 1) its fixed point is still a root of
    G(rho) - rho.
    """
    f1, g1, f3, g3 = fg0
    r = big_r + rho[:, None] * rhat
    v2 = (-f3 * r[0] + f1 * r[2]) / (f1 * g3 - f3 * g1)

    def fixed_map(x: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        # state at t2 consistent with distances x: v2 from the current exact f, g
        te = t - x / C_AU_PER_DAY if light_time else t
        tau1, tau3 = te[0] - te[1], te[2] - te[1]
        rr = big_r + x[:, None] * rhat
        a1, b1, a3, b3 = _lagrange_fg(rr[1], v2_cur[0], tau1, tau3, mu)
        den = a1 * b3 - a3 * b1
        c1, c3 = b3 / den, -b1 / den
        out = np.array(
            [
                (-d[0, 0] + d[1, 0] / c1 - d[2, 0] * c3 / c1) / d0,
                (-c1 * d[0, 1] + d[1, 1] - c3 * d[2, 1]) / d0,
                (-d[0, 2] * c1 / c3 + d[1, 2] / c3 - d[2, 2]) / d0,
            ]
        )
        return out, (a1, b1, a3, b3)

    v2_cur = [v2]
    x = rho.copy()
    fg = fg0
    for it in range(1, 60):
        gx, fg = fixed_map(x)
        resid = gx - x
        if not np.all(np.isfinite(resid)):
            return None
        jac = np.empty((3, 3))
        for k in range(3):
            h = 1e-7 * max(1.0, x[k])
            xp = x.copy()
            xp[k] += h
            jac[:, k] = (fixed_map(xp)[0] - xp - resid) / h
        try:
            step = np.linalg.solve(jac, -resid)
        except np.linalg.LinAlgError:
            return None
        x = x + step
        if np.any(x <= 0) or not np.all(np.isfinite(x)):
            return None
        rr = big_r + x[:, None] * rhat
        f1, g1, f3, g3 = fg
        v2_cur[0] = (-f3 * rr[0] + f1 * rr[2]) / (f1 * g3 - f3 * g1)
        if np.max(np.abs(step) / x) < tol:
            _, fg = fixed_map(x)
            return _solution(t, rhat, big_r, x, fg, True, it, light_time=light_time)
    return None


def _iterate(
    t: np.ndarray,
    rhat: np.ndarray,
    big_r: np.ndarray,
    d: np.ndarray,
    d0: float,
    rho: np.ndarray,
    fg: tuple[float, float, float, float],
    mu: float,
    light_time: bool,
    max_iter: int,
    tol: float,
    damping: float,
) -> tuple[np.ndarray, tuple[float, float, float, float], bool, int] | None:
    f1, g1, f3, g3 = fg
    for it in range(1, max_iter + 1):
        r = big_r + rho[:, None] * rhat
        den = f1 * g3 - f3 * g1
        v2 = (-f3 * r[0] + f1 * r[2]) / den
        te = t - rho / C_AU_PER_DAY if light_time else t
        tau1, tau3 = te[0] - te[1], te[2] - te[1]
        f1n, g1n, f3n, g3n = _lagrange_fg(r[1], v2, tau1, tau3, mu)
        keep = damping
        f1, g1 = keep * f1 + (1 - keep) * f1n, keep * g1 + (1 - keep) * g1n
        f3, g3 = keep * f3 + (1 - keep) * f3n, keep * g3 + (1 - keep) * g3n
        den = f1 * g3 - f3 * g1
        c1, c3 = g3 / den, -g1 / den
        new = np.array(
            [
                (-d[0, 0] + d[1, 0] / c1 - d[2, 0] * c3 / c1) / d0,
                (-c1 * d[0, 1] + d[1, 1] - c3 * d[2, 1]) / d0,
                (-d[0, 2] * c1 / c3 + d[1, 2] / c3 - d[2, 2]) / d0,
            ]
        )
        if not np.all(np.isfinite(new)) or np.any(new <= 0):
            return None
        change = float(np.max(np.abs(new - rho) / new))
        rho = new
        if change < tol:
            return rho, (f1, g1, f3, g3), True, it
    return rho, (f1, g1, f3, g3), False, max_iter


def _solution(
    t: np.ndarray,
    rhat: np.ndarray,
    big_r: np.ndarray,
    rho: np.ndarray,
    fg: tuple[float, float, float, float],
    converged: bool,
    iterations: int,
    *,
    light_time: bool,
) -> GaussSolution | None:
    """State at the middle emission time from r_1, r_3 and f, g (Curtis eq. 5.114)."""
    f1, g1, f3, g3 = fg
    r = big_r + rho[:, None] * rhat
    v2 = (-f3 * r[0] + f1 * r[2]) / (f1 * g3 - f3 * g1)
    t2e = t[1] - rho[1] / C_AU_PER_DAY if light_time else t[1]
    state = np.concatenate([r[1], v2])
    if not np.all(np.isfinite(state)):
        return None
    return GaussSolution(float(t2e), state, rho, converged, iterations)
