"""Asteroids of the virtual survey: orbits built to cross the fields, and their tracks.

Asteroid ``i`` is placed so that, seen from Palomar (MPC I41) at the mid-time ``t_i`` of
one exposure of field ``i mod n_fields`` (spread over the survey span), it lies at a
random point well inside that field: its heliocentric distance ``r`` (2.2–3.2 au, main
belt) fixes the distance along the line of sight, and it gets a near-circular prograde
velocity (speed ``sqrt(GM/r)`` scaled by 0.93–1.07, plus a radial part of ~5 %; orbit
plane tilted 2–15° from the ecliptic about the radius
vector). That state at ``t_i`` (TDB) is the asteroid's osculating state; positions at
every exposure come from the dynamics module (:func:`lakepipe.astro.observe.ephemeris`:
N-body integration under the Sun and planets with DE421 positions, light-time
corrected, topocentric from I41). The exposure's start, middle and end positions give
the trail. ``H`` is chosen for ``V≈18–19.2`` at ``t_i`` with ``G = 0.15``; survey
magnitudes add S-type-like colours ``g-V = +0.25``, ``r-V = -0.20``, ``i-V = -0.35``
(approximate, e.g. DeMeo & Carry 2013 S-complex colours).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pyarrow as pa

from lakepipe.sim.survey import Exposure, Survey

ASTEROID_NUMBER_BASE = 900001
COLOUR_V = {"zg": 0.25, "zr": -0.20, "zi": -0.35}
SLOPE_G = 0.15


def _unit(ra_deg: float, dec_deg: float) -> np.ndarray:
    ra, dec = math.radians(ra_deg), math.radians(dec_deg)
    return np.array([math.cos(dec) * math.cos(ra), math.cos(dec) * math.sin(ra), math.sin(dec)])


def _rotate_about(v: np.ndarray, axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rodrigues rotation of ``v`` about unit ``axis``."""
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return v * c + np.cross(axis, v) * s + axis * np.dot(axis, v) * (1.0 - c)


class Asteroids:
    """The survey's asteroids: initial states, ephemerides at every exposure, truth."""

    def __init__(self, survey: Survey) -> None:
        self.survey = survey
        self.n = survey.config.n_asteroids

    @functools.cached_property
    def orbits(self) -> dict[str, np.ndarray]:
        """``number, designation, epoch_jd_tdb, state (N, 6), H, G`` of every asteroid."""
        from lakepipe.astro import kepler, observe
        from lakepipe.astro.observatories import observer_state, utc_to_tdb_jd

        rng = self.survey.rng(5)
        exps = self.survey.exposures
        t_first, t_last = exps[0].mjd, exps[-1].mjd
        w, h = self.survey.footprint_deg
        gm = kepler.gm_sun()
        n_ecl = kepler.ecliptic_to_equatorial(np.array([0.0, 0.0, 1.0]))
        # t_i: the mid-time of the field's exposure nearest the (i+1)/(n+1) point of the
        # survey span, so every asteroid is on at least that exposure
        epochs_mjd = []
        for i in range(self.n):
            fld = self.survey.fields[i % len(self.survey.fields)]
            t_goal = t_first + (t_last - t_first) * (i + 1) / (self.n + 1)
            t_i = min((e.mjd for e in exps if e.field == fld.field), key=lambda m: abs(m - t_goal))
            epochs_mjd.append(t_i)
        observers = observer_state("I41", np.array(epochs_mjd))[0] if self.n else np.empty((0, 3))
        states, v_target, v0 = [], [], []
        for i in range(self.n):
            fld = self.survey.fields[i % len(self.survey.fields)]
            dec = fld.dec + rng.uniform(-0.3, 0.3) * h
            ra = fld.ra + rng.uniform(-0.3, 0.3) * w / math.cos(math.radians(dec))
            r_helio = rng.uniform(2.2, 3.2)
            o = observers[i]
            u = _unit(ra % 360.0, dec)
            # |o + Δ u| = r  →  Δ = -o·u + sqrt((o·u)² - |o|² + r²)
            ou = float(np.dot(o, u))
            delta = -ou + math.sqrt(ou * ou - float(np.dot(o, o)) + r_helio**2)
            pos = o + delta * u
            rhat = pos / np.linalg.norm(pos)
            hvec = n_ecl - np.dot(n_ecl, rhat) * rhat
            hvec /= np.linalg.norm(hvec)
            tilt = math.radians(rng.uniform(2.0, 15.0)) * (1 if rng.uniform() < 0.5 else -1)
            hvec = _rotate_about(hvec, rhat, tilt)
            vdir = np.cross(hvec, rhat)
            speed = math.sqrt(gm / np.linalg.norm(pos)) * rng.uniform(0.93, 1.07)
            # a small radial component so the epoch is not an apsis
            vel = speed * (vdir + rng.normal(0.0, 0.05) * rhat)
            states.append(np.concatenate([pos, vel]))
            v_target.append(rng.uniform(18.0, 19.2))
            # V for H = 0 from the geometry at t_i (light time is irrelevant for a target)
            phase = math.degrees(math.acos(float(np.dot(pos, pos - o)) / (r_helio * delta)))
            v0.append(float(observe.predicted_v_mag(0.0, SLOPE_G, r_helio, delta, phase)))
        states_arr = np.array(states).reshape(self.n, 6)
        jd1, jd2 = utc_to_tdb_jd(np.array(epochs_mjd))
        epoch_jd = jd1 + jd2
        # V is linear in H (V = H + 5 log10(r Δ) - 2.5 log10 Φ): H from the target V at t_i
        hmag = np.array(v_target) - np.array(v0)
        numbers = np.arange(ASTEROID_NUMBER_BASE, ASTEROID_NUMBER_BASE + self.n, dtype=np.int64)
        return {
            "number": numbers,
            "designation": np.array([f"SIM{k:04d}" for k in range(1, self.n + 1)]),
            "epoch_jd_tdb": epoch_jd,
            "state": states_arr,
            "H": hmag,
            "G": np.full(self.n, SLOPE_G),
        }

    @functools.cached_property
    def _ephemerides(self) -> dict[str, np.ndarray]:
        """Topocentric ephemerides at every exposure's start, middle and end: (N, E, 3)."""
        from lakepipe.astro import observe

        exps = self.survey.exposures
        half = np.array([e.exptime_s / 2.0 / 86400.0 for e in exps])
        mid = np.array([e.mjd for e in exps])
        times = np.stack([mid - half, mid, mid + half], axis=1).ravel()
        orb = self.orbits
        ra = np.empty((self.n, times.size))
        dec = np.empty_like(ra)
        vmag = np.empty_like(ra)
        extra = {k: np.empty_like(ra) for k in ("delta_au", "r_au", "phase_deg")}
        for i in range(self.n):
            eph = observe.ephemeris(orb["state"][i : i + 1], float(orb["epoch_jd_tdb"][i]), times)
            ra[i], dec[i] = eph["ra_deg"][0], eph["dec_deg"][0]
            for k in extra:
                extra[k][i] = eph[k][0]
            vmag[i] = observe.predicted_v_mag(
                orb["H"][i], orb["G"][i], eph["r_au"][0], eph["delta_au"][0], eph["phase_deg"][0]
            )
        shape = (self.n, len(exps), 3)
        out = {"ra": ra.reshape(shape), "dec": dec.reshape(shape), "vmag": vmag.reshape(shape)}
        out.update({k: v.reshape(shape) for k, v in extra.items()})
        return out

    def track(self, exp: Exposure) -> dict[str, np.ndarray]:
        """Positions (deg) at start, middle, end of ``exp`` and magnitudes in its filter."""
        e = self._ephemerides
        j = exp.index
        return {
            "number": self.orbits["number"],
            "ra_start": e["ra"][:, j, 0],
            "dec_start": e["dec"][:, j, 0],
            "ra": e["ra"][:, j, 1],
            "dec": e["dec"][:, j, 1],
            "ra_end": e["ra"][:, j, 2],
            "dec_end": e["dec"][:, j, 2],
            "mag": e["vmag"][:, j, 1] + COLOUR_V[exp.filter],
        }

    def truth(self, exposures: list[Exposure]) -> dict[str, pa.Table]:
        """Orbits (states and elements at their epochs) and per-exposure positions."""
        from lakepipe.astro import kepler

        orb = self.orbits
        el = kepler.state_to_elements(orb["state"]) if self.n else {}
        st = orb["state"]
        asteroids = {
            "number": pa.array(orb["number"], pa.int64()),
            "designation": pa.array(orb["designation"].tolist(), pa.string()),
            "epoch_jd_tdb": pa.array(orb["epoch_jd_tdb"], pa.float64()),
        }
        for k, name in enumerate(
            ("x_au", "y_au", "z_au", "vx_au_per_day", "vy_au_per_day", "vz_au_per_day")
        ):
            asteroids[name] = pa.array(st[:, k], pa.float64())
        for name in kepler.ELEMENT_NAMES:
            asteroids[name] = pa.array(np.asarray(el.get(name, np.empty(0))), pa.float64())
        asteroids["h_mag"] = pa.array(orb["H"], pa.float64())
        asteroids["g_slope"] = pa.array(orb["G"], pa.float64())
        e = self._ephemerides
        rows: dict[str, list] = {
            k: []
            for k in (
                "number",
                "exposure_id",
                "night",
                "mjd",
                "ra",
                "dec",
                "ra_start",
                "dec_start",
                "ra_end",
                "dec_end",
                "v_mag",
                "mag",
                "delta_au",
                "r_au",
                "phase_deg",
                "x_pix",
                "y_pix",
                "on_image",
            )
        }
        for exp in exposures:
            j = exp.index
            x, y = exp.wcs.world2pix(e["ra"][:, j, 1], e["dec"][:, j, 1])
            on = (x >= -0.5) & (x < exp.naxis1 - 0.5) & (y >= -0.5) & (y < exp.naxis2 - 0.5)
            for i in range(self.n):
                rows["number"].append(int(orb["number"][i]))
                rows["exposure_id"].append(exp.exposure_id)
                rows["night"].append(exp.night)
                rows["mjd"].append(exp.mjd)
                rows["ra"].append(float(e["ra"][i, j, 1]))
                rows["dec"].append(float(e["dec"][i, j, 1]))
                rows["ra_start"].append(float(e["ra"][i, j, 0]))
                rows["dec_start"].append(float(e["dec"][i, j, 0]))
                rows["ra_end"].append(float(e["ra"][i, j, 2]))
                rows["dec_end"].append(float(e["dec"][i, j, 2]))
                rows["v_mag"].append(float(e["vmag"][i, j, 1]))
                rows["mag"].append(float(e["vmag"][i, j, 1] + COLOUR_V[exp.filter]))
                rows["delta_au"].append(float(e["delta_au"][i, j, 1]))
                rows["r_au"].append(float(e["r_au"][i, j, 1]))
                rows["phase_deg"].append(float(e["phase_deg"][i, j, 1]))
                rows["x_pix"].append(float(x[i]))
                rows["y_pix"].append(float(y[i]))
                rows["on_image"].append(bool(on[i]))
        types = {"number": pa.int64(), "exposure_id": pa.int64(), "night": pa.string(),
                 "on_image": pa.bool_()}  # fmt: skip
        positions = pa.table({k: pa.array(v, types.get(k, pa.float64())) for k, v in rows.items()})
        return {"asteroids": pa.table(asteroids), "positions": positions}
