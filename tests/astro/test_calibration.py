"""Photometric calibration against simulated truth and known answers."""

from __future__ import annotations

import numpy as np
import pytest

from lakepipe.astro.calibration import (
    calibrated_mag,
    fit_zeropoint,
    instrumental_mag,
    isolated,
    limiting_mag,
    reference_band_mag,
)


def _exposure(
    rng: np.random.Generator,
    n: int,
    zp: float,
    colour_term: float = 0.0,
    outliers: int = 0,
    sky_sigma_adu: float = 40.0,
    gain: float = 6.0,
) -> dict[str, np.ndarray]:
    """Stars with true reference mags, photon + sky noise, a few blended/variable outliers."""
    g = rng.uniform(14.0, 19.5, n)
    gr = rng.normal(0.6, 0.35, n)
    true_flux = 10 ** (-0.4 * (g - zp - colour_term * gr))  # ADU
    flux_err = np.sqrt(true_flux / gain + sky_sigma_adu**2)
    flux = true_flux + rng.normal(0.0, flux_err)
    ref_err = np.full(n, 0.01)
    mag_ref = g + rng.normal(0.0, ref_err)
    mag_ref[:outliers] -= rng.uniform(0.3, 1.5, outliers)  # brighter: blends in the catalogue
    mi, ei = instrumental_mag(flux, flux_err)
    return {"mi": mi, "ei": ei, "ref": mag_ref, "ref_err": ref_err, "gr": gr, "flux_err": flux_err}


def test_zeropoint_within_002_mag_for_20_or_more_stars() -> None:
    """Truth: the simulated zeropoint. Issue 5 acceptance: |ΔZP| <= 0.02 mag, >= 20 stars."""
    rng = np.random.default_rng(2025)
    deltas, pulls = [], []
    for k in range(300):
        zp = rng.uniform(25.8, 26.6)
        n = int(rng.integers(20, 200))
        e = _exposure(rng, n, zp, outliers=int(rng.integers(0, n // 10 + 1)))
        fit = fit_zeropoint(e["mi"], e["ei"], e["ref"], e["ref_err"])
        deltas.append(fit.zeropoint_mag - zp)
        pulls.append((fit.zeropoint_mag - zp) / fit.zeropoint_err_mag)
        assert fit.n_stars == n
        if k == 0:
            assert fit.n_used < n or n // 10 == 0
    deltas = np.array(deltas)
    assert np.max(np.abs(deltas)) <= 0.02
    assert abs(np.mean(deltas)) < 0.002  # no bias
    # the reported error is honest: pulls have unit scatter
    assert 0.7 < np.std(pulls) < 1.4


def test_outliers_are_clipped() -> None:
    """Truth: 8 of 40 stars carry catalogue offsets of 0.3-1.5 mag; all 8 are rejected."""
    rng = np.random.default_rng(1)
    e = _exposure(rng, 40, 26.0, outliers=8)
    fit = fit_zeropoint(e["mi"], e["ei"], e["ref"], e["ref_err"])
    assert not fit.used[:8].any()
    assert fit.used[8:].sum() >= 30
    assert fit.zeropoint_mag == pytest.approx(26.0, abs=0.02)
    assert fit.chi2_dof == pytest.approx(1.0, abs=0.6)


def test_colour_term_fixed_and_fitted() -> None:
    """Truth: a colour term of 0.12 mag/mag in the simulation."""
    rng = np.random.default_rng(3)
    e = _exposure(rng, 400, 26.2, colour_term=0.12)
    fixed = fit_zeropoint(e["mi"], e["ei"], e["ref"], e["ref_err"], colour=e["gr"],
                          colour_term=0.12)  # fmt: skip
    fitted = fit_zeropoint(e["mi"], e["ei"], e["ref"], e["ref_err"], colour=e["gr"],
                           colour_term=None)  # fmt: skip
    ignored = fit_zeropoint(e["mi"], e["ei"], e["ref"], e["ref_err"])
    assert fixed.zeropoint_mag == pytest.approx(26.2, abs=0.01)
    assert fitted.colour_term == pytest.approx(0.12, abs=0.02)
    assert fitted.zeropoint_mag == pytest.approx(26.2, abs=0.02)
    # ignoring the colour term biases ZP by c * <g - r> = 0.12 * 0.6 and inflates scatter
    assert ignored.zeropoint_mag - 26.2 == pytest.approx(0.072, abs=0.02)
    assert ignored.scatter_mag > fixed.scatter_mag


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_exact_weighted_mean_known_answer(scale: float) -> None:
    """Hand computation: offsets 1.0, 1.1, 1.3 with errors (0.1, 0.1, 0.2)·scale, no floor;
    error 1/sqrt(Σw), times sqrt(χ²/dof) when that exceeds 1 (scale 0.25: χ²/dof ≈ 15)."""
    err = np.array([0.1, 0.1, 0.2]) * scale
    y = np.array([1.0, 1.1, 1.3])
    fit = fit_zeropoint([0.0, 0.0, 0.0], err, y, err_floor_mag=0.0, clip_sigma=10.0)
    w = 1.0 / err**2
    mean = np.sum(w * y) / w.sum()
    chi2 = np.sum(w * (y - mean) ** 2) / 2
    assert fit.zeropoint_mag == pytest.approx(mean, abs=1e-12)  # 1.0777...
    assert fit.chi2_dof == pytest.approx(chi2, rel=1e-12)
    expected = np.sqrt(1.0 / w.sum()) * max(1.0, np.sqrt(chi2))
    assert fit.zeropoint_err_mag == pytest.approx(expected, rel=1e-12)
    assert fit.n_used == 3
    with pytest.raises(ValueError, match="at least 3"):
        fit_zeropoint([0.0, np.nan], [0.1, 0.1], [1.0, 1.0])


def test_instrumental_calibrated_and_limiting_magnitudes() -> None:
    """Known answers: -2.5 log10(100) = -5; 1.0857 σF/F; ZP - 2.5 log10(5·100)."""
    mi, ei = instrumental_mag(np.array([100.0, -1.0]), np.array([10.0, 1.0]))
    assert mi[0] == pytest.approx(-5.0)
    assert ei[0] == pytest.approx(2.5 / np.log(10) * 0.1)
    assert np.isnan(mi[1]) and np.isnan(ei[1])
    mag, err = calibrated_mag(mi[:1], ei[:1], 25.0, 0.03)
    assert mag[0] == pytest.approx(20.0)
    assert err[0] == pytest.approx(np.hypot(2.5 / np.log(10) * 0.1, 0.03))
    mag_c, _ = calibrated_mag([-5.0, -5.0], [0.1, 0.1], 25.0, 0.0, colour=[1.0, np.nan],
                              colour_term=0.1)  # fmt: skip
    np.testing.assert_allclose(mag_c, [20.1, 20.0])
    assert limiting_mag(25.0, np.array([90.0, 100.0, 110.0, np.nan])) == pytest.approx(
        25.0 - 2.5 * np.log10(500.0)
    )
    assert np.isnan(limiting_mag(25.0, np.array([np.nan])))


def test_limiting_mag_matches_simulated_5_sigma_depth() -> None:
    """Truth: sources injected at the computed limit are detected at S/N ≈ 5."""
    rng = np.random.default_rng(9)
    zp, sky = 26.0, 50.0
    lim = limiting_mag(zp, rng.normal(sky, 1.0, 500))
    flux = 10 ** (-0.4 * (lim - zp))
    assert flux / sky == pytest.approx(5.0, rel=0.01)


def test_band_mapping_and_isolation() -> None:
    """Band and colour from catalogue magnitudes; a close pair is not isolated."""
    mags = {"g": np.array([15.0, 16.0]), "r": np.array([14.5, 15.2])}
    m, c = reference_band_mag(mags, "g", colour=("g", "r"))
    np.testing.assert_allclose(m, [15.0, 16.0])
    np.testing.assert_allclose(c, [0.5, 0.8])
    with pytest.raises(KeyError, match="'i'"):
        reference_band_mag(mags, "i")
    ra = np.array([10.0, 10.0 + 2.0 / 3600, 20.0])
    dec = np.array([0.0, 0.0, 0.0])
    np.testing.assert_array_equal(isolated(ra, dec, 3.0), [False, False, True])
    np.testing.assert_array_equal(isolated(ra, dec, 1.0), [True, True, True])
