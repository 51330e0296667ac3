"""An installed wheel finds its named pipelines and table contracts outside the repo."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_wheel_ships_pipelines_and_schemas(tmp_path):
    # offline: hatchling comes from the `test` extra, so no build isolation is needed
    wheel_dir = tmp_path / "wheel"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0 and "hatchling" in (r.stderr + r.stdout):
        # no hatchling in this environment: build with isolation (fetches it from PyPI)
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "-q",
                "-w",
                str(wheel_dir),
                str(REPO),
            ],
            capture_output=True,
            text=True,
        )
    assert r.returncode == 0, r.stderr
    [wheel] = wheel_dir.glob("lakepipe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lakepipe/_data/schemas/tables/exposures.yaml" in names
    assert "lakepipe/_data/schemas/pipeline.schema.json" in names
    assert "lakepipe/_data/pipelines/README.md" in names

    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    # stray top-level packages named like the data folders must not shadow them
    for stray in ("pipelines", "schemas"):
        (target / stray).mkdir()
        (target / stray / "__init__.py").write_text("")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("LAKEPIPE_PLUGINS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(target)
    code = (
        "import lakepipe.resources as r, lakepipe.tables as t;"
        "print(r.pipelines_dir()); print(r.schemas_dir()); print('exposures' in t.contracts())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str(target / "lakepipe" / "_data" / "pipelines")
    assert lines[1] == str(target / "lakepipe" / "_data" / "schemas")
    assert lines[2] == "True"  # the table contracts load from there


def test_source_checkout_uses_its_own_folders():
    # the editable install under test sits in the checkout: its edits take effect at once
    import lakepipe.resources as r

    assert r.pipelines_dir() == REPO / "pipelines"
    assert r.schemas_dir() == REPO / "schemas"
