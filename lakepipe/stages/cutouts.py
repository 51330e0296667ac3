"""``cutouts``: FITS cutouts around targets in every selected exposure."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lakepipe.archives.query import ExposureQuery
from lakepipe.astro.wcs import fits_bytes, point_in_footprint
from lakepipe.errors import LakepipeError, SQLError, StageError
from lakepipe.stages.base import Partition, Stage, StageContext, StageParams, register_stage

CENTER_ID = "center"
#: ``reason`` of an ``off_chip`` row, whoever found it (the footprint test or the archive)
OFF_CHIP_REASON = "target outside the exposure footprint"
TARGET_CHOICES = ("center", "targets", "targets_sql")
_SAME_POS_DEG = 1e-9  # a previous row is reusable only for the very same request


class SkyPoint(BaseModel):
    """A fixed position (deg, ICRS)."""

    model_config = ConfigDict(extra="forbid")
    ra: float = Field(ge=0.0, lt=360.0, description="Right ascension (deg)")
    dec: float = Field(ge=-90.0, le=90.0, description="Declination (deg)")


class Target(SkyPoint):
    """A named fixed position."""

    id: str | int = Field(description="Target id (stored as text)")


@dataclass(frozen=True)
class Request:
    """One cutout to make: which exposure, which target, where."""

    exposure_id: int
    target_id: str
    ra: float
    dec: float
    size_arcsec: float | None = None  # per-target side (targets_sql); else the stage's

    @property
    def cutout_id(self) -> int:
        return cutout_id_for(self.exposure_id, self.target_id)


def cutout_id_for(exposure_id: int, target_id: str) -> int:
    """Stable int64: first 63 bits of SHA-256 of ``'<exposure_id>:<target_id>'``."""
    digest = hashlib.sha256(f"{int(exposure_id)}:{target_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@register_stage("cutouts")
class CutoutsStage(Stage):
    """Cut FITS images around targets out of every exposure of each night.

    Reads ``exposures`` (one night per partition) and writes ``cutouts``: one row per
    (exposure, target) with the cutout's centre, size, status (``ok``, ``partial``,
    ``off_chip``, ``failed``) and reason, and — when the target is on the image — a FITS
    file under the lake (``_files/cutouts/``, content-addressed) holding the pixels
    (never resampled), the exposure's headers and its WCS shifted to the cutout,
    referenced by ``path``, ``sha256`` and ``bytes``.

    Targets, from at most one of these (giving two is an error):

    - ``targets_sql``: a query over the lake returning ``target_id, ra, dec`` and
      optionally ``mjd`` (MJD UTC of time-tagged positions, e.g. predicted ephemerides:
      each target's position is interpolated linearly to the exposure's mid-exposure
      time, or taken from the nearest row within ``time_tolerance_days``; exposures
      outside a target's time span get no cutout of it) and ``exposure_id`` (a row with
      one applies to that exposure only). List the stage writing the queried table in
      ``inputs`` so that its changes rerun this stage.
    - ``targets``: fixed positions ``[{id, ra, dec}, ...]``.
    - ``center``: one fixed position ``{ra, dec}``, or the exposures stage's whole
      ``where`` block (share it with a YAML anchor) to centre on its cone or box centre
      (an anchor is resolved when the file is read: ``--set`` changes one copy only).
    - otherwise each exposure's own centre. Default target id: ``center``.

    A target outside the exposure's footprint is ``off_chip`` (reason ``target outside
    the exposure footprint``) without asking the archive. A rerun fetches nothing
    already present: the previous committed row of the same ``cutout_id`` (same
    exposure, target, position and size) is kept when its file verifies against its
    checksum; a missing, corrupt or truncated file is fetched again.
    (The runner skips nights whose inputs and params are unchanged without calling the
    stage; ``lakepipe run SPEC --force cutouts`` re-verifies every file and fetches only
    the missing or corrupt ones.)
    A failed fetch (archive error) gives ``status: failed`` with the reason; the night
    fails (and is retried by the next run) when fetches failed and none succeeded.

    Parameters
    ----------
    size_arcsec : side of the square cutout (arcsec).
    center, targets, targets_sql : where to cut (see above).
    time_tolerance_days : how far from a time-tagged position an exposure may be (days).
    skip_off_chip : leave off-chip targets out of the table instead of listing them.

    Example::

        exposures: {kind: exposures, where: &field {ra: 150.0, dec: 2.2, radius_deg: 0.5}}
        cutouts:   {kind: cutouts, inputs: [exposures], size_arcsec: 120, center: *field}
    """

    reads = ("exposures",)
    writes = ("cutouts",)
    uses_archive = True
    version = "1"

    class Params(StageParams):
        size_arcsec: float = Field(60.0, gt=0.0, le=36000.0, description="Cutout side (arcsec)")
        center: SkyPoint | ExposureQuery | None = Field(
            None,
            description="Fixed centre {ra, dec}, or an exposures `where` block (its centre)",
        )
        targets: list[Target] | None = Field(None, description="Fixed targets [{id, ra, dec}]")
        targets_sql: str | None = Field(
            None, description="SQL returning target_id, ra, dec [, mjd] [, exposure_id]"
        )
        time_tolerance_days: float = Field(
            1.0 / 1440.0, ge=0.0, description="Max |Δt| to a time-tagged position (days)"
        )
        skip_off_chip: bool = Field(False, description="Omit off-chip targets from the table")

        @model_validator(mode="after")
        def _check_center(self) -> CutoutsStage.Params:
            given = [k for k in TARGET_CHOICES if getattr(self, k) is not None]
            if len(given) > 1:
                raise ValueError(
                    "give at most one of center, targets, targets_sql (got "
                    f"{' and '.join(given)}); each chooses the targets on its own, so keep the "
                    "one you mean"
                )
            c = self.center
            if isinstance(c, ExposureQuery) and c.center() is None:
                raise ValueError("center: the where block has no cone or box to take a centre of")
            if self.targets is not None:
                ids = [str(t.id) for t in self.targets]
                dup = sorted({i for i in ids if ids.count(i) > 1})
                if dup:
                    raise ValueError(f"targets: duplicate id(s) {', '.join(dup)}")
            return self

    def partitions(self, ctx: StageContext) -> list[Partition]:
        """One partition per night of ``exposures``.

        Each reads its own night, and with ``targets_sql`` every input table too (the
        query may read any of them).
        """
        nights = ctx.lake.partition_values("exposures", "night")
        if self.params.targets_sql:
            return [Partition.of(night=n) for n in nights]
        return [Partition.of(reads={"exposures": [f"night={n}"]}, night=n) for n in nights]

    def verify_partition(self, ctx: StageContext, partition: Partition) -> str | None:
        """Why a committed night must be redone although its fingerprint is unchanged.

        Returns a reason when a cutout file the night references is missing or fails its
        checksum, else None. Meant for the runner to call on partitions it would skip
        (the files live outside the fingerprinted tables); running the night then
        refetches only those files.
        """
        rows = ctx.lake.read("cutouts", partitions=[partition.key], columns=["path", "sha256"])
        bad = [
            r["path"]
            for r in rows.to_pylist()
            if r["path"] and not ctx.files.verify(r["path"], r["sha256"] or "")
        ]
        if bad:
            return f"{len(bad)} cutout file(s) missing or corrupt, e.g. {bad[0]}"
        return None

    # -- targets --------------------------------------------------------------------------

    def requests(self, ctx: StageContext, exposures: pa.Table) -> list[Request]:
        """The (exposure, target, position) cutouts to make for these exposures."""
        p = self.params
        eids = [int(v) for v in exposures.column("exposure_id").to_pylist()]
        if p.targets_sql:
            mjds = np.asarray(exposures.column("mjd").to_numpy(zero_copy_only=False), float)
            return self._sql_requests(ctx, eids, mjds)
        if p.targets is not None:
            return [Request(e, str(t.id), t.ra, t.dec) for e in eids for t in p.targets]
        if p.center is not None:
            c = p.center
            ra, dec = (c.ra, c.dec) if isinstance(c, SkyPoint) else c.center()  # type: ignore[misc]
            return [Request(e, CENTER_ID, float(ra), float(dec)) for e in eids]
        ras = exposures.column("ra").to_pylist()
        decs = exposures.column("dec").to_pylist()
        return [
            Request(e, CENTER_ID, float(r), float(d))
            for e, r, d in zip(eids, ras, decs, strict=True)
        ]

    def _sql_requests(self, ctx: StageContext, eids: list[int], mjds: np.ndarray) -> list[Request]:
        p = self.params
        try:
            t = ctx.lake.sql(p.targets_sql or "")
        except LakepipeError:
            raise
        except Exception as exc:  # DuckDB binder/parser errors name the problem
            raise SQLError(f"stage {self.name!r}: targets_sql failed: {exc}") from None
        names = set(t.column_names)
        missing = {"target_id", "ra", "dec"} - names
        if missing:
            raise SQLError(
                f"stage {self.name!r}: targets_sql must return target_id, ra, dec (optionally "
                f"mjd, exposure_id, size_arcsec); missing {', '.join(sorted(missing))} (got "
                f"{', '.join(t.column_names)})"
            )
        tid = [str(v) for v in t.column("target_id").to_pylist()]
        ra = np.asarray(t.column("ra").to_pylist(), dtype=float)
        dec = np.asarray(t.column("dec").to_pylist(), dtype=float)
        n = t.num_rows
        mjd = (
            np.array([np.nan if v is None else v for v in t.column("mjd").to_pylist()], float)
            if "mjd" in names
            else np.full(n, np.nan)
        )
        eid_col = t.column("exposure_id").to_pylist() if "exposure_id" in names else [None] * n
        size_col = t.column("size_arcsec").to_pylist() if "size_arcsec" in names else [None] * n
        sizes = [None if v is None else float(v) for v in size_col]
        wanted = set(eids)
        out: list[Request] = []
        seen: set[tuple[int, str]] = set()
        # rows tied to one exposure come first and win over general ones
        for i in range(n):
            e = eid_col[i]
            if e is not None and int(e) in wanted and (int(e), tid[i]) not in seen:
                seen.add((int(e), tid[i]))
                out.append(Request(int(e), tid[i], float(ra[i]) % 360.0, float(dec[i]), sizes[i]))
        general = [i for i in range(n) if eid_col[i] is None]
        by_target: dict[str, list[int]] = {}
        for i in general:
            by_target.setdefault(tid[i], []).append(i)
        for target, rows in by_target.items():
            idx = np.asarray(rows)
            timed = idx[np.isfinite(mjd[idx])]
            static = idx[~np.isfinite(mjd[idx])]
            for e, t_exp in zip(eids, mjds, strict=True):
                if (e, target) in seen:
                    continue
                pos = _position_at(ra[timed], dec[timed], mjd[timed], t_exp, p.time_tolerance_days)
                if pos is None and len(static):
                    pos = (float(ra[static[0]]), float(dec[static[0]]))
                if pos is not None:
                    seen.add((e, target))
                    size = max((sizes[i] for i in rows if sizes[i] is not None), default=None)
                    out.append(Request(e, target, pos[0] % 360.0, pos[1], size))
        return out

    # -- run ------------------------------------------------------------------------------

    def run(self, ctx: StageContext, partition: Partition) -> pa.Table:
        """Make (or keep) every cutout of this night; see the class docstring."""
        if ctx.archive is None:
            raise StageError(f"stage {self.name!r} needs an archive", stage=self.name)
        night = partition.values["night"]
        exposures = ctx.lake.read("exposures", partitions=[partition.key])
        # exposure-major order: archives cache the last full images they read
        requests = sorted(self.requests(ctx, exposures), key=lambda q: (q.exposure_id, q.target_id))
        previous = {
            r["cutout_id"]: r
            for r in ctx.lake.read("cutouts", partitions=[partition.key]).to_pylist()
        }
        footprints = _footprints(exposures)
        rows = []
        for req in requests:
            row = self._reuse(ctx, previous.get(req.cutout_id), req)
            if row is None:
                inside = footprints.get(req.exposure_id)
                if inside is not None and not inside(req.ra, req.dec):
                    row = self._row(req, "off_chip", OFF_CHIP_REASON)
                else:
                    row = self._fetch(ctx, req)
            if row["status"] == "off_chip" and self.params.skip_off_chip:
                continue
            rows.append(row)
        failed = [r for r in rows if r["status"] == "failed"]
        fetched = [r for r in rows if r["status"] in ("ok", "partial")]
        if failed and not fetched:
            # nothing of this night could be fetched: an archive outage, not a few bad
            # exposures; fail the partition so the next run retries it
            raise StageError(
                f"stage {self.name!r}: all {len(failed)} cutout fetches of night {night} "
                f"failed; first: {failed[0]['reason']}",
                stage=self.name,
                partition=partition.key,
            )
        table = pa.Table.from_pylist(rows, schema=_schema()) if rows else _schema().empty_table()
        return table.append_column("night", pa.array([night] * table.num_rows, pa.string()))

    def _row(self, req: Request, status: str, reason: str | None, **extra: Any) -> dict:
        row = {
            "cutout_id": req.cutout_id,
            "exposure_id": req.exposure_id,
            "target_id": req.target_id,
            "ra": req.ra,
            "dec": req.dec,
            "size_arcsec": self._size(req),
            "naxis1": None,
            "naxis2": None,
            "path": None,
            "sha256": None,
            "bytes": None,
            "status": status,
            "reason": reason,
        }
        row.update(extra)
        return row

    def _reuse(self, ctx: StageContext, prev: dict | None, req: Request) -> dict | None:
        """The previous row when it answers the same request and its file verifies."""
        if prev is None or prev["status"] == "failed":
            return None
        same = (
            abs(prev["ra"] - req.ra) < _SAME_POS_DEG
            and abs(prev["dec"] - req.dec) < _SAME_POS_DEG
            and prev["size_arcsec"] == self._size(req)
            and prev["exposure_id"] == req.exposure_id
            and prev["target_id"] == req.target_id
        )
        if not same:
            return None
        if prev["status"] == "off_chip":
            return {k: v for k, v in prev.items() if k != "night" and k != "_healpix_29"}
        if prev["path"] and prev["sha256"] and ctx.files.verify(prev["path"], prev["sha256"]):
            return {k: v for k, v in prev.items() if k != "night" and k != "_healpix_29"}
        ctx.log.info("cutout %s: file %s missing or corrupt; fetching again", req, prev["path"])
        return None

    def _size(self, req: Request) -> float:
        """The request's own side (a ``size_arcsec`` column of targets_sql), else the stage's."""
        return float(req.size_arcsec if req.size_arcsec is not None else self.params.size_arcsec)

    def _fetch(self, ctx: StageContext, req: Request) -> dict:
        size = self._size(req)
        try:
            header, data, status = ctx.archive.cutout(req.exposure_id, req.ra, req.dec, size)
        except (LakepipeError, OSError) as exc:
            return self._row(req, "failed", f"{type(exc).__name__}: {exc}")
        if status == "off_chip" or data is None:
            return self._row(
                req, "off_chip", f"{OFF_CHIP_REASON} (the archive has no pixels there)"
            )
        header = header.copy()
        header["TARGETID"] = (req.target_id, "lakepipe cutout target id")
        header["EXPID"] = (str(req.exposure_id), "lakepipe exposure id")
        ref = ctx.files.put_bytes(fits_bytes(header, data), kind="cutouts", suffix=".fits")
        ny, nx = data.shape
        reason = "cutout crosses the image edge; missing pixels are NaN" if status != "ok" else None
        return self._row(
            req,
            "partial" if status != "ok" else "ok",
            reason,
            naxis1=nx,
            naxis2=ny,
            path=ref.path,
            sha256=ref.sha256,
            bytes=ref.bytes,
        )


def _schema() -> pa.Schema:
    """File schema of ``cutouts`` without the runner-added ``_healpix_29``."""
    from lakepipe.tables import get_contract

    contract = get_contract("cutouts")
    return pa.schema(
        [pa.field(c.name, c.type) for c in contract.file_columns if c.name != "_healpix_29"]
    )


def _footprints(exposures: pa.Table) -> dict[int, Any]:
    """exposure_id → point-in-footprint test, for exposures with all four corners."""
    cols = [f"{a}{k}" for k in range(1, 5) for a in ("ra", "dec")]
    if not set(cols) <= set(exposures.column_names):
        return {}
    out: dict[int, Any] = {}
    for r in exposures.select(["exposure_id", *cols]).to_pylist():
        if any(r[c] is None for c in cols):
            continue
        rc = np.array([r[f"ra{k}"] for k in range(1, 5)])
        dc = np.array([r[f"dec{k}"] for k in range(1, 5)])
        out[int(r["exposure_id"])] = lambda ra, dec, rc=rc, dc=dc: bool(
            point_in_footprint(ra, dec, rc, dc)
        )
    return out


def _position_at(
    ra: np.ndarray, dec: np.ndarray, mjd: np.ndarray, t: float, tol_days: float
) -> tuple[float, float] | None:
    """Position at time ``t`` from time-tagged rows (deg), or None outside their span.

    Linear interpolation between the bracketing rows on the unit sphere (renormalised
    chord), so RA wrap-around needs no care; beyond the span, the nearest row when it is
    within ``tol_days``.
    """
    if len(mjd) == 0 or not math.isfinite(t):
        return None
    order = np.argsort(mjd, kind="stable")
    ra, dec, mjd = ra[order], dec[order], mjd[order]
    nearest = int(np.argmin(np.abs(mjd - t)))
    outside = len(mjd) == 1 or t < mjd[0] or t > mjd[-1]
    if outside and abs(mjd[nearest] - t) <= tol_days:
        return float(ra[nearest]), float(dec[nearest])
    if t < mjd[0] or t > mjd[-1]:
        return None
    j = int(np.searchsorted(mjd, t, side="right"))
    j = min(max(j, 1), len(mjd) - 1)
    i = j - 1
    span = mjd[j] - mjd[i]
    f = 0.0 if span <= 0 else (t - mjd[i]) / span
    v = [_unit(ra[k], dec[k]) for k in (i, j)]
    w = (1.0 - f) * v[0] + f * v[1]
    w /= np.linalg.norm(w)
    return float(np.degrees(np.arctan2(w[1], w[0])) % 360.0), float(np.degrees(np.arcsin(w[2])))


def _unit(ra_deg: float, dec_deg: float) -> np.ndarray:
    r, d = math.radians(ra_deg), math.radians(dec_deg)
    return np.array([math.cos(d) * math.cos(r), math.cos(d) * math.sin(r), math.sin(d)])
