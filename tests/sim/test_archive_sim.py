"""The ``sim`` archive end to end: exposures, FITS images, cutouts, catalog and truth."""

from __future__ import annotations

import functools
import io
import itertools
import math
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sep
from astropy.io import fits
from astropy.wcs import WCS

from lakepipe.archives.base import archives
from lakepipe.archives.query import ExposureQuery
from lakepipe.archives.sim import SimArchive
from lakepipe.astro.healpix import healpix_index
from lakepipe.errors import InputNotFoundError
from lakepipe.tables import get_contract

KNOBS = {
    "naxis1": 512,
    "naxis2": 512,
    "n_fields": 2,
    "n_nights": 3,
    "visits_per_night": 2,
    "n_stars": 400,
    "n_asteroids": 0,
}


# sparse and bright: isolated stars with SNR > 100 for flux and centroid checks
SPARSE = {"mag_bright": 13.0, "mag_faint": 19.0, "n_stars": 150}


@functools.cache
def archive(**extra: object) -> SimArchive:
    return SimArchive.from_config(**{**KNOBS, **extra})


def first_id(a: SimArchive, k: int = 0) -> int:
    return a.exposures().column("exposure_id")[k].as_py()


def test_registered_under_sim_and_params_forbid_unknown_keys():
    assert archives.get("sim") is SimArchive
    with pytest.raises(ValueError, match="n_starz"):
        SimArchive.Params(n_starz=3)


def test_exposures_match_the_contract():
    t = archive().exposures()
    contract = get_contract("exposures")
    assert t.column_names == [c for c in contract.column_names if c != "_healpix_29"]
    hp = healpix_index(np.asarray(t.column("ra")), np.asarray(t.column("dec")))
    conformed = contract.conform(t.append_column("_healpix_29", pa.array(hp, pa.int64())))
    assert conformed.num_rows == 2 * 3 * 2
    assert set(t.column("archive").to_pylist()) == {"sim"}
    eid = first_id(archive())
    assert t.column("image_uri")[0].as_py() == f"sim://{eid}"


def test_exposure_queries_select_by_region_time_filter_and_night():
    a = archive()
    every = a.exposures()
    f0 = a.sim.survey.fields[0]
    # truth: a small cone at field 0's centre overlaps only field 0's exposures
    q = ExposureQuery(ra=f0.ra, dec=f0.dec, radius_deg=0.01)
    sel = a.exposures(q)
    assert set(sel.column("field").to_pylist()) == {f0.field}
    assert sel.num_rows == every.num_rows // 2
    nights = a.nights()
    assert nights == ["2025-01-01", "2025-01-02", "2025-01-03"]
    one = a.exposures(ExposureQuery(night=nights[1]))
    assert set(one.column("night").to_pylist()) == {nights[1]}
    assert a.nights(ExposureQuery(start="2025-01-02", end="2025-01-02")) == ["2025-01-02"]
    zg = a.exposures(ExposureQuery(filters=["zg"]))
    assert set(zg.column("filter").to_pylist()) == {"zg"}
    assert a.exposures(ExposureQuery(max_rows=3)).num_rows == 3
    far = ExposureQuery(box=[10.0, 11.0, -5.0, -4.0])
    assert a.exposures(far).num_rows == 0 and a.nights(far) == []


def test_image_fits_is_byte_identical_for_a_seed_and_opens_cleanly():
    eid = first_id(archive())
    b1 = SimArchive.from_config(**KNOBS).image_fits(eid)
    b2 = SimArchive.from_config(**KNOBS).image_fits(eid)
    assert b1 == b2
    other = SimArchive.from_config(**{**KNOBS, "seed": 8})
    assert other.image_fits(first_id(other)) != b1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # astropy must open it without any warning
        with fits.open(io.BytesIO(b1)) as hdul:
            h = hdul[0].header
            data = hdul[0].data
            w = WCS(h)
    assert data.shape == (512, 512) and data.dtype.kind == "f"
    row = archive().exposures().to_pylist()[0]
    for key in (
        "DATE-OBS",
        "MJD-OBS",
        "EXPTIME",
        "FILTER",
        "MAGZP",
        "SEEING",
        "AIRMASS",
        "GAIN",
        "RDNOISE",
        "SATURATE",
    ):
        assert key in h
    assert h["MAGZP"] == pytest.approx(row["zeropoint_mag"], abs=1e-5)
    assert h["MJD-AVG"] == pytest.approx(row["mjd"], abs=1e-7)
    assert h["MJD-OBS"] == pytest.approx(row["mjd"] - 15 / 86400, abs=1e-7)
    assert h["FILTER"] == row["filter"] and h["EXPTIME"] == 30.0
    # the header WCS puts the table's centre and corners where the contract says
    ra, dec = w.all_pix2world([255.5, 0, 511], [255.5, 0, 0], 0)
    assert ra[0] == pytest.approx(row["ra"], abs=1e-9)
    assert (ra[1], dec[1]) == pytest.approx((row["ra1"], row["dec1"]), abs=1e-9)
    assert (ra[2], dec[2]) == pytest.approx((row["ra2"], row["dec2"]), abs=1e-9)


def test_images_are_cached_and_unknown_ids_raise():
    a = archive()
    eid = first_id(a)
    assert a.image(eid)[1] is a.image(eid)[1]
    with pytest.raises(InputNotFoundError, match="no exposure 42"):
        a.image(42)


def test_cutouts_are_exact_sub_arrays_with_shifted_wcs():
    a = archive()
    eid = first_id(a)
    header, data = a.image(eid)
    w = WCS(header)
    # ok: the centre pixel holds the target; the pixels are the image's
    ra, dec = w.all_pix2world([[200.2, 300.4]], 0)[0]
    ch, cd, status = a.cutout(eid, ra, dec, 60.0)
    assert status == "ok"
    n = round(60.0 / 1.01)
    assert cd.shape == (n, n)
    x0, y0 = 200 - n // 2, 300 - n // 2
    np.testing.assert_array_equal(cd, data[y0 : y0 + n, x0 : x0 + n])
    assert ch["CRPIX1"] == pytest.approx(header["CRPIX1"] - x0)
    # truth: the cutout WCS maps the target onto its pixel in cutout coordinates
    cx, cy = WCS(ch).all_world2pix([[ra, dec]], 0)[0]
    assert (cx, cy) == pytest.approx((200.2 - x0, 300.4 - y0), abs=1e-6)
    # partial: NaN off the image, exact copies on it
    ra, dec = w.all_pix2world([[3.0, 500.0]], 0)[0]
    _ph, pd_, status = a.cutout(eid, ra, dec, 30.0)
    assert status == "partial"
    m = round(30 / 1.01) // 2
    x0, y0 = 3 - m, 500 - m
    sub = pd_[: 512 - y0, -x0:]
    np.testing.assert_array_equal(sub, data[y0:, : sub.shape[1]])
    assert np.isnan(pd_[:, :-x0]).all()
    # off chip: no pixels
    ra, dec = w.all_pix2world([[-40.0, 100.0]], 0)[0]
    _oh, od, status = a.cutout(eid, ra, dec, 30.0)
    assert status == "off_chip" and od is None
    blob, status = a.cutout_fits(eid, *w.all_pix2world([[100.0, 100.0]], 0)[0], 20.0)
    assert status == "ok" and fits.getdata(io.BytesIO(blob)).shape == (20, 20)


def _isolated_bright_stars(truth: pa.Table, header: fits.Header, border: int = 20) -> list[dict]:
    rows = truth.to_pylist()
    pts = [r for r in rows if r["kind"] in ("star", "variable", "appeared", "transient")]
    xy = np.array([[r["x_pix"], r["y_pix"]] for r in pts])
    defects = [r for r in rows if r["kind"] in ("cosmic_ray", "hot_pixel")]
    dxy = np.array([[r["x_pix"], r["y_pix"]] for r in defects]) if defects else np.empty((0, 2))
    out = []
    for i, r in enumerate(pts):
        d = np.hypot(*(xy - xy[i]).T)
        d[i] = np.inf
        dd = np.hypot(*(dxy - xy[i]).T) if len(dxy) else np.array([np.inf])
        flux_nb = np.array([p["flux_adu"] for p in pts])[d < 25]
        ok = border < r["x_pix"] < header["NAXIS1"] - border
        ok = ok and border < r["y_pix"] < header["NAXIS2"] - border
        ok = ok and not r["saturated"] and (flux_nb < 0.01 * r["flux_adu"]).all()
        ok = ok and dd.min() > 25
        if ok:
            out.append(r)
    return out


def test_large_aperture_flux_matches_injected_flux():
    a = archive(**SPARSE)
    eid = first_id(a, 1)
    header, data = a.image(eid)
    truth = a.truth(eid)
    bad_col = truth.filter(pa.compute.equal(truth.column("kind"), "bad_column"))["x_pix"][0].as_py()
    stars = [s for s in _isolated_bright_stars(truth, header) if abs(s["x_pix"] - bad_col) > 20]
    assert stars, "no isolated star in the test image"
    star = max(stars, key=lambda r: r["flux_adu"])
    sky, gain, rn = header["SKYLEV"], header["GAIN"], header["RDNOISE"]
    r_ap = 8.0 * header["FWHMPIX"] / 2.3548  # 8 sigma: all but 1e-14 of a Gaussian
    yy, xx = np.mgrid[0 : data.shape[0], 0 : data.shape[1]]
    inside = np.hypot(xx - star["x_pix"], yy - star["y_pix"]) <= r_ap
    measured = float((data[inside] - sky).sum())
    # expected σ: Poisson of source + sky and read noise over the aperture (ADU)
    sigma = math.sqrt(star["flux_adu"] / gain + inside.sum() * (sky / gain + (rn / gain) ** 2))
    assert abs(measured - star["flux_adu"]) < 4.0 * sigma, (measured, star["flux_adu"], sigma)


def test_cutout_wcs_places_stars_on_their_rendered_pixels():
    # truth: windowed centroids (sep.winpos, unbiased for a symmetric PSF) of bright,
    # isolated stars agree with the cutout WCS's projection of their true positions
    # within 0.05 px (centroid noise ~ sigma/SNR < 0.01 px for SNR > 100)
    a = archive(**SPARSE)
    eid = first_id(a, 2)
    header, _data = a.image(eid)
    truth = a.truth(eid)
    cra, cdec = WCS(header).all_pix2world([[256.0, 256.0]], 0)[0]
    ch, cd, status = a.cutout(eid, cra, cdec, 400.0)
    assert status == "ok"
    cw = WCS(ch)
    stars = [
        s
        for s in _isolated_bright_stars(truth, header)
        if s["flux_adu"] > 5e3 and s["kind"] == "star"
    ]
    x, y = cw.all_world2pix(
        np.array([s["ra"] for s in stars]), np.array([s["dec"] for s in stars]), 0
    )
    inside = (x > 10) & (x < cd.shape[1] - 10) & (y > 10) & (y < cd.shape[0] - 10)
    assert inside.sum() >= 3
    sub = np.ascontiguousarray(cd - header["SKYLEV"], dtype=np.float64)
    sig = header["FWHMPIX"] / 2.3548
    xw, yw, flag = sep.winpos(sub, x[inside], y[inside], np.full(inside.sum(), sig))
    assert (flag == 0).all()
    err = np.hypot(xw - x[inside], yw - y[inside])
    assert err.max() < 0.05, err


def test_truth_catalog_and_flags():
    a = archive(n_vanished=6, n_appeared=6, n_stars=600)
    cat = a.catalog()
    obj = a.objects()
    kinds = np.asarray(obj.column("kind"))
    vanished = set(np.asarray(obj.column("source_id"))[kinds == "vanished"])
    appeared = set(np.asarray(obj.column("source_id"))[kinds == "appeared"])
    cat_ids = set(cat.column("source_id").to_pylist())
    assert vanished <= cat_ids and not (appeared & cat_ids)
    seen_ids: set[int] = set()
    seen_kinds: set[str] = set()
    for eid in a.exposures().column("exposure_id").to_pylist():
        t = a.truth(eid)
        seen_ids |= set(t.column("object_id").to_pylist())
        seen_kinds |= set(t.column("kind").to_pylist())
        zp = a.sim.survey.exposure(eid).zeropoint_mag
        pts = t.filter(pa.compute.is_valid(t.column("mag")))
        pts = pts.filter(pa.compute.invert(pa.compute.is_nan(pts.column("mag"))))
        np.testing.assert_allclose(
            np.asarray(pts.column("flux_adu")),
            10 ** (-0.4 * (np.asarray(pts.column("mag")) - zp)),
            rtol=1e-12,
        )
    assert not (vanished & seen_ids)
    assert appeared <= seen_ids
    assert {"star", "variable", "appeared", "cosmic_ray", "hot_pixel", "bad_column"} <= seen_kinds


def test_saturated_stars_are_clipped_and_defects_present():
    # truth: stars whose noise-free peak + sky exceeds SATURATE read exactly SATURATE at
    # their centre pixel; nothing exceeds it; the dead column reads ~0 (read noise only)
    a = archive(mag_bright=9.0, mag_faint=14.0, n_stars=40)
    n_sat = 0
    for eid in a.exposures().column("exposure_id").to_pylist():
        t = a.truth(eid)
        header, data = a.image(eid)
        assert data.max() <= header["SATURATE"]
        bad = t.filter(pa.compute.equal(t.column("kind"), "bad_column"))["object_id"][0].as_py()
        col = data[:, bad]
        assert abs(float(np.median(col))) < 3 and np.median(data) > 50
        sat = t.filter(t.column("saturated"))
        for r in sat.filter(pa.compute.equal(sat.column("kind"), "star")).to_pylist():
            j, i = round(r["y_pix"]), round(r["x_pix"])
            if 0 <= j < 512 and 0 <= i < 512 and i != bad:
                assert data[j, i] == header["SATURATE"]
                n_sat += 1
    assert n_sat >= 1


def test_write_catalog_parquet(tmp_path):
    a = archive()
    path = a.write_catalog(tmp_path / "ref" / "gaia.parquet")
    back = pq.read_table(path)
    assert back.equals(a.catalog())
    assert back.num_rows > 500


def test_cutouts_agree_with_the_generic_fits_cutout_helper():
    # truth: the shared helper every archive uses (lakepipe.astro.wcs.make_cutout) cuts
    # the same pixels with the same status from the sim's full image and header
    from lakepipe.astro.wcs import make_cutout

    a = archive()
    eid = first_id(a, 3)
    header, data = a.image(eid)
    w = WCS(header)
    for x, y, size in ((100.3, 400.8, 45.0), (2.0, 250.0, 30.0), (511.4, 511.4, 61.0)):
        ra, dec = w.all_pix2world([[x, y]], 0)[0]
        h1, d1, s1 = a.cutout(eid, ra, dec, size)
        h2, d2, s2 = make_cutout(header, data, ra, dec, size)
        assert s1 == s2
        np.testing.assert_array_equal(d1, d2)
        assert h1["CRPIX1"] == h2["CRPIX1"] and h1["CRPIX2"] == h2["CRPIX2"]
    ra, dec = w.all_pix2world([[-30.0, 5.0]], 0)[0]
    assert a.cutout(eid, ra, dec, 30.0)[2] == make_cutout(header, data, ra, dec, 30.0)[2]


def test_variables_and_transient_follow_their_lightcurves_in_the_truth():
    # truth: per exposure, a variable's magnitude is its catalog magnitude in the filter
    # plus the light-curve offset at the exposure's mjd; the transient appears after t0
    # and fades as the power law says
    from lakepipe.sim.catalog import filter_mag
    from lakepipe.sim.variables import transient_mag, variable_dmag

    a = archive(n_variables=8, n_stars=800)
    obj = {r["source_id"]: r for r in a.objects().to_pylist()}
    var = {r["source_id"]: r for r in a.variables().to_pylist()}
    tr = a.transient()
    n_var = 0
    transient_mags = []
    for eid in a.exposures()["exposure_id"].to_pylist():
        exp = a.sim.survey.exposure(eid)
        for r in a.truth(eid).to_pylist():
            if r["kind"] == "variable":
                o, v = obj[r["object_id"]], var[r["object_id"]]
                base = filter_mag(o["phot_g_mean_mag"], o["bp_rp"], exp.filter)
                dm = variable_dmag(
                    v["var_type"], v["period_d"], v["amplitude_mag"], v["epoch_mjd"], exp.mjd
                )
                assert r["mag"] == pytest.approx(float(base + dm), abs=1e-9)
                n_var += 1
            if r["kind"] == "transient":
                assert exp.mjd >= tr["t0_mjd"]
                expected = transient_mag(
                    exp.mjd, tr["t0_mjd"], tr["peak_mag"][exp.filter], tr["alpha"]
                )
                assert r["mag"] == pytest.approx(float(expected), abs=1e-9)
                transient_mags.append((exp.mjd, exp.filter, r["mag"]))
    assert n_var > 0
    assert transient_mags, "the transient never landed on an exposure"
    zr = sorted((m, mag) for m, f, mag in transient_mags if f == transient_mags[0][1])
    assert all(b[1] > a_[1] for a_, b in itertools.pairwise(zr))  # fading


def test_concurrent_image_requests_render_identically():
    # the loopback emulator calls the archive from server threads
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    a = SimArchive.from_config(**KNOBS)
    ids = a.exposures()["exposure_id"].to_pylist()[:5]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda e: (e, a.image(e)[1].copy()), ids * 3))
    fresh = SimArchive.from_config(**KNOBS)
    for eid, data in results:
        np.testing.assert_array_equal(data, fresh.image(eid)[1])
    clone = pickle.loads(pickle.dumps(a))
    np.testing.assert_array_equal(clone.image(ids[0])[1], fresh.image(ids[0])[1])


def test_fingerprint_names_the_simulation_version_and_knobs():
    from lakepipe.archives.sim import SIM_VERSION

    fp = archive().fingerprint()
    assert fp.startswith(f"sim:v{SIM_VERSION}:") and '"naxis1":512' in fp
    assert fp != SimArchive.from_config(**{**KNOBS, "seed": 8}).fingerprint()
    assert fp == SimArchive.from_config(**KNOBS).fingerprint()
