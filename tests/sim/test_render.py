"""Pixel-level truths of the renderer: flux conservation, centroids, noise statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import ndtr

from lakepipe.sim import render
from lakepipe.sim.survey import limiting_mag


def test_psf_integrates_to_injected_flux_and_is_centred():
    # truth: a Gaussian integrated over pixels with erf sums to the injected flux and its
    # first moment is the injected position (noise-free, so to 1e-9 / 1e-6 px)
    x, y, flux, sigma = np.array([40.3]), np.array([31.77]), np.array([12345.0]), 1.3
    img = render.render_psfs((64, 80), x, y, flux, sigma)
    assert img.sum() == pytest.approx(12345.0, rel=1e-9)
    yy, xx = np.mgrid[0:64, 0:80]
    assert (img * xx).sum() / img.sum() == pytest.approx(40.3, abs=1e-6)
    assert (img * yy).sum() / img.sum() == pytest.approx(31.77, abs=1e-6)
    # second moment: sigma² + 1/12 (the pixel box)
    var_x = (img * (xx - 40.3) ** 2).sum() / img.sum()
    assert var_x == pytest.approx(sigma**2 + 1 / 12, rel=1e-6)


def test_psf_partly_off_image_keeps_only_the_on_image_part():
    # truth: a star centred on the left edge (x = -0.5) puts exactly half its flux on chip
    img = render.render_psfs((50, 50), np.array([-0.5]), np.array([25.0]), np.array([1000.0]), 1.0)
    assert img.sum() == pytest.approx(500.0, rel=1e-9)


def test_trail_conserves_flux_and_spans_the_motion():
    # truth: a trail from x=20 to x=30 keeps its total flux and its centroid is x=25
    x, y, f = render.trail_points(
        np.array([20.0]), np.array([20.0]), np.array([30.0]), np.array([20.0]), np.array([5000.0])
    )
    assert f.sum() == pytest.approx(5000.0)
    assert np.diff(x).max() <= 0.2 + 1e-12
    img = render.render_psfs((40, 60), x, y, f, 1.0)
    xx = np.arange(60)[None, :]
    assert (img * xx).sum() / img.sum() == pytest.approx(25.0, abs=1e-6)


def test_noise_has_poisson_plus_read_variance():
    # truth: the pixel variance of a flat sky is (sky·g + RN²)/g² ADU² and the mean is sky
    sky, gain, rn = 150.0, 6.2, 8.0
    rng = np.random.default_rng(5)
    img = render.add_noise(np.zeros((400, 400)), sky, gain, rn, rng)
    expected_var = (sky * gain + rn**2) / gain**2
    assert img.dtype == np.float32
    assert img.mean() == pytest.approx(sky, abs=5 * math.sqrt(expected_var / img.size))
    # std of a variance estimate with n samples: var·sqrt(2/n) → 0.35 %; allow 1.5 %
    assert img.var() == pytest.approx(expected_var, rel=0.015)


def test_low_counts_are_drawn_exactly_poisson():
    # truth: with λ = 3 e- (below the Gaussian threshold) and no read noise, pixel values
    # in electrons are integers with mean and variance 3
    rng = np.random.default_rng(9)
    img = render.add_noise(np.zeros((300, 300)), 3.0, 1.0, 0.0, rng)
    assert np.allclose(img, np.round(img))
    assert img.mean() == pytest.approx(3.0, abs=0.03)
    assert img.var() == pytest.approx(3.0, rel=0.03)


def test_limiting_magnitude_is_the_measured_five_sigma_flux():
    # truth: optimal PSF-weighted photometry of sources injected at the 5σ limit, with
    # the same sky, seeing, gain and read noise, gives SNR = mean/std = 5. With n = 900
    # sources the std is known to 1/sqrt(2n) = 2.4 %; allow 8 %.
    sky, gain, rn, zp, fwhm = 120.0, 6.2, 8.0, 26.3, 2.1
    sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
    mlim = float(limiting_mag(zp, fwhm, sky, gain, rn))
    flux = 10 ** (-0.4 * (mlim - zp))
    rng = np.random.default_rng(11)
    n_side, step = 30, 16
    cx = (np.arange(n_side) * step + 8.0)[None, :].repeat(n_side, 0).ravel()
    cy = (np.arange(n_side) * step + 8.0)[:, None].repeat(n_side, 1).ravel()
    cx = cx + rng.uniform(-0.5, 0.5, cx.size)
    cy = cy + rng.uniform(-0.5, 0.5, cy.size)
    shape = (n_side * step, n_side * step)
    model = render.render_psfs(shape, cx, cy, np.full(cx.size, flux), sigma)
    img = render.add_noise(model, sky, gain, rn, rng) - sky
    est = []
    edges = np.arange(16) - 0.5
    for x, y in zip(cx, cy, strict=True):
        j0, i0 = round(y) - 7, round(x) - 7
        # the unit-flux PSF over the 15x15 window, integrated over pixels like the renderer
        pp = np.outer(
            np.diff(ndtr((j0 + edges - y) / sigma)), np.diff(ndtr((i0 + edges - x) / sigma))
        )
        est.append((pp * img[j0 : j0 + 15, i0 : i0 + 15]).sum() / (pp * pp).sum())
    est = np.array(est)
    assert est.mean() == pytest.approx(flux, rel=0.03)
    assert est.mean() / est.std() == pytest.approx(5.0, rel=0.08)


def test_cosmic_rays_and_defects_are_deterministic():
    a = render.cosmic_rays(np.random.default_rng(3), (100, 120), 10, 6.2)
    b = render.cosmic_rays(np.random.default_rng(3), (100, 120), 10, 6.2)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    # truth: the per-pixel deposits add up to the per-hit totals
    assert a[2].sum() == pytest.approx(a[4].sum())
    _iy, ix, _adu, col = render.detector_defects(np.random.default_rng(1), (3080, 3072))
    assert len(ix) == round(2e-5 * 3080 * 3072)
    assert 3072 // 8 <= col < 3072 - 3072 // 8
