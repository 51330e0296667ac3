"""Shared fixtures: the test-only toy stage kinds, spec files, and a CLI runner."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

if TYPE_CHECKING:
    from lakepipe.archives.sim import SimArchive
    from lakepipe.sim.emulator import ArchiveEmulator

# Test-only stage kinds; set before lakepipe loads its registries (workers inherit it).
os.environ.setdefault("LAKEPIPE_PLUGINS", "tests.toy")
REPO = Path(__file__).resolve().parent.parent


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli() -> Callable[..., CliResult]:
    """Invoke the CLI in-process through typer's runner; stdout and stderr apart."""
    from typer.testing import CliRunner

    from lakepipe.cli import app, normalise_argv

    runner = CliRunner()

    def invoke(*args: str, input: str | None = None) -> CliResult:
        r = runner.invoke(app, normalise_argv([str(a) for a in args]), input=input)
        if r.exception and not isinstance(r.exception, SystemExit):
            raise r.exception
        return CliResult(r.exit_code, r.stdout, r.stderr)

    return invoke


TOY_SPEC = {
    "name": "toy",
    "stages": {
        "numbers": {"kind": "toy_numbers", "buckets": 4, "rows": 50},
        "sums": {"kind": "toy_sums", "inputs": ["numbers"]},
    },
    "diagnostics": {
        "four_buckets": {"sql": "select count(*) from toy_sums", "expect": 4},
        "rows_in_range": {"sql": "select count(*) from toy_numbers", "expect": {"min": 1}},
    },
}


@pytest.fixture
def toy_spec(tmp_path: Path) -> Callable[..., Path]:
    """Write a toy spec (optionally modified) and return its path; lake under tmp_path."""

    def make(name: str = "toy.yaml", **stage_params: dict) -> Path:
        spec = yaml.safe_load(yaml.safe_dump(TOY_SPEC))
        spec["lake"] = str(tmp_path / "lake")
        for stage, params in stage_params.items():
            spec["stages"][stage].update(params)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        return path

    return make


# -- the virtual survey behind the archive emulator (tests/archives, tests/sim) --------------


@functools.cache
def small_sim() -> SimArchive:
    """Two fields, two nights, two visits, 256x256 images: 8 exposures, fast to render.

    One shared (read-only) instance per test session: its caches are warm after first use.
    """
    from lakepipe.archives.query import ExposureQuery
    from lakepipe.archives.sim import SimArchive

    sim = SimArchive.from_config(
        naxis1=256,
        naxis2=256,
        n_nights=2,
        n_fields=2,
        visits_per_night=2,
        filters=["zg", "zr"],
        n_stars=3000,
        defects=False,
    )
    # render once up front: the first image of a process pays one-off setup (Earth
    # orientation tables) that must not eat into the HTTP timeouts of the tests
    sim.image(sim.exposures(ExposureQuery()).column("exposure_id")[0].as_py())
    return sim


@pytest.fixture(scope="module")
def survey() -> SimArchive:
    """The shared small virtual survey."""
    return small_sim()


@pytest.fixture
def emu(survey: SimArchive) -> Iterator[ArchiveEmulator]:
    """A loopback archive emulator serving ``survey`` for one test."""
    from lakepipe.sim.emulator import ArchiveEmulator

    with ArchiveEmulator(survey) as e:
        yield e


def tree_digest(root: Path) -> dict[str, str]:
    """Every file below ``root`` with its SHA-256, ``_lake/LOCK`` included (to prove
    nothing changed)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
