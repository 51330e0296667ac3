"""The runner: incremental reruns by fingerprint, failures, --only/--force/--dry-run,
process-pool determinism. Truth: the toy stages' rows are a pure function of params."""

from __future__ import annotations

from pathlib import Path

import pytest

from lakepipe.lake import Lake
from lakepipe.runner import run_pipeline
from lakepipe.spec import load_spec
from tests.conftest import tree_digest


def runs_of(lake: Lake, run_id: str) -> dict[tuple[str, str], str]:
    t = lake.reader().sql(
        f"select stage, status, count(*) as n from _runs where run_id = '{run_id}' group by 1, 2"
    )
    return {(r["stage"], r["status"]): r["n"] for r in t.to_pylist()}


def test_second_run_executes_nothing(toy_spec):
    spec = toy_spec()
    first = run_pipeline(spec, workers=1)
    lake = Lake(first.lake)
    assert runs_of(lake, first.run_id) == {("numbers", "ok"): 4, ("sums", "ok"): 4}
    second = run_pipeline(spec, workers=1)
    assert second.executed == 0
    assert runs_of(lake, second.run_id) == {("numbers", "skipped"): 4, ("sums", "skipped"): 4}
    total = lake.reader().sql("select sum(n) as n from toy_sums").column("n")[0].as_py()
    assert total == 4 * 50


def test_param_change_reruns_that_stage_and_downstream_only(toy_spec):
    spec = toy_spec()
    run_pipeline(spec, workers=1)
    # downstream-only change: numbers untouched
    r = run_pipeline(spec, workers=1, overrides=["stages.sums.offset=1.5"])
    by = {s.name: s for s in r.stages}
    assert (by["numbers"].ok, by["numbers"].skipped) == (0, 4)
    assert (by["sums"].ok, by["sums"].skipped) == (4, 0)
    assert {p.reason for p in by["sums"].plans} == {"params changed"}
    # upstream change: both rerun, sums because its input changed
    r = run_pipeline(
        spec, workers=1, overrides=["stages.sums.offset=1.5", "stages.numbers.scale=2"]
    )
    by = {s.name: s for s in r.stages}
    assert by["numbers"].ok == 4 and by["sums"].ok == 4
    assert {p.reason for p in by["sums"].plans} == {"input changed"}


def test_narrow_reads_rerun_only_affected_partitions(toy_spec, tmp_path):
    spec = toy_spec()
    run_pipeline(spec, workers=1)
    # numbers reruns every bucket (its params changed), but the new rows of buckets 0-3
    # are identical, so toy_sums — which reads one bucket each — reruns only the new one.
    r = run_pipeline(spec, workers=1, overrides=["stages.numbers.buckets=5"])
    by = {s.name: s for s in r.stages}
    assert by["numbers"].ok == 5
    assert by["sums"].ok == 5  # fingerprints of its inputs changed (params are part of them)
    r = run_pipeline(spec, workers=1, overrides=["stages.numbers.buckets=5"])
    assert r.executed == 0


def test_failing_partition_is_logged_others_commit_and_retry_only_failed(toy_spec, tmp_path):
    flag = tmp_path / "archive_down"  # a transient cause, like an archive outage
    flag.write_text("down")
    spec = toy_spec(numbers={"fail_buckets": [2], "fail_while": str(flag)})
    r = run_pipeline(spec, workers=1)
    by = {s.name: s for s in r.stages}
    assert r.exit_code == 1
    assert (by["numbers"].ok, by["numbers"].failed) == (3, 1)
    assert "toy failure in bucket 2" in by["numbers"].errors["bucket=02"]
    lake = Lake(r.lake)
    err = (
        lake.reader()
        .sql(f"select error from _runs where run_id = '{r.run_id}' and status = 'failed'")
        .column("error")[0]
        .as_py()
    )
    assert "RuntimeError: toy failure in bucket 2" in err
    assert lake.reader().partitions("toy_numbers") == ["bucket=00", "bucket=01", "bucket=03"]
    # the cause goes away: only the failed partition runs, with the reason given
    flag.unlink()
    r2 = run_pipeline(spec, workers=1)
    by2 = {s.name: s for s in r2.stages}
    assert by2["numbers"].ok == 1 and by2["numbers"].skipped == 3
    [plan] = [p for p in by2["numbers"].plans if p.action == "run"]
    assert plan.key == "bucket=02" and plan.reason.startswith("retry after failure")
    assert r2.exit_code == 0


def test_only_force_and_dry_run(toy_spec):
    spec = toy_spec()
    dry = run_pipeline(spec, workers=1, dry_run=True)
    assert {p.reason for s in dry.stages for p in s.plans} == {"new"}
    assert not Lake(dry.lake).exists()  # a dry run writes nothing
    run_pipeline(spec, workers=1)
    only = run_pipeline(spec, workers=1, only=["sums"], force=["sums"])
    assert [s.name for s in only.stages] == ["sums"]
    assert only.stages[0].ok == 4 and {p.reason for p in only.stages[0].plans} == {"forced"}
    allf = run_pipeline(spec, workers=1, force=True)
    assert allf.executed == 8


def test_pool_and_serial_write_identical_lakes(toy_spec, tmp_path):
    spec = toy_spec()
    a = run_pipeline(spec, workers=1, lake=tmp_path / "a")
    b = run_pipeline(spec, workers=2, lake=tmp_path / "b")
    da = {k: v for k, v in tree_digest(a.lake).items() if not k.startswith("_lake")}
    db = {k: v for k, v in tree_digest(b.lake).items() if not k.startswith("_lake")}
    assert da and da == db  # same spec → byte-identical table files


def test_stale_partitions_are_removed(toy_spec):
    spec = toy_spec()
    run_pipeline(spec, workers=1)
    r = run_pipeline(spec, workers=1, overrides=["stages.numbers.buckets=2"])
    by = {s.name: s for s in r.stages}
    assert by["numbers"].removed == 2 and by["sums"].removed == 2
    lake = Lake(r.lake)
    assert lake.reader().partitions("toy_numbers") == ["bucket=00", "bucket=01"]
    n = lake.reader().sql("select count(*) as n from toy_numbers").column("n")[0].as_py()
    assert n == 100


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        ("missing_column", "stage 'numbers', table 'toy_numbers'.*missing column.*value"),
        ("wrong_type", "column 'value' has type string, contract says double"),
        ("null_key", "key column 'id' has 50 null"),
    ],
)
def test_contract_violations_fail_the_partition(toy_spec, bad, pattern):
    import re

    r = run_pipeline(toy_spec(numbers={"bad": bad}), workers=1)
    numbers = r.stages[0]
    assert numbers.failed == 4 and numbers.ok == 0
    assert all(re.search(pattern, e) for e in numbers.errors.values()), numbers.errors


def test_resolved_spec_recorded_with_run(toy_spec):
    r = run_pipeline(toy_spec(), workers=1, overrides=["stages.sums.offset=3"])
    text = (Path(r.lake) / "_lake" / "runs" / f"{r.run_id}.spec.yaml").read_text()
    assert "offset: 3.0" in text


def test_load_spec_orders_stages(toy_spec):
    assert load_spec(toy_spec()).stage_order() == ["numbers", "sums"]


def test_damaged_output_is_redone_even_when_unchanged(toy_spec, tmp_path):
    spec = toy_spec()
    run_pipeline(spec, workers=1)
    (tmp_path / "damaged-02").write_text("")  # the toy stage's verify_partition sees this
    r = run_pipeline(spec, workers=1)
    numbers = r.stages[0]
    assert numbers.ok == 1 and numbers.skipped == 3
    [plan] = [p for p in numbers.plans if p.action == "run"]
    assert plan.key == "bucket=02" and plan.reason == "output damaged: flag file says so"


def test_editing_an_external_input_file_reruns_the_stage(toy_spec, tmp_path):
    data = tmp_path / "astrometry.psv"
    data.write_text("version 1\n")
    spec = toy_spec(numbers={"data_file": str(data)})
    run_pipeline(spec, workers=1)
    assert run_pipeline(spec, workers=1).executed == 0
    data.write_text("version 2\n")  # same path, new contents
    r = run_pipeline(spec, workers=1)
    numbers = r.stages[0]
    assert numbers.ok == 4 and {p.reason for p in numbers.plans} == {"input changed"}
