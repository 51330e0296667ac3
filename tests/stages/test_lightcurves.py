"""lightcurves stage core: target and catalogue lightcurves, upper limits, statistics.

Simulated truth: a constant star (15.0 mag), a sinusoidal variable (16.0 ± 0.5 mag,
P = 3 d) and a transient fading from 17 mag at 0.5 mag/day, observed in 20 zr exposures
over 10 days with S/N = 5 at the 20.5 mag limit; the transient also has a
forced-photometry row in every exposure, and is not detected after day 7 (fainter than
the limit), where only its forced rows (S/N < 5) remain.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from lakepipe.stages.lightcurves import (
    bucket_of,
    catalog_lightcurves,
    summarise,
    target_lightcurves,
)
from lakepipe.tables import get_contract

N_EXP = 20
LIMIT = 20.5
OBJECTS = {"star": (150.0, 2.0), "var": (150.01, 2.0), "sn": (150.02, 2.0)}


def truth_mag(name: str, t: np.ndarray) -> np.ndarray:
    if name == "star":
        return np.full_like(t, 15.0)
    if name == "var":
        return 16.0 + 0.5 * np.sin(2 * np.pi * t / 3.0)
    return 17.0 + 0.5 * t


@pytest.fixture(scope="module")
def sources() -> pa.Table:
    """calibrated_sources rows: detections (S/N >= 5) plus the transient's forced rows."""
    rng = np.random.default_rng(8)
    t = np.sort(rng.uniform(0.0, 10.0, N_EXP))
    rows: dict[str, list] = {k: [] for k in (
        "source_id", "exposure_id", "filter", "mjd", "ra", "dec", "forced", "snr", "mag",
        "mag_err", "mag_upper_limit", "mag_system", "flags")}  # fmt: skip
    sid = 0
    for i, ti in enumerate(t):
        for name, (ra, dec) in OBJECTS.items():
            m = float(truth_mag(name, np.array([ti]))[0])
            snr = 5.0 * 10 ** (-0.4 * (m - LIMIT))
            err = 1.0857 / snr
            obs = m + rng.normal(0.0, err)
            for forced in [False, True] if name == "sn" else [False]:
                if not forced and snr < 5.0:
                    continue  # not detected
                sid += 1
                rows["source_id"].append(sid)
                rows["exposure_id"].append(1000 + i)
                rows["filter"].append("zr")
                rows["mjd"].append(60000.0 + ti)
                rows["ra"].append(ra + (0.0 if forced else rng.normal(0, 0.1 / 3600)))
                rows["dec"].append(dec + (0.0 if forced else rng.normal(0, 0.1 / 3600)))
                rows["forced"].append(forced)
                rows["snr"].append(snr)
                rows["mag"].append(obs)
                rows["mag_err"].append(err)
                rows["mag_upper_limit"].append(LIMIT)
                rows["mag_system"].append("AB")
                rows["flags"].append(0)
    return pa.table({**rows, "flags": pa.array(rows["flags"], pa.int32())})


def test_target_lightcurves_detections_and_upper_limits(sources: pa.Table) -> None:
    """One row per object per exposure; detections preferred to forced rows; the
    transient's rows after day 7 are upper limits at the 20.5 mag limit."""
    targets = [(name, ra, dec) for name, (ra, dec) in OBJECTS.items()]
    lc = target_lightcurves(sources, targets, 1.0, 5.0)
    assert set(lc.column("object_id").to_pylist()) == set(OBJECTS)
    per = {o: lc.filter(pc.equal(lc.column("object_id"), o)) for o in OBJECTS}
    for t in per.values():
        assert t.num_rows == N_EXP
        assert len(set(t.column("exposure_id").to_pylist())) == N_EXP
    assert np.all(np.abs(per["star"].column("mag").to_numpy() - 15.0) < 0.1)
    sn = per["sn"]
    up = sn.column("upper_limit").to_numpy(zero_copy_only=False)
    days = sn.column("mjd").to_numpy() - 60000.0
    np.testing.assert_array_equal(up, 17.0 + 0.5 * days > LIMIT)  # truth: fainter than limit
    assert up.sum() >= 3 and (~up).sum() >= 3
    assert all(sn.filter(pa.array(up)).column("forced").to_pylist())
    assert not any(sn.filter(pa.array(~up)).column("forced").to_pylist())
    assert sn.filter(pa.array(up)).column("mag").null_count == up.sum()
    np.testing.assert_array_equal(sn.filter(pa.array(up)).column("limit_mag").to_numpy(), LIMIT)
    stats = summarise(sn).to_pylist()[0]
    assert stats["n_upper_limits"] == up.sum()
    assert stats["n_limits_violated"] == up.sum()  # limits deeper than its mean: it faded
    assert stats["amplitude_mag"] > 2.5


def test_statistics_separate_constant_and_variable(sources: pa.Table) -> None:
    """Truth: star constant (χ²/dof ≈ 1), var sinusoidal (χ²/dof ≫ 1, amplitude ≈ 1 mag)."""
    targets = [(name, ra, dec) for name, (ra, dec) in OBJECTS.items()]
    stats = {r["object_id"]: r for r in summarise(target_lightcurves(sources, targets, 1.0,
                                                                     5.0)).to_pylist()}  # fmt: skip
    assert stats["star"]["chi2_dof"] < 3.0
    assert stats["star"]["mean_mag"] == pytest.approx(15.0, abs=0.02)
    assert stats["var"]["chi2_dof"] > 100
    assert stats["var"]["amplitude_mag"] == pytest.approx(1.0, abs=0.2)
    assert stats["var"]["stetson_j"] > 1.0
    assert stats["sn"]["chi2_dof"] > 100
    s = summarise(target_lightcurves(sources, targets, 1.0, 5.0))
    get_contract("lightcurve_stats").conform(
        s.append_column("_healpix_29", pa.array(np.zeros(s.num_rows, np.int64)))
    )


def test_catalog_lightcurves_need_min_detections(sources: pa.Table) -> None:
    """Catalogue stars with >= N rank-1 matches get lightcurves of their detections."""
    det = sources.filter(pc.invert(sources.column("forced")))
    is_star = np.abs(det.column("ra").to_numpy() - 150.0) < 1e-3
    xm = pa.table({
        "source_id": det.column("source_id").filter(pa.array(is_star)),
        "ref_id": pa.array(np.full(int(is_star.sum()), 42), pa.int64()),
        "ref_ra": pa.array(np.full(int(is_star.sum()), 150.0)),
        "ref_dec": pa.array(np.full(int(is_star.sum()), 2.0)),
        "match_rank": pa.array(np.ones(int(is_star.sum()), np.int32)),
    })  # fmt: skip
    lc = catalog_lightcurves(sources, xm, 5, 5.0)
    assert set(lc.column("object_id").to_pylist()) == {"42"}
    assert lc.num_rows == N_EXP
    assert np.max(lc.column("sep_arcsec").to_numpy()) < 1.0
    assert catalog_lightcurves(sources, xm, N_EXP + 1, 5.0).num_rows == 0


def test_catalog_lightcurves_are_bit_identical_run_to_run(sources: pa.Table) -> None:
    """The same inputs give the same table, to the last bit: the catalogue position of
    an object is the mean of its per-epoch positions, which a threaded aggregation used
    to sum in whatever order rows reached its threads."""
    det = sources.filter(pc.invert(sources.column("forced")))
    copies = 300
    src = pa.concat_tables(
        det.set_column(
            det.schema.get_field_index("source_id"),
            "source_id",
            pc.add(det.column("source_id"), pa.scalar(i * 10**9, pa.int64())),
        )
        for i in range(copies)
    )
    n = src.num_rows
    rng = np.random.default_rng(5)
    ref = rng.integers(0, 400, n)
    xm = pa.table({
        "source_id": src.column("source_id"),
        "ref_id": pa.array(ref, pa.int64()),
        "ref_ra": pa.array(150.0 + ref * 1e-3 + rng.normal(0, 1e-5, n)),
        "ref_dec": pa.array(2.0 + rng.normal(0, 1e-5, n)),
        "match_rank": pa.array(np.ones(n, np.int32)),
    })  # fmt: skip
    xm = pa.concat_tables(xm.slice(i, 500) for i in range(0, n, 500))  # many chunks
    runs = [catalog_lightcurves(src, xm, 1, 5.0) for _ in range(4)]
    exp = src.column("exposure_id").to_pylist()
    assert runs[0].num_rows == len(set(zip(ref.tolist(), exp, strict=True)))  # one per epoch
    assert all(runs[0].equals(r) for r in runs[1:])


def test_buckets_are_stable() -> None:
    """sha256-based: the same id always lands in the same bucket, spread over all."""
    assert bucket_of("sn2025abc", 8) == bucket_of("sn2025abc", 8)
    assert {bucket_of(str(i), 4) for i in range(100)} == {0, 1, 2, 3}


def test_forced_row_preferred_to_a_faint_detection(sources: pa.Table) -> None:
    """A noise detection (S/N 4) 0.7" from the transient after it faded: the forced row
    at the position is used instead, so the upper limit is the forced measurement."""
    late = sources.filter(pc.field("forced")).sort_by([("mjd", "descending")]).slice(0, 1)
    faint = late.to_pydict()
    faint["source_id"] = [10**6]
    faint["forced"] = [False]
    faint["snr"] = [4.0]
    faint["dec"] = [faint["dec"][0] + 0.7 / 3600]
    both = pa.concat_tables([sources, pa.table(faint, schema=sources.schema)])
    lc = target_lightcurves(both, [("sn", *OBJECTS["sn"])], 1.0, 5.0)
    row = lc.filter(pc.equal(lc.column("exposure_id"), late.column("exposure_id")[0]))
    assert row.num_rows == 1
    assert row.column("forced")[0].as_py() and row.column("upper_limit")[0].as_py()
    assert row.column("source_id")[0].as_py() == late.column("source_id")[0].as_py()


def test_flagged_detections_stay_in_lightcurves_but_not_in_statistics(sources: pa.Table) -> None:
    """A blended (flag 1) detection 2 mag too bright: listed, but the constant star's
    statistics are computed without it (and with it when the mask is 0)."""
    t = sources.to_pydict()
    k = next(i for i, (ra, f) in enumerate(zip(t["ra"], t["forced"], strict=True))
             if abs(ra - 150.0) < 1e-3 and not f)  # fmt: skip
    t["mag"][k] -= 2.0
    t["flags"][k] = 1
    bad = pa.table(t, schema=sources.schema)
    lc = target_lightcurves(bad, [("star", *OBJECTS["star"])], 1.0, 5.0)
    assert lc.num_rows == N_EXP and 1 in lc.column("flags").to_pylist()
    clean = summarise(lc).to_pylist()[0]
    dirty = summarise(lc, flags_mask=0).to_pylist()[0]
    assert clean["n_det"] == N_EXP - 1 and clean["chi2_dof"] < 3.0
    assert dirty["n_det"] == N_EXP and dirty["chi2_dof"] > 100


# -- end to end on the virtual survey ---------------------------------------------------------

SURVEY = {"kind": "sim", "seed": 5, "n_fields": 1, "n_nights": 3, "visits_per_night": 3,
          "filters": ["zr"], "naxis1": 1024, "naxis2": 1024, "n_asteroids": 0}  # fmt: skip


@pytest.fixture(scope="module")
def survey_lake(tmp_path_factory: pytest.TempPathFactory):
    """One 1024² field, 3 nights x 3 visits in zr (9 exposures), its 12 injected variables
    and the transient (t0 during night 2: 6 exposures before, 3 after), run from sources to
    lightcurves of every catalogue star detected 3+ times and of a target on the transient."""
    import yaml

    from lakepipe.archives.sim import SimArchive
    from lakepipe.lake import Lake
    from lakepipe.runner import run_pipeline
    from lakepipe.sim.catalog import COLOUR_TERMS

    root = tmp_path_factory.mktemp("lc_survey")
    archive = SimArchive.from_config(**{k: v for k, v in SURVEY.items() if k != "kind"})
    archive.write_catalog(root / "catalog.parquet")
    sn = archive.transient()
    target = {"id": "sn", "ra": sn["ra"], "dec": sn["dec"]}
    a, b = COLOUR_TERMS["zr"]
    spec = {
        "name": "lc_survey",
        "lake": str(root / "lake"),
        "archive": SURVEY,
        "stages": {
            "exposures": {"kind": "exposures"},
            "sources": {"kind": "sources", "inputs": ["exposures"], "image": "exposure",
                        "forced": {"positions": [target]}},
            "crossmatches": {
                "kind": "crossmatch", "inputs": ["sources"], "radius_arcsec": 1.5,
                "catalog": {"path": "catalog.parquet",
                            "columns": {"id": "source_id",
                                        "mags": {"G": "phot_g_mean_mag", "bp_rp": "bp_rp"},
                                        "pmra": "pmra", "pmdec": "pmdec",
                                        "epoch": "ref_epoch"}},
                "bands": {"zr": {"band": "G", "colour": "bp_rp", "colour_term": b,
                                 "colour_pivot": 0.82, "offset_mag": a}},
            },
            "calibrations": {"kind": "calibrate", "inputs": ["sources", "crossmatches"],
                             "ref_mag_range": [13.0, 20.0]},
            "lightcurves": {"kind": "lightcurves", "inputs": ["calibrations", "crossmatches"],
                            "targets": [target], "catalog_min_detections": 3},
            "truth": {"kind": "truth", "inputs": ["exposures"]},
        },
    }  # fmt: skip
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert run_pipeline(path, workers=1).failed == 0
    return Lake(root / "lake").reader(), archive


def test_injected_variables_top_the_chi2_ranking(survey_lake) -> None:
    """Issue 5 item 5: the injected variables (truth_sky kind 'variable', 0.15-1 mag
    amplitudes) with 5+ unflagged detections fill the top of a chi2/dof ranking: at least
    70 % of them in the top 12 of ~1700 stars. Stars on the survey's dead column would
    outrank them unless the sources stage masks it (bad_column_sigma) and flags them."""
    reader, archive = survey_lake
    variables = {
        str(o["source_id"]) for o in archive.sky_truth().to_pylist() if o["kind"] == "variable"
    }
    assert len(variables) == 12
    ranked = (
        reader.sql(
            "select object_id from lightcurve_stats where n_det >= 5 and object_id <> 'sn' "
            "order by chi2_dof desc"
        )
        .column("object_id")
        .to_pylist()
    )
    assert len(ranked) > 1000
    seen = variables & set(ranked)
    assert len(seen) >= 9
    top = set(ranked[:12])
    assert len(top & seen) >= 0.7 * len(seen)


def test_transient_stands_out_by_violated_limits(survey_lake) -> None:
    """Issue 5 item 5: the transient (detected at ~17.8 mag only after its t0, with 6
    earlier limits at ~20.5 mag) is among the few objects detected 3+ times with 5+
    limits deeper than its mean (measured: 6 objects), both as the named target and as
    the catalogue star it sits on."""
    reader, archive = survey_lake
    sn = archive.transient()
    rows = reader.sql(
        "select object_id, ra, dec, n_det, n_limits_violated from lightcurve_stats "
        "where n_det >= 3 and n_limits_violated >= 5 order by n_limits_violated desc"
    ).to_pylist()
    assert len(rows) <= 8
    ids = {r["object_id"] for r in rows}
    assert "sn" in ids
    near = [
        r for r in rows
        if np.hypot((r["ra"] - sn["ra"]) * np.cos(np.radians(sn["dec"])), r["dec"] - sn["dec"])
        * 3600 < 1.5 and r["object_id"] != "sn"
    ]  # fmt: skip
    assert len(near) == 1


def test_stats_account_for_every_lightcurve_row(survey_lake) -> None:
    """n_obs + n_flagged is each (object, filter)'s lightcurve row count: the rows the
    statistics leave out for their flags are counted, not silently lost (the survey's
    blends and dead-column stars give some)."""
    reader, _archive = survey_lake
    rows = reader.sql(
        "select s.object_id, s.filter, s.n_obs, s.n_flagged, count(*) as n_rows "
        "from lightcurve_stats s join lightcurves l using (object_id, filter) "
        "group by all"
    ).to_pylist()
    assert len(rows) > 1000
    assert all(r["n_obs"] + r["n_flagged"] == r["n_rows"] for r in rows)
    assert sum(r["n_flagged"] for r in rows) > 0
