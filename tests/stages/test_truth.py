"""The truth stage puts the sim's injected objects in the lake, for the selected
exposures only; truth: the archive's own truth_tables()."""

from __future__ import annotations

import yaml

from lakepipe.archives.sim import SimArchive
from lakepipe.lake import Lake
from lakepipe.runner import run_pipeline

SIM = {
    "kind": "sim",
    "seed": 3,
    "naxis1": 256,
    "naxis2": 256,
    "n_nights": 2,
    "visits_per_night": 1,
    "n_fields": 1,
    "n_asteroids": 0,
}


def test_truth_tables_in_the_lake(tmp_path, cli):
    spec = {
        "name": "truth_test",
        "lake": str(tmp_path / "lake"),
        "archive": SIM,
        "stages": {
            "exposures": {"kind": "exposures", "where": {"filters": ["zr"]}},
            "truth": {"kind": "truth", "inputs": ["exposures"]},
        },
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = run_pipeline(path, workers=1)
    assert r.exit_code == 0, [s.errors for s in r.stages]
    lake = Lake(tmp_path / "lake")
    sql = lake.reader().sql
    exp = sql("select exposure_id, night from exposures order by 1").to_pylist()
    assert exp and all(e for e in exp)
    archive = SimArchive(SimArchive.Params(**{k: v for k, v in SIM.items() if k != "kind"}))
    for e in exp:
        want = archive.truth_tables(e["night"])["truth_objects"]
        want_n = sum(1 for v in want.column("exposure_id").to_pylist() if v == e["exposure_id"])
        got = (
            sql(f"select count(*) as n from truth_objects where exposure_id = {e['exposure_id']}")
            .column("n")[0]
            .as_py()
        )
        assert got == want_n > 0
    # only the selected (zr) exposures have truth rows
    other = (
        sql("select count(*) as n from truth_objects t anti join exposures e using (exposure_id)")
        .column("n")[0]
        .as_py()
    )
    assert other == 0


def test_truth_needs_the_sim_archive(tmp_path, cli):
    (tmp_path / "imgs").mkdir()
    spec = {
        "name": "t",
        "lake": str(tmp_path / "lake"),
        "archive": {"kind": "fits_dir", "path": str(tmp_path / "imgs")},
        "stages": {
            "exposures": {"kind": "exposures"},
            "truth": {"kind": "truth", "inputs": ["exposures"]},
        },
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = cli("run", path, "-j", "1")
    assert r.exit_code == 2 and "the truth stage needs `archive: {kind: sim}`" in r.stderr


SIM_AST = {**SIM, "n_asteroids": 2, "n_vanished": 4, "n_appeared": 3}


def test_truth_sky_and_orbits_are_queryable(tmp_path):
    """truth_sky and truth_orbits land in the lake and answer the questions a user asks.

    Truths checked: every star the sky model flags ``vanished`` is in the reference
    catalog, lies on an exposure, and has no truth_objects row there (it was never
    rendered) while its catalogued neighbours do; ``appeared`` sources are rendered but
    not catalogued; the variables' periods and the transient's t0 and decline index are
    the archive's; and propagating truth_orbits' state (N-body, DE421, light time, I41)
    reproduces truth_asteroids' rendered positions to far below a pixel.
    """
    import numpy as np

    from lakepipe.astro import observe

    spec = {
        "name": "truth_sky_test",
        "lake": str(tmp_path / "lake"),
        "archive": SIM_AST,
        "stages": {
            "exposures": {"kind": "exposures"},
            "truth": {"kind": "truth", "inputs": ["exposures"]},
        },
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = run_pipeline(path, workers=1)
    assert r.exit_code == 0, [s.errors for s in r.stages]
    sql = Lake(tmp_path / "lake").reader().sql
    archive = SimArchive(SimArchive.Params(**{k: v for k, v in SIM_AST.items() if k != "kind"}))
    catalog_ids = set(archive.catalog().column("source_id").to_pylist())

    kinds = {
        r["kind"]: r["n"]
        for r in sql("select kind, count(*) as n from truth_sky group by 1").to_pylist()
    }
    assert kinds["vanished"] == 4 and kinds["appeared"] == 3 and kinds["transient"] == 1

    # vanished: catalogued, inside an exposure's footprint, absent from its truth_objects
    boxes = """
        with box as (
            select exposure_id,
                   least(ra1, ra2, ra3, ra4) as ra0, greatest(ra1, ra2, ra3, ra4) as ra1,
                   least(dec1, dec2, dec3, dec4) as de0, greatest(dec1, dec2, dec3, dec4) as de1
            from exposures)
        select s.source_id, b.exposure_id, count(o.object_id) as rendered_rows
        from truth_sky s
        join box b on s.ra between b.ra0 + {m} and b.ra1 - {m}
                  and s.dec between b.de0 + {m} and b.de1 - {m}
        left join truth_objects o on o.exposure_id = b.exposure_id and o.object_id = s.source_id
        where s.kind = '{kind}'
        group by all
    """
    vanished = sql(boxes.format(kind="vanished", m=0.0)).to_pylist()
    assert vanished, "no vanished star falls on an exposure"
    assert all(v["rendered_rows"] == 0 for v in vanished)
    assert {v["source_id"] for v in vanished} <= catalog_ids
    # ... whereas ordinary catalogued stars well inside the same footprints are rendered
    stars = sql(boxes.format(kind="star", m=0.01)).to_pylist()
    assert len(stars) > 50 and all(v["rendered_rows"] == 1 for v in stars)

    appeared = sql(
        "select source_id, in_catalog, rendered from truth_sky where kind = 'appeared'"
    ).to_pylist()
    assert all(a["rendered"] and not a["in_catalog"] for a in appeared)
    assert not {a["source_id"] for a in appeared} & catalog_ids

    # variables and the transient: the archive's parameters, queryable
    var = sql(
        "select source_id, period_d, amplitude_mag, epoch_mjd from truth_sky "
        "where var_type is not null and var_type <> 'transient' order by 1"
    ).to_pylist()
    want = sorted(archive.variables().to_pylist(), key=lambda v: v["source_id"])
    assert [(v["source_id"], v["period_d"], v["amplitude_mag"]) for v in var] == [
        (w["source_id"], w["period_d"], w["amplitude_mag"]) for w in want
    ]
    tr = sql("select epoch_mjd, decline_index from truth_sky where kind = 'transient'").to_pylist()
    assert tr == [
        {"epoch_mjd": archive.transient()["t0_mjd"], "decline_index": archive.transient()["alpha"]}
    ]

    # asteroids: propagate the true state, compare with the rendered positions
    orbits = sql("select * from truth_orbits order by number").to_pylist()
    assert [o["designation"] for o in orbits] == ["SIM0001", "SIM0002"]
    for o in orbits:
        assert 2.0 < o["a_au"] < 3.6 and 0 <= o["e"] < 0.3 and o["q_au"] <= o["a_au"]
        pos = sql(
            f"select mjd, ra, dec from truth_asteroids where number = {o['number']} order by mjd"
        ).to_pylist()
        assert len(pos) == 2  # every exposure: 2 nights x 1 visit x 1 field
        state = np.array(
            [[o[c] for c in ("x_au", "y_au", "z_au", "vx_au_d", "vy_au_d", "vz_au_d")]]
        )
        eph = observe.ephemeris(
            state, o["epoch_mjd_tdb"] + 2400000.5, np.array([p["mjd"] for p in pos])
        )
        dra = (eph["ra_deg"][0] - np.array([p["ra"] for p in pos])) * np.cos(
            np.radians([p["dec"] for p in pos])
        )
        ddec = eph["dec_deg"][0] - np.array([p["dec"] for p in pos])
        sep_mas = np.hypot(dra, ddec) * 3.6e6
        assert sep_mas.max() < 1.0, sep_mas
