"""Astrometry readers and writers: MPC 80-column, ADES PSV, CSV.

Known answers are worked by hand from the format specs: RA ``12 34 56.789`` is
15 * (12 + 34/60 + 56.789/3600) deg; 2023-02-25 is MJD 60000 (so 2023-01-15 is 59959).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from lakepipe.astro.astrometry import (
    ASTROMETRY_SCHEMA,
    AdesContext,
    format_ades_psv,
    format_mpc80,
    make_astrometry,
    mjd_to_iso,
    pack_designation,
    parse_ades_psv,
    parse_csv,
    parse_mpc80,
    read_astrometry,
    unpack_designation,
    write_ades_psv,
    write_mpc80,
)
from lakepipe.errors import InputNotFoundError, ParseError, UserError

DATA = Path(__file__).resolve().parent.parent / "data" / "astrometry"


@pytest.mark.parametrize(
    ("packed", "unpacked"),
    [
        ("00433", "433"),
        ("A0345", "100345"),
        ("a0001", "360001"),
        ("~0000", "620000"),
        ("~000z", "620061"),
        ("K23M05Q", "2023 MQ5"),
        ("J95X00A", "1995 XA"),
        ("J95X01L", "1995 XL1"),
        ("K07Tf8A", "2007 TA418"),
        ("PLS2040", "2040 P-L"),
        ("T1S3138", "3138 T-1"),
        ("NEO0001", "NEO0001"),
    ],
)
def test_packed_designations_match_mpc_examples(packed: str, unpacked: str) -> None:
    # truth: the MPC "Packed provisional and permanent designations" examples
    assert unpack_designation(packed) == unpacked
    assert pack_designation(unpacked) == packed


def test_mpc80_sample_known_values() -> None:
    t = parse_mpc80(DATA / "sample.mpc80", check_codes=False)
    assert t.schema == ASTROMETRY_SCHEMA
    assert t.num_rows == 7  # three header lines skipped
    assert t.column("designation").to_pylist() == [
        "433", "433", "2023 MQ5", "100345", "2040 P-L", "NEO0001", "620000",
    ]  # fmt: skip
    row = t.slice(0, 1).to_pylist()[0]
    assert row["mjd"] == pytest.approx(59959.12345, abs=1e-9)
    assert row["ra"] == pytest.approx(15 * (12 + 34 / 60 + 56.789 / 3600), abs=1e-12)
    assert row["dec"] == pytest.approx(12 + 34 / 60 + 56.78 / 3600, abs=1e-12)
    assert (row["mag"], row["band"], row["obs_code"], row["mode"]) == (15.23, "V", "I41", "CCD")
    assert row["sigma_ra_arcsec"] == row["sigma_dec_arcsec"] == 1.0  # the default
    # "-00 00 00.01": a negative declination smaller than one degree keeps its sign
    assert t.column("dec")[3].as_py() == pytest.approx(-0.01 / 3600, abs=1e-15)
    assert t.column("mjd")[3].as_py() == pytest.approx(60369.99999, abs=1e-9)  # leap day 2024
    assert t.column("mag")[1].as_py() is None and t.column("band")[1].as_py() is None


def test_mpc80_text_round_trip_is_exact() -> None:
    lines = [
        line
        for line in (DATA / "sample.mpc80").read_text().splitlines()
        if len(line) == 80  # the observation records, not the header lines
    ]
    t = parse_mpc80(lines, check_codes=False)
    again = format_mpc80(t)
    t2 = parse_mpc80(again, check_codes=False)
    assert format_mpc80(t2) == again  # fixed point after one normalisation
    # the normalisation only pads the date to 6 decimals and the magnitude to 2
    for a, b in zip(lines, again, strict=True):
        assert a[:15] == b[:15] and a[32:65] == b[32:65] and a[77:] == b[77:]
        assert float(a[23:32]) == pytest.approx(float(b[23:32]), abs=1e-9)


def test_mpc80_and_ades_round_trip_random_table(tmp_path: Path) -> None:
    rng = np.random.default_rng(42)
    n = 200
    t = make_astrometry(
        designation=[f"T{i:05d}" for i in range(n)],
        mjd=rng.uniform(58000, 62000, n),
        ra=rng.uniform(0, 360, n),
        dec=np.degrees(np.arcsin(rng.uniform(-1, 1, n))),
        obs_code=rng.choice(["I41", "500", "F51"], n).tolist(),
        sigma_ra_arcsec=rng.uniform(0.05, 2, n),
        sigma_dec_arcsec=rng.uniform(0.05, 2, n),
        mag=[float(m) if m < 21 else None for m in rng.uniform(15, 22, n)],
        band=["G"] * n,
    )
    back = parse_mpc80(write_mpc80(t, tmp_path / "a.mpc80"), check_codes=False)
    cosd = np.cos(np.radians(np.asarray(t["dec"])))
    dra = (np.asarray(back["ra"]) - np.asarray(t["ra"]) + 180) % 360 - 180
    # MPC precision: time 1e-6 d, RA 0.001 s = 0.015", Dec 0.01"
    assert np.max(np.abs(np.asarray(back["mjd"]) - np.asarray(t["mjd"]))) <= 0.5e-6 + 1e-9
    assert np.max(np.abs(dra) * 3600) <= 0.0075 + 1e-9
    assert np.max(np.abs(dra * cosd) * 3600) <= 0.0075
    assert np.max(np.abs(np.asarray(back["dec"]) - np.asarray(t["dec"])) * 3600) <= 0.005 + 1e-9
    assert back["obs_code"].to_pylist() == t["obs_code"].to_pylist()
    assert back["designation"].to_pylist() == t["designation"].to_pylist()

    ades = parse_ades_psv(write_ades_psv(t, tmp_path / "a.psv"), check_codes=False)
    ades = ades.take(np.argsort(ades["designation"].to_pylist(), kind="stable"))
    # ADES as written: time 1 ms, ra/dec 1e-8 deg, rms 1e-4 arcsec
    assert np.max(np.abs(np.asarray(ades["mjd"]) - np.asarray(t["mjd"])) * 86400) <= 0.0005 + 1e-6
    assert np.max(np.abs(np.asarray(ades["ra"]) - np.asarray(t["ra"]))) <= 0.5e-8 + 1e-12
    assert np.max(np.abs(np.asarray(ades["dec"]) - np.asarray(t["dec"]))) <= 0.5e-8 + 1e-12
    s_in, s_out = np.asarray(t["sigma_ra_arcsec"]), np.asarray(ades["sigma_ra_arcsec"])
    assert np.max(np.abs(s_in - s_out)) <= 0.5e-4 + 1e-12
    assert ades["mag"].null_count == t["mag"].null_count
    assert ades["designation"].to_pylist() == t["designation"].to_pylist()


def test_ades_sample_multiple_blocks_and_designations() -> None:
    t = parse_ades_psv(DATA / "sample.psv", check_codes=False)
    assert t.column("designation").to_pylist() == ["433", "2023 MQ5", "NEO0001"]
    assert t.column("obs_code").to_pylist() == ["I41", "I41", "F51"]
    # 02:57:46.080 UTC = (2*3600 + 57*60 + 46.08) / 86400 d
    assert t.column("mjd")[0].as_py() == pytest.approx(59959 + 10666.08 / 86400, abs=1e-10)
    assert t.column("sigma_ra_arcsec").to_pylist() == [0.10, 0.11, 0.25]
    assert t.column("sigma_dec_arcsec").to_pylist() == [0.12, 0.12, 1.0]  # empty → default
    assert t.column("mag").to_pylist() == [15.23, 20.2, None]
    # the MPC record of the same observation (sample.mpc80 line 4) agrees within 1e-5 d
    mpc = parse_mpc80(DATA / "sample.mpc80", check_codes=False)
    assert abs(t.column("mjd")[0].as_py() - mpc.column("mjd")[0].as_py()) < 1e-9
    assert abs(t.column("ra")[0].as_py() - mpc.column("ra")[0].as_py()) * 3600 < 1e-4


def test_csv_iso_and_mjd_times() -> None:
    t = parse_csv(DATA / "sample.csv", check_codes=False)
    assert t.column("mjd").to_pylist() == [pytest.approx(59959 + 10666.08 / 86400), 60000.25]
    assert t.column("sigma_ra_arcsec").to_pylist() == [0.5, 1.0]
    assert t.column("sigma_dec_arcsec").to_pylist() == [0.5, 1.0]
    assert t.column("designation").to_pylist() == ["433", "433"]


def test_read_astrometry_guesses_format() -> None:
    assert read_astrometry(DATA / "sample.psv", check_codes=False).num_rows == 3
    assert read_astrometry(DATA / "sample.csv", check_codes=False).num_rows == 2
    assert read_astrometry(DATA / "sample.mpc80", check_codes=False).num_rows == 7
    with pytest.raises(InputNotFoundError, match="not found"):
        read_astrometry(DATA / "nope.psv")


def test_mjd_to_iso_known_values() -> None:
    assert mjd_to_iso(60000.25) == "2023-02-25T06:00:00.000Z"
    assert mjd_to_iso(51544.5, decimals=0) == "2000-01-01T12:00:00Z"
    assert mjd_to_iso(59999.9999999999) == "2023-02-25T00:00:00.000Z"  # carries, no 60 s


def _mutate(line: str, col: int, text: str) -> str:
    """Overwrite columns ``col``.. (1-based) of an MPC record."""
    return line[: col - 1] + text + line[col - 1 + len(text) :]


@pytest.mark.parametrize(
    ("mutation", "pattern"),
    [
        (lambda s: s[:79], r"79 columns, expected 80"),
        (lambda s: _mutate(s, 16, "2023-01-15.1234 "), r"bad date .* columns 16-32"),
        (lambda s: _mutate(s, 33, "25"), r"RA out of range"),
        (lambda s: _mutate(s, 33, "12:34"), r"bad RA .* columns 33-44"),
        (lambda s: _mutate(s, 45, "*"), r"bad Dec .* columns 45-56"),
        (lambda s: _mutate(s, 66, "1x.23"), r"bad magnitude .* columns 66-70"),
        (lambda s: _mutate(s, 78, "i41"), r"bad observatory code .* columns 78-80"),
        (lambda s: " " * 12 + s[12:], r"no designation in columns 1-12"),
    ],
)
def test_mpc80_malformed_line_names_file_and_line(mutation, pattern: str, tmp_path: Path) -> None:
    lines = (DATA / "sample.mpc80").read_text().splitlines()
    lines[4] = mutation(lines[4])  # the second observation, line 5 of the file
    path = tmp_path / "bad.mpc80"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ParseError, match=rf"bad\.mpc80:5: .*{pattern}") as info:
        parse_mpc80(path, check_codes=False)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("old", "new", "lineno", "pattern"),
    [
        ("2023-07-06T00:17:43.77Z", "2023-07-06 00:17:43.77", 13, r"not an ISO 8601 UTC time"),
        ("+40.61177  ", "+95.0      ", 13, r"dec out of range"),
        ("|0.11 |", "|0.1x |", 13, r"bad rmsRA"),
        ("|   G|", "|   G|extra|", 13, r"16 fields, header has 15"),
    ],
)
def test_ades_malformed_line_names_file_and_line(
    old: str, new: str, lineno: int, pattern: str, tmp_path: Path
) -> None:
    text = (DATA / "sample.psv").read_text()
    assert old in text
    path = tmp_path / "bad.psv"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ParseError, match=rf"bad\.psv:{lineno}: {pattern}"):
        parse_ades_psv(path, check_codes=False)


def test_ades_field_line_without_required_fields(tmp_path: Path) -> None:
    path = tmp_path / "x.psv"
    path.write_text("# version=2017\npermID|stn|ra|dec\n433|I41|1|2\n")
    with pytest.raises(
        ParseError, match=re.escape("x.psv:2: ADES PSV field line lacks ['obsTime']")
    ):
        parse_ades_psv(path, check_codes=False)


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ("2023-13-01T00:00:00Z,1,2,0.5,I41", r"month must be in 1..12"),
        ("60000.5,1,2,-0.5,I41", r"sigma_arcsec must be > 0 \(got -0.5\)"),
        ("60000.5,1,2,0.5", r"4 fields, header has 5"),
        ("60000.5,abc,2,0.5,I41", r"bad ra_deg"),
    ],
)
def test_csv_malformed_line_names_file_and_line(row: str, pattern: str, tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text(f"t_utc,ra_deg,dec_deg,sigma_arcsec,obs_code\n60000.5,1,2,0.5,I41\n{row}\n")
    with pytest.raises(ParseError, match=rf"x\.csv:3: {pattern}"):
        parse_csv(path, check_codes=False)


def test_csv_missing_columns_lists_expected(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("t_utc,ra,dec\n60000.5,1,2\n")
    with pytest.raises(ParseError, match=r"x\.csv:1: CSV header lacks .*expected columns t_utc"):
        parse_csv(path, check_codes=False)


def test_ades_writer_fields_follow_the_designation_kind() -> None:
    t = parse_mpc80(DATA / "sample.mpc80", check_codes=False)
    lines = format_ades_psv(t)
    assert lines[0] == "# version=2017"
    rows = [ln.split("|") for ln in lines if ln[:1] not in "#!" and not ln.startswith("permID")]
    by_des = {r[0] or r[1] or r[2]: r for r in rows}
    assert by_des["433"][:3] == ["433", "", ""]
    assert by_des["2023 MQ5"][:3] == ["", "2023 MQ5", ""]
    assert by_des["NEO0001"][:3] == ["", "", "NEO0001"]


def test_known_codes_pass_the_observatories_check() -> None:
    # every code in the samples is in the observatories module's built-in MPC table
    assert parse_mpc80(DATA / "sample.mpc80").num_rows == 7
    assert parse_ades_psv(DATA / "sample.psv").num_rows == 3
    assert parse_csv(DATA / "sample.csv").num_rows == 2


def test_unknown_obs_code_names_file_and_line(tmp_path: Path) -> None:
    lines = (DATA / "sample.mpc80").read_text().splitlines()
    lines[5] = lines[5][:77] + "Z99"  # line 6 of the file
    path = tmp_path / "codes.mpc80"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        ParseError, match=r"codes\.mpc80:6: observatory code 'Z99': unknown MPC"
    ) as e:
        parse_mpc80(path)
    assert "I41" in str(e.value)  # the message lists the known codes
    csv_path = tmp_path / "codes.csv"
    csv_path.write_text("t_utc,ra_deg,dec_deg,sigma_arcsec,obs_code\n60000.5,1,2,0.5,XYZ\n")
    with pytest.raises(ParseError, match=r"codes\.csv:2: observatory code 'XYZ'"):
        parse_csv(csv_path)


def test_ades_context_from_export_options() -> None:
    """--opt values arrive YAML-parsed: a list or a comma string of names, a number or a
    string for the aperture; the header has the blocks the ADES submit schema requires."""
    options = {"submitter": "A. Observer", "observers": ["A. Observer", "B. Helper"],
               "measurers": "C. Measurer, D. Measurer", "aperture": "0.5",
               "design": "Reflector", "astCat": "UCAC4", "obs_code": "I41"}  # fmt: skip
    ctx = AdesContext.from_options(options)
    assert ctx.telescope_aperture == 0.5 and ctx.ast_cat == "UCAC4"
    assert ctx.header("568") == [
        "# observatory", "! mpcCode 568", "! name Maunakea",
        "# submitter", "! name A. Observer",
        "# observers", "! name A. Observer", "! name B. Helper",
        "# measurers", "! name C. Measurer", "! name D. Measurer",
        "# telescope", "! design Reflector", "! aperture 0.5", "! detector CCD",
    ]  # fmt: skip
    with pytest.raises(UserError, match=r"telescope_aperture must be > 0"):
        AdesContext.from_options({"telescope_aperture": -1})
    with pytest.raises(UserError, match=r"MPC catalogue code"):
        AdesContext.from_options({"astCat": "Gaia DR3"})


def test_mpc80_designations_that_fit_and_that_do_not() -> None:
    """Columns 1-12: numbers and provisional designations are packed (2025 AB1 ->
    K25A01B), temporary ones up to 7 letters/digits pass, longer ones are a UserError."""
    t = make_astrometry(designation=["2025 AB1", "SIM0001", "433"], mjd=[60000.5] * 3,
                        ra=10.0, dec=5.0, obs_code="I41")  # fmt: skip
    cols = [ln[:12] for ln in format_mpc80(t)]
    assert cols == ["     K25A01B", "     SIM0001", "00433       "]
    for bad in ("SIM00001", "LP 1"):
        t = make_astrometry(designation=bad, mjd=[60000.5], ra=10.0, dec=5.0, obs_code="I41")
        with pytest.raises(UserError, match=rf"designation '{bad}' does not fit columns 1-12"):
            format_mpc80(t)
