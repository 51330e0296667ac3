"""The loopback archive emulator: real formats over real HTTP on 127.0.0.1, and faults.

The backing archive is the real virtual survey (``SimArchive``) in a small
configuration; truth is what the survey answers directly.
"""

from __future__ import annotations

import csv
import io
import math
import time

import numpy as np
import pytest
import requests
from astropy.io import fits

from lakepipe.archives.query import ExposureQuery, angular_sep_deg
from lakepipe.sim.emulator import (
    IBE_SCI_COLUMNS,
    ArchiveEmulator,
    Faults,
    filefracday,
    product_path,
)

SEARCH = "/ibe/search/ztf/products/sci"


# -- tests -----------------------------------------------------------------------------------


def _csv_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_ibe_search_real_columns_and_where(emu, survey) -> None:
    r = requests.get(emu.url + SEARCH, params={"ct": "csv"}, timeout=30)
    assert r.status_code == 200
    header = r.text.splitlines()[0].split(",")
    assert tuple(header) == IBE_SCI_COLUMNS
    rows = _csv_rows(r.text)
    truth = survey.exposures(ExposureQuery()).to_pylist()
    assert sorted(int(x["pid"]) for x in rows) == sorted(t["exposure_id"] for t in truth)
    # obsjd is the exposure start: mid-exposure MJD minus 15 s, as JD
    by_pid = {int(x["pid"]): x for x in rows}
    for t in truth:
        obsjd = float(by_pid[t["exposure_id"]]["obsjd"])
        assert obsjd == pytest.approx(t["mjd"] - 15.0 / 86400.0 + 2400000.5, abs=1e-9)
    r = requests.get(
        emu.url + SEARCH,
        params={"ct": "csv", "WHERE": "filtercode IN ('zg') AND obsjd < 2460677.5"},
        timeout=30,
    )
    got = sorted(int(x["pid"]) for x in _csv_rows(r.text))
    # JD 2460677.5 = 2025-01-02 00:00 UTC: the first night's g-band exposures
    want = sorted(
        t["exposure_id"]
        for t in truth
        if t["filter"] == "zg" and t["mjd"] - 15.0 / 86400 + 2400000.5 < 2460677.5
    )
    assert got == want and len(got) == 2


def test_ibe_pos_size_overlaps(emu, survey) -> None:
    # a 10"-wide box at the survey centre, where the two fields overlap
    r = requests.get(
        emu.url + SEARCH,
        params={"POS": "150.0,2.2", "SIZE": "0.003", "INTERSECT": "OVERLAPS", "ct": "csv"},
        timeout=30,
    )
    rows = _csv_rows(r.text)
    truth = survey.exposures(ExposureQuery(ra=150.0, dec=2.2, radius_deg=0.0015))
    assert sorted(int(x["pid"]) for x in rows) == sorted(truth.column("exposure_id").to_pylist())
    far = requests.get(
        emu.url + SEARCH, params={"POS": "10.0,-40.0", "SIZE": "0.1", "ct": "csv"}, timeout=5
    )
    assert far.text.strip() == ",".join(IBE_SCI_COLUMNS)  # header only


def test_bad_where_is_400(emu) -> None:
    r = requests.get(emu.url + SEARCH, params={"WHERE": "nonsense ((", "ct": "csv"}, timeout=30)
    assert r.status_code == 400


def test_product_full_image_and_range(emu, survey) -> None:
    meta = _csv_rows(requests.get(emu.url + SEARCH, params={"ct": "csv"}, timeout=30).text)
    row = meta[0]
    path = product_path(row)
    assert path.startswith(f"/ibe/data/ztf/products/sci/{row['filefracday'][:4]}/")
    r = requests.get(emu.url + path, timeout=30)
    assert r.status_code == 200
    assert r.content == survey.image_fits(int(row["pid"]))  # truth: the sim's bytes
    part = requests.get(emu.url + path, headers={"Range": "bytes=100-2979"}, timeout=30)
    assert part.status_code == 206 and part.content == r.content[100:2980]
    assert part.headers["Content-Range"] == f"bytes 100-2979/{len(r.content)}"
    assert requests.get(emu.url + path.replace("_q", "_qq"), timeout=30).status_code == 404


def test_cutout_same_pixels_and_off_image(emu, survey) -> None:
    row = _csv_rows(requests.get(emu.url + SEARCH, params={"ct": "csv"}, timeout=30).text)[0]
    path = product_path(row)
    eid = int(row["pid"])
    ra, dec = float(row["ra"]), float(row["dec"])
    params = {"center": f"{ra},{dec}", "size": "20arcsec", "gzip": "false"}
    r = requests.get(emu.url + path, params=params, timeout=30)
    assert r.status_code == 200
    with fits.open(io.BytesIO(r.content)) as hdul:
        got = hdul[0].data
    _, want, status = survey.cutout(eid, ra, dec, 20.0)
    assert status == "ok" and np.array_equal(got, want)  # truth: the sim's pixels
    off = requests.get(emu.url + path, params={**params, "center": "160,10"}, timeout=30)
    assert off.status_code == 400  # IBE: cutout does not intersect the image


def test_filefracday_rule() -> None:
    # 2025-01-03 06:00:00 UTC = JD 2460678.75: fraction 0.25 of the day
    assert filefracday(2460678.75) == "20250103250000"


def test_vizier_cone_and_overflow(emu, survey) -> None:
    cat = survey.catalog()
    params = {
        "-source": "I/355/gaiadr3",
        "-c": "150.0 +2.2",
        "-c.rs": "60",
        "-out": "Source,RA_ICRS,DE_ICRS,pmRA,pmDE,Gmag,BP-RP,_r",
        "-out.max": "1000",
    }
    r = requests.get(emu.url + "/viz-bin/asu-tsv", params=params, timeout=30)
    lines = [ln for ln in r.text.splitlines() if ln and not ln.startswith("#")]
    names = lines[0].split("\t")
    assert names == ["Source", "RA_ICRS", "DE_ICRS", "pmRA", "pmDE", "Gmag", "BP-RP", "_r"]
    data = [dict(zip(names, ln.split("\t"), strict=True)) for ln in lines[3:]]
    sep = angular_sep_deg(cat.column("ra").to_numpy(), cat.column("dec").to_numpy(), 150.0, 2.2)
    truth = set(np.asarray(cat.column("source_id"))[sep * 3600 <= 60])
    assert {int(d["Source"]) for d in data} == truth and len(truth) > 3
    assert "OVERFLOW" not in r.text
    small = requests.get(
        emu.url + "/viz-bin/asu-tsv", params={**params, "-out.max": "2"}, timeout=5
    )
    assert "QUERY_STATUS=OVERFLOW" in small.text


def test_xmatch_sync(emu, survey) -> None:
    cat = survey.catalog().slice(0, 5)
    up = "id,ra,dec\n" + "".join(
        f"{i},{ra + 0.5 / 3600},{dec}\n"
        for i, (ra, dec) in enumerate(
            zip(cat["ra"].to_pylist(), cat["dec"].to_pylist(), strict=True)
        )
    )
    r = requests.post(
        emu.url + "/xmatch/api/v1/sync",
        data={
            "request": "xmatch",
            "distMaxArcsec": "1.0",
            "RESPONSEFORMAT": "csv",
            "colRA1": "ra",
            "colDec1": "dec",
            "cat2": "vizier:I/355/gaiadr3",
        },
        files={"cat1": ("cat1.csv", up.encode(), "text/csv")},
        timeout=30,
    )
    assert r.status_code == 200
    rows = _csv_rows(r.text)
    assert list(rows[0])[:4] == ["angDist", "id", "ra", "dec"]
    own = {
        int(x["id"]): x for x in rows if int(x["Source"]) == cat["source_id"][int(x["id"])].as_py()
    }
    assert sorted(own) == [0, 1, 2, 3, 4]  # every shifted star finds itself
    for x in own.values():
        assert float(x["angDist"]) == pytest.approx(
            0.5 * math.cos(math.radians(float(x["dec"]))), abs=1e-3
        )


def test_faults_are_seeded_and_logged(survey) -> None:
    faults = Faults(seed=3, error_503_prob=0.3, burst_503_len=2, retry_after_s=2)
    statuses = []
    for _ in range(2):
        with ArchiveEmulator(survey, faults=faults) as e:
            for _ in range(20):
                requests.get(e.url + SEARCH, params={"ct": "csv"}, timeout=30)
            statuses.append([x.status for x in e.log])
            r503 = next(x for x in e.log if x.status == 503)
            assert r503.fault == "status" and r503.path == SEARCH
    assert statuses[0] == statuses[1]  # same seed, same faults
    assert 0 < statuses[0].count(503) < 20
    # bursts: every 503 run has even length 2 (or is cut off at the end)
    runs, n = [], 0
    for s in [*statuses[0], 200]:
        if s == 503:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    assert all(k % 2 == 0 for k in runs[:-1])


def test_429_retry_after_and_rate_cap(survey) -> None:
    with ArchiveEmulator(survey, faults=Faults(max_rate_per_s=3, retry_after_s=7)) as e:
        got = [requests.get(e.url + SEARCH, params={"ct": "csv"}, timeout=30) for _ in range(6)]
        assert [g.status_code for g in got][:4] == [200] * 4
        limited = [g for g in got if g.status_code == 429]
        assert limited and limited[0].headers["Retry-After"] == "7"
        assert e.requests_per_window(1.0) == 6


def test_drop_truncate_corrupt(survey) -> None:
    meta_path = None
    for faults, check in (
        (Faults(drop_prob=1.0), "drop"),
        (Faults(truncate_prob=1.0), "truncate"),
        (Faults(corrupt_prob=1.0), "corrupt"),
    ):
        with ArchiveEmulator(survey, faults=faults) as e:
            if meta_path is None:
                text = requests.get(e.url + SEARCH, params={"ct": "csv"}, timeout=30)
                meta_path = product_path(_csv_rows(text.text)[0]) if text.ok else None
            full = (
                survey.image_fits(int(meta_path.split("_c0")[0][-1:] or 0) or 0) if False else None
            )
            del full
            if check == "drop":
                with pytest.raises(requests.exceptions.ChunkedEncodingError):
                    requests.get(e.url + meta_path, timeout=30).content  # noqa: B018
            else:
                r = requests.get(e.url + meta_path, timeout=30)
                assert r.status_code == 200
                if check == "truncate":
                    assert len(r.content) % 2880 == 0
                    assert int(r.headers["Content-Length"]) == len(r.content)
                else:
                    assert r.content.startswith(b"CORRUPT!")
            assert e.log[-1].fault == check


def test_latency(survey) -> None:
    with ArchiveEmulator(survey, faults=Faults(latency_s=0.2)) as e:
        t0 = time.perf_counter()
        requests.get(e.url + SEARCH, params={"ct": "csv"}, timeout=30)
        assert time.perf_counter() - t0 >= 0.2


def test_serve_runs_until_stopped(survey) -> None:
    import threading

    from lakepipe.sim.emulator import serve

    stop, started = threading.Event(), []
    thread = threading.Thread(
        target=serve,
        args=(survey, "127.0.0.1", 0, Faults()),
        kwargs={"ready": started.append, "stop": stop},
        daemon=True,
    )
    thread.start()
    for _ in range(100):
        if started:
            break
        time.sleep(0.02)
    r = requests.get(started[0].url + SEARCH, params={"ct": "csv", "WHERE": "1=0"}, timeout=30)
    assert r.status_code == 200 and r.text.strip() == ",".join(IBE_SCI_COLUMNS)
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive() and [e.status for e in started[0].log] == [200]


def test_ibe_columns_are_irsas_sci_table() -> None:
    """IRSA's ztf/products/sci metadata (ztf_metadata.html) has no zeropoint column;
    the client takes MAGZP from the image header instead."""
    assert "magzp" not in IBE_SCI_COLUMNS
    assert IBE_SCI_COLUMNS[:10] == (
        "ra", "dec", "infobits", "field", "ccdid", "qid", "rcid", "fid", "filtercode", "pid",
    )  # fmt: skip


def test_unknown_fault_lists_the_faults() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        Faults(**{"error_503_prb": 0.2})
    msg = str(err.value)
    assert "unknown fault 'error_503_prb'" in msg and "Did you mean 'error_503_prob'?" in msg
    assert "Available: seed, error_503_prob," in msg and "down" in msg


def test_log_records_user_never_password_and_log_file(survey, tmp_path) -> None:
    import json

    log_file = tmp_path / "requests.jsonl"
    with ArchiveEmulator(survey, log_file=log_file) as e:
        requests.get(e.url + SEARCH, params={"ct": "csv", "WHERE": "1=0"}, timeout=30)
        requests.get(e.url + "/nowhere", auth=("irsa-user", "pw-xyz"), timeout=30)
    assert [(x.path, x.status, x.user) for x in e.log] == [
        (SEARCH, 200, None),
        ("/nowhere", 404, "irsa-user"),
    ]
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [x.to_dict() for x in e.log] == lines  # the file holds the same records
    assert {"t", "time", "method", "path", "status", "fault"} <= set(lines[0])
    assert lines[0]["time"].startswith("20") and "pw-xyz" not in log_file.read_text()
