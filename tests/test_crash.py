"""Crash safety: a run killed with SIGKILL mid-write leaves no partial partition visible;
the rerun completes without duplicates; vacuum removes the orphans.

Truth: every committed toy_numbers partition has exactly ``rows`` rows with unique ids,
and the files the manifest lists are exactly the files the views read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lakepipe.lake import Lake
from lakepipe.runner import run_pipeline
from tests.conftest import REPO


def _orphans(lake_root: Path) -> list[Path]:
    manifest_path = lake_root / "_lake" / "manifest.json"
    listed = set()
    if manifest_path.exists():
        m = json.loads(manifest_path.read_text())
        listed = {
            f["path"] for parts in m["tables"].values() for e in parts.values() for f in e["files"]
        }
    files = (
        [p for p in (lake_root / "toy_numbers").rglob("*") if p.is_file()]
        if (lake_root / "toy_numbers").exists()
        else []
    )
    return [p for p in files if str(p.relative_to(lake_root)) not in listed]


def test_sigkill_mid_run_leaves_nothing_half_visible(toy_spec, tmp_path):
    spec = toy_spec(numbers={"buckets": 40, "rows": 2000, "sleep_s": 0.05})
    lake_root = tmp_path / "lake"
    env = {**os.environ, "PYTHONPATH": str(REPO), "LAKEPIPE_PLUGINS": "tests.toy"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lakepipe", "run", str(spec), "--workers", "1", "--no-progress"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Kill as soon as a written-but-uncommitted file exists (the runner commits in batches).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if (lake_root / "_lake" / "manifest.json").exists() and _orphans(lake_root):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    orphans_after_kill = _orphans(lake_root)
    assert orphans_after_kill, "the kill should have left uncommitted files"

    lake = Lake(lake_root)
    committed = lake.manifest().partitions("toy_numbers")
    assert 0 < len(committed) < 40
    seen = (
        lake.reader()
        .sql("select bucket, count(*) as n, count(distinct id) as u from toy_numbers group by 1")
        .to_pylist()
    )
    assert len(seen) == len(committed)
    assert all(r["n"] == r["u"] == 2000 for r in seen)  # whole partitions only

    # vacuum sees exactly the orphans (dry run: delete nothing yet)
    listed, size = lake.vacuum(dry_run=True)
    leftover = {str(p.relative_to(lake_root)) for p in orphans_after_kill}
    assert set(listed) == leftover and size > 0

    # the rerun (the kernel released the dead run's lock) finishes the job
    report = run_pipeline(spec, workers=1)
    assert report.exit_code == 0
    numbers = report.stages[0]
    assert numbers.skipped == len(committed) and numbers.ok == 40 - len(committed)
    total = (
        lake.reader()
        .sql("select count(*) as n, count(distinct id) as u from toy_numbers")
        .to_pylist()[0]
    )
    assert total == {"n": 40 * 2000, "u": 40 * 2000}

    # files are named by fingerprint, so the rerun may have committed an orphan's name;
    # whatever is still unreferenced goes now, and nothing committed is touched.
    deleted, _ = lake.vacuum()
    assert set(deleted) <= leftover and not _orphans(lake_root)
    assert lake.reader().sql("select count(*) as n from toy_numbers").column("n")[0].as_py() == (
        80000
    )
