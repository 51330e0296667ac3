"""Benchmark: render full-size virtual-survey exposures (issue 3 item 9).

Renders full 3072×3080 ZTF-like quadrant exposures with ~5,000 stars on one core and
reports seconds per exposure and peak memory (targets ≤ 1.0 s and ≤ 500 MiB), plus
ratios against an in-run baseline: drawing one full frame of standard normals (the
irreducible cost of per-pixel Gaussian noise) and a plain float32 frame copy.

Run: ``python -m tests.benchmarks.bench_sim [--exposures N]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
import tracemalloc

import numpy as np


def _one_core() -> None:
    """Pin to one CPU and single-threaded BLAS so the figure is per core."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exposures", type=int, default=5, help="timed exposures")
    parser.add_argument("--stars", type=int, default=5000, help="catalog stars per field")
    args = parser.parse_args(argv)
    _one_core()

    from lakepipe.archives.sim import SimArchive

    archive = SimArchive.from_config(seed=7, n_stars=args.stars, n_fields=4)
    ids = archive.exposures().column("exposure_id").to_pylist()
    sim = archive.sim
    # warm up: catalog, schedule, imports, first render
    sim.image(ids[0])

    # baseline: one full frame of float32 standard normals and a frame copy
    rng = np.random.default_rng(1)
    shape = (3080, 3072)
    rng.standard_normal(shape, dtype=np.float32)
    t0 = time.perf_counter()
    for _ in range(3):
        z = rng.standard_normal(shape, dtype=np.float32)
    t_normal = (time.perf_counter() - t0) / 3
    t0 = time.perf_counter()
    for _ in range(3):
        z.copy()
    t_copy = (time.perf_counter() - t0) / 3
    del z

    timed = ids[1 : 1 + args.exposures]
    n_stars, times, peaks = [], [], []
    for eid in timed:
        tracemalloc.start()
        t0 = time.perf_counter()
        img, scene = sim.image(eid)
        times.append(time.perf_counter() - t0)
        peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
        tracemalloc.stop()
        n_stars.append(
            int(np.isin(np.asarray(scene.truth.column("kind")), ["star", "variable"]).sum())
        )
        del img, scene

    t0 = time.perf_counter()
    blob = archive.image_fits(timed[0])
    t_fits = time.perf_counter() - t0
    header, _ = archive.image(timed[0])
    ra, dec = header["CRVAL1"], header["CRVAL2"]
    t0 = time.perf_counter()
    for _ in range(100):
        archive.cutout(timed[0], ra, dec, 60.0)
    t_cut = (time.perf_counter() - t0) / 100

    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    s_per = float(np.median(times))
    out = {
        "s_per_exposure_median": s_per,
        "s_per_exposure_max": float(np.max(times)),
        "stars_per_exposure": float(np.mean(n_stars)),
        "peak_mib_traced": float(np.max(peaks)),
        "max_rss_mib_process": rss_mib,
        "baseline_normal_frame_s": t_normal,
        "baseline_copy_frame_s": t_copy,
        "ratio_vs_normal_frame": s_per / t_normal,
        "ratio_vs_copy_frame": s_per / t_copy,
        "fits_bytes_s": t_fits,
        "fits_mib": len(blob) / 2**20,
        "cached_cutout_ms": t_cut * 1e3,
    }
    print(f"exposures timed        : {len(timed)} (3072x3080, one core)")
    print(f"stars per exposure     : {out['stars_per_exposure']:.0f}")
    print(
        f"render s/exposure      : median {s_per:.3f}, max {out['s_per_exposure_max']:.3f}"
        "  (target <= 1.0)"
    )
    print(
        f"peak memory per render : {out['peak_mib_traced']:.0f} MiB traced (target <= 500); "
        f"process max RSS {rss_mib:.0f} MiB"
    )
    print(
        f"baseline normal frame  : {t_normal:.3f} s -> render = {out['ratio_vs_normal_frame']:.2f}x"
    )
    print(f"baseline frame copy    : {t_copy:.4f} s -> render = {out['ratio_vs_copy_frame']:.0f}x")
    print(f"FITS serialisation     : {t_fits:.3f} s for {out['fits_mib']:.1f} MiB")
    print(f"cutout from cache      : {out['cached_cutout_ms']:.2f} ms")
    return out


if __name__ == "__main__":
    main()
