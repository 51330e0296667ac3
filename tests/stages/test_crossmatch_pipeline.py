"""sources → crossmatch → calibrate through the runner on the virtual survey.

Truth: the survey's per-exposure zeropoint (MAGZP, the exposures table), its catalogue
(every detected catalogue star matches its own entry) and its sky model (six catalogue
stars never rendered, "vanished"; six rendered stars missing from the catalogue,
"appeared"; all inside the one field). Small config: one 1024² field, one
night, three exposures (zg, zr, zi).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from lakepipe.archives.sim import SimArchive
from lakepipe.lake import Lake
from lakepipe.runner import run_pipeline
from lakepipe.sim.catalog import COLOUR_TERMS

SIM = {"kind": "sim", "seed": 5, "n_fields": 1, "n_nights": 1, "visits_per_night": 3,
       "filters": ["zr"], "naxis1": 1024, "naxis2": 1024, "n_asteroids": 0}  # fmt: skip


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Lake:
    root = tmp_path_factory.mktemp("xmatch_pipeline")
    knobs = {k: v for k, v in SIM.items() if k != "kind"}
    archive = SimArchive.from_config(**knobs)
    archive.write_catalog(root / "refcat" / "catalog.parquet")
    sn = archive.transient()
    target = {"id": "sn", "ra": sn["ra"], "dec": sn["dec"]}
    sky = archive.sky_truth()
    gone = next(o for o in sky.to_pylist() if o["kind"] == "vanished")
    # a target on a vanished star: nothing is measured there (no forced photometry)
    gone_target = {"id": "gone", "ra": gone["ra"], "dec": gone["dec"]}
    bands = {
        f: {"band": "G", "colour": "bp_rp", "colour_term": b, "colour_pivot": 0.82,
            "offset_mag": a}
        for f, (a, b) in COLOUR_TERMS.items()
    }  # fmt: skip
    catalog = {
        "path": "refcat/catalog.parquet",
        "columns": {"id": "source_id", "mags": {"G": "phot_g_mean_mag", "bp_rp": "bp_rp"},
                    "pmra": "pmra", "pmdec": "pmdec", "epoch": "ref_epoch"},
    }  # fmt: skip
    spec = {
        "name": "xmatch",
        "lake": str(root / "lake"),
        "archive": SIM,
        "stages": {
            "exposures": {"kind": "exposures"},
            "sources": {"kind": "sources", "inputs": ["exposures"], "image": "exposure",
                        "forced": {"positions": [target]}},
            "crossmatches": {
                "kind": "crossmatch",
                "inputs": ["sources"],
                "catalog": catalog,
                "radius_arcsec": 1.5,
                "bands": bands,
            },
            "calibrations": {
                "kind": "calibrate",
                "inputs": ["sources", "crossmatches"],
                "ref_mag_range": [13.0, 20.0],
            },
            "changes": {
                "kind": "changes",
                "inputs": ["exposures", "sources", "crossmatches", "calibrations"],
                "catalog": catalog,
                "bands": bands,
            },
            "lightcurves": {
                "kind": "lightcurves",
                "inputs": ["calibrations", "crossmatches"],
                "targets": [target, gone_target],
                "catalog_min_detections": 3,
            },
        },
    }  # fmt: skip
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    report = run_pipeline(path, workers=1)
    assert report.failed == 0
    lake = Lake(root / "lake")
    lake.spec_path = path  # type: ignore[attr-defined]
    lake.truth = archive  # type: ignore[attr-defined]
    return lake


def test_calibrated_zeropoints_match_truth(lake: Lake) -> None:
    """Issue 5: |ΔZP| <= 0.02 mag for exposures with >= 20 matched stars."""
    r = lake.reader()
    rows = r.sql(
        "select c.exposure_id, c.zeropoint_mag, c.zeropoint_err_mag, c.n_used, c.status, "
        "e.zeropoint_mag as truth from calibrations c join exposures e using (exposure_id)"
    ).to_pylist()
    assert len(rows) == 3
    for row in rows:
        assert row["status"] == "ok" and row["n_used"] >= 20
        assert row["zeropoint_mag"] == pytest.approx(row["truth"], abs=0.02)
        assert row["zeropoint_err_mag"] < 0.02


def test_crossmatches_and_calibrated_sources_are_queryable(lake: Lake) -> None:
    """Every crossmatch row is a detection; separations are small; mags are calibrated."""
    r = lake.reader()
    n_match, med_sep = (
        r.sql("select count(*), median(sep_arcsec) from crossmatches").to_pylist()[0].values()
    )
    assert n_match > 300
    assert med_sep < 0.5
    orphans = r.sql(
        "select count(*) as n from crossmatches anti join sources using (source_id)"
    ).to_pylist()[0]["n"]
    assert orphans == 0
    # bright matched stars: calibrated mag agrees with the reference magnitude
    diff = (
        r.sql(
            "select p.mag - x.ref_mag as d from calibrated_sources p join crossmatches x "
            "using (source_id) where p.snr > 50 and x.ref_neighbours = 0 and p.flags = 0"
        )
        .column("d")
        .to_numpy()
    )
    assert diff.size > 50
    assert abs(np.median(diff)) < 0.02
    assert np.percentile(np.abs(diff), 68) < 0.05


def test_rerun_is_a_no_op(lake: Lake) -> None:
    """Unchanged spec: nothing re-executes (fingerprints of the new stages are stable)."""
    report = run_pipeline(Path(lake.spec_path), workers=1)  # type: ignore[attr-defined]
    assert report.executed == 0


def test_lightcurves_of_target_and_catalogue_stars(lake: Lake) -> None:
    """The transient target has one row per exposure (an upper limit before its t0);
    constant catalogue stars have chi2/dof near 1 in lightcurve_stats."""
    r = lake.reader()
    sn = r.sql("select * from lightcurves where object_id = 'sn' order by mjd").to_pylist()
    assert len(sn) == 3
    t0 = lake.truth.transient()["t0_mjd"]  # type: ignore[attr-defined]
    for row in sn:
        if row["mjd"] < t0:
            assert row["upper_limit"] and row["forced"] and row["limit_mag"] > 19.0
    stats = (
        r.sql("select chi2_dof from lightcurve_stats where object_id <> 'sn' and n_det = 3")
        .column("chi2_dof")
        .to_numpy()
    )
    assert stats.size > 100
    assert 0.3 < np.median(stats) < 3.0


def _truth_kind(lake: Lake, kinds: list[str]) -> list[dict]:
    sky = lake.truth.sky_truth().to_pylist()  # type: ignore[attr-defined]
    return [o for o in sky if o["kind"] in kinds]


def test_vanished_recovers_the_stars_missing_from_the_images(lake: Lake) -> None:
    """Acceptance 3: every injected vanished star is listed in every exposure (3), and at
    most 2 other catalogue stars are listed at all (measured: 1, on the dead column)."""
    truth = {o["source_id"] for o in _truth_kind(lake, ["vanished"])}
    assert len(truth) == 6
    rows = (
        lake.reader()
        .sql(
            "select ref_id, count(*) as n, min(depth_margin_mag) as margin from vanished group by 1"
        )
        .to_pylist()
    )
    found = {r["ref_id"]: r for r in rows}
    assert truth <= set(found)
    assert all(found[t]["n"] == 3 and found[t]["margin"] >= 1.0 for t in truth)
    false = set(found) - truth
    assert len(false) <= 2


def test_appeared_recovers_the_uncatalogued_stars(lake: Lake) -> None:
    """Acceptance 3: every injected "appeared" star is listed in all 3 exposures (PSF-like,
    repeated); hot pixels (which repeat too) and cosmic rays are not; at most 2 false
    positions (measured: 0)."""
    truth = _truth_kind(lake, ["appeared"])
    assert len(truth) == 6
    rows = lake.reader().sql("select ra, dec, n_repeats, size_ratio from appeared").to_pylist()
    ra = np.array([r["ra"] for r in rows])
    dec = np.array([r["dec"] for r in rows])
    hit = np.zeros(len(rows), dtype=bool)
    for t in truth:
        sep = np.hypot((ra - t["ra"]) * np.cos(np.radians(t["dec"])), dec - t["dec"]) * 3600
        near = sep < 1.0
        assert near.sum() == 3, t
        hit |= near
    # false entries: distinct positions (a source repeats in up to 3 exposures)
    assert (~hit).sum() <= 2 * 3
    assert all(r["n_repeats"] >= 2 and 0.8 <= r["size_ratio"] <= 1.5 for r in rows)


def test_target_on_a_vanished_star_gets_upper_limits(lake: Lake) -> None:
    """Issue 5 item 5: an exposure covering a target where nothing was measured (no
    detection, no forced photometry: the star vanished) gives an upper limit at the
    exposure's calibrated limiting magnitude, one per exposure (3)."""
    rows = (
        lake.reader()
        .sql(
            "select l.upper_limit, l.limit_mag, l.source_id, l.forced, c.mag_lim "
            "from lightcurves l join calibrations c using (exposure_id) where object_id = 'gone'"
        )
        .to_pylist()
    )
    assert len(rows) == 3
    for row in rows:
        assert row["upper_limit"] and row["source_id"] is None and row["forced"] is None
        assert row["limit_mag"] == pytest.approx(row["mag_lim"]) and row["limit_mag"] > 20.0
    stats = (
        lake.reader()
        .sql("select n_obs, n_det, n_upper_limits from lightcurve_stats where object_id = 'gone'")
        .to_pylist()
    )
    assert stats == [{"n_obs": 3, "n_det": 0, "n_upper_limits": 3}]
