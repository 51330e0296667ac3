"""Table contracts: the declared shape of every lake table.

A contract lives in ``schemas/tables/<table>.yaml``::

    name: exposures
    description: One row per survey exposure (CCD quadrant image).
    partition_by: [night]          # hive directories; coarse (night, bucket)
    key: [exposure_id]             # unique, non-null within the table
    sort_by: [_healpix_29]         # order inside each file (row-group pruning)
    columns:
      - {name: exposure_id, type: int64, description: Stable exposure id}
      - {name: ra, type: float64, unit: deg, description: Centre RA (ICRS)}
      - {name: path, type: string, file_ref: true, description: Lake-relative FITS path}

Types are Arrow type names: ``bool``, ``int8``…``int64``, ``uint8``…``uint64``,
``float32``, ``float64``, ``string``, ``binary``, ``date32``,
``timestamp[us, tz=UTC]``, ``list<float64>`` (any of these inside ``list<>``).
Partition columns are declared like others; they live in directory names, not in files.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from lakepipe.errors import ContractError, InputNotFoundError
from lakepipe.registry import did_you_mean
from lakepipe.resources import schemas_dir

_SIMPLE_TYPES: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "uint16": pa.uint16(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
    "binary": pa.binary(),
    "date32": pa.date32(),
    "timestamp[us, tz=UTC]": pa.timestamp("us", tz="UTC"),
}
_LIST_RE = re.compile(r"^list<(.+)>$")


def parse_type(name: str) -> pa.DataType:
    """Arrow type from its contract name (``float64``, ``list<int32>``)."""
    name = name.strip()
    if name in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[name]
    m = _LIST_RE.match(name)
    if m:
        return pa.list_(parse_type(m.group(1)))
    raise ValueError(f"unknown column type {name!r}; known: {', '.join(_SIMPLE_TYPES)}")


@dataclass(frozen=True)
class Column:
    """One declared column."""

    name: str
    type: pa.DataType
    description: str = ""
    unit: str | None = None
    nullable: bool = True
    file_ref: bool = False


@dataclass(frozen=True)
class Contract:
    """The declared schema and layout of one table."""

    name: str
    description: str
    columns: tuple[Column, ...]
    partition_by: tuple[str, ...] = ()
    key: tuple[str, ...] = ()
    sort_by: tuple[str, ...] = ()
    path: Path | None = field(default=None, compare=False)

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def file_columns(self) -> list[Column]:
        """Columns stored inside the Parquet files (all but the partition keys)."""
        return [c for c in self.columns if c.name not in self.partition_by]

    @property
    def file_schema(self) -> pa.Schema:
        """Arrow schema of the files, with units and descriptions as field metadata."""
        fields = []
        for c in self.file_columns:
            meta = {"description": c.description}
            if c.unit:
                meta["unit"] = c.unit
            nullable = c.nullable and c.name not in self.key
            fields.append(pa.field(c.name, c.type, nullable=nullable, metadata=meta))
        return pa.schema(fields, metadata={"lakepipe.table": self.name})

    @property
    def schema(self) -> pa.Schema:
        """Arrow schema of the whole table, partition columns included."""
        return pa.schema([pa.field(c.name, c.type) for c in self.columns])

    def empty(self) -> pa.Table:
        """A zero-row table with the full schema."""
        return self.schema.empty_table()

    def conform(self, table: pa.Table, *, stage: str = "", partition: str = "") -> pa.Table:
        """Check ``table`` against the contract and return it in file layout.

        Columns are reordered; integer/float widening and all-null columns are cast.
        A missing or extra column, an incompatible type or a null key raises
        :class:`ContractError` naming the stage, table and column.
        """
        where = f"stage {stage!r}, " if stage else ""
        where += f"table {self.name!r}" + (f", partition {partition}" if partition else "")
        names = set(table.column_names)
        missing = [c for c in self.column_names if c not in names and c not in self.partition_by]
        if missing:
            raise ContractError(
                f"{where}: missing column(s) {', '.join(missing)} "
                f"(declared in {self.path or 'the contract'})",
                stage=stage,
                partition=partition,
            )
        extra = [n for n in table.column_names if n not in self.column_names]
        if extra:
            hints = "".join(did_you_mean(n, self.column_names) for n in extra)
            raise ContractError(
                f"{where}: undeclared column(s) {', '.join(extra)}.{hints} "
                f"Declare them in {self.path or 'the contract'} or drop them.",
                stage=stage,
                partition=partition,
            )
        arrays = []
        for col in self.file_columns:
            arr = table.column(col.name)
            if not arr.type.equals(col.type):
                if not _castable(arr.type, col.type):
                    raise ContractError(
                        f"{where}: column {col.name!r} has type {arr.type}, contract says "
                        f"{col.type}",
                        stage=stage,
                        partition=partition,
                    )
                arr = pc.cast(arr, col.type)
            if col.name in self.key and arr.null_count:
                raise ContractError(
                    f"{where}: key column {col.name!r} has {arr.null_count} null value(s)",
                    stage=stage,
                    partition=partition,
                )
            arrays.append(arr)
        return pa.Table.from_arrays(arrays, schema=self.file_schema)


def _castable(src: pa.DataType, dst: pa.DataType) -> bool:
    """Lossless, same-family casts the contract accepts silently."""
    if pa.types.is_null(src):
        return True
    if pa.types.is_dictionary(src):
        return _castable(src.value_type, dst)
    if pa.types.is_integer(src) and pa.types.is_integer(dst):
        return dst.bit_width >= src.bit_width and (
            pa.types.is_signed_integer(dst) or pa.types.is_unsigned_integer(src)
        )
    if pa.types.is_integer(src) and pa.types.is_floating(dst):
        return True
    if pa.types.is_floating(src) and pa.types.is_floating(dst):
        return dst.bit_width >= src.bit_width
    if pa.types.is_large_string(src) and pa.types.is_string(dst):
        return True
    if pa.types.is_string_view(src) and pa.types.is_string(dst):
        return True
    if pa.types.is_timestamp(src) and pa.types.is_timestamp(dst):
        return True
    if (pa.types.is_list(src) or pa.types.is_large_list(src)) and pa.types.is_list(dst):
        return _castable(src.value_type, dst.value_type)
    return False


def load_contract(path: Path) -> Contract:
    """Parse one contract YAML file."""
    raw = yaml.safe_load(path.read_text())
    try:
        columns = tuple(
            Column(
                name=c["name"],
                type=parse_type(c["type"]),
                description=c.get("description", ""),
                unit=c.get("unit"),
                nullable=c.get("nullable", True),
                file_ref=c.get("file_ref", False),
            )
            for c in raw["columns"]
        )
        contract = Contract(
            name=raw["name"],
            description=raw.get("description", ""),
            columns=columns,
            partition_by=tuple(raw.get("partition_by", ())),
            key=tuple(raw.get("key", ())),
            sort_by=tuple(raw.get("sort_by", ())),
            path=path,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: invalid table contract: {exc}") from exc
    names = contract.column_names
    for group in ("partition_by", "key", "sort_by"):
        for n in getattr(contract, group):
            if n not in names:
                raise ValueError(f"{path}: {group} names undeclared column {n!r}")
    return contract


_REGISTERED: dict[str, Contract] = {}


@functools.cache
def _shipped() -> dict[str, Contract]:
    out = {}
    for path in sorted((schemas_dir() / "tables").glob("*.yaml")):
        c = load_contract(path)
        out[c.name] = c
    return out


def register_contract(path: Path) -> Contract:
    """Add a contract from outside ``schemas/tables`` (plug-ins declare their tables)."""
    c = load_contract(Path(path))
    _REGISTERED[c.name] = c
    return c


def contracts() -> dict[str, Contract]:
    """All table contracts (shipped and registered by plug-ins), by table name."""
    from lakepipe.stages.base import stages

    stages.load()  # plug-in stage modules register their tables' contracts on import
    return {**_shipped(), **_REGISTERED}


def get_contract(name: str) -> Contract:
    """The contract of table ``name``; unknown names list what exists."""
    table = contracts()
    if name not in table:
        raise InputNotFoundError(
            f"no table contract named {name!r}.{did_you_mean(name, list(table))} "
            f"Known tables: {', '.join(sorted(table))}."
        )
    return table[name]
