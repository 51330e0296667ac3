"""Spec validation: messages name file, line, key path; did-you-mean; --set; schema."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lakepipe.errors import SpecError
from lakepipe.spec import load_spec
from tests.conftest import REPO


def write(tmp_path, text: str):
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


GOOD = """\
name: toy
stages:
  numbers:
    kind: toy_numbers
    buckets: 3
  sums:
    kind: toy_sums
    inputs: [numbers]
"""


def errors_of(path, *overrides) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(path, overrides)
    return info.value.errors


def test_good_spec_validates(tmp_path):
    loaded = load_spec(write(tmp_path, GOOD))
    assert loaded.model.stages["numbers"].buckets == 3
    assert loaded.stage_order() == ["numbers", "sums"]


def test_unknown_key_names_line_path_and_suggestion(tmp_path):
    p = write(tmp_path, GOOD.replace("buckets: 3", "bukets: 3"))
    [err] = errors_of(p)
    assert err.startswith(f"{p}:5: stages.numbers.bukets: unknown key 'bukets'.")
    assert "Did you mean 'buckets'?" in err and "Allowed keys:" in err


def test_unknown_kind_lists_available(tmp_path):
    p = write(tmp_path, GOOD.replace("kind: toy_sums", "kind: toy_sum"))
    [err] = errors_of(p)
    assert err.startswith(f"{p}:7: stages.sums.kind: unknown kind 'toy_sum'.")
    assert "Did you mean 'toy_sums'?" in err and "toy_numbers" in err


def test_bad_type_and_constraint(tmp_path):
    p = write(tmp_path, GOOD.replace("buckets: 3", "buckets: 0"))
    [err] = errors_of(p)
    assert (
        err == f"{p}:5: stages.numbers.buckets: input should be greater than or equal to 1 (got 0)"
    )
    p = write(tmp_path, GOOD.replace("buckets: 3", "buckets: many"))
    [err] = errors_of(p)
    assert "stages.numbers.buckets: input should be a valid integer" in err


def test_several_errors_reported_together(tmp_path):
    p = write(tmp_path, GOOD.replace("buckets: 3", "buckets: -1\n    rowz: 2"))
    errs = errors_of(p)
    assert len(errs) == 2


def test_set_overrides_are_typed_and_validated(tmp_path):
    p = write(tmp_path, GOOD)
    loaded = load_spec(p, ["stages.numbers.scale=2.5", "stages.numbers.fail_buckets=[1, 2]"])
    assert loaded.model.stages["numbers"].scale == 2.5
    assert loaded.model.stages["numbers"].fail_buckets == [1, 2]
    [err] = errors_of(p, "stages.numbers.buckets=zero")
    assert err.startswith("--set stages.numbers.buckets=zero: stages.numbers.buckets:")
    [err] = errors_of(p, "stages.numbers.nope=1")
    assert "unknown key 'nope'" in err


def test_cycle_names_its_nodes(tmp_path):
    text = GOOD.replace("    buckets: 3", "    buckets: 3\n    inputs: [sums]")
    [err] = errors_of(write(tmp_path, text))
    assert "stages form a cycle: " in err
    assert "numbers -> sums -> numbers" in err or "sums -> numbers -> sums" in err


def test_one_writer_per_table(tmp_path):
    text = GOOD + "  again:\n    kind: toy_sums\n    inputs: [numbers]\n"
    [err] = errors_of(write(tmp_path, text))
    assert "table 'toy_sums' is already written by stage 'sums'" in err


def test_missing_input_table_suggests_fix(tmp_path):
    p = write(tmp_path, GOOD.replace("    inputs: [numbers]\n", ""))
    [err] = errors_of(p)
    assert "kind 'toy_sums' reads table 'toy_numbers', which none of its inputs writes" in err
    assert "add `inputs: [numbers]`" in err


def test_yaml_syntax_error_has_line(tmp_path):
    p = write(tmp_path, GOOD.replace("buckets: 3", "buckets: [3"))
    [err] = errors_of(p)
    assert err.startswith(f"{p}:") and "YAML syntax error" in err


def test_pipeline_schema_is_current():
    """schemas/pipeline.schema.json must match the models (regenerate: lakepipe schema --write).

    Run without the test-only plug-ins so only shipped kinds are in the schema."""
    env = {k: v for k, v in os.environ.items() if k != "LAKEPIPE_PLUGINS"}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run(
        [sys.executable, "-m", "lakepipe", "schema", "--check"],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr


def test_a_folder_named_like_a_pipeline_does_not_hide_it(tmp_path, monkeypatch):
    # `lakepipe run demo --lake demo` leaves a folder ./demo; the name still means the pipeline
    from lakepipe.resources import pipelines_dir
    from lakepipe.spec import find_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert find_spec("demo") == pipelines_dir() / "demo.yaml"
    (tmp_path / "own.yaml").write_text("name: own\n")
    assert find_spec("own.yaml").resolve() == tmp_path / "own.yaml"


def test_duplicate_keys_name_both_lines(tmp_path):
    text = GOOD + "  numbers:\n    kind: toy_numbers\n"
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, text))
    [err] = e.value.errors
    line = len(GOOD.splitlines()) + 1
    first = GOOD.splitlines().index("  numbers:") + 1
    assert err == (
        f"{tmp_path / 'spec.yaml'}:{line}: stages.numbers: duplicate key (first at line "
        f"{first}); rename or remove one"
    )
