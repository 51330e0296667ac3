"""The cutouts stage through the runner: statuses, WCS, reruns, failures, SQL targets.

Truth: generated FITS folders with stars at known sky positions rendered through SIP/TPV
WCSs (fits_dir), and the virtual survey's per-exposure truth (sim): where every star was
rendered, in full-image pixels.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import sep
import yaml
from astropy.io import fits

from lakepipe.astro import wcs as wcsu
from lakepipe.lake import Lake
from lakepipe.runner import run_pipeline
from lakepipe.stages.base import Partition, StageContext
from lakepipe.stages.cutouts import CutoutsStage, _position_at, cutout_id_for
from tests.data.fits_images import ImageSpec, Star, write_mef

RA0, DEC0 = 150.1, 2.3
STAR = Star(RA0 + 0.004, DEC0 + 0.002, 4e4)


def make_folder(root: Path) -> Path:
    """Night 1: a.fits (SIP int16 at RA0; TPV at RA0+0.05) and b.fits (TAN, 2 h later).
    Night 2: c.fits. Every image at RA0 shows STAR."""
    d = root / "images"
    d.mkdir(parents=True)
    write_mef(
        d / "a.fits",
        [
            ImageSpec(RA0, DEC0, scaled_int16=True, stars=[STAR]),
            ImageSpec(RA0 + 0.05, DEC0, distortion="tpv", extname="S2"),
        ],
        date_obs="2025-01-03T05:00:00",
    )
    write_mef(
        d / "b.fits",
        [ImageSpec(RA0 + 0.002, DEC0, distortion="none", stars=[STAR])],
        date_obs="2025-01-03T07:00:00",
    )
    write_mef(d / "c.fits", [ImageSpec(RA0, DEC0, stars=[STAR])], date_obs="2025-01-04T05:00:00")
    return d


def write_spec(root: Path, **cutouts: object) -> Path:
    spec = {
        "name": "cut_test",
        "lake": str(root / "lake"),
        "archive": {"kind": "fits_dir", "path": "images"},
        "stages": {
            "exposures": {"kind": "exposures"},
            "cutouts": {"kind": "cutouts", "inputs": ["exposures"], "size_arcsec": 21, **cutouts},
        },
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


TARGETS = [
    {"id": "star", "ra": STAR.ra, "dec": STAR.dec},
    {"id": "far", "ra": 10.0, "dec": -10.0},
]


def rows_by_name(lake: Lake) -> dict[tuple[str, str], dict]:
    t = lake.reader().sql(
        "select c.*, e.image_uri from cutouts c join exposures e using (exposure_id)"
    )
    return {(r["image_uri"].rsplit("/", 1)[1], r["target_id"]): r for r in t.to_pylist()}


def centroid(img: np.ndarray, sky: float) -> tuple[float, float]:
    w = np.clip(np.nan_to_num(img - sky), 0, None)
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    return float((w * xx).sum() / w.sum()), float((w * yy).sum() / w.sum())


@pytest.fixture
def ran(tmp_path: Path) -> tuple[Path, Lake]:
    make_folder(tmp_path)
    spec = write_spec(tmp_path, targets=TARGETS)
    r = run_pipeline(spec, workers=1)
    assert r.exit_code == 0, [s.errors for s in r.stages]
    return spec, Lake(r.lake)


def test_statuses_files_and_wcs(ran):
    _spec, lake = ran
    rows = rows_by_name(lake)
    status = {k: v["status"] for k, v in rows.items()}
    assert status == {
        ("a.fits[1]", "star"): "ok",
        ("a.fits[2]", "star"): "off_chip",  # the TPV image is 0.05 deg east
        ("b.fits[1]", "star"): "ok",
        ("c.fits[1]", "star"): "ok",
        **{(n, "far"): "off_chip" for n in ("a.fits[1]", "a.fits[2]", "b.fits[1]", "c.fits[1]")},
    }
    off = rows[("a.fits[2]", "star")]
    assert off["path"] is None and off["sha256"] is None
    assert off["reason"] == "target outside the exposure footprint"
    for (name, target), r in rows.items():
        assert r["cutout_id"] == cutout_id_for(r["exposure_id"], target)
        if r["status"] != "ok":
            continue
        assert lake.files.verify(r["path"], r["sha256"])
        assert r["path"].startswith("_files/cutouts/") and r["path"].endswith(".fits")
        assert (r["naxis1"], r["naxis2"]) == (21, 21)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # astropy opens it without complaint
            with fits.open(lake.files.abspath(r["path"])) as hdul:
                header, data = hdul[0].header, hdul[0].data
        # the exposure's headers (primary ones inherited by the extension) come along
        assert (header["FILTER"], header["GAIN"], header["EXPTIME"]) == ("r", 1.5, 30.0)
        assert header["DATE-OBS"].startswith({"c.fits[1]": "2025-01-04"}.get(name, "2025-01-03"))
        assert header["TARGETID"] == target and int(header["EXPID"]) == r["exposure_id"]
        # the cutout's WCS puts the star where its light is, within 0.05 px
        px, py = wcsu.sky_to_pixel(wcsu.celestial_wcs(header), [STAR.ra], [STAR.dec])
        cx, cy = centroid(data.astype(float), 100.0)
        assert abs(px[0] - cx) < 0.05 and abs(py[0] - cy) < 0.05, (name, px, py, cx, cy)
    # every exposure has a cutout (the demo's diagnostic)
    n = lake.reader().sql(
        "select count(*) as n from exposures anti join cutouts using (exposure_id)"
    )
    assert n.column("n")[0].as_py() == 0


def test_partial_cutout_at_the_image_edge(tmp_path):
    make_folder(tmp_path)
    from lakepipe.archives.fits_dir import FitsDirArchive

    a = FitsDirArchive(FitsDirArchive.Params(path=str(tmp_path / "images")))
    r = next(r for r in a.exposures().to_pylist() if r["image_uri"].endswith("b.fits[1]"))
    # ~2 px inside the far corner (pixel NAXIS1, NAXIS2) along the diagonal
    ra, dec = r["ra3"] + 0.03 * (r["ra"] - r["ra3"]), r["dec3"] + 0.03 * (r["dec"] - r["dec3"])
    spec = write_spec(tmp_path, center={"ra": ra, "dec": dec})
    lake = Lake(run_pipeline(spec, workers=1).lake)
    row = rows_by_name(lake)[("b.fits[1]", "center")]
    assert row["status"] == "partial" and "edge" in row["reason"]
    with fits.open(lake.files.abspath(row["path"])) as hdul:
        data, x0, y0 = hdul[0].data, -int(hdul[0].header["LTV1"]), -int(hdul[0].header["LTV2"])
    yy, xx = np.mgrid[0:21, 0:21]
    off_image = (xx + x0 >= 120) | (yy + y0 >= 100)
    assert 0 < off_image.sum() < 21 * 21
    assert (np.isnan(data) == off_image).all()


def _scramble_pixels(path: Path) -> None:
    """Change pixel values in place (same size; headers, hence exposures rows, unchanged)."""
    st = path.stat()
    with fits.open(path) as hdul:
        spans = [
            (hdul.fileinfo(i)["datLoc"], hdul[i].size)  # data bytes
            for i in range(1, len(hdul))
            if hdul[i].is_image
        ]
    raw = bytearray(path.read_bytes())
    for start, size in spans:
        for j in range(start + 3, start + size, 4):
            raw[j] ^= 0x01  # lowest byte of every other int16 / of each float32 mantissa
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_rerun_refetches_only_the_corrupt_file(ran):
    spec, lake = ran
    before = rows_by_name(lake)
    # change every source image's pixels behind the archive's back: a refetched cutout
    # would get a new checksum, a reused one keeps its old one
    for f in (lake.root.parent / "images").glob("*.fits"):
        _scramble_pixels(f)
    victim = before[("b.fits[1]", "star")]
    p = lake.files.abspath(victim["path"])
    p.write_bytes(p.read_bytes()[:1000])  # truncated
    assert not lake.files.verify(victim["path"], victim["sha256"])
    # the check a runner can make before skipping a night (files are not fingerprinted)
    from lakepipe.spec import load_spec

    loaded = load_spec(spec)
    stage = CutoutsStage("cutouts", loaded.model.stages["cutouts"])
    ctx = StageContext("cutouts", lake=lake.reader(), files=lake.files)
    reason = stage.verify_partition(ctx, Partition.of(night="2025-01-03"))
    assert reason and victim["path"] in reason and reason.startswith("1 cutout file")
    assert stage.verify_partition(ctx, Partition.of(night="2025-01-04")) is None
    r = run_pipeline(spec, workers=1, force=["cutouts"])
    assert r.exit_code == 0
    by = {s.name: s for s in r.stages}
    assert by["cutouts"].ok == 2
    after = rows_by_name(lake)
    assert set(after) == set(before)
    for key, row in after.items():
        if key == ("b.fits[1]", "star"):
            assert row["status"] == "ok" and row["sha256"] != victim["sha256"]
            assert lake.files.verify(row["path"], row["sha256"])
        else:
            assert row["sha256"] == before[key]["sha256"], key  # reused, not fetched
    # and a plain rerun does nothing at all
    assert run_pipeline(spec, workers=1).executed == 0


def test_plain_rerun_redoes_only_the_night_with_a_damaged_file(ran):
    spec, lake = ran
    before = rows_by_name(lake)
    victim = before[("b.fits[1]", "star")]
    p = lake.files.abspath(victim["path"])
    p.write_bytes(p.read_bytes()[:1000])  # truncated behind the lake's back
    r = run_pipeline(spec, workers=1)  # no --force: the runner verifies skipped nights
    by = {s.name: s for s in r.stages}
    assert (by["cutouts"].ok, by["cutouts"].skipped) == (1, 1)
    [plan] = [p for p in by["cutouts"].plans if p.action == "run"]
    assert plan.reason.startswith("output damaged: 1 cutout file(s) missing or corrupt")
    after = rows_by_name(lake)
    assert after[("b.fits[1]", "star")]["sha256"] == victim["sha256"]  # same pixels again
    assert lake.files.verify(victim["path"], victim["sha256"])
    assert run_pipeline(spec, workers=1).executed == 0


def test_failed_fetches_become_rows_and_all_failed_fails_the_night(tmp_path):
    make_folder(tmp_path)
    spec = write_spec(tmp_path, targets=TARGETS)
    run_pipeline(spec, workers=1, only=["exposures"])
    images = tmp_path / "images"
    (images / "b.fits").unlink()
    (images / "c.fits").unlink()
    r = run_pipeline(spec, workers=1, only=["cutouts"])
    by = {s.name: s for s in r.stages}["cutouts"]
    # night 1: a.fits still serves its cutouts, b.fits' cutout fails; night 2: all fail
    assert (by.ok, by.failed) == (1, 1) and r.exit_code == 1
    assert "all 1 cutout fetches of night 2025-01-04 failed" in by.errors["night=2025-01-04"]
    lake = Lake(r.lake)
    rows = rows_by_name(lake)
    failed = rows[("b.fits[1]", "star")]
    assert failed["status"] == "failed" and failed["path"] is None
    assert "b.fits" in failed["reason"] or "no exposure" in failed["reason"]
    assert rows[("a.fits[1]", "star")]["status"] == "ok"
    assert rows[("b.fits[1]", "far")]["status"] == "off_chip"  # decided without fetching


def test_targets_sql_interpolates_time_tagged_positions_and_pins_exposures(tmp_path):
    make_folder(tmp_path)
    t_a = 60678.0 + 5 / 24 + 15 / 86400  # a.fits mid-exposure
    d = 0.01  # deg of motion either side of STAR, ±0.1 d around a.fits' time
    sql = (
        "select * from (values "
        f"('mover', {STAR.ra - d}, {STAR.dec}, {t_a - 0.1}, null),"
        f"('mover', {STAR.ra + d}, {STAR.dec}, {t_a + 0.1}, null),"
        f"('fixed', {STAR.ra}, {STAR.dec}, null, null)"
        ") t(target_id, ra, dec, mjd, exposure_id) "
        "union all select 'pinned', ra, dec, mjd, exposure_id from exposures "
        "where image_uri like '%b.fits%'"
    )
    lake = Lake(run_pipeline(write_spec(tmp_path, targets_sql=sql), workers=1).lake)
    rows = rows_by_name(lake)
    mover = rows[("a.fits[1]", "mover")]
    assert mover["ra"] == pytest.approx(STAR.ra, abs=1e-9)
    # interpolation follows the great circle, which bulges 3.5e-8 deg north of the
    # parallel between the two rows at this separation and declination
    assert mover["dec"] == pytest.approx(STAR.dec + 3.5e-8, abs=2e-9)
    assert mover["status"] == "ok"
    # b.fits is 2 h = 0.083 d later: the mover has moved 0.0083 deg east
    assert rows[("b.fits[1]", "mover")]["ra"] == pytest.approx(STAR.ra + d / 1.2, abs=1e-7)
    assert ("c.fits[1]", "mover") not in rows  # next night: outside the mover's time span
    assert {k for k in rows if k[1] == "pinned"} == {("b.fits[1]", "pinned")}
    assert {k[0] for k in rows if k[1] == "fixed"} == {
        "a.fits[1]",
        "a.fits[2]",
        "b.fits[1]",
        "c.fits[1]",
    }


def test_center_from_a_where_block_and_default_exposure_centre(tmp_path):
    make_folder(tmp_path)
    where = {"ra": STAR.ra, "dec": STAR.dec, "radius_deg": 0.1}
    p = CutoutsStage.Params(center=where)
    assert p.center.center() == (STAR.ra, STAR.dec)
    lake = Lake(run_pipeline(write_spec(tmp_path), workers=1).lake)
    t = (
        lake.reader()
        .sql(
            "select c.ra, c.dec, e.ra as era, e.dec as edec, c.status from cutouts c "
            "join exposures e using (exposure_id)"
        )
        .to_pylist()
    )
    assert len(t) == 4 and all(r["status"] == "ok" for r in t)
    assert all(r["ra"] == r["era"] and r["dec"] == r["edec"] for r in t)


def test_position_interpolation_wraps_ra_and_respects_tolerance():
    ra = np.array([359.99, 0.01])
    dec = np.array([0.0, 0.0])
    mjd = np.array([10.0, 11.0])
    r, d = _position_at(ra, dec, mjd, 10.5, 0.0)
    assert min(r, 360 - r) == pytest.approx(0.0, abs=1e-9) and d == pytest.approx(0.0, abs=1e-12)
    assert _position_at(ra, dec, mjd, 11.01, 0.0) is None
    assert _position_at(ra, dec, mjd, 11.0005, 0.001) == (0.01, 0.0)
    assert _position_at(ra[:1], dec[:1], mjd[:1], 10.0, 0.0) == (359.99, 0.0)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"size_arcsec": -1}, "greater than 0"),
        ({"targets": [{"id": 1, "ra": 1, "dec": 1}, {"id": "1", "ra": 2, "dec": 2}]}, "duplicate"),
        ({"center": {"start": "2025-01-01"}}, "no cone or box"),
        ({"targets": [{"id": "x", "ra": 400, "dec": 0}]}, "less than 360"),
        (
            {"center": {"ra": 1, "dec": 1}, "targets": [{"id": "x", "ra": 1, "dec": 1}]},
            r"give at most one of center, targets, targets_sql \(got center and targets\)",
        ),
        (
            {"targets": [{"id": "x", "ra": 1, "dec": 1}], "targets_sql": "select 1"},
            r"\(got targets and targets_sql\)",
        ),
        (
            {"center": {"ra": 1, "dec": 1}, "targets": [], "targets_sql": "select 1"},
            r"\(got center and targets and targets_sql\)",
        ),
    ],
)
def test_bad_params(params, match):
    with pytest.raises(ValueError, match=match):
        CutoutsStage.Params(**params)


def test_two_target_choices_are_a_spec_error(tmp_path, cli):
    """`lakepipe validate` names the stage and both keys, instead of ignoring one."""
    spec = {
        "name": "two_choices",
        "archive": {"kind": "sim", "seed": 3},
        "stages": {
            "exposures": {"kind": "exposures"},
            "cutouts": {
                "kind": "cutouts",
                "inputs": ["exposures"],
                "center": {"ra": 150.0, "dec": 2.2},
                "targets_sql": "select 'a' as target_id, 150.0 as ra, 2.2 as dec",
            },
        },
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    r = cli("validate", path)
    out = r.stdout + r.stderr  # validate reports its findings on stdout
    assert r.exit_code == 2
    assert "spec.yaml:8: stages.cutouts" in out
    assert "give at most one of center, targets, targets_sql (got center and targets_sql)" in out


SIM = {
    "kind": "sim",
    "seed": 3,
    "n_fields": 1,
    "n_nights": 1,
    "visits_per_night": 2,
    "filters": ["zr"],
    "naxis1": 256,
    "naxis2": 256,
    "n_stars": 150,
    "n_asteroids": 0,
}


def test_sim_cutout_wcs_places_truth_stars_on_their_rendered_pixels(tmp_path):
    """Truth: the survey's per-exposure list of rendered stars (full-image pixels)."""
    from lakepipe.archives.sim import SimArchive

    spec = tmp_path / "sim.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "sim_cut",
                "lake": str(tmp_path / "lake"),
                "archive": SIM,
                "stages": {
                    "exposures": {"kind": "exposures"},
                    "cutouts": {"kind": "cutouts", "inputs": ["exposures"], "size_arcsec": 200},
                },
            }
        )
    )
    r = run_pipeline(spec, workers=1)
    assert r.exit_code == 0, [s.errors for s in r.stages]
    lake = Lake(r.lake)
    rows = lake.reader().sql("select * from cutouts c join exposures e using (exposure_id)")
    archive = SimArchive.from_config(**{k: v for k, v in SIM.items() if k != "kind"})
    offsets: list[float] = []
    for row in rows.to_pylist():
        assert row["status"] == "ok"
        with fits.open(lake.files.abspath(row["path"])) as hdul:
            header, data = hdul[0].header, hdul[0].data.astype(np.float64)
        x0, y0 = -int(header["LTV1"]), -int(header["LTV2"])
        n = data.shape[0]
        _full_h, full = archive.image(row["exposure_id"])
        np.testing.assert_array_equal(data, full[y0 : y0 + n, x0 : x0 + n])  # exact pixels
        truth = archive.truth(row["exposure_id"]).to_pylist()
        stars = [
            t
            for t in truth
            if t["kind"] == "star" and 0 <= t["x_pix"] - x0 < n and 0 <= t["y_pix"] - y0 < n
        ]
        assert len(stars) > 40
        w = wcsu.celestial_wcs(header)
        px, py = wcsu.sky_to_pixel(w, [t["ra"] for t in stars], [t["dec"] for t in stars])
        tx = np.array([t["x_pix"] for t in stars]) - x0
        ty = np.array([t["y_pix"] for t in stars]) - y0
        assert np.max(np.hypot(px - tx, py - ty)) < 0.05
        # and where the light is: windowed centroids of bright, isolated, unsaturated stars
        fwhm = row["seeing_fwhm_arcsec"] / row["pixscale_arcsec"]
        noise = np.hypot(
            np.sqrt(row["sky_adu"] / row["gain_e_per_adu"]),
            row["rdnoise_e"] / row["gain_e_per_adu"],
        )
        all_xy = np.array([[t["x_pix"], t["y_pix"]] for t in truth])
        sel = [
            i
            for i, t in enumerate(stars)
            if not t["saturated"]
            and t["peak_adu"] > 20 * noise
            and np.sum(np.hypot(*(all_xy - [t["x_pix"], t["y_pix"]]).T) < 4 * fwhm) == 1
            and 8 < px[i] < n - 8
            and 8 < py[i] < n - 8
        ]
        if not sel:
            continue
        img = np.ascontiguousarray(data - row["sky_adu"])
        wx, wy, _flag = sep.winpos(img, px[sel], py[sel], np.full(len(sel), fwhm / 2.3548))
        offsets.extend(np.hypot(wx - px[sel], wy - py[sel]))
    # photon noise and the odd cosmic ray move single centroids by a few hundredths
    assert len(offsets) >= 4
    assert np.median(offsets) < 0.05 and np.max(offsets) < 0.15


def test_demo_pipeline_runs_and_passes_its_diagnostics(cli, tmp_path):
    """pipelines/demo.yaml end to end through the CLI, then `check` and a rerun.

    Smaller images, fewer stars and no asteroids (their ephemerides need the IERS
    table, seconds to parse) keep it quick; the cone centre stays on one field."""
    lake = tmp_path / "demo"
    small = (
        "--set", "archive.naxis1=512", "--set", "archive.naxis2=512",
        "--set", "archive.n_stars=500", "--set", "archive.n_asteroids=0",
    )  # fmt: skip
    r = cli("run", "demo", "--lake", lake, "--workers", "1", *small)
    assert r.exit_code == 0, r.stderr
    r = cli("check", "demo", "--lake", lake)  # diagnostics do not depend on image size
    assert r.exit_code == 0, r.stdout + r.stderr
    r = cli(
        "query",
        "--lake",
        lake,
        "--format",
        "json",
        "select status, count(*) as n from cutouts group by 1 order by 1",
    )
    assert r.exit_code == 0
    counts = {row["status"]: row["n"] for row in json.loads(r.stdout)}
    # the cone centre lies on one of the 2x2 fields: 3 visits x 3 nights on it (at 512 px
    # the 600" square crosses that field's edge); the one neighbour the 0.1 deg cone
    # overlaps is imaged off-chip
    assert counts == {"partial": 9, "off_chip": 9}
    r = cli("run", "demo", "--lake", lake, "--workers", "1", *small)
    assert r.exit_code == 0 and "0 ran" in r.stderr
