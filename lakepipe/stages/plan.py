"""``plan``: the exposures an ephemeris tube crosses, with planned cutouts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from lakepipe.astro.wcs import point_in_footprint
from lakepipe.stages.base import Partition, Stage, StageContext, StageParams, register_stage
from lakepipe.stages.orbit_fit import DEFAULT_BUCKETS, bucket_partitions, contract_schema
from lakepipe.stages.tube import unit_vectors

ARCSEC_PER_RAD = 180.0 / np.pi * 3600.0


def disc_meets_footprint(
    ra: float, dec: float, radius_arcsec: float, ra_corners: np.ndarray, dec_corners: np.ndarray
) -> tuple[bool, bool]:
    """(disc intersects the footprint, centre inside it) for a 4-corner footprint.

    Gnomonic projection about the disc centre: great-circle edges project to straight
    lines and the distance from the tangent point to a line is tan(angle), so the disc
    (small, < a few degrees) meets the footprint when its centre is inside
    (:func:`lakepipe.astro.wcs.point_in_footprint`) or an edge passes within its radius.
    """
    inside = bool(point_in_footprint(np.array(ra), np.array(dec), ra_corners, dec_corners))
    if inside:
        return True, True
    c = unit_vectors(np.array(ra), np.array(dec))
    east = np.array([-np.sin(np.radians(ra)), np.cos(np.radians(ra)), 0.0])
    north = np.cross(c, east)
    v = unit_vectors(np.asarray(ra_corners, float), np.asarray(dec_corners, float))
    z = v @ c
    if np.any(z <= 0):
        return False, False  # a corner 90 deg away: not near this disc
    xy = np.stack([v @ east, v @ north], axis=1) / z[:, None]
    limit = np.tan(radius_arcsec / ARCSEC_PER_RAD)
    for k in range(len(xy)):
        a, b = xy[k], xy[(k + 1) % len(xy)]
        ab = b - a
        t = np.clip(-(a @ ab) / max(ab @ ab, 1e-300), 0.0, 1.0)
        if np.hypot(*(a + t * ab)) <= limit:
            return True, False
    return False, False


def _interp_node(nodes: dict[str, np.ndarray], mjd: float, tol_days: float):
    """Tube centre and radius at ``mjd``: linear between the bracketing nodes (RA unwrapped),
    with the larger radius; the nearest node within ``tol_days`` outside their span."""
    t = nodes["mjd"]
    j = int(np.searchsorted(t, mjd))
    if j < t.size and abs(t[j] - mjd) <= 1e-9:
        return nodes["ra"][j], nodes["dec"][j], nodes["radius_arcsec"][j], nodes["v_mag"][j]
    if 0 < j < t.size:
        f = (mjd - t[j - 1]) / (t[j] - t[j - 1])
        ra0, ra1 = nodes["ra"][j - 1], nodes["ra"][j]
        ra1 = ra0 + ((ra1 - ra0 + 180.0) % 360.0 - 180.0)
        return (
            (ra0 + f * (ra1 - ra0)) % 360.0,
            nodes["dec"][j - 1] + f * (nodes["dec"][j] - nodes["dec"][j - 1]),
            max(nodes["radius_arcsec"][j - 1], nodes["radius_arcsec"][j]),
            nodes["v_mag"][j],
        )
    k = 0 if j == 0 else t.size - 1
    if abs(t[k] - mjd) <= tol_days:
        return nodes["ra"][k], nodes["dec"][k], nodes["radius_arcsec"][k], nodes["v_mag"][k]
    return None


def plan_exposures(
    nodes: pa.Table,
    exposures: pa.Table,
    *,
    min_size_arcsec: float,
    pad_arcsec: float,
    time_tolerance_days: float,
) -> pa.Table:
    """``plan`` rows: every (object, exposure) whose footprint meets the tube at its time.

    A node tied to the exposure (``exposure_id``) gives the tube there; otherwise the tube
    is interpolated in time between nodes. The cutout is centred on the tube centre with
    side ``max(2 * (radius + pad), min_size_arcsec)``.
    """
    schema = contract_schema("plan")
    if nodes.num_rows == 0 or exposures.num_rows == 0:
        return schema.empty_table()
    ex = exposures.to_pydict()
    corners_ra = np.stack([np.asarray(ex[f"ra{k}"], float) for k in range(1, 5)], axis=1)
    corners_dec = np.stack([np.asarray(ex[f"dec{k}"], float) for k in range(1, 5)], axis=1)
    bucket = nodes.column("bucket")[0].as_py()
    rows = []
    nd = nodes.to_pydict()
    for d in sorted(set(nd["designation"])):
        idx = [i for i, x in enumerate(nd["designation"]) if x == d]
        idx.sort(key=lambda i: nd["mjd"][i])
        arr = {
            k: np.array([np.nan if nd[k][i] is None else nd[k][i] for i in idx], float)
            for k in ("mjd", "ra", "dec", "radius_arcsec", "v_mag")
        }
        by_exposure = {nd["exposure_id"][i]: i for i in idx if nd["exposure_id"][i] is not None}
        for j, eid in enumerate(ex["exposure_id"]):
            if eid in by_exposure:
                i = by_exposure[eid]
                node = (nd["ra"][i], nd["dec"][i], nd["radius_arcsec"][i], nd["v_mag"][i])
            else:
                node = _interp_node(arr, float(ex["mjd"][j]), time_tolerance_days)
            if node is None:
                continue
            ra, dec, radius, vmag = node
            meets, centre_in = disc_meets_footprint(ra, dec, radius, corners_ra[j], corners_dec[j])
            if not meets:
                continue
            rows.append(
                {
                    "bucket": bucket,
                    "target_id": d,
                    "designation": d,
                    "exposure_id": int(eid),
                    "night": ex["night"][j],
                    "filter": ex["filter"][j],
                    "mjd": float(ex["mjd"][j]),
                    "ra": float(ra),
                    "dec": float(dec),
                    "radius_arcsec": float(radius),
                    "size_arcsec": max(2.0 * (radius + pad_arcsec), min_size_arcsec),
                    "centre_on_image": centre_in,
                    "v_mag": None if vmag is None or not np.isfinite(vmag) else float(vmag),
                }
            )
    return pa.Table.from_pylist(rows, schema=schema)


@register_stage("plan")
class PlanStage(Stage):
    """Plan the cutouts: exposures whose footprint and time intersect an ephemeris tube.

    Reads ``tube_nodes`` and ``exposures`` (footprint corners ``ra1..dec4``, ``mjd``) and
    writes ``plan``: one row per (object, exposure) — deduplicated — whose footprint
    meets the tube disc at the exposure's mid-time (the node computed at that exposure,
    or the tube interpolated between nodes; epochs farther than
    ``time_tolerance_days`` outside the nodes' span are not planned), with the planned
    cutout centre (the tube centre) and side ``size_arcsec = max(2 * (radius +
    pad_arcsec), min_size_arcsec)``. The table is shaped for the cutouts stage::

        cutouts: {kind: cutouts, inputs: [exposures, plan], size_arcsec: 120,
                  targets_sql: "select target_id, ra, dec, exposure_id from plan"}

    (the cutouts stage takes one ``size_arcsec``: set it at least ``max(size_arcsec)`` of
    the plan; a diagnostic can check it).

    Parameters
    ----------
    min_size_arcsec : smallest cutout side (arcsec).
    pad_arcsec : added to the tube radius on each side (arcsec).
    time_tolerance_days : how far outside the nodes' span an exposure may be (days).
    buckets : hash buckets (must match the tube's).

    Example::

        plan: {kind: plan, inputs: [tube, exposures], min_size_arcsec: 60}
    """

    reads = ("tube_nodes", "exposures")
    writes = ("plan",)
    version = "1"

    class Params(StageParams):
        min_size_arcsec: float = Field(60.0, gt=0.0, description="Smallest cutout side (arcsec)")
        pad_arcsec: float = Field(10.0, ge=0.0, description="Pad on each side (arcsec)")
        time_tolerance_days: float = Field(
            0.5, ge=0.0, description="Max days outside the nodes' span"
        )
        buckets: int = Field(DEFAULT_BUCKETS, ge=1, le=256, description="Hash buckets")

    def partitions(self, ctx: StageContext) -> list[Partition]:
        """One partition per bucket: its tube nodes and every exposure."""
        return bucket_partitions(
            self.params.buckets,
            {"tube_nodes": ["same"], "exposures": ctx.lake.partitions("exposures")},
        )

    def run(self, ctx: StageContext, partition: Partition) -> pa.Table:
        """Plan this bucket's objects."""
        p = self.params
        nodes = ctx.lake.read("tube_nodes", partitions=[partition.key])
        cols = ["exposure_id", "night", "filter", "mjd"] + [
            f"{c}{k}" for k in range(1, 5) for c in ("ra", "dec")
        ]
        exposures = ctx.lake.read("exposures", columns=cols)
        return plan_exposures(
            nodes,
            exposures,
            min_size_arcsec=p.min_size_arcsec,
            pad_arcsec=p.pad_arcsec,
            time_tolerance_days=p.time_tolerance_days,
        )
