"""Reference catalogues from Parquet (file or folder), CSV and FITS binary tables."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds

from lakepipe.catalogs import catalog_kinds
from lakepipe.catalogs.base import (
    CatalogConfig,
    Cone,
    ReadStats,
    healpix_ranges,
    reference_schema,
    to_reference,
    widen,
)
from lakepipe.errors import ParseError


def ra_extent_deg(cone: Cone) -> float | None:
    """Half-width in RA (deg) of a cone; ``None`` when it contains a pole.

    A cap of radius r centred at declination δ spans asin(sin r / cos δ) in RA.
    """
    if abs(cone.dec) + cone.radius_deg >= 90.0:
        return None
    s = np.sin(np.radians(cone.radius_deg)) / np.cos(np.radians(cone.dec))
    return float(np.degrees(np.arcsin(min(1.0, s))))


def box_filter(cones: list[Cone], ra: str, dec: str) -> ds.Expression:
    """Row-group filter: union of each cone's Dec band (and RA range where it is simple)."""
    expr: ds.Expression | None = None
    for c in cones:
        e = (ds.field(dec) >= c.dec - c.radius_deg) & (ds.field(dec) <= c.dec + c.radius_deg)
        half = ra_extent_deg(c)
        if half is not None and half < 180.0:
            lo, hi = c.ra - half, c.ra + half
            if lo < 0.0:
                e = e & ((ds.field(ra) >= lo + 360.0) | (ds.field(ra) <= hi))
            elif hi >= 360.0:
                e = e & ((ds.field(ra) >= lo) | (ds.field(ra) <= hi - 360.0))
            else:
                e = e & (ds.field(ra) >= lo) & (ds.field(ra) <= hi)
        expr = e if expr is None else expr | e
    assert expr is not None
    return expr


def healpix_filter(ranges: np.ndarray, column: str) -> ds.Expression:
    """Row-group filter: union of order-29 index ranges ``[start, stop)``."""
    expr: ds.Expression | None = None
    for start, stop in ranges:
        e = (ds.field(column) >= int(start)) & (ds.field(column) < int(stop))
        expr = e if expr is None else expr | e
    return expr if expr is not None else ds.scalar(False)


def region_filter(schema: pa.Schema, config: CatalogConfig, cones: list[Cone]) -> ds.Expression:
    """The pruning filter for a region: HEALPix ranges if the column exists, else a box."""
    cols = config.columns
    if cols.healpix29 in schema.names:
        return healpix_filter(healpix_ranges(cones), cols.healpix29)
    return box_filter(cones, cols.ra, cols.dec)


def read_fragments(
    dataset: ds.Dataset, expr: ds.Expression, columns: list[str], stats: ReadStats
) -> pa.Table:
    """Read only the row groups whose statistics may match ``expr``; count what was read."""
    pieces = []
    for frag in dataset.get_fragments():
        stats.files_total += 1
        stats.row_groups_total += frag.metadata.num_row_groups
        groups = frag.split_by_row_group(filter=expr)
        if not groups:
            continue
        stats.files_read += 1
        stats.files.append(frag.path)
        for rg in groups:
            stats.row_groups_read += 1
            t = rg.to_table(columns=columns, filter=expr)
            stats.rows_read += rg.metadata.num_rows if rg.metadata else t.num_rows
            pieces.append(t)
    if not pieces:
        return dataset.schema.empty_table().select(columns)
    return pa.concat_tables(pieces)


def _catalog_epoch(config: CatalogConfig) -> float | None:
    epoch = config.columns.epoch
    return float(epoch) if isinstance(epoch, int | float) else None


@catalog_kinds.register("parquet")
class ParquetCatalog:
    """A Parquet file or a folder of Parquet files (any layout, hive partitions allowed).

    Row groups are pruned through ``_healpix_29`` statistics when the column exists
    (lake tables and HATS files carry it), otherwise through RA/Dec statistics, so
    sort large files by position.
    """

    def __init__(self, path: Path, config: CatalogConfig) -> None:
        self.path = path
        self.config = config
        self.dataset = ds.dataset(str(path), format="parquet", partitioning="hive")
        self.stats = ReadStats()

    def read(self, cones: list[Cone], epoch_mjd: float | None = None) -> pa.Table:
        """Reference rows inside the cones, at ``epoch_mjd``."""
        self.stats = ReadStats()
        if not cones:
            return reference_schema(self.config.columns).empty_table()
        cols = self.config.columns
        wide = widen(cones, cols, self.config.max_pm_mas_yr, epoch_mjd, _catalog_epoch(self.config))
        names = cols.source_columns(self.dataset.schema.names)
        raw = read_fragments(
            self.dataset, region_filter(self.dataset.schema, self.config, wide), names, self.stats
        )
        return to_reference(raw, cols, cones, epoch_mjd)


@catalog_kinds.register("csv")
class CsvCatalog:
    """A CSV file (header row). Text cannot be pruned: the file is parsed once and cached,
    so keep CSV catalogues small (extracts); convert large ones to Parquet or HATS."""

    def __init__(self, path: Path, config: CatalogConfig) -> None:
        self.path = path
        self.config = config
        self.stats = ReadStats()

    @functools.cached_property
    def table(self) -> pa.Table:
        try:
            return pacsv.read_csv(str(self.path))
        except pa.ArrowInvalid as exc:
            raise ParseError(f"cannot parse catalogue CSV {self.path}: {exc}") from exc

    def read(self, cones: list[Cone], epoch_mjd: float | None = None) -> pa.Table:
        """Reference rows inside the cones, at ``epoch_mjd``."""
        self.stats = ReadStats(files_total=1, files_read=1, files=[str(self.path)])
        cols = self.config.columns
        names = cols.source_columns(self.table.column_names)
        if not cones:
            return reference_schema(cols).empty_table()
        wide = widen(cones, cols, self.config.max_pm_mas_yr, epoch_mjd, _catalog_epoch(self.config))
        raw = self.table.select(names).filter(box_filter(wide, cols.ra, cols.dec))
        self.stats.rows_read = self.table.num_rows
        return to_reference(raw, cols, cones, epoch_mjd)


@catalog_kinds.register("fits")
class FitsCatalog:
    """A FITS binary table (first table HDU). Memory-mapped: only the RA/Dec columns are
    scanned, and only rows inside the region's box are copied."""

    def __init__(self, path: Path, config: CatalogConfig) -> None:
        self.path = path
        self.config = config
        self.stats = ReadStats()

    def read(self, cones: list[Cone], epoch_mjd: float | None = None) -> pa.Table:
        """Reference rows inside the cones, at ``epoch_mjd``."""
        from astropy.io import fits

        self.stats = ReadStats(files_total=1, files_read=1, files=[str(self.path)])
        cols = self.config.columns
        with fits.open(self.path, memmap=True) as hdul:
            hdu = next((h for h in hdul if isinstance(h, fits.BinTableHDU)), None)
            if hdu is None:
                raise ParseError(f"{self.path}: no binary table HDU")
            names = cols.source_columns(list(hdu.columns.names))
            if not cones:
                return reference_schema(cols).empty_table()
            wide = widen(
                cones, cols, self.config.max_pm_mas_yr, epoch_mjd, _catalog_epoch(self.config)
            )
            data = hdu.data
            ra = np.asarray(data[cols.ra], dtype=np.float64)
            dec = np.asarray(data[cols.dec], dtype=np.float64)
            keep = _box_mask(ra, dec, wide)
            rows = np.flatnonzero(keep)
            self.stats.rows_read = len(ra)
            arrays = {}
            for n in names:
                col = np.asarray(data[n][rows])
                if col.dtype.kind in "iuf":
                    col = col.astype(col.dtype.newbyteorder("="))  # FITS is big-endian
                elif col.dtype.kind == "S":
                    col = np.char.strip(col.astype(str))
                arrays[n] = col
            raw = pa.table(arrays)
        return to_reference(raw, cols, cones, epoch_mjd)


def _box_mask(ra: np.ndarray, dec: np.ndarray, cones: list[Cone]) -> np.ndarray:
    """Numpy version of :func:`box_filter`."""
    keep = np.zeros(ra.shape, dtype=bool)
    for c in cones:
        m = (dec >= c.dec - c.radius_deg) & (dec <= c.dec + c.radius_deg)
        half = ra_extent_deg(c)
        if half is not None and half < 180.0:
            m &= np.abs((ra - c.ra + 180.0) % 360.0 - 180.0) <= half
        keep |= m
    return keep
