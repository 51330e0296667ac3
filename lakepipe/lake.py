"""Lake storage: partitioned Parquet tables, an atomic manifest, a run log, a file store.

Layout of a lake root::

    <table>/<key>=<value>/part-<fingerprint>.parquet   committed (if the manifest says so)
    _files/<kind>/<sha[:2]>/<sha256><suffix>          content-addressed non-table files
    _lake/manifest.json                               the only source of what is visible
    _lake/runs/<run_id>.jsonl                          one line per partition attempt
    _lake/runs/<run_id>.spec.yaml                      the resolved spec of that run
    _lake/LOCK                                         held by a run or a vacuum

A partition becomes visible only when the manifest (rewritten with temp + rename)
lists its files, so a crash mid-write leaves orphans, never a half-visible partition;
``vacuum`` deletes what no manifest entry references.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from lakepipe.errors import LakeError
from lakepipe.fs import LakeFS
from lakepipe.tables import Contract, contracts, get_contract

MANIFEST = "_lake/manifest.json"
RUNS_DIR = "_lake/runs"
LOCK = "_lake/LOCK"
FILES_DIR = "_files"
ROW_GROUP_ROWS = 122_880  # DuckDB's row-group size: good pruning granularity
MANIFEST_VERSION = 1


def utcnow() -> str:
    """Current UTC time, ISO 8601 with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class FileRef:
    """A non-table file in the lake: lake-relative path, checksum, size."""

    path: str
    sha256: str
    bytes: int


@dataclass
class PartitionEntry:
    """Manifest record of one committed partition of one table."""

    files: list[dict[str, Any]]
    rows: int
    fingerprint: str
    stage: str
    code_version: str
    params_hash: str
    inputs_hash: str
    run_id: str
    committed_at: str = field(default_factory=utcnow)

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.files)


@dataclass
class Manifest:
    """What is visible: ``tables[table][partition_key] -> PartitionEntry``."""

    tables: dict[str, dict[str, PartitionEntry]] = field(default_factory=dict)
    failures: dict[str, dict[str, str]] = field(default_factory=dict)

    def partitions(self, table: str) -> dict[str, PartitionEntry]:
        return self.tables.get(table, {})

    def files(self, table: str) -> list[str]:
        return [f["path"] for _k, e in sorted(self.partitions(table).items()) for f in e.files]

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": MANIFEST_VERSION,
                "tables": {
                    t: {k: asdict(e) for k, e in sorted(parts.items())}
                    for t, parts in sorted(self.tables.items())
                },
                "failures": self.failures,
            },
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        raw = json.loads(text)
        tables = {
            t: {k: PartitionEntry(**e) for k, e in parts.items()}
            for t, parts in raw.get("tables", {}).items()
        }
        return cls(tables=tables, failures=raw.get("failures", {}))


@dataclass
class Commit:
    """One partition's result, to be made visible: one entry per output table."""

    stage: str
    partition: str
    entries: dict[str, PartitionEntry]


class FileStore:
    """Content-addressed non-table files (cutout FITS, plots) under ``_files/``."""

    def __init__(self, fs: LakeFS) -> None:
        self.fs = fs

    def put_bytes(self, data: bytes, *, kind: str, suffix: str) -> FileRef:
        """Store ``data`` once under its SHA-256; rewrites a corrupt copy."""
        sha = hashlib.sha256(data).hexdigest()
        rel = f"{FILES_DIR}/{kind}/{sha[:2]}/{sha}{suffix}"
        if not self.verify(rel, sha):
            self.fs.write_bytes_atomic(rel, data)
        return FileRef(path=rel, sha256=sha, bytes=len(data))

    def abspath(self, relpath: str) -> Path:
        return self.fs.abspath(relpath)

    def verify(self, relpath: str, sha256: str) -> bool:
        """True when the file exists and its checksum matches."""
        path = self.fs.abspath(relpath)
        if not path.is_file():
            return False
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest() == sha256


class Lake:
    """A lake root: read the manifest, write partition files, commit, log, vacuum."""

    def __init__(self, root: str | Path) -> None:
        self.fs = LakeFS(root)
        self.root = self.fs.root
        self.files = FileStore(self.fs)

    # -- manifest -------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.exists(MANIFEST)

    def manifest(self) -> Manifest:
        """The committed state (an empty manifest for a new lake)."""
        if not self.fs.exists(MANIFEST):
            return Manifest()
        try:
            return Manifest.from_json(self.fs.read_bytes(MANIFEST).decode())
        except (ValueError, TypeError, KeyError) as exc:
            raise LakeError(
                f"lake manifest {self.fs.abspath(MANIFEST)} is unreadable ({exc}); "
                "restore it from a backup or delete the lake to rebuild it"
            ) from exc

    def commit(self, commits: Sequence[Commit], removals: Sequence[tuple[str, str]] = ()) -> None:
        """Make partitions visible (and drop ``(table, key)`` removals) in one atomic step."""
        if not commits and not removals:
            return
        m = self.manifest()
        for c in commits:
            for table, entry in c.entries.items():
                m.tables.setdefault(table, {})[c.partition] = entry
            m.failures.get(c.stage, {}).pop(c.partition, None)
        for table, key in removals:
            m.tables.get(table, {}).pop(key, None)
        m.tables = {t: p for t, p in m.tables.items() if p}
        m.failures = {s: f for s, f in m.failures.items() if f}
        self.fs.write_bytes_atomic(MANIFEST, m.to_json().encode())

    def record_failures(self, stage: str, failed: dict[str, str]) -> None:
        """Remember failed partitions so the next run says why it retries them."""
        if not failed:
            return
        m = self.manifest()
        m.failures.setdefault(stage, {}).update(failed)
        self.fs.write_bytes_atomic(MANIFEST, m.to_json().encode())

    @contextlib.contextmanager
    def lock(self, what: str = "run") -> Iterator[None]:
        """Exclusive lock for runs and vacuum; a second writer fails fast."""
        path = self.fs.abspath(LOCK)
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a+")  # noqa: SIM115 - held for the context's duration
        try:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LakeError(
                    f"lake {self.root} is locked by another lakepipe process ({what} refused); "
                    "wait for it to finish"
                ) from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()} {what} {utcnow()}\n")
            fh.flush()
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def damaged_files(self, entry: PartitionEntry) -> list[str]:
        """The committed files of ``entry`` that are missing or not the size the manifest
        recorded (deleted or truncated behind the lake's back), each with what is wrong."""
        bad = []
        for f in entry.files:
            try:
                size = self.fs.size(f["path"])
            except FileNotFoundError:
                bad.append(f"{f['path']} missing")
                continue
            if size != f["bytes"]:
                what = "truncated" if size < f["bytes"] else "resized"
                bad.append(f"{f['path']} {what} ({size} of {f['bytes']} bytes)")
        return bad

    # -- writing -------------------------------------------------------------------------
    def write_partition(
        self, contract: Contract, key: str, table: pa.Table, fingerprint: str
    ) -> tuple[list[dict[str, Any]], int]:
        """Write one partition's rows as (uncommitted) Parquet; returns (files, rows)."""
        if table.num_rows == 0:
            return [], 0
        if contract.sort_by:
            table = table.sort_by([(c, "ascending") for c in contract.sort_by])
        rel = (
            f"{contract.name}/{key}/part-{fingerprint[:20]}.parquet"
            if key
            else (f"{contract.name}/part-{fingerprint[:20]}.parquet")
        )
        size = self.fs.write_parquet_atomic(
            rel,
            table,
            compression="zstd",
            row_group_size=ROW_GROUP_ROWS,
            write_statistics=True,
        )
        return [{"path": rel, "rows": table.num_rows, "bytes": size}], table.num_rows

    # -- run log -------------------------------------------------------------------------
    def log_attempt(self, run_id: str, record: dict[str, Any]) -> None:
        """Append one partition attempt to the run's log (visible as ``_runs``)."""
        self.fs.append_line(f"{RUNS_DIR}/{run_id}.jsonl", json.dumps(record, sort_keys=True))

    def save_run_spec(self, run_id: str, text: str) -> None:
        self.fs.write_bytes_atomic(f"{RUNS_DIR}/{run_id}.spec.yaml", text.encode())

    def run_log_files(self) -> list[str]:
        return sorted(p for p in self.fs.walk_files(RUNS_DIR) if p.endswith(".jsonl"))

    # -- reading -------------------------------------------------------------------------
    def reader(self) -> LakeReader:
        return LakeReader(self)

    # -- vacuum --------------------------------------------------------------------------
    def vacuum(self, *, dry_run: bool = False) -> tuple[list[str], int]:
        """Delete files no manifest entry references; returns (paths, bytes)."""
        with self.lock("vacuum"):
            m = self.manifest()
            keep = {
                f["path"] for parts in m.tables.values() for e in parts.values() for f in e.files
            }
            keep |= self._referenced_blobs(m)
            doomed: list[str] = []
            for top in [*self._table_dirs(), FILES_DIR]:
                doomed += [p for p in self.fs.walk_files(top) if p not in keep]
            size = sum(self.fs.size(p) for p in doomed)
            if not dry_run:
                for p in doomed:
                    self.fs.delete(p)
                for top in [*self._table_dirs(), FILES_DIR]:
                    self.fs.remove_empty_dirs(top)
            return doomed, size

    def _table_dirs(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("_")
        )

    def _referenced_blobs(self, m: Manifest) -> set[str]:
        refs: set[str] = set()
        for table in m.tables:
            contract = contracts().get(table)
            if contract is None:
                continue
            cols = [c.name for c in contract.file_columns if c.file_ref]
            if not cols:
                continue
            for rel in m.files(table):
                t = ds.dataset(self.fs.uri(rel), format="parquet").to_table(columns=cols)
                for c in cols:
                    refs.update(v for v in t.column(c).to_pylist() if v)
        return refs


class LakeReader:
    """Read-only view of committed tables, as handed to stages (``ctx.lake``)."""

    def __init__(self, lake: Lake, manifest: Manifest | None = None) -> None:
        self.lake = lake
        self.manifest = manifest or lake.manifest()

    @property
    def root(self) -> Path:
        return self.lake.root

    def tables(self) -> list[str]:
        """Tables with at least one committed partition."""
        return sorted(self.manifest.tables)

    def partitions(self, table: str) -> list[str]:
        """Committed partition keys of ``table``, sorted."""
        return sorted(self.manifest.partitions(table))

    def partition_values(self, table: str, key: str) -> list[str]:
        """Distinct values of partition column ``key`` among committed partitions."""
        values = set()
        for k in self.manifest.partitions(table):
            for part in k.split("/"):
                name, _, value = part.partition("=")
                if name == key:
                    values.add(value)
        return sorted(values)

    def read(
        self,
        table: str,
        partitions: Sequence[str] | None = None,
        columns: Sequence[str] | None = None,
        where: str | None = None,
    ) -> pa.Table:
        """Committed rows of ``table`` (partition columns included)."""
        contract = get_contract(table)
        entries = self.manifest.partitions(table)
        keys = sorted(entries) if partitions is None else list(partitions)
        pieces = []
        for key in keys:
            entry = entries.get(key)
            if entry is None:
                continue
            values = dict(p.split("=", 1) for p in key.split("/")) if key else {}
            for f in entry.files:
                t = ds.dataset(self.lake.fs.uri(f["path"]), format="parquet").to_table()
                for name, value in values.items():
                    col_type = contract.column(name).type
                    t = t.append_column(
                        name, pc.cast(pa.array([value] * t.num_rows, pa.string()), col_type)
                    )
                pieces.append(t.select(contract.column_names))
        out = pa.concat_tables(pieces) if pieces else contract.empty()
        if where:
            out = _duckdb_filter(out, where)
        if columns is not None:
            out = out.select(list(columns))
        return out

    def sql(self, query: str) -> pa.Table:
        """Read-only DuckDB query over the committed lake."""
        from lakepipe.sql import LakeSQL

        return LakeSQL(self.lake, self.manifest).query(query)


def _duckdb_filter(table: pa.Table, where: str) -> pa.Table:
    import duckdb

    from lakepipe.sql import arrow_query

    con = duckdb.connect()
    try:
        con.register("t", table)
        return arrow_query(con, f"select * from t where {where}")
    finally:
        con.close()


def new_run_id() -> str:
    """Sortable, unique run id: UTC timestamp plus random suffix."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}-{os.urandom(3).hex()}"


def add_healpix(table: pa.Table) -> pa.Table:
    """Append ``_healpix_29`` computed from ``ra``/``dec`` (nulls map to -1)."""
    from lakepipe.astro.healpix import healpix_index

    if table.num_rows == 0:
        return table.append_column("_healpix_29", pa.array([], pa.int64()))
    ra = table.column("ra").to_numpy(zero_copy_only=False).astype(np.float64)
    dec = table.column("dec").to_numpy(zero_copy_only=False).astype(np.float64)
    ok = np.isfinite(ra) & np.isfinite(dec)
    idx = np.full(len(ra), -1, dtype=np.int64)
    if ok.any():
        idx[ok] = healpix_index(ra[ok], dec[ok])
    return table.append_column("_healpix_29", pa.array(idx))
