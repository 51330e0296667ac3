"""The ``sim`` archive: lakepipe's embedded, seeded virtual ZTF-like survey.

``archive: {kind: sim, seed: 7}`` (plus any :class:`~lakepipe.sim.survey.SurveyConfig`
knob: ``naxis1``, ``n_fields``, ``n_nights``, ``n_stars``, ...) serves exposures, full
images, cutouts, a reference catalog and the truth, all deterministic for the seed.

Interface (shared with the other archive kinds):

- :meth:`SimArchive.exposures` — rows of the ``exposures`` contract (no ``_healpix_29``);
- :meth:`SimArchive.nights` — nights with matching exposures;
- :meth:`SimArchive.image` / :meth:`SimArchive.image_fits` — the full science image;
- :meth:`SimArchive.cutout` / :meth:`SimArchive.cutout_fits` — an exact sub-array of the
  full image with ``CRPIX`` shifted;
- :meth:`SimArchive.catalog` / :meth:`SimArchive.write_catalog` — Gaia-like catalog;
- :meth:`SimArchive.truth`, :meth:`SimArchive.objects`, :meth:`SimArchive.variables`,
  :meth:`SimArchive.transient`, :meth:`SimArchive.asteroid_truth` — what was injected;
- :meth:`SimArchive.sky_truth`, :meth:`SimArchive.truth_tables`,
  :meth:`SimArchive.orbit_truth` — the same as rows of the ``truth_*`` contracts.

Full images are rendered once and kept in a small per-process LRU cache, so many cutouts
of one exposure cost one render.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits

from lakepipe.archives.base import Archive, ArchiveParams, register_archive
from lakepipe.archives.query import ExposureQuery
from lakepipe.errors import InputNotFoundError
from lakepipe.sim import fitsio
from lakepipe.sim.scene import VirtualSurvey
from lakepipe.sim.survey import FILTERS, SurveyConfig

CUTOUT_STATUSES = ("ok", "partial", "off_chip")
# Bump when the survey's output (schedule, pixels, truth) changes for the same params, so
# the runner's fingerprints invalidate lakes built with an older simulation.
SIM_VERSION = "1"


@register_archive("sim")
class SimArchive(Archive):
    """Seeded virtual ZTF-like survey (the offline default archive).

    A grid of ``n_fields`` CCD-quadrant fields (``naxis1`` × ``naxis2`` pixels at
    ``pixscale_arcsec``) around (``ra``, ``dec``), visited ``visits_per_night`` times a
    night for ``n_nights`` nights from ``start``, cycling through ``filters``. Per
    exposure: MJD (UTC, mid-exposure), airmass from the true altitude at Palomar, seeing,
    sky, zeropoint and 5σ depth, a jittered TAN WCS. Sky: a Gaia-like catalog of
    ``n_stars`` per field area between ``mag_bright`` and ``mag_faint`` (G), with
    ``n_variables`` periodic variables, ``n_vanished`` catalog stars never rendered,
    ``n_appeared`` rendered sources not in the catalog, one fading ``transient`` and
    ``n_asteroids`` asteroids (N-body with DE421, seen from I41, trailed). Detector:
    Gaussian PSF, Poisson and read noise via ``gain_e_per_adu``/``rdnoise_e``, saturation
    at ``saturate_adu``, and with ``defects`` cosmic rays, hot pixels and a dead column.

    Everything is a deterministic function of the parameters (same seed, same bytes).
    The truth is available per exposure (:meth:`truth`), per night as lake-shaped
    ``truth_objects``/``truth_asteroids`` tables (:meth:`truth_tables`), for the static
    sky (:meth:`sky_truth`) and as a folder of Parquet files (:meth:`write_truth`).

    Example::

        archive: {kind: sim, seed: 7, n_fields: 4, n_nights: 3, naxis1: 1024, naxis2: 1024}
    """

    class Params(SurveyConfig, ArchiveParams):
        pass

    cache_size = 3
    #: Filter codes the survey can have (``where: {filters: …}`` is checked against them)
    known_filters: tuple[str, ...] = FILTERS

    def __init__(self, params: ArchiveParams, *, spec_dir: Path | None = None) -> None:
        super().__init__(params, spec_dir=spec_dir)
        cfg = {k: v for k, v in params.model_dump().items() if k in SurveyConfig.model_fields}
        self.config = SurveyConfig(**cfg)
        self.sim = VirtualSurvey(self.config)
        self._images: OrderedDict[int, tuple[fits.Header, np.ndarray]] = OrderedDict()
        # the loopback emulator serves requests from threads: one render at a time
        self._lock = threading.RLock()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, **knobs: object) -> SimArchive:
        """Convenience constructor: ``SimArchive.from_config(seed=3, naxis1=512)``."""
        return cls(cls.Params(**knobs))

    def fingerprint(self) -> str:
        """Archive identity for the runner: kind, simulation version and every knob."""
        return f"{self.kind}:v{SIM_VERSION}:{self.config.model_dump_json()}"

    def warm_up(self) -> SimArchive:
        """Compute the per-process caches (catalog, schedule, asteroid ephemerides) now.

        The first image otherwise pays for them (seconds: the asteroids' N-body
        ephemerides and astropy's first read of its IERS table); servers call this
        before accepting requests. Returns ``self``.
        """
        self._all_exposures()
        _ = self.sim.sky.objects, self.sim.sky.variables
        if self.config.n_asteroids:
            self.sim.asteroids.track(self.sim.survey.exposures[0])
        return self

    # -- exposures ----------------------------------------------------------------------

    def _all_exposures(self) -> pa.Table:
        if not hasattr(self, "_exposure_table"):
            self._exposure_table = self.sim.survey.exposure_table(archive="sim")
        return self._exposure_table

    def exposures(self, where: ExposureQuery | None = None) -> pa.Table:
        """Exposures matching ``where`` (all when None), in time order.

        Columns: those of ``schemas/tables/exposures.yaml`` except ``_healpix_29``.
        """
        t = self._all_exposures()
        if where is None:
            return t
        mask = where.select(t)  # the one selection every archive applies
        out = t.filter(pa.array(mask))
        if where.max_rows is not None:
            out = out.slice(0, where.max_rows)
        return out

    def nights(self, where: ExposureQuery | None = None) -> list[str]:
        """Sorted nights (``YYYY-MM-DD``) with at least one matching exposure."""
        return sorted(set(self.exposures(where).column("night").to_pylist()))

    # -- pixels -------------------------------------------------------------------------

    def _exposure(self, exposure_id: int):
        try:
            return self.sim.survey.exposure(int(exposure_id))
        except KeyError:
            raise InputNotFoundError(
                f"the sim archive (seed {self.config.seed}) has no exposure {exposure_id}; "
                "list them with SimArchive.exposures()"
            ) from None

    def header(self, exposure_id: int) -> fits.Header:
        """The science-image header of one exposure (no pixels rendered)."""
        return fitsio.exposure_header(self._exposure(exposure_id), seed=self.config.seed)

    def image(self, exposure_id: int) -> tuple[fits.Header, np.ndarray]:
        """(header, float32 ADU image) of one exposure; deterministic, LRU-cached.

        The image array is shared with the cache and read-only; the header is a copy.
        Thread-safe (renders are serialised).
        """
        key = int(exposure_id)
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                header, data = self._images[key]
                return header.copy(), data
            header = self.header(key)
            data, _ = self.sim.image(key)
            data.flags.writeable = False
            self._images[key] = (header, data)
            while len(self._images) > self.cache_size:
                self._images.popitem(last=False)
            return header.copy(), data

    def image_fits(self, exposure_id: int) -> bytes:
        """The full science image as FITS bytes."""
        header, data = self.image(exposure_id)
        return fitsio.fits_bytes(header, data)

    def cutout(
        self, exposure_id: int, ra: float, dec: float, size_arcsec: float
    ) -> tuple[fits.Header, np.ndarray | None, str]:
        """A square cutout centred on (ra, dec): ``(header, data, status)``.

        ``size_pix = max(1, round(size_arcsec / pixscale))``; the pixel containing the
        target is at index ``size_pix // 2``. ``ok``: the square is an exact sub-array of
        :meth:`image`; ``partial``: the target is on the image but the square crosses
        its edge, pixels off the image are NaN (the rest exact copies); ``off_chip``:
        the target is off the image and ``data`` is None. ``CRPIX`` is shifted by the
        origin, so the cutout's WCS is the image's.
        """
        exp = self._exposure(exposure_id)
        x, y = exp.wcs.world2pix(np.array([ra]), np.array([dec]))
        n = max(1, round(size_arcsec / exp.pixscale_arcsec))
        x0, y0, status = fitsio.cutout_window(float(x[0]), float(y[0]), n, exp.naxis1, exp.naxis2)
        if status == "off_chip":
            return (
                fitsio.cutout_header(self.header(exposure_id), 0, 0, n, ra, dec, size_arcsec),
                None,
                status,
            )
        header, data = self.image(exposure_id)
        sx0, sx1 = max(x0, 0), min(x0 + n, exp.naxis1)
        sy0, sy1 = max(y0, 0), min(y0 + n, exp.naxis2)
        if status == "ok":
            out = data[y0 : y0 + n, x0 : x0 + n].copy()
        else:
            out = np.full((n, n), np.nan, dtype=data.dtype)
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = data[sy0:sy1, sx0:sx1]
        return fitsio.cutout_header(header, x0, y0, n, ra, dec, size_arcsec), out, status

    def cutout_fits(
        self, exposure_id: int, ra: float, dec: float, size_arcsec: float
    ) -> tuple[bytes | None, str]:
        """(FITS bytes or None when off chip, status) of :meth:`cutout`."""
        header, data, status = self.cutout(exposure_id, ra, dec, size_arcsec)
        if data is None:
            return None, status
        return fitsio.fits_bytes(header, data), status

    # -- catalog and truth --------------------------------------------------------------

    def catalog(self, path: Path | None = None) -> pa.Table:
        """The Gaia-like reference catalog (J2016.0 positions; mas/yr proper motions).

        Columns ``source_id, ra, dec, pmra, pmdec, phot_g_mean_mag, bp_rp, ref_epoch``.
        With ``path``, also writes it there as Parquet.
        """
        table = self.sim.sky.catalog()
        if path is not None:
            self.write_catalog(path, table)
        return table

    def write_catalog(self, path: str | Path, table: pa.Table | None = None) -> Path:
        """Write the reference catalog as zstd Parquet (atomic rename); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(
            table if table is not None else self.sim.sky.catalog(), tmp, compression="zstd"
        )
        tmp.replace(path)
        return path

    def objects(self) -> pa.Table:
        """Every static source with its truth flags (``kind``, ``in_catalog``, ``rendered``)."""
        return self.sim.sky.objects

    def variables(self) -> pa.Table:
        """Periodic variables: ``source_id, var_type, period_d, amplitude_mag, epoch_mjd``."""
        return self.sim.sky.variables

    def transient(self) -> dict | None:
        """The transient: ``object_id, ra, dec, t0_mjd, alpha, peak_mag{filter}``."""
        return self.sim.sky.transient

    def truth(self, exposure_id: int) -> pa.Table:
        """Everything rendered on one exposure (see :mod:`lakepipe.sim.scene`)."""
        self._exposure(exposure_id)
        return self.sim.scene(int(exposure_id)).truth

    def asteroid_truth(self) -> dict[str, pa.Table]:
        """``{"asteroids": states and elements, "positions": per-exposure positions}``."""
        return self.sim.asteroids.truth(self.sim.survey.exposures)

    # -- truth as lake tables -----------------------------------------------------------

    def sky_truth(self) -> pa.Table:
        """Rows of the ``truth_sky`` contract (without ``_healpix_29``)."""
        obj = self.sim.sky.objects
        var = self.sim.sky.variables
        n = obj.num_rows
        vrow = {int(s): i for i, s in enumerate(var.column("source_id").to_pylist())}
        idx = [vrow.get(int(s), -1) for s in obj.column("source_id").to_pylist()]

        def pick(col: str) -> list:
            vals = var.column(col).to_pylist()
            return [vals[i] if i >= 0 else None for i in idx]

        cols = {
            "source_id": obj.column("source_id").to_pylist(),
            "kind": obj.column("kind").to_pylist(),
            "ra": obj.column("ra").to_pylist(),
            "dec": obj.column("dec").to_pylist(),
            "pmra": obj.column("pmra").to_pylist(),
            "pmdec": obj.column("pmdec").to_pylist(),
            "phot_g_mean_mag": obj.column("phot_g_mean_mag").to_pylist(),
            "bp_rp": obj.column("bp_rp").to_pylist(),
            "in_catalog": obj.column("in_catalog").to_pylist(),
            "rendered": obj.column("rendered").to_pylist(),
            "var_type": pick("var_type"),
            "period_d": pick("period_d"),
            "amplitude_mag": pick("amplitude_mag"),
            "epoch_mjd": pick("epoch_mjd"),
            "decline_index": [None] * n,
        }
        tr = self.sim.sky.transient
        if tr is not None:
            extra = {
                "source_id": 1,
                "kind": "transient",
                "ra": tr["ra"],
                "dec": tr["dec"],
                "pmra": 0.0,
                "pmdec": 0.0,
                "phot_g_mean_mag": tr["peak_mag"]["zr"],
                "bp_rp": None,
                "in_catalog": False,
                "rendered": True,
                "var_type": "transient",
                "period_d": None,
                "amplitude_mag": None,
                "epoch_mjd": tr["t0_mjd"],
                "decline_index": tr["alpha"],
            }
            for k, v in extra.items():
                cols[k].append(v)
        types = {
            "source_id": pa.int64(),
            "kind": pa.string(),
            "in_catalog": pa.bool_(),
            "rendered": pa.bool_(),
            "var_type": pa.string(),
        }
        return pa.table({k: pa.array(v, types.get(k, pa.float64())) for k, v in cols.items()})

    def orbit_truth(self) -> pa.Table:
        """Rows of the ``truth_orbits`` contract: each asteroid's true state and elements.

        The state is the one the survey propagates to render the asteroid
        (:attr:`lakepipe.sim.asteroids.Asteroids.orbits`); column names follow ``orbits``.
        """
        from lakepipe.astro import kepler

        ast = self.asteroid_truth()["asteroids"]
        state_cols = ("x_au", "y_au", "z_au", "vx_au_per_day", "vy_au_per_day", "vz_au_per_day")
        state = np.column_stack([np.asarray(ast.column(c), np.float64) for c in state_cols])
        elements = kepler.state_to_elements(state.reshape(-1, 6)) if ast.num_rows else {}
        cols: dict[str, pa.Array | pa.ChunkedArray] = {
            "number": ast.column("number"),
            "designation": ast.column("designation"),
            "epoch_mjd_tdb": pa.array(
                np.asarray(ast.column("epoch_jd_tdb"), np.float64) - 2400000.5, pa.float64()
            ),
        }
        for name in state_cols:
            cols[name.replace("_per_day", "_d")] = ast.column(name)
        for name in (*kepler.ELEMENT_NAMES, "q_au"):
            cols[name] = pa.array(np.asarray(elements.get(name, np.empty(0))), pa.float64())
        cols["h_mag"] = ast.column("h_mag")
        cols["g_slope"] = ast.column("g_slope")
        return pa.table(cols)

    def truth_tables(self, night: str) -> dict[str, pa.Table]:
        """``truth_objects`` and ``truth_asteroids`` rows of one night (no ``_healpix_29``).

        Both tables are always present (``truth_asteroids`` is empty without asteroids),
        so a stage can declare ``writes = ("truth_objects", "truth_asteroids")``.
        """
        exps = [e for e in self.sim.survey.exposures if e.night == night]
        objects = [self.sim.scene(e.exposure_id).truth for e in exps]
        from lakepipe.sim.scene import TRUTH_SCHEMA

        out = {
            "truth_objects": pa.concat_tables(objects) if objects else TRUTH_SCHEMA.empty_table()
        }
        out["truth_asteroids"] = self.sim.asteroids.truth(exps)["positions"]
        return out

    def write_truth(self, folder: str | Path) -> Path:
        """Write the truth as a documented folder of Parquet files; returns the folder.

        Layout (hive-partitioned like the lake, queryable with DuckDB
        ``read_parquet('<folder>/truth_objects/*/*.parquet', hive_partitioning=true)``)::

            <folder>/catalog.parquet                      reference catalog
            <folder>/truth_sky.parquet                    static sources, variables, transient
            <folder>/truth_objects/night=<N>/part-0.parquet
            <folder>/truth_asteroids/night=<N>/part-0.parquet
            <folder>/truth_orbits.parquet                 asteroid states and elements
                                                          (``truth_orbits`` contract)
        """
        folder = Path(folder)
        self.write_catalog(folder / "catalog.parquet")
        self._write(folder / "truth_sky.parquet", self.sky_truth())
        for night in self.nights():
            for name, table in self.truth_tables(night).items():
                if table.num_rows == 0:
                    continue
                self._write(
                    folder / name / f"night={night}" / "part-0.parquet", table.drop(["night"])
                )
        if self.config.n_asteroids:
            self._write(folder / "truth_orbits.parquet", self.orbit_truth())
        return folder

    @staticmethod
    def _write(path: Path, table: pa.Table) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp, compression="zstd")
        tmp.replace(path)
