"""HATS catalogues (the HEALPix-partitioned Parquet layout of LSDB): read by region, write.

Layout (HATS, as published for Gaia DR3 and PS1)::

    <catalog>/hats.properties                       key=value metadata
    <catalog>/partition_info.csv                    Norder,Npix of every partition
    <catalog>/dataset/_common_metadata              Parquet schema
    <catalog>/dataset/Norder=<k>/Dir=<d>/Npix=<n>.parquet   (or a Npix=<n>/ folder)

``Dir`` is ``(Npix // 10000) * 10000``. Every file carries ``_healpix_29`` (nested,
order 29) and is sorted by it. Partitions have adaptive orders: dense sky is split
finer so partitions hold similar row counts. A region read opens only the partitions
whose pixel overlaps the region's HEALPix cover, and inside them only the row groups
whose ``_healpix_29`` range overlaps it. Older "hipscat" trees (no ``dataset/``) are read
too when their files carry ``_healpix_29``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from lakepipe.astro.healpix import HATS_ORDER, degrade, healpix_index
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
from lakepipe.catalogs.files import _catalog_epoch, healpix_filter, read_fragments
from lakepipe.errors import InputNotFoundError

_PIX_RE = re.compile(r"Norder=(\d+)/Dir=\d+/Npix=(\d+)(?:\.parquet)?$")


def partition_path(root: Path, order: int, pix: int) -> Path:
    """Path of a HATS partition file."""
    return (
        root / "dataset" / f"Norder={order}" / f"Dir={pix // 10000 * 10000}" / f"Npix={pix}.parquet"
    )


@catalog_kinds.register("hats")
class HatsCatalog:
    """A HATS catalogue folder; see the module docstring."""

    def __init__(self, path: Path, config: CatalogConfig) -> None:
        self.path = path
        self.config = config
        self.stats = ReadStats()
        self.partitions = self._discover()
        if not self.partitions:
            raise InputNotFoundError(
                f"{path} holds no HATS partitions (expected dataset/Norder=k/Dir=d/Npix=n.parquet)"
            )

    def _discover(self) -> list[tuple[int, int, Path]]:
        """(order, pixel, path) of every partition, from partition_info.csv or the tree."""
        base = self.path / "dataset" if (self.path / "dataset").is_dir() else self.path
        info = self.path / "partition_info.csv"
        out = []
        if info.exists():
            t = pacsv.read_csv(str(info))
            for order, pix in zip(
                t.column("Norder").to_pylist(), t.column("Npix").to_pylist(), strict=True
            ):
                d = base / f"Norder={order}" / f"Dir={pix // 10000 * 10000}"
                p = d / f"Npix={pix}.parquet"
                out.append((int(order), int(pix), p if p.exists() else d / f"Npix={pix}"))
            return sorted(out)
        for p in base.glob("Norder=*/Dir=*/Npix=*"):
            m = _PIX_RE.search(p.relative_to(base).as_posix())
            if m:
                out.append((int(m.group(1)), int(m.group(2)), p))
        return sorted(out)

    def read(self, cones: list[Cone], epoch_mjd: float | None = None) -> pa.Table:
        """Reference rows inside the cones, at ``epoch_mjd``."""
        self.stats = ReadStats(files_total=len(self.partitions))
        cols = self.config.columns
        if not cones:
            return reference_schema(cols).empty_table()
        wide = widen(cones, cols, self.config.max_pm_mas_yr, epoch_mjd, _catalog_epoch(self.config))
        ranges = healpix_ranges(wide)
        hits = [p for o, n, p in self.partitions if _overlaps(o, n, ranges)]
        if not hits:
            first = ds.dataset(str(self.partitions[0][2]), format="parquet")
            names = cols.source_columns(first.schema.names)
            return to_reference(first.schema.empty_table().select(names), cols, cones, epoch_mjd)
        files = [
            str(f) for p in hits for f in ([p] if p.is_file() else sorted(p.glob("*.parquet")))
        ]
        dataset = ds.dataset(files, format="parquet")
        names = cols.source_columns(dataset.schema.names)
        sub = ReadStats()
        if cols.healpix29 in dataset.schema.names:
            raw = read_fragments(dataset, healpix_filter(ranges, cols.healpix29), names, sub)
        else:
            from lakepipe.catalogs.files import box_filter

            raw = read_fragments(dataset, box_filter(wide, cols.ra, cols.dec), names, sub)
        self.stats.files_read = sub.files_read
        self.stats.files = sub.files
        self.stats.row_groups_read = sub.row_groups_read
        self.stats.row_groups_total = sub.row_groups_total
        self.stats.rows_read = sub.rows_read
        return to_reference(raw, cols, cones, epoch_mjd)


def _overlaps(order: int, pix: int, ranges: np.ndarray) -> bool:
    """Does pixel ``pix`` at ``order`` intersect any order-29 range ``[start, stop)``?"""
    shift = 2 * (HATS_ORDER - order)
    lo, hi = pix << shift, (pix + 1) << shift
    return bool(np.any((ranges[:, 0] < hi) & (ranges[:, 1] > lo)))


def write_hats(
    table: pa.Table,
    root: str | Path,
    *,
    ra: str = "ra",
    dec: str = "dec",
    max_rows: int = 100_000,
    max_order: int = 10,
    row_group_rows: int = 10_000,
    name: str | None = None,
) -> list[tuple[int, int]]:
    """Write ``table`` as a HATS catalogue; return the (order, pixel) partitions.

    Adaptive tiling as hats-import does it: a pixel is split into its four children
    while it holds more than ``max_rows`` rows and ``order < max_order``. Adds
    ``_healpix_29`` and sorts every file by it, in row groups of ``row_group_rows``.
    """
    root = Path(root)
    if "_healpix_29" not in table.column_names:
        h = healpix_index(
            table.column(ra).to_numpy(zero_copy_only=False),
            table.column(dec).to_numpy(zero_copy_only=False),
        )
        table = table.append_column("_healpix_29", pa.array(h, type=pa.int64()))
    table = table.sort_by("_healpix_29")
    h29 = table.column("_healpix_29").to_numpy()
    assigned = np.full(len(h29), -1, dtype=np.int64)
    orders = np.full(len(h29), -1, dtype=np.int64)
    for order in range(max_order + 1):
        todo = assigned < 0
        if not todo.any():
            break
        pix = degrade(h29[todo], order)
        _, inverse, counts = np.unique(pix, return_inverse=True, return_counts=True)
        final = (counts <= max_rows) | (order == max_order)
        done = final[inverse]
        idx = np.flatnonzero(todo)[done]
        assigned[idx] = pix[done]
        orders[idx] = order
    parts = sorted(set(zip(orders.tolist(), assigned.tolist(), strict=True)))
    # rows are sorted by _healpix_29, so every partition is one contiguous slice
    starts = np.flatnonzero(
        np.r_[True, (assigned[1:] != assigned[:-1]) | (orders[1:] != orders[:-1])]
    )
    stops = np.r_[starts[1:], len(h29)]
    for a, b in zip(starts, stops, strict=True):
        path = partition_path(root, int(orders[a]), int(assigned[a]))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            table.slice(a, b - a), path, row_group_size=row_group_rows, compression="zstd"
        )
    (root / "dataset").mkdir(parents=True, exist_ok=True)
    pq.write_metadata(table.schema, root / "dataset" / "_common_metadata")
    info = pa.table({"Norder": [o for o, _ in parts], "Npix": [p for _, p in parts]})
    pacsv.write_csv(info, root / "partition_info.csv")
    props = {
        "obs_collection": name or root.name,
        "dataclass": "catalog",
        "dataset_type": "object",
        "hats_col_ra": ra,
        "hats_col_dec": dec,
        "hats_nrows": str(table.num_rows),
        "hats_max_rows": str(max_rows),
        "hats_order": str(max(o for o, _ in parts)) if parts else "0",
    }
    (root / "hats.properties").write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    return parts
