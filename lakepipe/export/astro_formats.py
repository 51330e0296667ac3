"""Astronomy table formats via astropy: ECSV (units kept) and VOTable."""

from __future__ import annotations

import io
import warnings
from typing import BinaryIO

import pyarrow as pa

from lakepipe.export.base import ExportMeta, register_format, to_astropy


@register_format("ecsv", suffixes=(".ecsv",))
def write_ecsv(table: pa.Table, out: BinaryIO, meta: ExportMeta) -> None:
    """Enhanced CSV (astropy ECSV 1.0): units, descriptions and dtypes in the header."""
    t = to_astropy(table, meta)
    if meta.table_name:
        t.meta["lakepipe_table"] = meta.table_name
    buf = io.StringIO()
    t.write(buf, format="ascii.ecsv")
    out.write(buf.getvalue().encode())


@register_format("votable", suffixes=(".vot", ".votable", ".xml"), binary=True)
def write_votable(table: pa.Table, out: BinaryIO, meta: ExportMeta) -> None:
    """IVOA VOTable 1.4 (TABLEDATA), with units and descriptions."""
    from astropy.io.votable import from_table
    from astropy.io.votable.exceptions import W50

    t = to_astropy(table, meta)
    with warnings.catch_warnings():
        # W50: a unit outside the VOUnit standard (e.g. "electron / adu"), raised both
        # when the table is built and when it is written; the unit string is still
        # written verbatim, so the warning only alarms.
        warnings.simplefilter("ignore", W50)
        vot = from_table(t)
        vot.to_xml(out)


@register_format("parquet", suffixes=(".parquet", ".pq"), binary=True)
def write_parquet(table: pa.Table, out: BinaryIO, meta: ExportMeta) -> None:
    """Apache Parquet (zstd), units and descriptions as field metadata."""
    import pyarrow.parquet as pq

    fields = []
    for f in table.schema:
        md = dict(f.metadata or {})
        if f.name in meta.units:
            md[b"unit"] = meta.units[f.name].encode()
        if meta.descriptions.get(f.name):
            md[b"description"] = meta.descriptions[f.name].encode()
        fields.append(f.with_metadata(md))
    pq.write_table(table.cast(pa.schema(fields)), out, compression="zstd")
