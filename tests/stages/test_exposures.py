"""The exposures stage through the runner, and footprint queries in SQL.

Truth: generated FITS folders whose image centres, sizes and times are known, so which
exposure contains which point at which time is known; footprint SQL is checked against
the exact spherical point-in-polygon test on random points.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import yaml

from lakepipe.astro.wcs import footprint_contains_sql, point_in_footprint
from lakepipe.lake import Lake
from lakepipe.runner import run_pipeline
from lakepipe.stages.exposures import ExposuresStage
from tests.data.fits_images import ImageSpec, write_mef

# the point and time range of the query in the ExposuresStage docstring
PT_RA, PT_DEC = 150.1, 2.3


def make_folder(root: Path) -> Path:
    """a: two extensions at 05:00 (one contains the point), b: one at 07:00 (contains it),
    c: next night (contains it)."""
    d = root / "images"
    d.mkdir(parents=True)
    write_mef(
        d / "a.fits",
        [ImageSpec(PT_RA + 0.005, PT_DEC), ImageSpec(PT_RA + 0.05, PT_DEC, extname="S2")],
        date_obs="2025-01-03T05:00:00",
    )
    write_mef(
        d / "b.fits", [ImageSpec(PT_RA - 0.01, PT_DEC + 0.01)], date_obs="2025-01-03T07:00:00"
    )
    write_mef(d / "c.fits", [ImageSpec(PT_RA, PT_DEC - 0.01)], date_obs="2025-01-04T05:00:00")
    return d


def write_spec(root: Path, where: dict | None = None, **stages: dict) -> Path:
    spec = {
        "name": "exp_test",
        "lake": str(root / "lake"),
        "archive": {"kind": "fits_dir", "path": "images"},
        "stages": {"exposures": {"kind": "exposures", "where": where or {}}, **stages},
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    make_folder(tmp_path)
    report = run_pipeline(write_spec(tmp_path), workers=1)
    assert report.exit_code == 0, report.stages[0].errors
    return Lake(report.lake)


def test_one_partition_per_night_and_rerun_does_nothing(lake, tmp_path):
    r = lake.reader()
    assert r.partitions("exposures") == ["night=2025-01-03", "night=2025-01-04"]
    t = r.sql("select night, count(*) as n from exposures group by 1 order by 1").to_pylist()
    assert t == [{"night": "2025-01-03", "n": 3}, {"night": "2025-01-04", "n": 1}]
    hpx = r.sql("select count(*) as n from exposures where _healpix_29 > 0").column("n")[0]
    assert hpx.as_py() == 4
    assert run_pipeline(write_spec(tmp_path), workers=1).executed == 0


def test_docstring_query_finds_the_exposures_containing_the_point(lake):
    doc = ExposuresStage.__doc__ or ""
    m = re.search(r"(with f as \(.*?<= 0)\n", doc, re.S)
    assert m, "the SQL example is missing from the ExposuresStage docstring"
    got = lake.reader().sql(m.group(1) + " order by mjd").to_pylist()
    uris = lake.reader().sql("select exposure_id, image_uri from exposures").to_pylist()
    name = {u["exposure_id"]: u["image_uri"].rsplit("/", 1)[1] for u in uris}
    # in 60678.1..60678.5 (night 2025-01-03): a[1] at 05:00 and b[1] at 07:00, not a[2]
    assert [name[g["exposure_id"]] for g in got] == ["a.fits[1]", "b.fits[1]"]


def test_exact_footprint_sql_matches_python_and_the_time_window(lake):
    pred = footprint_contains_sql(PT_RA, PT_DEC)
    got = lake.reader().sql(
        f"select image_uri from exposures where {pred} and mjd > 60679 order by mjd"
    )
    assert [u.rsplit("/", 1)[1] for u in got.column("image_uri").to_pylist()] == ["c.fits[1]"]
    # points just outside a[2]'s west edge are not in it; just inside they are
    row = lake.reader().sql("select * from exposures where image_uri like '%a.fits[2]'")
    r = row.to_pylist()[0]
    west_ra = (r["ra2"] + r["ra3"]) / 2  # corners 2-3: the x = NAXIS1 edge, RA decreasing
    for dra, inside in ((-2e-5, False), (2e-5, True)):
        q = footprint_contains_sql(west_ra + dra, (r["dec2"] + r["dec3"]) / 2)
        n = (
            lake.reader()
            .sql(
                f"select count(*) as n from exposures where {q} and image_uri = '{r['image_uri']}'"
            )
            .column("n")[0]
            .as_py()
        )
        assert n == int(inside)


@pytest.mark.parametrize("ra0,dec0", [(150.0, 2.2), (0.1, 60.0), (359.9, -75.0)])
def test_footprint_sql_equals_exact_spherical_test(ra0, dec0):
    """Random points around ZTF-quadrant-sized rotated footprints, RA wrap included."""
    rng = np.random.default_rng(42)
    n_fp, half = 20, 0.43  # deg: half side of a ZTF quadrant
    rows = []
    for k in range(n_fp):
        rot = rng.uniform(0, 2 * np.pi)
        cx = np.array([-half, half, half, -half])
        cy = np.array([-half, -half, half, half])
        x = cx * np.cos(rot) - cy * np.sin(rot)
        y = cx * np.sin(rot) + cy * np.cos(rot)
        dec = dec0 + y
        ra = (ra0 + x / np.cos(np.radians(dec0))) % 360.0
        rows.append(
            {"exposure_id": k}
            | {f"ra{i + 1}": ra[i] for i in range(4)}
            | {f"dec{i + 1}": dec[i] for i in range(4)}
        )
    table = pa.Table.from_pylist(rows)
    rc = np.array([[r[f"ra{i}"] for i in range(1, 5)] for r in rows])
    dc = np.array([[r[f"dec{i}"] for i in range(1, 5)] for r in rows])
    con = duckdb.connect()
    con.register("exposures", table)
    pts_ra = (ra0 + rng.uniform(-0.7, 0.7, 24) / np.cos(np.radians(dec0))) % 360.0
    pts_dec = dec0 + rng.uniform(-0.7, 0.7, 24)
    n_inside = 0
    for pr, pd in zip(pts_ra, pts_dec, strict=True):
        sql = f"select exposure_id from exposures where {footprint_contains_sql(pr, pd)}"
        got = sorted(v[0] for v in con.execute(sql).fetchall())
        want = np.nonzero(point_in_footprint(pr, pd, rc, dc))[0].tolist()
        assert got == want
        n_inside += len(want)
    assert n_inside > 20  # the test exercised both outcomes


def test_where_block_selects_and_max_rows_spans_nights(tmp_path):
    make_folder(tmp_path)
    spec = write_spec(tmp_path, where={"start": "2025-01-03T06:00:00", "max_rows": 1})
    r = run_pipeline(spec, workers=1)
    t = Lake(r.lake).reader().sql("select image_uri, night from exposures").to_pylist()
    assert [(u["image_uri"].rsplit("/", 1)[1], u["night"]) for u in t] == [
        ("b.fits[1]", "2025-01-03")
    ]


def test_sim_footprint_sql_finds_the_exposures_that_rendered_a_star(tmp_path):
    """Truth: the virtual survey's per-exposure list of rendered stars (pixel positions).

    The sim's WCS is pure TAN, whose straight pixel edges are great circles on the sky,
    so the corner quadrilateral is exactly the pixel-centre box [0, N-1]²."""
    from lakepipe.archives.sim import SimArchive

    sim = {"seed": 5, "n_fields": 4, "n_nights": 2, "visits_per_night": 1, "naxis1": 256,
           "naxis2": 256, "n_stars": 200, "n_asteroids": 0, "filters": ["zg"]}  # fmt: skip
    spec = tmp_path / "sim.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "sim_exp",
                "lake": str(tmp_path / "lake"),
                "archive": {"kind": "sim", **sim},
                "stages": {"exposures": {"kind": "exposures"}},
            }
        )
    )
    lake = Lake(run_pipeline(spec, workers=1).lake)
    archive = SimArchive.from_config(**sim)
    exposures = lake.reader().read("exposures").to_pylist()
    assert len(exposures) == 8
    where_rendered: dict[int, set[int]] = {}
    position: dict[int, tuple[float, float]] = {}
    for e in exposures:
        for t in archive.truth(e["exposure_id"]).to_pylist():
            if t["kind"] != "star":
                continue
            inside = 0 <= t["x_pix"] <= e["naxis1"] - 1 and 0 <= t["y_pix"] <= e["naxis2"] - 1
            if inside:
                where_rendered.setdefault(t["object_id"], set()).add(e["exposure_id"])
            position[t["object_id"]] = (t["ra"], t["dec"])
    rng = np.random.default_rng(1)
    ids = sorted(where_rendered)
    picked = [ids[i] for i in rng.choice(len(ids), 12, replace=False)]
    # stars in the field overlaps are seen by two fields on each night
    picked += [i for i in ids if len(where_rendered[i]) == 4][:4]
    assert len(picked) == 16
    con = duckdb.connect()  # one connection over the committed table for 16 queries
    con.register("exposures", lake.reader().read("exposures"))
    for oid in picked:
        ra, dec = position[oid]
        sql = f"select exposure_id from exposures where {footprint_contains_sql(ra, dec)}"
        assert {v[0] for v in con.execute(sql).fetchall()} == where_rendered[oid], oid


SMALL_SIM = {"kind": "sim", "seed": 3, "naxis1": 256, "naxis2": 256, "n_nights": 1,
             "n_fields": 1, "visits_per_night": 1, "n_asteroids": 0}  # fmt: skip


def _sim_spec(root: Path, where: dict) -> Path:
    spec = {
        "name": "exp_sim",
        "lake": str(root / "lake"),
        "archive": SMALL_SIM,
        "stages": {"exposures": {"kind": "exposures", "where": where}},
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_unknown_filter_is_an_error_with_did_you_mean(tmp_path, cli):
    """The sim knows its filters (zg, zr, zi): `g` is a typo, not an empty selection."""
    r = cli("run", _sim_spec(tmp_path, {"filters": ["zr", "g"]}), "-j", "1")
    assert r.exit_code == 2
    assert (
        "stages.exposures.where.filters: unknown filter 'g' for archive 'sim'. "
        "Did you mean 'zg'? Known filters: zg, zr, zi." in r.stderr
    )
    assert not (tmp_path / "lake" / "exposures").exists()


def test_a_query_matching_nothing_warns(tmp_path, caplog):
    """The one-night survey starts 2025-01-01: a 2030 start selects nothing, loudly."""
    with caplog.at_level("WARNING", logger="lakepipe"):
        r = run_pipeline(_sim_spec(tmp_path, {"start": "2030-01-01"}), workers=1)
    assert r.exit_code == 0
    assert "stage 'exposures': the archive (sim) has no exposures matching where: " in caplog.text
    assert '{"start": "2030-01-01"}' in caplog.text
    assert Lake(tmp_path / "lake").reader().partitions("exposures") == []
