"""Reference catalogues (Parquet/CSV/FITS files or folders, HATS) read by sky region.

``open_catalog(config, base_dir)`` returns a reader whose ``read(cones, epoch_mjd)``
gives the reference table described in :mod:`lakepipe.catalogs.base`; reader kinds are
registered by name in :data:`catalog_kinds` (``parquet``, ``csv``, ``fits``, ``hats``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import pyarrow as pa

from lakepipe.catalogs.base import (
    CatalogConfig,
    ColumnMap,
    Cone,
    ReadStats,
    catalog_traffic,
    healpix_ranges,
    reference_schema,
    to_reference,
)
from lakepipe.catalogs.epoch import jyear_to_mjd, mjd_to_jyear, propagate_proper_motion
from lakepipe.errors import InputNotFoundError, UserError
from lakepipe.registry import Registry


class ReferenceCatalog(Protocol):
    """A reference catalogue reader."""

    stats: ReadStats

    def read(self, cones: list[Cone], epoch_mjd: float | None = None) -> pa.Table:
        """Reference rows inside the union of ``cones`` at ``epoch_mjd`` (MJD UTC)."""
        ...


catalog_kinds: Registry[type] = Registry("catalog kind", "lakepipe.catalogs", "lakepipe.catalogs")

_SUFFIXES = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".fits": "fits",
    ".fit": "fits",
    ".fz": "fits",
}


def guess_kind(path: Path) -> str:
    """Catalogue kind from a path: HATS folders, Parquet folders, or a file suffix."""
    if path.is_dir():
        hats_markers = ("partition_info.csv", "hats.properties", "properties", "dataset")
        if any((path / m).exists() for m in hats_markers) or any(path.glob("Norder=*")):
            return "hats"
        return "parquet"
    suffixes = [s.lower() for s in path.suffixes if s.lower() not in (".gz", ".bz2")]
    kind = _SUFFIXES.get(suffixes[-1] if suffixes else "")
    if kind is None:
        raise InputNotFoundError(
            f"cannot tell the format of catalogue {path}; set catalog kind: "
            f"{' | '.join(catalog_kinds.names())}"
        )
    return kind


def open_catalog(
    config: CatalogConfig, base_dir: Path | None = None, archive: object | None = None
) -> ReferenceCatalog:
    """Open the reference catalogue a spec describes (paths relative to ``base_dir``)."""
    if config.kind == "archive":
        return ArchiveCatalog(archive, config)
    if config.kind == "cds":
        from lakepipe.archives.cds import CdsCatalog

        columns = config.columns if "columns" in config.model_fields_set else None
        return CdsCatalog(config.cds_params(), columns, max_pm_mas_yr=config.max_pm_mas_yr)
    assert config.path is not None  # validated by CatalogConfig
    path = Path(config.path).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    if not path.exists():
        raise InputNotFoundError(f"reference catalogue not found: {path}")
    kind = guess_kind(path) if config.kind == "auto" else config.kind
    return catalog_kinds.get(kind)(path, config)


class ArchiveCatalog:
    """The reference catalog an archive carries (``catalog: {kind: archive}``): the
    virtual survey's Gaia-like catalog, read whole and cut to the cones."""

    def __init__(self, archive: object | None, config: CatalogConfig) -> None:
        if archive is None or not hasattr(archive, "catalog"):
            raise UserError(
                "catalog kind 'archive' needs a pipeline archive with a reference catalog "
                "(archive: {kind: sim}); use a file path or kind: cds otherwise"
            )
        self.archive = archive
        self.config = config
        self.stats = ReadStats()

    def read(self, cones: list[Cone], epoch_mjd: float | None = None) -> pa.Table:
        raw = self.archive.catalog()  # type: ignore[attr-defined]
        self.stats = ReadStats(rows_read=raw.num_rows)
        return to_reference(raw, self.config.columns, cones, epoch_mjd)


__all__ = [
    "ArchiveCatalog",
    "CatalogConfig",
    "ColumnMap",
    "Cone",
    "ReadStats",
    "ReferenceCatalog",
    "catalog_kinds",
    "catalog_traffic",
    "guess_kind",
    "healpix_ranges",
    "jyear_to_mjd",
    "mjd_to_jyear",
    "open_catalog",
    "propagate_proper_motion",
    "reference_schema",
]
