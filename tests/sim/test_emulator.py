"""The loopback archive emulator: real formats over real HTTP on 127.0.0.1, and faults.

The backing archive here is ``TinySurvey``, a test double of the virtual survey's
``SimArchive`` at the emulator's documented ``SurveyArchive`` boundary (``exposures``,
``image_fits``, ``cutout``, ``catalog``), with real TAN WCS headers and seeded pixels.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.wcs import WCS

from lakepipe.archives.query import ExposureQuery, night_of

PIXSCALE = 1.0  # arcsec/pix
NPIX = 128


class TinySurvey:
    """Six exposures over two nights near (150, 2.2) and 400 catalogued stars."""

    def __init__(self, seed: int = 7) -> None:
        self.seed = seed
        rng = np.random.default_rng(seed)
        rows = []
        for k in range(6):
            mjd = 60678.2 + (k // 3) + 0.01 * (k % 3)
            ccd, qid = 1 + k % 2, 1 + k % 4
            ffd = int(f"2025010{3 + k // 3}{k * 1111 + 100000:06d}")
            rows.append(
                {
                    "exposure_id": ffd * 1000 + ccd * 10 + qid,
                    "field": 600 + k % 2,
                    "ccdid": ccd,
                    "qid": qid,
                    "filter": "zg" if k % 2 == 0 else "zr",
                    "mjd": mjd,
                    "ra": 150.0 + 0.02 * (k % 3),
                    "dec": 2.2 + 0.01 * (k % 2),
                    "seeing_fwhm_arcsec": 2.0 + 0.1 * k,
                    "airmass": 1.1 + 0.05 * k,
                    "zeropoint_mag": 26.0 - 0.01 * k,
                    "mag_lim": 20.5,
                    "sky_adu": 100.0 + k,
                }
            )
        self._rows = rows
        n = 400
        self._cat = {
            "source_id": np.arange(n, dtype=np.int64) + 10**15,
            "ra": 150.0 + rng.uniform(-0.05, 0.07, n),
            "dec": 2.2 + rng.uniform(-0.05, 0.06, n),
            "pmra": rng.normal(0, 5, n),
            "pmdec": rng.normal(0, 5, n),
            "phot_g_mean_mag": rng.uniform(14, 20, n),
            "bp_rp": rng.normal(1.0, 0.4, n),
            "ref_epoch": np.full(n, 2016.0),
        }

    def _wcs(self, r: dict) -> WCS:
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [r["ra"], r["dec"]]
        w.wcs.crpix = [(NPIX + 1) / 2.0, (NPIX + 1) / 2.0]
        w.wcs.cd = [[-PIXSCALE / 3600.0, 0.0], [0.0, PIXSCALE / 3600.0]]
        return w

    def exposures(self, where: ExposureQuery) -> pa.Table:
        out = []
        for r in self._rows:
            w = self._wcs(r)
            x = np.array([0.0, NPIX - 1.0, NPIX - 1.0, 0.0])
            y = np.array([0.0, 0.0, NPIX - 1.0, NPIX - 1.0])
            cra, cdec = w.wcs_pix2world(x, y, 0)
            row = {
                "night": night_of(r["mjd"]),
                "exposure_id": r["exposure_id"],
                "archive": "sim",
                "image_uri": f"sim://{r['exposure_id']}",
                "field": r["field"],
                "ccdid": r["ccdid"],
                "qid": r["qid"],
                "filter": r["filter"],
                "mjd": r["mjd"],
                "exptime_s": 30.0,
                "seeing_fwhm_arcsec": r["seeing_fwhm_arcsec"],
                "airmass": r["airmass"],
                "sky_adu": r["sky_adu"],
                "zeropoint_mag": r["zeropoint_mag"],
                "mag_lim": r["mag_lim"],
                "gain_e_per_adu": 6.2,
                "rdnoise_e": 8.0,
                "saturate_adu": 50000.0,
                "naxis1": NPIX,
                "naxis2": NPIX,
                "pixscale_arcsec": PIXSCALE,
                "ra": r["ra"],
                "dec": r["dec"],
            }
            for i in range(4):
                row[f"ra{i + 1}"] = float(cra[i])
                row[f"dec{i + 1}"] = float(cdec[i])
            out.append(row)
        table = pa.Table.from_pylist(out)
        keep = where.matches_time(table.column("mjd").to_numpy())
        keep &= where.matches_filter(np.array(table.column("filter").to_pylist(), dtype=object))
        keep &= where.matches_field(table.column("field").to_numpy())
        rc = np.stack([table.column(f"ra{i}").to_numpy() for i in (1, 2, 3, 4)], axis=1)
        dc = np.stack([table.column(f"dec{i}").to_numpy() for i in (1, 2, 3, 4)], axis=1)
        keep &= where.overlaps(rc, dc)
        return table.filter(pa.array(keep))

    def _row(self, exposure_id: int) -> dict:
        return next(r for r in self._rows if r["exposure_id"] == int(exposure_id))

    def image(self, exposure_id: int) -> tuple[fits.Header, np.ndarray]:
        r = self._row(exposure_id)
        rng = np.random.default_rng([self.seed, exposure_id % 100000])
        data = rng.normal(r["sky_adu"], 5.0, (NPIX, NPIX)).astype(np.float32)
        hdr = self._wcs(r).to_header()
        for k, v in {
            "GAIN": 6.2,
            "RDNOISE": 8.0,
            "SATURATE": 50000.0,
            "SKYLEV": r["sky_adu"],
            "PIXSCALE": PIXSCALE,
            "MAGZP": r["zeropoint_mag"],
            "EXPTIME": 30.0,
        }.items():
            hdr[k] = v
        for i in range(60):  # a long header: more than one 2880-byte block
            hdr[f"HIST{i:04d}"] = f"card {i}"
        return hdr, data

    def image_fits(self, exposure_id: int) -> bytes:
        hdr, data = self.image(exposure_id)
        buf = io.BytesIO()
        fits.PrimaryHDU(data, header=hdr).writeto(buf)
        return buf.getvalue()

    def cutout(self, exposure_id: int, ra: float, dec: float, size_arcsec: float) -> tuple:
        hdr, data = self.image(exposure_id)
        w = WCS(hdr)
        x, y = w.wcs_world2pix(ra, dec, 0)
        half = size_arcsec / PIXSCALE / 2.0
        if x + half < 0 or y + half < 0 or x - half > NPIX - 1 or y - half > NPIX - 1:
            return None, None, "off_chip"
        size = math.ceil(size_arcsec / PIXSCALE)
        cut = Cutout2D(data, (float(x), float(y)), (size, size), wcs=w, mode="trim")
        out = cut.wcs.to_header()
        full = cut.data.shape == (size, size)
        return out, cut.data, "ok" if full else "partial"

    def catalog(self) -> pa.Table:
        return pa.table(self._cat)


# -- tests -----------------------------------------------------------------------------------

import csv as _csv  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
import requests  # noqa: E402

from lakepipe.sim.emulator import (  # noqa: E402
    IBE_SCI_COLUMNS,
    ArchiveEmulator,
    Faults,
    filefracday,
    product_path,
)

SEARCH = "/ibe/search/ztf/products/sci"


@pytest.fixture(scope="module")
def survey() -> TinySurvey:
    return TinySurvey()


@pytest.fixture
def emu(survey) -> Iterator[ArchiveEmulator]:
    with ArchiveEmulator(survey) as e:
        yield e


def _csv_rows(text: str) -> list[dict]:
    return list(_csv.DictReader(io.StringIO(text)))


def test_ibe_search_real_columns_and_where(emu, survey) -> None:
    r = requests.get(emu.url + SEARCH, params={"ct": "csv"}, timeout=5)
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
        params={"ct": "csv", "WHERE": "filtercode IN ('zg') AND obsjd < 2460679.0"},
        timeout=5,
    )
    got = sorted(int(x["pid"]) for x in _csv_rows(r.text))
    want = sorted(
        t["exposure_id"] for t in truth if t["filter"] == "zg" and t["mjd"] < 60678.5 + 0.01
    )
    assert got == want and len(got) == 2


def test_ibe_pos_size_overlaps(emu, survey) -> None:
    # a 10"-wide box at the first exposure's centre hits the three overlapping images
    r = requests.get(
        emu.url + SEARCH,
        params={"POS": "150.0,2.2", "SIZE": "0.003", "INTERSECT": "OVERLAPS", "ct": "csv"},
        timeout=5,
    )
    rows = _csv_rows(r.text)
    truth = survey.exposures(ExposureQuery(ra=150.0, dec=2.2, radius_deg=0.0015))
    assert sorted(int(x["pid"]) for x in rows) == sorted(truth.column("exposure_id").to_pylist())
    far = requests.get(
        emu.url + SEARCH, params={"POS": "10.0,-40.0", "SIZE": "0.1", "ct": "csv"}, timeout=5
    )
    assert far.text.strip() == ",".join(IBE_SCI_COLUMNS)  # header only


def test_bad_where_is_400(emu) -> None:
    r = requests.get(emu.url + SEARCH, params={"WHERE": "nonsense ((", "ct": "csv"}, timeout=5)
    assert r.status_code == 400


def test_product_full_image_and_range(emu, survey) -> None:
    meta = _csv_rows(requests.get(emu.url + SEARCH, params={"ct": "csv"}, timeout=5).text)
    row = meta[0]
    path = product_path(row)
    assert path.startswith(f"/ibe/data/ztf/products/sci/{row['filefracday'][:4]}/")
    r = requests.get(emu.url + path, timeout=5)
    assert r.status_code == 200
    assert r.content == survey.image_fits(int(row["pid"]))  # truth: the sim's bytes
    part = requests.get(emu.url + path, headers={"Range": "bytes=100-2979"}, timeout=5)
    assert part.status_code == 206 and part.content == r.content[100:2980]
    assert part.headers["Content-Range"] == f"bytes 100-2979/{len(r.content)}"
    assert requests.get(emu.url + path.replace("_q", "_qq"), timeout=5).status_code == 404


def test_cutout_same_pixels_and_off_image(emu, survey) -> None:
    row = _csv_rows(requests.get(emu.url + SEARCH, params={"ct": "csv"}, timeout=5).text)[0]
    path = product_path(row)
    eid = int(row["pid"])
    params = {"center": "150.0001,2.2001", "size": "20arcsec", "gzip": "false"}
    r = requests.get(emu.url + path, params=params, timeout=5)
    assert r.status_code == 200
    with fits.open(io.BytesIO(r.content)) as hdul:
        got = hdul[0].data
    _, want, status = survey.cutout(eid, 150.0001, 2.2001, 20.0)
    assert status == "ok" and np.array_equal(got, want)  # truth: the sim's pixels
    off = requests.get(emu.url + path, params={**params, "center": "160,10"}, timeout=5)
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
    r = requests.get(emu.url + "/viz-bin/asu-tsv", params=params, timeout=5)
    lines = [ln for ln in r.text.splitlines() if ln and not ln.startswith("#")]
    names = lines[0].split("\t")
    assert names == ["Source", "RA_ICRS", "DE_ICRS", "pmRA", "pmDE", "Gmag", "BP-RP", "_r"]
    data = [dict(zip(names, ln.split("\t"), strict=True)) for ln in lines[3:]]
    from lakepipe.archives.query import angular_sep_deg

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
        timeout=10,
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
                requests.get(e.url + SEARCH, params={"ct": "csv"}, timeout=5)
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
        got = [requests.get(e.url + SEARCH, params={"ct": "csv"}, timeout=5) for _ in range(6)]
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
                text = requests.get(e.url + SEARCH, params={"ct": "csv"}, timeout=5)
                meta_path = product_path(_csv_rows(text.text)[0]) if text.ok else None
            full = (
                survey.image_fits(int(meta_path.split("_c0")[0][-1:] or 0) or 0) if False else None
            )
            del full
            if check == "drop":
                with pytest.raises(requests.exceptions.ChunkedEncodingError):
                    requests.get(e.url + meta_path, timeout=5).content  # noqa: B018
            else:
                r = requests.get(e.url + meta_path, timeout=5)
                assert r.status_code == 200
                if check == "truncate":
                    assert len(r.content) % 2880 == 0
                    assert int(r.headers["Content-Length"]) == len(r.content)
                else:
                    assert r.content.startswith(b"CORRUPT!")
            assert e.log[-1].fault == check


def test_latency(survey) -> None:
    import time

    with ArchiveEmulator(survey, faults=Faults(latency_s=0.2)) as e:
        t0 = time.perf_counter()
        requests.get(e.url + SEARCH, params={"ct": "csv"}, timeout=5)
        assert time.perf_counter() - t0 >= 0.2
