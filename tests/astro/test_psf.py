"""Batched Moffat FWHM fits against injected PSFs and an independent solver.

Stamps are rendered from known profiles (Gaussian or Moffat, integrated over the pixel
with 10×10 sub-samples) with Gaussian noise from an explicit seed; the truth is the
injected FWHM.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize

from lakepipe.astro import psf

SUB10 = (np.arange(10) + 0.5) / 10.0 - 0.5


def render(fwhm: float, x0: float, y0: float, *, beta: float | None, size: int, amp: float):
    """A pixel-integrated star (Gaussian when ``beta`` is None, else Moffat β)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    acc = np.zeros((size, size))
    for dx in SUB10:
        for dy in SUB10:
            r2 = (xx + dx - x0) ** 2 + (yy + dy - y0) ** 2
            if beta is None:
                sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
                acc += np.exp(-r2 / (2.0 * sigma**2))
            else:
                alpha2 = fwhm**2 / (4.0 * (2.0 ** (1.0 / beta) - 1.0))
                acc += (1.0 + r2 / alpha2) ** (-beta)
    return amp * acc / SUB10.size**2


def stamps_for(fwhm: float, beta: float | None, n: int, seed: int, noise: float = 5.0):
    rng = np.random.default_rng(seed)
    h = math.ceil(2.0 * fwhm) + 2
    size = 2 * h + 1
    x0 = h + rng.uniform(-0.5, 0.5, n)
    y0 = h + rng.uniform(-0.5, 0.5, n)
    amp = rng.uniform(3e3, 3e4, n)
    st = np.stack(
        [
            render(fwhm, a, b, beta=beta, size=size, amp=f) + rng.normal(0, noise, (size, size))
            for a, b, f in zip(x0, y0, amp, strict=True)
        ]
    )
    # start from rounded positions and a 20 % wrong FWHM, as estimate_fwhm would
    return st, np.round(x0), np.round(y0), np.full(n, 1.2 * fwhm)


@pytest.mark.parametrize(
    ("fwhm", "beta"), [(1.2, None), (2.0, None), (3.5, None), (3.0, 2.5), (2.2, 4.0)]
)
def test_batched_fit_recovers_the_injected_fwhm(fwhm, beta):
    st, x0, y0, guess = stamps_for(fwhm, beta, n=12, seed=int(fwhm * 10))
    out = psf.fit_fwhm(st, x0, y0, guess)
    assert np.isfinite(out).all()
    assert np.median(out) == pytest.approx(fwhm, rel=0.01)
    assert np.abs(out / fwhm - 1.0).max() < 0.03


def test_batched_fit_equals_scipy_least_squares_star_by_star():
    # an independent solver (scipy's trust-region reflective, bounded) on the same model
    st, x0, y0, guess = stamps_for(2.4, 3.0, n=6, seed=5)
    ours = psf.fit_fwhm(st, x0, y0, guess)
    size = st.shape[1]
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    xs = xx.ravel()[None] + psf._SUB_DX[:, None]
    ys = yy.ravel()[None] + psf._SUB_DY[:, None]
    for k in range(len(st)):
        p0 = [st[k].max(), x0[k], y0[k], guess[k], 0.25, 0.0]
        lo = [0.0, x0[k] - 2, y0[k] - 2, 0.3, psf.U_MIN, -np.inf]
        hi = [np.inf, x0[k] + 2, y0[k] + 2, 2.0 * size, psf.U_MAX, np.inf]
        res = optimize.least_squares(
            lambda p, k=k: psf.moffat_pixels(p[None], xs, ys)[0] - st[k].ravel(),
            p0,
            bounds=(lo, hi),
            xtol=1e-12,
            ftol=1e-12,
        )
        assert ours[k] == pytest.approx(res.x[3], rel=1e-4)


def test_gaussian_stars_hold_beta_at_its_bound():
    # a Gaussian is the β → ∞ limit: 1/β runs into its lower bound and is held there
    # while the FWHM converges (the projected step), instead of stalling the fit
    st, x0, y0, guess = stamps_for(1.6, None, n=8, seed=8, noise=1.0)
    out = psf.fit_fwhm(st, x0, y0, guess)
    assert np.abs(out / 1.6 - 1.0).max() < 0.01


def test_jacobian_matches_finite_differences():
    size = 13
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    xs = xx.ravel()[None] + psf._SUB_DX[:, None]
    ys = yy.ravel()[None] + psf._SUB_DY[:, None]
    p = np.array([[1000.0, 6.2, 5.9, 1.4, 0.3, 5.0], [500.0, 5.5, 6.4, 3.1, 0.1, -2.0]])
    model, jac = psf.moffat_pixels(p, xs, ys, jac=True)
    for k in range(psf.N_PARAMS):
        h = 1e-6 * max(1.0, abs(p[0, k]))
        dp = p.copy()
        dp[:, k] += h
        num = (psf.moffat_pixels(dp, xs, ys) - model) / h
        assert np.abs(num - jac[..., k]).max() <= 1e-4 * np.abs(jac[..., k]).max()


def test_a_hot_pixel_is_not_given_a_seeing():
    # one bright pixel on noise: no PSF to fit; the fit fails or ends at the FWHM floor,
    # which estimate_fwhm's 0.5 px cut rejects
    rng = np.random.default_rng(2)
    st = rng.normal(0, 5.0, (3, 13, 13))
    st[:, 6, 6] += [4e4, 2e4, 8e3]
    out = psf.fit_fwhm(st, np.full(3, 6.0), np.full(3, 6.0), np.full(3, 2.0))
    assert not (out > 0.5).any()


def test_moffat_fwhm_formula():
    # FWHM = 2 α sqrt(2^(1/β) - 1) (Moffat 1969): the profile is half its peak there
    alpha, beta = 2.7, 3.3
    half = psf.moffat_fwhm(alpha, beta) / 2.0
    assert (1.0 + half**2 / alpha**2) ** (-beta) == pytest.approx(0.5, rel=1e-12)
