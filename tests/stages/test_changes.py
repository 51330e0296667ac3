"""Measured-area geometry (lakepipe.astro.wcs, used by changes and lightcurves) on the sky.

Known answers: a tangent-plane projection puts the tangent point at (0, 0) and a point
1° north at η = tan(1°); a square's inside test honours its margin, in either corner
order, and across RA = 0/360.
"""

from __future__ import annotations

import numpy as np
import pytest

from lakepipe.astro.wcs import gnomonic, image_corners, inside_polygon


def test_gnomonic_known_points() -> None:
    xy = gnomonic(np.array([10.0, 10.0, 190.0]), np.array([20.0, 21.0, 20.0]), 10.0, 20.0)
    assert xy[0] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert xy[1] == pytest.approx([0.0, np.degrees(np.tan(np.radians(1.0)))], rel=1e-12)
    assert np.isnan(xy[2]).all()  # the far side of the sphere


@pytest.mark.parametrize("reverse", [False, True])
def test_inside_polygon_with_margin(reverse: bool) -> None:
    square = np.array([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    if reverse:
        square = square[::-1]
    pts = np.array([[0.0, 0.0], [0.95, 0.0], [0.0, -0.85], [1.2, 0.0]])
    assert inside_polygon(pts, square).tolist() == [True, True, True, False]
    assert inside_polygon(pts, square, margin=0.1).tolist() == [True, False, True, False]


def test_exposure_and_cutout_footprint_across_ra_zero() -> None:
    """A 0.4° exposure centred on RA 0 with a 36″ cutout at its centre."""
    h = 0.2
    exp = {"ra": 0.0, "dec": 0.0}
    for i, (dx, dy) in enumerate([(-h, -h), (h, -h), (h, h), (-h, h)], start=1):
        exp[f"ra{i}"], exp[f"dec{i}"] = dx % 360.0, dy
    cut = {"ra": 0.0, "dec": 0.0, "size_arcsec": 36.0}
    polys = image_corners(exp, cut, 0.0, 0.0)
    ra = np.array([359.9, 0.1, 0.3, 0.004, 0.006])
    dec = np.array([0.1, -0.1, 0.0, 0.0, 0.0])
    xy = gnomonic(ra, dec, 0.0, 0.0)
    assert inside_polygon(xy, polys[0]).tolist() == [True, True, False, True, True]
    # the cutout reaches 18″ = 0.005° from its centre
    assert inside_polygon(xy, polys[1]).tolist() == [False, False, False, True, False]
