"""``ephemerides``: every orbit replica propagated to the requested epochs."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lakepipe.astro.observe import ephemeris, predicted_v_mag
from lakepipe.errors import LakepipeError, SQLError, UserError
from lakepipe.stages.base import Partition, Stage, StageContext, StageParams, register_stage
from lakepipe.stages.orbit_fit import (
    DEFAULT_BUCKETS,
    STATE_COLUMNS,
    bucket_partitions,
    contract_schema,
)

MJD_TO_JD = 2400000.5


class Cadence(BaseModel):
    """Regular epochs from ``start_mjd`` to ``end_mjd`` (inclusive) every ``step_days``."""

    model_config = ConfigDict(extra="forbid")
    start_mjd: float = Field(description="First epoch, MJD (UTC)")
    end_mjd: float = Field(description="Last epoch, MJD (UTC)")
    step_days: float = Field(gt=0, description="Step (days)")

    @model_validator(mode="after")
    def _order(self) -> Cadence:
        if self.end_mjd < self.start_mjd:
            raise ValueError(f"end_mjd {self.end_mjd} < start_mjd {self.start_mjd}")
        if (self.end_mjd - self.start_mjd) / self.step_days > 100000:
            raise ValueError("more than 100000 epochs; use a larger step_days")
        return self


def epochs_of_replicas(
    replicas: pa.Table, mjd_utc: np.ndarray, exposure_id: list, obs_code: str
) -> pa.Table:
    """``ephemerides`` rows: each replica of each object at each epoch (UTC MJD).

    Positions are topocentric astrometric RA/Dec (light-time corrected, N-body with the
    orbit's DE421 perturbers; :func:`lakepipe.astro.observe.ephemeris`); ``v_mag`` from
    the IAU (H, G) system where the orbit has an H.
    """
    schema = contract_schema("ephemerides")
    pieces = []
    names = replicas.column("designation").to_pylist()
    for d in dict.fromkeys(names):
        sub = replicas.filter(pc.equal(replicas.column("designation"), d))
        states = np.stack([np.asarray(sub.column(c).to_numpy(), float) for c in STATE_COLUMNS], 1)
        epoch_jd = float(sub.column("epoch_mjd_tdb")[0].as_py()) + MJD_TO_JD
        perturbers = [p for p in str(sub.column("perturbers")[0].as_py()).split(",") if p]
        eph = ephemeris(states, epoch_jd, mjd_utc, obs_code, perturbers)
        n, t = eph["ra_deg"].shape
        h = sub.column("h_mag")[0].as_py()
        g = sub.column("g_slope")[0].as_py()
        if h is not None:
            v = predicted_v_mag(h, 0.15 if g is None else g, eph["r_au"], eph["delta_au"],
                                eph["phase_deg"])  # fmt: skip
            v_col = pa.array(np.asarray(v).ravel())
        else:
            v_col = pa.nulls(n * t, pa.float64())
        rep = np.asarray(sub.column("replica").to_numpy())
        pieces.append(
            pa.table(
                {
                    "bucket": pa.array([sub.column("bucket")[0].as_py()] * (n * t)),
                    "designation": pa.array([d] * (n * t)),
                    "replica": pa.array(np.repeat(rep, t).astype(np.int32)),
                    "mjd": pa.array(np.tile(mjd_utc, n)),
                    "exposure_id": pa.array(list(exposure_id) * n, pa.int64()),
                    "ra": pa.array(eph["ra_deg"].ravel()),
                    "dec": pa.array(eph["dec_deg"].ravel()),
                    "delta_au": pa.array(eph["delta_au"].ravel()),
                    "r_au": pa.array(eph["r_au"].ravel()),
                    "phase_deg": pa.array(eph["phase_deg"].ravel()),
                    "v_mag": v_col,
                },
                schema=schema,
            )
        )
    return pa.concat_tables(pieces) if pieces else schema.empty_table()


def unique_epochs(mjd: list[float], eid: list[int | None]) -> tuple[np.ndarray, list]:
    """One epoch per distinct time, sorted, with its exposure id when that is unique.

    Exposures sharing a mid-time (the CCDs/quadrants of one ZTF exposure) share one
    propagation; their rows get a null exposure id (the plan matches them by time).
    """
    ids: dict[float, set] = {}
    for t, e in zip(mjd, eid, strict=True):
        ids.setdefault(float(t), set()).add(e)
    times = sorted(ids)
    keep = [next(iter(ids[t])) if len(ids[t]) == 1 else None for t in times]
    return np.asarray(times, float), keep


@register_stage("ephemerides")
class EphemeridesStage(Stage):
    """Propagate every orbit replica to the requested epochs: RA/Dec per replica.

    Reads ``orbit_replicas`` (and ``exposures`` with ``exposures: true``) and writes
    ``ephemerides``: one row per (object, replica, epoch) with the topocentric
    astrometric RA/Dec seen from ``obs_code`` (light-time corrected; N-body under the Sun
    and the orbit's DE421 perturbers, :func:`lakepipe.astro.observe.ephemeris`), the
    observer and heliocentric distances (au), the phase angle (deg) and the predicted V
    magnitude (IAU H, G) where the orbit has an H. Epochs, all that are given:

    - ``mjd``: an explicit list of MJD (UTC);
    - ``cadence``: ``{start_mjd, end_mjd, step_days}``;
    - ``exposures: true``: the mid-exposure ``mjd`` of every exposure in the lake
      (optionally filtered by ``exposures_where``, a SQL predicate on ``exposures``);
      these rows carry the ``exposure_id`` (null when several exposures share the
      mid-time, e.g. the quadrants of one ZTF exposure: the plan matches by time).

    Parameters
    ----------
    mjd, cadence, exposures, exposures_where : the epochs (see above).
    obs_code : MPC observatory code of the observer (I41 = ZTF, Palomar).
    buckets : hash buckets (must match the replicas').

    Example::

        ephemerides: {kind: ephemerides, inputs: [replicas, exposures], exposures: true,
                      exposures_where: "night >= '2025-01-04'"}
    """

    reads = ("orbit_replicas",)
    optional_reads = ("exposures",)
    writes = ("ephemerides",)
    version = "1"

    class Params(StageParams):
        mjd: list[float] | None = Field(None, description="Epochs, MJD (UTC)")
        cadence: Cadence | None = Field(None, description="{start_mjd, end_mjd, step_days}")
        exposures: bool = Field(False, description="At the mid-time of every lake exposure")
        exposures_where: str | None = Field(None, description="SQL predicate on exposures")
        obs_code: str = Field("I41", description="MPC observatory code of the observer")
        buckets: int = Field(DEFAULT_BUCKETS, ge=1, le=256, description="Hash buckets")

        @model_validator(mode="after")
        def _need_epochs(self) -> EphemeridesStage.Params:
            if not self.mjd and self.cadence is None and not self.exposures:
                raise ValueError("give epochs: mjd: [...], cadence: {...} or exposures: true")
            if self.exposures_where and not self.exposures:
                raise ValueError("exposures_where needs exposures: true")
            return self

    def partitions(self, ctx: StageContext) -> list[Partition]:
        """One partition per bucket: its replicas and (with ``exposures``) every exposure."""
        reads: dict[str, list[str]] = {"orbit_replicas": ["same"]}
        if self.params.exposures:
            reads["exposures"] = ctx.lake.partitions("exposures")
        return bucket_partitions(self.params.buckets, reads)

    def epochs(self, ctx: StageContext) -> tuple[np.ndarray, list[int | None]]:
        """(MJD UTC, exposure id or None) of every epoch, in time order."""
        p = self.params
        mjd: list[float] = list(p.mjd or [])
        eid: list[int | None] = [None] * len(mjd)
        if p.cadence is not None:
            c = p.cadence
            n = int(np.floor((c.end_mjd - c.start_mjd) / c.step_days + 1e-9)) + 1
            mjd += list(c.start_mjd + c.step_days * np.arange(n))
            eid += [None] * n
        if p.exposures:
            if "exposures" not in ctx.lake.tables():
                raise UserError(
                    f"stage {self.name!r}: exposures: true but the lake has no exposures "
                    "table; add the exposures stage to inputs"
                )
            try:
                t = ctx.lake.read("exposures", columns=["exposure_id", "mjd"],
                                  where=p.exposures_where)  # fmt: skip
            except LakepipeError:
                raise
            except Exception as exc:
                raise SQLError(f"stage {self.name!r}: exposures_where failed: {exc}") from None
            mjd += t.column("mjd").to_pylist()
            eid += t.column("exposure_id").to_pylist()
        return unique_epochs(mjd, eid)

    def run(self, ctx: StageContext, partition: Partition) -> pa.Table:
        """Propagate this bucket's replicas to every epoch."""
        replicas = ctx.lake.read("orbit_replicas", partitions=[partition.key])
        mjd, eid = self.epochs(ctx)
        if replicas.num_rows == 0 or mjd.size == 0:
            return contract_schema("ephemerides").empty_table()
        return epochs_of_replicas(replicas, mjd, eid, self.params.obs_code)
