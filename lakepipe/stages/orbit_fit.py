"""``orbit_fit``: heliocentric orbits fitted to optical astrometry (file or lake)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lakepipe.astro import orbit_fit as of
from lakepipe.astro.astrometry import ASTROMETRY_SCHEMA, read_astrometry
from lakepipe.errors import LakepipeError, SQLError, StageError, UserError
from lakepipe.stages.base import Partition, Stage, StageContext, StageParams, register_stage
from lakepipe.stages.lightcurves import bucket_of

DEFAULT_BUCKETS = 4
STATE_COLUMNS = ("x_au", "y_au", "z_au", "vx_au_d", "vy_au_d", "vz_au_d")
# DE421 bodies the N-body integrator can add as perturbers
# (lakepipe.astro.nbody.PERTURBER_NAMES; a test keeps the two lists equal).
Perturber = Literal[
    "mercury", "venus", "earth", "moon", "earthmoon", "mars",
    "jupiter", "saturn", "uranus", "neptune", "pluto",
]  # fmt: skip
PERTURBERS: tuple[str, ...] = get_args(Perturber)
ELEMENT_COLUMNS = ("a_au", "e", "inc_deg", "node_deg", "argperi_deg", "mean_anomaly_deg", "q_au")


def bucket_key(designation: str, buckets: int) -> str:
    """Hive value of an object's hash bucket (``07``): per-object tables partition by it."""
    return f"{bucket_of(str(designation), buckets):02d}"


def bucket_partitions(buckets: int, reads: dict[str, list[str]] | None = None) -> list[Partition]:
    """``bucket=00 .. bucket=<buckets-1>``; ``reads`` maps tables to ``"same"`` or keys."""
    out = []
    for b in range(buckets):
        key = f"bucket={b:02d}"
        r = None
        if reads is not None:
            r = {t: ([key] if v == ["same"] else v) for t, v in reads.items()}
        out.append(Partition.of(reads=r, bucket=f"{b:02d}"))
    return out


class AstrometryFile(BaseModel):
    """An astrometry file: path (relative to the spec) and format."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="File path, relative to the spec file's folder")
    format: Literal["mpc80", "ades", "csv"] | None = Field(
        None, description="mpc80, ades (PSV) or csv; default guessed from the suffix"
    )


def astrometry_from_sql(ctx: StageContext, sql: str, stage: str) -> pa.Table:
    """Normalised astrometry (``ASTROMETRY_SCHEMA``) from a lake query.

    The query returns ``designation`` (or ``object_id``/``target_id``), ``mjd``, ``ra``,
    ``dec``, ``obs_code`` and ``sigma_ra_arcsec``/``sigma_dec_arcsec`` (or ``sigma_arcsec``);
    optionally ``mag`` and ``band`` (or ``filter``).
    """
    from lakepipe.export.astrometry import as_astrometry

    try:
        t = ctx.lake.sql(sql)
    except LakepipeError:
        raise
    except Exception as exc:  # DuckDB binder/parser errors name the problem
        raise SQLError(f"stage {stage!r}: astrometry_sql failed: {exc}") from None
    if t.num_rows == 0:
        return ASTROMETRY_SCHEMA.empty_table()
    return as_astrometry(t, {})


def estimate_h_mag(fit: of.OrbitFit, obs: pa.Table, g_slope: float) -> float | None:
    """Absolute magnitude H from observed magnitudes: median of V_obs - V(H=0).

    IAU (H, G) system (Bowell et al. 1989) via :func:`lakepipe.astro.observe.predicted_v_mag`
    at each observation's geometry from the fitted orbit; the band-to-V colour (a few
    tenths of a magnitude for asteroids) is ignored. ``None`` without magnitudes.
    """
    from lakepipe.astro.observe import ephemeris, predicted_v_mag

    mags = np.array([np.nan if m is None else m for m in obs.column("mag").to_pylist()], float)
    ok = np.isfinite(mags)
    if not ok.any():
        return None
    mjd = np.asarray(obs.column("mjd").to_numpy(), float)[ok]
    code = str(obs.column("obs_code")[0])
    eph = ephemeris(fit.state[None], fit.epoch_jd_tdb, mjd, code, fit.perturbers)
    v0 = predicted_v_mag(0.0, g_slope, eph["r_au"][0], eph["delta_au"][0], eph["phase_deg"][0])
    return float(np.median(mags[ok] - np.asarray(v0)))


def orbit_record(
    fit: of.OrbitFit, bucket: str, n_obs: int, h_mag: float | None, g_slope: float
) -> dict[str, object]:
    """One ``orbits`` row of a fit (state, elements, covariance, statistics, H and G)."""
    row = fit.to_row()
    return {
        "bucket": bucket,
        "designation": fit.designation,
        "epoch_mjd_tdb": fit.epoch_mjd_tdb,
        **{c: float(fit.state[k]) for k, c in enumerate(STATE_COLUMNS)},
        **{c: float(row[c]) if c in row else None for c in ELEMENT_COLUMNS},
        "covariance": [float(v) for v in fit.covariance.ravel()],
        "sigma_pos_km": float(np.sqrt(np.trace(fit.covariance[:3, :3])) * 149597870.7),
        "rms_arcsec": fit.rms_arcsec,
        "chi2": fit.chi2,
        "n_obs": n_obs,
        "n_used": fit.n_used,
        "n_rejected": fit.n_rejected,
        "arc_days": fit.arc_days,
        "first_mjd": float(fit.mjd_utc.min()),
        "last_mjd": float(fit.mjd_utc.max()),
        "converged": fit.converged,
        "perturbers": ",".join(fit.perturbers),
        "h_mag": h_mag,
        "g_slope": g_slope if h_mag is not None else None,
    }


def residual_rows(fit: of.OrbitFit, obs: pa.Table, bucket: str, origin: list[str]) -> pa.Table:
    """``orbit_residuals`` rows: each observation (as fitted, time order) and its residuals."""
    order = np.argsort(np.asarray(obs.column("mjd").to_numpy(), float), kind="stable")
    o = obs.take(pa.array(order))
    n = o.num_rows
    return pa.table(
        {
            "bucket": pa.array([bucket] * n, pa.string()),
            "designation": pa.array([fit.designation] * n, pa.string()),
            "mjd": o.column("mjd"),
            "ra": o.column("ra"),
            "dec": o.column("dec"),
            "sigma_ra_arcsec": o.column("sigma_ra_arcsec"),
            "sigma_dec_arcsec": o.column("sigma_dec_arcsec"),
            "mag": o.column("mag"),
            "band": o.column("band"),
            "obs_code": o.column("obs_code"),
            "origin": pa.array([origin[i] for i in order], pa.string()),
            "dra_cosdec_arcsec": pa.array(fit.dra_cosdec_arcsec),
            "ddec_arcsec": pa.array(fit.ddec_arcsec),
            "chi2": pa.array(fit.obs_chi2),
            "used": pa.array(fit.used),
        }
    )


def orbit_from_row(row: dict) -> tuple[np.ndarray, np.ndarray, float]:
    """(state (6,), covariance (6, 6), epoch_mjd_tdb) of an ``orbits`` row."""
    state = np.array([row[c] for c in STATE_COLUMNS], float)
    cov = np.asarray(row["covariance"], float).reshape(6, 6)
    return state, cov, float(row["epoch_mjd_tdb"])


@register_stage("orbit_fit")
class OrbitFitStage(Stage):
    """Fit heliocentric orbits to optical astrometry, one per object designation.

    Astrometry comes from a file (``astrometry: {path, format}``: MPC 80-column, ADES PSV
    or CSV, read by :mod:`lakepipe.astro.astrometry`) and/or from the lake
    (``astrometry_sql``, e.g. recovered detections), grouped by designation. Each object
    gets Gauss's initial orbit, then least-squares differential correction of its
    heliocentric ICRS state at ``epoch_mjd_tdb`` (default mid-arc) under the Sun and the
    ``perturbers`` (DE421), with Carpino et al. (2003) outlier rejection
    (:func:`lakepipe.astro.orbit_fit.fit_orbit`).

    Writes ``orbits`` (epoch TDB, state in au and au/day, osculating ecliptic elements,
    the 6x6 state covariance as 36 row-major floats, RMS in arcsec, chi^2,
    observations used/rejected, H estimated from the observed magnitudes when given) and
    ``orbit_residuals`` (every observation with its O-C in arcsec, Carpino chi^2 and used
    flag). Both are partitioned by a hash bucket of the designation (``bucket=02``).

    An object whose arc cannot constrain an orbit (fewer than three times, a too short
    arc, a singular normal matrix) fails its bucket with the reason, unless
    ``skip_unconstrained`` (then it is left out and logged).

    Parameters
    ----------
    astrometry : ``{path, format}`` of an astrometry file.
    astrometry_sql : query returning designation, mjd, ra, dec, obs_code, sigma_arcsec.
    designations : fit only these objects (default all).
    epoch_mjd_tdb : epoch of the fitted states (MJD TDB); default the middle of each arc.
    perturbers : DE421 bodies in the dynamics.
    reject_outliers, chi2_reject, chi2_recover : outlier rejection thresholds.
    min_arc_days : shorter arcs are refused (days).
    g_slope : IAU G slope for the H estimate.
    buckets : number of hash buckets.

    Example::

        orbits:
          kind: orbit_fit
          astrometry: {path: data/2024AB.psv, format: ades}
          perturbers: [earth, mars, jupiter, saturn]
    """

    writes = ("orbits", "orbit_residuals")
    version = "1"

    class Params(StageParams):
        astrometry: AstrometryFile | None = Field(None, description="Astrometry file")
        astrometry_sql: str | None = Field(
            None, description="SQL returning designation, mjd, ra, dec, obs_code, sigma_arcsec"
        )
        designations: list[str] | None = Field(None, description="Fit only these objects")
        epoch_mjd_tdb: float | None = Field(None, description="Epoch (MJD TDB); default mid-arc")
        perturbers: list[Perturber] = Field(
            list(of.DEFAULT_PERTURBERS),
            description="DE421 bodies perturbing the orbit (the Sun is always the centre)",
        )
        reject_outliers: bool = Field(True, description="Carpino et al. (2003) rejection")
        chi2_reject: float = Field(8.0, gt=0, description="Reject above this chi^2")
        chi2_recover: float = Field(7.0, gt=0, description="Recover below this chi^2")
        min_arc_days: float = Field(0.5, ge=0, description="Shortest arc accepted (days)")
        skip_unconstrained: bool = Field(False, description="Leave out unfittable objects")
        g_slope: float = Field(0.15, description="IAU G slope for the H estimate")
        buckets: int = Field(DEFAULT_BUCKETS, ge=1, le=256, description="Hash buckets")

        @field_validator("perturbers", mode="before")
        @classmethod
        def _each_body_once(cls, value: Any) -> Any:
            """A body listed twice is a mistake (unknown names get the spec loader's
            did-you-mean, as every closed choice does)."""
            if isinstance(value, list) and len(set(map(str, value))) != len(value):
                raise ValueError(f"perturbers listed twice: {value}")
            return value

        @model_validator(mode="after")
        def _need_input(self) -> OrbitFitStage.Params:
            if self.astrometry is None and not self.astrometry_sql:
                raise ValueError("give astrometry: {path, format} and/or astrometry_sql")
            return self

    def input_files(self, ctx: StageContext) -> list[Path]:
        a = self.params.astrometry
        return [ctx.resolve(a.path)] if a is not None else []

    def preflight(self, ctx: StageContext) -> None:
        """Read and check the astrometry file once, before any bucket runs.

        A missing file, a malformed line or an unknown observatory code raises the
        reader's :class:`~lakepipe.errors.UserError` (``file:line: ...``), prefixed with
        this stage's name and the fix, instead of failing every hash bucket with the same
        error. Objects named in ``designations`` must occur in the file (when there is no
        ``astrometry_sql`` that could supply them).
        """
        p = self.params
        if p.astrometry is None:
            return
        path = ctx.resolve(p.astrometry.path)
        try:
            obs = read_astrometry(path, p.astrometry.format)
        except UserError as exc:
            raise type(exc)(
                f"stage {self.name!r}: {exc} (fix the file, or the spec's "
                f"stages.{self.name}.astrometry path/format)"
            ) from exc
        if p.designations is not None and not p.astrometry_sql:
            have = set(obs.column("designation").to_pylist())
            missing = [d for d in p.designations if d not in have]
            if missing:
                raise UserError(
                    f"stage {self.name!r}: designations {missing} do not occur in {path} "
                    f"(it holds: {', '.join(sorted(have))})"
                )

    def partitions(self, ctx: StageContext) -> list[Partition]:
        """One partition per hash bucket; each reads what the query may read."""
        return bucket_partitions(self.params.buckets)

    def observations(self, ctx: StageContext) -> tuple[pa.Table, list[str]]:
        """All astrometry (normalised table) and each row's origin (``file``/``lake``)."""
        p = self.params
        pieces, origin = [], []
        if p.astrometry is not None:
            t = read_astrometry(ctx.resolve(p.astrometry.path), p.astrometry.format)
            pieces.append(t)
            origin += ["file"] * t.num_rows
        if p.astrometry_sql:
            t = astrometry_from_sql(ctx, p.astrometry_sql, self.name)
            pieces.append(t)
            origin += ["lake"] * t.num_rows
        obs = pa.concat_tables([t.cast(ASTROMETRY_SCHEMA) for t in pieces])
        return obs, origin

    def run(self, ctx: StageContext, partition: Partition) -> dict[str, pa.Table]:
        """Fit every object of this bucket; see the class docstring."""
        p = self.params
        bucket = partition.values["bucket"]
        obs, origin = self.observations(ctx)
        names = obs.column("designation").to_pylist()
        wanted = set(p.designations) if p.designations is not None else None
        mine = sorted(
            {d for d in names if bucket_key(d, p.buckets) == bucket}
            & (wanted if wanted is not None else set(names))
        )
        rows, residuals = [], []
        for d in mine:
            idx = [i for i, n in enumerate(names) if n == d]
            sub = obs.take(pa.array(idx))
            try:
                fit = of.fit_orbit(
                    sub,
                    epoch_mjd_tdb=p.epoch_mjd_tdb,
                    perturbers=tuple(p.perturbers),
                    reject_outliers=p.reject_outliers,
                    chi2_reject=p.chi2_reject,
                    chi2_recover=p.chi2_recover,
                    min_arc_days=p.min_arc_days,
                )
            except of.OrbitFitError as exc:
                if p.skip_unconstrained:
                    ctx.log.warning("stage %s: %s: skipped: %s", self.name, d, exc)
                    continue
                raise StageError(
                    f"stage {self.name!r}: object {d!r}: {exc}",
                    stage=self.name,
                    partition=partition.key,
                ) from exc
            h = estimate_h_mag(fit, sub, p.g_slope)
            rows.append(orbit_record(fit, bucket, sub.num_rows, h, p.g_slope))
            residuals.append(residual_rows(fit, sub, bucket, [origin[i] for i in idx]))
        return {"orbits": orbits_table(rows), "orbit_residuals": residuals_table(residuals)}


def contract_schema(table: str) -> pa.Schema:
    """Arrow schema of a table's contract with partition columns, without ``_healpix_29``
    (the runner derives it from ``ra``/``dec``)."""
    from lakepipe.tables import get_contract

    return pa.schema([f for f in get_contract(table).schema if f.name != "_healpix_29"])


def orbits_table(rows: list[dict], table: str = "orbits") -> pa.Table:
    """``orbits``-shaped Arrow table of :func:`orbit_record` rows (typed when empty)."""
    return pa.Table.from_pylist(rows, schema=contract_schema(table))


def residuals_table(pieces: list[pa.Table]) -> pa.Table:
    """``orbit_residuals`` pieces concatenated (typed when empty)."""
    schema = contract_schema("orbit_residuals")
    if not pieces:
        return schema.empty_table()
    return pa.concat_tables(pieces).select(schema.names).cast(schema)
