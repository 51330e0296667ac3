"""Where exposures, cutouts and catalogs come from.

An archive kind is a class registered under its YAML ``kind`` (``sim``, ``ztf``,
``fits_dir``) with a pydantic ``Params`` model; a spec's top-level ``archive:`` block
selects one and the runner hands an instance to stages that declare
``uses_archive = True`` (as ``ctx.archive``). The query/fetch methods are defined by
the archive modules (see ``lakepipe/archives/sim.py``); they return Arrow tables in the
shape of the lake's table contracts and FITS bytes for images and cutouts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from lakepipe.registry import Registry


class ArchiveParams(BaseModel):
    """Base of every archive's ``Params``: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Archive:
    """Base class of archive kinds."""

    kind: ClassVar[str] = ""

    class Params(ArchiveParams):
        pass

    def __init__(self, params: ArchiveParams, *, spec_dir: Path | None = None) -> None:
        self.params = params
        self.spec_dir = spec_dir or Path.cwd()

    def use_lake(self, root: Path) -> None:
        """Told by the runner which lake it serves (e.g. to cache downloads under
        ``<lake>/_cache``); the default does nothing."""

    def stats(self) -> dict[str, float]:
        """Cumulative traffic counters (requests, retries, bytes, cache hits, rows
        returned by queries); the runner logs each partition attempt's share in
        ``_runs.archive_stats``. Archives without traffic return {}."""
        return {}

    def fingerprint(self) -> str:
        """What identifies this archive's content for the runner's fingerprints."""
        return f"{self.kind}:{self.params.model_dump_json()}"


archives: Registry[type[Archive]] = Registry(
    "archive kind", "lakepipe.archives", "lakepipe.archives"
)


def register_archive(kind: str) -> Callable[[type[Archive]], type[Archive]]:
    """Register an Archive subclass under ``kind`` (sets ``cls.kind``)."""

    def decorate(cls: type[Archive]) -> type[Archive]:
        cls.kind = kind
        return archives.register(kind)(cls)

    return decorate
