"""Optical astrometry in and out: MPC 80-column records, ADES PSV and a plain CSV.

Every reader returns the same normalised Arrow table (:data:`ASTROMETRY_SCHEMA`)::

    designation       string   object designation, unpacked ("433", "2023 MQ5", "K0001")
    mjd               float64  MJD (UTC) of the observation
    ra, dec           float64  observed position, degrees ICRS (J2000.0)
    sigma_ra_arcsec   float64  1-sigma uncertainty of RA*cos(dec), arcsec
    sigma_dec_arcsec  float64  1-sigma uncertainty of Dec, arcsec
    mag               float64  observed magnitude (null when not measured)
    band              string   photometric band of ``mag`` (null when not measured)
    obs_code          string   MPC observatory code ("500", "I41", ...)
    mode              string   ADES instrument mode ("CCD"; MPC note 2 "C")

Formats:

* MPC 80-column optical records, "Format for optical astrometric observations of comets,
  minor planets and natural satellites" (minorplanetcenter.net/iau/info/OpticalObs.html):
  cols 1-5 packed number, 6-12 packed provisional or temporary designation, 13 discovery
  asterisk, 14 note 1, 15 note 2, 16-32 date ``YYYY MM DD.dddddd`` (UTC), 33-44 RA
  ``HH MM SS.ddd``, 45-56 Dec ``sDD MM SS.dd``, 66-70 magnitude, 71 band, 78-80 observatory
  code. Packed designations follow the MPC "Packed provisional and permanent designations"
  page. The format has no uncertainties: readers fill ``default_sigma_arcsec``.
* ADES PSV (IAU Astrometry Data Exchange Standard, version 2017; github.com/IAU-ADES):
  ``# version=2017``, ``# group`` / ``! keyword value`` header lines, then a ``|``-separated
  field-name line and data lines. ``obsTime`` is ISO 8601 UTC, ``ra``/``dec`` decimal
  degrees, ``rmsRA`` (of RA*cos(dec)) and ``rmsDec`` in arcsec.
* CSV with header ``t_utc,ra_deg,dec_deg,sigma_arcsec,obs_code`` (``t_utc`` ISO 8601 or MJD
  UTC) and optional ``designation``, ``mag``, ``band`` columns.

Malformed input raises :class:`lakepipe.errors.ParseError` naming the file and line; an
observatory code the observatories module does not know raises its error.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lakepipe.errors import InputNotFoundError, ParseError, UserError

__all__ = [
    "ASTROMETRY_SCHEMA",
    "AdesContext",
    "format_ades_psv",
    "format_mpc80",
    "make_astrometry",
    "mjd_to_iso",
    "pack_designation",
    "parse_ades_psv",
    "parse_csv",
    "parse_mpc80",
    "read_astrometry",
    "unpack_designation",
    "write_ades_psv",
    "write_mpc80",
]

ASTROMETRY_SCHEMA = pa.schema(
    [
        pa.field("designation", pa.string(), nullable=False),
        pa.field("mjd", pa.float64(), nullable=False),
        pa.field("ra", pa.float64(), nullable=False),
        pa.field("dec", pa.float64(), nullable=False),
        pa.field("sigma_ra_arcsec", pa.float64(), nullable=False),
        pa.field("sigma_dec_arcsec", pa.float64(), nullable=False),
        pa.field("mag", pa.float64()),
        pa.field("band", pa.string()),
        pa.field("obs_code", pa.string(), nullable=False),
        pa.field("mode", pa.string()),
    ]
)

DEFAULT_SIGMA_ARCSEC = 1.0
_MJD_EPOCH = dt.date(1858, 11, 17).toordinal()  # MJD 0 = 1858-11-17T00:00 UTC

# --------------------------------------------------------------------------- designations

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_CENTURY = {"I": 18, "J": 19, "K": 20, "L": 21}
_CENTURY_CODE = {v: k for k, v in _CENTURY.items()}
_HALF_MONTH = "ABCDEFGHJKLMNOPQRSTUVWXY"  # no I
_UNPACKED_PROV = re.compile(r"^(\d{4}) ([A-HJ-Y])([A-HJ-Z])(\d*)$")
_PACKED_PROV = re.compile(r"^([IJKL])(\d\d)([A-HJ-Y])([0-9A-Za-z])(\d)([A-HJ-Z])$")
_UNPACKED_SURVEY = re.compile(r"^(\d{4}) (P-L|T-1|T-2|T-3)$")
_PACKED_SURVEY = re.compile(r"^(PL|T1|T2|T3)S(\d{4})$")
_PACKED_NUMBER = re.compile(r"^(?:[0-9A-Za-z]\d{4}|~[0-9A-Za-z]{4})$")


def _pack_number(n: int) -> str:
    """Packed permanent number: 5 digits, letter + 4 digits, or ``~`` + 4 base-62 digits."""
    if n < 0 or n >= 620000 + 62**4:
        raise ValueError(f"minor planet number out of packable range: {n}")
    if n < 100000:
        return f"{n:05d}"
    if n < 620000:
        return _B62[n // 10000] + f"{n % 10000:04d}"
    rest, digits = n - 620000, []
    for _ in range(4):
        rest, d = divmod(rest, 62)
        digits.append(_B62[d])
    return "~" + "".join(reversed(digits))


def _unpack_number(s: str) -> int:
    if s[0] == "~":
        value = 0
        for c in s[1:]:
            value = value * 62 + _B62.index(c)
        return 620000 + value
    return _B62.index(s[0]) * 10000 + int(s[1:])


def pack_designation(designation: str) -> str:
    """MPC packed form: ``433`` → ``00433``, ``2023 MQ5`` → ``K23M05Q``; others unchanged.

    Temporary designations (up to 7 alphanumerics) are returned as they are.
    """
    d = designation.strip()
    if d.isdigit():
        return _pack_number(int(d))
    m = _UNPACKED_PROV.match(d)
    if m:
        year, half, letter, cycle_s = m.groups()
        century = _CENTURY_CODE.get(int(year[:2]))
        cycle = int(cycle_s) if cycle_s else 0
        if century is None or cycle >= 620:
            raise ValueError(f"cannot pack provisional designation {designation!r}")
        return f"{century}{year[2:]}{half}{_B62[cycle // 10]}{cycle % 10}{letter}"
    m = _UNPACKED_SURVEY.match(d)
    if m:
        number, survey = m.groups()
        return f"{survey.replace('-', '')}S{number}"
    return d


def unpack_designation(packed: str) -> str:
    """Inverse of :func:`pack_designation` (``K23M05Q`` → ``2023 MQ5``)."""
    p = packed.strip()
    if _PACKED_NUMBER.match(p):
        return str(_unpack_number(p))
    m = _PACKED_PROV.match(p)
    if m:
        century, yy, half, c1, c2, letter = m.groups()
        cycle = _B62.index(c1) * 10 + int(c2)
        return f"{_CENTURY[century]}{yy} {half}{letter}{cycle if cycle else ''}"
    m = _PACKED_SURVEY.match(p)
    if m:
        survey, number = m.groups()
        return f"{number} {survey[0]}-{survey[1]}"
    return p


# --------------------------------------------------------------------------- time


def _calendar_to_mjd(year: int, month: int, day_frac: float) -> float:
    """MJD (UTC) of a calendar date with fractional day (UTC days of 86400 s)."""
    day = math.floor(day_frac)
    return dt.date(year, month, day).toordinal() - _MJD_EPOCH + (day_frac - day)


def _mjd_to_calendar(mjd: float, day_decimals: int) -> tuple[int, int, float]:
    """(year, month, day with fraction rounded to ``day_decimals``) of an MJD."""
    scale = 10**day_decimals
    ticks = round(mjd * scale)
    days, frac_ticks = divmod(ticks, scale)
    date = dt.date.fromordinal(_MJD_EPOCH + days)
    return date.year, date.month, date.day + frac_ticks / scale


_ISO = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d(?:\.\d*)?)Z?$")


def _iso_to_mjd(text: str) -> float:
    """MJD (UTC) of an ISO 8601 UTC time ``YYYY-MM-DDThh:mm:ss[.s...][Z]`` (any digits)."""
    m = _ISO.match(text.strip())
    if not m:
        raise ValueError(f"not an ISO 8601 UTC time: {text!r}")
    y, mo, d, h, mi = (int(g) for g in m.groups()[:5])
    s = float(m.group(6))
    if not (0 <= h < 24 and 0 <= mi < 60 and 0 <= s < 61):  # 60.x: a leap second
        raise ValueError(f"time of day out of range: {text!r}")
    return dt.date(y, mo, d).toordinal() - _MJD_EPOCH + (h * 3600 + mi * 60 + s) / 86400.0


def mjd_to_iso(mjd: float, decimals: int = 3) -> str:
    """ISO 8601 UTC string (``Z`` suffix) of an MJD, seconds to ``decimals`` places."""
    scale = 10**decimals
    ticks = round(mjd * 86400 * scale)
    days, rem = divmod(ticks, 86400 * scale)
    secs, sub = divmod(rem, scale)
    h, rest = divmod(secs, 3600)
    mi, s = divmod(rest, 60)
    date = dt.date.fromordinal(_MJD_EPOCH + days)
    frac = f".{sub:0{decimals}d}" if decimals else ""
    return f"{date.isoformat()}T{h:02d}:{mi:02d}:{s:02d}{frac}Z"


# --------------------------------------------------------------------------- table


def make_astrometry(
    *,
    designation: Iterable[str] | str,
    mjd: Iterable[float],
    ra: Iterable[float],
    dec: Iterable[float],
    obs_code: Iterable[str] | str,
    sigma_ra_arcsec: Iterable[float] | float = DEFAULT_SIGMA_ARCSEC,
    sigma_dec_arcsec: Iterable[float] | float | None = None,
    mag: Iterable[float | None] | None = None,
    band: Iterable[str | None] | None = None,
    mode: Iterable[str | None] | str | None = "CCD",
) -> pa.Table:
    """Build the normalised astrometry table; scalars broadcast over the rows.

    ``sigma_dec_arcsec`` defaults to ``sigma_ra_arcsec``.
    """
    mjd_a = np.asarray(list(mjd) if not isinstance(mjd, np.ndarray) else mjd, dtype=np.float64)
    n = len(mjd_a)

    def col(value: object, fill: object) -> list:
        if value is None:
            return [fill] * n
        if isinstance(value, str | float | int):
            return [value] * n
        values = list(value)  # type: ignore[call-overload]
        if len(values) != n:
            raise ValueError(f"column length {len(values)} != {n} rows")
        return values

    sig_ra = np.asarray(col(sigma_ra_arcsec, None), dtype=np.float64)
    sig_dec = sig_ra if sigma_dec_arcsec is None else np.asarray(col(sigma_dec_arcsec, None), float)
    mags = [
        None if m is None or (isinstance(m, float) and math.isnan(m)) else float(m)
        for m in col(mag, None)
    ]
    return pa.table(
        {
            "designation": pa.array([str(d) for d in col(designation, None)], pa.string()),
            "mjd": pa.array(mjd_a),
            "ra": pa.array(np.asarray(col(ra, None), dtype=np.float64) % 360.0),
            "dec": pa.array(np.asarray(col(dec, None), dtype=np.float64)),
            "sigma_ra_arcsec": pa.array(sig_ra),
            "sigma_dec_arcsec": pa.array(np.asarray(sig_dec, dtype=np.float64)),
            "mag": pa.array(mags, pa.float64()),
            "band": pa.array(col(band, None), pa.string()),
            "obs_code": pa.array([str(c) for c in col(obs_code, None)], pa.string()),
            "mode": pa.array(col(mode, None), pa.string()),
        },
        schema=ASTROMETRY_SCHEMA,
    )


def _check_obs_codes(table: pa.Table, source: str, lines: list[int]) -> None:
    """Ask the observatories module for each code once; its error, naming the line, if unknown.

    Raises :class:`ParseError` (``file:line: ...``) chained to the observatories module's
    own exception, whose message lists the known codes.
    """
    from lakepipe.astro.observatories import get_observatory
    from lakepipe.errors import LakepipeError

    seen: set[str] = set()
    for code, lineno in zip(table.column("obs_code").to_pylist(), lines, strict=True):
        if code in seen:
            continue
        try:
            get_observatory(code)
        except (LakepipeError, KeyError, ValueError) as exc:
            raise ParseError(f"{source}:{lineno}: observatory code {code!r}: {exc}") from exc
        seen.add(code)


def _lines(source: str | Path | Iterable[str]) -> tuple[str, list[str]]:
    """(name for messages, lines without newlines) of a path, a text or lines."""
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source):
        path = Path(source)
        if not path.exists():
            raise InputNotFoundError(f"astrometry file not found: {path}")
        return str(path), path.read_text(encoding="utf-8").splitlines()
    if isinstance(source, str):
        return "<text>", source.splitlines()
    return "<lines>", [line.rstrip("\r\n") for line in source]


# --------------------------------------------------------------------------- MPC 80 column

_MPC_RA = re.compile(r"^(\d\d) (\d\d) (\d\d(?:\.\d*)?) *$")
_MPC_DEC = re.compile(r"^([+-])(\d\d) (\d\d) (\d\d(?:\.\d*)?) *$")
_MPC_DATE = re.compile(r"^(\d{4}) (\d\d) (\d\d(?:\.\d*)?) *$")
# note 2 (column 15) values that are not optical positions of the object itself
# header keywords of an MPC submission (minorplanetcenter.net/iau/info/ObsDetails.html)
_MPC_HEADER = re.compile(r"^(COD|CON|OBS|MEA|TEL|NET|BND|COM|NUM|ACK|AC2) ")
_MPC_SKIP_NOTE2 = {"R", "r", "S", "s", "V", "v", "X", "x"}
_NOTE2_MODE = {"C": "CCD", "B": "CMO", "P": "PHO", "A": "PHO", "E": "OCC", "T": "MER"}
_MODE_NOTE2 = {"CCD": "C", "CMO": "B", "PHO": "P", "OCC": "E", "MER": "T"}


def _parse_mpc80_line(
    line: str,
) -> tuple[str, float, float, float, float | None, str | None, str, str | None]:
    if len(line) < 80:
        raise ValueError(f"MPC record is {len(line)} columns, expected 80")
    if len(line) > 80 and line[80:].strip():
        raise ValueError(f"MPC record is {len(line)} columns, expected 80")
    number, prov = line[0:5].strip(), line[5:12].strip()
    if number:
        if not _PACKED_NUMBER.match(number) and not number.isdigit():
            raise ValueError(f"bad packed number {number!r} in columns 1-5")
        designation = (
            unpack_designation(number.zfill(5)) if number.isdigit() else unpack_designation(number)
        )
    elif prov:
        designation = unpack_designation(prov)
    else:
        raise ValueError("no designation in columns 1-12")
    m = _MPC_DATE.match(line[15:32])
    if not m:
        raise ValueError(f"bad date {line[15:32]!r} in columns 16-32 (YYYY MM DD.dddddd)")
    mjd = _calendar_to_mjd(int(m.group(1)), int(m.group(2)), float(m.group(3)))
    m = _MPC_RA.match(line[32:44])
    if not m:
        raise ValueError(f"bad RA {line[32:44]!r} in columns 33-44 (HH MM SS.ddd)")
    h, mi, s = int(m.group(1)), int(m.group(2)), float(m.group(3))
    if h >= 24 or mi >= 60 or s >= 60:
        raise ValueError(f"RA out of range {line[32:44]!r}")
    ra = 15.0 * (h + mi / 60.0 + s / 3600.0)
    m = _MPC_DEC.match(line[44:56])
    if not m:
        raise ValueError(f"bad Dec {line[44:56]!r} in columns 45-56 (sDD MM SS.dd)")
    d, mi, s = int(m.group(2)), int(m.group(3)), float(m.group(4))
    if d > 90 or mi >= 60 or s >= 60:
        raise ValueError(f"Dec out of range {line[44:56]!r}")
    dec = (d + mi / 60.0 + s / 3600.0) * (-1.0 if m.group(1) == "-" else 1.0)
    if abs(dec) > 90.0:
        raise ValueError(f"Dec out of range {line[44:56]!r}")
    mag_text, band_text = line[65:70].strip(), line[70].strip()
    mag: float | None = None
    if mag_text:
        try:
            mag = float(mag_text)
        except ValueError:
            raise ValueError(f"bad magnitude {mag_text!r} in columns 66-70") from None
    code = line[77:80]
    if not re.match(r"^[0-9A-Z]\d\d$", code):
        raise ValueError(f"bad observatory code {code!r} in columns 78-80")
    mode = _NOTE2_MODE.get(line[14]) if line[14].strip() else None
    return (
        designation,
        mjd,
        ra,
        dec,
        mag,
        (band_text or None) if mag is not None else None,
        code,
        mode,
    )


def parse_mpc80(
    source: str | Path | Iterable[str],
    *,
    default_sigma_arcsec: float = DEFAULT_SIGMA_ARCSEC,
    check_codes: bool = True,
) -> pa.Table:
    """Read MPC 80-column optical records (a path, a text with newlines, or lines).

    Blank lines and observation-header lines (``COD``, ``OBS``, ... keywords) are skipped.
    So are records whose observer is not a fixed MPC site or that are not optical
    positions: spacecraft (``S``/``s``) and roving-observer (``V``/``v``) pairs, radar
    (``R``/``r``) and deleted (``X``/``x``) records (note 2, column 15).
    The format carries no uncertainty: every row gets ``default_sigma_arcsec``.
    """
    name, lines = _lines(source)
    rows, linenos = [], []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or _MPC_HEADER.match(line):
            continue  # blank or observation-header line (COD J95, OBS ..., NET ...)
        if len(line) >= 15 and line[14] in _MPC_SKIP_NOTE2:
            continue
        try:
            rows.append(_parse_mpc80_line(line))
        except ValueError as exc:
            raise ParseError(f"{name}:{lineno}: {exc}: {line!r}") from None
        linenos.append(lineno)
    if not rows:
        raise ParseError(f"{name}: no MPC 80-column observation records found")
    des, mjd, ra, dec, mag, band, code, mode = (list(c) for c in zip(*rows, strict=True))
    table = make_astrometry(
        designation=des, mjd=mjd, ra=ra, dec=dec, obs_code=code,
        sigma_ra_arcsec=default_sigma_arcsec, mag=mag, band=band, mode=mode,
    )  # fmt: skip
    if check_codes:
        _check_obs_codes(table, name, linenos)
    return table


_MPC_TEMPORARY = re.compile(r"^[A-Za-z0-9]{1,7}$")


def _mpc80_designation(designation: str) -> str:
    """Columns 1-12 content of a designation (packed), or a UserError with the fix.

    MPC 80-column records hold a packed number, a packed provisional designation or a
    temporary designation of at most 7 letters and digits (OpticalObs.html).
    """
    try:
        packed = pack_designation(designation)
    except ValueError as exc:
        raise UserError(f"MPC 80-column export: {exc}") from None
    if designation.strip().isdigit() or _MPC_TEMPORARY.match(packed):
        return packed
    raise UserError(
        f"MPC 80-column export: designation {designation!r} does not fit columns 1-12: they "
        "hold a number, a provisional designation (2025 AB1, written packed as K25A01B) or a "
        "temporary designation of at most 7 letters/digits. Rename it in the query "
        "(e.g. select 'LP00001' as designation, ...)"
        + (", or export --format ades, whose trkSub allows 8." if len(packed) <= 8 else ".")
    )


def format_mpc80(table: pa.Table, *, day_decimals: int = 6) -> list[str]:
    """MPC 80-column records of an astrometry table (RA to 0.001 s, Dec to 0.01").

    ``day_decimals`` (5 or 6; 6 = 0.0864 s) sets the precision of the date.
    """
    if day_decimals not in (5, 6):
        raise ValueError(f"day_decimals must be 5 or 6 (got {day_decimals})")
    lines = []
    for row in table.to_pylist():
        packed = _mpc80_designation(row["designation"])
        if _PACKED_NUMBER.match(packed) and row["designation"].isdigit():
            cols1_12 = f"{packed:<5}" + " " * 7
        else:
            cols1_12 = " " * 5 + f"{packed:>7}"
        note2 = _MODE_NOTE2.get(row.get("mode") or "CCD", "C")
        y, mo, day = _mjd_to_calendar(row["mjd"], day_decimals)
        date = f"{y:04d} {mo:02d} {day:0{day_decimals + 3}.{day_decimals}f}".ljust(17)
        # RA in units of 0.001 s of time, Dec in 0.01 arcsec, rounded once (no 60.000 s)
        ra_ticks = round((row["ra"] % 360.0) / 15.0 * 3600e3) % (24 * 3600_000)
        h, rest = divmod(ra_ticks, 3600_000)
        mi, ms = divmod(rest, 60_000)
        ra = f"{h:02d} {mi:02d} {ms // 1000:02d}.{ms % 1000:03d}"
        dec_ticks = round(abs(row["dec"]) * 3600e2)
        d, rest = divmod(dec_ticks, 3600_00)
        mi, cs = divmod(rest, 60_00)
        sign = "-" if row["dec"] < 0 and dec_ticks > 0 else "+"
        dec = f"{sign}{d:02d} {mi:02d} {cs // 100:02d}.{cs % 100:02d}"
        mag = f"{row['mag']:5.2f}" if row.get("mag") is not None else " " * 5
        band = (row.get("band") or " ")[:1] if row.get("mag") is not None else " "
        line = (
            f"{cols1_12}  {note2}{date}{ra}{dec}{' ' * 9}{mag}{band}{' ' * 6}{row['obs_code']:>3}"
        )
        assert len(line) == 80, line
        lines.append(line)
    return lines


def write_mpc80(table: pa.Table, path: str | Path, *, day_decimals: int = 6) -> Path:
    """Write an astrometry table as MPC 80-column records; returns the path."""
    path = Path(path)
    lines = format_mpc80(table, day_decimals=day_decimals)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- ADES PSV


def _float_field(value: str, name: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"bad {name} {value!r}") from None


def parse_ades_psv(
    source: str | Path | Iterable[str],
    *,
    default_sigma_arcsec: float = DEFAULT_SIGMA_ARCSEC,
    check_codes: bool = True,
) -> pa.Table:
    """Read ADES PSV optical astrometry (several obsContext blocks allowed).

    The designation is ``permID``, else ``provID``, else ``trkSub``. Missing ``rmsRA`` /
    ``rmsDec`` fall back to ``default_sigma_arcsec``.
    """
    name, lines = _lines(source)
    fields: list[str] | None = None
    rows: list[dict] = []
    linenos: list[int] = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            if line.startswith("#"):
                fields = None  # a new header block comes with its own field line
            continue
        cells = [c.strip() for c in line.split("|")]
        if fields is None:
            fields = cells
            missing = {"stn", "obsTime", "ra", "dec"} - set(fields)
            if missing:
                raise ParseError(
                    f"{name}:{lineno}: ADES PSV field line lacks {sorted(missing)}: {raw!r}"
                )
            if not {"permID", "provID", "trkSub"} & set(fields):
                raise ParseError(f"{name}:{lineno}: ADES PSV needs permID, provID or trkSub")
            continue
        if len(cells) != len(fields):
            raise ParseError(
                f"{name}:{lineno}: {len(cells)} fields, header has {len(fields)}: {raw!r}"
            )
        rec = dict(zip(fields, cells, strict=True))
        try:
            des = rec.get("permID") or rec.get("provID") or rec.get("trkSub")
            if not des:
                raise ValueError("no permID, provID or trkSub")
            dec = _float_field(rec["dec"], "dec")
            if abs(dec) > 90:
                raise ValueError(f"dec out of range {rec['dec']!r}")
            mag = rec.get("mag") or None
            rows.append(
                {
                    "designation": des,
                    "mjd": _iso_to_mjd(rec["obsTime"]),
                    "ra": _float_field(rec["ra"], "ra"),
                    "dec": dec,
                    "sigma_ra_arcsec": _float_field(rec["rmsRA"], "rmsRA")
                    if rec.get("rmsRA")
                    else default_sigma_arcsec,
                    "sigma_dec_arcsec": _float_field(rec["rmsDec"], "rmsDec")
                    if rec.get("rmsDec")
                    else default_sigma_arcsec,
                    "mag": _float_field(mag, "mag") if mag else None,
                    "band": (rec.get("band") or None) if mag else None,
                    "obs_code": rec["stn"],
                    "mode": rec.get("mode") or None,
                }
            )
        except ValueError as exc:
            raise ParseError(f"{name}:{lineno}: {exc}: {raw!r}") from None
        linenos.append(lineno)
    if not rows:
        raise ParseError(f"{name}: no ADES PSV observations found")
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    table = make_astrometry(**cols)
    if check_codes:
        _check_obs_codes(table, name, linenos)
    return table


_ADES_FIELDS = ("permID", "provID", "trkSub", "mode", "stn", "obsTime", "ra", "dec",
                "rmsRA", "rmsDec", "astCat", "mag", "band")  # fmt: skip
# ADES 2017 submit schema (IAU-ADES/ADES-Master xsd/submit.xsd) value types
_ADES_TRKSUB = re.compile(r"^[-A-Za-z0-9_]{1,8}$")  # BaseTrkSubType, maxLength 8
_ADES_CAT = re.compile(r"^[.A-Za-z0-9_]{1,8}$")  # CatType
_ADES_BAND = re.compile(r"^[A-Za-z0-9_]{1,3}$")  # BandType
# Telescope details of stations whose instrument is known (MPC TelescopeDetails.html terms);
# other stations get placeholders to replace with --opt before a submission.
_TELESCOPES = {"I41": ("Palomar 48-inch Samuel Oschin Schmidt", "Schmidt", 1.22, "CCD")}


_ADES_OPTION_ALIASES = {
    "astCat": "ast_cat",
    "aperture": "telescope_aperture",
    "design": "telescope_design",
    "detector": "telescope_detector",
}


@dataclass(frozen=True)
class AdesContext:
    """The ADES obsContext header of a PSV file, and the astrometric catalogue.

    The 2017 submit schema requires, per obsContext: ``observatory`` (``mpcCode``),
    ``submitter`` (``name``), ``observers`` and ``measurers`` (one ``name`` or more) and
    ``telescope`` (``design``, ``aperture`` in m, ``detector``); every optical record
    needs ``astCat``, the catalogue its reference stars came from.

    ``ast_cat`` defaults to ``Gaia3`` (Gaia DR3, an MPC catalogue code): lakepipe's
    astrometry is calibrated against Gaia-like catalogues (the virtual survey's
    reference stars stand in for Gaia DR3; ZTF's WCS are fitted to Gaia). Override it
    (``--opt astCat=UCAC4``) when the detections were calibrated against another one.
    Names default to ``lakepipe user``: replace them before submitting to the MPC.
    """

    submitter: str = "lakepipe user"
    institution: str | None = None
    observers: tuple[str, ...] = ()
    measurers: tuple[str, ...] = ()
    observatory_name: str | None = None
    telescope_name: str | None = None
    telescope_design: str | None = None
    telescope_aperture: float | None = None
    telescope_detector: str | None = None
    ast_cat: str = "Gaia3"

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> AdesContext:
        """From export options (``--opt submitter='A. Observer'``, ``observers='A, B'``,
        ``telescope_aperture=1.22``, ``astCat=Gaia3``); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {}
        for key, value in options.items():
            k = _ADES_OPTION_ALIASES.get(key, key)
            if k not in names or value is None:
                continue
            if k in ("observers", "measurers"):
                items = value.split(",") if isinstance(value, str) else list(value)
                value = tuple(str(v).strip() for v in items if str(v).strip())
            elif k == "telescope_aperture":
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    raise UserError(
                        f"--opt telescope_aperture: metres, e.g. 1.22 (got {value!r})"
                    ) from None
                if not value > 0:
                    raise UserError(f"--opt telescope_aperture must be > 0 m (got {value})")
            else:
                value = str(value)
            kw[k] = value
        ctx = cls(**kw)
        if not _ADES_CAT.match(ctx.ast_cat):
            raise UserError(
                f"--opt astCat={ctx.ast_cat!r}: an MPC catalogue code of up to 8 letters, "
                "digits, '.' or '_' (Gaia3, Gaia2, UCAC4, ...; MPC CatalogueCodes.html)"
            )
        return ctx

    def header(self, code: str) -> list[str]:
        """The obsContext header lines of station ``code``."""
        from lakepipe.astro.observatories import OBSERVATORIES

        site = OBSERVATORIES.get(code)
        tel = _TELESCOPES.get(code, (None, "Reflector", 1.0, "CCD"))
        name = self.observatory_name or (site.name if site is not None else None)
        out = ["# observatory", f"! mpcCode {code}"] + ([f"! name {name}"] if name else [])
        out += ["# submitter", f"! name {self.submitter}"]
        out += [f"! institution {self.institution}"] if self.institution else []
        for block, people in (("observers", self.observers), ("measurers", self.measurers)):
            out += [f"# {block}"] + [f"! name {n}" for n in people or (self.submitter,)]
        tel_name = self.telescope_name or tel[0]
        out += ["# telescope"] + ([f"! name {tel_name}"] if tel_name else [])
        out += [
            f"! design {self.telescope_design or tel[1]}",
            f"! aperture {self.telescope_aperture or tel[2]:g}",
            f"! detector {self.telescope_detector or tel[3]}",
        ]
        return out


def _ades_ids(designation: str) -> tuple[str, str, str]:
    """(permID, provID, trkSub) of a designation, or a UserError naming the fix."""
    d = designation.strip()
    if d.isdigit():
        return d, "", ""
    if _UNPACKED_PROV.match(d) or _UNPACKED_SURVEY.match(d):
        return "", d, ""
    if _ADES_TRKSUB.match(d):
        return "", "", d
    raise UserError(
        f"ADES export: designation {designation!r} is neither a number (permID), a "
        "provisional designation such as '2025 AB1' (provID), nor a valid trkSub (at most "
        "8 characters of letters, digits, '-' and '_'). Give the object a short tracklet "
        "id in the query (e.g. select 'LP00001' as designation, ...)."
    )


def _ades_band(band: str | None, designation: str) -> str:
    if band and not _ADES_BAND.match(band):
        raise UserError(
            f"ADES export: band {band!r} of {designation!r} is not an ADES band code "
            "(up to 3 letters/digits, e.g. g, r, V, Gr)"
        )
    return band or ""


def format_ades_psv(table: pa.Table, context: AdesContext | None = None) -> list[str]:
    """ADES PSV lines (version 2017) of an astrometry table, one obsContext per station.

    Each block has the header the ADES submit schema requires (see :class:`AdesContext`)
    and the fields ``permID|provID|trkSub|mode|stn|obsTime|ra|dec|rmsRA|rmsDec|astCat|
    mag|band``. A designation that is no number, provisional designation or trkSub (8
    characters) raises :class:`~lakepipe.errors.UserError`.
    """
    ctx = context or AdesContext()
    rows = table.to_pylist()
    out = ["# version=2017"]
    for code in dict.fromkeys(r["obs_code"] for r in rows):
        out += [*ctx.header(code), "|".join(_ADES_FIELDS)]
        for r in rows:
            if r["obs_code"] != code:
                continue
            perm, prov, trk = _ades_ids(r["designation"])
            has_mag = r.get("mag") is not None and bool(r.get("band"))  # mag needs band
            mag = f"{r['mag']:.2f}" if has_mag else ""
            band = _ades_band(r.get("band"), r["designation"]) if has_mag else ""
            ra = f"{r['ra'] % 360.0:.8f}"
            ra = "0.00000000" if ra == "360.00000000" else ra  # ra < 360 in the schema
            cells = [perm, prov, trk, r.get("mode") or "CCD", code, mjd_to_iso(r["mjd"], 3),
                     ra, f"{r['dec']:+.8f}", f"{r['sigma_ra_arcsec']:.4f}",
                     f"{r['sigma_dec_arcsec']:.4f}", ctx.ast_cat, mag, band]  # fmt: skip
            out.append("|".join(cells))
    return out


def write_ades_psv(table: pa.Table, path: str | Path, context: AdesContext | None = None) -> Path:
    """Write an astrometry table as ADES PSV; returns the path."""
    path = Path(path)
    path.write_text("\n".join(format_ades_psv(table, context)) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- CSV

_CSV_REQUIRED = ("t_utc", "ra_deg", "dec_deg", "sigma_arcsec", "obs_code")


def parse_csv(
    source: str | Path | Iterable[str],
    *,
    designation: str = "unknown",
    check_codes: bool = True,
) -> pa.Table:
    """Read CSV astrometry: ``t_utc`` (ISO 8601 UTC or MJD UTC), ``ra_deg``, ``dec_deg``,
    ``sigma_arcsec``, ``obs_code``; optional ``designation``, ``mag``, ``band``."""
    name, lines = _lines(source)
    reader = csv.reader(io.StringIO("\n".join(lines)))
    header: list[str] | None = None
    rows, linenos = [], []
    for lineno, cells in enumerate(reader, start=1):
        if not cells or not "".join(cells).strip() or cells[0].lstrip().startswith("#"):
            continue
        cells = [c.strip() for c in cells]
        if header is None:
            header = cells
            missing = [c for c in _CSV_REQUIRED if c not in header]
            if missing:
                raise ParseError(
                    f"{name}:{lineno}: CSV header lacks {missing}; expected columns "
                    f"{', '.join(_CSV_REQUIRED)} (optional: designation, mag, band)"
                )
            continue
        if len(cells) != len(header):
            raise ParseError(f"{name}:{lineno}: {len(cells)} fields, header has {len(header)}")
        rec = dict(zip(header, cells, strict=True))
        try:
            t = rec["t_utc"]
            mjd = float(t) if re.match(r"^[\d.]+$", t) else _iso_to_mjd(t)
            dec = _float_field(rec["dec_deg"], "dec_deg")
            sigma = _float_field(rec["sigma_arcsec"], "sigma_arcsec")
            if abs(dec) > 90:
                raise ValueError(f"dec_deg out of range [-90, 90] (got {dec})")
            if not sigma > 0:
                raise ValueError(f"sigma_arcsec must be > 0 (got {sigma})")
            mag = rec.get("mag") or None
            rows.append(
                {
                    "designation": rec.get("designation") or designation,
                    "mjd": mjd,
                    "ra": _float_field(rec["ra_deg"], "ra_deg"),
                    "dec": dec,
                    "sigma_ra_arcsec": sigma,
                    "mag": _float_field(mag, "mag") if mag else None,
                    "band": (rec.get("band") or None) if mag else None,
                    "obs_code": rec["obs_code"],
                }
            )
        except ValueError as exc:
            raise ParseError(f"{name}:{lineno}: {exc}") from None
        linenos.append(lineno)
    if not rows:
        raise ParseError(f"{name}: no CSV astrometry rows found")
    table = make_astrometry(**{k: [r[k] for r in rows] for k in rows[0]})
    if check_codes:
        _check_obs_codes(table, name, linenos)
    return table


def read_astrometry(path: str | Path, fmt: str | None = None, **kwargs: object) -> pa.Table:
    """Read a file in ``fmt`` (``mpc80``, ``ades``, ``csv``), guessed from its suffix/content."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"astrometry file not found: {path}")
    if fmt is None:
        suffix = path.suffix.lower()
        head = path.read_text(encoding="utf-8")[:200].lstrip()
        if suffix == ".psv" or head.startswith("# version"):
            fmt = "ades"
        elif suffix == ".csv":
            fmt = "csv"
        else:
            fmt = "mpc80"
    readers = {"mpc80": parse_mpc80, "ades": parse_ades_psv, "csv": parse_csv}
    if fmt not in readers:
        raise ParseError(f"unknown astrometry format {fmt!r}; available: {', '.join(readers)}")
    return readers[fmt](path, **kwargs)  # type: ignore[operator]
