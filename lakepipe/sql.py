"""DuckDB over the lake: one view per table over the manifest's files, read-only.

Views read exactly the committed files the manifest lists (never a glob), with hive
partition columns restored and typed from the contracts; ``_runs`` is the run log.
Queries are sandboxed twice: only ``SELECT``/``EXPLAIN`` statements are accepted, and
DuckDB itself is locked to reading inside the lake root (``enable_external_access =
false`` with ``allowed_directories``), so writes, ``ATTACH``, ``COPY``,
``INSTALL``/``LOAD`` and reads of files outside the lake are refused.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import weakref

import duckdb
import pyarrow as pa

from lakepipe.errors import LakeError, SQLError
from lakepipe.lake import Lake, Manifest
from lakepipe.tables import Contract, contracts

ALLOWED_STATEMENTS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}

RUNS_COLUMNS = {
    "run_id": "VARCHAR",
    "pipeline": "VARCHAR",
    "stage": "VARCHAR",
    "kind": "VARCHAR",
    "partition": "VARCHAR",
    "status": "VARCHAR",
    "reason": "VARCHAR",
    "rows": "BIGINT",
    "seconds": "DOUBLE",
    "error": "VARCHAR",
    "fingerprint": "VARCHAR",
    "started_at": "VARCHAR",
    "finished_at": "VARCHAR",
    "archive_stats": "JSON",
}


def arrow_query(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """Run ``sql`` and return Arrow without an extra copy (DuckDB 1.x and 2.x APIs)."""
    rel = con.sql(sql)
    if rel is None:  # a statement without a result set
        return pa.table({})
    fetch = getattr(rel, "to_arrow_table", None) or rel.arrow
    return fetch()


def mentions_table(sql: str, table: str) -> bool:
    """Whether ``sql`` names ``table`` (as a whole word, any case): which tables a query
    may read, for dry-run planning and for blaming an unreadable table."""
    return re.search(rf"\b{re.escape(table)}\b", sql, re.I) is not None


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _ident(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


class LakeSQL:
    """A sandboxed DuckDB connection with the lake's tables as views."""

    def __init__(self, lake: Lake, manifest: Manifest | None = None, threads: int | None = None):
        self.lake = lake
        self.manifest = manifest or lake.manifest()
        self.threads = threads
        self._con: duckdb.DuckDBPyConnection | None = None
        self.broken: dict[str, str] = {}  # tables whose committed files cannot be read

    def connect(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(":memory:")
        if self.threads:
            con.execute(f"set threads={int(self.threads)}")
        known = contracts()
        for name in sorted(set(known) | set(self.manifest.tables)):
            contract = known.get(name)
            try:
                if contract is None:  # committed by a plug-in that is not loaded now
                    files = ", ".join(
                        _sql_str(self.lake.fs.uri(f)) for f in self.manifest.files(name)
                    )
                    con.execute(
                        f"create view {_ident(name)} as select * from "
                        f"read_parquet([{files}], hive_partitioning=true)"
                    )
                else:
                    self._create_view(con, contract)
            except duckdb.Error as exc:
                # one unreadable table must not take the others down: remember why, and
                # say so when a query names it
                self.broken[name] = str(exc).splitlines()[0]
        self._create_runs_view(con)
        # DuckDB lets queries read its spill directory (default ``./.tmp`` under the
        # working directory); point it at a private, empty one removed with the connection.
        spill = tempfile.mkdtemp(prefix="lakepipe-duckdb-")
        weakref.finalize(con, shutil.rmtree, spill, ignore_errors=True)
        con.execute(f"set temp_directory={_sql_str(spill + '/spill')}")
        root = str(self.lake.root).rstrip("/") + "/"
        con.execute(f"set allowed_directories=[{_sql_str(root)}]")
        con.execute("set enable_external_access=false")
        con.execute("set lock_configuration=true")
        return con

    def _create_view(self, con: duckdb.DuckDBPyConnection, contract: Contract) -> None:
        files = self.manifest.files(contract.name)
        cols = ", ".join(_ident(c) for c in contract.column_names)
        if not files:
            con.register(f"__empty_{contract.name}", contract.empty())
            con.execute(
                f"create view {_ident(contract.name)} as "
                f"select {cols} from {_ident('__empty_' + contract.name)}"
            )
            return
        file_list = ", ".join(_sql_str(self.lake.fs.uri(f)) for f in files)
        options = ""
        if contract.partition_by:
            hive_types = ", ".join(f"{_sql_str(k)}: 'VARCHAR'" for k in contract.partition_by)
            options = f", hive_partitioning=true, hive_types={{{hive_types}}}"
        else:
            options = ", hive_partitioning=false"
        con.execute(
            f"create view {_ident(contract.name)} as select {cols} "
            f"from read_parquet([{file_list}]{options})"
        )

    def _create_runs_view(self, con: duckdb.DuckDBPyConnection) -> None:
        files = self.lake.run_log_files()
        cols = ", ".join(f"{_sql_str(k)}: {_sql_str(v)}" for k, v in RUNS_COLUMNS.items())
        if files:
            file_list = ", ".join(_sql_str(self.lake.fs.uri(f)) for f in files)
            con.execute(
                "create view _runs as select * from read_json("
                f"[{file_list}], format='newline_delimited', columns={{{cols}}}, "
                "ignore_errors=true) where status is not null"  # a torn last line → nulls
            )
        else:
            select = ", ".join(f"cast(null as {t}) as {k}" for k, t in RUNS_COLUMNS.items())
            con.execute(f"create view _runs as select {select} where false")

    def query(self, sql: str) -> pa.Table:
        """Run read-only SQL; returns the last statement's result as Arrow."""
        sql = sql.strip().rstrip(";").strip()
        if not sql:
            raise SQLError('empty SQL; pass a query such as "select count(*) from exposures"')
        try:
            statements = duckdb.extract_statements(sql)
        except duckdb.Error as exc:
            raise SQLError(f"SQL error: {exc}") from None
        for st in statements:
            if st.type not in ALLOWED_STATEMENTS:
                kind = st.type.name
                raise SQLError(
                    f"{kind} statements are not allowed: lakepipe queries are read-only "
                    "(SELECT/EXPLAIN/DESCRIBE/SUMMARIZE). To write results, use "
                    '`lakepipe export --sql "…" -o FILE`.'
                )
        if self._con is None:
            self._con = self.connect()  # views over this manifest snapshot, reused
        con = self._con
        try:
            for st in statements[:-1]:
                con.execute(st.query).fetchall()  # run and drain; only the last one returns
            return arrow_query(con, statements[-1].query)
        except duckdb.PermissionException as exc:
            raise SQLError(
                f"refused: {str(exc).splitlines()[0]}. Queries may read only the lake's "
                f"tables (and files under {self.lake.root}); see `lakepipe lake tables`."
            ) from None
        except duckdb.Error as exc:
            committed = {
                self.lake.fs.uri(f) for t in self.manifest.tables for f in self.manifest.files(t)
            }
            if not any(path in str(exc) for path in committed):
                raise self._query_error(sql, exc) from None
            # a committed file vanished or is damaged (not the query's fault)
            raise LakeError(
                f"the lake at {self.lake.root} has a committed file that cannot be read: "
                f"{str(exc).splitlines()[0]}. Rerun the pipeline that wrote it (`lakepipe "
                "run SPEC`: damaged partitions are redone), or `lakepipe run SPEC --force "
                "STAGE`."
            ) from None

    def _query_error(self, sql: str, exc: Exception) -> Exception:
        """The error to raise for a failed query: the lake's fault when it names a table
        whose files could not be read, else the query's."""
        named = [t for t in self.broken if mentions_table(sql, t)]
        if named:
            t = named[0]
            return LakeError(
                f"table {t!r} cannot be read from the lake at {self.lake.root}: "
                f"{self.broken[t]}. Its committed files are missing, damaged, or were "
                "written by an older lakepipe whose table contract differs; rerun the "
                "stage that writes it (`lakepipe run SPEC --force STAGE`)."
            )
        return SQLError(f"SQL error: {exc}")

    def close(self) -> None:
        """Close the cached connection (it is also closed when garbage-collected)."""
        if self._con is not None:
            self._con.close()
            self._con = None

    def table_names(self) -> list[str]:
        return sorted(set(contracts()) | {"_runs"})
