"""The export-format registry: ``--format`` of ``query`` and ``export``.

A format is a ``write_<format>(table, out, meta)`` function registered with
:func:`register_format`; it writes an Arrow table to a binary stream. ``meta`` carries
units and descriptions from the table contracts and format options (``--opt k=v``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from lakepipe.registry import Registry
from lakepipe.tables import Contract, contracts


@dataclass
class ExportMeta:
    """What a writer knows besides the rows."""

    table_name: str | None = None
    units: dict[str, str] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_columns(
        cls, columns: list[str], table_name: str | None = None, **options: Any
    ) -> ExportMeta:
        """Units/descriptions from ``table_name``'s contract, else from any contract that
        declares a column of the same name with one unambiguous unit."""
        known = contracts()
        units: dict[str, str] = {}
        desc: dict[str, str] = {}
        sources: list[Contract] = [known[table_name]] if table_name in known else []
        for name in columns:
            cands = [c for c in sources if name in c.column_names] or [
                c for c in known.values() if name in c.column_names
            ]
            col_units = {c.column(name).unit for c in cands}
            if len(col_units) == 1 and (u := col_units.pop()):
                units[name] = u
            if cands:
                desc[name] = cands[0].column(name).description
        return cls(table_name=table_name, units=units, descriptions=desc, options=options)


Writer = Callable[[pa.Table, BinaryIO, ExportMeta], None]


Source = Callable[[str, dict[str, Any]], str | None]


@dataclass(frozen=True)
class Format:
    """A registered export format.

    ``source(table, options)`` may return the SQL that feeds the writer when it needs
    columns from other tables (the GCN table joins exposure times), else None.
    """

    name: str
    write: Writer
    suffixes: tuple[str, ...]
    binary: bool
    description: str
    source: Source | None = None


formats: Registry[Format] = Registry("export format", "lakepipe.export", "lakepipe.exporters")


def register_format(
    name: str,
    *,
    suffixes: tuple[str, ...] = (),
    binary: bool = False,
    source: Source | None = None,
) -> Callable[[Writer], Writer]:
    """Register ``write_<name>`` as format ``name`` (suffixes infer it from ``-o FILE``)."""

    def decorate(fn: Writer) -> Writer:
        doc = (fn.__doc__ or "").strip().splitlines()
        formats.register(name)(Format(name, fn, suffixes, binary, doc[0] if doc else "", source))
        return fn

    return decorate


def format_for_path(path: str) -> str | None:
    """The format whose suffix matches ``path`` (``.ecsv`` → ``ecsv``), or None."""
    lower = path.lower()
    best: tuple[int, str] | None = None
    for name, fmt in formats.items():
        for suf in fmt.suffixes:
            if lower.endswith(suf) and (best is None or len(suf) > best[0]):
                best = (len(suf), name)
    return best[1] if best else None


def to_astropy(table: pa.Table, meta: ExportMeta) -> Any:
    """An astropy Table with units, descriptions and masks for nulls."""
    from astropy.table import Column, MaskedColumn, Table

    out = Table()
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            values = np.array([str(v) for v in col.to_pylist()])
        elif pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
            values = np.array([v.isoformat() if v is not None else "" for v in col.to_pylist()])
        else:
            values = col.to_numpy(zero_copy_only=False)
        mask = np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if values.dtype == object:
            values = np.array(["" if v is None else str(v) for v in values])
        kwargs: dict[str, Any] = {"name": name, "description": meta.descriptions.get(name)}
        if name in meta.units:
            kwargs["unit"] = meta.units[name]
        if mask.any():
            out.add_column(MaskedColumn(values, mask=mask, **kwargs))
        else:
            out.add_column(Column(values, **kwargs))
    return out
