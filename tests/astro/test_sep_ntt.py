"""Reproduce SExtractor on a real image: sep's ESO NTT test frame and its catalog.

``tests/data/sep_ntt/default.sex`` fixes the settings: BACK_SIZE 64, BACK_FILTERSIZE 3,
DETECT_THRESH 1.5 (σ of the global background rms), DETECT_MINAREA 5, FILTER Y with
default.conv (sep's default kernel), DEBLEND_MINCONT 1.0 (deblending off, so the random
numbers of the deblender cannot differ), CLEAN Y / CLEAN_PARAM 1.0, PHOT_APERTURES 10
(diameter: radius 5 px), SExtractor's 5×5 aperture subsampling, BACKPHOTO_TYPE GLOBAL,
SATUR_LEVEL 50000, GAIN 0 (no Poisson term). The truth is ``image.cat`` (X_IMAGE,
Y_IMAGE are 1-based; lakepipe is 0-based).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

from lakepipe.astro import photometry as ph

DATA = Path(__file__).resolve().parent.parent / "data" / "sep_ntt"
# columns of image.cat, in the order of default.param (FLUX_RADIUS has 3 values)
COLUMNS = [
    "number",
    "x",
    "y",
    "xwin",
    "ywin",
    "x2",
    "y2",
    "xy",
    "errx2",
    "erry2",
    "errxy",
    "a",
    "flux_aper",
    "fluxerr_aper",
    "kron_radius",
    "flux_auto",
    "fluxerr_auto",
    "fr10",
    "fr50",
    "fr60",
    "flags",
]


def _settings(sex: Path) -> dict[str, str]:
    out = {}
    for line in sex.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition(" ")
            out[key] = value.strip()
    return out


@pytest.fixture(scope="module")
def ntt():
    cfg = _settings(DATA / "default.sex")
    img = ph.read_fits_image(DATA / "image.fits")
    img.saturate_adu = float(cfg["SATUR_LEVEL"])
    assert float(cfg["GAIN"]) == 0.0  # no Poisson term: our gain stays unknown
    kron_factor, kron_min = (float(v) for v in cfg["PHOT_AUTOPARAMS"].split(","))
    m = ph.measure_image(
        img,
        background_params=ph.BackgroundParams(
            mesh_pix=int(cfg["BACK_SIZE"]),
            filter_size=int(cfg["BACK_FILTERSIZE"]),
            mode="global" if cfg["BACKPHOTO_TYPE"] == "GLOBAL" else "local",
        ),
        detect_params=ph.DetectParams(
            threshold_sigma=float(cfg["DETECT_THRESH"]),
            threshold_rms="global",
            threshold_on="image",
            minarea=int(cfg["DETECT_MINAREA"]),
            deblend_nthresh=int(cfg["DEBLEND_NTHRESH"]),
            deblend_cont=float(cfg["DEBLEND_MINCONT"]),
            clean=cfg["CLEAN"] == "Y",
            clean_param=float(cfg["CLEAN_PARAM"]),
            filter="default" if cfg["FILTER"] == "Y" else "none",
            centroid="isophotal",
        ),
        aperture_params=ph.ApertureParams(
            mode="fixed",
            radius=float(cfg["PHOT_APERTURES"]) / 2.0,
            subpix=5,
            kron=True,
            kron_factor=kron_factor,
            kron_min_radius=kron_min,
        ),
    )
    cat = np.loadtxt(DATA / "image.cat")
    ref = {name: cat[:, i] for i, name in enumerate(COLUMNS)}
    return img, m, ref


def test_real_fits_reading(ntt):
    img, m, _ = ntt
    # truth: the stored 16-bit integers times BSCALE plus BZERO
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)  # the ESO-LOG cards
        with fits.open(DATA / "image.fits", do_not_scale_image_data=True) as hdul:
            raw = hdul[0].data.astype(np.float64)
            bscale, bzero = hdul[0].header["BSCALE"], hdul[0].header["BZERO"]
    assert img.data.dtype == np.float32
    assert np.allclose(img.data, raw * bscale + bzero, rtol=1e-6)
    # no celestial WCS: pixel positions only, ra/dec null, a clear note
    assert img.wcs is None and "no celestial WCS" in m.stats["note"]
    assert np.isnan(m.sources["ra"]).all()


def test_every_catalogued_object_found_at_its_position(ntt):
    _, m, ref = ntt
    s = m.sources
    x_ref, y_ref = ref["x"] - 1.0, ref["y"] - 1.0  # SExtractor pixels are 1-based
    assert len(s["x"]) == len(x_ref) == 65
    # nearest measured source of every catalogued object
    d = np.hypot(s["x"][:, None] - x_ref[None, :], s["y"][:, None] - y_ref[None, :])
    nearest = d.argmin(axis=0)
    assert len(set(nearest)) == len(x_ref)  # one-to-one
    assert np.abs(s["x"][nearest] - x_ref).max() < 0.01
    assert np.abs(s["y"][nearest] - y_ref).max() < 0.01


def test_aperture_fluxes_within_0p1_percent(ntt):
    _, m, ref = ntt
    s = m.sources
    x_ref, y_ref = ref["x"] - 1.0, ref["y"] - 1.0
    d = np.hypot(s["x"][:, None] - x_ref[None, :], s["y"][:, None] - y_ref[None, :])
    nearest = d.argmin(axis=0)
    ratio = s["flux"][nearest] / ref["flux_aper"]
    assert np.abs(ratio - 1.0).max() < 1e-3
    assert s["aperture_radius_pix"][0] == 5.0


def test_auto_flux_matches_sextractor(ntt):
    # truth: FLUX_AUTO and KRON_RADIUS of image.cat, made with PHOT_AUTOPARAMS 2.5, 0.0
    # (K = max(2.5 r_Kron, 0.0) in units of a, b); sep's Kron code is SExtractor's, so
    # every object SExtractor measured agrees
    _, m, ref = ntt
    s = m.sources
    x_ref, y_ref = ref["x"] - 1.0, ref["y"] - 1.0
    d = np.hypot(s["x"][:, None] - x_ref[None, :], s["y"][:, None] - y_ref[None, :])
    nearest = d.argmin(axis=0)
    measured = ref["flux_auto"] != 0  # SExtractor leaves 0 where it measured nothing
    assert measured.sum() == 64
    ratio = s["flux_auto"][nearest][measured] / ref["flux_auto"][measured]
    assert np.abs(ratio - 1.0).max() < 1e-3
    # the aperture: semi-axes K·a, K·b with K = KRON_RADIUS (printed to 2 decimals)
    k = s["kron_radius_pix"][nearest] / s["a_pix"][nearest]
    assert np.abs(k[measured] - ref["kron_radius"][measured]).max() <= 0.0051


def test_filtered_threshold_equals_sextractor_threshold(ntt):
    # truth: default.conv has Σk = 16, sqrt(Σk²) = 6, so filtered noise is 0.375 σ and
    # DETECT_THRESH 1.5 (image σ) is exactly 4.0 σ of the filtered image
    img, m, _ = ntt
    bp = ph.BackgroundParams(mesh_pix=64, filter_size=3)
    bkg = ph.background(img.data, None, bp)
    sub = img.data - bkg.back()
    common = {"minarea": 5, "deblend_cont": 1.0, "clean": True}
    a, _ = ph.detect(sub, bkg, None, ph.DetectParams(threshold_sigma=4.0, **common))
    b, _ = ph.detect(
        sub, bkg, None, ph.DetectParams(threshold_sigma=1.5, threshold_on="image", **common)
    )
    assert len(a) == len(b) == m.stats["n_detected"]
    assert np.array_equal(a["x"], b["x"])
