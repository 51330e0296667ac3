"""``exposures``: select survey exposures from the archive into the lake."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from lakepipe.archives.query import ExposureQuery
from lakepipe.errors import StageError, UserError
from lakepipe.registry import did_you_mean
from lakepipe.stages.base import Partition, Stage, StageContext, StageParams, register_stage


@register_stage("exposures")
class ExposuresStage(Stage):
    """Select exposures from the archive (cone or box, time range, filters, fields).

    Writes ``exposures``, partitioned by night (one partition per night the archive
    reports for the query), reads no table. Each row carries observing conditions, the
    zeropoint and depth, and the footprint corners ``ra1, dec1 … ra4, dec4`` (centres of
    the corner pixels, in order around the image), so "which exposures contain this
    point at this time" is one SQL query. With the point as the origin, it is inside
    when the four edge cross products share a sign. This readable form treats edges as
    straight in (RA, Dec) rather than great circles, so points within about 1″ of an edge
    near the equator (~10″ at |dec| = 60° for a ZTF quadrant) may be misclassified;
    ``lakepipe.astro.wcs.footprint_contains_sql(ra, dec)`` writes the exact spherical
    predicate for the same query::

        with f as (
          select exposure_id, night, mjd, filter,
                 (ra1 - 150.1 + 540) % 360 - 180 as x1, dec1 - 2.3 as y1,
                 (ra2 - 150.1 + 540) % 360 - 180 as x2, dec2 - 2.3 as y2,
                 (ra3 - 150.1 + 540) % 360 - 180 as x3, dec3 - 2.3 as y3,
                 (ra4 - 150.1 + 540) % 360 - 180 as x4, dec4 - 2.3 as y4
          from exposures
          where mjd between 60678.1 and 60678.5 and abs(dec - 2.3) < 2)
        select exposure_id, night, mjd, filter from f
        where least(x1*y2 - x2*y1, x2*y3 - x3*y2, x3*y4 - x4*y3, x4*y1 - x1*y4) >= 0
           or greatest(x1*y2 - x2*y1, x2*y3 - x3*y2, x3*y4 - x4*y3, x4*y1 - x1*y4) <= 0

    (RA differences need no cos(dec) factor: scaling x by a positive constant does not
    change the signs.)

    Parameters
    ----------
    where : the selection (``ExposureQuery``): ``ra, dec, radius_deg`` (a cone, deg) or
        ``box: [ra_min, ra_max, dec_min, dec_max]``; ``start``/``end`` (ISO date or
        date-time UTC, or MJD; a bare ``end`` date includes that day); ``filters``;
        ``field_ids``; ``night``; ``max_rows`` (the earliest exposures first).

    Example::

        exposures:
          kind: exposures
          where: {ra: 150.0, dec: 2.2, radius_deg: 0.5, start: 2025-01-01,
                  end: 2025-01-05, filters: [zg, zr]}
    """

    reads = ()
    writes = ("exposures",)
    uses_archive = True
    version = "1"

    class Params(StageParams):
        where: ExposureQuery = Field(
            default_factory=ExposureQuery, description="Which exposures to select"
        )

    def preflight(self, ctx: StageContext) -> None:
        """Unknown filter codes, checked against the archive's kind (no archive built,
        so ``lakepipe validate`` catches them too)."""
        self._check_filters(ctx.archive or ctx.archive_type)

    def partitions(self, ctx: StageContext) -> list[Partition]:
        """One partition per night with selected exposures; nothing is read from the lake."""
        archive = _archive(ctx, self.name)
        where = self.params.where
        nights = archive.nights(where)
        if not nights:
            query = json.dumps(where.model_dump(mode="json", exclude_none=True))
            ctx.log.warning(
                "stage %r: the archive (%s) has no exposures matching where: %s; "
                "widen the region, time range, filters or field ids",
                self.name,
                getattr(archive, "kind", type(archive).__name__),
                query,
            )
        return [Partition.of(reads={}, night=n) for n in nights]

    def _check_filters(self, archive: Any) -> None:
        """Unknown filter codes are errors where the archive (or its class) lists its
        filters (``known_filters``: the sim's zg, zr, zi); otherwise they select nothing."""
        known = list(getattr(archive, "known_filters", None) or [])
        if not known or not self.params.where.filters:
            return
        bad = [f for f in self.params.where.filters if f not in known]
        if bad:
            kind = getattr(archive, "kind", type(archive).__name__)
            raise UserError(
                f"stages.{self.name}.where.filters: unknown filter {bad[0]!r} for archive "
                f"{kind!r}.{did_you_mean(bad[0], known)} Known filters: {', '.join(known)}."
            )

    def run(self, ctx: StageContext, partition: Partition) -> pa.Table:
        """The archive's selected exposures of this partition's night."""
        night = partition.values["night"]
        where = self.params.where
        archive = _archive(ctx, self.name)
        if where.max_rows is None:
            table = archive.exposures(where.model_copy(update={"night": night}))
        else:
            # a row cap applies to the whole selection: select it all, keep this night
            table = archive.exposures(where)
        if "night" not in table.column_names:
            raise StageError(
                f"stage {self.name!r}: archive {type(archive).__name__} returned exposures "
                "without a 'night' column",
                stage=self.name,
                partition=partition.key,
            )
        return table.filter(pc.equal(table.column("night"), night))


def _archive(ctx: StageContext, stage: str) -> Any:
    if ctx.archive is None:
        raise StageError(f"stage {stage!r} needs an archive (`archive:` in the spec)", stage=stage)
    return ctx.archive
