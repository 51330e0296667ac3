"""The CLI through typer's runner: exit codes, stdout vs stderr, and bad input that
leaves the lake byte-identical."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import tree_digest


@pytest.fixture
def built(toy_spec, cli) -> tuple[Path, Path]:
    """A toy spec and its lake after one successful run."""
    spec = toy_spec()
    r = cli("run", spec, "--workers", "1", "--no-progress")
    assert r.exit_code == 0, r.stderr
    return spec, spec.parent / "lake"


def test_run_prints_summary_on_stdout_and_progress_on_stderr(toy_spec, cli):
    spec = toy_spec()
    r = cli("run", spec, "-j", "1", "-f", "csv")
    assert r.exit_code == 0
    assert r.stdout.splitlines()[0] == "stage,kind,ran,skipped,failed,removed,rows,seconds"
    assert r.stdout.splitlines()[1].startswith("numbers,toy_numbers,4,0,0,0,200,")
    assert "numbers: 4 ran, 0 skipped, 0 failed" in r.stderr
    r = cli("run", spec, "-j", "1", "-f", "csv")
    assert ",0,4,0,0,0," in r.stdout.splitlines()[1]


def test_dry_run_reasons(built, cli):
    spec, _ = built
    r = cli("run", spec, "--dry-run", "-f", "csv", "--set", "stages.sums.offset=1")
    lines = r.stdout.splitlines()
    assert "numbers,bucket=00,skip,unchanged" in lines
    assert "sums,bucket=00,run,params changed" in lines
    r = cli("run", spec, "--dry-run", "-f", "csv", "--force", "numbers")
    assert "numbers,bucket=03,run,forced" in r.stdout.splitlines()
    r = cli("run", spec, "--dry-run", "-f", "csv", "--force")  # bare --force: every stage
    assert r.stdout.count(",run,forced") == 8


def test_failed_partition_exit_1(toy_spec, cli, tmp_path):
    flag = tmp_path / "down"
    flag.write_text("")
    spec = toy_spec(numbers={"fail_buckets": [1], "fail_while": str(flag)})
    r = cli("run", spec, "-j", "1", "--no-progress")
    assert r.exit_code == 1
    assert "numbers [bucket=01] failed: RuntimeError: toy failure in bucket 1" in r.stderr
    assert "1 partition(s) failed" in r.stderr
    r = cli("runs", "--lake", tmp_path / "lake", "-f", "csv")
    assert r.stdout.splitlines()[1].split(",")[3:6] == ["6", "0", "1"]  # sums sees 3 buckets


def test_validate_validate_ok(toy_spec, cli):
    r = cli("validate", toy_spec())
    assert r.exit_code == 0 and r.stdout.startswith("ok: toy (2 stages: numbers -> sums)")


def test_lake_commands(built, cli):
    _, lake = built
    r = cli("lake", "tables", "--lake", lake, "-f", "csv")
    assert "toy_numbers,4,200," in r.stdout
    r = cli("lake", "partitions", "toy_sums", "--lake", lake, "-f", "csv")
    assert [ln.split(",")[0] for ln in r.stdout.splitlines()[1:]] == [
        "bucket=00",
        "bucket=01",
        "bucket=02",
        "bucket=03",
    ]
    r = cli("lake", "schema", "toy_numbers", "-f", "csv")
    assert "ra,double,deg,,RA" in r.stdout
    r = cli("lake", "vacuum", "--lake", lake)
    assert r.exit_code == 0 and "deleted 0 file(s), 0 bytes" in r.stderr


def test_check_runs_diagnostics(built, cli, tmp_path):
    spec, _ = built
    r = cli("check", spec, "-f", "csv")
    assert r.exit_code == 0, r.stdout
    assert "four_buckets,4,4.0,pass," in r.stdout
    failing = spec.read_text().replace("expect: 4", "expect: 5")
    bad = tmp_path / "bad_check.yaml"
    bad.write_text(failing)
    r = cli("check", bad, "-f", "csv")
    assert r.exit_code == 1 and "four_buckets,4,5.0,FAIL," in r.stdout
    texty = spec.read_text().replace("select count(*) from toy_sums", "select 'many'")
    bad.write_text(texty)
    r = cli("check", bad, "-f", "csv")
    assert r.exit_code == 1 and "expected a number, the query returned 'many'" in r.stdout


def _command_tree() -> list[tuple[str, ...]]:
    """Every command and group path of the real CLI (the root included)."""
    from typer.main import get_command

    from lakepipe.cli import app

    out: list[tuple[str, ...]] = []

    def walk(cmd, path: tuple[str, ...]) -> None:
        out.append(path)
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            walk(sub, (*path, name))

    walk(get_command(app), ())
    return out


def test_kinds_list_and_show(cli):
    r = cli("kinds")
    assert "toy_numbers" in r.stdout and "ecsv" in r.stdout
    r = cli("kinds", "toy_sums")
    assert '"offset"' in r.stdout


def test_every_command_and_group_help_has_an_example(cli):
    tree = _command_tree()
    # the tree is the real one: groups and their commands are all in it
    assert {("run",), ("lake",), ("lake", "vacuum"), ("plot",), ("sim",), ("runs",)} <= set(tree)
    missing = []
    for path in tree:
        r = cli(*path, "--help")
        assert r.exit_code == 0, (path, r.stderr)
        if "Example: lakepipe " not in r.stdout:
            missing.append(" ".join(("lakepipe", *path)))
    assert not missing, f"--help without an example: {missing}"


def test_debug_shows_traceback_and_keeps_the_exit_code(cli, tmp_path):
    r = cli("--debug", "run", tmp_path / "missing.yaml")
    assert r.exit_code == 2
    assert "Traceback (most recent call last)" in r.stderr
    assert "InputNotFoundError: spec file" in r.stderr
    assert re.search(r"lakepipe: error: spec file .*missing.yaml not found", r.stderr)


def test_only_and_force_take_comma_separated_stages(built, cli):
    spec, _ = built
    r = cli("run", spec, "--dry-run", "-f", "csv", "--only", "numbers,sums", "--force", "sums")
    lines = r.stdout.splitlines()
    assert "numbers,bucket=00,skip,unchanged" in lines and "sums,bucket=00,run,forced" in lines
    r = cli("run", spec, "--dry-run", "-f", "csv", "--only", "sums", "--force", "numbers, sums")
    assert r.stdout.count(",run,forced") == 4 and "numbers," not in r.stdout
    r = cli("run", spec, "--dry-run", "--only", "numbers,sum")
    assert r.exit_code == 2 and "unknown stage(s) sum; stages in toy: numbers, sums" in r.stderr


def test_debug_after_the_command_and_schema_with_a_lake(built, cli, tmp_path):
    _, lake = built
    r = cli("run", tmp_path / "missing.yaml", "--debug")
    assert r.exit_code == 2 and "Traceback (most recent call last)" in r.stderr
    r = cli("lake", "schema", "toy_sums", "--lake", lake, "-f", "csv")
    assert r.exit_code == 0 and r.stdout.splitlines()[0] == "column,type,unit,key,description"
    r = cli("lake", "schema", "exposures", "-p", "demo", "-f", "csv")  # no lake needed
    assert r.exit_code == 0 and "ra,double,deg," in r.stdout
    r = cli("lake", "schema", "exposures", "-p", "dmeo")
    assert r.exit_code == 2 and "no pipeline named 'dmeo'" in r.stderr
    r = cli("validate", "--help")
    assert "Example: lakepipe validate demo" in r.stdout


def test_set_values_are_typed_like_file_values(cli, tmp_path):
    # Truth: a date given with --set resolves exactly like the same date in the file.
    from lakepipe.spec import find_spec, load_spec

    text = find_spec("demo").read_text().replace("start: 2025-01-01", "start: 2025-01-02")
    edited = tmp_path / "demo.yaml"
    edited.write_text(text)
    via_set = load_spec("demo", ["stages.exposures.where.start=2025-01-02"])
    via_file = load_spec(edited)
    where_set = via_set.model.stages["exposures"].where.model_dump(mode="json")
    where_file = via_file.model.stages["exposures"].where.model_dump(mode="json")
    assert where_set == where_file and str(where_set["start"]).startswith("2025-01-02")
    r = cli("validate", "demo", "--set", "stages.exposures.where.start=2025-01-02")
    assert r.exit_code == 0 and r.stdout.startswith("ok: demo"), r.stdout


def test_partitions_failing_on_bad_input_exit_2(toy_spec, cli, tmp_path):
    spec = toy_spec(numbers={"bad_input_buckets": [2]})
    r = cli("run", spec, "-j", "1", "--no-progress", "-f", "csv")
    assert r.exit_code == 2
    assert (
        "lakepipe: error: stage 'numbers', partition bucket=02: ParseError: toy input of "
        "bucket 2 is malformed; fix bucket 2"
    ) in r.stderr
    assert "Traceback" not in r.stderr
    # what did not fail is committed and the failure is in the run log
    assert r.stdout.splitlines()[1].startswith("numbers,toy_numbers,3,0,1,")
    r = cli("runs", "--lake", tmp_path / "lake", "-f", "csv")
    assert r.stdout.splitlines()[1].split(",")[3:6] == ["6", "0", "1"]


def test_dry_run_lists_downstream_work(built, cli):
    spec, _ = built
    r = cli("run", spec, "--dry-run", "-f", "csv", "--set", "stages.numbers.buckets=5")
    lines = r.stdout.splitlines()
    assert "numbers,bucket=04,run,new" in lines
    assert "sums,bucket=04,run,new" in lines  # not committed upstream yet, still listed
    assert "sums,bucket=00,run,input changed" in lines


def test_deleted_or_truncated_parquet_is_noticed_and_redone(built, cli):
    # Truth: the manifest records each committed file's size; a file removed or cut short
    # behind the lake's back makes its partition "run" (not "skip"), the rerun restores
    # exactly the rows of the first run, and queries work again.
    spec, lake = built
    sql = "select bucket, count(*) as n, sum(value) as s from toy_numbers group by 1 order by 1"
    first = cli("query", "--lake", lake, "-f", "csv", sql)
    assert first.exit_code == 0 and len(first.stdout.splitlines()) == 5
    [gone] = (lake / "toy_numbers" / "bucket=01").glob("*.parquet")
    [cut] = (lake / "toy_numbers" / "bucket=03").glob("*.parquet")
    gone.unlink()
    size = cut.stat().st_size
    cut.write_bytes(cut.read_bytes()[: size // 2])
    broken = cli("query", "--lake", lake, sql)  # the damage is real
    assert broken.exit_code == 1 and "'toy_numbers' cannot be read" in broken.stderr
    r = cli("run", spec, "--dry-run", "-f", "csv")
    lines = r.stdout.splitlines()
    rel = f"toy_numbers/bucket=01/{gone.name}"
    assert f"numbers,bucket=01,run,output damaged: file {rel} missing" in lines
    rel = f"toy_numbers/bucket=03/{cut.name}"
    truncated = f"file {rel} truncated ({size // 2} of {size} bytes)"
    assert f"numbers,bucket=03,run,output damaged: {truncated}" in lines
    assert "numbers,bucket=00,skip,unchanged" in lines
    # same rows again: the sums reading them stay unchanged
    assert "sums,bucket=01,skip,unchanged" in lines
    r = cli("run", spec, "-j", "1", "--no-progress", "-f", "csv")
    assert r.exit_code == 0
    assert r.stdout.splitlines()[1].startswith("numbers,toy_numbers,2,2,0,0,100,")
    again = cli("query", "--lake", lake, "-f", "csv", sql)
    assert again.exit_code == 0 and again.stdout == first.stdout
    assert cut.stat().st_size == size


def test_a_locked_lake_refuses_a_second_run_but_not_a_dry_run(built, cli):
    from lakepipe.lake import Lake

    spec, lake = built
    with Lake(lake).lock("vacuum"):
        r = cli("run", spec, "-j", "1", "--no-progress", "--force", "sums")
        assert r.exit_code == 1 and "is locked by another lakepipe process" in r.stderr
        r = cli("run", spec, "--dry-run", "-f", "csv", "--force", "sums")
        assert r.exit_code == 0 and "sums,bucket=00,run,forced" in r.stdout.splitlines()


def _bad_yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


GOOD_STAGES = (
    "name: toy\nstages:\n  numbers: {kind: toy_numbers}\n"
    "  sums: {kind: toy_sums, inputs: [numbers]}\n"
)

# (id, argv builder, exit code, stderr-or-stdout pattern)
BAD_INPUTS = [
    (
        "malformed-yaml",
        lambda t, lk: ["validate", _bad_yaml(t, "name: [toy\n")],
        2,
        r"bad.yaml:\d+: YAML syntax error",
    ),
    (
        "unknown-kind",
        lambda t, lk: [
            "run",
            _bad_yaml(t, GOOD_STAGES.replace("kind: toy_numbers", "kind: toy_number")),
            "--lake",
            lk,
        ],
        2,
        r"stages.numbers.kind: unknown kind 'toy_number'. Did you mean 'toy_numbers'",
    ),
    (
        "bad-type",
        lambda t, lk: [
            "run",
            _bad_yaml(
                t, GOOD_STAGES.replace("{kind: toy_numbers}", "{kind: toy_numbers, rows: lots}")
            ),
            "--lake",
            lk,
        ],
        2,
        r"bad.yaml:3: stages.numbers.rows: input should be a valid integer",
    ),
    (
        "unknown-key",
        lambda t, lk: [
            "validate",
            _bad_yaml(
                t, GOOD_STAGES.replace("{kind: toy_numbers}", "{kind: toy_numbers, scael: 2}")
            ),
        ],
        2,
        r"unknown key 'scael'. Did you mean 'scale'",
    ),
    (
        "missing-input-table",
        lambda t, lk: [
            "run",
            _bad_yaml(t, GOOD_STAGES.replace(", inputs: [numbers]", "")),
            "--lake",
            lk,
        ],
        2,
        r"reads table 'toy_numbers', which none of its inputs writes",
    ),
    (
        "unknown-input",
        lambda t, lk: [
            "run",
            _bad_yaml(t, GOOD_STAGES.replace("inputs: [numbers]", "inputs: [numbrs]")),
            "--lake",
            lk,
        ],
        2,
        r"unknown stage 'numbrs'. Did you mean 'numbers'",
    ),
    (
        "cycle",
        lambda t, lk: [
            "run",
            _bad_yaml(
                t, GOOD_STAGES.replace("{kind: toy_numbers}", "{kind: toy_numbers, inputs: [sums]}")
            ),
            "--lake",
            lk,
        ],
        2,
        r"stages form a cycle",
    ),
    (
        "missing-spec-file",
        lambda t, lk: ["run", t / "nope.yaml", "--lake", lk],
        2,
        r"spec file .*nope.yaml not found",
    ),
    (
        "unknown-pipeline",
        lambda t, lk: ["run", "dmeo", "--lake", lk],
        2,
        r"no pipeline named 'dmeo'",
    ),
    (
        "set-without-equals",
        lambda t, lk: [
            "run",
            _bad_yaml(t, GOOD_STAGES),
            "--lake",
            lk,
            "--set",
            "stages.numbers.rows",
        ],
        2,
        r"expected KEY.PATH=VALUE",
    ),
    (
        "set-unknown-key",
        lambda t, lk: [
            "run",
            _bad_yaml(t, GOOD_STAGES),
            "--lake",
            lk,
            "--set",
            "stages.numbers.rowz=3",
        ],
        2,
        r"--set stages.numbers.rowz=3: stages.numbers.rowz: unknown key 'rowz'",
    ),
    (
        "only-unknown-stage",
        lambda t, lk: ["run", _bad_yaml(t, GOOD_STAGES), "--lake", lk, "--only", "sum"],
        2,
        r"unknown stage\(s\) sum",
    ),
    (
        "stage-missing-file",
        lambda t, lk: [
            "run",
            _bad_yaml(
                t,
                GOOD_STAGES.replace(
                    "{kind: toy_numbers}", "{kind: toy_numbers, need_file: absent.csv}"
                ),
            ),
            "--lake",
            lk,
        ],
        2,
        r"toy input file absent.csv not found",
    ),
    (
        "export-unknown-table",
        lambda t, lk: ["export", "toy_numbrs", "--lake", lk, "-o", t / "x.csv"],
        2,
        r"no table contract named 'toy_numbrs'. Did you mean 'toy_numbers'",
    ),
    (
        "export-table-and-sql",
        lambda t, lk: ["export", "toy_sums", "--sql", "select 1", "--lake", lk, "-o", t / "x.csv"],
        2,
        r"give a TABLE or --sql",
    ),
    (
        "export-unknown-format",
        lambda t, lk: ["export", "toy_sums", "--lake", lk, "-o", t / "x.out", "--format", "exel"],
        2,
        r"unknown export format 'exel'",
    ),
    (
        "export-uninferrable-suffix",
        lambda t, lk: ["export", "toy_sums", "--lake", lk, "-o", t / "x.xlsx"],
        2,
        r"cannot infer a format from",
    ),
    (
        "export-missing-dir",
        lambda t, lk: ["export", "toy_sums", "--lake", lk, "-o", t / "no" / "x.csv"],
        2,
        r"output folder .* does not exist",
    ),
    (
        "bad-sql",
        lambda t, lk: ["query", "--lake", lk, "selct * from toy_sums"],
        2,
        r"Parser Error: syntax error",
    ),
    (
        "sql-unknown-table",
        lambda t, lk: ["query", "--lake", lk, "select * from toy_sum"],
        2,
        r"Table with name toy_sum does not exist",
    ),
    (
        "sql-insert",
        lambda t, lk: ["query", "--lake", lk, "insert into toy_sums values (1)"],
        2,
        r"INSERT statements are not allowed",
    ),
    (
        "sql-delete",
        lambda t, lk: ["query", "--lake", lk, "delete from toy_sums"],
        2,
        r"DELETE statements are not allowed",
    ),
    (
        "sql-copy",
        lambda t, lk: ["query", "--lake", lk, f"copy toy_sums to '{lk}/toy_sums/evil.parquet'"],
        2,
        r"COPY statements are not allowed",
    ),
    (
        "sql-attach",
        lambda t, lk: ["query", "--lake", lk, f"attach '{t}/x.db'"],
        2,
        r"ATTACH statements are not allowed",
    ),
    (
        "sql-install",
        lambda t, lk: ["query", "--lake", lk, "install spatial"],
        2,
        r"statements are not allowed",
    ),
    (
        "sql-outside-file",
        lambda t, lk: ["query", "--lake", lk, f"select * from read_text('{t}/bad.yaml')"],
        2,
        r"refused: .*Cannot access file",
    ),
    (
        "query-missing-lake",
        lambda t, lk: ["query", "--lake", t / "nolake", "select 1"],
        2,
        r"lake .*nolake does not exist",
    ),
    (
        "lake-schema-unknown",
        lambda t, lk: ["lake", "schema", "exposure"],
        2,
        r"no table contract named 'exposure'. Did you mean 'exposures'",
    ),
    (
        "kinds-unknown",
        lambda t, lk: ["kinds", "toy_sumz"],
        2,
        r"no kind or format 'toy_sumz'. Did you mean 'toy_sums'",
    ),
    (
        "set-bad-yaml",
        lambda t, lk: [
            "run",
            _bad_yaml(t, GOOD_STAGES),
            "--lake",
            lk,
            "--set",
            "stages.numbers.rows=[1,",
        ],
        2,
        r"--set 'stages.numbers.rows=\[1,': the value is not valid YAML",
    ),
    (
        "opt-bad-yaml",
        lambda t, lk: ["export", "toy_sums", "--lake", lk, "-o", t / "x.csv", "--opt", "a=[1,"],
        2,
        r"--opt 'a=\[1,': the value is not valid YAML",
    ),
    (
        "duplicate-stage",
        lambda t, lk: [
            "run",
            _bad_yaml(t, GOOD_STAGES + "  numbers: {kind: toy_numbers, rows: 3}\n"),
            "--lake",
            lk,
        ],
        2,
        r"bad.yaml:5: stages.numbers: duplicate key \(first at line 3\)",
    ),
    (
        "duplicate-param",
        lambda t, lk: [
            "validate",
            _bad_yaml(
                t,
                GOOD_STAGES.replace("{kind: toy_numbers}", "{kind: toy_numbers, rows: 2, rows: 3}"),
            ),
        ],
        2,
        r"bad.yaml:3: stages.numbers.rows: duplicate key",
    ),
    (
        "preflight-missing-file",
        lambda t, lk: [
            "run",
            _bad_yaml(
                t,
                GOOD_STAGES.replace(
                    "{kind: toy_numbers}", "{kind: toy_numbers, checked_file: absent.txt}"
                ),
            ),
            "--lake",
            lk,
        ],
        2,
        r"checked_file .*absent.txt not found; fix stages.numbers.checked_file",
    ),
    (
        "validate-preflight",
        lambda t, lk: [
            "validate",
            _bad_yaml(
                t,
                GOOD_STAGES.replace(
                    "{kind: toy_numbers}", "{kind: toy_numbers, checked_file: absent.txt}"
                ),
            ),
        ],
        2,
        r"checked_file .*absent.txt not found",
    ),
    (
        "runs-unknown-run",
        lambda t, lk: ["runs", "--lake", lk, "--run", "nope"],
        2,
        r"no run 'nope' in the run log of lake .*; list its runs with `lakepipe runs --lake ",
    ),
    (
        "union-member-names-hidden",  # center: SkyPoint | ExposureQuery, both reject ra
        lambda t, lk: [
            "validate",
            _bad_yaml(
                t,
                "name: c\narchive: {kind: sim}\nstages:\n"
                "  exposures: {kind: exposures}\n"
                "  c: {kind: cutouts, inputs: [exposures], center: {ra: 400, dec: 2}}\n",
            ),
        ],
        2,
        # said once, at the YAML's own key path: no SkyPoint, no function-after[...]
        r"(?s)^(?!.*SkyPoint)(?!.*function-after)(?!.*center\.ra.*center\.ra).*"
        r"bad.yaml:5: stages\.c\.center\.ra: input should be less than 360 \(got 400\)",
    ),
    (
        "union-not-a-mapping",
        lambda t, lk: [
            "validate",
            _bad_yaml(
                t,
                "name: c\narchive: {kind: sim}\nstages:\n"
                "  exposures: {kind: exposures}\n"
                "  c: {kind: cutouts, inputs: [exposures], center: 5}\n",
            ),
        ],
        2,
        r"(?s)^(?!.*center:.*center:).*bad.yaml:5: stages\.c\.center: expected a mapping of "
        r"keys \(got 5\)",
    ),
    (
        "set-creates-unknown-stage",  # blame the --set value, not a line of the file
        lambda t, lk: [
            "run",
            _bad_yaml(t, GOOD_STAGES),
            "--lake",
            lk,
            "--set",
            "stages.nosuch.x=1",
        ],
        2,
        r"--set stages.nosuch.x=1: stages.nosuch: missing 'kind'",
    ),
    (
        "validate-no-archive",  # run rejects it (exit 2), so validate must too
        lambda t, lk: [
            "validate",
            _bad_yaml(t, "name: x\nstages:\n  exposures: {kind: exposures}\n"),
        ],
        2,
        r"stage 'exposures' \(kind 'exposures'\) needs an archive; add e.g. `archive:",
    ),
    (
        "validate-unknown-filter",
        lambda t, lk: [
            "validate",
            _bad_yaml(
                t,
                "name: x\narchive: {kind: sim}\nstages:\n"
                "  exposures: {kind: exposures, where: {filters: [zg, zq]}}\n",
            ),
        ],
        2,
        r"stages.exposures.where.filters: unknown filter 'zq' for archive 'sim'.*"
        r"Known filters: zg, zr, zi",
    ),
    (
        "validate-targets-sql-syntax",
        lambda t, lk: [
            "validate",
            _bad_yaml(
                t,
                "name: x\narchive: {kind: sim}\nstages:\n  exposures: {kind: exposures}\n"
                "  c: {kind: cutouts, inputs: [exposures], targets_sql: 'selct 1'}\n",
            ),
        ],
        2,
        r'stages.c.targets_sql: Parser Error: syntax error at or near "selct"; fix the SQL',
    ),
    (
        "run-forced-sql-syntax",
        lambda t, lk: [
            "run",
            _bad_yaml(
                t,
                "name: x\narchive: {kind: sim}\nstages:\n  exposures: {kind: exposures}\n"
                "  cutouts: {kind: cutouts, inputs: [exposures]}\n"
                "  s: {kind: sources, inputs: [cutouts], forced: {sql: 'select ra dec frm t'}}\n",
            ),
            "--lake",
            lk,
        ],
        2,
        r'lakepipe: error: stages.s.forced.sql: Parser Error: syntax error at or near "frm"',
    ),
    (
        "log-level-unknown",
        lambda t, lk: ["lake", "tables", "--lake", lk, "--log-level", "loud"],
        2,
        r"log level 'loud' is not one of debug, info, warning, error",
    ),
    (
        "workers-zero",
        lambda t, lk: ["run", _bad_yaml(t, GOOD_STAGES), "--lake", lk, "--workers", "0"],
        2,
        r"Invalid value for '--workers'",
    ),
]


@pytest.mark.parametrize(
    ("make_args", "code", "pattern"),
    [pytest.param(b, c, p, id=i) for i, b, c, p in BAD_INPUTS],
)
def test_bad_input(built, cli, tmp_path, make_args, code, pattern):
    _, lake = built
    before = tree_digest(lake)
    r = cli(*make_args(tmp_path, lake))
    assert r.exit_code == code, (r.stdout, r.stderr)
    text = r.stderr + r.stdout
    assert re.search(pattern, text), text
    assert "Traceback" not in text
    assert tree_digest(lake) == before  # nothing in the lake changed


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        ("checked_file: absent.txt", r"checked_file .*absent.txt not found"),  # preflight
        ("need_file: absent.csv", r"toy input file absent.csv not found"),  # listing
    ],
)
def test_bad_input_on_a_new_lake_path_creates_nothing(cli, tmp_path, params, pattern):
    # Truth: the run stops before the lake's lock is taken, so no folder appears at all.
    spec = _bad_yaml(
        tmp_path, GOOD_STAGES.replace("{kind: toy_numbers}", f"{{kind: toy_numbers, {params}}}")
    )
    new = tmp_path / "new"
    r = cli("run", spec, "--lake", new, "--no-progress")
    assert r.exit_code == 2 and re.search(pattern, r.stderr), r.stderr
    assert not new.exists()


def test_archive_down_names_the_failure_and_keeps_the_lake(cli, tmp_path):
    # nothing listens on the port: the exposures stage cannot list its partitions; the
    # run says why on stderr, exits 1, and a second run against it commits nothing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: connections are refused
    spec = tmp_path / "down.yaml"
    spec.write_text(
        "name: down\n"
        f"lake: {tmp_path / 'lake'}\n"
        f"archive: {{kind: ztf, base_url: 'http://127.0.0.1:{port}',"
        " http: {max_retries: 0, netrc: false}}\n"
        "stages:\n"
        "  exposures: {kind: exposures, where: {ra: 150.0, dec: 2.2, radius_deg: 0.5,"
        " start: 2025-01-01, end: 2025-01-03}}\n"
    )
    r = cli("run", spec, "--no-progress")
    assert r.exit_code == 1
    assert "lakepipe: stage 'exposures' failed: ArchiveError" in r.stderr
    assert f"127.0.0.1:{port}" in r.stderr
    r = cli("runs", "--lake", tmp_path / "lake", "-f", "csv")
    assert r.exit_code == 0 and "failed" in r.stdout


def test_debug_logs_http_request_ids_from_workers_too(emu, tmp_path):
    # Truth: the HTTP layer logs each response (request id, bytes, Server-Timing) at
    # DEBUG; the emulator sends X-Request-Id "emu-…" and Server-Timing "app;dur=…". With
    # --log-level debug those lines reach stderr from the parent (the search) and from
    # the forkserver workers (the cutout downloads); without it, none do.
    import os
    import subprocess
    import sys

    spec = tmp_path / "ztf.yaml"
    spec.write_text(
        "name: ztf\n"
        f"archive: {{kind: ztf, base_url: '{emu.url}', http: {{rate_limit_per_s: 500,"
        " netrc: false, backoff_base_s: 0.01}}\n"
        "stages:\n"
        "  exposures: {kind: exposures, where: {ra: 150.0, dec: 2.2, radius_deg: 0.1}}\n"
        "  cutouts: {kind: cutouts, inputs: [exposures], size_arcsec: 40,"
        " targets: [{id: a, ra: 150.0, dec: 2.2}]}\n"
    )
    env = {**os.environ, "LAKEPIPE_PLUGINS": "tests.toy"}
    env.pop("LAKEPIPE_LOG_LEVEL", None)

    def lakepipe(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "lakepipe", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )

    line = re.compile(
        r"^\S+ \S+ (?P<proc>\S+) lakepipe\.archives\.http DEBUG: GET \S+ -> 200, \d+ bytes, "
        r"request-id emu-\S+, server-timing app;dur=[\d.]+$",
        re.M,
    )
    r = lakepipe(
        "run",
        str(spec),
        "--lake",
        str(tmp_path / "a"),
        "-j",
        "2",
        "--no-progress",
        "-f",
        "csv",
        "--log-level",
        "debug",
    )
    assert r.returncode == 0, r.stderr
    procs = {m["proc"] for m in line.finditer(r.stderr)}
    assert "MainProcess" in procs, r.stderr
    assert any(p.startswith("ForkServerProcess") for p in procs), procs
    assert "/ibe/data/ztf/" in r.stderr  # an image download, done in a worker
    # logs stay off stdout: it holds the summary only
    assert r.stdout.splitlines()[0] == "stage,kind,ran,skipped,failed,removed,rows,seconds"
    assert len(r.stdout.splitlines()) == 3
    r = lakepipe("run", str(spec), "--lake", str(tmp_path / "b"), "-j", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert not line.search(r.stderr) and "DEBUG" not in r.stderr
    env["LAKEPIPE_LOG_LEVEL"] = "debug"
    r = lakepipe("run", str(spec), "--lake", str(tmp_path / "c"), "-j", "1", "--no-progress")
    assert r.returncode == 0 and line.search(r.stderr), r.stderr
    del env["LAKEPIPE_LOG_LEVEL"]
    r = lakepipe("run", str(spec), "--lake", str(tmp_path / "d"), "-j", "1", "--debug")
    assert r.returncode == 0 and line.search(r.stderr), r.stderr  # --debug after the command
