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
