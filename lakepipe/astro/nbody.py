"""Heliocentric N-body propagation of massless small bodies under the Sun and planets.

Equations of motion (heliocentric frame, massless test particle; e.g. Murray & Dermott,
*Solar System Dynamics*, eq. 6.8 with the test-particle mass set to zero)::

    r'' = -GM_sun r / |r|^3 + sum_p GM_p [ (r_p - r) / |r_p - r|^3 - r_p / |r_p|^3 ]

where ``r_p`` are the heliocentric positions of the chosen perturbers from DE421
(:mod:`lakepipe.astro.ephem`) and the second term in the sum is the indirect term (the
Sun's own acceleration towards those perturbers). Units: au, day, au^3/day^2 (DE421 GM);
axes ICRS; time TDB.

Integrator: the 8th-order Dormand-Prince pair with 7th-order dense output (DOP853,
Hairer, Norsett & Wanner, *Solving ODEs I*, sec. II.10) on the stacked state of all N
replicas at once, laid out component-major ``(6, N)``. Why this choice: replicas of one
orbit stay close together, so one adaptive step sequence serves them all; each
right-hand-side evaluation is a few dozen vectorised operations on contiguous N-vectors
and the planets are evaluated once per stage, not once per replica; an 8th-order method
takes day-long steps at 1e-12 relative tolerance for near-Earth orbits (about 20 steps
for 30 days), and the dense output serves any number of output epochs without
shortening steps. The step follows the worst replica's DOP853 error norm with
``rtol=1e-12`` per component (au, au/day), which keeps the position error at the
decimetre level over months for near-Earth orbits (``tests/astro/test_nbody.py``
compares with REBOUND's IAS15).

The state transition matrix (STM) d x(t) / d x(t0) used by least-squares orbit fitting
comes from integrating the variational equations ``Phi' = [[0, I], [G, 0]] Phi`` with the
gravity-gradient matrix ``G = d r'' / d r`` alongside the state.
"""

from __future__ import annotations

import numpy as np
from scipy.integrate._ivp import dop853_coefficients as _DC

from lakepipe.astro import ephem
from lakepipe.errors import InputNotFoundError, UserError

DEFAULT_PERTURBERS: tuple[str, ...] = ("earth", "mars", "jupiter", "saturn")
PERTURBER_NAMES = tuple(b for b in ephem.BODIES if b != "sun")
RTOL = 1e-12
ATOL = 1e-16


def _check_perturbers(perturbers: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate perturber names (user input from specs): known, unique, no double Earth."""
    out = tuple(perturbers)
    for p in out:
        if p not in PERTURBER_NAMES:
            raise InputNotFoundError(
                f"unknown perturber {p!r}; available: {', '.join(PERTURBER_NAMES)}"
            )
    if len(set(out)) != len(out):
        raise UserError(f"perturbers listed twice: {list(out)}; list each body once")
    if ("earthmoon" in out) and ("earth" in out or "moon" in out):
        raise UserError(
            "perturbers: use either 'earthmoon' (Earth-Moon barycentre) or 'earth'/'moon', "
            "not both (the Earth's mass would count twice)"
        )
    return out


class _Forces:
    """Acceleration (and gravity gradient) for N particles at one time."""

    def __init__(self, epoch_jd_tdb: float, perturbers: tuple[str, ...]) -> None:
        self.epoch = float(epoch_jd_tdb)
        self.gm_sun = ephem.gm_au3_d2("sun")
        self.perturbers = perturbers
        self.table = ephem.PlanetTable(perturbers) if perturbers else None
        self.gm = self.table.gm if self.table is not None else np.zeros(0)
        self.n_eval = 0

    def planets(self, t_days: float) -> np.ndarray:
        if self.table is None:
            return np.zeros((0, 3))
        return self.table.helio_positions(self.epoch, t_days)

    def accel(self, r: np.ndarray, t_days: float) -> tuple[np.ndarray, list, list]:
        """Acceleration ``(3, N)`` of positions ``r (3, N)``, plus the planet-relative
        vectors and their 1/d^3 (reused for the gravity gradient).

        Component-major ``(3, N)`` arrays keep every numpy operation on contiguous
        N-vectors; a short Python loop runs over the few perturbers.
        """
        self.n_eval += 1
        r2 = r[0] * r[0] + r[1] * r[1] + r[2] * r[2]
        acc = r * (-self.gm_sun / (r2 * np.sqrt(r2)))
        ds: list[np.ndarray] = []
        inv3s: list[np.ndarray] = []
        if self.table is None:
            return acc, ds, inv3s
        rp = self.planets(t_days)  # (B, 3)
        indirect = np.zeros(3)
        for b in range(rp.shape[0]):
            d = rp[b][:, None] - r
            d2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
            inv_d3 = 1.0 / (d2 * np.sqrt(d2))
            acc += d * (self.gm[b] * inv_d3)
            rpn2 = float(rp[b] @ rp[b])
            indirect += rp[b] * (self.gm[b] / (rpn2 * np.sqrt(rpn2)))
            ds.append(d)
            inv3s.append(inv_d3)
        acc -= indirect[:, None]
        return acc, ds, inv3s

    def gradient(self, r: np.ndarray, ds: list, inv3s: list) -> np.ndarray:
        """Gravity gradient ``G[i, j] = d a_i / d r_j``, shape ``(3, 3, N)``."""
        eye = np.eye(3)[:, :, None]
        r2 = r[0] * r[0] + r[1] * r[1] + r[2] * r[2]
        inv_r3 = 1.0 / (r2 * np.sqrt(r2))
        g = -self.gm_sun * (eye * inv_r3 - 3.0 * r[:, None, :] * r[None, :, :] * (inv_r3 / r2))
        for b, (d, inv_d3) in enumerate(zip(ds, inv3s, strict=True)):
            w3 = self.gm[b] * inv_d3
            w5 = w3 / (d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
            g -= eye * w3
            g += 3.0 * d[:, None, :] * d[None, :, :] * w5
        return g


def _rhs_factory(forces: _Forces, n: int, with_stm: bool, sign: float):
    """ODE right-hand side in s = sign * t (s increases), state laid out ``(width, N)``.

    Rows 0-5 are x, y, z, vx, vy, vz; with the STM, rows 6 + 6 i + j hold Phi[i, j].
    """

    def rhs(s: float, y: np.ndarray) -> np.ndarray:
        yy = y
        r = yy[0:3]
        acc, ds, inv3s = forces.accel(r, sign * s)
        out = np.empty_like(yy)
        out[0:3] = yy[3:6]
        out[3:6] = acc
        if with_stm:
            phi = yy[6:].reshape(6, 6, n)
            dphi = out[6:].reshape(6, 6, n)
            dphi[0:3] = phi[3:6]
            dphi[3:6] = np.einsum("ijn,jkn->ikn", forces.gradient(r, ds, inv3s), phi[0:3])
        if sign < 0:
            out *= -1.0
        return out

    return rhs


def _combine(coeffs: np.ndarray, k: np.ndarray) -> np.ndarray:
    """sum_s coeffs[s] * k[s] without BLAS (multi-threaded gemv stalls on busy machines)."""
    return np.einsum("s,swn->wn", coeffs, k[: coeffs.size])


class _DOP853:
    """Dormand-Prince 8(5,3) with 7th-order dense output on a ``(width, N)`` state.

    Coefficients are those of Hairer's DOP853 (Hairer, Norsett & Wanner, *Solving ODEs
    I*, 2nd ed., sec. II.10), taken from ``scipy.integrate._ivp.dop853_coefficients``.
    Unlike :class:`scipy.integrate.DOP853` the error norm is the DOP853 norm of each
    replica (its own state components) and the step follows the worst replica, so no
    replica's error hides in an average over the cloud.
    """

    SAFETY = 0.9
    MIN_FACTOR = 0.2
    MAX_FACTOR = 10.0

    def __init__(self, rhs, y0: np.ndarray, rtol: float, atol: float) -> None:
        self.rhs = rhs
        self.rtol = rtol
        self.atol = atol
        self.t = 0.0
        self.y = y0
        self.f = rhs(0.0, y0)
        self.k = np.empty((_DC.N_STAGES_EXTENDED, *y0.shape))
        self.h = None

    def _norm(self, x: np.ndarray) -> float:
        return float(np.sqrt(np.max(np.mean(x * x, axis=0))))

    def initial_step(self, span: float) -> float:
        """Hairer's starting step (Solving ODEs I, sec. II.4), worst replica."""
        scale = self.atol + np.abs(self.y) * self.rtol
        d0 = self._norm(self.y / scale)
        d1 = self._norm(self.f / scale)
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        h0 = min(h0, span)
        f1 = self.rhs(h0, self.y + h0 * self.f)
        d2 = self._norm((f1 - self.f) / scale) / h0
        h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 8)
        return min(100 * h0, h1, span)

    def step(self, t_bound: float) -> None:
        """Advance one accepted step, never past ``t_bound``."""
        a, b, c = _DC.A, _DC.B, _DC.C
        k = self.k
        h = min(self.h, t_bound - self.t)
        while True:
            k[0] = self.f
            for s in range(1, _DC.N_STAGES):
                k[s] = self.rhs(self.t + c[s] * h, self.y + h * _combine(a[s, :s], k))
            y_new = self.y + h * _combine(b, k)
            f_new = self.rhs(self.t + h, y_new)
            k[_DC.N_STAGES] = f_new
            scale = self.atol + np.maximum(np.abs(self.y), np.abs(y_new)) * self.rtol
            e5 = _combine(_DC.E5, k) / scale
            e3 = _combine(_DC.E3, k) / scale
            e5n = np.sum(e5 * e5, axis=0)
            e3n = np.sum(e3 * e3, axis=0)
            denom = np.sqrt((e5n + 0.01 * e3n) * e5.shape[0])
            err = h * float(np.max(np.divide(e5n, denom, out=np.zeros_like(e5n), where=denom > 0)))
            if err < 1.0:
                factor = (
                    self.MAX_FACTOR
                    if err == 0
                    else min(self.MAX_FACTOR, self.SAFETY * err ** (-1 / 8))
                )
                break
            h *= max(self.MIN_FACTOR, self.SAFETY * err ** (-1 / 8))
            if h < 1e-12:
                raise RuntimeError("N-body step size underflow (collision with a planet?)")
        self.t_old, self.y_old, self.f_old, self.h_prev = self.t, self.y, self.f, h
        self.t, self.y, self.f = self.t + h, y_new, f_new
        self.h = h * factor
        self._dense = None

    def dense(self, t: float) -> np.ndarray:
        """State at ``t_old <= t <= t`` from the 7th-order interpolant."""
        if self._dense is None:
            k, h = self.k, self.h_prev
            for s in range(_DC.N_STAGES + 1, _DC.N_STAGES_EXTENDED):
                dy = h * _combine(_DC.A[s, :s], k)
                k[s] = self.rhs(self.t_old + _DC.C[s] * h, self.y_old + dy)
            dy = self.y - self.y_old
            f = np.empty((_DC.INTERPOLATOR_POWER, *self.y.shape))
            f[0] = dy
            f[1] = h * self.f_old - dy
            f[2] = 2 * dy - h * (self.f + self.f_old)
            f[3:] = h * np.einsum("ds,swn->dwn", _DC.D, k)
            self._dense = f
        x = (t - self.t_old) / self.h_prev
        y = np.zeros_like(self.y)
        for i, fi in enumerate(self._dense[::-1]):
            y += fi
            y *= x if i % 2 == 0 else 1.0 - x
        return y + self.y_old


def _integrate(
    y0: np.ndarray,
    n: int,
    epoch_jd_tdb: float,
    dt_days: np.ndarray,
    perturbers: tuple[str, ...],
    with_stm: bool,
    rtol: float,
    atol: float,
) -> np.ndarray:
    """Integrate the ``(width, N)`` state to each offset in ``dt_days`` -> ``(T, width, N)``."""
    out = np.empty((dt_days.size, *y0.shape))
    forces = _Forces(epoch_jd_tdb, perturbers)
    out[dt_days == 0.0] = y0
    for sign in (1.0, -1.0):
        sel = np.nonzero(dt_days * sign > 0.0)[0]
        if sel.size == 0:
            continue
        order = sel[np.argsort(dt_days[sel] * sign)]
        s_targets = dt_days[order] * sign
        end = float(s_targets[-1])
        solver = _DOP853(_rhs_factory(forces, n, with_stm, sign), y0.copy(), rtol, atol)
        solver.h = solver.initial_step(end)
        k = 0
        while k < s_targets.size:
            solver.step(end)
            while k < s_targets.size and s_targets[k] <= solver.t:
                out[order[k]] = solver.y if s_targets[k] == solver.t else solver.dense(s_targets[k])
                k += 1
    return out


def propagate(
    states: np.ndarray,
    epoch_jd_tdb: float,
    target_jd_tdb: np.ndarray,
    perturbers: tuple[str, ...] | list[str] = DEFAULT_PERTURBERS,
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> np.ndarray:
    """Propagate heliocentric states to target epochs under the Sun and ``perturbers``.

    Parameters
    ----------
    states
        ``(N, 6)`` (or ``(6,)``) heliocentric ICRS position (au) and velocity (au/day) at
        ``epoch_jd_tdb``.
    epoch_jd_tdb
        TDB Julian date of ``states``.
    target_jd_tdb
        ``(T,)`` TDB Julian dates, in any order, before and/or after the epoch.
    perturbers
        DE421 bodies whose attraction is included (``earth``, ``moon``, ``earthmoon``,
        ``mercury`` ... ``neptune``, ``pluto``); ``()`` for pure two-body motion.

    Returns
    -------
    np.ndarray
        ``(N, T, 6)`` states at the targets.
    """
    pert = _check_perturbers(perturbers)
    st = np.atleast_2d(np.asarray(states, dtype=np.float64))
    if st.shape[-1] != 6:
        raise ValueError(f"states must have shape (N, 6), got {st.shape}")
    n = st.shape[0]
    dt = np.atleast_1d(np.asarray(target_jd_tdb, dtype=np.float64)) - float(epoch_jd_tdb)
    y0 = np.ascontiguousarray(st.T)  # component-major (6, N)
    out = _integrate(y0, n, float(epoch_jd_tdb), dt, pert, False, rtol, atol)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def propagate_with_stm(
    state: np.ndarray,
    epoch_jd_tdb: float,
    target_jd_tdb: np.ndarray,
    perturbers: tuple[str, ...] | list[str] = DEFAULT_PERTURBERS,
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> tuple[np.ndarray, np.ndarray]:
    """Propagate one state and its state transition matrix.

    Returns ``states (T, 6)`` and ``stm (T, 6, 6)`` with ``stm[k] = d x(t_k) / d x(t0)``
    (rows: the propagated x, y, z, vx, vy, vz; columns: the initial ones).
    """
    pert = _check_perturbers(perturbers)
    st = np.asarray(state, dtype=np.float64).reshape(6)
    y0 = np.concatenate([st, np.eye(6).reshape(-1)])[:, None]  # (42, 1) component-major
    dt = np.atleast_1d(np.asarray(target_jd_tdb, dtype=np.float64)) - float(epoch_jd_tdb)
    out = _integrate(y0, 1, float(epoch_jd_tdb), dt, pert, True, rtol, atol)[:, :, 0]
    return out[:, :6].copy(), out[:, 6:].reshape(-1, 6, 6).copy()


def acceleration(
    positions: np.ndarray,
    jd_tdb: float,
    perturbers: tuple[str, ...] | list[str] = DEFAULT_PERTURBERS,
) -> np.ndarray:
    """Heliocentric acceleration (au/day^2) of massless bodies at ``(N, 3)`` positions."""
    forces = _Forces(float(jd_tdb), _check_perturbers(perturbers))
    r = np.ascontiguousarray(np.atleast_2d(np.asarray(positions, dtype=np.float64)).T)
    return forces.accel(r, 0.0)[0].T.copy()
