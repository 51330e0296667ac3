"""ExposureQuery (lakepipe/archives/query.py): time parsing, regions, footprint overlap."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from pydantic import ValidationError

from lakepipe.archives.query import ExposureQuery, angular_sep_deg, night_of, to_mjd


def test_times_resolve_to_mjd_utc():
    # truth: MJD 0 is 1858-11-17T00:00 UTC; 2025-01-01 is MJD 60676
    assert to_mjd("2025-01-01") == 60676.0
    assert to_mjd(dt.date(2025, 1, 1), end_of_day=True) == 60677.0
    assert to_mjd("2025-01-01T12:00:00") == 60676.5
    assert to_mjd("2025-01-01T12:00:00Z") == 60676.5
    assert to_mjd(60676.25) == 60676.25 and to_mjd("60676.25") == 60676.25
    assert night_of(60676.99) == "2025-01-01"
    with pytest.raises(ValueError, match="ISO date"):
        to_mjd("yesterday")
    q = ExposureQuery(start="2025-01-02", end=dt.date(2025, 1, 3))
    assert q.mjd_range() == (60677.0, 60679.0)  # a bare end date includes that day
    assert ExposureQuery(night="2025-01-02").mjd_range() == (60677.0, 60678.0)
    m = np.array([60677.0, 60677.999, 60678.0])
    assert ExposureQuery(night="2025-01-02").matches_time(m).tolist() == [True, True, False]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ra": 10.0}, "needs all of ra, dec and radius_deg"),
        ({"ra": 1, "dec": 2, "radius_deg": 1, "box": [0, 1, 0, 1]}, "not both"),
        ({"box": [0, 1, 5, 1]}, "dec_min < dec_max"),
        ({"start": "2025-02-01", "end": "2025-01-01"}, "after end"),
        ({"night": "2025-1-1"}, "YYYY-MM-DD"),
        ({"max_rows": 0}, "greater than 0"),
        ({"radius": 1.0}, "Extra inputs"),
        ({"ra": 400.0, "dec": 0, "radius_deg": 1}, "less than 360"),
    ],
)
def test_bad_queries_say_what_is_wrong(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        ExposureQuery(**kwargs)


def test_cone_and_box_contain_points():
    q = ExposureQuery(ra=359.9, dec=0.0, radius_deg=0.5)
    assert q.contains(np.array([0.3, 359.0]), np.array([0.0, 0.0])).tolist() == [True, False]
    b = ExposureQuery(box=[350.0, 10.0, -1.0, 1.0])  # wraps through RA 0
    assert b.contains(np.array([355.0, 5.0, 20.0]), np.array([0.0, 0.5, 0.0])).tolist() == [
        True,
        True,
        False,
    ]
    assert b.center() == (0.0, 0.0)
    # Vincenty separation: 90 deg between the equator and the pole, 1 deg along the equator
    assert angular_sep_deg(np.array([10.0]), np.array([0.0]), 10.0, 90.0)[0] == pytest.approx(90)
    assert angular_sep_deg(np.array([0.5]), np.array([0.0]), 359.5, 0.0)[0] == pytest.approx(1.0)


def test_footprint_overlap_cone_and_box():
    # a 1x1 deg square footprint centred on (150, 2)
    rc = np.array([[149.5, 150.5, 150.5, 149.5]])
    dc = np.array([[1.5, 1.5, 2.5, 2.5]])
    cases = [
        (ExposureQuery(ra=150.0, dec=2.0, radius_deg=0.01), True),  # centre inside
        (ExposureQuery(ra=151.0, dec=2.0, radius_deg=0.55), True),  # edge within radius
        (ExposureQuery(ra=151.0, dec=2.0, radius_deg=0.45), False),  # edge 0.5 deg away
        (ExposureQuery(ra=150.7, dec=2.7, radius_deg=0.3), True),  # corner in the cone
        (ExposureQuery(box=[149.9, 150.1, 1.9, 2.1]), True),  # box inside the footprint
        (ExposureQuery(box=[140.0, 160.0, 0.0, 4.0]), True),  # footprint inside the box
        (ExposureQuery(box=[150.4, 152.0, 2.4, 3.0]), True),  # corners overlap
        (ExposureQuery(box=[151.0, 152.0, 1.0, 3.0]), False),
        (ExposureQuery(), True),
    ]
    for q, expected in cases:
        assert q.overlaps(rc, dc).tolist() == [expected], q


def test_sim_archive_honours_ccd_and_quadrant_ids():
    # truth: the sim's own exposure table; the chip filter keeps exactly its rows
    from tests.conftest import small_sim

    archive = small_sim()
    every = archive.exposures()
    ccd = np.asarray(every.column("ccdid"))
    qid = np.asarray(every.column("qid"))
    assert len(set(ccd)) > 1  # the filter has something to remove
    c, q = int(ccd[0]), int(qid[0])
    got = archive.exposures(ExposureQuery(ccd_ids=[c], quadrant_ids=[q]))
    assert got.num_rows == int(((ccd == c) & (qid == q)).sum()) > 0
    assert set(got.column("ccdid").to_pylist()) == {c}
    assert set(got.column("qid").to_pylist()) == {q}
