"""Photometry science core against simulated truth.

Every image here is synthesised from known stars (pixel-integrated Gaussian or Moffat
PSFs with known total flux and position) on a flat sky with Poisson noise through the
gain and Gaussian read noise, from an explicit seed; the tests compare what
``lakepipe.astro.photometry`` measures with that truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import sep
from astropy.io import fits
from scipy import special
from scipy.spatial import cKDTree

from lakepipe.astro import photometry as ph

GAIN = 2.0  # e-/ADU
RDNOISE = 5.0  # e-
SKY = 200.0  # ADU / pixel
SATURATE = 60000.0


@dataclass
class Synthetic:
    data: np.ndarray
    header: fits.Header
    x: np.ndarray  # 0-based truth positions
    y: np.ndarray
    flux: np.ndarray  # total ADU
    fwhm_pix: float
    sigma_pix_adu: float  # per-pixel noise of the sky (ADU)


def _gauss_1d(edges_lo: np.ndarray, centre: float, sigma: float) -> np.ndarray:
    # fraction of a 1-D Gaussian in each pixel [lo, lo + 1): exact pixel integration
    z = (edges_lo - centre) / (sigma * math.sqrt(2.0))
    return 0.5 * (special.erf(z + 1.0 / (sigma * math.sqrt(2.0))) - special.erf(z))


def tan_header(nx: int, ny: int, ra: float = 150.0, dec: float = 2.2, scale: float = 1.0):
    """A plain TAN header, `scale` arcsec/pixel, north up east left."""
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CRVAL1"], h["CRVAL2"] = ra, dec
    h["CRPIX1"], h["CRPIX2"] = (nx + 1) / 2.0, (ny + 1) / 2.0
    h["CD1_1"], h["CD1_2"] = -scale / 3600.0, 0.0
    h["CD2_1"], h["CD2_2"] = 0.0, scale / 3600.0
    return h


def synthetic_image(
    seed: int,
    *,
    shape: tuple[int, int] = (1024, 1024),
    n_stars: int = 400,
    fwhm_pix: float = 3.0,
    snr_range: tuple[float, float] = (3.0, 3000.0),
    psf: str = "gaussian",
    moffat_beta: float = 3.0,
    positions: tuple[np.ndarray, np.ndarray] | None = None,
    fluxes: np.ndarray | None = None,
) -> Synthetic:
    """Stars with log-uniform peak-aperture SNR on a flat sky; Poisson + read noise."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    sigma = fwhm_pix / ph.FWHM_PER_SIGMA
    var_pix = SKY / GAIN + (RDNOISE / GAIN) ** 2
    if positions is None:
        x = rng.uniform(8, nx - 9, n_stars)
        y = rng.uniform(8, ny - 9, n_stars)
    else:
        x, y = positions
    if fluxes is None:
        # SNR in an optimal-ish aperture of radius FWHM: F / sqrt(F/g + n σ²)
        snr = np.exp(rng.uniform(np.log(snr_range[0]), np.log(snr_range[1]), len(x)))
        n = math.pi * fwhm_pix**2
        # solve F² - snr² F/g - snr² n σ² = 0
        flux = 0.5 * (snr**2 / GAIN + np.sqrt(snr**4 / GAIN**2 + 4 * snr**2 * n * var_pix))
    else:
        flux = np.asarray(fluxes, float)
    model = np.full(shape, SKY)
    half = math.ceil(8 * fwhm_pix) if psf == "gaussian" else math.ceil(15 * fwhm_pix)
    for xi, yi, fi in zip(x, y, flux, strict=True):
        x0, y0 = math.floor(xi) - half, math.floor(yi) - half
        xs, ys = max(x0, 0), max(y0, 0)
        xe, ye = min(x0 + 2 * half + 1, nx), min(y0 + 2 * half + 1, ny)
        if psf == "gaussian":
            px = _gauss_1d(np.arange(xs, xe) - 0.5, xi, sigma)
            py = _gauss_1d(np.arange(ys, ye) - 0.5, yi, sigma)
            model[ys:ye, xs:xe] += fi * np.outer(py, px)
        else:
            # Moffat, 5×5 sub-sampled, normalised analytically: ∫ = π α² / (β - 1)
            alpha = fwhm_pix / (2.0 * math.sqrt(2.0 ** (1.0 / moffat_beta) - 1.0))
            sub = (np.arange(5) - 2) / 5.0
            yy, xx = np.mgrid[ys:ye, xs:xe].astype(float)
            acc = np.zeros(xx.shape)
            for dx in sub:
                for dy in sub:
                    r2 = (xx + dx - xi) ** 2 + (yy + dy - yi) ** 2
                    acc += (1 + r2 / alpha**2) ** (-moffat_beta)
            norm = math.pi * alpha**2 / (moffat_beta - 1.0)
            model[ys:ye, xs:xe] += fi * acc / 25.0 / norm
    electrons = rng.poisson(model * GAIN).astype(float)
    data = electrons / GAIN + rng.normal(0.0, RDNOISE / GAIN, shape)
    data = np.minimum(data, SATURATE).astype(np.float32)
    h = tan_header(nx, ny)
    h["GAIN"] = GAIN
    h["RDNOISE"] = RDNOISE
    h["SATURATE"] = SATURATE
    h["MAGZP"] = 26.0
    return Synthetic(data, h, x, y, flux, fwhm_pix, math.sqrt(var_pix))


def match(sx, sy, tx, ty, radius=1.5):
    """Index of the nearest measured source for each truth star (-1 if none within r)."""
    if len(sx) == 0:
        return np.full(len(tx), -1)
    d, i = cKDTree(np.column_stack([sx, sy])).query(np.column_stack([tx, ty]))
    return np.where(d <= radius, i, -1)


def isolated(x, y, flux, min_sep):
    """Truth stars with no other star brighter than 1% of them within min_sep pixels."""
    tree = cKDTree(np.column_stack([x, y]))
    out = np.ones(len(x), bool)
    for i, nb in enumerate(tree.query_ball_point(np.column_stack([x, y]), min_sep)):
        others = [j for j in nb if j != i]
        out[i] = not any(flux[j] > 0.01 * flux[i] for j in others)
    return out


def truth_snr(flux, radius_pix):
    """CCD-equation SNR of the truth flux in a circular aperture (Howell 2006 eq. 4.4)."""
    n = math.pi * radius_pix**2
    var_pix = SKY / GAIN + (RDNOISE / GAIN) ** 2
    return flux / np.sqrt(flux / GAIN + n * var_pix)


@pytest.fixture(scope="module")
def field():
    syn = synthetic_image(11)
    img = ph.image_from_array(syn.data, syn.header)
    return syn, img, ph.measure_image(img)


def test_seeing_fwhm_gaussian(field):
    syn, _img, m = field
    # truth: the PSF is a Gaussian of FWHM 3.0 px
    assert m.stats["n_fwhm_stars"] >= 10
    assert m.stats["fwhm_pix"] == pytest.approx(syn.fwhm_pix, rel=0.02)
    assert m.stats["fwhm_arcsec"] == pytest.approx(syn.fwhm_pix * 1.0, rel=0.02)


def test_seeing_fwhm_moffat():
    # truth: Moffat β = 3, FWHM 4.0 px; the fit must not assume a Gaussian
    syn = synthetic_image(5, n_stars=150, fwhm_pix=4.0, psf="moffat", shape=(600, 600))
    m = ph.measure_image(ph.image_from_array(syn.data, syn.header))
    assert m.stats["fwhm_pix"] == pytest.approx(4.0, rel=0.03)


def test_seeing_prepass_on_a_large_image_uses_its_centre(monkeypatch):
    # truth: Gaussian PSF of FWHM 2.5 px; with the pre-pass limited to the central
    # quarter (the threshold lowered so this small image counts as large) the FWHM and
    # the bright objects' full-image coordinates are the same as from the whole image
    syn = synthetic_image(21, shape=(800, 800), n_stars=700, fwhm_pix=2.5)
    img = ph.image_from_array(syn.data, syn.header)
    whole = ph.measure_image(img)
    monkeypatch.setattr(ph, "PREPASS_FULL_MAX_PIX", 100_000)
    centre = ph.measure_image(img)
    assert centre.stats["fwhm_pix"] == pytest.approx(2.5, rel=0.03)
    assert centre.stats["fwhm_pix"] == pytest.approx(whole.stats["fwhm_pix"], rel=0.01)
    assert len(centre.sources["x"]) == len(whole.sources["x"])  # same detections
    bkg = ph.background(img.data, None, ph.BackgroundParams())
    sub = img.data - bkg.back()
    bright = ph.DetectParams(threshold_sigma=10.0, threshold_on="image")
    objs = ph._bright_objects(sub, bkg, None, bright)
    assert objs["x"].min() >= 200 and objs["x"].max() < 600  # the central quarter
    d, _ = cKDTree(np.column_stack([syn.x, syn.y])).query(np.column_stack([objs["x"], objs["y"]]))
    assert np.median(d) < 0.1  # full-image pixel coordinates of injected stars


def test_completeness_snr_above_10(field):
    syn, _img, m = field
    s = m.sources
    r = m.stats["aperture_radius_pix"]
    snr = truth_snr(syn.flux, r)
    idx = match(s["x"], s["y"], syn.x, syn.y)
    bright = snr > 10
    # truth: every star's position and SNR in the stage's aperture; ≥ 95% found
    completeness = (idx[bright] >= 0).mean()
    assert bright.sum() > 200
    assert completeness >= 0.95


def test_astrometric_rms_snr_above_20(field):
    syn, _img, m = field
    s = m.sources
    idx = match(s["x"], s["y"], syn.x, syn.y)
    iso = isolated(syn.x, syn.y, syn.flux, 4 * syn.fwhm_pix)
    sel = (truth_snr(syn.flux, m.stats["aperture_radius_pix"]) > 20) & (idx >= 0) & iso
    sel &= syn.flux < 0.5 * SATURATE * 2 * math.pi * (syn.fwhm_pix / 2.3548) ** 2
    dx = s["x"][idx[sel]] - syn.x[sel]
    dy = s["y"][idx[sel]] - syn.y[sel]
    rms = math.sqrt(np.mean(dx**2 + dy**2) / 2.0)  # per axis
    assert sel.sum() > 100
    assert rms <= 0.1
    # and no systematic offset (0-based convention: pixel centres at integers)
    assert abs(np.median(dx)) < 0.01 and abs(np.median(dy)) < 0.01


def test_flux_ratio_large_aperture():
    # truth: total fluxes of stars on a 32-px grid (all isolated); an aperture of 4 FWHM
    # holds 100.000% of a Gaussian
    rng = np.random.default_rng(12)
    gx, gy = np.meshgrid(np.arange(20, 1010, 32.0), np.arange(20, 1010, 32.0))
    gx, gy = gx.ravel() + rng.uniform(-3, 3, gx.size), gy.ravel() + rng.uniform(-3, 3, gx.size)
    syn = synthetic_image(12, snr_range=(20, 2000), positions=(gx, gy))
    img = ph.image_from_array(syn.data, syn.header)
    m = ph.measure_image(img, aperture_params=ph.ApertureParams(mode="fwhm", scale=4.0))
    s = m.sources
    idx = match(s["x"], s["y"], syn.x, syn.y)
    iso = isolated(syn.x, syn.y, syn.flux, 8 * syn.fwhm_pix)
    sel = iso & (idx >= 0)
    sel &= (s["flags"][np.maximum(idx, 0)] & (ph.FLAG_SATURATED | ph.FLAG_NEAR_EDGE)) == 0
    ratio = s["flux"][idx[sel]] / syn.flux[sel]
    assert sel.sum() > 100
    assert np.median(ratio) == pytest.approx(1.0, abs=0.01)
    # the CCD-equation errors describe the real scatter: pulls have unit width
    pulls = (s["flux"][idx[sel]] - syn.flux[sel]) / s["flux_err"][idx[sel]]
    assert sel.sum() > 800
    assert 0.9 < np.std(pulls) < 1.1
    # magnitudes and their errors follow from flux and error
    mag = s["mag_inst"][idx[sel]]
    assert np.allclose(mag, -2.5 * np.log10(s["flux"][idx[sel]]))
    assert np.allclose(
        s["mag_inst_err"][idx[sel]], 1.0857362 * s["flux_err"][idx[sel]] / s["flux"][idx[sel]]
    )


def test_ccd_error_model_matches_empirical():
    # truth: σ²_pix = SKY/g + (RN/g)²; the 'ccd' model from header GAIN/RDNOISE and the
    # measured rms map must agree with it and with each other
    syn = synthetic_image(13, n_stars=50, shape=(512, 512))
    img = ph.image_from_array(syn.data, syn.header)
    emp = ph.measure_image(img)
    ccd = ph.measure_image(img, aperture_params=ph.ApertureParams(error_model="ccd"))
    assert emp.stats["background_rms_adu"] == pytest.approx(syn.sigma_pix_adu, rel=0.02)
    ratio = ccd.sources["flux_err"] / emp.sources["flux_err"]
    assert np.median(ratio) == pytest.approx(1.0, abs=0.02)


def test_no_false_detections_on_blank_sky():
    # truth: no stars at all; 2048² pixels of pure noise through the whole default chain
    # (no star for a FWHM: the default 3-px kernel)
    syn = synthetic_image(14, n_stars=0, shape=(2048, 2048))
    m = ph.measure_image(ph.image_from_array(syn.data, syn.header))
    per_million = m.stats["n_detected"] / (syn.data.size / 1e6)
    assert per_million < 1.0


def test_false_detection_rate_pooled_over_seeing():
    # truth: pure Gaussian noise, 3 seeds × 2048² per FWHM, detected through the matched
    # (seeing) kernel as measure_image does. The rate of noise peaks grows with the
    # kernel's correlation area: the DetectParams docstring quotes these figures.
    n = 2048
    fwhms = (2.0, 3.0, 4.0, 5.0, 6.0)
    counts = {4.5: {}, 5.0: {}}
    for fwhm in fwhms:
        for t in counts:
            counts[t][fwhm] = 0
        for seed in range(3):
            rng = np.random.default_rng([77, seed])
            img = (100.0 + rng.normal(0.0, 10.0, (n, n))).astype(np.float32)
            bkg = ph.background(img, None, ph.BackgroundParams())
            sub = img - bkg.back()
            for t in counts:
                dp = ph.DetectParams(threshold_sigma=t)
                objs, _ = ph.detect(sub, bkg, None, dp, kernel=ph.gaussian_kernel(fwhm))
                counts[t][fwhm] += len(objs)
    mpix = 3 * n * n / 1e6
    rate = {t: {f: c / mpix for f, c in per.items()} for t, per in counts.items()}
    pooled = {t: sum(per.values()) / (len(fwhms) * mpix) for t, per in counts.items()}
    # default 4.5σ: ≤ ~1 per 10⁶ pixels, rising with FWHM (a few per 10⁷ below 3 px)
    assert pooled[4.5] < 1.0
    assert max(rate[4.5].values()) < 1.5
    assert rate[4.5][2.0] < rate[4.5][5.0]
    # 5σ: below 0.1 per 10⁶ pixels at any of these FWHMs
    assert pooled[5.0] < 0.1 and max(rate[5.0].values()) < 0.2


def test_saturated_and_masked_flags():
    x = np.array([100.0, 300.0, 200.0])
    y = np.array([100.0, 300.0, 200.0])
    flux = np.array([5e6, 2e4, 2e4])  # the first saturates (peak ≫ 60000 ADU)
    syn = synthetic_image(15, shape=(400, 400), positions=(x, y), fluxes=flux, n_stars=3)
    mask = np.zeros(syn.data.shape, bool)
    mask[:, 301] = True  # a bad column through the second star
    img = ph.image_from_array(syn.data, syn.header, mask=mask)
    m = ph.measure_image(img, seeing_params=ph.SeeingParams(default_fwhm_pix=3.0))
    s = m.sources
    idx = match(s["x"], s["y"], x, y, radius=2.0)
    assert (idx >= 0).all()
    f = s["flags"][idx]
    assert f[0] & ph.FLAG_SATURATED and not f[1] & ph.FLAG_SATURATED
    assert f[1] & ph.FLAG_MASKED and not f[2] & ph.FLAG_MASKED
    assert f[2] == 0
    # the masked column's flux is interpolated: the star is still measured to ~2%
    assert s["flux"][idx[1]] == pytest.approx(2e4, rel=0.03)


def test_dead_and_hot_columns_are_found_and_masked():
    # truth: column 301 is dead (read noise only, no sky, no star light) and column 150
    # hot (+400 ADU); the star on the dead column is flagged masked and its flux
    # interpolated; no other column of this or four more star fields is flagged
    x = np.array([300.0, 200.0])
    y = np.array([300.0, 200.0])
    syn = synthetic_image(15, shape=(400, 400), positions=(x, y), fluxes=np.full(2, 2e4))
    data = syn.data.copy()
    rng = np.random.default_rng(3)
    data[:, 301] = rng.normal(0.0, RDNOISE / GAIN, data.shape[0])
    data[:, 150] += 400.0
    img = ph.image_from_array(data, syn.header)
    bkg = ph.background(img.data, None, ph.BackgroundParams())
    assert ph.bad_columns(img.data - bkg.back(), None, bkg.globalrms, 3.0).tolist() == [150, 301]
    m = ph.measure_image(img, seeing_params=ph.SeeingParams(default_fwhm_pix=3.0))
    s = m.sources
    idx = match(s["x"], s["y"], x, y, radius=2.0)
    assert (idx >= 0).all()
    assert s["flags"][idx[0]] & ph.FLAG_MASKED and s["flags"][idx[1]] == 0
    assert s["flux"][idx[0]] == pytest.approx(2e4, rel=0.03)
    off = ph.measure_image(img, detect_params=ph.DetectParams(bad_column_sigma=None))
    k = match(off.sources["x"], off.sources["y"], x[:1], y[:1], radius=2.0)[0]
    # off: nothing is masked and the star's flux loses the dead column's light
    assert k >= 0 and not off.sources["flags"][k] & ph.FLAG_MASKED
    assert off.sources["flux"][k] < 0.8 * 2e4 and off.stats["masked_fraction"] == 0
    for seed in range(30, 34):  # no false columns in clean crowded fields
        clean = synthetic_image(seed, shape=(300, 500), n_stars=300)
        b = ph.background(clean.data, None, ph.BackgroundParams())
        assert len(ph.bad_columns(clean.data - b.back(), None, b.globalrms, 3.0)) == 0


def test_a_star_on_a_mostly_masked_cutout_is_not_a_bad_column():
    # truth: a cutout almost entirely off the chip (masked) keeps 4 rows with a star; a
    # column median from two samples would call the star a "hot column" and erase it
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:600, :600]
    data = rng.normal(0, 1, (600, 600)).astype(np.float32)
    data += 200 * np.exp(-((xx - 300) ** 2 + (yy - 598) ** 2) / (2 * 1.5**2))
    mask = np.zeros(data.shape, bool)
    mask[:596] = True
    data[mask] = 0
    assert ph.bad_columns(data, mask, 1.0, 3.0).tolist() == []
    mask[:, 100] = False  # a column with all its rows is still judged
    data[:, 100] = -50.0
    assert ph.bad_columns(data, mask, 1.0, 3.0).tolist() == [100]


def test_forced_photometry_unbiased_below_detection():
    # truth: 200 faint stars (SNR ~2 in the aperture) at known sky positions
    rng = np.random.default_rng(16)
    n = 200
    x, y = rng.uniform(20, 980, n), rng.uniform(20, 980, n)
    bright_x, bright_y = rng.uniform(20, 980, 30), rng.uniform(20, 980, 30)
    flux = np.concatenate([np.full(n, 150.0), np.full(30, 3e4)])
    syn = synthetic_image(
        16, positions=(np.concatenate([x, bright_x]), np.concatenate([y, bright_y])), fluxes=flux
    )
    img = ph.image_from_array(syn.data, syn.header)
    from lakepipe.astro.wcs import pixel_to_sky

    ra, dec = pixel_to_sky(img.wcs, x, y)
    ap = ph.ApertureParams(mode="fixed", radius=6.0)
    m = ph.measure_image(img, aperture_params=ap, forced_radec=(ra, dec))
    s = m.sources
    forced = s["forced"]
    assert forced.sum() == n
    assert (s["forced_index"][forced] == np.arange(n)).all()
    assert np.allclose(s["x"][forced], x, atol=1e-6) and np.allclose(s["y"][forced], y, atol=1e-6)
    assert np.allclose(s["ra"][forced], ra, atol=1e-9)
    frac = 1 - math.exp(-(6.0**2) / (2 * (3.0 / ph.FWHM_PER_SIGMA) ** 2))  # Gaussian in r=6
    mean = s["flux"][forced].mean()
    sem = s["flux"][forced].std() / math.sqrt(n)
    assert abs(mean - 150.0 * frac) < 3 * sem + 2.0
    # positions off the image are not measured
    m2 = ph.measure_image(
        img, aperture_params=ap, forced_xy=(np.array([-5.0, 10.0]), np.array([10.0, 10.0]))
    )
    assert m2.sources["forced"].sum() == 1


def test_multi_aperture_best_radius_and_keep_all(field):
    _syn, img, _ = field
    radii = [1.0, 2.0, 3.0, 4.5, 6.0]
    best = ph.measure_image(img, aperture_params=ph.ApertureParams(mode="multi", radii=radii))
    # truth: for a background-limited Gaussian the SNR peaks at r = 1.585 σ = 0.673 FWHM
    # (2.0 px here); the mostly-faint sources of the field pick it from the growth curve
    assert best.stats["aperture_radius_pix"] == 2.0
    assert set(best.sources["aperture_radius_pix"]) == {2.0}
    allr = ph.measure_image(
        img, aperture_params=ph.ApertureParams(mode="multi", radii=radii, keep="all")
    )
    n = best.stats["n_detected"]
    assert len(allr.sources["x"]) == n * len(radii)
    # curve of growth of a bright isolated star rises monotonically
    s = allr.sources
    j = int(np.argmax(np.where(s["flags"][:n] == 0, s["flux"][:n], -np.inf)))
    growth = s["flux"][j::n]
    assert np.all(np.diff(growth) > 0)


def test_fixed_aperture_in_arcsec(field):
    _syn, img, _ = field
    ap = ph.ApertureParams(mode="fixed", radius=4.0, unit="arcsec")
    m = ph.measure_image(img, aperture_params=ap)
    # truth: the header's CD matrix says 1.0 arcsec/pixel
    assert m.stats["aperture_radius_pix"] == pytest.approx(4.0, rel=1e-9)


def test_kron_flux_total(field):
    syn, img, _ = field
    m = ph.measure_image(img, aperture_params=ph.ApertureParams(kron=True))
    s = m.sources
    idx = match(s["x"], s["y"], syn.x, syn.y)
    iso = isolated(syn.x, syn.y, syn.flux, 8 * syn.fwhm_pix)
    sel = iso & (idx >= 0) & (truth_snr(syn.flux, 6.0) > 50)
    sel &= (s["flags"][np.maximum(idx, 0)] & ph.FLAG_SATURATED) == 0
    # the Kron ellipse K·a, K·b with K = max(2.5 r_K, 3.5) (PHOT_AUTOPARAMS 2.5, 3.5)
    # holds 96-100% of a point source (Kron 1980; Bertin & Arnouts 1996)
    ratio = np.median(s["flux_auto"][idx[sel]] / syn.flux[sel])
    assert 0.95 < ratio < 1.01


def test_limiting_magnitude_vs_recovery():
    # truth: stars injected on a grid in 0.1-mag steps around the expected limit; a star
    # is recovered when detected with SNR ≥ 5. The 50%-recovery magnitude is compared with
    # the analytic and random-aperture 5σ limits.
    rng = np.random.default_rng(17)
    fwhm = 3.0
    sigma_ap = math.sqrt(SKY / GAIN + (RDNOISE / GAIN) ** 2) * math.sqrt(math.pi) * 2 * fwhm
    m5 = -2.5 * math.log10(5 * sigma_ap)
    grid = m5 - 1.0 + 0.1 * np.arange(21)
    step = np.repeat(np.arange(21), 60)
    mags = grid[step]
    gx, gy = np.meshgrid(np.arange(30, 1510, 28.0), np.arange(30, 1510, 28.0))
    pick = rng.permutation(gx.size)[: len(mags) + 40]
    px, py = gx.ravel()[pick] + rng.uniform(-0.5, 0.5, len(pick)), gy.ravel()[pick]
    flux = np.concatenate([10 ** (-0.4 * mags), np.full(40, 5e4)])  # + bright PSF stars
    syn = synthetic_image(17, shape=(1536, 1536), positions=(px, py), fluxes=flux)
    img = ph.image_from_array(syn.data, syn.header)
    lp = ph.LimitingMagParams(mode="random", n_apertures=1000, seed=3)
    m = ph.measure_image(img, limiting_params=lp, seed=1)
    s = m.sources
    idx = match(s["x"], s["y"], px, py)
    found = (idx >= 0) & (s["snr"][np.maximum(idx, 0)] >= 5)
    frac = np.array([found[: len(mags)][step == k].mean() for k in range(21)])
    # 50% point by linear interpolation on the decreasing recovery curve
    k = int(np.flatnonzero(frac < 0.5)[0])
    m50 = grid[k - 1] + (frac[k - 1] - 0.5) / (frac[k - 1] - frac[k]) * (grid[k] - grid[k - 1])
    assert m.stats["mag_lim_analytic_inst"] == pytest.approx(m50, abs=0.2)
    assert m.stats["mag_lim_random_inst"] == pytest.approx(m50, abs=0.2)
    assert m.stats["n_random_apertures"] == 1000
    # seeded: the same seed gives the same random-aperture σ, another seed another one
    smask = np.zeros(img.data.shape, bool)
    sig = [
        ph.random_aperture_sigma(
            syn.data - SKY, smask, 6.0, n_apertures=300, rng=np.random.default_rng(k)
        )[0]
        for k in (5, 5, 6)
    ]
    assert sig[0] == sig[1] != sig[2]


def test_read_fits_mef_scaled_int_with_mask_bits(tmp_path):
    # truth: integer data with BSCALE/BZERO in extension 1, mask bits in a MASK HDU
    rng = np.random.default_rng(18)
    phys = rng.uniform(1000, 2000, (64, 80))
    ints = np.round((phys - 1500.0) / 0.5).astype(np.int16)
    img_hdu = fits.ImageHDU(ints, name="SCI")
    img_hdu.header["BSCALE"] = 0.5
    img_hdu.header["BZERO"] = 1500.0
    img_hdu.header.update(tan_header(80, 64))
    mask = np.zeros((64, 80), np.int32)
    mask[10, 20] = 4  # bit 2: a cosmic ray
    mask[30, 40] = 1  # bit 0: not selected below
    primary = fits.PrimaryHDU()
    primary.header["GAIN"] = 1.7
    primary.header["HIERARCH ESO DET CHIP NAME"] = "chip-1"
    path = tmp_path / "mef.fits"
    fits.HDUList([primary, img_hdu, fits.ImageHDU(mask, name="MASK")]).writeto(path)
    img = ph.read_fits_image(path, mask_bits=4)
    assert np.allclose(img.data, ints * 0.5 + 1500.0)
    assert img.mask is not None and img.mask.sum() == 1 and img.mask[10, 20]
    assert img.gain_e_per_adu == 1.7  # inherited from the primary header
    assert img.wcs is not None


def test_no_celestial_wcs_gives_null_sky_positions(field):
    syn, _img, _ = field
    hdr = syn.header.copy()
    for k in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CD1_1", "CD1_2", "CD2_1", "CD2_2"):
        del hdr[k]
    img = ph.image_from_array(syn.data[:300, :300], hdr)
    m = ph.measure_image(img)
    assert img.wcs is None
    assert m.stats["has_wcs"] is False and "no celestial WCS" in m.stats["note"]
    assert len(m.sources["x"]) > 10 and np.isnan(m.sources["ra"]).all()


def test_sip_distortion_used_for_sky_positions(field):
    # truth: astropy's all_pix2world on the same SIP header
    syn, _img, _ = field
    hdr = syn.header.copy()
    hdr["CTYPE1"], hdr["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    hdr["A_ORDER"] = hdr["B_ORDER"] = 2
    hdr["A_2_0"] = 2e-5
    hdr["B_0_2"] = -3e-5
    img = ph.image_from_array(syn.data[:400, :400], hdr)
    m = ph.measure_image(img)
    from astropy.wcs import WCS

    ra, dec = WCS(hdr).all_pix2world(m.sources["x"], m.sources["y"], 0)
    assert np.allclose(m.sources["ra"], ra % 360, atol=1e-10)
    assert np.allclose(m.sources["dec"], dec, atol=1e-10)
    # and the distortion matters at the corner (> 1 pixel = 0.28 mas... ≫ 1e-10 deg)
    from astropy.wcs import WCS as W

    plain = W(syn.header)
    r0, _ = plain.all_pix2world(m.sources["x"], m.sources["y"], 0)
    assert np.abs(r0 - ra).max() > 1e-4


def test_deterministic(field):
    syn, _img, m = field
    again = ph.measure_image(ph.image_from_array(syn.data, syn.header))
    for k, v in m.sources.items():
        assert np.array_equal(v, again.sources[k], equal_nan=True), k


def test_archive_seeing_seeds_the_kernel_and_a_wrong_one_is_corrected():
    # truth: Gaussian PSF of FWHM 3.0 px. Whatever the archive claims (nothing, 3.3 px:
    # within the 20 % tolerance, 5.0 px: far off), the measured FWHM is the truth, and
    # the detections are those of a kernel near the true FWHM
    syn = synthetic_image(23, shape=(800, 800), n_stars=600, fwhm_pix=3.0, snr_range=(3.0, 1000.0))
    img = ph.image_from_array(syn.data, syn.header)
    runs = {p: ph.measure_image(img, fwhm_prior_pix=p) for p in (None, 3.3, 5.0)}
    for prior, m in runs.items():
        assert m.stats["fwhm_pix"] == pytest.approx(3.0, rel=0.02), prior
        assert m.stats["n_fwhm_stars"] >= 10
        assert m.stats["n_detected"] == pytest.approx(runs[None].stats["n_detected"], rel=0.02)
    assert math.isnan(runs[None].stats["fwhm_prior_pix"])
    assert runs[3.3].stats["fwhm_prior_pix"] == 3.3 and runs[3.3].stats["note"] == ""
    assert "detected again with the measured FWHM" in runs[5.0].stats["note"]
    # a kernel of 5 px kept would lose faint stars: the corrected run finds them
    five = ph.measure_image(
        img, fwhm_prior_pix=5.0, seeing_params=ph.SeeingParams(prior_tolerance=10)
    )
    faint = truth_snr(syn.flux, 3.0) < 8
    found = {
        k: (match(m.sources["x"], m.sources["y"], syn.x[faint], syn.y[faint]) >= 0).sum()
        for k, m in (("corrected", runs[5.0]), ("kept", five))
    }
    assert found["corrected"] >= 1.1 * found["kept"]  # 63 vs 54 (SNR x0.88 at 5/3 width)
    # use_prior off: the pre-pass, as without an archive seeing
    off = ph.measure_image(img, fwhm_prior_pix=5.0, seeing_params=ph.SeeingParams(use_prior=False))
    assert off.stats["n_detected"] == runs[None].stats["n_detected"]


def test_column_flags_equal_summing_a_column_mask():
    # truth: the apertures that overlap a full-frame mask of the same columns (sep's exact
    # circle-pixel overlap), away from the top and bottom edges
    rng = np.random.default_rng(4)
    ny, nx = 200, 120
    cols = np.array([10, 50, 51, 52, 119])
    mask = np.zeros((ny, nx), np.uint8)
    mask[:, cols] = 1
    x = rng.uniform(0, nx - 1, 4000)
    y = rng.uniform(50, 150, 4000)
    r = rng.uniform(0.3, 4.0, 4000)
    nmask, _, _ = sep.sum_circle(mask, x, y, r, subpix=0)
    flags = ph.column_flags(x, r, cols)
    assert np.array_equal((flags & ph.FLAG_MASKED) != 0, nmask > 1e-9)
    inside = nmask >= (math.pi * r**2) * (1 - 1e-9)
    assert np.array_equal((flags & ph.FLAG_ALL_MASKED) != 0, inside)
    assert inside.sum() > 10  # small apertures inside the three-column run


def test_fill_columns_interpolates_between_good_neighbours():
    # truth: a plane z = 3x + 2y; whole bad columns are refilled from their nearest good
    # neighbours (exactly, for a linear signal); at the image edge the neighbour is copied
    yy, xx = np.mgrid[0:40, 0:30].astype(np.float32)
    plane = 3 * xx + 2 * yy
    data = plane.copy()
    data[:, [0, 7, 8, 9, 20]] = -999.0
    ph.fill_columns(data, np.array([0, 7, 8, 9, 20]))
    assert np.allclose(data[:, 1:], plane[:, 1:], atol=1e-4)
    assert np.array_equal(data[:, 0], plane[:, 1])
    assert ph.column_runs(np.array([9, 7, 8, 20, 0])) == [(0, 0), (7, 9), (20, 20)]


def test_archive_seeing_in_a_crowded_field_still_finds_fwhm_stars():
    # truth: Moffat β = 2.5 PSF of FWHM 2.2 px, 3000 stars in 1000² px. On the full-depth
    # catalogue the isophotal sizes overstate the FWHM and too few stars look isolated;
    # the archive's seeing (right, or 36 % off) sets the isolation scale instead
    syn = synthetic_image(3, n_stars=3000, fwhm_pix=2.2, psf="moffat", moffat_beta=2.5)
    img = ph.image_from_array(syn.data, syn.header)
    for prior in (2.2, 3.0):
        m = ph.measure_image(img, fwhm_prior_pix=prior)
        assert m.stats["n_fwhm_stars"] == 12, prior
        assert m.stats["fwhm_pix"] == pytest.approx(2.2, rel=0.02), prior
    # an implausible archive value (wrong units, a placeholder) is not used at all
    m = ph.measure_image(img, fwhm_prior_pix=999.0)
    assert "archive seeing 999 px ignored" in m.stats["note"]
    assert m.stats["fwhm_pix"] == pytest.approx(2.2, rel=0.02)


def test_fwhm_star_next_to_the_far_edge():
    # truth: one Gaussian star of FWHM 4 px 8.7 px from the right edge, whose rounded
    # position sits exactly on the stamp margin: it is fitted (or left out), never a
    # stamp one pixel short
    ny = nx = 80
    s = 4.0 / ph.FWHM_PER_SIGMA
    yy, xx = np.mgrid[0:ny, 0:nx]
    rng = np.random.default_rng(1)

    def star(x0, y0, f):
        return f * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s)) / (2 * np.pi * s * s)

    data = rng.normal(0, 5, (ny, nx)) + star(20.2, 30.1, 2e5) + star(nx - 9.3, 50.2, 1e5)
    data = data.astype(np.float32)
    objs = sep.extract(data, 5, err=5.0)
    objs["a"] = objs["b"] = 1.4 / ph.FWHM_PER_SIGMA  # rough FWHM 1.5 px: stamp margin 9
    fwhm, n, _ = ph.estimate_fwhm(data, objs, rms=5.0, saturate_adu=None)
    assert n >= 1 and fwhm == pytest.approx(4.0, rel=0.03)


def test_smooth_map_reads_the_background_anywhere():
    # truth: sep's own full-frame background map of a sky with a 40 ADU gradient and a
    # bump; the 8-px grid read back bilinearly matches it at every pixel centre
    syn = synthetic_image(31, shape=(500, 700), n_stars=200)
    yy, xx = np.mgrid[0:500, 0:700]
    data = syn.data + (0.06 * xx + 30 * np.exp(-((xx - 400) ** 2 + (yy - 200) ** 2) / 2e4))
    bkg = ph.background(data.astype(np.float32), None, ph.BackgroundParams())
    full = bkg.back()
    smooth = ph.SmoothMap(full)
    rng = np.random.default_rng(0)
    xi, yi = rng.integers(0, 700, 5000), rng.integers(0, 500, 5000)
    assert np.abs(smooth(xi, yi) - full[yi, xi]).max() < 0.01 * bkg.globalrms
    # positions off the image read the nearest edge; a one-row image is its mean
    assert smooth(np.array([-5.0]), np.array([600.0]))[0] == pytest.approx(full[499, 0], abs=1e-3)
    assert ph.SmoothMap(np.full((1, 50), 7.0))(np.array([3.0]), np.array([0.0]))[
        0
    ] == pytest.approx(7.0)
    # measure_image's per-source background_adu is that map under each source
    m = ph.measure_image(ph.image_from_array(data, syn.header))
    s = m.sources
    near = full[np.round(s["y"]).astype(int), np.round(s["x"]).astype(int)]
    assert np.abs(s["background_adu"] - near).max() < 0.01 * bkg.globalrms
