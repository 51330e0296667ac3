"""DuckDB over the lake: views from the manifest, hive columns, _runs, and the sandbox."""

from __future__ import annotations

import pytest

from lakepipe.errors import LakeError, SQLError
from lakepipe.lake import Lake
from lakepipe.runner import run_pipeline
from lakepipe.sql import LakeSQL


@pytest.fixture
def lake(toy_spec) -> Lake:
    return Lake(run_pipeline(toy_spec(), workers=1).lake)


def test_views_have_hive_columns_in_contract_order(lake):
    t = LakeSQL(lake).query("select * from toy_numbers limit 1")
    assert t.column_names == ["bucket", "id", "value", "ra", "dec", "_healpix_29"]
    got = (
        LakeSQL(lake)
        .query("select bucket, count(*) as n from toy_numbers where bucket = '02' group by 1")
        .to_pylist()
    )
    assert got == [{"bucket": "02", "n": 50}]


def test_files_are_sorted_by_healpix(lake):
    import pyarrow.parquet as pq

    for rel in lake.manifest().files("toy_numbers"):
        h = pq.read_table(lake.fs.abspath(rel)).column("_healpix_29").to_pylist()
        assert h == sorted(h) and len(h) == 50


def test_healpix_matches_positions(lake):
    from lakepipe.astro.healpix import healpix_center

    t = LakeSQL(lake).query("select ra, dec, _healpix_29 from toy_numbers").to_pylist()
    import numpy as np

    ra, dec = healpix_center(np.array([r["_healpix_29"] for r in t]), 29)
    # an order-29 pixel is ~0.4 mas across: centres lie within 1 mas of the positions
    d_ra = (ra - np.array([r["ra"] for r in t]) + 180) % 360 - 180
    d_dec = dec - np.array([r["dec"] for r in t])
    sep_mas = np.hypot(d_ra * np.cos(np.radians(dec)), d_dec) * 3.6e6
    assert sep_mas.max() < 1.0


def test_views_read_only_committed_files(lake):
    # an uncommitted file in a partition directory is invisible to queries
    import shutil

    rel = lake.manifest().files("toy_numbers")[0]
    src = lake.fs.abspath(rel)
    shutil.copy(src, src.with_name("part-orphan.parquet"))
    n = LakeSQL(lake).query("select count(*) as n from toy_numbers").column("n")[0].as_py()
    assert n == 200


def test_runs_table(lake):
    rows = (
        LakeSQL(lake)
        .query("select stage, status, sum(rows) as rows from _runs group by 1, 2 order by 1")
        .to_pylist()
    )
    assert rows == [
        {"stage": "numbers", "status": "ok", "rows": 200},
        {"stage": "sums", "status": "ok", "rows": 4},
    ]


def test_empty_tables_exist_with_contract_schema(lake):
    t = LakeSQL(lake).query("select * from exposures")
    assert t.num_rows == 0 and "exposure_id" in t.column_names


@pytest.mark.parametrize(
    ("sql", "pattern"),
    [
        ("insert into toy_sums values ('x', 1, 1.0)", "INSERT statements are not allowed"),
        ("create table x as select 1", "CREATE statements are not allowed"),
        ("drop view toy_sums", "DROP statements are not allowed"),
        ("copy toy_sums to 'out.csv'", "COPY statements are not allowed"),
        ("attach 'other.db'", "ATTACH statements are not allowed"),
        ("install httpfs", "statements are not allowed"),
        ("load httpfs", "LOAD statements are not allowed"),
        ("set enable_external_access = true", "SET statements are not allowed"),
        ("select * from read_csv('/etc/passwd')", "refused: .*Cannot access file"),
        ("select * from read_parquet('/tmp/*.parquet')", "refused"),
        ("selec 1", "Parser Error"),
        ("select nope from toy_sums", "Binder Error"),
        ("", "empty SQL"),
    ],
)
def test_sandbox_and_errors(lake, sql, pattern):
    with pytest.raises(SQLError, match=pattern):
        LakeSQL(lake).query(sql)


def test_duckdb_spill_directory_is_not_readable(lake, tmp_path, monkeypatch):
    # DuckDB allows reads of its own temp directory (default ./.tmp under the working
    # directory); a file planted there must stay out of reach of lake queries.
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.csv").write_text("a,b\nsecret,1\n")
    with pytest.raises(SQLError, match="refused"):
        LakeSQL(lake).query("select * from read_csv('.tmp/secret.csv')")


def test_several_statements_return_the_last_result(lake):
    t = LakeSQL(lake).query("select 1 as a; select count(*) as n from toy_numbers;")
    assert t.to_pylist() == [{"n": 200}]


def test_runs_tolerates_a_torn_last_line(lake):
    # a run killed mid-append leaves half a JSON line; the log must stay queryable
    log = lake.fs.abspath(lake.run_log_files()[0])
    with open(log, "a") as fh:
        fh.write('{"run_id": "x", "stage": "numb')
    n = LakeSQL(lake).query("select count(*) as n from _runs").column("n")[0].as_py()
    assert n == 8


def test_an_unreadable_table_does_not_take_the_others_down(lake):
    # truth: toy_numbers' files lose a contract column (an older writer, or damage);
    # toy_sums stays queryable, and a query naming toy_numbers says which table, why and
    # the fix, as a lake error (exit 1), not as the user's SQL error
    import pyarrow.parquet as pq

    for rel in lake.manifest().files("toy_numbers"):
        path = lake.fs.abspath(rel)
        pq.write_table(pq.read_table(path).drop_columns(["value"]), path)
    assert LakeSQL(lake).query("select count(*) as n from toy_sums").to_pylist() == [{"n": 4}]
    with pytest.raises(LakeError, match=r"table 'toy_numbers' cannot be read.*--force STAGE"):
        LakeSQL(lake).query("select count(*) from toy_numbers")
    with pytest.raises(SQLError, match="Binder Error"):  # the query's own fault stays so
        LakeSQL(lake).query("select nope from toy_sums")
    with pytest.raises(LakeError, match="toy_numbers"):  # SQL names are case-insensitive
        LakeSQL(lake).query("select count(*) from TOY_NUMBERS")
    # a file the query names itself (not a committed one) is the query's problem
    with pytest.raises(SQLError, match=r"nope\.parquet"):
        LakeSQL(lake).query(f"select * from read_parquet('{lake.root}/nope.parquet')")


def test_a_truncated_committed_file_is_a_lake_error(lake):
    rel = lake.manifest().files("toy_sums")[0]
    path = lake.fs.abspath(rel)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(LakeError, match=r"cannot be read.*magic bytes"):
        LakeSQL(lake).query("select sum(total) from toy_sums")
