"""CDS clients (VizieR cone, XMatch) against the loopback emulator on 127.0.0.1.

Truth: the backing survey's reference catalog, searched directly with the same
great-circle distance.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from lakepipe.archives.cds import CdsClient, CdsParams, cone_cover, parse_asu_tsv
from lakepipe.archives.http import HttpParams
from lakepipe.archives.query import angular_sep_deg
from lakepipe.errors import ArchiveError
from lakepipe.sim.emulator import ArchiveEmulator, Faults


def client(url: str, **kw: object) -> CdsClient:
    http = HttpParams(
        rate_limit_per_s=500.0,
        rate_limit_scope="process",
        backoff_base_s=0.01,
        backoff_max_s=0.02,
        retry_after_max_s=0.02,
        netrc=False,
    )
    return CdsClient(CdsParams(vizier_url=url, xmatch_url=url, http=http, **kw))


def truth_within(cat: pa.Table, ra: float, dec: float, radius_arcsec: float) -> set[int]:
    sep = angular_sep_deg(cat.column("ra").to_numpy(), cat.column("dec").to_numpy(), ra, dec)
    return set(np.asarray(cat.column("source_id"))[sep * 3600.0 <= radius_arcsec].tolist())


def test_cone_returns_reference_shape(emu, survey) -> None:
    got = client(emu.url).cone(150.0, 2.2, 90.0)
    truth = truth_within(survey.catalog(), 150.0, 2.2, 90.0)
    assert set(got.column("source_id").to_pylist()) == truth and len(truth) > 10
    for c in ("source_id", "ra", "dec", "pmra", "pmdec", "phot_g_mean_mag", "bp_rp", "ref_epoch"):
        assert c in got.column_names
    cat = {r["source_id"]: r for r in survey.catalog().to_pylist()}
    for r in got.to_pylist():
        assert r["ra"] == cat[r["source_id"]]["ra"]  # exact: repr() round trip
        assert r["pmdec"] == cat[r["source_id"]]["pmdec"]
        assert r["ref_epoch"] == 2016.0
    # the 50-row VizieR default never applies: we always send -out.max
    assert "-out.max=1000001" in emu.log[-1].query


def test_cone_over_row_limit_is_an_error(emu) -> None:
    with pytest.raises(ArchiveError, match="truncated"):
        client(emu.url, row_limit=5).cone(150.0, 2.2, 300.0)


def test_empty_cone(emu) -> None:
    got = client(emu.url).cone(10.0, -40.0, 30.0)
    assert got.num_rows == 0 and "source_id" in got.column_names


def test_parse_asu_tsv_overflow_and_error() -> None:
    text = (
        b"#\n#INFO\tQUERY_STATUS=OVERFLOW\ttruncated result\n"
        b"Source\tRA_ICRS\nNone\tdeg\n----\t----\n1\t2.0\n"
    )
    with pytest.raises(ArchiveError, match="OVERFLOW"):
        parse_asu_tsv(text)
    with pytest.raises(ArchiveError, match="refused"):
        parse_asu_tsv(b"#INFO\tQUERY_STATUS=ERROR\tno such table\n")
    t = parse_asu_tsv(b"#c\nSource\tRA_ICRS\tGmag\n\tdeg\tmag\n--\t--\t--\n7\t1.5\t\n")
    assert t.to_pylist() == [{"Source": 7, "RA_ICRS": 1.5, "Gmag": None}]


def test_xmatch_chunked_upload(emu, survey) -> None:
    cat = survey.catalog()
    # 25 positions 0.8" north of catalog stars, plus 5 far from everything
    ra = [*cat.column("ra").to_pylist()[:25], *([10.0] * 5)]
    dec = [*(d + 0.8 / 3600 for d in cat.column("dec").to_pylist()[:25]), *([-40.0] * 5)]
    positions = pa.table({"ra": ra, "dec": dec})
    cds = client(emu.url, xmatch_chunk_rows=7)
    got = cds.xmatch(positions, 2.0)
    posts = [e for e in emu.log if e.path == "/xmatch/api/v1/sync"]
    assert len(posts) == 5  # ceil(30 / 7) uploads
    truth = {(i, s) for i in range(30) for s in truth_within(cat, ra[i], dec[i], 2.0)}
    assert (
        set(zip(got["row_index"].to_pylist(), got["source_id"].to_pylist(), strict=True)) == truth
    )
    ids = cat.column("source_id").to_pylist()
    own = [r for r in got.to_pylist() if r["source_id"] == ids[r["row_index"]]]
    assert len(own) == 25
    assert all(r["dist_arcsec"] == pytest.approx(0.8, abs=1e-4) for r in own)


def test_xmatch_result_cap_is_an_error(emu, survey) -> None:
    cat = survey.catalog().slice(0, 10)
    with pytest.raises(ArchiveError, match="truncated"):
        client(emu.url, xmatch_max_rows=3).xmatch(cat.select(["ra", "dec"]), 5.0)


def test_xmatch_survives_faults(survey) -> None:
    faults = Faults(seed=5, error_503_prob=0.3, drop_prob=0.1, retry_after_s=0)
    cat = survey.catalog().slice(0, 40)
    with ArchiveEmulator(survey, faults=faults) as e:
        got = client(e.url, xmatch_chunk_rows=10).xmatch(cat.select(["ra", "dec"]), 0.5)
        assert any(x.status == 503 for x in e.log)
    ids = cat.column("source_id").to_pylist()
    own = {r["row_index"] for r in got.to_pylist() if r["source_id"] == ids[r["row_index"]]}
    assert own == set(range(40))  # every star finds itself despite the faults


def test_cone_cover() -> None:
    ra0, dec0, r = cone_cover([10.0, 10.2], [0.0, 0.0], pad_arcsec=5.0)
    assert ra0 == pytest.approx(10.1) and dec0 == pytest.approx(0.0, abs=1e-12)
    assert r == pytest.approx(0.1 * 3600 + 5.0)


def test_cds_catalog_reads_reference_shape(emu, survey) -> None:
    from lakepipe.archives.cds import CdsCatalog
    from lakepipe.catalogs.base import ColumnMap, Cone, to_reference

    params = CdsParams(
        vizier_url=emu.url,
        http=HttpParams(rate_limit_per_s=500.0, rate_limit_scope="process", netrc=False),
    )
    cones = [Cone(150.0, 2.2, 0.01), Cone(150.005, 2.2, 0.01)]  # overlapping: de-duplicated
    epoch_mjd = 60676.5
    got = CdsCatalog(params).read(cones, epoch_mjd)
    columns = ColumnMap(
        id="source_id", mags={"G": "phot_g_mean_mag"}, pmra="pmra", pmdec="pmdec", epoch=2016.0
    )
    # truth: the same catalog read directly, propagated to the same epoch
    want = to_reference(survey.catalog(), columns, cones, epoch_mjd)
    assert got.num_rows == want.num_rows > 0
    assert got.sort_by("ref_id").equals(want.sort_by("ref_id"))


# -- a crossmatch stage with `catalog: {kind: cds}` against the emulator ---------------------

_COLUMNS = (
    "{id: source_id, mags: {G: phot_g_mean_mag, bp_rp: bp_rp}, pmra: pmra, pmdec: pmdec,"
    " epoch: ref_epoch}"
)


def _xmatch_spec(tmp_path, name: str, lake, catalog_yaml: str) -> object:
    from tests.archives.test_ztf import _sim_yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: xm\nlake: {lake}\narchive: {_sim_yaml()}\n"
        "stages:\n"
        "  exposures: {kind: exposures, where: {ra: 150.0, dec: 2.2, radius_deg: 0.05,"
        " night: 2025-01-01}}\n"
        "  cutouts: {kind: cutouts, inputs: [exposures], size_arcsec: 240,"
        " targets: [{id: c, ra: 150.0, dec: 2.2}]}\n"
        "  sources: {kind: sources, inputs: [exposures, cutouts]}\n"
        f"  crossmatches: {{kind: crossmatch, inputs: [sources], catalog: {catalog_yaml},"
        " radius_arcsec: 1.5}\n"
    )
    return path


def test_crossmatch_stage_on_cds_catalog_matches_archive_catalog(tmp_path) -> None:
    """Every CdsParams knob is settable in `catalog: {kind: cds, ...}`; against the
    emulator (which serves the survey's own catalog as VizieR I/355/gaiadr3) the stage
    finds exactly the crossmatches that `catalog: {kind: archive}` finds."""
    import shutil

    from lakepipe.lake import Lake
    from lakepipe.runner import run_pipeline
    from tests.conftest import small_sim

    lake_a, lake_c = tmp_path / "lake_archive", tmp_path / "lake_cds"
    spec_a = _xmatch_spec(tmp_path, "a", lake_a, f"{{kind: archive, columns: {_COLUMNS}}}")
    report = run_pipeline(spec_a, workers=1)
    assert report.failed == 0
    shutil.copytree(lake_a, lake_c)  # same sources: only the crossmatch stage reruns
    with ArchiveEmulator(small_sim()) as emu:
        cds = (
            f"{{kind: cds, table: I/355/gaiadr3, vizier_url: '{emu.url}', row_limit: 200000,"
            " http: {rate_limit_per_s: 200, netrc: false, rate_limit_scope: process},"
            f" columns: {_COLUMNS}}}"
        )
        report_c = run_pipeline(_xmatch_spec(tmp_path, "c", lake_c, cds), workers=1)
        cones = [e for e in emu.log if e.path == "/viz-bin/asu-tsv"]
    assert report_c.failed == 0 and report_c.executed == 1  # the crossmatch stage alone
    assert cones and all("-out.max=200001" in e.query for e in cones)  # row_limit reached it
    assert all(e.status == 200 for e in cones)

    def rows(lake) -> list[dict]:
        t = Lake(lake).reader().read("crossmatches")
        keep = [c for c in t.column_names if c != "_healpix_29"]
        return (
            t.select(keep)
            .sort_by([("source_id", "ascending"), ("ref_id", "ascending")])
            .to_pylist()
        )

    want, got = rows(lake_a), rows(lake_c)
    assert len(want) > 20  # a real field's worth of matches
    assert got == want  # truth: the same catalog, reached over VizieR's protocol

    # the run log carries the catalogue service's traffic: one cone request per request
    # the emulator logged, and the rows its answers held
    from lakepipe.sql import LakeSQL

    logged = (
        LakeSQL(Lake(lake_c))
        .query(
            "select sum(cast(archive_stats->>'catalog_requests' as double)) as req, "
            "sum(cast(archive_stats->>'catalog_query_rows' as double)) as n "
            "from _runs where stage = 'crossmatches' and status = 'ok'"
        )
        .to_pylist()[0]
    )
    assert logged["req"] == len(cones)
    assert logged["n"] >= len(got)  # every matched reference row came from those answers


def test_cds_catalog_counts_its_traffic_and_rows(emu, survey) -> None:
    """Row counts of every CDS query reach the process's catalog traffic (run log)."""
    from lakepipe.archives.cds import CdsCatalog
    from lakepipe.catalogs import catalog_traffic
    from lakepipe.catalogs.base import Cone

    params = CdsParams(
        vizier_url=emu.url,
        http=HttpParams(rate_limit_per_s=500.0, rate_limit_scope="process", netrc=False),
    )
    cones = [Cone(150.0, 2.2, 0.01), Cone(150.02, 2.21, 0.01)]
    before = catalog_traffic()
    cat = CdsCatalog(params)
    cat.read(cones, 60676.5)
    t = cat.traffic()
    # truth: each cone is widened by 10.5"/yr x (J2025.0027 - J2016.0) and counted directly
    dt_yr = 2000.0 + (60676.5 - 51544.5) / 365.25 - 2016.0
    pad_deg = 10500.0 * dt_yr / 3.6e6
    want_rows = sum(
        len(truth_within(survey.catalog(), c.ra, c.dec, (c.radius_deg + pad_deg) * 3600.0))
        for c in cones
    )
    served = [e for e in emu.log if e.path == "/viz-bin/asu-tsv"]
    assert t["requests"] == len(served) == 2 and t["retries"] == 0
    assert t["query_rows"] == want_rows > 0
    assert t["bytes"] == sum(e.bytes for e in served) > 0
    after = catalog_traffic()
    assert {k: after[k] - before.get(k, 0) for k in t} == t
