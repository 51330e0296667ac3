"""Plain tabular formats: CSV, JSON, JSON lines, and the terminal table."""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any, BinaryIO

import pyarrow as pa

from lakepipe.errors import UserError
from lakepipe.export.base import ExportMeta, register_format


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


CSV_UNITS = ("none", "names", "comments")


@register_format("csv", suffixes=(".csv",))
def write_csv(table: pa.Table, out: BinaryIO, meta: ExportMeta) -> None:
    """Comma-separated values with a header row (RFC 4180, quoting only where needed).

    Units from the table contracts with ``--opt units=names`` (header ``mjd [d]``: still a
    plain CSV every reader takes; only the names change) or ``--opt units=comments``
    (``# unit: mjd = d`` lines before the header, for readers that skip comments, e.g.
    pandas ``comment="#"``, astropy ``format="ascii.csv"``). ECSV keeps units natively.
    """
    mode = str(meta.options.get("units", "none"))
    if mode not in CSV_UNITS:
        raise UserError(f"--opt units={mode!r}: use one of {', '.join(CSV_UNITS)}")
    names = list(table.column_names)
    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
    try:
        writer = csv.writer(text, lineterminator="\n")
        if mode == "comments":
            for n in names:
                if meta.units.get(n):
                    text.write(f"# unit: {n} = {meta.units[n]}\n")
        elif mode == "names":
            names = [f"{n} [{meta.units[n]}]" if meta.units.get(n) else n for n in names]
        writer.writerow(names)
        for batch in table.to_batches(max_chunksize=65_536):
            columns = [_csv_values(c) for c in batch.columns]
            writer.writerows(zip(*columns, strict=True))
        text.flush()
    finally:
        text.detach()  # never close the caller's stream


def _csv_values(col: pa.Array) -> list[Any]:
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        return [json.dumps(_plain(v)) if v is not None else "" for v in col.to_pylist()]
    if pa.types.is_floating(col.type):
        return ["" if v is None else repr(v) for v in col.to_pylist()]
    return ["" if v is None else v for v in col.to_pylist()]


@register_format("json", suffixes=(".json",))
def write_json(table: pa.Table, out: BinaryIO, meta: ExportMeta) -> None:
    """A JSON array of row objects (NaN and infinities become null)."""
    rows = [{k: _plain(v) for k, v in r.items()} for r in table.to_pylist()]
    out.write(json.dumps(rows, indent=1).encode() + b"\n")


@register_format("jsonl", suffixes=(".jsonl", ".ndjson"))
def write_jsonl(table: pa.Table, out: BinaryIO, meta: ExportMeta) -> None:
    """Newline-delimited JSON, one row object a line."""
    for r in table.to_pylist():
        out.write(json.dumps({k: _plain(v) for k, v in r.items()}).encode() + b"\n")


@register_format("table")
def write_table(table: pa.Table, out: BinaryIO, meta: ExportMeta) -> None:
    """A human-readable table with units in the header (for terminals)."""
    from rich.console import Console
    from rich.table import Table

    max_rows = int(meta.options.get("max_rows", 200))
    t = Table(show_lines=False, header_style="bold")
    for name in table.column_names:
        unit = meta.units.get(name)
        t.add_column(f"{name}\n[{unit}]" if unit else name, overflow="fold")
    for row in table.slice(0, max_rows).to_pylist():
        t.add_row(*[_fmt(v) for v in row.values()])
    buf = io.StringIO()
    Console(file=buf, width=int(meta.options.get("width", 160)), color_system=None).print(t)
    if table.num_rows > max_rows:
        buf.write(f"… {table.num_rows - max_rows} more rows ({table.num_rows} in all)\n")
    else:
        buf.write(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})\n")
    out.write(buf.getvalue().encode())


def _fmt(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:.10g}"
    return str(v)
