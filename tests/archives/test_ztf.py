"""The ZTF IBE client against the loopback emulator (real HTTP on 127.0.0.1).

Truth is the backing survey archive itself: the client must return the same exposures
and the same pixels as asking the survey directly.
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from astropy.io import fits

from lakepipe.archives.http import HttpParams
from lakepipe.archives.query import ExposureQuery
from lakepipe.archives.sim import SimArchive
from lakepipe.archives.ztf import (
    ZtfArchive,
    exposures_from_ibe,
    parse_header_bytes,
    product_url,
    read_ibe_csv,
    search_params,
)
from lakepipe.errors import ArchiveError
from lakepipe.sim.emulator import ArchiveEmulator, Faults
from tests.conftest import small_sim

WHERE = ExposureQuery(ra=150.02, dec=2.2, radius_deg=0.05, start="2025-01-01", end="2025-01-02")


def http_params(tmp_path=None, **kw: object) -> HttpParams:
    base = {
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "retry_after_max_s": 0.05,
        "rate_limit_per_s": 500.0,
        "rate_limit_scope": "process",
        "netrc": False,
        "cache_dir": str(tmp_path) if tmp_path else None,
    }
    base.update(kw)
    return HttpParams(**base)


def archive(url: str, tmp_path=None, **kw: object) -> ZtfArchive:
    return ZtfArchive(ZtfArchive.Params(base_url=url, http=http_params(tmp_path, **kw)))


def test_product_url_follows_irsa_rule() -> None:
    row = {
        "filefracday": "20180528209502",
        "field": 726,
        "filtercode": "zr",
        "ccdid": 4,
        "imgtypecode": "o",
        "qid": 3,
    }
    assert product_url("https://irsa.ipac.caltech.edu", row) == (
        "https://irsa.ipac.caltech.edu/ibe/data/ztf/products/sci/2018/0528/209502/"
        "ztf_20180528209502_000726_zr_c04_o_q3_sciimg.fits"
    )


def test_search_params_are_a_dict_with_ibe_names() -> None:
    q = ExposureQuery(
        ra=150.0, dec=2.2, radius_deg=0.5, start=60678.0, end=60680.0, filters=["zg", "zr"]
    )
    p = search_params(q)
    assert p["ct"] == "csv" and p["INTERSECT"] == "OVERLAPS"
    assert p["POS"] == "150.00000000,2.20000000"
    width, height = (float(v) for v in p["SIZE"].split(","))
    assert height == 1.0 and 1.0 < width < 1.01  # widened by 1/cos(2.7 deg)
    # obsjd window: MJD range as JD, one hour of margin (obsjd is the exposure start)
    assert p["WHERE"] == (
        "obsjd >= 2460678.458333 AND obsjd <= 2460680.541667 AND filtercode IN ('zg', 'zr')"
    )
    with pytest.raises(ValueError):
        search_params(ExposureQuery(filters=["g' OR 1=1 --"]))


def test_exposures_match_the_survey(emu, survey) -> None:
    got = archive(emu.url).exposures(WHERE)
    want = survey.exposures(WHERE)
    assert got.num_rows == want.num_rows > 0
    got = got.sort_by("exposure_id").to_pylist()
    want = want.sort_by("exposure_id").to_pylist()
    for g, w in zip(got, want, strict=True):
        assert g["archive"] == "ztf" and g["image_uri"].startswith(emu.url + "/ibe/data/ztf/")
        for k, v in w.items():
            if k in ("archive", "image_uri"):
                continue
            if k == "mjd":  # JD text round trip: ~40 us of float resolution at JD 2.46e6
                assert g[k] == pytest.approx(v, abs=1e-8)
            elif k == "sky_adu":  # from the header's SKYLEV card, written to 1e-4 ADU
                assert g[k] == pytest.approx(v, abs=6e-5)
            elif k == "zeropoint_mag":  # IBE has none: the MAGZP card, written to 1e-5 mag
                assert g[k] == pytest.approx(v, abs=5.1e-6)
            elif isinstance(v, float):
                assert g[k] == pytest.approx(v, rel=1e-12), k
            else:
                assert g[k] == v, k


def test_nights_and_filters(emu, survey) -> None:
    ztf = archive(emu.url)
    assert ztf.nights(ExposureQuery()) == survey.nights(None) == ["2025-01-01", "2025-01-02"]
    zr = ztf.exposures(ExposureQuery(filters=["zr"]))
    assert set(zr.column("filter").to_pylist()) == {"zr"}
    assert zr.num_rows == survey.exposures(ExposureQuery(filters=["zr"])).num_rows == 4
    assert ztf.exposures(ExposureQuery(ra=10.0, dec=-40.0, radius_deg=0.1)).num_rows == 0


def test_image_and_cutout_pixels(emu, survey, tmp_path) -> None:
    ztf = archive(emu.url, tmp_path)
    row = survey.exposures(ExposureQuery()).to_pylist()[0]
    eid = row["exposure_id"]
    assert ztf.image_fits(eid) == survey.image_fits(eid)  # byte-identical
    _, data, status = ztf.cutout(eid, row["ra"], row["dec"], 20.0)
    _, want, want_status = survey.cutout(eid, row["ra"], row["dec"], 20.0)
    assert (status, want_status) == ("ok", "ok") and np.array_equal(data, want)
    # at the image corner: the square crosses the edge → partial, same pixels (NaN outside)
    _, data, status = ztf.cutout(eid, row["ra1"], row["dec1"], 20.0)
    _, want, want_status = survey.cutout(eid, row["ra1"], row["dec1"], 20.0)
    assert status == want_status == "partial"
    assert np.array_equal(data, want, equal_nan=True) and np.isnan(data).any()
    assert ztf.cutout(eid, 160.0, 10.0, 20.0) == (None, None, "off_chip")
    assert ztf.cutout_fits(eid, 160.0, 10.0, 20.0) == (None, "off_chip")
    blob, status = ztf.cutout_fits(eid, row["ra"], row["dec"], 20.0)
    assert status == "ok" and blob.startswith(b"SIMPLE  =")
    assert survey.cutout(eid, 160.0, 10.0, 20.0)[2] == "off_chip"


def test_unknown_exposure_is_looked_up_by_pid(emu, survey) -> None:
    eid = survey.exposures(ExposureQuery()).column("exposure_id")[3].as_py()
    fresh = archive(emu.url)  # has not searched: finds the image with WHERE pid = ...
    assert fresh.image_url(eid).endswith("_sciimg.fits")
    assert any("pid" in e.query for e in emu.log)
    with pytest.raises(ArchiveError, match="no ZTF science image with pid 42"):
        fresh.image_url(42)


def test_header_columns_come_from_a_range_request(emu, survey) -> None:
    ztf = archive(emu.url)
    ztf.exposures(ExposureQuery(night="2025-01-01"))
    ranged = [e for e in emu.log if e.range]
    assert len(ranged) == 4 and all(e.status == 206 for e in ranged)
    assert all(e.range == "bytes=0-34559" for e in ranged)  # 12 FITS blocks


def test_parse_header_bytes(survey) -> None:
    eid = survey.exposures(ExposureQuery()).column("exposure_id")[0].as_py()
    blob = survey.image_fits(eid)
    hdr = parse_header_bytes(blob[: 2880 * 12])
    assert hdr["GAIN"] == 6.2 and hdr["NAXIS1"] == 256 and hdr["SKYLEV"] > 0
    long = fits.Header([(f"K{i:05d}", i) for i in range(60)])  # 61 cards: two blocks
    raw = fits.PrimaryHDU(np.zeros((2, 2), np.float32), header=long)
    buf = io.BytesIO()
    raw.writeto(buf)
    assert parse_header_bytes(buf.getvalue()[:2880]) is None  # END is in block two
    assert parse_header_bytes(buf.getvalue()[:5760])["K00059"] == 59


def test_read_ibe_csv_rejects_garbage() -> None:
    assert read_ibe_csv(b"").num_rows == 0
    t = read_ibe_csv(b"pid,filefracday,obsjd\n1,20250103100000,2460678.5\n")
    assert t.column("filefracday").to_pylist() == ["20250103100000"]
    assert exposures_from_ibe(
        read_ibe_csv(
            b"pid,filefracday,obsjd,exptime,field,ccdid,qid,filtercode,imgtypecode,ra,dec\n"
            b"7,20250103100000,2460678.5,30,600,1,2,zg,o,150,2\n"
        ),
        "http://x",
    ).column("mjd").to_pylist() == [pytest.approx(60678.0 + 15 / 86400, abs=1e-9)]


def test_faults_every_cutout_valid_rate_respected(survey, tmp_path) -> None:
    faults = Faults(
        seed=11,
        error_503_prob=0.2,
        truncate_prob=0.05,
        drop_prob=0.05,
        error_429_prob=0.05,
        burst_429_len=3,
        retry_after_s=0,
    )
    with ArchiveEmulator(survey, faults=faults) as e:
        ztf = archive(e.url, tmp_path, rate_limit_per_s=40.0, max_retries=12)
        exps = ztf.exposures(WHERE)
        assert exps.num_rows == survey.exposures(WHERE).num_rows
        for r in exps.to_pylist():
            eid = r["exposure_id"]
            _, data, status = ztf.cutout(eid, r["ra"], r["dec"], 30.0)
            _, want, want_status = survey.cutout(eid, r["ra"], r["dec"], 30.0)
            assert status == want_status == "ok" and np.array_equal(data, want)
        faults_seen = {x.fault for x in e.log}
        assert {"status", "truncate"} <= faults_seen or {"status", "drop"} <= faults_seen
        # truth: 40 req/s with burst 1 → at most 41 arrivals in any 1 s window, plus the
        # server's timestamp jitter (up to ~60 ms on a busy machine: 2 more)
        assert e.requests_per_window(1.0) <= 43
        assert ztf.http.stats.retries > 0


def test_archive_down_is_a_clear_error(survey) -> None:
    down = Faults(down=True, retry_after_s=0)
    with ArchiveEmulator(survey, faults=down) as e, pytest.raises(ArchiveError) as err:
        archive(e.url, max_retries=2).exposures(WHERE)
    assert err.value.status == 503 and err.value.attempts == 3
    assert "/ibe/search/ztf/products/sci?" in str(err.value)


def test_down_archive_fails_fast_then_recovers(survey, tmp_path) -> None:
    """A dead archive costs ``breaker_after`` requests' retries, not every cutout's: the
    circuit breaker fails the rest at once, and lets requests through again once the
    archive is back and the cool-down has passed."""
    rows = survey.exposures(ExposureQuery()).to_pylist()
    cool_s, after, retries = 0.5, 3, 2
    with ArchiveEmulator(survey, faults=Faults(retry_after_s=0)) as e:
        ztf = archive(
            e.url, tmp_path, max_retries=retries, breaker_after=after, breaker_cooldown_s=cool_s
        )
        ztf.remember(ztf.exposures(ExposureQuery()))  # image URLs known: no search needed
        before = len(e.log)
        e.faults.down = True
        errors = []
        for r in rows:  # 8 exposures x 5 positions: 40 cutouts against a dead archive
            for k in range(5):
                with pytest.raises(ArchiveError) as err:
                    ztf.cutout(r["exposure_id"], r["ra"] + 0.001 * k, r["dec"], 20.0)
                errors.append(str(err.value))
        assert len(errors) == 5 * len(rows) == 40
        # truth from the emulator's log: only the first `after` cutouts reached it, each
        # with all its attempts; the other 37 were never sent
        sent = e.log[before:]
        assert len(sent) == after * (retries + 1) and {x.status for x in sent} == {503}
        assert all("HTTP 503" in m and "appears down" not in m for m in errors[:after])
        assert all("appears down" in m for m in errors[after:])
        assert "/ibe/data/ztf/products/sci/" in errors[-1] and "Rerun later" in errors[-1]
        assert ztf.stats()["failed_fast"] == 40 - after
        # the archive is back: within the cool-down requests still fail at once, after it
        # one trial goes through, succeeds, and every request is served again
        e.faults.down = False
        r = rows[0]
        with pytest.raises(ArchiveError, match="appears down"):
            ztf.cutout(r["exposure_id"], r["ra"], r["dec"], 20.0)
        time.sleep(cool_s)
        for r in rows[:3]:
            _, data, status = ztf.cutout(r["exposure_id"], r["ra"], r["dec"], 20.0)
            _, want, want_status = survey.cutout(r["exposure_id"], r["ra"], r["dec"], 20.0)
            assert status == want_status and np.array_equal(data, want)
        assert len(e.log) == before + len(sent) + 3


def test_killed_download_resumes_by_range(survey, tmp_path) -> None:
    eid = survey.exposures(ExposureQuery()).column("exposure_id")[0].as_py()
    with ArchiveEmulator(survey, faults=Faults(seed=1, drop_prob=1.0)) as e:
        ztf = archive(e.url, tmp_path, max_retries=0)
        with pytest.raises(ArchiveError):
            ztf.image_fits(eid)  # dropped mid-body: a .part file is left behind
        parts = list(tmp_path.rglob("*.part"))
        assert len(parts) == 1 and 0 < parts[0].stat().st_size < len(survey.image_fits(eid))
        have = parts[0].stat().st_size
    with ArchiveEmulator(survey) as e2:
        ztf = archive(e2.url, tmp_path)
        # a new emulator port is a new URL: reuse the old cache key by resuming explicitly
        url = ztf.image_url(eid)
        dest = parts[0].with_name(parts[0].name.removesuffix(".part"))
        ztf.http.download(url, dest)
        assert dest.read_bytes() == survey.image_fits(eid)
        ranges = [x.range for x in e2.log if x.range]
        assert ranges == [f"bytes={have}-"]


# -- end to end: the same pipeline on archive sim and on archive ztf via the emulator -----

SIM_CONFIG = {  # the configuration of small_sim(), for the spec's `archive: {kind: sim}`
    "naxis1": 256,
    "naxis2": 256,
    "n_nights": 2,
    "n_fields": 2,
    "visits_per_night": 2,
    "filters": ["zg", "zr"],
    "n_stars": 3000,
    "defects": False,
}


def _spec(tmp_path, name: str, archive_yaml: str) -> object:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\n"
        f"lake: {tmp_path / ('lake_' + name)}\n"
        f"archive: {archive_yaml}\n"
        "stages:\n"
        "  exposures: {kind: exposures, where: {ra: 150.0, dec: 2.2, radius_deg: 0.1}}\n"
        "  cutouts: {kind: cutouts, inputs: [exposures], size_arcsec: 40,"
        " targets: [{id: a, ra: 150.0, dec: 2.2}, {id: b, ra: 149.97, dec: 2.21}]}\n"
    )
    return path


def test_sim_config_is_small_sim() -> None:
    assert SimArchive.Params(**SIM_CONFIG) == small_sim().params


def _sim_yaml() -> str:
    return (
        "{kind: sim, "
        + ", ".join(
            f"{k}: {v}" if not isinstance(v, list) else f"{k}: [{', '.join(v)}]"
            for k, v in SIM_CONFIG.items()
        )
        + "}"
    )


def _ztf_yaml(url: str, cache, rate: float = 200.0, retries: int = 10) -> str:
    return (
        f"{{kind: ztf, base_url: '{url}', http: {{rate_limit_per_s: {rate}, "
        f"backoff_base_s: 0.01, backoff_max_s: 0.05, retry_after_max_s: 0.05, "
        f"max_retries: {retries}, netrc: false, cache_dir: '{cache}'}}}}"
    )


def _tables(lake_root) -> tuple[list[dict], list[dict]]:
    from lakepipe.lake import Lake

    reader = Lake(lake_root).reader()
    exps = reader.read("exposures").sort_by("exposure_id").to_pylist()
    cuts = reader.read("cutouts").sort_by(
        [("exposure_id", "ascending"), ("target_id", "ascending")]
    )
    return exps, cuts.to_pylist()


def _pixels(lake_root, rel: str) -> np.ndarray:
    with fits.open(lake_root / rel) as hdul:
        return np.array(hdul[0].data)


def test_pipeline_on_ztf_emulator_matches_sim(tmp_path) -> None:
    """Issue 7 items 5-6: same rows and pixels as archive sim, through faults; a rerun
    fetches nothing; an archive outage fails the new partitions and loses nothing."""
    from lakepipe.lake import Lake
    from lakepipe.runner import run_pipeline

    sim_report = run_pipeline(_spec(tmp_path, "viasim", _sim_yaml()), workers=1)
    assert sim_report.failed == 0
    faults = Faults(
        seed=4,
        error_503_prob=0.2,
        truncate_prob=0.25,
        drop_prob=0.1,
        error_429_prob=0.03,
        burst_429_len=3,
        retry_after_s=0,
    )
    with ArchiveEmulator(small_sim(), faults=faults) as emu:
        spec = _spec(tmp_path, "viaztf", _ztf_yaml(emu.url, tmp_path / "cache", rate=25.0))
        ztf_report = run_pipeline(spec, workers=1)
        assert ztf_report.failed == 0
        seen = {e.fault for e in emu.log}
        assert "status" in seen and seen & {"truncate", "drop"}  # faults did happen
        # truth: 25 req/s with burst 1 → at most 26 arrivals in any 1 s window, plus the
        # server's timestamp jitter (up to ~60 ms on a busy machine: 1 more)
        assert emu.requests_per_window(1.0) <= 27
        n_requests = len(emu.log)
        # the run log holds each attempt's archive traffic: query rows, requests, retries
        traffic = (
            Lake(ztf_report.lake)
            .reader()
            .sql(
                "select stage, sum(cast(archive_stats->>'requests' as int)) as requests, "
                "sum(cast(archive_stats->>'retries' as int)) as retries, "
                "sum(cast(archive_stats->>'query_rows' as int)) as query_rows "
                f"from _runs where run_id = '{ztf_report.run_id}' and status = 'ok' "
                "group by 1 order by 1"
            )
            .to_pylist()
        )
        by_stage = {t["stage"]: t for t in traffic}
        assert by_stage["exposures"]["query_rows"] >= len(_tables(ztf_report.lake)[0])
        assert sum(t["requests"] for t in traffic) <= n_requests
        assert sum(t["retries"] for t in traffic) > 0  # the injected faults were retried
        again = run_pipeline(spec, workers=1)  # rerun: nothing to do, nothing fetched
        assert again.executed == 0 and len(emu.log) == n_requests
        ztf_exps, ztf_cuts = _tables(ztf_report.lake)

        # the archive goes down, then a new cutout size needs new fetches: both nights
        # fail with the archive's error, exit code 1, and the committed cutouts survive
        emu.faults.down = True
        down = run_pipeline(spec, workers=1, overrides=["stages.cutouts.size_arcsec=50"])
        assert down.exit_code == 1 and down.failed == 2
        errors = (
            Lake(ztf_report.lake)
            .reader()
            .sql(f"select error from _runs where run_id = '{down.run_id}' and status = 'failed'")
        )
        msgs = sorted(errors.column("error").to_pylist())
        assert all("HTTP 503" in m and "/ibe/data/ztf/products/sci/" in m for m in msgs)
        # the circuit breaker (default breaker_after=3): three cutouts use up their 11
        # attempts each, every later fetch of the run fails at once without a request
        assert len(emu.log) - n_requests == 3 * (10 + 1)
        assert any("appears down" in m for m in msgs)
    assert _tables(ztf_report.lake) == (ztf_exps, ztf_cuts)

    sim_exps, sim_cuts = _tables(sim_report.lake)
    assert len(sim_exps) == len(ztf_exps) > 0
    skip = {"archive", "image_uri"}
    for s, z in zip(sim_exps, ztf_exps, strict=True):
        for k, v in s.items():
            if k in skip:
                continue
            if k == "mjd":
                assert z[k] == pytest.approx(v, abs=1e-8)
            elif k == "sky_adu":
                assert z[k] == pytest.approx(v, abs=6e-5)
            elif k == "zeropoint_mag":  # from the MAGZP header card (IBE has no zeropoint)
                assert z[k] == pytest.approx(v, abs=5.1e-6)
            else:
                assert z[k] == v, k
    assert len(sim_cuts) == len(ztf_cuts) > 0
    statuses = set()
    for s, z in zip(sim_cuts, ztf_cuts, strict=True):
        assert (s["cutout_id"], s["status"]) == (z["cutout_id"], z["status"])
        statuses.add(s["status"])
        if s["path"]:
            a, b = _pixels(sim_report.lake, s["path"]), _pixels(ztf_report.lake, z["path"])
            assert np.array_equal(a, b, equal_nan=True)  # same pixels
    assert "ok" in statuses


# -- CCD/quadrant selection, politeness of workers, credentials -------------------------------


def test_ccd_and_quadrant_ids_go_into_where(emu, survey) -> None:
    p = search_params(ExposureQuery(ccd_ids=[2, 5], quadrant_ids=[1]))
    assert p["WHERE"] == "ccdid IN (2, 5) AND qid IN (1)"
    for bad in ({"ccd_ids": [17]}, {"quadrant_ids": [0]}, {"ccd_ids": []}):
        with pytest.raises(ValueError, match=r"ZTF (ccd|quadrant)_ids are"):
            search_params(ExposureQuery(**bad))
    ztf = archive(emu.url)
    got = ztf.exposures(ExposureQuery(ccd_ids=[2]))
    # truth: the survey's own rows on CCD 2 (field 601 of the small survey)
    want = [r["exposure_id"] for r in survey.exposures(None).to_pylist() if r["ccdid"] == 2]
    assert sorted(got.column("exposure_id").to_pylist()) == sorted(want) and len(want) == 4
    assert "ccdid IN (2)" in emu.log[0].query.replace("+", " ").replace("%28", "(").replace(
        "%29", ")"
    )
    assert ztf.exposures(ExposureQuery(quadrant_ids=[2])).num_rows == 0  # all on qid 1
    assert ExposureQuery(ccd_ids=[2]).select(survey.exposures(None)).sum() == 4


def test_zeropoint_comes_from_the_image_header(emu, survey) -> None:
    """IBE's sci table has no zeropoint: MAGZP is read from the header (Range request)."""
    want = {r["exposure_id"]: r["zeropoint_mag"] for r in survey.exposures(WHERE).to_pylist()}
    got = archive(emu.url).exposures(WHERE)
    ids, values = got.column("exposure_id").to_pylist(), got.column("zeropoint_mag").to_pylist()
    zps = dict(zip(ids, values, strict=True))
    assert zps.keys() == want.keys() and len(want) > 0
    for eid, zp in want.items():
        # the sim writes MAGZP rounded to 5 decimals (lakepipe/sim/fitsio.py)
        assert zps[eid] == pytest.approx(zp, abs=5.1e-6)
    no_headers = ZtfArchive(
        ZtfArchive.Params(base_url=emu.url, header_columns=False, http=http_params())
    ).exposures(WHERE)
    assert set(no_headers.column("zeropoint_mag").to_pylist()) == {None}


def _cred_spec(tmp_path, url: str) -> object:
    path = tmp_path / "creds.yaml"
    path.write_text(
        "name: creds\n"
        f"lake: {tmp_path / 'lake'}\n"
        f"archive: {{kind: ztf, base_url: '{url}', http: {{rate_limit_per_s: 200,"
        " netrc: false, backoff_base_s: 0.01}}\n"
        "stages:\n"
        "  exposures: {kind: exposures, where: {ra: 150.0, dec: 2.2, radius_deg: 0.1}}\n"
        "  cutouts: {kind: cutouts, inputs: [exposures], size_arcsec: 40,"
        " targets: [{id: a, ra: 150.0, dec: 2.2}]}\n"
    )
    return path


def test_login_reaches_the_archive_never_the_lake_and_workers_do_not_search(
    tmp_path, monkeypatch
) -> None:
    """Issue 7: credentials are sent but never written to the lake; a worker that did not
    run the search takes image URLs from the lake's exposures rows (no search each)."""
    from lakepipe.runner import run_pipeline

    password = "pw-Zq81-never-in-the-lake"
    monkeypatch.setenv("LAKEPIPE_IRSA_USER", "irsa-user")
    monkeypatch.setenv("LAKEPIPE_IRSA_PASSWORD", password)
    with ArchiveEmulator(small_sim()) as emu:
        spec = _cred_spec(tmp_path, emu.url)
        first = run_pipeline(spec, workers=1)
        assert first.failed == 0
        n_first = len(emu.log)
        searches_first = sum(e.path.startswith("/ibe/search/") for e in emu.log)
        # a new cutout size: a fresh archive instance fetches every cutout again
        second = run_pipeline(spec, workers=1, overrides=["stages.cutouts.size_arcsec=30"])
        assert second.failed == 0 and second.executed > 0
        later = emu.log[n_first:]
    assert searches_first >= 1
    assert {e.user for e in emu.log} == {"irsa-user"}  # truth: every request carried it
    cutouts = [e for e in later if "center=" in e.query]
    assert len(cutouts) > 0
    # truth: the second run sent no metadata search at all (before: one per exposure)
    assert [e.path for e in later if e.path.startswith("/ibe/search/")] == []
    lake = tmp_path / "lake"
    files = [p for p in lake.rglob("*") if p.is_file()]
    assert len(files) > 10
    import base64

    secrets = (password.encode(), base64.b64encode(f"irsa-user:{password}".encode()))
    leaked = [str(p) for p in files for s in secrets if s in p.read_bytes()]
    assert leaked == []


def test_login_inside_base_url_is_a_spec_error(tmp_path) -> None:
    from lakepipe.errors import SpecError
    from lakepipe.spec import load_spec

    spec = _cred_spec(tmp_path, "https://eve:pw-Zq81@irsa.example.org")
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    assert "must not carry a login" in str(err.value) and "pw-Zq81" not in str(err.value)
