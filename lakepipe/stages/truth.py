"""``truth``: the virtual survey's injected truth as lake tables.

Tests, benchmarks and users measure completeness and accuracy against what the
``sim`` archive rendered; this stage puts it beside the measurements so one SQL join
answers "which injected stars did we recover?".
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from lakepipe.errors import UserError
from lakepipe.stages.base import Partition, Stage, StageContext, StageParams, register_stage


@register_stage("truth")
class TruthStage(Stage):
    """Write what the virtual survey injected, for the exposures in the lake.

    One partition per night of ``exposures``. ``truth_objects`` holds every rendered
    object per exposure (stars, variables, the transient, asteroids, "appeared"
    sources) with its true 0-based pixel position, sky position, magnitude and flux
    (ADU); ``truth_asteroids`` the asteroids' true positions per exposure. Needs
    ``archive: {kind: sim}``.

    Reads: exposures. Writes: truth_objects, truth_asteroids.

    Example::

        truth: {kind: truth, inputs: [exposures]}

    Then e.g. ``select kind, count(*) from truth_objects group by 1``.
    """

    reads = ("exposures",)
    writes = ("truth_objects", "truth_asteroids")
    uses_archive = True

    class Params(StageParams):
        pass

    def partitions(self, ctx: StageContext) -> list[Partition]:
        if not hasattr(ctx.archive, "truth_tables"):
            kind = getattr(ctx.archive, "kind", "?")
            raise UserError(
                f"stage {self.name!r}: the truth stage needs `archive: {{kind: sim}}` "
                f"(archive {kind!r} has no injected truth)"
            )
        return [
            Partition.of(reads={"exposures": [f"night={n}"]}, night=n)
            for n in ctx.lake.partition_values("exposures", "night")
        ]

    def run(self, ctx: StageContext, partition: Partition) -> dict[str, pa.Table]:
        night = partition.values["night"]
        ids = ctx.lake.read("exposures", partitions=[partition.key], columns=["exposure_id"])
        wanted = ids.column("exposure_id").combine_chunks()
        tables = ctx.archive.truth_tables(night)  # type: ignore[union-attr]
        return {
            name: t.filter(pc.is_in(t.column("exposure_id"), value_set=wanted))
            for name, t in tables.items()
        }
