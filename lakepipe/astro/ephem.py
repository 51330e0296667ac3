"""Planetary positions from JPL DE421, read offline.

The ephemeris is the ``de421`` Python package (Chebyshev coefficient arrays, Folkner,
Williams & Boggs 2009, IPN Progress Report 42-178) read with jplephem's legacy
:class:`jplephem.ephem.Ephemeris` class; nothing is downloaded. Everything here is
barycentric (solar-system barycentre), in the ICRF/ICRS equatorial axes of DE421,
with positions in au and velocities in au/day, as functions of the TDB Julian date.

Bodies: ``sun``, ``mercury``, ``venus``, ``earth``, ``moon``, ``earthmoon`` (the
Earth-Moon barycentre), ``mars``, ``jupiter``, ``saturn``, ``uranus``, ``neptune``,
``pluto``. For Mars and beyond DE421 provides the barycentre of the planetary system,
which is what we return (the right point mass for perturbations of a distant body).
The Earth is derived from the Earth-Moon barycentre B and the geocentric Moon M as
``earth = B - M / (1 + EMRAT)`` and ``moon = earth + M`` (EMRAT = Earth/Moon mass ratio;
DE421 header constants).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

from lakepipe.errors import InputNotFoundError

BODIES = (
    "sun",
    "mercury",
    "venus",
    "earth",
    "moon",
    "earthmoon",
    "mars",
    "jupiter",
    "saturn",
    "uranus",
    "neptune",
    "pluto",
)

# jplephem segment names of the bodies DE421 tabulates directly.
_SEGMENT = {
    "sun": "sun",
    "mercury": "mercury",
    "venus": "venus",
    "earthmoon": "earthmoon",
    "mars": "mars",
    "jupiter": "jupiter",
    "saturn": "saturn",
    "uranus": "uranus",
    "neptune": "neptune",
    "pluto": "pluto",
}


@dataclass(frozen=True)
class _DE421:
    eph: object
    au_km: float
    emrat: float
    jd_start: float
    jd_end: float
    gm: dict[str, float]


@functools.cache
def _de421() -> _DE421:
    """Load the DE421 package once per process (coefficients load lazily per body)."""
    import de421

    # jplephem.ephem is the deprecated package-ephemeris reader; it is the only reader
    # for the `de421` Python package, which ships no SPK file. Silence only its notice.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from jplephem.ephem import Ephemeris

        eph = Ephemeris(de421)
    c = eph.__dict__
    emrat = float(c["EMRAT"])
    gmb = float(c["GMB"])
    # GM values of the DE421 header, au^3/day^2 (Folkner et al. 2008, JPL IOM 343R-08-003).
    gm = {
        "sun": float(c["GMS"]),
        "mercury": float(c["GM1"]),
        "venus": float(c["GM2"]),
        "earthmoon": gmb,
        "earth": gmb * emrat / (1.0 + emrat),
        "moon": gmb / (1.0 + emrat),
        "mars": float(c["GM4"]),
        "jupiter": float(c["GM5"]),
        "saturn": float(c["GM6"]),
        "uranus": float(c["GM7"]),
        "neptune": float(c["GM8"]),
        "pluto": float(c["GM9"]),
    }
    return _DE421(
        eph=eph,
        au_km=float(c["AU"]),
        emrat=emrat,
        jd_start=float(c["jalpha"]),
        jd_end=float(c["jomega"]),
        gm=gm,
    )


def gm_au3_d2(body: str) -> float:
    """GM of ``body`` in au^3/day^2 from the DE421 header constants."""
    _check_body(body)
    return _de421().gm[body]


def au_km() -> float:
    """The astronomical unit of DE421 in km (149597870.6996262; IAU 2012: 149597870.7)."""
    return _de421().au_km


def coverage_jd_tdb() -> tuple[float, float]:
    """First and last TDB Julian date DE421 covers (1899-07-29 to 2053-10-09)."""
    d = _de421()
    return d.jd_start, d.jd_end


def _check_body(body: str) -> None:
    if body not in BODIES:
        raise InputNotFoundError(
            f"unknown body {body!r}; DE421 bodies available: {', '.join(BODIES)}"
        )


def _check_range(jd: np.ndarray) -> None:
    d = _de421()
    if jd.size and (np.nanmin(jd) < d.jd_start or np.nanmax(jd) > d.jd_end):
        raise InputNotFoundError(
            f"TDB Julian dates {np.nanmin(jd):.1f}..{np.nanmax(jd):.1f} fall outside DE421 "
            f"coverage {d.jd_start:.1f}..{d.jd_end:.1f}"
        )


def _segment_state(name: str, jd: np.ndarray, jd2: np.ndarray | float) -> tuple:
    d = _de421()
    p, v = d.eph.position_and_velocity(name, jd, jd2)
    # km, km/day -> au, au/day; jplephem returns (3, T)
    return p.T / d.au_km, v.T / d.au_km


def body_state(
    body: str, jd_tdb: np.ndarray | float, jd_tdb2: np.ndarray | float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Barycentric ICRS position (au) and velocity (au/day) of ``body``.

    Parameters
    ----------
    body
        One of :data:`BODIES`.
    jd_tdb, jd_tdb2
        TDB Julian date, optionally split in two parts for precision (summed); any
        broadcastable shapes.

    Returns
    -------
    pos, vel
        Arrays of shape ``(*shape, 3)`` (``(3,)`` for a scalar date).
    """
    _check_body(body)
    scalar = np.ndim(jd_tdb) == 0 and np.ndim(jd_tdb2) == 0
    jd = np.atleast_1d(np.asarray(jd_tdb, dtype=np.float64))
    jd2 = np.asarray(jd_tdb2, dtype=np.float64)
    jd, jd2 = np.broadcast_arrays(jd, jd2)
    shape = jd.shape
    jd = np.ascontiguousarray(jd, dtype=np.float64).reshape(-1)
    jd2 = np.ascontiguousarray(jd2, dtype=np.float64).reshape(-1)
    _check_range(jd + jd2)
    if body in _SEGMENT:
        pos, vel = _segment_state(_SEGMENT[body], jd, jd2)
    else:
        emrat = _de421().emrat
        pb, vb = _segment_state("earthmoon", jd, jd2)
        pm, vm = _segment_state("moon", jd, jd2)  # geocentric Moon
        # Earth = EMB - Moon_geocentric / (1 + EMRAT)  (definition of the EMB)
        pos = pb - pm / (1.0 + emrat)
        vel = vb - vm / (1.0 + emrat)
        if body == "moon":
            pos = pos + pm
            vel = vel + vm
    if scalar:
        return pos[0], vel[0]
    return pos.reshape(*shape, 3), vel.reshape(*shape, 3)


def heliocentric_state(
    body: str, jd_tdb: np.ndarray | float, jd_tdb2: np.ndarray | float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Heliocentric ICRS position (au) and velocity (au/day): ``body - sun``."""
    p, v = body_state(body, jd_tdb, jd_tdb2)
    ps, vs = body_state("sun", jd_tdb, jd_tdb2)
    return p - ps, v - vs


class PlanetTable:
    """Fast heliocentric positions of a fixed set of bodies at one TDB date at a time.

    The integrator asks for a handful of bodies at thousands of scalar dates; this
    evaluates the DE421 Chebyshev series directly (Clenshaw-free recurrence, same
    formula as jplephem) with no per-call array allocation beyond a few tiny vectors.

    Parameters
    ----------
    bodies
        Body names (see :data:`BODIES`); ``sun`` is always evaluated as the origin.
    """

    def __init__(self, bodies: tuple[str, ...] | list[str]) -> None:
        for b in bodies:
            _check_body(b)
        self.bodies = tuple(bodies)
        d = _de421()
        self._d = d
        self.gm = np.array([d.gm[b] for b in self.bodies])
        # Each entry: (coefficient sets (S, 3, K), days per set, weight on the series)
        segs: dict[str, tuple[np.ndarray, float]] = {}
        need = {"sun"}
        for b in self.bodies:
            if b in ("earth", "moon"):
                need |= {"earthmoon", "moon"}
            else:
                need.add(_SEGMENT[b])
        for name in sorted(need):
            coeffs = d.eph.load(name)
            days = (d.jd_end - d.jd_start) / coeffs.shape[0]
            segs[name] = (np.ascontiguousarray(coeffs / d.au_km), days)
        self._segs = segs

    def _eval(self, name: str, jd: float, jd2: float) -> np.ndarray:
        coeffs, days = self._segs[name]
        n_sets = coeffs.shape[0]
        x = (jd - self._d.jd_start) + jd2
        if x < 0.0 or x > n_sets * days:
            _check_range(np.array([jd + jd2]))
        idx, off = divmod(x, days)
        idx = int(idx)
        if idx == n_sets:  # the very last instant belongs to the last set
            idx -= 1
            off += days
        c = coeffs[idx]
        k = c.shape[1]
        t = 2.0 * off / days - 1.0
        tt = np.empty(k)
        tt[0] = 1.0
        tt[1] = t
        two_t = 2.0 * t
        for i in range(2, k):
            tt[i] = two_t * tt[i - 1] - tt[i - 2]
        return c @ tt

    def helio_positions(self, jd_tdb: float, jd_tdb2: float = 0.0) -> np.ndarray:
        """Heliocentric ICRS positions (au) of :attr:`bodies` at ``jd_tdb + jd_tdb2``, ``(B, 3)``.

        Pass a whole-ish epoch in ``jd_tdb`` and the offset in days in ``jd_tdb2``: a single
        float64 Julian date resolves only ~40 microseconds (about a metre of Earth motion).
        """
        cache: dict[str, np.ndarray] = {}

        def seg(name: str) -> np.ndarray:
            if name not in cache:
                cache[name] = self._eval(name, jd_tdb, jd_tdb2)
            return cache[name]

        sun = seg("sun")
        out = np.empty((len(self.bodies), 3))
        for i, b in enumerate(self.bodies):
            if b in ("earth", "moon"):
                earth = seg("earthmoon") - seg("moon") / (1.0 + self._d.emrat)
                out[i] = earth + seg("moon") if b == "moon" else earth
            else:
                out[i] = seg(_SEGMENT[b])
        return out - sun
