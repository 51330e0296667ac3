"""``recovery``: find tube objects in their planned cutouts and refit their orbits."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from lakepipe.astro import orbit_fit as of
from lakepipe.astro.astrometry import ASTROMETRY_SCHEMA, make_astrometry
from lakepipe.errors import StageError
from lakepipe.stages.base import Partition, Stage, StageContext, StageParams, register_stage
from lakepipe.stages.ephemerides import epochs_of_replicas
from lakepipe.stages.orbit_fit import (
    DEFAULT_BUCKETS,
    bucket_partitions,
    contract_schema,
    estimate_h_mag,
    orbit_from_row,
    orbit_record,
    orbits_table,
)
from lakepipe.stages.orbit_replicas import replica_rows
from lakepipe.stages.tube import separation_arcsec, tube_nodes

SOURCE_COLUMNS = ["source_id", "exposure_id", "cutout_id", "forced", "ra", "dec", "mag_inst",
                  "zeropoint_mag", "snr", "flags", "mjd", "filter", "night"]  # fmt: skip
OK_CUTOUT = ("ok", "partial")


def tube_radii(
    orbit: dict, mjd_utc: np.ndarray, n: int, seed: int, cred: float, obs_code: str
) -> np.ndarray:
    """Credible tube radius (arcsec) of an ``orbits`` row at each UTC MJD (sorted,
    distinct): the replicas of :func:`lakepipe.stages.orbit_replicas.replica_rows` (same
    ``n`` and ``seed`` give the replicas stage's cloud) propagated by
    :func:`lakepipe.stages.ephemerides.epochs_of_replicas`, radius by
    :func:`lakepipe.stages.tube.tube_nodes` (no margin)."""
    reps = replica_rows(orbit, n, seed)
    eph = epochs_of_replicas(reps, mjd_utc, [None] * len(mjd_utc), obs_code)
    return np.asarray(tube_nodes(eph, cred, 0.0).column("radius_cred_arcsec").to_numpy(), float)


def coverage_rows(
    plan: pa.Table, cutouts: pa.Table, cands: list[dict], bucket: str
) -> list[dict[str, object]]:
    """``coverage`` rows (tube radii left null): per planned object, the distinct planned,
    fetched (ok/partial cutout), candidate and accepted-detection exposures."""
    planned: dict[str, set[int]] = {}
    for d, e in zip(plan.column("designation").to_pylist(),
                    plan.column("exposure_id").to_pylist(), strict=True):  # fmt: skip
        planned.setdefault(d, set()).add(int(e))
    fetched: dict[str, set[int]] = {}
    for t, e, s in zip(cutouts.column("target_id").to_pylist(),
                       cutouts.column("exposure_id").to_pylist(),
                       cutouts.column("status").to_pylist(), strict=True):  # fmt: skip
        if s in OK_CUTOUT and int(e) in planned.get(t, ()):
            fetched.setdefault(t, set()).add(int(e))
    rows = []
    for d in sorted(planned):
        mine = [c for c in cands if c["designation"] == d]
        rows.append(
            {
                "bucket": bucket,
                "designation": d,
                "n_planned": len(planned[d]),
                "n_fetched": len(fetched.get(d, ())),
                "n_candidates": len({int(c["exposure_id"]) for c in mine}),
                "n_detected": len({int(c["exposure_id"]) for c in mine if c.get("accepted")}),
                "tube_radius_cred_arcsec": None,
                "refit_tube_radius_cred_arcsec": None,
                "refit_radius_ratio_max": None,
            }
        )
    return rows


def candidates(
    plan: pa.Table,
    cutouts: pa.Table,
    sources: pa.Table,
    matched: set[int],
    *,
    mag_tolerance: float,
    min_snr: float,
) -> list[dict]:
    """Candidate detections: sources in each planned, fetched cutout within the tube radius
    of the predicted position, without a catalogue counterpart (``matched`` source ids).

    Each gets ``reason``: ``candidate`` (the nearest in its exposure passing the
    brightness check), ``farther`` (a nearer candidate exists in the exposure) or
    ``brightness`` (``|mag - V_pred| > mag_tolerance``; the band-to-V colour of
    asteroids is a few tenths of a magnitude).
    """
    fetched = {
        (t, int(e)): int(c)
        for t, e, c, s in zip(
            cutouts.column("target_id").to_pylist(),
            cutouts.column("exposure_id").to_pylist(),
            cutouts.column("cutout_id").to_pylist(),
            cutouts.column("status").to_pylist(),
            strict=True,
        )
        if s in OK_CUTOUT
    }
    src = sources.to_pydict()
    by_cutout: dict[int, list[int]] = {}
    for i, c in enumerate(src["cutout_id"]):
        if c is not None and not src["forced"][i]:
            by_cutout.setdefault(int(c), []).append(i)
    out = []
    for row in plan.to_pylist():
        cid = fetched.get((row["target_id"], int(row["exposure_id"])))
        if cid is None:
            continue
        found = []
        for i in by_cutout.get(cid, []):
            sid = int(src["source_id"][i])
            if sid in matched or (src["snr"][i] is not None and src["snr"][i] < min_snr):
                continue
            sep = float(separation_arcsec(row["ra"], row["dec"], src["ra"][i], src["dec"][i]))
            if sep > row["radius_arcsec"]:
                continue
            mi, zp = src["mag_inst"][i], src["zeropoint_mag"][i]
            mag = None if mi is None or zp is None else mi + zp
            ok_mag = row["v_mag"] is None or mag is None or abs(mag - row["v_mag"]) <= mag_tolerance
            found.append((sep, i, mag, ok_mag))
        found.sort()
        have = False
        for sep, i, mag, ok_mag in found:
            reason = "brightness" if not ok_mag else ("farther" if have else "candidate")
            have = have or ok_mag
            out.append(
                {
                    "designation": row["designation"],
                    "exposure_id": int(row["exposure_id"]),
                    "source_id": int(src["source_id"][i]),
                    "night": src["night"][i],
                    "mjd": float(src["mjd"][i]),
                    "ra": float(src["ra"][i]),
                    "dec": float(src["dec"][i]),
                    "mag": mag,
                    "filter": src["filter"][i],
                    "pred_ra": row["ra"],
                    "pred_dec": row["dec"],
                    "sep_arcsec": sep,
                    "radius_arcsec": row["radius_arcsec"],
                    "v_mag_pred": row["v_mag"],
                    "reason": reason,
                }
            )
    return out


@register_stage("recovery")
class RecoveryStage(Stage):
    """Find each tube object in its planned cutouts, accept consistent detections, refit.

    Reads ``plan`` (predicted positions and tube radii per exposure), ``cutouts`` (which
    were fetched), ``sources`` (detections in them), ``orbits`` and ``orbit_residuals``
    (the original fit and its astrometry). Sources with a reference-catalogue star within
    ``counterpart_arcsec`` are stars, not the object: ``anti_match: crossmatches`` takes
    them from the ``crossmatches`` table (when present), ``archive`` matches directly
    against the archive's reference catalogue (the sim archive has one).
    In every fetched cutout, the non-forced sources with S/N >= ``min_snr`` within the
    tube radius of the prediction and without a counterpart are
    candidates; the nearest per exposure whose magnitude is within ``mag_tolerance`` of
    the predicted V goes to the refit (motion check): the original astrometry plus the
    candidates (``sigma_arcsec`` each) are fitted by differential correction from the
    original orbit, with Carpino et al. (2003) outlier rejection; candidates the refit
    uses are ``accepted``, those it rejects get ``reason: orbit outlier``.

    Writes ``recoveries`` (every candidate, accepted or not with the reason; the
    accepted rows are astrometry: ``lakepipe export ... --format ades``),
    ``orbits_refit`` (the refitted orbits, columns of ``orbits``) and ``coverage`` (per
    planned object: planned, fetched, candidate and detected exposure counts; with
    ``tube_replicas`` > 0 also the ``tube_cred`` tube radius of the discovery and of the
    refitted orbit at the planned epochs, from ``tube_replicas`` replicas seeded by
    ``tube_seed`` -- give the replicas stage's ``n`` and ``seed`` to reproduce its tube --
    so a diagnostic can check that the refit shrank the tube).

    Parameters
    ----------
    anti_match : crossmatches, archive or none (see above).
    counterpart_arcsec : a crossmatch within this radius makes a source a star (arcsec).
    mag_tolerance : largest |mag - V_pred| of a candidate (mag).
    min_snr : smallest S/N of a candidate.
    sigma_arcsec : astrometric uncertainty given to recovered positions (arcsec).
    obs_code : MPC code of the survey's observatory.
    refit : refit the orbits with the accepted detections.
    tube_replicas, tube_seed, tube_cred : the coverage table's tube radii (0: skip).
    buckets : hash buckets (must match the plan's).

    Example::

        recoveries: {kind: recovery, inputs: [plan, cutouts, sources, crossmatches, orbits],
                     sigma_arcsec: 0.3}
    """

    reads = ("plan", "cutouts", "sources", "orbits", "orbit_residuals")
    optional_reads = ("crossmatches",)
    uses_archive = True
    writes = ("recoveries", "orbits_refit", "coverage")
    version = "2"

    class Params(StageParams):
        anti_match: Literal["crossmatches", "archive", "none"] = Field(
            "crossmatches", description="Where star counterparts come from"
        )
        counterpart_arcsec: float = Field(2.0, ge=0.0, description="Star match radius (arcsec)")
        mag_tolerance: float = Field(1.5, gt=0.0, description="Largest |mag - V_pred| (mag)")
        min_snr: float = Field(5.0, ge=0.0, description="Smallest candidate S/N")
        sigma_arcsec: float = Field(0.3, gt=0.0, description="Recovered positions' sigma")
        obs_code: str = Field("I41", description="MPC observatory code of the survey")
        refit: bool = Field(True, description="Refit the orbits with accepted detections")
        chi2_reject: float = Field(8.0, gt=0, description="Refit outlier threshold (chi^2)")
        tube_replicas: int = Field(
            0, ge=0, le=100000, description="Replicas for the coverage tube radii (0: skip)"
        )
        tube_seed: int = Field(0, description="Seed of the coverage tube replicas")
        tube_cred: float = Field(
            0.99, gt=0.0, lt=1.0, description="Credibility of the coverage tube radii"
        )
        buckets: int = Field(DEFAULT_BUCKETS, ge=1, le=256, description="Hash buckets")

    def partitions(self, ctx: StageContext) -> list[Partition]:
        """One partition per bucket (reads every cutout, source and crossmatch)."""
        return bucket_partitions(self.params.buckets)

    def run(self, ctx: StageContext, partition: Partition) -> dict[str, pa.Table]:
        """Recover and refit this bucket's objects."""
        p = self.params
        key = partition.key
        bucket = partition.values["bucket"]
        plan = ctx.lake.read("plan", partitions=[key])
        empty = {
            "recoveries": contract_schema("recoveries").empty_table(),
            "orbits_refit": orbits_table([], "orbits_refit"),
            "coverage": contract_schema("coverage").empty_table(),
        }
        if plan.num_rows == 0:
            return empty
        targets = sorted(set(plan.column("target_id").to_pylist()))
        quoted = ", ".join("'" + t.replace("'", "''") + "'" for t in targets)
        cutouts = ctx.lake.read(
            "cutouts",
            columns=["cutout_id", "exposure_id", "target_id", "status"],
            where=f"target_id in ({quoted})",
        )
        ids = [c for c, s in zip(cutouts.column("cutout_id").to_pylist(),
                                 cutouts.column("status").to_pylist(), strict=True)
               if s in OK_CUTOUT]  # fmt: skip
        if not ids:
            return {**empty, "coverage": self._coverage(plan, cutouts, [], bucket, {}, {})}
        id_list = ", ".join(str(int(c)) for c in ids)
        sources = ctx.lake.read("sources", columns=SOURCE_COLUMNS,
                                where=f"cutout_id in ({id_list})")  # fmt: skip
        matched: set[int] = set()
        if p.anti_match == "archive" and sources.num_rows:
            matched = self._archive_matches(ctx, sources)
        if (
            p.anti_match == "crossmatches"
            and "crossmatches" in ctx.lake.tables()
            and sources.num_rows
        ):
            sid = ", ".join(str(int(s)) for s in sources.column("source_id").to_pylist())
            xm = ctx.lake.read(
                "crossmatches",
                columns=["source_id"],
                where=f"sep_arcsec <= {p.counterpart_arcsec} and source_id in ({sid})",
            )
            matched = {int(s) for s in xm.column("source_id").to_pylist()}
        cands = candidates(plan, cutouts, sources, matched,
                           mag_tolerance=p.mag_tolerance, min_snr=p.min_snr)  # fmt: skip
        orbits = {r["designation"]: r for r in ctx.lake.read("orbits").to_pylist()}
        refits: list[dict] = []
        for d in targets:
            mine = [c for c in cands if c["designation"] == d]
            chosen = [c for c in mine if c["reason"] == "candidate"]
            for c in mine:
                c.update(accepted=False, refit_dra_cosdec_arcsec=None, refit_ddec_arcsec=None)
            if not chosen:
                continue
            if not p.refit or d not in orbits:
                for c in chosen:
                    c.update(accepted=True, reason="accepted")
                continue
            fit, obs = self._refit(ctx, d, orbits[d], chosen, partition)
            resid = {round(m, 9): k for k, m in enumerate(fit.mjd_utc)}
            for c in chosen:
                k = resid[round(c["mjd"], 9)]
                used = bool(fit.used[k])
                c.update(
                    accepted=used,
                    reason="accepted" if used else "orbit outlier",
                    refit_dra_cosdec_arcsec=float(fit.dra_cosdec_arcsec[k]),
                    refit_ddec_arcsec=float(fit.ddec_arcsec[k]),
                )
            h = estimate_h_mag(fit, obs, orbits[d].get("g_slope") or 0.15)
            refits.append(
                orbit_record(fit, bucket, obs.num_rows, h, orbits[d].get("g_slope") or 0.15)
            )
        for c in cands:
            c.update(bucket=bucket, sigma_arcsec=p.sigma_arcsec, obs_code=p.obs_code)
        rec = pa.Table.from_pylist(cands, schema=contract_schema("recoveries"))
        refit_by = {r["designation"]: r for r in refits}
        return {
            "recoveries": rec,
            "orbits_refit": orbits_table(refits, "orbits_refit"),
            "coverage": self._coverage(plan, cutouts, cands, bucket, orbits, refit_by),
        }

    def _coverage(
        self,
        plan: pa.Table,
        cutouts: pa.Table,
        cands: list[dict],
        bucket: str,
        orbits: dict[str, dict],
        refits: dict[str, dict],
    ) -> pa.Table:
        """The ``coverage`` table of this bucket (see the class docstring)."""
        p = self.params
        rows = coverage_rows(plan, cutouts, cands, bucket)
        if p.tube_replicas > 0:
            mjd_of = {}
            for d, t in zip(plan.column("designation").to_pylist(),
                            plan.column("mjd").to_pylist(), strict=True):  # fmt: skip
                mjd_of.setdefault(d, set()).add(float(t))
            for row in rows:
                d = str(row["designation"])
                if d not in orbits:
                    continue
                mjd = np.array(sorted(mjd_of[d]))
                args = (mjd, p.tube_replicas, p.tube_seed, p.tube_cred, p.obs_code)
                before = tube_radii(orbits[d], *args)
                row["tube_radius_cred_arcsec"] = float(np.median(before))
                if d in refits:
                    after = tube_radii(refits[d], *args)
                    row["refit_tube_radius_cred_arcsec"] = float(np.median(after))
                    row["refit_radius_ratio_max"] = float(np.max(after / before))
        return pa.Table.from_pylist(rows, schema=contract_schema("coverage"))

    def _archive_matches(self, ctx: StageContext, sources: pa.Table) -> set[int]:
        """Source ids with a star of the archive's reference catalogue (``catalog()``)
        within ``counterpart_arcsec`` (catalogue positions at their epoch: proper motions
        over a decade move survey-depth stars well under the radius)."""
        from scipy.spatial import cKDTree

        from lakepipe.stages.tube import unit_vectors

        get = getattr(ctx.archive, "catalog", None)
        if get is None:
            raise StageError(
                f"stage {self.name!r}: anti_match: archive, but the archive has no reference "
                "catalogue; use anti_match: crossmatches with a crossmatch stage in inputs",
                stage=self.name,
            )
        cat = get()
        tree = cKDTree(unit_vectors(np.asarray(cat.column("ra")), np.asarray(cat.column("dec"))))
        pts = unit_vectors(np.asarray(sources.column("ra")), np.asarray(sources.column("dec")))
        chord = 2.0 * np.sin(np.radians(self.params.counterpart_arcsec / 3600.0) / 2.0)
        dist, _ = tree.query(pts, k=1, distance_upper_bound=chord)
        ids = sources.column("source_id").to_pylist()
        return {int(i) for i, d in zip(ids, dist, strict=True) if np.isfinite(d)}

    def _refit(
        self, ctx: StageContext, designation: str, orbit: dict, chosen: list[dict], partition
    ) -> tuple[of.OrbitFit, pa.Table]:
        """Differential correction of the original astrometry plus ``chosen`` detections,
        started from the original orbit at its epoch."""
        p = self.params
        q = designation.replace("'", "''")
        old = ctx.lake.read(
            "orbit_residuals",
            partitions=[partition.key],
            columns=list(ASTROMETRY_SCHEMA.names[:-1]),
            where=f"designation = '{q}'",
        )
        new = make_astrometry(
            designation=designation,
            mjd=[c["mjd"] for c in chosen],
            ra=[c["ra"] for c in chosen],
            dec=[c["dec"] for c in chosen],
            obs_code=p.obs_code,
            sigma_ra_arcsec=p.sigma_arcsec,
            mag=[c["mag"] for c in chosen],
            band=[c["filter"] for c in chosen],
        )
        old = old.append_column("mode", pa.array(["CCD"] * old.num_rows, pa.string()))
        obs = pa.concat_tables([old.select(ASTROMETRY_SCHEMA.names).cast(ASTROMETRY_SCHEMA),
                                new])  # fmt: skip
        state, _cov, epoch = orbit_from_row(orbit)
        perturbers = tuple(x for x in str(orbit["perturbers"]).split(",") if x)
        try:
            fit = of.fit_orbit(obs, epoch_mjd_tdb=epoch, perturbers=perturbers,
                               initial_state=state, chi2_reject=p.chi2_reject)  # fmt: skip
        except of.OrbitFitError as exc:
            raise StageError(
                f"stage {self.name!r}: refit of {designation!r} failed: {exc}",
                stage=self.name,
                partition=partition.key,
            ) from exc
        return fit, obs
