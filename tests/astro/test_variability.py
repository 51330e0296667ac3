"""Lightcurve statistics: hand-computed values and simulated constant/variable/transient."""

from __future__ import annotations

import numpy as np
import pytest

from lakepipe.astro.variability import STAT_COLUMNS, lightcurve_stats


def test_known_answer_four_points() -> None:
    """By hand: m = 10, 12, 11, 13 (σ = 1): m̄ = 11.5, χ²/dof = 5/3,
    J = -(1 + sqrt(1/3) + 1)/3 (δ = sqrt(4/3)·r), η = (4+1+4)/3 / (5/3) = 1.8."""
    s = lightcurve_stats([7, 7, 7, 7], [1.0, 2.0, 3.0, 4.0], [10, 12, 11, 13], [1, 1, 1, 1])
    assert set(STAT_COLUMNS) <= set(s)
    assert s["group"].tolist() == [7]
    assert s["mean_mag"][0] == pytest.approx(11.5)
    assert s["mean_mag_err"][0] == pytest.approx(0.5)
    assert s["chi2_dof"][0] == pytest.approx(5 / 3)
    assert s["stetson_j"][0] == pytest.approx(-(2 + np.sqrt(1 / 3)) / 3)
    assert s["von_neumann_eta"][0] == pytest.approx(1.8)
    assert s["amplitude_mag"][0] == pytest.approx(3.0)
    assert s["n_det"][0] == 4 and s["n_obs"][0] == 4


def test_rows_in_any_order_and_weights() -> None:
    """Shuffled rows give the same result (time order is restored); weights are 1/σ²."""
    s = lightcurve_stats([2, 1, 2, 1], [2.0, 9.0, 1.0, 3.0], [11.0, 5.0, 10.0, 6.0],
                         [0.1, 1.0, 0.2, 1.0])  # fmt: skip
    assert s["group"].tolist() == [1, 2]
    assert s["mean_mag"][1] == pytest.approx((10 / 0.04 + 11 / 0.01) / (1 / 0.04 + 1 / 0.01))
    assert s["first_mjd"].tolist() == [3.0, 1.0]
    assert s["last_mjd"].tolist() == [9.0, 2.0]
    single = lightcurve_stats([1], [1.0], [15.0], [0.1])
    assert np.isnan(single["chi2_dof"][0]) and np.isnan(single["von_neumann_eta"][0])


def test_variables_and_transient_stand_out() -> None:
    """Truth: 450 constant stars, 40 sinusoidal variables (P = 10 d), 10 fading transients
    with forced-photometry upper limits after they fade. Each class is separated."""
    rng = np.random.default_rng(17)
    n_const, n_var, n_tr, n_ep = 450, 40, 10, 30
    t = np.sort(rng.uniform(0.0, 30.0, n_ep))
    rows = []
    for obj in range(n_const + n_var + n_tr):
        base = rng.uniform(14.0, 18.0)
        err = np.full(n_ep, 0.03 + 0.02 * (base - 14.0))
        m = base + rng.normal(0.0, err)
        ul = np.zeros(n_ep, dtype=bool)
        lim = np.full(n_ep, 20.5)
        if n_const <= obj < n_const + n_var:
            m += 0.4 * np.sin(2 * np.pi * t / 10.0 + rng.uniform(0, 2 * np.pi))
        elif obj >= n_const + n_var:
            m = 16.0 + 0.25 * t + rng.normal(0.0, err)  # fades 0.25 mag/day
            ul = m > 20.5  # not detected past the 5-sigma limit
        rows.append((np.full(n_ep, obj), t, m, err, ul, lim))
    g, tt, m, e, ul, lim = (np.concatenate(c) for c in zip(*rows, strict=True))
    s = lightcurve_stats(g, tt, np.where(ul, np.nan, m), e, upper_limit=ul, limit_mag=lim)

    const = slice(0, n_const)
    var = slice(n_const, n_const + n_var)
    tr = slice(n_const + n_var, None)
    assert np.median(s["chi2_dof"][const]) == pytest.approx(1.0, abs=0.15)
    assert np.median(s["von_neumann_eta"][const]) == pytest.approx(2.0, abs=0.2)
    assert abs(np.median(s["stetson_j"][const])) < 0.1
    # every variable beats the 99th percentile of constants on χ²/dof and Stetson J
    assert np.min(s["chi2_dof"][var]) > np.percentile(s["chi2_dof"][const], 99)
    assert np.min(s["stetson_j"][var]) > np.percentile(s["stetson_j"][const], 99)
    assert np.max(s["von_neumann_eta"][var]) < np.percentile(s["von_neumann_eta"][const], 1)
    # transients: upper limits counted, and brighter than their mean (violated)
    assert np.all(s["n_upper_limits"][tr] > 5)
    # limits deeper than the mean brightness: it should have been seen, so it faded
    assert np.all(s["n_limits_violated"][tr] == s["n_upper_limits"][tr])
    assert np.all(s["n_upper_limits"][const] == 0)
    assert np.all(s["amplitude_mag"][tr] > 3.0)
    assert np.all(s["n_det"][tr] + s["n_upper_limits"][tr] == n_ep)


def test_limit_violations_flag_disappearance() -> None:
    """A star of mean 15 mag not detected where the limit was 19 mag: one violated limit."""
    s = lightcurve_stats([1, 1, 1, 1], [1, 2, 3, 4], [15.0, 15.1, np.nan, 14.9],
                         [0.02, 0.02, np.nan, 0.02], upper_limit=[False, False, True, False],
                         limit_mag=[20.0, 20.0, 19.0, 20.0])  # fmt: skip
    assert s["n_upper_limits"][0] == 1
    assert s["n_limits_violated"][0] == 1
    assert s["mean_mag"][0] == pytest.approx(15.0)
