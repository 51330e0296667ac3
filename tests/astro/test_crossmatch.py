"""Crossmatch kernel: identical to astropy's nearest-neighbour match, known separations."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord

from lakepipe.astro.crossmatch import (
    angular_separation_arcsec,
    chord_radius,
    crossmatch,
    crossmatch_tables,
)


def _sky(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform on the sphere, plus crowds at both poles and straddling RA = 0/360."""
    ra = rng.uniform(0.0, 360.0, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))
    k = n // 8
    dec[:k] = 90.0 - np.abs(rng.normal(0.0, 5.0 / 3600.0, k))  # north pole cap
    dec[k : 2 * k] = -90.0 + np.abs(rng.normal(0.0, 5.0 / 3600.0, k))  # south pole cap
    ra[2 * k : 3 * k] = rng.normal(0.0, 5.0 / 3600.0, k) % 360.0  # RA wrap
    dec[2 * k : 3 * k] = rng.normal(0.0, 5.0 / 3600.0, k)
    return ra, dec


def _perturb(
    rng: np.random.Generator, ra: np.ndarray, dec: np.ndarray, sigma_arcsec: float
) -> tuple[np.ndarray, np.ndarray]:
    """Move each point by a random offset (in the tangent plane, via unit vectors)."""
    c = SkyCoord(ra * u.deg, dec * u.deg)
    pa_deg = rng.uniform(0.0, 360.0, ra.size)
    sep = np.abs(rng.normal(0.0, sigma_arcsec, ra.size))
    moved = c.directional_offset_by(pa_deg * u.deg, sep * u.arcsec)
    return moved.ra.deg, moved.dec.deg


@pytest.mark.parametrize("band_rows", [64, 32_768])
@pytest.mark.parametrize("workers", [1, 2])
def test_nearest_identical_to_astropy(band_rows: int, workers: int) -> None:
    """Truth: astropy's match_to_catalog_sky, cut at the radius, on poles and RA wrap."""
    rng = np.random.default_rng(42)
    ra2, dec2 = _sky(rng, 8000)
    ra1, dec1 = _perturb(rng, ra2[:6000], dec2[:6000], 1.2)
    ra1 = np.concatenate([ra1, _sky(rng, 2000)[0]])
    dec1 = np.concatenate([dec1, _sky(rng, 2000)[1]])
    radius = 2.0

    m = crossmatch(ra1, dec1, ra2, dec2, radius, workers=workers, band_rows=band_rows)

    idx, sep, _ = SkyCoord(ra1 * u.deg, dec1 * u.deg).match_to_catalog_sky(
        SkyCoord(ra2 * u.deg, dec2 * u.deg)
    )
    ok = sep.arcsec <= radius
    assert ok.sum() > 4000  # the dense caps and the wrap crowd are matched too
    np.testing.assert_array_equal(m.idx1, np.flatnonzero(ok))
    np.testing.assert_array_equal(m.idx2, idx[ok])
    np.testing.assert_allclose(m.sep_arcsec, sep.arcsec[ok], rtol=0, atol=1e-6)
    assert np.all(m.rank == 1)
    # matches sit in the pole caps and on both sides of RA = 0
    assert np.any(dec1[m.idx1] > 89.99) and np.any(dec1[m.idx1] < -89.99)
    assert np.any(ra1[m.idx1] > 359.99) and np.any(ra1[m.idx1] < 0.01)
    assert np.any((ra1[m.idx1] > 359.99) & (ra2[m.idx2] < 0.01))


def test_all_pairs_identical_to_astropy_search_around_sky() -> None:
    """Truth: astropy's search_around_sky; ranks order each left row's pairs by separation."""
    rng = np.random.default_rng(7)
    ra2, dec2 = _sky(rng, 2000)
    ra1, dec1 = _sky(rng, 1500)
    radius = 15.0  # dense enough for several counterparts in the crowds

    m = crossmatch(ra1, dec1, ra2, dec2, radius, mode="all", band_rows=100)

    # search_around_sky returns (indices into its argument, indices into self, ...)
    i2, i1, sep, _ = SkyCoord(ra1 * u.deg, dec1 * u.deg).search_around_sky(
        SkyCoord(ra2 * u.deg, dec2 * u.deg), radius * u.arcsec
    )
    order = np.lexsort((i2, sep.arcsec, i1))
    np.testing.assert_array_equal(m.idx1, i1[order])
    np.testing.assert_array_equal(m.idx2, i2[order])
    np.testing.assert_allclose(m.sep_arcsec, sep.arcsec[order], rtol=0, atol=1e-6)
    assert m.rank.max() >= 3
    # rank 1 of every left row is its nearest: the same pairs as nearest mode
    near = crossmatch(ra1, dec1, ra2, dec2, radius)
    first = m.rank == 1
    np.testing.assert_array_equal(m.idx1[first], near.idx1)
    np.testing.assert_array_equal(m.idx2[first], near.idx2)
    # ranks count up 1, 2, 3 ... within each left row
    for row in np.unique(m.idx1)[:50]:
        r = m.rank[m.idx1 == row]
        np.testing.assert_array_equal(r, np.arange(1, r.size + 1))


@pytest.mark.parametrize(
    ("ra1", "dec1", "ra2", "dec2", "expected_arcsec"),
    [
        (0.0, 0.0, 0.0, 1.0, 3600.0),  # 1 degree along a meridian
        (10.0, 0.0, 11.0, 0.0, 3600.0),  # 1 degree along the equator
        (359.9999, 0.0, 0.0001, 0.0, 0.72),  # across RA = 0/360
        (0.0, 89.9999, 180.0, 89.9999, 0.72),  # across the north pole
        (10.0, 90.0, 200.0, 90.0, 0.0),  # the pole, any RA
        (0.0, 0.0, 180.0, 0.0, 648000.0),  # antipodes
        (45.0, 60.0, 45.0 + 1.0 / 3600.0, 60.0, 0.5),  # 1 s of RA at dec 60: cos 60 = 1/2
    ],
)
def test_known_separations(
    ra1: float, dec1: float, ra2: float, dec2: float, expected_arcsec: float
) -> None:
    """Truth: spherical geometry by hand (small-angle values good to 1e-6 arcsec)."""
    got = angular_separation_arcsec(ra1, dec1, ra2, dec2)
    assert got == pytest.approx(expected_arcsec, abs=1e-6)


def test_radius_is_inclusive_and_exact() -> None:
    """Pairs at 0.999 and 1.001 of the radius: only the first matches; chord is 2 sin(θ/2)."""
    assert chord_radius(3600.0) == pytest.approx(2 * np.sin(np.radians(0.5)), rel=1e-15)
    ra2 = np.array([0.0, 90.0])
    dec2 = np.array([0.0, 0.0])
    ra1 = np.array([0.999 / 3600.0, 90.0 + 1.001 / 3600.0])
    dec1 = np.array([0.0, 0.0])
    m = crossmatch(ra1, dec1, ra2, dec2, 1.0)
    np.testing.assert_array_equal(m.idx1, [0])
    np.testing.assert_allclose(m.sep_arcsec, [0.999], atol=1e-9)


def test_nan_and_empty_inputs_never_match() -> None:
    """Rows with NaN coordinates are skipped; empty inputs give no pairs."""
    m = crossmatch([np.nan, 1.0], [0.0, 1.0], [1.0, np.nan], [1.0, 2.0], 1.0)
    np.testing.assert_array_equal(m.idx1, [1])
    np.testing.assert_array_equal(m.idx2, [0])
    assert len(crossmatch([], [], [1.0], [1.0], 1.0)) == 0
    assert len(crossmatch([1.0], [1.0], [], [], 1.0)) == 0
    with pytest.raises(ValueError, match="mode"):
        crossmatch([1.0], [1.0], [1.0], [1.0], 1.0, mode="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="radius_arcsec"):
        crossmatch([1.0], [1.0], [1.0], [1.0], 0.0)


def test_crossmatch_tables_columns_and_left_join() -> None:
    """Arrow wrapper: prefixed right columns, separation, rank; unmatched rows kept on ask."""
    left = pa.table(
        {"source_id": [10, 11, 12], "ra": [0.0, 359.9999, 50.0], "dec": [0.0, 0.0, 0.0]}
    )
    right = pa.table({"id": [7, 8], "ra": [0.0001, 0.0], "dec": [0.0, 0.0], "mag_g": [15.0, 16.0]})
    t = crossmatch_tables(left, right, 1.0, mode="all")
    assert t.column_names == ["source_id", "ra", "dec", "ref_id", "ref_ra", "ref_dec",
                              "ref_mag_g", "sep_arcsec", "match_rank"]  # fmt: skip
    assert t.column("source_id").to_pylist() == [10, 10, 11, 11]
    assert t.column("ref_id").to_pylist() == [8, 7, 8, 7]
    assert t.column("match_rank").to_pylist() == [1, 2, 1, 2]
    np.testing.assert_allclose(t.column("sep_arcsec").to_numpy(), [0.0, 0.36, 0.36, 0.72])

    j = crossmatch_tables(left, right, 1.0, keep_unmatched=True)
    assert j.column("source_id").to_pylist() == [10, 11, 12]
    assert j.column("ref_id").to_pylist() == [8, 8, None]
    assert j.column("sep_arcsec").null_count == 1
