"""ADES and MPC exports read back by the project's own parsers (independent code paths:
the writers format, the parsers re-read the columns of the format specs)."""

from __future__ import annotations

import pytest

from lakepipe.astro.astrometry import parse_ades_psv, parse_mpc80

SQL = (
    "select * from (values ('2025 AB1', 60678.25, 150.123456, 2.345678, 0.15, 19.8, 'zr', "
    "'I41'), ('2025 AB1', 60679.30, 150.223456, 2.305678, 0.20, 20.1, 'zg', 'I41')) "
    "t(object_id, mjd, ra, dec, sigma_arcsec, mag, filter, obs_code)"
)


@pytest.mark.parametrize(
    ("fmt", "parse", "tol_deg"),
    [
        ("ades", parse_ades_psv, 1e-7),
        ("mpc80", parse_mpc80, 0.01 / 3600 * 15),  # RA to 0.001 s of time in 80-column records
    ],
)
def test_astrometry_round_trip(cli, tmp_path, fmt, parse, tol_deg):
    lake = tmp_path / "lake"
    (lake / "_lake").mkdir(parents=True)
    out = tmp_path / f"obs.{fmt}"
    r = cli("export", "--sql", SQL, "--lake", lake, "-f", fmt, "-o", out)
    assert r.exit_code == 0, r.stderr
    t = parse(out).to_pylist()
    assert [row["designation"] for row in t] == ["2025 AB1", "2025 AB1"]
    assert abs(t[0]["ra"] - 150.123456) < tol_deg and abs(t[1]["dec"] - 2.305678) < tol_deg
    assert abs(t[0]["mjd"] - 60678.25) < 1e-5 and t[0]["obs_code"] == "I41"
    assert t[0]["band"] == "r" and abs(t[1]["mag"] - 20.1) < 0.05


def test_astrometry_export_names_missing_columns(cli, tmp_path):
    lake = tmp_path / "lake"
    (lake / "_lake").mkdir(parents=True)
    r = cli(
        "export",
        "--sql",
        "select 1 as mjd, 2 as ra",
        "--lake",
        lake,
        "-f",
        "ades",
        "-o",
        tmp_path / "x.psv",
    )
    assert r.exit_code == 2 and "needs column(s) designation, dec, obs_code" in r.stderr
