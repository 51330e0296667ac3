"""``tube``: the ephemeris tube — per epoch, the replica cloud's centre and credible radius."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from pydantic import Field

from lakepipe.stages.base import Partition, Stage, StageContext, StageParams, register_stage
from lakepipe.stages.orbit_fit import DEFAULT_BUCKETS, bucket_partitions, contract_schema

ARCSEC_PER_DEG = 3600.0


def unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """(..., 3) unit vectors of RA/Dec in degrees."""
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def separation_arcsec(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle separation (arcsec) by the atan2 (Vincenty) form, stable at all scales."""
    r1, d1, r2, d2 = (np.radians(np.asarray(x, float)) for x in (ra1, dec1, ra2, dec2))
    dra = r2 - r1
    num = np.hypot(np.cos(d2) * np.sin(dra),
                   np.cos(d1) * np.sin(d2) - np.sin(d1) * np.cos(d2) * np.cos(dra))  # fmt: skip
    den = np.sin(d1) * np.sin(d2) + np.cos(d1) * np.cos(d2) * np.cos(dra)
    return np.degrees(np.arctan2(num, den)) * ARCSEC_PER_DEG


def cloud_centre_radius(
    ra_deg: np.ndarray, dec_deg: np.ndarray, cred: float
) -> tuple[float, float, float]:
    """(centre RA, centre Dec, radius in arcsec) of a cloud of sky positions.

    The centre is the normalised mean unit vector; the radius is the ``cred`` quantile of
    the angular distances of the points from it (the smallest centred circle holding that
    fraction of the replicas; numpy's default linear-interpolated quantile).
    """
    v = unit_vectors(ra_deg, dec_deg).mean(axis=0)
    v /= np.linalg.norm(v)
    ra_c = float(np.degrees(np.arctan2(v[1], v[0])) % 360.0)
    dec_c = float(np.degrees(np.arcsin(np.clip(v[2], -1.0, 1.0))))
    sep = separation_arcsec(ra_c, dec_c, ra_deg, dec_deg)
    return ra_c, dec_c, float(np.quantile(sep, cred))


def tube_nodes(ephemerides: pa.Table, cred: float, margin_arcsec: float) -> pa.Table:
    """``tube_nodes`` rows of ``ephemerides`` rows: one per (object, epoch)."""
    schema = contract_schema("tube_nodes")
    if ephemerides.num_rows == 0:
        return schema.empty_table()
    cols = {c: ephemerides.column(c).to_numpy(zero_copy_only=False)
            for c in ("designation", "mjd", "ra", "dec", "replica")}  # fmt: skip
    eid = ephemerides.column("exposure_id").to_pylist()
    vmag = np.array([np.nan if v is None else v for v in ephemerides.column("v_mag").to_pylist()])
    bucket = ephemerides.column("bucket")[0].as_py()
    des = cols["designation"].astype(str)
    order = np.lexsort((cols["replica"], cols["mjd"], des))
    keys = np.stack([des[order], cols["mjd"][order].astype(str)], axis=1)
    change = np.flatnonzero(np.any(keys[1:] != keys[:-1], axis=1)) + 1
    rows = []
    for grp in np.split(order, change):
        ra, dec = cols["ra"][grp], cols["dec"][grp]
        ra_c, dec_c, r = cloud_centre_radius(ra, dec, cred)
        nominal = grp[cols["replica"][grp] == 0]
        v = vmag[grp]
        rows.append(
            {
                "bucket": bucket,
                "designation": des[grp[0]],
                "mjd": float(cols["mjd"][grp[0]]),
                "exposure_id": eid[grp[0]],
                "ra": ra_c,
                "dec": dec_c,
                "ra_nominal": float(cols["ra"][nominal[0]]) if nominal.size else None,
                "dec_nominal": float(cols["dec"][nominal[0]]) if nominal.size else None,
                "radius_cred_arcsec": r,
                "radius_arcsec": r + margin_arcsec,
                "cred": cred,
                "margin_arcsec": margin_arcsec,
                "n_replicas": int(grp.size),
                "v_mag": float(np.median(v)) if np.isfinite(v).any() else None,
            }
        )
    return pa.Table.from_pylist(rows, schema=schema)


@register_stage("tube")
class TubeStage(Stage):
    """Compress each object's replica cloud into tube nodes: centre and credible radius.

    Reads ``ephemerides`` and writes ``tube_nodes``: per object and epoch, the centre of
    the replicas' sky positions (normalised mean unit vector), the radius around it
    holding the fraction ``cred`` of the replicas, and that radius plus
    ``margin_arcsec`` (astrometric and timing slack) as the tube radius. With the
    posterior sampled by enough replicas, the true position lies inside the tube at a
    fraction ``cred`` of the epochs (checked on the virtual survey's asteroids).

    Parameters
    ----------
    cred : credibility level of the radius (0-1).
    margin_arcsec : added to the credible radius (arcsec).
    buckets : hash buckets (must match the ephemerides').

    Example::

        tube: {kind: tube, inputs: [ephemerides], cred: 0.99, margin_arcsec: 2.0}
    """

    reads = ("ephemerides",)
    writes = ("tube_nodes",)
    version = "1"

    class Params(StageParams):
        cred: float = Field(0.99, gt=0.0, le=1.0, description="Credibility level")
        margin_arcsec: float = Field(2.0, ge=0.0, description="Margin added (arcsec)")
        buckets: int = Field(DEFAULT_BUCKETS, ge=1, le=256, description="Hash buckets")

    def partitions(self, ctx: StageContext) -> list[Partition]:
        """One partition per bucket, reading that bucket of ``ephemerides``."""
        return bucket_partitions(self.params.buckets, {"ephemerides": ["same"]})

    def run(self, ctx: StageContext, partition: Partition) -> pa.Table:
        """Tube nodes of this bucket's objects."""
        eph = ctx.lake.read(
            "ephemerides",
            partitions=[partition.key],
            columns=["bucket", "designation", "replica", "mjd", "exposure_id", "ra", "dec",
                     "v_mag"],
        )  # fmt: skip
        return tube_nodes(eph, self.params.cred, self.params.margin_arcsec)
