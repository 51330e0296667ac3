"""Export formats: values and units survive the round trip through real readers."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.table import Table

from lakepipe.export import format_for_path, formats
from lakepipe.lake import Lake
from lakepipe.runner import run_pipeline
from lakepipe.sql import LakeSQL


@pytest.fixture
def lake(toy_spec) -> Lake:
    return Lake(run_pipeline(toy_spec(), workers=1).lake)


def test_ecsv_round_trip_keeps_units_and_values(lake, cli, tmp_path):
    out = tmp_path / "numbers.ecsv"
    r = cli("export", "toy_numbers", "--lake", lake.root, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "wrote 200 rows (ecsv)" in r.stderr
    t = Table.read(out, format="ascii.ecsv")
    assert str(t["ra"].unit) == "deg" and str(t["value"].unit) == "mag"
    assert t["value"].description == "A value"
    ref = LakeSQL(lake).query("select * from toy_numbers")
    np.testing.assert_array_equal(np.sort(t["value"]), np.sort(ref.column("value").to_numpy()))
    assert t.meta["lakepipe_table"] == "toy_numbers"


def test_votable_round_trip(lake, cli, tmp_path):
    out = tmp_path / "sums.vot"
    assert cli("export", "toy_sums", "--lake", lake.root, "-o", out).exit_code == 0
    t = Table.read(out, format="votable")
    assert len(t) == 4 and str(t["total"].unit) == "mag"


def test_votable_keeps_non_vounit_units_quietly(tmp_path):
    # "electron / adu" (the exposures' gain) is outside the VOUnit standard; astropy
    # warns (W50) when the table is built and again when it is written. The unit is kept
    # verbatim and no warning escapes (the test suite turns warnings into errors).
    import io

    import pyarrow as pa

    from lakepipe.export.base import ExportMeta

    t = pa.table({"gain_e_per_adu": [1.5, 2.0]})
    buf = io.BytesIO()
    meta = ExportMeta(units={"gain_e_per_adu": "electron / adu"})
    formats.get("votable").write(t, buf, meta)
    buf.seek(0)
    from astropy.io.votable import parse

    field = parse(buf).get_first_table().fields[0]
    assert "electron" in str(field.unit) and "adu" in str(field.unit)


def test_csv_json_parquet_by_suffix(lake, cli, tmp_path):
    for suffix, check in [
        (".csv", lambda p: p.read_text().splitlines()[0] == "bucket,n,total"),
        (".json", lambda p: len(json.loads(p.read_text())) == 4),
        (".parquet", lambda p: pq.read_table(p).schema.field("total").metadata[b"unit"] == b"mag"),
    ]:
        out = tmp_path / f"sums{suffix}"
        r = cli("export", "toy_sums", "--lake", lake.root, "-o", out)
        assert r.exit_code == 0, r.stderr
        assert check(out), suffix


def test_export_sql_result_gets_units_by_column_name(lake, cli, tmp_path):
    out = tmp_path / "q.ecsv"
    r = cli(
        "export",
        "--sql",
        "select ra, dec, id from toy_numbers where bucket = '01'",
        "--lake",
        lake.root,
        "-o",
        out,
    )
    assert r.exit_code == 0, r.stderr
    t = Table.read(out)
    assert len(t) == 50 and str(t["dec"].unit) == "deg"


def test_query_formats_on_stdout(lake, cli):
    r = cli("query", "--lake", lake.root, "-f", "csv", "select bucket, n from toy_sums order by 1")
    assert r.stdout.splitlines() == ["bucket,n", "00,50", "01,50", "02,50", "03,50"]
    r = cli("query", "--lake", lake.root, "-f", "json", "select count(*) as n from toy_numbers")
    assert json.loads(r.stdout) == [{"n": 200}]
    r = cli("query", "--lake", lake.root, "-", input="select sum(n) as s from toy_sums")
    assert "200" in r.stdout and r.exit_code == 0


def test_registry_and_suffixes():
    assert {"csv", "ecsv", "json", "jsonl", "parquet", "votable", "table"} <= set(formats.names())
    assert format_for_path("x/y.ECSV") == "ecsv" and format_for_path("a.vot") == "votable"
    assert format_for_path("a.unknown") is None
