"""GCN circular tables and plots from a lake written through the real commit path.

Truth: a hand-made lightcurve of a fading source with known times, magnitudes and one
upper limit; the table must show T-T0 in hours, the limit as '> 20.80', the system.
"""

from __future__ import annotations

import io

import matplotlib.image as mpimg
import numpy as np
import pyarrow as pa
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from lakepipe.export.base import ExportMeta
from lakepipe.export.gcn import time_unit, write_gcn
from lakepipe.lake import Commit, Lake, PartitionEntry
from lakepipe.runner import prepare_table
from lakepipe.tables import get_contract

T0 = 60678.0  # 2025-01-03T00:00:00 UTC


def commit(lake: Lake, table: str, key: str, rows: pa.Table) -> None:
    t = prepare_table("test", table, rows, key)
    files, n = lake.write_partition(get_contract(table), key, t, f"{table}{key}".ljust(64, "0"))
    entry = PartitionEntry(files, n, "fp", "test", "test:1", "p", "i", "run")
    lake.commit([Commit("test", key, {table: entry})])


def lightcurve_rows() -> pa.Table:
    mjd = T0 + np.array([0.10, 0.15, 0.40, 0.45, 0.90])
    return pa.table(
        {
            "object_id": ["grb"] * 5,
            "ra": [150.0] * 5,
            "dec": [2.2] * 5,
            "exposure_id": pa.array([11, 12, 13, 14, 15], pa.int64()),
            "source_id": pa.array([1, 2, 3, 4, 5], pa.int64()),
            "mjd": mjd,
            "filter": ["zr", "zg", "zr", "zg", "zr"],
            "mag": [18.5, 18.9, 19.4, None, 20.1],
            "mag_err": [0.03, 0.04, 0.06, None, 0.15],
            "upper_limit": [False, False, False, True, False],
            "limit_mag": [None, None, None, 20.8, None],
            "snr": [35.0, 27.0, 18.0, 2.0, 7.0],
            "forced": [False, False, False, True, False],
            "sep_arcsec": [0.2, 0.3, 0.2, 0.0, 0.4],
            "mag_system": ["AB"] * 5,
        }
    )


@pytest.fixture
def lake(tmp_path) -> Lake:
    lake = Lake(tmp_path / "lake")
    commit(lake, "lightcurves", "bucket=07", lightcurve_rows())
    return lake


def test_gcn_table_from_cli(lake, cli, tmp_path):
    out = tmp_path / "grb.gcn"
    r = cli(
        "export",
        "lightcurves",
        "--lake",
        lake.root,
        "--format",
        "gcn",
        "--target",
        "grb",
        "--t0",
        "2025-01-03T00:00:00",
        "-o",
        out,
    )
    assert r.exit_code == 0, r.stderr
    lines = out.read_text().splitlines()
    assert lines[0].split(" | ")[0].strip() == "T-T0 (h)"
    assert "Mag (AB)" in lines[0]
    first = [c.strip() for c in lines[2].split("|")]
    assert first[0] == "2.400" and first[2] == "r" and first[4] == "18.50 +/- 0.03"
    limit = [c.strip() for c in lines[5].split("|")]
    assert limit[0] == "10.800" and limit[2] == "g" and limit[4] == "> 20.80"
    assert len([ln for ln in lines if " | " in ln]) == 6  # header + 5 rows
    assert "AB system" in lines[-1]


def test_gcn_first_per_filter_and_errors(lake, cli, tmp_path):
    out = tmp_path / "first.gcn"
    r = cli(
        "export",
        "lightcurves",
        "--lake",
        lake.root,
        "-f",
        "gcn",
        "--target",
        "grb",
        "--t0",
        str(T0),
        "--opt",
        "rows=first",
        "-o",
        out,
    )
    assert r.exit_code == 0, r.stderr
    rows = [ln for ln in out.read_text().splitlines()[2:] if " | " in ln]
    assert [c.split("|")[2].strip() for c in rows] == ["r", "g"]
    r = cli(
        "export",
        "lightcurves",
        "--lake",
        lake.root,
        "-f",
        "gcn",
        "--target",
        "nope",
        "--t0",
        str(T0),
        "-o",
        out,
    )
    assert r.exit_code == 2 and "no lightcurve rows for target 'nope'; objects: grb" in r.stderr
    r = cli("export", "lightcurves", "--lake", lake.root, "-f", "gcn", "--target", "grb", "-o", out)
    assert r.exit_code == 2 and "needs --t0" in r.stderr


def test_time_units_follow_the_span():
    assert time_unit(np.array([100 / 86400]))[0] == "s"
    assert time_unit(np.array([0.05]))[0] == "min"
    assert time_unit(np.array([1.0]))[0] == "h"
    assert time_unit(np.array([3.0]))[0] == "d"
    buf = io.BytesIO()
    write_gcn(lightcurve_rows(), buf, ExportMeta(options={"target": "grb", "t0": T0 - 5}))
    assert buf.getvalue().decode().startswith("T-T0 (d)")


def _not_blank(path) -> bool:
    img = mpimg.imread(path)
    return img.ndim == 3 and float(np.std(img[..., :3])) > 0.05


def test_plot_lightcurve(lake, cli, tmp_path):
    out = tmp_path / "lc.png"
    r = cli("plot", "lightcurve", "grb", "--lake", lake.root, "-o", out, "--t0", str(T0))
    assert r.exit_code == 0, r.stderr
    assert _not_blank(out) and "5 points" in r.stderr


def test_lightcurve_figure_limits_point_fainter_and_mjd_has_no_offset():
    """The one upper limit (zg, 20.80) is an arrow from 20.80 towards fainter magnitudes
    (larger, drawn downwards on the inverted axis), not errorbar limit carets; without T0
    the x axis shows plain MJD (no '+6.0678e4' offset)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Annotation

    from lakepipe.plots import lightcurve_figure

    fig = lightcurve_figure(lightcurve_rows(), "grb")
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    arrows = [a for a in ax.texts if isinstance(a, Annotation)]
    assert len(arrows) == 1
    (x0, y0), (x1, y1) = arrows[0].xyann, arrows[0].xy
    assert x0 == x1 == pytest.approx(T0 + 0.45) and y0 == pytest.approx(20.8) and y1 > y0
    assert ax.yaxis_inverted()
    bottom, _ = ax.get_ylim()
    assert bottom > y1  # the arrow head is inside the axes
    assert ax.xaxis.get_major_formatter().get_offset() == ""
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert labels and all(lbl.startswith("6067") and "e" not in lbl for lbl in labels)


def test_plot_cutouts(tmp_path, cli):
    lake = Lake(tmp_path / "lake")
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.2]
    w.wcs.crpix = [32.5, 32.5]
    w.wcs.cdelt = [-1.01 / 3600, 1.01 / 3600]
    yy, xx = np.mgrid[:64, :64]
    data = 100 + 5000 * np.exp(-((xx - 31.5) ** 2 + (yy - 31.5) ** 2) / 8.0)
    buf = io.BytesIO()
    fits.PrimaryHDU(data.astype(np.float32), header=w.to_header()).writeto(buf)
    ref = lake.files.put_bytes(buf.getvalue(), kind="cutouts", suffix=".fits")
    rows = pa.table(
        {
            "cutout_id": pa.array([1, 2], pa.int64()),
            "exposure_id": pa.array([11, 12], pa.int64()),
            "target_id": ["grb", "grb"],
            "ra": [150.0, 150.0],
            "dec": [2.2, 2.2],
            "size_arcsec": [64.0, 64.0],
            "naxis1": pa.array([64, 64], pa.int32()),
            "naxis2": pa.array([64, 64], pa.int32()),
            "path": [ref.path, ref.path],
            "sha256": [ref.sha256, ref.sha256],
            "bytes": pa.array([ref.bytes, ref.bytes], pa.int64()),
            "status": ["ok", "ok"],
            "reason": pa.array([None, None], pa.string()),
        }
    )
    commit(lake, "cutouts", "night=2025-01-03", rows)
    out = tmp_path / "stamps.png"
    r = cli("plot", "cutouts", "grb", "--lake", lake.root, "-o", out)
    assert r.exit_code == 0, r.stderr
    assert _not_blank(out)
    r = cli("plot", "cutouts", "other", "--lake", lake.root, "-o", out)
    assert r.exit_code == 2 and "no cutout files for target 'other'" in r.stderr
    # an object of the lightcurves table 10" north of the cutout centre is found on both
    # cutouts (their 64" squares hold it); one 0.1 deg away is on none
    near = lightcurve_rows().to_pylist()
    near = [{**r, "object_id": "near", "dec": 2.2 + 10 / 3600} for r in near]
    far = [{**r, "object_id": "far", "dec": 2.3} for r in lightcurve_rows().to_pylist()]
    commit(lake, "lightcurves", "bucket=07", pa.Table.from_pylist([*near, *far]))
    out2 = tmp_path / "near.png"
    r = cli("plot", "cutouts", "near", "--lake", lake.root, "-o", out2, "--size-arcsec", "30")
    assert r.exit_code == 0, r.stderr
    assert "(2 stamps)" in r.stderr and _not_blank(out2)
    r = cli("plot", "cutouts", "far", "--lake", lake.root, "-o", out2)
    assert r.exit_code == 2 and "no cutout files for target 'far'" in r.stderr


def test_gcn_first_is_the_first_detection_after_t0(tmp_path, cli):
    """rows=first skips a pre-T0 limit and a pre-T0 detection: the first detection at or
    after T0 per filter (zr at T0+0.10 d, zg at T0+0.15 d); only the target's rows are
    selected, so the CLI reports the rows written (2); the footer gives T0 in ISO UTC."""
    lake = Lake(tmp_path / "lake")
    grb = lightcurve_rows()
    rows = grb.to_pylist()
    early = {**rows[3], "mjd": T0 - 0.5, "exposure_id": 10}  # a zg limit before T0
    pre = {**rows[0], "mjd": T0 - 0.2, "exposure_id": 9}  # a zr detection before T0
    other = [{**r, "object_id": "star"} for r in rows]
    table = pa.Table.from_pylist([*rows, early, pre, *other], schema=grb.schema)
    commit(lake, "lightcurves", "bucket=07", table)
    out = tmp_path / "first.gcn"
    args = ["export", "lightcurves", "--lake", lake.root, "-f", "gcn", "--target", "grb"]
    r = cli(*args, "--t0", "2025-01-03T00:00:00", "--opt", "rows=first", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "wrote 2 rows" in r.stderr
    text = out.read_text()
    rows = [[c.strip() for c in ln.split("|")] for ln in text.splitlines()[2:] if " | " in ln]
    assert [(c[0], c[2], c[4]) for c in rows] == [
        ("2.400", "r", "18.50 +/- 0.03"),
        ("3.600", "g", "18.90 +/- 0.04"),
    ]
    assert "T0 = 2025-01-03T00:00:00.000 UTC (MJD 60678.00000)" in text
    # all rows of the target only (7), not the other object's
    r = cli(*args, "--t0", str(T0), "-o", out)
    assert r.exit_code == 0 and "wrote 7 rows" in r.stderr
    # a T0 after every detection: no first row to give
    r = cli(*args, "--t0", str(T0 + 5), "--opt", "rows=first", "-o", out)
    assert r.exit_code == 2 and "no detection after T0" in r.stderr


def test_lightcurve_csv_with_units(lake, cli, tmp_path):
    """CSV of lightcurves: plain header by default; units from the contract in the names
    (units=names) or as '# unit:' comment lines (units=comments) that astropy reads back."""
    from astropy.table import Table

    out = tmp_path / "lc.csv"
    base = ["export", "lightcurves", "--lake", lake.root, "-o", out]
    assert cli(*base).exit_code == 0
    assert out.read_text().splitlines()[0].startswith("bucket,object_id,ra,dec,")
    assert cli(*base, "--opt", "units=names").exit_code == 0
    header = out.read_text().splitlines()[0].split(",")
    assert {"ra [deg]", "mjd [d]", "mag [mag]", "limit_mag [mag]", "object_id"} <= set(header)
    assert cli(*base, "--opt", "units=comments").exit_code == 0
    lines = out.read_text().splitlines()
    assert "# unit: mjd = d" in lines and "# unit: mag = mag" in lines
    t = Table.read(out, format="ascii.csv", comment="#")
    assert len(t) == 5 and t["mag"][0] == pytest.approx(18.5)
    r = cli(*base, "--opt", "units=yes")
    assert r.exit_code == 2 and "use one of none, names, comments" in r.stderr
