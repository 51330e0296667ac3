"""Observatory positions from MPC parallax constants.

An MPC observatory code maps to (longitude east in degrees, rho cos phi', rho sin phi'),
where phi' is the geocentric latitude and rho the geocentric distance in units of the
Earth's equatorial radius (MPC, "List Of Observatory Codes",
https://www.minorplanetcenter.net/iau/lists/ObsCodes.html). The values below are copied
from that list (snapshot mirrored in kirxkirx/vast ``ObsCodes.html``).

More codes can be added in three ways:

1. ``OBSERVATORIES["XYZ"] = Observatory("XYZ", lon_deg, rho_cos_phi, rho_sin_phi, name)``
   or :func:`register_observatory` at run time;
2. :func:`load_obscodes` with a path to a file in the MPC ``ObsCodes.html`` fixed-width
   format (the ``<pre>`` block) — the whole MPC list can be loaded this way;
3. the environment variable ``LAKEPIPE_OBSCODES`` naming such a file, read on first use.

Observer states are computed with astropy (UTC -> TDB, Earth orientation via
``EarthLocation.get_gcrs_posvel``) using only the IERS tables bundled with astropy; no
download is ever attempted.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lakepipe.astro import ephem
from lakepipe.errors import InputNotFoundError, ParseError

# Earth equatorial radius used to scale MPC parallax constants, km (IERS 2010 / WGS84).
EARTH_RADIUS_KM = 6378.137
SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class Observatory:
    """MPC parallax constants of one site (lon east deg; rho cos/sin phi' in Earth radii)."""

    code: str
    lon_deg: float
    rho_cos_phi: float
    rho_sin_phi: float
    name: str = ""

    def geocentric_km(self) -> np.ndarray:
        """Earth-fixed (ITRS) position in km, (x, y, z)."""
        lon = np.radians(self.lon_deg)
        return EARTH_RADIUS_KM * np.array(
            [self.rho_cos_phi * np.cos(lon), self.rho_cos_phi * np.sin(lon), self.rho_sin_phi]
        )


# MPC ObsCodes.html values (see module docstring).
OBSERVATORIES: dict[str, Observatory] = {
    o.code: o
    for o in (
        Observatory("500", 0.0, 0.0, 0.0, "Geocentric"),
        Observatory("309", 289.59569, 0.909943, -0.414336, "Cerro Paranal"),
        Observatory("568", 204.5278, 0.94171, +0.33725, "Maunakea"),
        Observatory(
            "691", 248.39966, 0.849466, +0.526479, "Steward Observatory, Kitt Peak-Spacewatch"
        ),
        Observatory("703", 249.26736, 0.845311, +0.533211, "Catalina Sky Survey"),
        Observatory("F51", 203.74409, 0.936241, +0.351543, "Pan-STARRS 1, Haleakala"),
        Observatory("G96", 249.21128, 0.845107, +0.533611, "Mt. Lemmon Survey"),
        Observatory("I41", 243.14022, 0.836322, +0.546875, "Palomar Mountain--ZTF"),
        Observatory("T05", 203.74299, 0.936236, +0.351547, "ATLAS-HKO, Haleakala"),
        Observatory("W68", 289.23502, 0.862845, -0.504269, "ATLAS Chile, Rio Hurtado"),
        Observatory(
            "X05", 289.25058, 0.864981, -0.500958, "Simonyi Survey Telescope, Rubin Observatory"
        ),
    )
}

_ENV_LOADED = False

# "I41 243.140220.836322+0.546875Palomar Mountain--ZTF": columns 1-3 code, 4-13 longitude,
# 14-21 rho cos phi', 22-30 rho sin phi', 31- name (fields may abut, so slice by column).
_CODE_RE = re.compile(r"^[0-9A-Za-z]{3}$")


def register_observatory(
    code: str, lon_deg: float, rho_cos_phi: float, rho_sin_phi: float, name: str = ""
) -> Observatory:
    """Add or replace an observatory code (parallax constants as in the MPC list)."""
    obs = Observatory(code, float(lon_deg), float(rho_cos_phi), float(rho_sin_phi), name)
    OBSERVATORIES[code] = obs
    return obs


def load_obscodes(path: str | Path) -> int:
    """Load an MPC ``ObsCodes.html``-format file; returns how many sites were added.

    Lines without parallax constants (space telescopes, roving observers) are skipped.
    A line whose numeric fields do not parse raises :class:`ParseError` naming file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"observatory code file not found: {path}")
    added = 0
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.rstrip("\n")
        code = line[:3]
        if not _CODE_RE.match(code) or line.startswith("Code"):
            continue
        fields = line[3:30]
        if not fields.strip():
            continue  # no fixed site (spacecraft, roving observer)
        try:
            lon = float(line[3:13])
            rcos = float(line[13:21])
            rsin = float(line[21:30])
        except ValueError as exc:
            raise ParseError(f"{path}:{lineno}: cannot parse parallax constants: {raw!r}") from exc
        register_observatory(code, lon, rcos, rsin, line[30:].strip())
        added += 1
    return added


def get_observatory(code: str) -> Observatory:
    """The :class:`Observatory` for an MPC code; unknown codes raise with the fix."""
    global _ENV_LOADED
    if code not in OBSERVATORIES and not _ENV_LOADED:
        _ENV_LOADED = True
        env = os.environ.get("LAKEPIPE_OBSCODES")
        if env:
            load_obscodes(env)
    try:
        return OBSERVATORIES[code]
    except KeyError:
        known = ", ".join(sorted(OBSERVATORIES))
        raise InputNotFoundError(
            f"unknown MPC observatory code {code!r}; known: {known}. Add it with "
            "lakepipe.astro.observatories.register_observatory(code, lon_deg, rho_cos_phi, "
            "rho_sin_phi), or load the MPC list with load_obscodes(path) or by pointing "
            "LAKEPIPE_OBSCODES at a copy of https://www.minorplanetcenter.net/iau/lists/ObsCodes.html"
        ) from None


def utc_to_tdb_jd(mjd_utc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TDB Julian date of UTC MJDs as two parts (jd1, jd2) via astropy (offline)."""
    from astropy.time import Time

    t = Time(np.atleast_1d(np.asarray(mjd_utc, dtype=np.float64)), format="mjd", scale="utc")
    with warnings.catch_warnings():
        # ERFA flags UTC dates a few years past its leap-second table as "dubious year";
        # no leap second is then assumed, the best available prediction.
        warnings.filterwarnings("ignore", message=".*dubious year.*")
        tdb = t.tdb
        return np.asarray(tdb.jd1), np.asarray(tdb.jd2)


def _geocentric_posvel(obs: Observatory, mjd_utc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GCRS position (au) and velocity (au/day) of the site relative to the geocentre."""
    n = mjd_utc.size
    if obs.rho_cos_phi == 0.0 and obs.rho_sin_phi == 0.0:
        return np.zeros((n, 3)), np.zeros((n, 3))
    from astropy import units as u
    from astropy.coordinates import EarthLocation
    from astropy.time import Time
    from astropy.utils import iers

    x, y, z = obs.geocentric_km()
    loc = EarthLocation.from_geocentric(x * u.km, y * u.km, z * u.km)
    t = Time(mjd_utc, format="mjd", scale="utc")
    # Offline only: the bundled IERS-A table covers polar motion and UT1-UTC up to its
    # prediction horizon; beyond it astropy falls back to the 50-yr mean polar motion and
    # zero UT1-UTC drift (sub-arcsecond site position effects; say so in a warning we
    # silence here because the project runs with warnings as errors).
    with (
        iers.conf.set_temp("auto_download", False),
        iers.conf.set_temp("auto_max_age", None),
        iers.conf.set_temp("iers_degraded_accuracy", "ignore"),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message=".*polar motion.*")
        warnings.filterwarnings("ignore", message=".*IERS.*")
        warnings.filterwarnings("ignore", message=".*dubious year.*")
        pos, vel = loc.get_gcrs_posvel(t)
    au_km = ephem.au_km()
    p = pos.xyz.to_value(u.km).T / au_km
    v = vel.xyz.to_value(u.km / u.s).T * SECONDS_PER_DAY / au_km
    return p, v


def warm_earth_orientation() -> None:
    """Parse astropy's bundled IERS table now (about a second, once per process).

    The runner's fork server calls this before workers fork, so every worker inherits
    the parsed table instead of parsing it again on its first observer position."""
    _geocentric_posvel(OBSERVATORIES["I41"], np.array([60676.0]))


def observer_state(
    code: str, mjd_utc: np.ndarray | float, *, heliocentric: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Position (au) and velocity (au/day) of an observatory, ICRS axes.

    Parameters
    ----------
    code
        MPC observatory code (``500`` is the geocentre).
    mjd_utc
        UTC MJDs, shape ``(T,)``.
    heliocentric
        Relative to the Sun (default) or to the solar-system barycentre.

    Returns
    -------
    pos, vel
        Arrays of shape ``(T, 3)``. Earth from DE421 at the TDB of each epoch plus the
        site's GCRS offset (Earth rotation, precession-nutation, polar motion by astropy).
    """
    obs = get_observatory(code)
    mjd = np.atleast_1d(np.asarray(mjd_utc, dtype=np.float64))
    jd1, jd2 = utc_to_tdb_jd(mjd)
    pe, ve = ephem.body_state("earth", jd1, jd2)
    if heliocentric:
        ps, vs = ephem.body_state("sun", jd1, jd2)
        pe, ve = pe - ps, ve - vs
    dp, dv = _geocentric_posvel(obs, mjd)
    return pe + dp, ve + dv
