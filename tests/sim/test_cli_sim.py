"""``lakepipe sim catalog`` and ``lakepipe sim serve`` through the CLI.

Truths: the written reference catalog (Parquet or HATS) answers a cone read exactly
like the archive's own catalog (``catalog: {kind: archive}``) in a pipeline; a busy
port is a clear input error (exit 2) and no "serving" banner is printed; ``--log``
records every answered request as a JSON line with the status the client saw and the
HTTP Basic user name it sent, never its password.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from lakepipe.archives.sim import SimArchive
from lakepipe.catalogs import CatalogConfig, Cone, open_catalog

PARAMS = ["--param", "seed=3", "--param", "n_fields=1", "--param", "n_nights=1"]
COLUMNS = {"id": "source_id", "mags": {"G": "phot_g_mean_mag"}, "pmra": "pmra", "pmdec": "pmdec",
           "epoch": "ref_epoch"}  # fmt: skip


def _cone(config: dict, archive: SimArchive, cone: Cone) -> pa.Table:
    """Reference rows in ``cone`` at 2025-01-01 (proper motions applied), by ref_id."""
    cat = open_catalog(CatalogConfig(**config), archive=archive)
    return cat.read([cone], epoch_mjd=60676.0).sort_by("ref_id")


@pytest.mark.parametrize("fmt", ["parquet", "hats"])
def test_sim_catalog_reads_like_the_archive_catalog(tmp_path, cli, fmt):
    out = tmp_path / ("refcat.parquet" if fmt == "parquet" else "refcat")
    r = cli("sim", "catalog", *PARAMS, "--format", fmt, "-o", out)
    assert r.exit_code == 0, r.stderr
    archive = SimArchive.from_config(seed=3, n_fields=1, n_nights=1)
    n = archive.catalog().num_rows
    assert f"wrote {n} reference stars (seed 3)" in r.stderr and f"kind: {fmt}" in r.stderr
    if fmt == "parquet":
        written = pq.read_table(out)
        assert written.column_names[:7] == [
            "source_id", "ra", "dec", "pmra", "pmdec", "phot_g_mean_mag", "bp_rp"
        ]  # fmt: skip
        assert written.equals(archive.catalog())
    cone = Cone(archive.config.ra, archive.config.dec, 0.1)
    got = _cone({"kind": fmt, "path": str(out), "columns": COLUMNS}, archive, cone)
    want = _cone({"kind": "archive", "columns": COLUMNS}, archive, cone)
    assert want.num_rows > 100 and got.equals(want)


def test_sim_catalog_from_a_pipeline_and_bad_input(tmp_path, cli):
    r = cli("sim", "catalog", "-p", "demo", "-o", tmp_path / "demo.parquet")
    assert r.exit_code == 0, r.stderr
    assert "(seed 7)" in r.stderr  # the demo's archive: {kind: sim, seed: 7, ...}
    r = cli("sim", "catalog", *PARAMS, "--format", "csv", "-o", tmp_path / "x.csv")
    assert r.exit_code == 2 and "--format must be one of parquet, hats" in r.stderr
    r = cli("sim", "catalog", "--param", "naxis1=-3", "-o", tmp_path / "x.parquet")
    assert r.exit_code == 2 and "survey parameter naxis1" in r.stderr
    r = cli("sim", "catalog", *PARAMS, "-o", tmp_path / "missing" / "x.parquet")
    assert r.exit_code == 2 and "does not exist" in r.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    r = cli("sim", "catalog", *PARAMS, "-f", "hats", "-o", tmp_path / "full")
    assert r.exit_code == 2 and "not an empty folder" in r.stderr


def test_sim_help_shows_examples(cli):
    r = cli("sim", "--help")
    assert r.exit_code == 0 and "Example: lakepipe sim serve --port 8765" in r.stdout
    assert "Example: lakepipe sim catalog -p demo -o refcat.parquet" in r.stdout


def test_serve_on_a_busy_port_is_an_input_error(cli):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = cli("sim", "serve", "--port", port, *PARAMS, "--param", "n_asteroids=0")
    assert r.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in r.stderr
    assert "serving" not in r.stderr and "Traceback" not in r.stderr


LOGIN = ("ztf-user", "not-in-the-log-7")  # an HTTP Basic login sent to the emulator


def test_serve_logs_requests_as_jsonl(tmp_path):
    log = tmp_path / "requests.jsonl"
    cmd = [sys.executable, "-m", "lakepipe", "sim", "serve", "--port", "0", "--log", str(log),
           *PARAMS, "--param", "n_asteroids=0", "--param", "naxis1=256", "--param", "naxis2=256",
           "--fault", "down=true"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env) as proc:
        _exercise(proc)
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(r["method"], r["path"], r["status"], r["fault"]) for r in rows] == [
        ("GET", "/ibe/search/ztf/products/sci", 503, "status"),
        ("GET", "/no/such/path", 503, "status"),
    ]
    assert rows[0]["query"] == "WHERE=field%3E0"
    # the login's user name is recorded, the password never (the first request sent one)
    assert [r["user"] for r in rows] == [LOGIN[0], None]
    assert LOGIN[1] not in log.read_text()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", rows[0]["timestamp"])


def _exercise(proc: subprocess.Popen) -> None:
    """Wait for the banner, make two requests, then Ctrl-C the server."""
    banner = re.compile(r"serving the virtual survey \(seed 3\) on (http://127\.0\.0\.1:\d+)")
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            m = banner.search(line)
            url = m.group(1) if m else None
        assert url, "no serving banner"
        with requests.Session() as s:
            sci = f"{url}/ibe/search/ztf/products/sci"
            a = s.get(sci, params={"WHERE": "field>0"}, auth=LOGIN, timeout=10)
            b = s.get(f"{url}/no/such/path", timeout=10)
        assert a.status_code == b.status_code == 503  # --fault down=true
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
