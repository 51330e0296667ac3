"""Test-only stage kinds (registered through ``LAKEPIPE_PLUGINS=tests.toy``).

``toy_numbers`` writes deterministic rows per bucket; ``toy_sums`` sums them per
bucket; ``toy_total`` adds the sums up (one unpartitioned row). They exercise the
runner, lake and CLI without any astronomy; nothing here ships in the package.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import Field

from lakepipe.errors import InputNotFoundError, ParseError
from lakepipe.stages.base import Partition, Stage, StageContext, StageParams, register_stage
from lakepipe.tables import register_contract

HERE = Path(__file__).parent
for _yaml in sorted(HERE.glob("*.yaml")):
    register_contract(_yaml)


@register_stage("toy_numbers")
class ToyNumbersStage(Stage):
    """Deterministic numbers per bucket (test-only)."""

    writes = ("toy_numbers",)

    class Params(StageParams):
        buckets: int = Field(4, ge=1)
        rows: int = Field(10, ge=0)
        scale: float = 1.0
        seed: int = 0
        sleep_s: float = 0.0
        fail_buckets: list[int] = Field(default_factory=list)
        fail_while: str | None = None  # fail_buckets fail only while this file exists
        need_file: str | None = None
        bad: str | None = None  # missing_column | wrong_type | null_key: break the contract
        data_file: str | None = None  # an external input whose contents are fingerprinted
        checked_file: str | None = None  # must exist and read "ok": checked by preflight()
        bad_input_buckets: list[int] = Field(default_factory=list)  # fail with a ParseError

    def preflight(self, ctx: StageContext) -> None:
        if self.params.checked_file is None:
            return
        path = ctx.resolve(self.params.checked_file)
        if not path.is_file():
            raise InputNotFoundError(
                f"stage {self.name!r}: checked_file {path} not found; fix stages.{self.name}."
                "checked_file"
            )
        if path.read_text().strip() != "ok":
            raise ParseError(f"{path}:1: expected 'ok'; fix the file")

    def partitions(self, ctx: StageContext) -> list[Partition]:
        if self.params.need_file and not ctx.resolve(self.params.need_file).exists():
            raise InputNotFoundError(f"toy input file {self.params.need_file} not found")
        return [Partition.of(bucket=f"{b:02d}") for b in range(self.params.buckets)]

    def run(self, ctx: StageContext, partition: Partition) -> pa.Table:
        b = int(partition.values["bucket"])
        flag = self.params.fail_while
        if b in self.params.fail_buckets and (flag is None or ctx.resolve(flag).exists()):
            raise RuntimeError(f"toy failure in bucket {b}")
        if b in self.params.bad_input_buckets:
            raise ParseError(f"toy input of bucket {b} is malformed; fix bucket {b}")
        time.sleep(self.params.sleep_s)
        rng = np.random.default_rng([self.params.seed, b])
        n = self.params.rows
        cols = {
            "id": pa.array(np.arange(n, dtype=np.int64) + 1_000_000 * b),
            "value": pa.array(rng.normal(size=n) * self.params.scale),
            "ra": pa.array(rng.uniform(0, 360, n)),
            "dec": pa.array(rng.uniform(-90, 90, n)),
        }
        if self.params.bad == "missing_column":
            del cols["value"]
        elif self.params.bad == "wrong_type":
            cols["value"] = pa.array([f"v{i}" for i in range(n)])
        elif self.params.bad == "null_key":
            cols["id"] = pa.array([None] * n, pa.int64())
        return pa.table(cols)

    def input_files(self, ctx: StageContext) -> list[Path]:
        return [ctx.resolve(self.params.data_file)] if self.params.data_file else []

    def verify_partition(self, ctx: StageContext, partition: Partition) -> str | None:
        flag = ctx.resolve(f"damaged-{partition.values['bucket']}")
        return "flag file says so" if flag.exists() else None


@register_stage("toy_sums")
class ToySumsStage(Stage):
    """Per-bucket sums of toy_numbers (test-only); reads only its own bucket."""

    reads = ("toy_numbers",)
    writes = ("toy_sums",)

    class Params(StageParams):
        offset: float = 0.0
        list_from_rows: bool = False  # list buckets from toy_numbers' rows, not its keys

    def partitions(self, ctx: StageContext) -> list[Partition]:
        if self.params.list_from_rows:
            col = ctx.lake.read("toy_numbers", columns=["bucket"]).column("bucket")
            buckets = sorted(set(col.to_pylist()))
        else:
            buckets = ctx.lake.partition_values("toy_numbers", "bucket")
        return [Partition.of(reads={"toy_numbers": [f"bucket={b}"]}, bucket=b) for b in buckets]

    def run(self, ctx: StageContext, partition: Partition) -> pa.Table:
        t = ctx.lake.read("toy_numbers", partitions=[partition.key])
        total = float(np.sum(t.column("value").to_numpy())) + self.params.offset
        return pa.table(
            {"bucket": [partition.values["bucket"]], "n": [t.num_rows], "total": [total]}
        )


@register_stage("toy_total")
class ToyTotalStage(Stage):
    """The sum of every toy_sums row (test-only); one unpartitioned row, reads everything."""

    reads = ("toy_sums",)
    writes = ("toy_totals",)

    def partitions(self, ctx: StageContext) -> list[Partition]:
        return [Partition(key="")]

    def run(self, ctx: StageContext, partition: Partition) -> pa.Table:
        t = ctx.lake.read("toy_sums")
        return pa.table(
            {
                "n": [int(np.sum(t.column("n").to_numpy()))],
                "total": [float(np.sum(t.column("total").to_numpy()))],
            }
        )
