"""``orbit_replicas``: seeded samples of each orbit's posterior."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
from pydantic import Field

from lakepipe.astro.orbit_fit import sample_replicas
from lakepipe.stages.base import Partition, Stage, StageContext, StageParams, register_stage
from lakepipe.stages.orbit_fit import (
    DEFAULT_BUCKETS,
    STATE_COLUMNS,
    bucket_partitions,
    contract_schema,
    orbit_from_row,
)


def object_seed(seed: int, designation: str) -> int:
    """A per-object seed: the spec's seed mixed with the designation (SHA-256), so an
    object's replicas do not depend on which other objects are fitted."""
    digest = hashlib.sha256(f"{int(seed)}:{designation}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def replica_rows(row: dict, n: int, seed: int) -> pa.Table:
    """``orbit_replicas`` rows of one ``orbits`` row: replica 0 the nominal state, then
    ``n - 1`` draws from N(state, covariance) (linearised posterior)."""
    state, cov, epoch = orbit_from_row(row)
    draws = sample_replicas(state, cov, n, object_seed(seed, row["designation"]),
                            include_nominal=True)  # fmt: skip
    cols: dict[str, object] = {
        "bucket": [row["bucket"]] * n,
        "designation": [row["designation"]] * n,
        "replica": np.arange(n, dtype=np.int32),
        "epoch_mjd_tdb": np.full(n, epoch),
    }
    for k, c in enumerate(STATE_COLUMNS):
        cols[c] = draws[:, k]
    cols["h_mag"] = [row.get("h_mag")] * n
    cols["g_slope"] = [row.get("g_slope")] * n
    cols["perturbers"] = [row["perturbers"]] * n
    return pa.table(cols, schema=contract_schema("orbit_replicas"))


@register_stage("orbit_replicas")
class OrbitReplicasStage(Stage):
    """Sample ``n`` states of every orbit from its posterior, seeded.

    Reads ``orbits`` and writes ``orbit_replicas``: per object, replica 0 is the nominal
    state and replicas 1..n-1 are draws from the linearised posterior N(x, Gamma) of the
    fit (:func:`lakepipe.astro.orbit_fit.sample_replicas`), in heliocentric ICRS (au,
    au/day) at the orbit's epoch (MJD TDB). The random stream of each object is seeded by
    ``seed`` and its designation, so the same spec gives the same replicas.

    Parameters
    ----------
    n : replicas per object (including the nominal one).
    seed : random seed.
    buckets : hash buckets (must match the orbit_fit stage's).

    Example::

        replicas: {kind: orbit_replicas, inputs: [orbits], n: 500, seed: 1}
    """

    reads = ("orbits",)
    writes = ("orbit_replicas",)
    version = "1"

    class Params(StageParams):
        n: int = Field(500, ge=2, le=100000, description="Replicas per object (incl. nominal)")
        seed: int = Field(0, description="Random seed")
        buckets: int = Field(DEFAULT_BUCKETS, ge=1, le=256, description="Hash buckets")

    def partitions(self, ctx: StageContext) -> list[Partition]:
        """One partition per bucket, reading the same bucket of ``orbits``."""
        return bucket_partitions(self.params.buckets, {"orbits": ["same"]})

    def run(self, ctx: StageContext, partition: Partition) -> pa.Table:
        """Sample every orbit of this bucket."""
        orbits = ctx.lake.read("orbits", partitions=[partition.key]).to_pylist()
        pieces = [replica_rows(r, self.params.n, self.params.seed) for r in orbits]
        if not pieces:
            return contract_schema("orbit_replicas").empty_table()
        return pa.concat_tables(pieces)
