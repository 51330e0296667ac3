"""The fits_dir archive on generated multi-extension FITS files.

Truth: the generator writes known header values (DATE-OBS, EXPTIME, FILTER, GAIN), known
physical pixel values (stored as BSCALE/BZERO-scaled int16 or float32) and stars at known
sky positions rendered through each extension's own SIP or TPV WCS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from lakepipe.archives.fits_dir import FitsDirArchive, exposure_id_for, night_label
from lakepipe.archives.query import ExposureQuery, to_mjd
from lakepipe.astro import wcs as wcsu
from lakepipe.errors import InputNotFoundError, ParseError
from tests.data.fits_images import ImageSpec, Star, render, wcs_header, write_mef

START_MJD = to_mjd("2025-01-03T05:00:00")


def archive(folder: Path, **params) -> FitsDirArchive:
    return FitsDirArchive(FitsDirArchive.Params(path=str(folder), **params))


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    """One MEF: ext 1 SIP + scaled int16, ext 2 TPV float32, ext 3 a binary table."""
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    arrays = write_mef(
        d / "sub" / "a.fits",
        [
            ImageSpec(
                150.0, 2.2, distortion="sip", scaled_int16=True, stars=[Star(150.004, 2.203, 4e4)]
            ),
            ImageSpec(
                150.05, 2.2, distortion="tpv", extname="SCI2", stars=[Star(150.052, 2.196, 3e4)]
            ),
        ],
    )
    return d, arrays


def test_ingests_mef_headers_time_and_scaled_pixels(folder):
    d, arrays = folder
    a = archive(d)
    rows = sorted(a.exposures().to_pylist(), key=lambda r: r["image_uri"])
    assert [r["image_uri"].rsplit("/", 1)[1] for r in rows] == ["a.fits[1]", "a.fits[2]"]
    for r, hdu in zip(rows, (1, 2), strict=True):
        assert r["exposure_id"] == exposure_id_for("sub/a.fits", hdu)
        # DATE-OBS is the start: mid-exposure is 15 s later (EXPTIME 30 s)
        assert r["mjd"] == pytest.approx(START_MJD + 15.0 / 86400.0, abs=1e-9)
        assert r["night"] == "2025-01-03"
        assert (r["filter"], r["exptime_s"], r["gain_e_per_adu"]) == ("r", 30.0, 1.5)
        assert (r["naxis1"], r["naxis2"]) == (120, 100)
        assert r["pixscale_arcsec"] == pytest.approx(1.0, rel=1e-9)
        assert r["archive"] == "fits_dir" and r["zeropoint_mag"] is None
    # physical values survive BSCALE=0.25/BZERO=3000 int16 storage to half a quantum
    header, data = a.image(rows[0]["exposure_id"])
    assert data.dtype == np.float32
    assert np.max(np.abs(data - arrays[0])) <= 0.125 + 1e-3
    assert "BSCALE" not in fits.Header(wcsu.cutout_header(header, 0, 0))
    _h2, data2 = a.image(rows[1]["exposure_id"])
    assert np.max(np.abs(data2 - arrays[1])) < 1e-2  # float32 rounding of ~1e3 values
    assert a.nights() == ["2025-01-03"]


@pytest.mark.parametrize("ext", [1, 2])
def test_corners_and_centre_follow_the_distorted_wcs(folder, ext):
    d, _ = folder
    a = archive(d)
    r = next(r for r in a.exposures().to_pylist() if r["image_uri"].endswith(f"[{ext}]"))
    header, _data = a.image(r["exposure_id"])
    w = wcsu.celestial_wcs(header)
    x, y = wcsu.sky_to_pixel(
        w,
        np.array([r[f"ra{k}"] for k in range(1, 5)]),
        np.array([r[f"dec{k}"] for k in range(1, 5)]),
    )
    np.testing.assert_allclose(x, [0, 119, 119, 0], atol=1e-6)
    np.testing.assert_allclose(y, [0, 0, 99, 99], atol=1e-6)
    rc = np.array([r[f"ra{k}"] for k in range(1, 5)])
    dc = np.array([r[f"dec{k}"] for k in range(1, 5)])
    assert wcsu.point_in_footprint(r["ra"], r["dec"], rc, dc)


@pytest.mark.parametrize(
    "ext,star", [(1, Star(150.004, 2.203, 4e4)), (2, Star(150.052, 2.196, 3e4))]
)
def test_cutout_wcs_puts_the_star_on_its_pixels(folder, ext, star):
    d, _ = folder
    a = archive(d)
    r = next(r for r in a.exposures().to_pylist() if r["image_uri"].endswith(f"[{ext}]"))
    header, data, status = a.cutout(r["exposure_id"], star.ra, star.dec, 25.0)
    assert status == "ok" and data.shape == (25, 25)
    # the star's flux-weighted centroid (noise-free Gaussian, sky 100 subtracted)
    img = data.astype(float) - 100.0
    yy, xx = np.mgrid[0:25, 0:25]
    w = np.clip(img, 0, None)
    cx, cy = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    px, py = wcsu.sky_to_pixel(
        wcsu.celestial_wcs(header), np.array([star.ra]), np.array([star.dec])
    )
    assert abs(px[0] - cx) < 0.05 and abs(py[0] - cy) < 0.05
    # the target sits in pixel n // 2
    assert round(px[0]) == 12 and round(py[0]) == 12
    # and the cutout WCS equals the full image's WCS shifted by the origin, everywhere
    full_h, _ = a.image(r["exposure_id"])
    x0, y0 = -int(header["LTV1"]), -int(header["LTV2"])
    gx, gy = np.meshgrid(np.arange(0, 25, 4.0), np.arange(0, 25, 4.0))
    ra_c, dec_c = wcsu.pixel_to_sky(wcsu.celestial_wcs(header), gx.ravel(), gy.ravel())
    ra_f, dec_f = wcsu.pixel_to_sky(wcsu.celestial_wcs(full_h), gx.ravel() + x0, gy.ravel() + y0)
    np.testing.assert_allclose(ra_c, ra_f, atol=1e-10)
    np.testing.assert_allclose(dec_c, dec_f, atol=1e-10)


def test_cutout_status_partial_and_off_chip(folder):
    d, _ = folder
    a = archive(d)
    r = next(r for r in a.exposures().to_pylist() if r["image_uri"].endswith("[1]"))
    # corner pixel 1 is on the image: half the square hangs off the edges
    _h, data, status = a.cutout(r["exposure_id"], r["ra1"], r["dec1"], 21.0)
    assert status == "partial" and data.shape == (21, 21)
    assert np.isnan(data[:10, :]).all() and np.isnan(data[:, :10]).all()
    assert np.isfinite(data[10:, 10:]).all()
    _h, data, status = a.cutout(r["exposure_id"], r["ra"] + 0.5, r["dec"], 21.0)
    assert status == "off_chip" and data is None


def test_cone_query_selects_overlapping_extensions_only(folder):
    d, _ = folder
    a = archive(d)
    got = a.exposures(ExposureQuery(ra=150.06, dec=2.2, radius_deg=0.005)).to_pylist()
    assert [r["image_uri"][-3:] for r in got] == ["[2]"]
    assert a.exposures(ExposureQuery(filters=["g"])).num_rows == 0
    assert a.exposures(ExposureQuery(start="2025-01-04")).num_rows == 0
    assert a.exposures(ExposureQuery(max_rows=1)).num_rows == 1


@pytest.mark.parametrize(
    "primary,keywords,expected_mjd",
    [
        ({"MJD-AVG": 60678.5}, {}, 60678.5),  # mid-exposure: as is
        ({"DATE-END": "2025-01-03T05:00:40"}, {}, START_MJD + 25 / 86400),  # end - EXPTIME/2
        ({"JD": 2460678.75}, {}, 60678.25 + 15 / 86400),  # JD start
        ({"DATE-OBS": "2025-01-03", "TIME-OBS": "05:00:00"}, {}, START_MJD + 15 / 86400),
        # pre-2000 FITS dates are DD/MM/YY meaning 19YY
        ({"DATE-OBS": "03/01/98", "UT": "05:00:00"}, {}, to_mjd("1998-01-03T05:00:15")),
        # TT is 69.184 s ahead of UTC in 2025 (37 leap s + 32.184 s)
        ({"TIMESYS": "TT"}, {}, START_MJD + (15 - 69.184) / 86400),
        ({"UTSTART": "2025-01-03T06:00:00"}, {"time": "UTSTART"}, START_MJD + (3600 + 15) / 86400),
        ({"MJD-OBS": 60678.0}, {"time_refers_to": "mid", "time": "MJD-OBS"}, 60678.0),
    ],
)
def test_time_keywords(tmp_path, primary, keywords, expected_mjd):
    d = tmp_path / "t"
    d.mkdir()
    # the generator's DATE-OBS would win over DATE-END and JD: leave it out for those
    date_obs = None if {"DATE-END", "JD"} & set(primary) else "2025-01-03T05:00:00"
    write_mef(
        d / "x.fits",
        [ImageSpec(10.0, -30.0, distortion="none")],
        extra_primary=primary,
        date_obs=date_obs,
    )
    got = archive(d, keywords=keywords).exposures().column("mjd")[0].as_py()
    assert got == pytest.approx(expected_mjd, abs=2e-8)  # 2 ms


def test_keyword_overrides_and_defaults(tmp_path):
    d = tmp_path / "k"
    d.mkdir()
    write_mef(d / "x.fits", [ImageSpec(10.0, -30.0)], extra_primary={"FILT2": "i", "ZPT": 27.5})
    a = archive(
        d,
        keywords={"filter": "FILT2", "zeropoint_mag": "ZPT"},
        defaults={"rdnoise_e": 4.5, "field": 17},
    )
    r = a.exposures().to_pylist()[0]
    assert (r["filter"], r["zeropoint_mag"], r["rdnoise_e"], r["field"]) == ("i", 27.5, 4.5, 17)


def test_hdu_selection_by_name_and_index(folder):
    d, _ = folder
    assert [r["image_uri"][-3:] for r in archive(d, hdu="sci2").exposures().to_pylist()] == ["[2]"]
    assert [r["image_uri"][-3:] for r in archive(d, hdu=[1]).exposures().to_pylist()] == ["[1]"]
    with pytest.raises(ParseError, match=r"HDU 3 is not a 2-D image"):
        archive(d, hdu=3).exposures()


def test_corrupt_and_truncated_files_raise_parse_error_naming_the_file(folder):
    d, _ = folder
    good = d / "sub" / "a.fits"
    (d / "junk.fits").write_bytes(b"this is not FITS" * 200)
    with pytest.raises(ParseError, match=r"junk\.fits.*not a readable FITS file.*on_bad_file"):
        archive(d).exposures()
    assert archive(d, on_bad_file="skip").exposures().num_rows == 2
    (d / "junk.fits").unlink()
    raw = good.read_bytes()
    (d / "cut.fits").write_bytes(raw[: len(raw) - 2 * 2880 - 100])  # truncated mid-data
    with pytest.raises(ParseError, match=r"cut\.fits.*truncated"):
        archive(d).exposures()


def test_missing_time_keyword_says_how_to_fix(tmp_path):
    d = tmp_path / "nt"
    d.mkdir()
    write_mef(d / "x.fits", [ImageSpec(10.0, -30.0)])
    with fits.open(d / "x.fits", mode="update") as hdul:
        del hdul[0].header["DATE-OBS"]
    with pytest.raises(ParseError, match=r"x\.fits\[1\].*no observation time.*keywords\.time"):
        archive(d).exposures()


def test_unknown_exposure_and_missing_folder(folder, tmp_path):
    d, _ = folder
    with pytest.raises(InputNotFoundError, match="no exposure with id 12"):
        archive(d).image(12)
    with pytest.raises(InputNotFoundError, match="does not exist"):
        archive(tmp_path / "nope").exposures()


def test_fingerprint_tracks_folder_content(folder):
    d, _ = folder
    before = archive(d).fingerprint()
    assert archive(d).fingerprint() == before
    write_mef(d / "b.fits", [ImageSpec(20.0, 0.0)])
    assert archive(d).fingerprint() != before


def test_night_label_keeps_a_chilean_night_together():
    # Cerro Pachon (lon -70.7): 23:30 UTC on Jan 3 and 08:00 UTC on Jan 4 are one night
    evening, morning = to_mjd("2025-01-03T23:30:00"), to_mjd("2025-01-04T08:00:00")
    assert night_label(evening, -70.7) == night_label(morning, -70.7) == "2025-01-03"
    # Palomar (lon -116.9): UTC date, as the sim archive labels it
    t = to_mjd("2025-01-03T05:00:00")
    assert night_label(t, -116.9) == night_label(t) == "2025-01-03"


def test_tile_compressed_images(tmp_path):
    """A RICE-compressed (.fz) integer image is read losslessly, with its WCS."""
    d = tmp_path / "fz"
    d.mkdir()
    spec = ImageSpec(30.0, 45.0, distortion="sip", stars=[Star(30.002, 45.001, 2e4)])
    header = wcs_header(spec)
    data = np.round(render(spec, header)).astype(np.int32)
    hdu = fits.CompImageHDU(data=data, compression_type="RICE_1")
    for card in header.cards:
        if card.keyword not in ("NAXIS", "NAXIS1", "NAXIS2"):
            hdu.header[card.keyword] = card.value
    primary = fits.PrimaryHDU()
    primary.header["MJD-OBS"] = 60700.25
    primary.header["EXPTIME"] = 60.0
    fits.HDUList([primary, hdu]).writeto(d / "img.fits.fz")
    a = archive(d)
    (r,) = a.exposures().to_pylist()
    assert (r["naxis1"], r["naxis2"]) == (120, 100)
    assert r["mjd"] == pytest.approx(60700.25 + 30 / 86400, abs=1e-9)
    h, got = a.image(r["exposure_id"])
    np.testing.assert_array_equal(got, data.astype(np.float32))
    assert not any(k.startswith("ZIMAGE") for k in h)
    ra, dec = wcsu.image_center(wcsu.celestial_wcs(h), 120, 100)
    assert (ra, dec) == pytest.approx((r["ra"], r["dec"]), abs=1e-12)


@pytest.mark.parametrize(
    "x,y,status",
    [
        (-0.49, 50.0, "partial"),  # inside the first pixel: on the image
        (-0.51, 50.0, "off_chip"),  # just beyond it
        (60.0, 99.49, "partial"),
        (60.0, 99.51, "off_chip"),
        (60.2, 49.7, "ok"),
    ],
)
def test_make_cutout_edges_and_centring(x, y, status):
    """Truth: a pure TAN WCS maps these 0-based pixel positions to the requested targets."""
    header = wcs_header(ImageSpec(200.0, -40.0, distortion="none"))
    data = np.arange(100 * 120, dtype=np.float32).reshape(100, 120)
    w = wcsu.celestial_wcs(header)
    ra, dec = wcsu.pixel_to_sky(w, np.array([x]), np.array([y]))
    h, cut, got = wcsu.make_cutout(header, data, float(ra[0]), float(dec[0]), 10.0)
    assert got == status
    if status == "off_chip":
        assert cut is None
        return
    # 10 px side: the pixel holding the target is at index 5, and pixels are exact copies
    x0, y0 = -int(h["LTV1"]), -int(h["LTV2"])
    assert (x0 + 5, y0 + 5) == (int(np.floor(x + 0.5)), int(np.floor(y + 0.5)))
    ok = np.isfinite(cut)
    yy, xx = np.nonzero(ok)
    np.testing.assert_array_equal(cut[ok], data[yy + y0, xx + x0])


def test_mask_extensions_are_masks_not_exposures(tmp_path):
    # truth: two science images (EXTVER 1, 2) each followed by its own DQ plane with
    # known bits, a WEIGHT plane with a WCS, and a differently named mask (BADMAP)
    d = tmp_path / "images"
    d.mkdir()
    write_mef(
        d / "a.fits",
        [ImageSpec(150.0, 2.2, extname="SCI"), ImageSpec(150.05, 2.2, extname="SCI")],
        with_table=False,
    )
    with fits.open(d / "a.fits", mode="update") as hdul:
        wcs_card = hdul[1].header.copy()
        for ver, h in ((1, hdul[1]), (2, hdul[2])):
            h.header["EXTVER"] = ver
            dq = np.zeros((100, 120), np.int32)
            dq[10 * ver, :] = 1  # bit 1 on row 10 (ext 1) or 20 (ext 2)
            dq[:, 5 * ver] = 8  # bit 8 on column 5 or 10
            hdul.append(fits.ImageHDU(dq, name="DQ", ver=ver))
        hdul.append(fits.ImageHDU(np.ones((100, 120), np.float32), wcs_card, name="WEIGHT"))
        badmap = np.zeros((100, 120), np.uint8)
        badmap[50, 60] = 1
        hdul.append(fits.ImageHDU(badmap, name="BADMAP"))
    a = archive(d)
    rows = a.exposures().to_pylist()
    # DQ and WEIGHT are companions; BADMAP is a 2-D image without a WCS
    assert sorted(r["image_uri"][-3:] for r in rows) == ["[1]", "[2]"]
    by_ext = {r["image_uri"][-3:]: r["exposure_id"] for r in rows}
    m1, m2 = a.mask(by_ext["[1]"]), a.mask(by_ext["[2]"])
    assert m1.shape == (100, 120)
    assert m1[10].all() and m1[:, 5].all() and m1.sum() == 120 + 100 - 1
    assert m2[20].all() and m2[:, 10].all() and m2[10].sum() == 1  # its own EXTVER
    only8 = archive(d, mask_bits=8).mask(by_ext["[1]"])
    assert only8[:, 5].all() and only8.sum() == 100
    named = archive(d, mask_hdu="badmap")
    assert len(named.exposures()) == 2
    assert np.argwhere(named.mask(by_ext["[2]"])).tolist() == [[50, 60]]
    assert archive(d, mask_hdu="none").mask(by_ext["[1]"]) is None
    with pytest.raises(ParseError, match=r"no HDU named 'nope'.*SCI, SCI, DQ"):
        archive(d, mask_hdu="nope").exposures()


def test_ccd_and_quadrant_ids_and_pixel_only_rows_select_like_every_archive(tmp_path):
    # truth: CCDID/QID written per file; ExposureQuery.select keeps exactly the asked chip,
    # and a no-WCS row (null corners) is outside every region but inside without one
    d = tmp_path / "chips"
    d.mkdir()
    chips = {"a": (3, 1), "b": (3, 2), "c": (5, 1)}
    for name, (ccd, qid) in chips.items():
        extra = {"CCDID": ccd, "QID": qid}
        write_mef(d / f"{name}.fits", [ImageSpec(150.0, 2.2)], extra_primary=extra)
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((20, 30), np.float32))])
    hdul[0].header.update({"DATE-OBS": "2025-01-03T05:00:00", "EXPTIME": 30.0, "FILTER": "r"})
    hdul.writeto(d / "nowcs.fits")
    a = archive(d, no_wcs="pixels")

    def names(q: ExposureQuery | None = None) -> list[str]:
        return [r["image_uri"].rsplit("/", 1)[1] for r in a.exposures(q).to_pylist()]

    assert sorted(names()) == ["a.fits[1]", "b.fits[1]", "c.fits[1]", "nowcs.fits[1]"]
    every = {n: r for n, r in zip(names(), a.exposures().to_pylist(), strict=True)}
    assert (every["b.fits[1]"]["ccdid"], every["b.fits[1]"]["qid"]) == (3, 2)
    assert every["nowcs.fits[1]"]["ccdid"] is None and every["nowcs.fits[1]"]["ra1"] is None
    assert names(ExposureQuery(ccd_ids=[3], quadrant_ids=[1])) == ["a.fits[1]"]
    assert sorted(names(ExposureQuery(ccd_ids=[3]))) == ["a.fits[1]", "b.fits[1]"]
    assert sorted(names(ExposureQuery(quadrant_ids=[1]))) == ["a.fits[1]", "c.fits[1]"]
    cone = ExposureQuery(ra=150.0, dec=2.2, radius_deg=0.01)
    assert sorted(names(cone)) == ["a.fits[1]", "b.fits[1]", "c.fits[1]"]
    assert a.nights(ExposureQuery(ccd_ids=[4])) == []
