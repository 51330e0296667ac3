"""Benchmark: polite archive fetching against the loopback emulator (issue 7 item 7).

With 50 ms emulated latency and a 10 requests/s limit, fetch N (default 500) cutouts
through the ZTF client (4 threads, machine-wide rate limit, download cache) and report

- achieved request rate / allowed rate (target >= 0.9),
- the busiest 1 s window seen by the server (must stay <= rate + burst),
- new requests on a rerun (target 0: everything comes from the download cache),

next to an in-run baseline: a plain sequential ``requests`` loop over the same URLs
(no limit, no cache), which shows what an impolite client does to the archive.

Run: ``python -m tests.benchmarks.bench_archive [--n 500]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from lakepipe.archives.http import HttpParams
from lakepipe.archives.query import ExposureQuery
from lakepipe.archives.sim import SimArchive
from lakepipe.archives.ztf import ZtfArchive
from lakepipe.sim.emulator import ArchiveEmulator, Faults

RATE_PER_S = 10.0
LATENCY_S = 0.05
SIZE_ARCSEC = 30.0


def targets(sim: SimArchive, n: int) -> list[tuple[int, float, float]]:
    """``n`` distinct (exposure, ra, dec) cutout requests spread over the exposures."""
    exps = sim.exposures(ExposureQuery()).to_pylist()
    out = []
    k = 0
    while len(out) < n:
        for e in exps:
            # walk a spiral of offsets around each image centre (deg)
            r, a = 10.0 * (1 + k // 8) / 3600.0, k * 2.399963  # golden angle
            ra, dec = e["ra"] + r * np.cos(a), e["dec"] + r * np.sin(a)
            out.append((e["exposure_id"], float(ra), float(dec)))
            if len(out) == n:
                break
        k += 1
    return out


def polite_run(ztf: ZtfArchive, reqs: list[tuple[int, float, float]], threads: int) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _, data, _ in pool.map(lambda r: ztf.cutout(r[0], r[1], r[2], SIZE_ARCSEC), reqs):
            assert data is not None
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="cutouts to fetch")
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()

    sim = SimArchive.from_config(
        naxis1=512, naxis2=512, n_nights=1, n_fields=2, visits_per_night=4, n_stars=3000
    )
    sim.cache_size = 16  # keep all 8 rendered images: measure the client, not the renderer
    reqs = targets(sim, args.n)
    with (
        tempfile.TemporaryDirectory() as tmp,
        ArchiveEmulator(sim, faults=Faults(latency_s=LATENCY_S)) as emu,
    ):
        params = HttpParams(
            rate_limit_per_s=RATE_PER_S,
            max_concurrency_per_host=args.threads,
            cache_dir=str(Path(tmp) / "cache"),
            netrc=False,
        )
        ztf = ZtfArchive(ZtfArchive.Params(base_url=emu.url, http=params))
        # warm up: render every image in the emulator, resolve every exposure's URL
        for eid in {r[0] for r in reqs}:
            sim.cutout(eid, *reqs[0][1:], SIZE_ARCSEC)
            ztf.image_url(eid)
        start = len(emu.log)

        elapsed = polite_run(ztf, reqs, args.threads)
        fetched = len(emu.log) - start
        window = emu.requests_per_window(1.0, "/ibe/data/")
        window10 = emu.requests_per_window(10.0, "/ibe/data/")
        achieved = fetched / elapsed

        before = len(emu.log)
        rerun_s = polite_run(ztf, reqs, args.threads)
        rerun_requests = len(emu.log) - before

        # baseline: a plain sequential requests loop, same URLs, no limit, no cache
        urls = [
            (
                ztf.image_url(eid),
                {"center": f"{ra!r},{dec!r}", "size": f"{SIZE_ARCSEC:g}arcsec", "gzip": "false"},
            )
            for eid, ra, dec in reqs
        ]
        emu.log.clear()
        t0 = time.perf_counter()
        with requests.Session() as s:
            for url, p in urls:
                s.get(url, params=p, timeout=30).raise_for_status()
        naive_s = time.perf_counter() - t0
        naive_window = emu.requests_per_window(1.0, "/ibe/data/")

    print(f"cutouts: {args.n}, latency {LATENCY_S * 1000:.0f} ms, limit {RATE_PER_S:g} req/s")
    print(f"polite client: {fetched} requests in {elapsed:.2f} s = {achieved:.2f} req/s")
    print(f"  achieved / allowed rate: {achieved / RATE_PER_S:.3f} (target >= 0.9)")
    print(f"  busiest 1 s window at the server: {window} requests (limit {RATE_PER_S + 1:g};")
    print("  server timestamps carry thread-scheduling jitter of a few ms)")
    print(f"  busiest 10 s window: {window10} requests (limit {10 * RATE_PER_S + 1:g})")
    print(f"  rerun: {rerun_requests} new requests in {rerun_s:.2f} s (target 0)")
    print(f"naive sequential loop: {args.n} requests in {naive_s:.2f} s = {args.n / naive_s:.2f}")
    print(f"  req/s; busiest 1 s window {naive_window} requests")
    print(f"  ({naive_window / RATE_PER_S:.2f}x the allowed rate)")
    print(f"  polite time / naive time: {elapsed / naive_s:.2f}")


if __name__ == "__main__":
    main()
