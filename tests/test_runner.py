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


def _chain(toy_spec, **stage_params: dict) -> Path:
    """numbers -> sums -> total: a three-stage chain (narrow reads, then reads-all)."""
    import yaml

    spec = toy_spec(**stage_params)
    raw = yaml.safe_load(spec.read_text())
    raw["stages"]["total"] = {"kind": "toy_total", "inputs": ["sums"]}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    return spec


def _plans(report) -> dict[tuple[str, str], tuple[str, str]]:
    return {(p.stage, p.key): (p.action, p.reason) for s in report.stages for p in s.plans}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # upstream param: every downstream partition reruns because its input changed
        (
            ["stages.numbers.scale=2"],
            {("numbers", "bucket=00"): ("run", "params changed")}
            | {("sums", f"bucket=0{b}"): ("run", "input changed") for b in range(4)}
            | {("total", ""): ("run", "input changed")},
        ),
        # a new upstream partition is listed downstream as new, before it exists
        (
            ["stages.numbers.buckets=5"],
            {("numbers", "bucket=04"): ("run", "new"), ("sums", "bucket=04"): ("run", "new")}
            | {("sums", "bucket=01"): ("run", "input changed")}
            | {("total", ""): ("run", "input changed")},
        ),
        # middle stage only: upstream skips, downstream of it reruns
        (
            ["stages.sums.offset=1"],
            {("numbers", "bucket=02"): ("skip", "unchanged")}
            | {("sums", "bucket=02"): ("run", "params changed")}
            | {("total", ""): ("run", "input changed")},
        ),
        # dropping partitions: the removal changes what total reads
        (
            ["stages.numbers.buckets=3"],
            {
                ("sums", "bucket=02"): ("run", "input changed"),
                ("total", ""): ("run", "input changed"),
            },
        ),
    ],
    ids=["upstream-param", "new-partition", "middle-param", "removed-partition"],
)
def test_dry_run_predicts_the_real_run_down_the_chain(toy_spec, overrides, expected):
    # Truth: the real run's own plan (reasons per partition), made right after the dry run.
    spec = _chain(toy_spec)
    run_pipeline(spec, workers=1)
    dry = run_pipeline(spec, workers=1, overrides=overrides, dry_run=True)
    predicted = _plans(dry)
    for key, value in expected.items():
        assert predicted[key] == value, key
    assert not any(s.note for s in dry.stages)  # every list was known from partition keys
    real = run_pipeline(spec, workers=1, overrides=overrides)
    assert _plans(real) == predicted
    assert run_pipeline(spec, workers=1, overrides=overrides).executed == 0


def test_dry_run_says_when_a_partition_list_depends_on_upstream_rows(toy_spec):
    spec = _chain(toy_spec, sums={"list_from_rows": True})
    run_pipeline(spec, workers=1)
    dry = run_pipeline(spec, workers=1, overrides=["stages.numbers.buckets=5"], dry_run=True)
    by = {s.name: s for s in dry.stages}
    assert by["numbers"].note == "" and by["total"].note == ""
    assert by["sums"].note.startswith("partition list not known until numbers run(s)")
    assert "rows of toy_numbers" in by["sums"].note
    # listed from committed rows: 4 buckets, all with changed inputs; the real run lists 5
    assert {p.key: p.reason for p in by["sums"].plans} == {
        f"bucket=0{b}": "input changed" for b in range(4)
    }
    real = run_pipeline(spec, workers=1, overrides=["stages.numbers.buckets=5"])
    sums = {s.name: s for s in real.stages}["sums"]
    assert sums.ok == 5 and sums.note == ""
    # with nothing upstream pending, the row-based listing is exact: no note
    again = run_pipeline(spec, workers=1, overrides=["stages.numbers.buckets=5"], dry_run=True)
    assert not any(s.note for s in again.stages) and again.executed == 0


def test_preflight_stops_the_run_before_any_partition(toy_spec, tmp_path):
    # Truth: the lake's files are byte-identical afterwards, and the run log has no entry.
    from lakepipe.errors import InputNotFoundError, ParseError
    from tests.conftest import tree_digest

    good = _chain(toy_spec)
    run_pipeline(good, workers=1)
    lake_dir = tmp_path / "lake"
    before = tree_digest(lake_dir)
    checked = tmp_path / "checked.txt"
    checked.write_text("garbage\n")
    # a downstream-only change, so the bad upstream file is caught before sums would run
    over = [f"stages.numbers.checked_file={checked}", "stages.sums.offset=9"]
    with pytest.raises(ParseError, match=r"checked.txt:1: expected 'ok'"):
        run_pipeline(good, workers=1, overrides=over)
    with pytest.raises(ParseError):
        run_pipeline(good, workers=1, overrides=over, dry_run=True)
    checked.unlink()
    with pytest.raises(InputNotFoundError, match=r"fix stages.numbers.checked_file"):
        run_pipeline(good, workers=1, overrides=over)
    assert tree_digest(lake_dir) == before
    checked.write_text("ok\n")
    assert run_pipeline(good, workers=1, overrides=over).exit_code == 0


def test_partitions_failing_on_bad_input_exit_2_and_are_logged(toy_spec):
    r = run_pipeline(toy_spec(numbers={"bad_input_buckets": [1, 3]}), workers=1)
    numbers = r.stages[0]
    assert (numbers.ok, numbers.failed) == (2, 2)
    assert r.exit_code == 2  # every failure was bad input
    assert r.user_errors[0] == (
        "stage 'numbers', partition bucket=01: ParseError: toy input of bucket 1 is "
        "malformed; fix bucket 1"
    )
    statuses = runs_of(Lake(r.lake), r.run_id)
    assert statuses[("numbers", "failed")] == 2 and statuses[("numbers", "ok")] == 2


def test_mixed_failures_exit_1(toy_spec, tmp_path):
    flag = tmp_path / "down"
    flag.write_text("")
    spec = toy_spec(
        numbers={"bad_input_buckets": [1], "fail_buckets": [2], "fail_while": str(flag)}
    )
    r = run_pipeline(spec, workers=1)
    assert r.failed == 2 and len(r.user_errors) == 1 and r.exit_code == 1


def test_default_workers_is_usable_cores(monkeypatch):
    # Truth: the process's CPU affinity, as the OS reports it (a pinned child sees one core).
    import os
    import subprocess
    import sys

    from lakepipe.config import default_workers

    monkeypatch.delenv("LAKEPIPE_WORKERS", raising=False)
    if not hasattr(os, "sched_getaffinity"):
        assert default_workers() == (os.cpu_count() or 1)
        return
    assert default_workers() == len(os.sched_getaffinity(0))
    first = min(os.sched_getaffinity(0))
    code = (
        f"import os; os.sched_setaffinity(0, {{{first}}}); "
        "from lakepipe.config import default_workers; print(default_workers())"
    )
    env = {k: v for k, v in os.environ.items() if k != "LAKEPIPE_WORKERS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    monkeypatch.setenv("LAKEPIPE_WORKERS", "3")
    assert default_workers() == 3
    monkeypatch.setenv("LAKEPIPE_WORKERS", "0")  # not a worker count: the default again
    assert default_workers() == len(os.sched_getaffinity(0))


def test_lake_resolution_order(toy_spec, tmp_path, monkeypatch, cli):
    """--lake > the spec's `lake:` > $LAKEPIPE_LAKE > lake/<name> (./lake for reads)."""
    import yaml

    monkeypatch.chdir(tmp_path)
    named = toy_spec()  # names its lake: tmp_path/lake
    raw = yaml.safe_load(named.read_text())
    del raw["lake"]
    unnamed = tmp_path / "unnamed.yaml"
    unnamed.write_text(yaml.safe_dump(raw))
    env_lake = tmp_path / "env-lake"

    def lake_of(spec: Path, **kw) -> Path:
        return Path(run_pipeline(spec, workers=1, dry_run=True, **kw).lake)

    monkeypatch.delenv("LAKEPIPE_LAKE", raising=False)
    assert lake_of(unnamed) == tmp_path / "lake" / "toy"  # relative to the cwd
    assert lake_of(named) == tmp_path / "lake"
    monkeypatch.setenv("LAKEPIPE_LAKE", str(env_lake))
    assert lake_of(named, lake=tmp_path / "cli-lake") == tmp_path / "cli-lake"
    assert lake_of(named) == tmp_path / "lake"
    assert lake_of(unnamed) == env_lake
    # a real run writes there, and read commands without --lake/-p find it
    r = cli("run", unnamed, "-j", "1", "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert (env_lake / "_lake" / "manifest.json").is_file()
    assert not (tmp_path / "lake" / "toy").exists()
    r = cli("lake", "partitions", "toy_sums", "-f", "csv")
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 5
    monkeypatch.delenv("LAKEPIPE_LAKE")
    r = cli("lake", "partitions", "toy_sums", "-f", "csv")
    assert r.exit_code == 2 and f"lake {tmp_path / 'lake'} does not exist" in r.stderr


def test_a_contract_change_reruns_the_stage_that_writes_the_table(toy_spec, monkeypatch):
    # truth: the committed toy_sums files follow the old contract; a new column in the
    # contract changes the writer's code version, so the dry run plans sums (and only
    # sums) with the reason, instead of skipping into files that no longer match
    import dataclasses

    import pyarrow as pa

    from lakepipe import tables
    from lakepipe.runner import stage_code_version
    from lakepipe.stages.base import stages

    spec = toy_spec()
    run_pipeline(spec, workers=1)
    sums = stages.get("toy_sums")
    before = stage_code_version(sums)
    old = tables.get_contract("toy_sums")
    extra = tables.Column(name="extra", type=pa.float64(), description="new", unit=None)
    changed = dataclasses.replace(old, columns=(*old.columns, extra))
    monkeypatch.setitem(tables._REGISTERED, "toy_sums", changed)
    assert stage_code_version(sums) != before
    # a column's nullability is part of the file schema too
    flipped = dataclasses.replace(
        old, columns=tuple(dataclasses.replace(c, nullable=not c.nullable) for c in old.columns)
    )
    monkeypatch.setitem(tables._REGISTERED, "toy_sums", flipped)
    assert stage_code_version(sums) != before
    monkeypatch.setitem(tables._REGISTERED, "toy_sums", changed)
    r = run_pipeline(spec, workers=1, dry_run=True)
    by = {s.name: s for s in r.stages}
    assert {p.action for p in by["numbers"].plans} == {"skip"}
    reasons = {p.reason.split(" (")[0] for p in by["sums"].plans}
    assert reasons == {"table contract changed"}
