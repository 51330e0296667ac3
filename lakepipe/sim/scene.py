"""What one exposure sees: its truth table and its pixels.

:class:`VirtualSurvey` ties the schedule (:mod:`lakepipe.sim.survey`), the static sky
(:mod:`lakepipe.sim.catalog`), the variables and transient (:mod:`lakepipe.sim.variables`)
and the asteroids (:mod:`lakepipe.sim.asteroids`) together. For an exposure it lists
every object that lands on the image — the **truth** — and renders the image from
exactly that list (:mod:`lakepipe.sim.render`).

Truth columns (one row per rendered object or defect; pixel positions 0-based, centre of
the first pixel at 0, at mid-exposure):

``night, exposure_id, kind, object_id, x_pix, y_pix, ra, dec, mag, flux_adu, peak_adu,
saturated, dx_pix, dy_pix``

``kind`` ∈ star, variable, transient, asteroid, appeared, cosmic_ray, hot_pixel,
bad_column (x = the column, y = the central row). ``object_id`` is the catalog
``source_id`` for stars, variables and appeared sources, 1 for the transient, the
asteroid number for asteroids, and an index for defects. ``mag`` is in the exposure's
filter (NaN for defects); ``flux_adu`` the total counts (ADU) in the exposure;
``peak_adu`` the brightest noise-free pixel above sky; ``saturated`` whether sky + peak
reaches ``SATURATE``; ``(dx_pix, dy_pix)`` the motion during the exposure (asteroids).

Randomness is per exposure and per purpose: noise from ``(seed, 10, exposure_id)``,
cosmic rays from ``(seed, 12, exposure_id)``, detector defects from
``(seed, 11, ccdid, qid)`` — so the same seed gives byte-identical images.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy.special import ndtr

from lakepipe.sim import render
from lakepipe.sim.catalog import KIND_VANISHED, SkyModel, filter_mag, propagate_pm
from lakepipe.sim.survey import Exposure, Survey, SurveyConfig
from lakepipe.sim.variables import transient_mag, variable_dmag

FULL_AREA_PIX = 3072 * 3080

TRUTH_SCHEMA = pa.schema(
    [
        ("night", pa.string()),
        ("exposure_id", pa.int64()),
        ("kind", pa.string()),
        ("object_id", pa.int64()),
        ("x_pix", pa.float64()),
        ("y_pix", pa.float64()),
        ("ra", pa.float64()),
        ("dec", pa.float64()),
        ("mag", pa.float64()),
        ("flux_adu", pa.float64()),
        ("peak_adu", pa.float64()),
        ("saturated", pa.bool_()),
        ("dx_pix", pa.float64()),
        ("dy_pix", pa.float64()),
    ]
)


@dataclass
class Scene:
    """Truth of one exposure and the point sources to render (trails expanded)."""

    exposure: Exposure
    truth: pa.Table
    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray


def mag_to_adu(mag: np.ndarray, zeropoint_mag: float) -> np.ndarray:
    """Counts (ADU) of a source of magnitude ``mag``: 10^(-0.4 (mag - MAGZP))."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=np.float64) - zeropoint_mag))


class VirtualSurvey:
    """The whole virtual survey: schedule, sky, asteroids, truth and pixels."""

    def __init__(self, config: SurveyConfig) -> None:
        self.config = config
        self.survey = Survey(config)
        self.sky = SkyModel(self.survey)

    @functools.cached_property
    def asteroids(self):  # -> lakepipe.sim.asteroids.Asteroids (imported lazily)
        from lakepipe.sim.asteroids import Asteroids

        return Asteroids(self.survey)

    @functools.cached_property
    def _static(self) -> dict[str, np.ndarray]:
        t = self.sky.objects
        keep = np.asarray(t.column("kind")) != KIND_VANISHED
        out = {name: np.asarray(t.column(name))[keep] for name in t.column_names}
        var = self.sky.variables
        idx = {int(s): i for i, s in enumerate(np.asarray(var.column("source_id")))}
        out["var_row"] = np.array([idx.get(int(s), -1) for s in out["source_id"]], dtype=np.int64)
        return out

    def scene(self, exposure_id: int) -> Scene:
        """The truth and render list of one exposure."""
        exp = self.survey.exposure(exposure_id)
        rows: list[dict[str, np.ndarray]] = []
        px: list[np.ndarray] = []
        py: list[np.ndarray] = []
        pf: list[np.ndarray] = []
        nx, ny = exp.naxis1, exp.naxis2
        hw = render.stamp_halfwidth(exp.sigma_pix)

        def on_image(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)

        def near_image(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            return (x > -hw - 1) & (x < nx + hw) & (y > -hw - 1) & (y < ny + hw)

        def add(kind, oid, x, y, ra, dec, mag, flux, dx=None, dy=None) -> None:
            n = len(x)
            zero = np.zeros(n)
            rows.append(
                {
                    "kind": np.full(n, kind, dtype=object),
                    "object_id": np.asarray(oid, dtype=np.int64),
                    "x_pix": np.asarray(x, dtype=np.float64),
                    "y_pix": np.asarray(y, dtype=np.float64),
                    "ra": np.asarray(ra, dtype=np.float64),
                    "dec": np.asarray(dec, dtype=np.float64),
                    "mag": np.asarray(mag, dtype=np.float64),
                    "flux_adu": np.asarray(flux, dtype=np.float64),
                    "dx_pix": zero if dx is None else np.asarray(dx, dtype=np.float64),
                    "dy_pix": zero if dy is None else np.asarray(dy, dtype=np.float64),
                }
            )

        # static sources (stars, variables, appeared): proper motion to the exposure epoch
        s = self._static
        ra, dec = propagate_pm(s["ra"], s["dec"], s["pmra"], s["pmdec"], exp.mjd)
        x, y = exp.wcs.world2pix(ra, dec)
        near = np.isfinite(x) & near_image(x, y)
        mag = filter_mag(s["phot_g_mean_mag"][near], s["bp_rp"][near], exp.filter)
        vr = s["var_row"][near]
        is_var = vr >= 0
        if is_var.any():
            v = self.sky.variables
            mag[is_var] += variable_dmag(
                np.asarray(v.column("var_type"))[vr[is_var]],
                np.asarray(v.column("period_d"))[vr[is_var]],
                np.asarray(v.column("amplitude_mag"))[vr[is_var]],
                np.asarray(v.column("epoch_mjd"))[vr[is_var]],
                exp.mjd,
            )
        flux = mag_to_adu(mag, exp.zeropoint_mag)
        xn, yn = x[near], y[near]
        px.append(xn)
        py.append(yn)
        pf.append(flux)
        on = on_image(xn, yn)
        kinds = s["kind"][near]
        for kind in np.unique(kinds[on]):
            m = on & (kinds == kind)
            add(
                kind,
                s["source_id"][near][m],
                xn[m],
                yn[m],
                ra[near][m],
                dec[near][m],
                mag[m],
                flux[m],
            )

        # the transient
        tr = self.sky.transient
        if tr is not None:
            m_t = float(
                transient_mag(exp.mjd, tr["t0_mjd"], tr["peak_mag"][exp.filter], tr["alpha"])
            )
            xt, yt = exp.wcs.world2pix(np.array([tr["ra"]]), np.array([tr["dec"]]))
            if math.isfinite(m_t) and np.isfinite(xt[0]) and near_image(xt, yt)[0]:
                ft = mag_to_adu(np.array([m_t]), exp.zeropoint_mag)
                px.append(xt)
                py.append(yt)
                pf.append(ft)
                if on_image(xt, yt)[0]:
                    add("transient", [tr["object_id"]], xt, yt, [tr["ra"]], [tr["dec"]], [m_t], ft)

        # asteroids, trailed from exposure start to end
        if self.config.n_asteroids:
            track = self.asteroids.track(exp)
            x0, y0 = exp.wcs.world2pix(track["ra_start"], track["dec_start"])
            x1, y1 = exp.wcs.world2pix(track["ra_end"], track["dec_end"])
            xm, ym = exp.wcs.world2pix(track["ra"], track["dec"])
            fa = mag_to_adu(track["mag"], exp.zeropoint_mag)
            ok = np.isfinite(x0) & np.isfinite(x1) & (near_image(x0, y0) | near_image(x1, y1))
            if ok.any():
                tx, ty, tf = render.trail_points(x0[ok], y0[ok], x1[ok], y1[ok], fa[ok])
                px.append(tx)
                py.append(ty)
                pf.append(tf)
            on_a = ok & np.isfinite(xm) & on_image(xm, ym)
            if on_a.any():
                add(
                    "asteroid",
                    track["number"][on_a],
                    xm[on_a],
                    ym[on_a],
                    track["ra"][on_a],
                    track["dec"][on_a],
                    track["mag"][on_a],
                    fa[on_a],
                    (x1 - x0)[on_a],
                    (y1 - y0)[on_a],
                )

        # defects (truth only; pixels are applied in image())
        if self.config.defects:
            hot_iy, hot_ix, hot_adu, bad_col = self._detector_defects(exp)
            ra_h, dec_h = exp.wcs.pix2world(hot_ix.astype(float), hot_iy.astype(float))
            add(
                "hot_pixel",
                np.arange(len(hot_ix)),
                hot_ix,
                hot_iy,
                ra_h,
                dec_h,
                np.full(len(hot_ix), np.nan),
                hot_adu,
            )
            # the dead column: x = its index, y = the central row (where ra/dec point)
            yc = (ny - 1) / 2.0
            ra_b, dec_b = exp.wcs.pix2world(np.array([float(bad_col)]), np.array([yc]))
            add("bad_column", [bad_col], [float(bad_col)], [yc], ra_b, dec_b, [np.nan], [np.nan])
            cr = self._cosmic_rays(exp)
            ra_c, dec_c = exp.wcs.pix2world(cr[3][:, 0], cr[3][:, 1])
            add(
                "cosmic_ray",
                np.arange(len(cr[4])),
                cr[3][:, 0],
                cr[3][:, 1],
                ra_c,
                dec_c,
                np.full(len(cr[4]), np.nan),
                cr[4],
            )

        truth = self._truth_table(exp, rows)
        return Scene(
            exposure=exp,
            truth=truth,
            x=np.concatenate(px) if px else np.empty(0),
            y=np.concatenate(py) if py else np.empty(0),
            flux=np.concatenate(pf) if pf else np.empty(0),
        )

    def _truth_table(self, exp: Exposure, rows: list[dict]) -> pa.Table:
        if not rows:
            return TRUTH_SCHEMA.empty_table()
        cols = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
        n = len(cols["kind"])
        point = np.isin(cols["kind"], ["star", "variable", "transient", "asteroid", "appeared"])
        # brightest pixel of an isolated source: the pixel-integrated PSF at the pixel
        # containing the centre (exact for a static source)
        sig = exp.sigma_pix
        x, y = cols["x_pix"], cols["y_pix"]
        with np.errstate(invalid="ignore"):
            fx = ndtr((np.rint(x) + 0.5 - x) / sig) - ndtr((np.rint(x) - 0.5 - x) / sig)
            fy = ndtr((np.rint(y) + 0.5 - y) / sig) - ndtr((np.rint(y) - 0.5 - y) / sig)
        trail = np.hypot(cols["dx_pix"], cols["dy_pix"])
        # a trail spreads the peak over ~(1 + length / (2.5 sigma)) PSF widths
        peak = np.where(
            point, cols["flux_adu"] * fx * fy / (1.0 + trail / (2.5 * sig)), cols["flux_adu"]
        )
        saturated = np.nan_to_num(peak) + exp.sky_adu >= exp.saturate_adu
        return pa.table(
            {
                "night": pa.array([exp.night] * n, pa.string()),
                "exposure_id": pa.array(np.full(n, exp.exposure_id), pa.int64()),
                "kind": pa.array(cols["kind"].tolist(), pa.string()),
                "object_id": pa.array(cols["object_id"], pa.int64()),
                "x_pix": pa.array(cols["x_pix"], pa.float64()),
                "y_pix": pa.array(cols["y_pix"], pa.float64()),
                "ra": pa.array(cols["ra"], pa.float64()),
                "dec": pa.array(cols["dec"], pa.float64()),
                "mag": pa.array(cols["mag"], pa.float64()),
                "flux_adu": pa.array(cols["flux_adu"], pa.float64()),
                "peak_adu": pa.array(peak, pa.float64()),
                "saturated": pa.array(saturated, pa.bool_()),
                "dx_pix": pa.array(cols["dx_pix"], pa.float64()),
                "dy_pix": pa.array(cols["dy_pix"], pa.float64()),
            },
            schema=TRUTH_SCHEMA,
        )

    def _detector_defects(self, exp: Exposure) -> tuple:
        return render.detector_defects(
            self.survey.rng(11, exp.ccdid, exp.qid), (exp.naxis2, exp.naxis1)
        )

    def _cosmic_rays(self, exp: Exposure) -> tuple:
        area = exp.naxis1 * exp.naxis2
        n = round(self.config.cosmic_rays * area / FULL_AREA_PIX * exp.exptime_s / 30.0)
        return render.cosmic_rays(
            self.survey.rng(12, exp.exposure_id), (exp.naxis2, exp.naxis1), n, exp.gain_e_per_adu
        )

    def render(self, scene: Scene) -> np.ndarray:
        """The science image (float32 ADU) of a scene: sources, sky, noise, defects."""
        exp = scene.exposure
        shape = (exp.naxis2, exp.naxis1)
        model = np.zeros(shape, dtype=np.float32)
        render.render_psfs(shape, scene.x, scene.y, scene.flux, exp.sigma_pix, out=model)
        rng = self.survey.rng(10, exp.exposure_id)
        img = render.add_noise(model, exp.sky_adu, exp.gain_e_per_adu, exp.rdnoise_e, rng)
        del model
        if self.config.defects:
            cy, cx, cadu, _, _ = self._cosmic_rays(exp)
            np.add.at(img, (cy, cx), cadu.astype(np.float32))
            hy, hx, hadu, bad_col = self._detector_defects(exp)
            np.add.at(img, (hy, hx), hadu.astype(np.float32))
            # a dead column: no signal, read noise only
            img[:, bad_col] = (
                rng.standard_normal(shape[0]) * exp.rdnoise_e / exp.gain_e_per_adu
            ).astype(np.float32)
        np.minimum(img, np.float32(exp.saturate_adu), out=img)
        return img

    def image(self, exposure_id: int) -> tuple[np.ndarray, Scene]:
        """Render one exposure: (float32 image, its scene)."""
        scene = self.scene(exposure_id)
        return self.render(scene), scene
