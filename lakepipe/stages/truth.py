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

# The unpartitioned partition that carries the static sky model and the orbits.
SKY_KEY = ""


@register_stage("truth")
class TruthStage(Stage):
    """Write what the virtual survey injected, for the exposures in the lake.

    Per exposure (one partition per night of ``exposures``): ``truth_objects`` holds
    every rendered object (stars, variables, the transient, asteroids, "appeared"
    sources, defects) with its true 0-based pixel position, sky position, magnitude and
    flux (ADU); ``truth_asteroids`` the asteroids' true topocentric positions.

    For the whole survey (one unpartitioned partition): ``truth_sky`` is the static sky
    model — every catalogued or rendered source with ``in_catalog``/``rendered`` flags
    (``kind = 'vanished'``: in the catalog, never rendered; ``'appeared'``: rendered,
    not catalogued), the periodic variables' period, amplitude and epoch, and the
    transient's t0 and power-law decline index; ``truth_orbits`` the asteroids' true
    heliocentric ICRS states (au, au/d) at their TDB epochs with ecliptic elements and
    H, G. Needs ``archive: {kind: sim}``.

    Reads: exposures. Writes: truth_objects, truth_asteroids, truth_sky, truth_orbits.

    Example::

        truth: {kind: truth, inputs: [exposures]}

    Then e.g. ``select kind, count(*) from truth_objects group by 1`` or
    ``select source_id, period_d, amplitude_mag from truth_sky where var_type is not null``.
    """

    reads = ("exposures",)
    writes = ("truth_objects", "truth_asteroids", "truth_sky", "truth_orbits")
    uses_archive = True
    version = "2"

    class Params(StageParams):
        pass

    def partitions(self, ctx: StageContext) -> list[Partition]:
        if not hasattr(ctx.archive, "truth_tables"):
            kind = getattr(ctx.archive, "kind", "?")
            raise UserError(
                f"stage {self.name!r}: the truth stage needs `archive: {{kind: sim}}` "
                f"(archive {kind!r} has no injected truth)"
            )
        nights = [
            Partition.of(reads={"exposures": [f"night={n}"]}, night=n)
            for n in ctx.lake.partition_values("exposures", "night")
        ]
        # the sky model and the orbits depend on the archive only (reads nothing)
        return [Partition(key=SKY_KEY, reads={}), *nights]

    def run(self, ctx: StageContext, partition: Partition) -> dict[str, pa.Table]:
        archive = ctx.archive
        if partition.key == SKY_KEY:
            return {
                "truth_sky": archive.sky_truth(),  # type: ignore[union-attr]
                "truth_orbits": archive.orbit_truth(),  # type: ignore[union-attr]
            }
        night = partition.values["night"]
        ids = ctx.lake.read("exposures", partitions=[partition.key], columns=["exposure_id"])
        wanted = ids.column("exposure_id").combine_chunks()
        tables = archive.truth_tables(night)  # type: ignore[union-attr]
        return {
            name: t.filter(pc.is_in(t.column("exposure_id"), value_set=wanted))
            for name, t in tables.items()
        }
