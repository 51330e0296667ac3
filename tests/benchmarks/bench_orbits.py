"""Benchmark: orbit propagation for ephemeris tubes and the 100-observation fit (issue 6 item 11).

Propagates 2,000 replicas of a near-Earth orbit (passing 0.023 au from Earth) to 50
epochs over 30 days under the Sun plus four DE421 perturbers (earth, mars, jupiter,
saturn) with :func:`lakepipe.astro.nbody.propagate`, and the same cloud with REBOUND's
IAS15 as the in-run baseline (same DE421 planets, added as REBOUND additional forces).
Reports seconds (best of ``--repeat``), peak traced memory, the speed ratio against
IAS15, and the largest position difference of any replica at any epoch in km. The IAS15
baseline evaluates the DE421 planets in a Python callback (as any DE421-driven REBOUND
run must); a second, speed-only IAS15 run keeps everything in C with the planets as
active particles started from DE421.
Targets: <= 1 s, at least as fast as IAS15, and within 1 km of it for every replica.
Also reports the full topocentric ephemeris (propagation + light time + I41 geometry).

Then the fit part: ``--observations`` (default 100; 0 skips it) observations fitted by
:func:`lakepipe.astro.orbit_fit.fit_orbit`, run by
:func:`tests.benchmarks.bench_orbit_fit.main` (target <= 5 s; its covariance calibration
runs with ``--fit-trials N``). ``bench_orbit_fit`` alone runs the same fit.

Run: ``python -m tests.benchmarks.bench_orbits [--replicas N] [--epochs T] [--days D]
[--observations N] [--fit-trials N]``.
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc

import numpy as np

AU_KM = 149597870.7


def _one_core() -> None:
    """Pin to one CPU and single-threaded BLAS so the figures are per core."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def _best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def ias15_all_in_c(
    states: np.ndarray, epoch_jd_tdb: float, targets_jd_tdb: np.ndarray, perturbers: tuple
) -> np.ndarray:
    """Speed-only baseline: IAS15 entirely in C, the Sun and perturbers as active REBOUND
    particles started from their DE421 states (they then follow REBOUND's own N-body
    motion rather than DE421, so positions differ at the km level for Earth without the
    Moon). Returns heliocentric states ``(N, T, 6)``."""
    import rebound

    from lakepipe.astro import ephem

    st = np.atleast_2d(states)
    sim = rebound.Simulation()
    sim.G = 1.0
    sim.integrator = "ias15"
    sim.add(m=ephem.gm_au3_d2("sun"))
    for body in perturbers:
        p, v = ephem.heliocentric_state(body, epoch_jd_tdb)
        sim.add(m=ephem.gm_au3_d2(body), x=p[0], y=p[1], z=p[2], vx=v[0], vy=v[1], vz=v[2])
    n_active = 1 + len(perturbers)
    for s in st:
        sim.add(m=0.0, x=s[0], y=s[1], z=s[2], vx=s[3], vy=s[4], vz=s[5])
    sim.N_active = n_active
    sim.testparticle_type = 0
    targets = np.asarray(targets_jd_tdb, dtype=np.float64)
    out = np.empty((st.shape[0], targets.size, 6))
    xyz = np.empty((sim.N, 3))
    vel = np.empty((sim.N, 3))
    for k in np.argsort(targets):
        sim.integrate(targets[k] - epoch_jd_tdb, exact_finish_time=1)
        sim.serialize_particle_data(xyz=xyz, vxvyvz=vel)
        out[:, k, :3] = xyz[n_active:] - xyz[0]
        out[:, k, 3:] = vel[n_active:] - vel[0]
    return out


def bench_propagation(replicas: int, epochs: int, days: float, repeat: int) -> dict[str, float]:
    """Time and compare the propagation of a replica cloud; returns the figures."""
    from lakepipe.astro import nbody, observe
    from tests.astro.test_nbody import EPOCH, ias15_propagate, replica_cloud

    cloud = replica_cloud(replicas, seed=1)
    targets = EPOCH + np.linspace(0.0, days, epochs)
    perturbers = ("earth", "mars", "jupiter", "saturn")

    # warm up: DE421 coefficient loading, imports, first integration
    nbody.propagate(cloud[:8], EPOCH, targets, perturbers)
    t_ours, ours = _best_of(lambda: nbody.propagate(cloud, EPOCH, targets, perturbers), repeat)

    tracemalloc.start()
    nbody.propagate(cloud, EPOCH, targets, perturbers)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    figures = {
        "replicas": replicas,
        "epochs": epochs,
        "days": days,
        "propagate_s": t_ours,
        "propagate_peak_mib": peak / 2**20,
        "output_mib": ours.nbytes / 2**20,
    }
    try:
        import rebound  # noqa: F401  (test-only dependency; the baseline needs it)
    except ImportError:
        print("REBOUND not installed: no IAS15 baseline (pip install rebound)")
    else:
        ias15_propagate(cloud[:8], EPOCH, targets[:3], perturbers)  # warm up
        t0 = time.perf_counter()
        ref = ias15_propagate(cloud, EPOCH, targets, perturbers)
        t_ias15 = time.perf_counter() - t0
        diff_km = np.linalg.norm(ours[..., :3] - ref[..., :3], axis=-1) * AU_KM
        t0 = time.perf_counter()
        ref_c = ias15_all_in_c(cloud, EPOCH, targets, perturbers)
        t_c = time.perf_counter() - t0
        figures |= {
            "ias15_c_s": t_c,
            "ias15_c_max_diff_km": float(
                (np.linalg.norm(ours[..., :3] - ref_c[..., :3], axis=-1) * AU_KM).max()
            ),
        }
        figures |= {
            "ias15_s": t_ias15,
            "speedup_vs_ias15": t_ias15 / t_ours,
            "max_diff_km": float(diff_km.max()),
            "median_diff_km": float(np.median(diff_km)),
        }

    mjd = targets - 2400000.5
    observe.ephemeris(cloud[:8], EPOCH, mjd[:2], obs_code="I41")  # warm up astropy/IERS
    t_eph, _ = _best_of(
        lambda: observe.ephemeris(cloud, EPOCH, mjd, obs_code="I41", perturbers=perturbers),
        repeat,
    )
    figures["ephemeris_I41_s"] = t_eph
    return figures


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--observations", type=int, default=100, help="observations to fit (0: skip the fit)"
    )
    parser.add_argument("--fit-trials", type=int, default=0, help="fit calibration trials")
    args = parser.parse_args(argv)
    _one_core()
    fig = bench_propagation(args.replicas, args.epochs, args.days, args.repeat)
    print(
        f"propagation: {fig['replicas']} replicas x {fig['epochs']} epochs over "
        f"{fig['days']:g} d, 4 perturbers"
    )
    print(f"  lakepipe nbody (DOP853)   {fig['propagate_s']:8.3f} s   (target <= 1 s)")
    print(
        f"  peak traced memory        {fig['propagate_peak_mib']:8.1f} MiB "
        f"(output array {fig['output_mib']:.1f} MiB)"
    )
    if "ias15_s" in fig:
        print(f"  REBOUND IAS15 baseline    {fig['ias15_s']:8.3f} s")
        print(f"  speed ratio IAS15/ours    {fig['speedup_vs_ias15']:8.1f} x   (target >= 1)")
        print(f"  max |ours - IAS15|        {fig['max_diff_km'] * 1e3:8.2f} m   (target <= 1 km)")
        print(f"  median |ours - IAS15|     {fig['median_diff_km'] * 1e3:8.2f} m")
        print(
            f"  IAS15 all-C, planets as particles {fig['ias15_c_s']:.3f} s "
            f"(ratio {fig['ias15_c_s'] / fig['propagate_s']:.1f} x; planets drift from DE421: "
            f"max diff {fig['ias15_c_max_diff_km']:.1f} km)"
        )
    print(
        f"  full I41 ephemeris        {fig['ephemeris_I41_s']:8.3f} s   (propagation + light time)"
    )
    if args.observations > 0:
        from tests.benchmarks import bench_orbit_fit

        fit_argv = ["--observations", str(args.observations), "--repeat", str(args.repeat)]
        fit = bench_orbit_fit.main([*fit_argv, "--trials", str(args.fit_trials)])
        fig |= {f"fit_{k}" if not k.startswith("fit") else k: v for k, v in fit.items()}
    return fig


if __name__ == "__main__":
    main()
