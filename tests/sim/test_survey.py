"""The virtual survey's schedule, conditions, WCS and sky content against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from lakepipe.sim import fitsio
from lakepipe.sim.catalog import COUNT_SLOPE_DEX_PER_MAG, SkyModel, sample_power_law_mags
from lakepipe.sim.survey import (
    EXTINCTION_MAG_PER_AIRMASS,
    ZP0_MAG,
    Survey,
    SurveyConfig,
    airmass_kasten_young,
    altitude_deg,
    gmst_deg,
    limiting_mag,
)
from lakepipe.sim.tan import TanWcs, cd_from_scale_rotation
from lakepipe.sim.variables import transient_mag, variable_dmag

SMALL = {"naxis1": 512, "naxis2": 512, "n_fields": 2, "n_nights": 3, "n_stars": 600}


def test_gmst_matches_meeus_example():
    # truth: Meeus, Astronomical Algorithms, example 12.a: 1987 April 10, 0h UT
    # (JD 2446895.5) has mean sidereal time 13h10m46.3668s = 197.693195 deg
    assert gmst_deg(np.array([2446895.5 - 2400000.5]))[0] == pytest.approx(197.693195, abs=1e-5)


def test_altitude_and_airmass():
    # truth: at upper transit the altitude is 90 - |lat - dec| (Palomar lat 33.3563);
    # Kasten & Young airmass is 1 at the zenith and ~2.0 at 30 deg altitude (1.9942)
    s = Survey(SurveyConfig(**SMALL))
    e = s.exposures[0]
    from lakepipe.sim.survey import _transit_mjd

    t = _transit_mjd(150.0, math.floor(e.mjd))
    alt = altitude_deg(np.array([150.0]), np.array([2.2]), np.array([t]))[0]
    assert alt == pytest.approx(90 - (33.3563 - 2.2), abs=1e-6)
    assert airmass_kasten_young(np.array([90.0]))[0] == pytest.approx(1.0, abs=1e-3)
    assert airmass_kasten_young(np.array([30.0]))[0] == pytest.approx(1.9942, abs=2e-3)


def test_schedule_is_deterministic_and_realistic():
    a = Survey(SurveyConfig(**SMALL)).exposure_table()
    b = Survey(SurveyConfig(**SMALL)).exposure_table()
    assert a.equals(b)
    c = Survey(SurveyConfig(**{**SMALL, "seed": 8})).exposure_table()
    assert not a.column("seeing_fwhm_arcsec").equals(c.column("seeing_fwhm_arcsec"))
    # 2 fields x 3 nights x 3 visits, unique ids, in time order
    assert a.num_rows == 18
    ids = a.column("exposure_id").to_pylist()
    assert len(set(ids)) == 18
    mjd = np.asarray(a.column("mjd"))
    assert np.all(np.diff(mjd) > 0)
    # every exposure observed above 30 deg altitude (airmass < 2) with plausible seeing
    assert np.all(np.asarray(a.column("airmass")) < 2.0)
    assert np.all(np.asarray(a.column("airmass")) >= 1.0)
    see = np.asarray(a.column("seeing_fwhm_arcsec"))
    assert see.min() >= 1.0 and see.max() <= 5.0 and see.std() > 0.05
    # nights are the UTC dates of the mid-exposure times
    assert a.column("night").to_pylist()[0] == "2025-01-01"


@pytest.mark.parametrize("exptime_s", [30.0, 120.0])
def test_zeropoint_and_depth_are_consistent(exptime_s):
    # truth: MAGZP = ZP0 - k (X - 1) - cloud with cloud >= 0; mag_lim recomputed from the
    # table's own sky, seeing, zeropoint, gain and read noise
    t = Survey(SurveyConfig(**SMALL, exptime_s=exptime_s)).exposure_table().to_pylist()
    for r in t:
        k = EXTINCTION_MAG_PER_AIRMASS[r["filter"]]
        clear = (
            ZP0_MAG[r["filter"]] + 2.5 * math.log10(r["exptime_s"] / 30) - k * (r["airmass"] - 1)
        )
        assert r["zeropoint_mag"] <= clear + 1e-12
        assert r["zeropoint_mag"] > clear - 0.5
        ml = limiting_mag(
            r["zeropoint_mag"],
            r["seeing_fwhm_arcsec"] / r["pixscale_arcsec"],
            r["sky_adu"],
            r["gain_e_per_adu"],
            r["rdnoise_e"],
        )
        assert float(ml) == pytest.approx(r["mag_lim"], abs=1e-9)
        # deeper by ~2.5 log10(2) = 0.75 mag for 4x the time (sky-limited: S/N ∝ sqrt(t))
        assert 19.5 + 0.75 * (exptime_s > 30) < r["mag_lim"] < 22.5 + 0.75 * (exptime_s > 30)


def test_tan_round_trip_and_agreement_with_astropy():
    # truth: sky -> pixel -> sky returns the input to < 1 mas, and our TAN agrees with
    # astropy/WCSLIB reading the FITS header we write to < 1e-6 px
    wcs = TanWcs(150.1, 2.3, 256.5, 256.5, cd_from_scale_rotation(1.01, 0.37))
    rng = np.random.default_rng(0)
    x = rng.uniform(-100, 600, 500)
    y = rng.uniform(-100, 600, 500)
    ra, dec = wcs.pix2world(x, y)
    x2, y2 = wcs.world2pix(ra, dec)
    ra2, dec2 = wcs.pix2world(x2, y2)
    sep_mas = np.hypot((ra2 - ra) * np.cos(np.radians(dec)), dec2 - dec) * 3.6e6
    assert sep_mas.max() < 1.0
    assert np.abs(x2 - x).max() < 1e-6
    header = fits.Header()
    for key, value, comment in fitsio.wcs_cards(wcs):
        header[key] = (value, comment)
    aw = WCS(header)
    ax, ay = aw.all_world2pix(ra, dec, 0)
    assert np.abs(ax - x).max() < 1e-6 and np.abs(ay - y).max() < 1e-6
    ara, _adec = aw.all_pix2world(x, y, 0)
    assert np.abs((ara - ra) * np.cos(np.radians(dec))).max() * 3.6e6 < 1.0


def test_star_counts_rise_with_the_cited_slope():
    # truth: differential counts dN/dm ∝ 10^(0.33 m); the fitted slope of log10 counts
    # per 0.5-mag bin over 14–21 mag is 0.33 within its statistical error (~0.01)
    sky = SkyModel(Survey(SurveyConfig(n_fields=4, n_stars=5000)))
    g = np.asarray(sky.catalog().column("phot_g_mean_mag"))
    assert g.size > 15000
    edges = np.arange(14.0, 21.01, 0.5)
    counts, _ = np.histogram(g, edges)
    assert np.all(np.diff(counts[2:]) > 0)  # rising with magnitude
    slope = np.polyfit(0.5 * (edges[1:] + edges[:-1]), np.log10(counts), 1)[0]
    assert slope == pytest.approx(COUNT_SLOPE_DEX_PER_MAG, abs=0.04)
    m = sample_power_law_mags(np.random.default_rng(1), 10, 12.0, 21.0, 0.33)
    assert np.all((m >= 12.0) & (m <= 21.0))


def test_catalog_columns_ids_and_truth_flags():
    sky = SkyModel(Survey(SurveyConfig(**SMALL, n_vanished=4, n_appeared=3)))
    cat = sky.catalog()
    assert cat.column_names == [
        "source_id",
        "ra",
        "dec",
        "pmra",
        "pmdec",
        "phot_g_mean_mag",
        "bp_rp",
        "ref_epoch",
    ]
    ids = np.asarray(cat.column("source_id"))
    assert len(np.unique(ids)) == len(ids)
    # truth: Gaia-like ids carry the level-12 HEALPix index of the position in bits >= 35
    from lakepipe.astro.healpix import healpix_index

    hp = healpix_index(np.asarray(cat.column("ra")), np.asarray(cat.column("dec")), order=12)
    np.testing.assert_array_equal(ids >> 35, hp)
    obj = sky.objects
    kinds = np.asarray(obj.column("kind"))
    assert (kinds == "vanished").sum() == 4 and (kinds == "appeared").sum() == 3
    in_cat = np.asarray(obj.column("in_catalog"))
    assert not in_cat[kinds == "appeared"].any() and in_cat[kinds == "vanished"].all()
    assert set(np.asarray(obj.column("source_id"))[kinds == "vanished"]) <= set(ids)


def test_variable_and_transient_lightcurves():
    # truth: a sinusoid of amplitude A peaks at +A/2 a quarter period after its epoch;
    # the RR Lyrae sawtooth is brightest (−A/2) at 15 % of the phase and averages to 0;
    # the transient is invisible before t0 and fades by 2.5 α log10(1 + Δt/1 d)
    assert variable_dmag("sinusoid", 2.0, 0.4, 100.0, 100.5) == pytest.approx(0.2)
    assert variable_dmag("rrlyrae", 0.5, 1.0, 100.0, 100.075) == pytest.approx(-0.5)
    t = np.linspace(0, 0.5, 10001)[:-1] + 100.0
    assert variable_dmag("rrlyrae", 0.5, 1.0, 100.0, t).mean() == pytest.approx(0.0, abs=1e-3)
    assert np.isinf(transient_mag(9.9, 10.0, 17.0, 1.2))
    assert transient_mag(19.0, 10.0, 17.0, 1.2) == pytest.approx(17.0 + 3.0)


def test_four_times_the_exposure_is_three_quarters_of_a_magnitude_deeper():
    # truth: same seed → same conditions; sky-limited S/N ∝ sqrt(t), so 4x the time
    # gains 2.5 log10(2) = 0.753 mag; read noise and source photons (S/N ∝ t) push the
    # gain towards 2.5 log10(4) = 1.505; ZTF-like exposures are sky-dominated (< 0.9)
    a = Survey(SurveyConfig(**SMALL)).exposure_table()
    b = Survey(SurveyConfig(**SMALL, exptime_s=120.0)).exposure_table()
    gain = np.asarray(b.column("mag_lim")) - np.asarray(a.column("mag_lim"))
    assert np.all((gain > 0.753) & (gain < 0.9)), gain


def test_sun_position_and_dark_window():
    # truth: astropy's (ERFA) Sun in equator and equinox of date agrees with the
    # low-precision formula (which is of date) to 0.01°
    import warnings

    from astropy.coordinates import PrecessedGeocentric, get_sun
    from astropy.time import Time

    from lakepipe.sim.survey import dark_window, sun_radec_deg

    mjd = np.array([60676.0, 60800.3, 60950.7])
    ra, dec = sun_radec_deg(mjd)
    t = Time(mjd, format="mjd", scale="utc")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ERFA "dubious year" for future UTC dates
        sun = get_sun(t).transform_to(PrecessedGeocentric(equinox=t, obstime=t))
    ref_ra, ref_dec = sun.ra.deg, sun.dec.deg
    assert np.abs(((ra - ref_ra + 180) % 360) - 180).max() < 0.01
    assert np.abs(dec - ref_dec).max() < 0.01
    # truth: on 2025-01-01 nautical twilight at Palomar ends ~01:55 UTC and begins
    # ~13:50 UTC (17:55 and 05:50 PST); 20 min tolerance
    start, end = dark_window(60676.0)
    assert (start - 60676.0) * 24 == pytest.approx(1.9, abs=0.35)
    assert (end - 60676.0) * 24 == pytest.approx(13.85, abs=0.35)


@pytest.mark.parametrize("ra", [150.0, 60.0, 230.0])
def test_every_exposure_is_taken_in_the_dark(ra):
    from lakepipe.sim.survey import sun_radec_deg

    s = Survey(SurveyConfig(**{**SMALL, "ra": ra, "visits_per_night": 4}))
    mjd = np.array([e.mjd for e in s.exposures])
    sra, sdec = sun_radec_deg(mjd)
    assert altitude_deg(sra, sdec, mjd).max() < -12.0
