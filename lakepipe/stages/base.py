"""The stage contract: what every stage kind implements and what the runner gives it.

A stage kind is a small class registered under its YAML ``kind`` name::

    from lakepipe.stages.base import Partition, Stage, StageContext, stages

    @stages.register("cutouts")
    class CutoutsStage(Stage):
        \"\"\"Manual page: summary, parameters with units, tables, YAML example.\"\"\"

        reads = ("exposures",)
        writes = ("cutouts",)
        version = "1"            # bump when the output for the same input changes

        class Params(StageParams):
            size_arcsec: float = Field(600.0, gt=0, description="Cutout side (arcsec)")

        def preflight(self, ctx: StageContext) -> None:   # optional: check inputs early
            ...                                            # raise a UserError naming the fix

        def partitions(self, ctx: StageContext) -> list[Partition]:
            return [Partition.of(night=n) for n in ctx.lake.partition_values("exposures", "night")]

        def run(self, ctx: StageContext, partition: Partition) -> pa.Table:
            exposures = ctx.lake.read("exposures", partitions=[partition.key])
            ...

Stages are pure functions of their inputs and params: they never write table files,
never read the spec and never print. The runner writes, checks the contract,
fingerprints, logs, retries and parallelises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from lakepipe.registry import Registry

if TYPE_CHECKING:
    from lakepipe.archives.base import Archive
    from lakepipe.lake import FileStore, LakeReader

log = logging.getLogger("lakepipe.stages")


class StageParams(BaseModel):
    """Base of every stage's ``Params``: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Partition:
    """One output partition of a stage.

    ``key`` is the hive path (``night=2025-01-03``; ``""`` for an unpartitioned table).
    ``reads`` names, per input table, the partition keys this partition reads; ``None``
    means every committed partition of every input table. The runner fingerprints
    exactly what ``reads`` names, so a narrow ``reads`` means narrow reruns.
    """

    key: str
    reads: Mapping[str, Sequence[str]] | None = field(default=None, compare=False)

    @classmethod
    def of(cls, reads: Mapping[str, Sequence[str]] | None = None, **values: Any) -> Partition:
        """Build from partition values: ``Partition.of(night="2025-01-03")``."""
        key = "/".join(f"{k}={v}" for k, v in values.items())
        return cls(key=key, reads=reads)

    @property
    def values(self) -> dict[str, str]:
        """Partition values parsed from the key."""
        if not self.key:
            return {}
        return dict(part.split("=", 1) for part in self.key.split("/"))


@dataclass
class StageContext:
    """What a stage may use: lake reads, the archive, the file store, paths, a logger.

    ``archive_type`` is the class of the spec's archive even where no archive is built
    (``lakepipe validate``), so a preflight can check e.g. its ``known_filters``.
    """

    stage_name: str
    lake: LakeReader
    files: FileStore
    archive: Archive | None = None
    spec_dir: Path = field(default_factory=Path.cwd)
    log: logging.Logger = log
    archive_type: type[Archive] | None = None

    def resolve(self, path: str | Path) -> Path:
        """A path from the spec, relative to the spec file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.spec_dir / p).resolve()


StageOutput = pa.Table | Mapping[str, pa.Table] | Any  # polars.DataFrame accepted too


class Stage:
    """Base class of stage kinds; see the module docstring."""

    kind: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    reads: ClassVar[tuple[str, ...]] = ()
    optional_reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    uses_archive: bool = False  # a property where it depends on the params

    class Params(StageParams):
        pass

    def __init__(self, name: str, params: StageParams) -> None:
        self.name = name
        self.params = params

    def preflight(self, ctx: StageContext) -> None:
        """Check user inputs (files, SQL) before any partition runs; raise a UserError
        subclass naming the file/key and the fix.

        The runner calls it for every stage of a run (dry runs too) before any partition
        executes, so a bad input stops the run with exit 2 and the lake untouched instead
        of failing every partition. ``lakepipe validate`` calls it as well, with the
        spec's lake as committed (possibly empty), ``ctx.archive`` None and
        ``ctx.archive_type`` set: check files and syntax here, not upstream rows or the
        archive's data. The runner itself checks, before this, that stages which use an
        archive have one and that every SQL param (a field named ``sql`` or ``*_sql``)
        parses. The default does nothing.
        """
        return None

    def partitions(self, ctx: StageContext) -> list[Partition]:
        """Output partitions, listed from the inputs (or the archive)."""
        raise NotImplementedError

    def run(self, ctx: StageContext, partition: Partition) -> StageOutput:
        """Compute one partition: a table, or ``{table: table}`` for several outputs."""
        raise NotImplementedError

    def input_files(self, ctx: StageContext) -> list[Path]:
        """Files outside the lake this stage reads (astrometry, a reference catalog).

        The runner folds their contents into every partition's fingerprint, so editing
        such a file reruns the stage ("input changed") like a changed input table.
        """
        return []

    def verify_partition(self, ctx: StageContext, partition: Partition) -> str | None:
        """Why an unchanged, committed partition must still be redone, or None.

        Fingerprints cover tables, not the non-table files they reference; a stage that
        writes files (cutout FITS) checks them here, and the runner reruns a partition
        whose files are missing or corrupt instead of skipping it.
        """
        return None


stages: Registry[type[Stage]] = Registry("stage kind", "lakepipe.stages", "lakepipe.stages")


def register_stage(kind: str) -> Callable[[type[Stage]], type[Stage]]:
    """Register a Stage subclass under ``kind`` (sets ``cls.kind``)."""

    def decorate(cls: type[Stage]) -> type[Stage]:
        if not cls.writes:
            raise TypeError(f"stage kind {kind!r} ({cls.__name__}) declares no output tables")
        cls.kind = kind
        return stages.register(kind)(cls)

    return decorate
