"""The sources stage through the runner, against the virtual survey's truth.

Truth: the sim archive's per-exposure truth table (where every star, variable, defect
was rendered, 0-based full-image pixels, with its total flux in ADU and magnitude) and
its exposure conditions (seeing, zeropoint); for real-FITS input, stars rendered at
known sky positions through SIP and TPV WCSs in integer files with BSCALE/BZERO.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import yaml
from astropy.io import fits
from scipy.spatial import cKDTree

from lakepipe.archives.sim import SimArchive
from lakepipe.astro import photometry as ph
from lakepipe.lake import Lake
from lakepipe.runner import run_pipeline
from lakepipe.stages.sources import source_id_for

SIM = {"kind": "sim", "seed": 7, "n_fields": 1, "n_nights": 1, "visits_per_night": 1}
SIM_SIZE = {"naxis1": 1024, "naxis2": 1024}
STARLIKE = ("star", "variable", "appeared", "transient")
EDGE_PIX = 5.0


def write_spec(root: Path, stages: dict, archive: dict) -> Path:
    spec = {"name": "src_test", "lake": str(root / "lake"), "archive": archive, "stages": stages}
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# exposures + sources on full images of a fits_dir archive (the FWHM default suits the
# small rendered test images)
FITS_DIR_STAGES = {
    "exposures": {"kind": "exposures"},
    "sources": {
        "kind": "sources",
        "inputs": ["exposures"],
        "image": "exposure",
        "seeing": {"default_fwhm_pix": 2.5},
    },
}


def image_hdu(data: np.ndarray, header: fits.Header, name: str) -> fits.ImageHDU:
    """An image extension carrying ``header``'s WCS cards (not its NAXIS cards)."""
    hdu = fits.ImageHDU(data=data.astype(np.float32), name=name)
    for card in header.cards:
        if card.keyword not in ("NAXIS", "NAXIS1", "NAXIS2"):
            hdu.header[card.keyword] = card.value
    return hdu


@pytest.fixture(scope="module")
def exposure_run(tmp_path_factory):
    """One full 1024² sim exposure measured with the default parameters."""
    root = tmp_path_factory.mktemp("sources_exposure")
    archive = {**SIM, **SIM_SIZE}
    stages = {
        "exposures": {"kind": "exposures"},
        "sources": {
            "kind": "sources",
            "inputs": ["exposures"],
            "image": "exposure",
            "limiting_mag": {"mode": "random", "n_apertures": 400, "seed": 2},
        },
    }
    spec = write_spec(root, stages, archive)
    report = run_pipeline(spec, workers=1)
    assert report.exit_code == 0, report
    lake = Lake(root / "lake").reader()
    sim = SimArchive.from_config(**{k: v for k, v in archive.items() if k != "kind"})
    (eid,) = lake.read("exposures").column("exposure_id").to_pylist()
    truth = {k: np.asarray(v) for k, v in sim.truth(eid).to_pydict().items()}
    return lake, sim, eid, truth, spec


def _matched(src, truth, kinds=STARLIKE, radius=1.0):
    sel = np.isin(truth["kind"], kinds)
    tx, ty = truth["x_pix"][sel], truth["y_pix"][sel]
    d, i = cKDTree(np.column_stack([src["x"], src["y"]])).query(np.column_stack([tx, ty]))
    return sel, d <= radius, i


def _truth_snr(flux, stats):
    # CCD equation with the image's measured sky noise and header gain (Howell 2006)
    r = stats["aperture_radius_pix"]
    return flux / np.sqrt(
        flux / stats["gain_e_per_adu"] + math.pi * r * r * stats["background_rms_adu"] ** 2
    )


def _columns(table):
    return {
        k: np.asarray(v.to_numpy(zero_copy_only=False))
        for k, v in zip(table.column_names, table.columns, strict=True)
    }


def test_seeing_and_stats_match_the_exposure(exposure_run):
    lake, _sim, eid, _truth, _ = exposure_run
    st = lake.read("image_stats").to_pylist()[0]
    exp = lake.read("exposures").to_pylist()[0]
    assert st["image_id"] == eid and st["image_kind"] == "exposure" and st["cutout_id"] is None
    # truth: the survey's seeing (FWHM of its Gaussian PSF) and sky level
    assert st["fwhm_pix"] == pytest.approx(
        exp["seeing_fwhm_arcsec"] / exp["pixscale_arcsec"], rel=0.03
    )
    # the archive's seeing seeded the detection kernel, close enough not to redo it
    assert st["fwhm_prior_pix"] == pytest.approx(
        exp["seeing_fwhm_arcsec"] / exp["pixscale_arcsec"], rel=1e-3
    )
    assert st["note"] is None
    assert st["background_adu"] == pytest.approx(exp["sky_adu"], rel=0.01)
    assert st["zeropoint_mag"] == exp["zeropoint_mag"]
    assert st["mag_lim"] == pytest.approx(st["mag_lim_inst"] + exp["zeropoint_mag"])
    assert st["has_wcs"] and st["n_random_apertures"] == 400


def test_completeness_and_astrometry_against_truth(exposure_run):
    lake, _sim, _eid, truth, _ = exposure_run
    src = _columns(lake.read("sources"))
    st = lake.read("image_stats").to_pylist()[0]
    sel, found, idx = _matched(src, truth)
    flux = truth["flux_adu"][sel]
    x, y = truth["x_pix"][sel], truth["y_pix"][sel]
    inside = (x > EDGE_PIX) & (x < 1023 - EDGE_PIX) & (y > EDGE_PIX) & (y < 1023 - EDGE_PIX)
    ok = inside & ~truth["saturated"][sel]
    snr = _truth_snr(flux, st)
    bright = ok & (snr > 10)
    assert bright.sum() > 500
    assert found[bright].mean() >= 0.95
    # astrometry: isolated (no star above 1% of the flux within 6 px), SNR > 20
    tree = cKDTree(np.column_stack([x, y]))
    iso = np.array(
        [
            not any(j != i and flux[j] > 0.01 * flux[i] for j in nb)
            for i, nb in enumerate(tree.query_ball_point(np.column_stack([x, y]), 6.0))
        ]
    )
    good = ok & found & iso & (snr > 20)
    dx = src["x"][idx[good]] - x[good]
    dy = src["y"][idx[good]] - y[good]
    assert good.sum() > 100
    assert math.sqrt(np.mean(dx**2 + dy**2) / 2) <= 0.1
    # ra/dec from the image WCS agree with the truth's sky positions (0.1 px = 0.1″)
    dra = (src["ra"][idx[good]] - truth["ra"][sel][good]) * np.cos(
        np.radians(truth["dec"][sel][good])
    )
    ddec = src["dec"][idx[good]] - truth["dec"][sel][good]
    assert math.sqrt(np.mean(dra**2 + ddec**2) / 2) * 3600 <= 0.1 * 1.01


def test_no_false_detections_away_from_defects(exposure_run):
    lake, _sim, _eid, truth, _ = exposure_run
    src = _columns(lake.read("sources"))
    real = np.isin(truth["kind"], (*STARLIKE, "asteroid"))
    d, _ = cKDTree(np.column_stack([truth["x_pix"][real], truth["y_pix"][real]])).query(
        np.column_stack([src["x"], src["y"]])
    )
    defects = ~real
    near_defect = np.zeros(len(src["x"]), bool)
    for kind, qx, qy in zip(
        truth["kind"][defects], truth["x_pix"][defects], truth["y_pix"][defects], strict=True
    ):
        if kind == "bad_column":
            near_defect |= np.abs(src["x"] - qx) < 3
        else:
            near_defect |= np.hypot(src["x"] - qx, src["y"] - qy) < 5
    edge = (src["x"] < EDGE_PIX) | (src["y"] < EDGE_PIX)
    edge |= (src["x"] > 1023 - EDGE_PIX) | (src["y"] > 1023 - EDGE_PIX)
    # truth: nothing was rendered there (2 px: beyond blended faint pairs' centroids)
    false = (d > 2.0) & ~near_defect & ~edge
    assert false.sum() / (1024 * 1024 / 1e6) < 1.0


def test_limiting_mag_matches_half_completeness(exposure_run):
    lake, _sim, _eid, truth, _ = exposure_run
    src = _columns(lake.read("sources"))
    st = lake.read("image_stats").to_pylist()[0]
    sel, found, idx = _matched(src, truth)
    mag = truth["mag"][sel]
    x, y = truth["x_pix"][sel], truth["y_pix"][sel]
    inside = (x > EDGE_PIX) & (x < 1023 - EDGE_PIX) & (y > EDGE_PIX) & (y < 1023 - EDGE_PIX)
    # recovered: detected and measured at SNR ≥ 5 (the definition of a 5σ limit)
    rec = found & (src["snr"][idx] >= 5)
    edges = np.arange(18.0, 23.0, 0.2)
    centres, frac = [], []
    for lo in edges:
        k = inside & (mag >= lo) & (mag < lo + 0.2)
        if k.sum() >= 20:
            centres.append(lo + 0.1)
            frac.append(rec[k].mean())
    centres, frac = np.array(centres), np.array(frac)
    j = int(np.flatnonzero(frac < 0.5)[0])
    m50 = centres[j - 1] + (frac[j - 1] - 0.5) / (frac[j - 1] - frac[j]) * 0.2
    assert st["mag_lim"] == pytest.approx(m50, abs=0.2)  # random-aperture mode
    assert st["mag_lim_analytic_inst"] + st["zeropoint_mag"] == pytest.approx(m50, abs=0.2)


def test_large_aperture_flux_ratio_on_sim_image(exposure_run):
    # the science core on the same sim image with a 6×FWHM aperture: truth total fluxes
    _lake, sim, eid, truth, _ = exposure_run
    header, data = sim.image(eid)
    img = ph.image_from_array(data, header)
    m = ph.measure_image(img, aperture_params=ph.ApertureParams(mode="fwhm", scale=6.0))
    s = m.sources
    sel, found, idx = _matched(s, truth)
    flux = truth["flux_adu"][sel]
    x, y = truth["x_pix"][sel], truth["y_pix"][sel]
    tree = cKDTree(np.column_stack([x, y]))
    r_iso = (6.0 + 3.0) * m.stats["fwhm_pix"]  # aperture radius + 3 FWHM
    iso = np.array(
        [
            not any(j != i and flux[j] > 0.01 * flux[i] for j in nb)
            for i, nb in enumerate(tree.query_ball_point(np.column_stack([x, y]), r_iso))
        ]
    )
    good = (
        found
        & iso
        & ~truth["saturated"][sel]
        & (_truth_snr(flux, {**m.stats, "gain_e_per_adu": img.gain_e_per_adu}) > 20)
    )
    good &= (s["flags"][idx] & (ph.FLAG_SATURATED | ph.FLAG_NEAR_EDGE)) == 0
    assert good.sum() > 30
    assert np.median(s["flux"][idx[good]] / flux[good]) == pytest.approx(1.0, abs=0.01)


def test_rerun_does_nothing_and_ids_are_stable(exposure_run):
    lake, _sim, eid, _truth, spec = exposure_run
    before = lake.read("sources", columns=["source_id", "flux"])
    report = run_pipeline(spec, workers=1)
    assert report.executed == 0
    ids = before.column("source_id").to_pylist()
    assert len(set(ids)) == len(ids)
    # the id of detection 0 (aperture 0) of this exposure is reproducible from its inputs
    assert source_id_for(eid, 0, "d0") in set(ids)


@pytest.fixture(scope="module")
def cutout_run(tmp_path_factory):
    """Cutouts of two sim exposures (one target near an edge), forced positions."""
    root = tmp_path_factory.mktemp("sources_cutouts")
    archive = {**SIM, **SIM_SIZE, "visits_per_night": 2}
    sim = SimArchive.from_config(**{k: v for k, v in archive.items() if k != "kind"})
    exp = sim.exposures().to_pylist()[0]
    # an edge target: 100 px from corner 1 (RA/Dec of pixel (100, 100))
    from lakepipe.astro.wcs import celestial_wcs, pixel_to_sky

    wcs = celestial_wcs(sim.header(exp["exposure_id"]))
    ra_e, dec_e = pixel_to_sky(wcs, np.array([60.0]), np.array([60.0]))
    targets = [
        {"id": "centre", "ra": exp["ra"], "dec": exp["dec"]},
        {"id": "edge", "ra": float(ra_e[0]), "dec": float(dec_e[0])},
    ]
    stages = {
        "exposures": {"kind": "exposures"},
        "cutouts": {
            "kind": "cutouts",
            "inputs": ["exposures"],
            "size_arcsec": 200,
            "targets": targets,
        },
        "sources": {
            "kind": "sources",
            "inputs": ["cutouts"],
            "aperture": {"mode": "multi", "radii": [1.5, 3.0, 5.0], "keep": "all"},
            "forced": {
                "positions": [{"id": "sn", "ra": exp["ra"], "dec": exp["dec"]}],
                "sql": "select 'c' || cutout_id as id, ra, dec, exposure_id from cutouts "
                "where target_id = 'edge'",
            },
        },
    }
    spec = write_spec(root, stages, archive)
    report = run_pipeline(spec, workers=1)
    assert report.exit_code == 0, report
    return Lake(root / "lake").reader(), sim


def test_cutouts_forced_rows_and_partial_masking(cutout_run):
    lake, _sim = cutout_run
    cut = lake.read("cutouts").to_pylist()
    stats = {r["image_id"]: r for r in lake.read("image_stats").to_pylist()}
    assert set(stats) == {c["cutout_id"] for c in cut if c["status"] in ("ok", "partial")}
    src = lake.read("sources")
    forced = src.filter(pc.field("forced"))
    # per cutout and aperture: 'sn' where the cutout covers the exposure centre, and the
    # SQL position of its own exposure's edge target where it covers that
    for c in cut:
        rows = forced.filter(pc.field("cutout_id") == c["cutout_id"]).to_pylist()
        ids = sorted({r["forced_id"] for r in rows})
        assert len(rows) == 3 * len(ids)  # three apertures each
        if c["target_id"] == "centre":
            assert "sn" in ids
        else:
            assert ids == [
                f"c{cc['cutout_id']}"
                for cc in cut
                if cc["target_id"] == "edge" and cc["exposure_id"] == c["exposure_id"]
            ]
    for c in cut:
        st = stats[c["cutout_id"]]
        # truth: a partial cutout's missing pixels are NaN and must be masked
        if c["status"] == "partial":
            assert st["masked_fraction"] > 0.05
        else:
            assert st["masked_fraction"] == 0.0
    assert {c["status"] for c in cut} == {"ok", "partial"}
    # multi/keep all: every detection has all three radii, source ids unique
    det = src.filter(~pc.field("forced"))
    radii = det.column("aperture_radius_pix").to_pylist()
    assert radii.count(1.5) == radii.count(3.0) == radii.count(5.0) > 50
    ids = src.column("source_id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert pc.min(src.column("_healpix_29")).as_py() > 0


def test_fits_dir_real_files_with_sip_tpv_and_scaling(tmp_path):
    # truth: stars rendered at known sky positions through each file's own WCS (SIP or
    # TPV distortion), stored as int16 with BSCALE/BZERO, noise added
    from tests.data.fits_images import ImageSpec, Star, render, wcs_header

    rng = np.random.default_rng(21)
    folder = tmp_path / "images"
    folder.mkdir()
    stars = [Star(150.1 + dx, 2.3 + dy, 2e4) for dx, dy in ((0.004, 0.002), (-0.006, -0.003))]
    primary = fits.PrimaryHDU()
    primary.header["DATE-OBS"] = "2025-01-03T05:00:00"
    primary.header["EXPTIME"] = 30.0
    primary.header["FILTER"] = "r"
    primary.header["GAIN"] = 1.5
    primary.header["MAGZP"] = 25.0
    hdus = [primary]
    for i, dist in enumerate(("sip", "tpv")):
        spec = ImageSpec(
            150.1, 2.3, naxis1=160, naxis2=140, distortion=dist, stars=stars, extname=f"S{i}"
        )
        header = wcs_header(spec)
        data = render(spec, header) + rng.normal(0.0, 5.0, (140, 160))
        hdu = image_hdu(data, header, spec.extname)
        hdu.scale("int16", bscale=0.25, bzero=3000.0)
        hdus.append(hdu)
    fits.HDUList(hdus).writeto(folder / "a.fits")
    spec_path = write_spec(tmp_path, FITS_DIR_STAGES, {"kind": "fits_dir", "path": "images"})
    report = run_pipeline(spec_path, workers=1)
    assert report.exit_code == 0, report
    lake = Lake(tmp_path / "lake").reader()
    src = lake.read("sources").to_pylist()
    assert len(lake.read("image_stats")) == 2
    for st in stars:
        for eid in {r["exposure_id"] for r in src}:
            rows = [r for r in src if r["exposure_id"] == eid]
            sep_arcsec = [
                3600
                * math.hypot((r["ra"] - st.ra) * math.cos(math.radians(st.dec)), r["dec"] - st.dec)
                for r in rows
            ]
            k = int(np.argmin(sep_arcsec))
            assert sep_arcsec[k] < 0.05  # 1″ pixels: 0.05 px
            # flux: Gaussian FWHM 2.5 px in a 2×FWHM aperture holds 99.8% of 2e4
            assert rows[k]["flux"] == pytest.approx(2e4 * (1 - 2**-16), rel=0.02)
            assert rows[k]["mag_inst"] + rows[k]["zeropoint_mag"] == pytest.approx(
                25.0 - 2.5 * math.log10(rows[k]["flux"])
            )


@pytest.fixture(scope="module")
def local_kron_run(tmp_path_factory):
    """The 1024² sim exposure with a local background annulus, Kron flux, and forced
    photometry at the truth position of every unsaturated star (selection-free)."""
    root = tmp_path_factory.mktemp("sources_local")
    archive = {**SIM, **SIM_SIZE}
    sim = SimArchive.from_config(**{k: v for k, v in archive.items() if k != "kind"})
    (eid,) = sim.exposures().column("exposure_id").to_pylist()
    truth = {k: np.asarray(v) for k, v in sim.truth(eid).to_pydict().items()}
    x, y = truth["x_pix"], truth["y_pix"]
    inside = (x > 20) & (x < 1003) & (y > 20) & (y < 1003)
    pick = np.flatnonzero(np.isin(truth["kind"], STARLIKE) & ~truth["saturated"] & inside)
    positions = [
        {"id": int(i), "ra": float(truth["ra"][i]), "dec": float(truth["dec"][i])} for i in pick
    ]
    stages = {
        "exposures": {"kind": "exposures"},
        "sources": {
            "kind": "sources",
            "inputs": ["exposures"],
            "image": "exposure",
            "background": {"mode": "local"},
            "aperture": {"kron": True},
            "forced": {"positions": positions},
        },
    }
    spec = write_spec(root, stages, archive)
    report = run_pipeline(spec, workers=1)
    assert report.exit_code == 0, report
    return Lake(root / "lake").reader(), truth


def _isolated(truth, idx, radius_pix):
    """No other rendered object above 1% of the flux within ``radius_pix`` (neighbours
    in the background annulus are allowed: masking them is what is tested)."""
    x, y, f = truth["x_pix"], truth["y_pix"], truth["flux_adu"]
    tree = cKDTree(np.column_stack([x, y]))
    near = tree.query_ball_point(np.column_stack([x[idx], y[idx]]), radius_pix)
    return np.array(
        [sum(f[j] > 0.01 * f[i] for j in nb) == 1 for i, nb in zip(idx, near, strict=True)]
    )


def test_local_annulus_background_is_unbiased(local_kron_run):
    # truth: the rendered total flux; a 2×FWHM aperture of a pixel-integrated Gaussian
    # holds all but 2e-5 of it. Forced rows carry no detection bias, so the pull
    # (measured - true) / flux_err must be a unit normal when the error model and the
    # annulus background are right (neighbours in the annulus used to bias it by -4%
    # at SNR 5-20 and widen the pull to 1.5).
    lake, truth = local_kron_run
    st = lake.read("image_stats").to_pylist()[0]
    forced = _columns(lake.read("sources").filter(pc.field("forced")))
    idx = forced["forced_id"].astype(int)
    true = truth["flux_adu"][idx]
    snr = _truth_snr(true, st)
    good = _isolated(truth, idx, 2.5 * st["fwhm_pix"]) & (snr > 5)
    good &= (forced["flags"] & (ph.FLAG_MASKED | ph.FLAG_NEAR_EDGE)) == 0
    assert good.sum() > 1000
    ratio = forced["flux"][good] / true[good]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.01)
    pull = (forced["flux"][good] - true[good]) / forced["flux_err"][good]
    width = ph.MAD_TO_SIGMA * np.median(np.abs(pull - np.median(pull)))
    assert 0.9 <= width <= 1.1
    faint = good & (snr < 20)
    assert np.median(forced["flux"][faint] / true[faint]) == pytest.approx(1.0, abs=0.02)


def test_kron_flux_on_the_sim(local_kron_run):
    # truth: total fluxes; the Kron ellipse (K = max(2.5 r_Kron, 3.5) semi-axes) of a
    # Gaussian holds ≈ 99% (Bertin & Arnouts 1996: MAG_AUTO misses a few %)
    lake, truth = local_kron_run
    det = _columns(lake.read("sources").filter(~pc.field("forced")))
    st = lake.read("image_stats").to_pylist()[0]
    assert np.isfinite(det["flux_auto"]).all() and np.isfinite(det["kron_radius_pix"]).all()
    sel, found, i = _matched(det, truth)
    idx = np.flatnonzero(sel)[found]
    j = i[found]
    bright = (_truth_snr(truth["flux_adu"][idx], st) > 50) & ~truth["saturated"][idx]
    bright &= _isolated(truth, idx, 8.0 * st["fwhm_pix"]) & (det["flags"][j] == 0)
    assert bright.sum() > 30
    ratio = det["flux_auto"][j[bright]] / truth["flux_adu"][idx[bright]]
    assert 0.97 < np.median(ratio) < 1.0


def test_fits_dir_mask_extension_bits_and_exposure_detector_values(tmp_path):
    # truth: two Gaussian stars of 2e4 counts; a hot bad column (60000 ADU) through the
    # core of star A, marked with bit 4 in the MASK extension; star B's pixels carry
    # bit 2 only, which mask_bits: 4 does not count as bad. GAIN is 1.5 in the header
    # but the exposures row says 3.0 (keyword override) and saturation comes only from
    # the archive's defaults: the stage must use the row's values.
    from lakepipe.astro.wcs import celestial_wcs, sky_to_pixel
    from tests.data.fits_images import ImageSpec, Star, render, wcs_header

    folder = tmp_path / "images"
    folder.mkdir()
    stars = [Star(150.1 + 0.004, 2.3 + 0.002, 2e4), Star(150.1 - 0.006, 2.3 - 0.003, 2e4)]
    spec = ImageSpec(150.1, 2.3, naxis1=160, naxis2=140, distortion="sip", stars=stars)
    header = wcs_header(spec)
    data = render(spec, header) + np.random.default_rng(3).normal(0.0, 5.0, (140, 160))
    (xa, xb), (ya, yb) = sky_to_pixel(
        celestial_wcs(header), np.array([s.ra for s in stars]), np.array([s.dec for s in stars])
    )
    col = round(xa)
    data[:, col] = 60000.0
    mask = np.zeros((140, 160), np.int16)
    mask[:, col] = 4
    mask[round(yb) - 3 : round(yb) + 4, round(xb) - 3 : round(xb) + 4] = 2
    primary = fits.PrimaryHDU()
    for k, v in {"DATE-OBS": "2025-01-03T05:00:00", "EXPTIME": 30.0, "FILTER": "r"}.items():
        primary.header[k] = v
    primary.header["GAIN"], primary.header["EGAIN2"] = 1.5, 3.0
    sci = image_hdu(data, header, "SCI")
    weight = fits.ImageHDU(data=np.ones((140, 160), np.float32), header=sci.header, name="WEIGHT")
    dq = fits.ImageHDU(data=mask, name="MASK")
    fits.HDUList([primary, sci, dq, weight]).writeto(folder / "a.fits")
    archive = {
        "kind": "fits_dir",
        "path": "images",
        "mask_bits": 4,
        "keywords": {"gain_e_per_adu": "EGAIN2"},
        "defaults": {"saturate_adu": 50000.0},
    }
    report = run_pipeline(write_spec(tmp_path, FITS_DIR_STAGES, archive), workers=1)
    assert report.exit_code == 0, report
    lake = Lake(tmp_path / "lake").reader()
    (st,) = lake.read("image_stats").to_pylist()  # SCI only: MASK and WEIGHT are not images
    assert st["gain_e_per_adu"] == 3.0 and st["saturate_adu"] == 50000.0
    assert st["masked_fraction"] == pytest.approx(1 / 160)
    src = _columns(lake.read("sources"))
    for x, y, masked in ((xa, ya, True), (xb, yb, False)):
        k = int(np.argmin(np.hypot(src["x"] - x, src["y"] - y)))
        assert math.hypot(src["x"][k] - x, src["y"][k] - y) < 0.3
        assert bool(src["flags"][k] & ph.FLAG_MASKED) is masked
        assert not src["flags"][k] & ph.FLAG_SATURATED  # the masked column is not counted
        # the column is interpolated from its neighbours: no 60000-ADU spike in the flux.
        # Through the core of a 2.5-px FWHM star the neighbours' mean is ~0.64 of the
        # peak column, so star A loses ~13% (hence the flag); star B is untouched.
        true = 2e4 * (1 - 2**-16)
        if masked:
            assert 0.8 * true < src["flux"][k] < true
        else:
            assert src["flux"][k] == pytest.approx(true, rel=0.02)
    # nothing detected along the hot column away from star A
    on_col = (np.abs(src["x"] - col) < 2) & (np.abs(src["y"] - ya) > 5)
    assert not on_col.any()


def test_fits_dir_image_without_wcs_pixels_only(tmp_path, caplog):
    # truth: sep's ESO NTT frame (no celestial WCS, ESO-LOG cards, BSCALE/BZERO int16,
    # MJD-OBS 48921.62787) and its SExtractor catalog. Skipped by default with a warning
    # naming the file (no exposures, nothing to do); measured in pixels with
    # no_wcs: pixels. pytest's filterwarnings=error also checks that the ESO-LOG cards'
    # warnings stay inside the archive and the stage.
    import logging
    import shutil

    ntt = Path(__file__).resolve().parent.parent / "data" / "sep_ntt"
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(ntt / "image.fits", folder / "ntt.fits")
    archive = {"kind": "fits_dir", "path": "images"}
    stages = {
        "exposures": {"kind": "exposures"},
        "sources": {
            "kind": "sources",
            "inputs": ["exposures"],
            "image": "exposure",
            # default.sex's detection settings (see tests/astro/test_sep_ntt.py)
            "detect": {
                "threshold_sigma": 1.5,
                "threshold_on": "image",
                "minarea": 5,
                "filter": "default",
                "deblend_cont": 1.0,
                "clean": True,
                "centroid": "isophotal",
            },
        },
    }
    with caplog.at_level(logging.WARNING, logger="lakepipe.archives.fits_dir"):
        report = run_pipeline(write_spec(tmp_path, stages, archive), workers=1)
    assert report.exit_code == 0 and report.stages[0].rows == 0
    assert "ntt.fits[0] skipped: header has no celestial WCS" in caplog.text
    assert "no_wcs: pixels" in caplog.text

    archive["no_wcs"] = "pixels"
    report = run_pipeline(write_spec(tmp_path, stages, archive), workers=1)
    assert report.exit_code == 0, report
    lake = Lake(tmp_path / "lake").reader()
    (exp,) = lake.read("exposures").to_pylist()
    assert exp["ra"] is None and exp["ra1"] is None and exp["naxis1"] == 256
    assert exp["mjd"] == pytest.approx(48921.62787 + 1200.0 / 2 / 86400)
    (st,) = lake.read("image_stats").to_pylist()
    assert st["has_wcs"] is False and st["ra"] is None
    assert st["note"].startswith("pixel positions only, ra/dec null")
    src = _columns(lake.read("sources"))
    assert np.isnan(src["ra"]).all() and np.isnan(src["dec"]).all()
    cat = np.loadtxt(ntt / "image.cat")
    d = np.hypot(src["x"][:, None] - (cat[:, 1] - 1), src["y"][:, None] - (cat[:, 2] - 1))
    # every catalogued object found at SExtractor's position
    assert len(src["x"]) == len(cat) == 65 and d.min(axis=0).max() < 0.01

    # an aperture in arcsec needs a pixel scale: the failure names the image
    stages["sources"]["aperture"] = {"mode": "fixed", "radius": 3.0, "unit": "arcsec"}
    report = run_pipeline(write_spec(tmp_path, stages, archive), workers=1)
    assert report.exit_code == 1
    (message,) = report.stages[1].errors.values()
    assert f"measuring image {exp['exposure_id']} (exposure {exp['exposure_id']})" in message
    assert "arcsec but the image has no pixel scale" in message
