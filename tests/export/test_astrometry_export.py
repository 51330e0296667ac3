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


# What the ADES 2017 submit schema (IAU-ADES/ADES-Master xsd/submit.xsd) requires of each
# obsContext: block -> keywords that must occur (ObservatoryType, SubmitterType, NamesType,
# TelescopeType), and of each optical record (OpticalType minus the optional elements).
ADES_REQUIRED_HEADER = {
    "observatory": {"mpcCode"},
    "submitter": {"name"},
    "observers": {"name"},
    "measurers": {"name"},
    "telescope": {"design", "aperture", "detector"},
}
ADES_REQUIRED_FIELDS = {"mode", "stn", "obsTime", "ra", "dec", "astCat"}


def ades_blocks(text: str) -> list[tuple[dict[str, list[tuple[str, str]]], list[dict]]]:
    """(header {block: [(keyword, value)]}, records) of each obsContext of a PSV text,
    read with nothing but the PSV rules (# block, ! keyword value, | fields)."""
    blocks, header, fields, records = [], {}, None, []
    for line in text.splitlines()[1:]:
        if line.startswith("#"):
            if fields is not None:
                blocks.append((header, records))
                header, fields, records = {}, None, []
            current = header.setdefault(line[1:].strip(), [])
        elif line.startswith("!"):
            key, _, value = line[1:].strip().partition(" ")
            current.append((key, value))
        elif fields is None:
            fields = line.split("|")
        else:
            records.append(dict(zip(fields, line.split("|"), strict=True)))
    blocks.append((header, records))
    return blocks


def test_ades_has_the_required_header_and_fields(cli, tmp_path):
    """Every obsContext carries the schema's required blocks (values from --opt, defaults
    elsewhere) and every record its required fields, astCat included; the file reads back
    to the same positions; an 8-character name goes to trkSub, a provisional one to provID."""
    lake = tmp_path / "lake"
    (lake / "_lake").mkdir(parents=True)
    sql = SQL.replace("'2025 AB1', 60679.30", "'LP-00001', 60679.30").replace(
        "0.20, 20.1, 'zg', 'I41'", "0.20, 20.1, 'zg', 'F51'"
    )
    out = tmp_path / "obs.psv"
    r = cli("export", "--sql", sql, "--lake", lake, "-f", "ades", "-o", out,
            "--opt", "submitter=A. Observer", "--opt", "observers=A. Observer, B. Helper",
            "--opt", "institution=Loopback Observatory", "--opt", "astCat=Gaia3")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    text = out.read_text()
    assert text.startswith("# version=2017\n")
    blocks = ades_blocks(text)
    assert [h["observatory"][0] for h, _ in blocks] == [("mpcCode", "I41"), ("mpcCode", "F51")]
    for header, records in blocks:
        for block, required in ADES_REQUIRED_HEADER.items():
            assert required <= {k for k, _ in header[block]}, (block, header.get(block))
        assert header["submitter"] == [("name", "A. Observer"),
                                       ("institution", "Loopback Observatory")]  # fmt: skip
        assert header["observers"] == [("name", "A. Observer"), ("name", "B. Helper")]
        assert header["measurers"] == [("name", "A. Observer")]  # defaults to the submitter
        assert float(dict(header["telescope"])["aperture"]) > 0
        assert len(records) == 1
        for rec in records:
            assert all(rec[f] for f in ADES_REQUIRED_FIELDS), rec
            assert rec["astCat"] == "Gaia3"
            assert sum(bool(rec[f]) for f in ("permID", "provID", "trkSub")) == 1
    assert dict(blocks[0][0]["telescope"])["design"] == "Schmidt"  # I41 = ZTF's Schmidt
    assert blocks[0][1][0]["provID"] == "2025 AB1" and blocks[1][1][0]["trkSub"] == "LP-00001"
    back = parse_ades_psv(out).to_pylist()
    assert [t["designation"] for t in back] == ["2025 AB1", "LP-00001"]
    assert abs(back[1]["ra"] - 150.223456) < 1e-7 and back[1]["obs_code"] == "F51"


@pytest.mark.parametrize(
    ("fmt", "designation", "message"),
    [
        ("ades", "ZTF25abcdefg", r"designation 'ZTF25abcdefg' is neither a number.*trkSub"),
        ("ades", "SIM 1", r"designation 'SIM 1' is neither"),
        ("mpc80", "SIM00001", r"designation 'SIM00001' does not fit columns 1-12.*--format ades"),
        ("mpc80", "ZTF25abcdefg", r"'ZTF25abcdefg' does not fit.*K25A01B.*at most 7"),
    ],
)
def test_designation_that_does_not_fit_exits_2(cli, tmp_path, fmt, designation, message):
    """Designations the format cannot hold are refused (exit 2, no file, no traceback)
    instead of being truncated or crashing; the message names the designation and fix."""
    import re

    lake = tmp_path / "lake"
    (lake / "_lake").mkdir(parents=True)
    out = tmp_path / f"obs.{fmt}"
    sql = SQL.replace("'2025 AB1'", f"'{designation}'")
    r = cli("export", "--sql", sql, "--lake", lake, "-f", fmt, "-o", out)
    assert r.exit_code == 2, r.stdout + r.stderr
    assert re.search(message, r.stderr.replace("\n", " ")), r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_ades_refuses_a_bad_catalogue_code(cli, tmp_path):
    lake = tmp_path / "lake"
    (lake / "_lake").mkdir(parents=True)
    r = cli("export", "--sql", SQL, "--lake", lake, "-f", "ades", "-o", tmp_path / "x.psv",
            "--opt", "astCat=Gaia DR3 (2022)")  # fmt: skip
    assert r.exit_code == 2 and "MPC catalogue code" in r.stderr
