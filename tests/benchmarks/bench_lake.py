"""Lake write and query overhead against raw pyarrow / raw DuckDB on the same data.

Writes a 10-million-row sources-like table in 100 night partitions through the lake
(the runner's write path: contract check, HEALPix sort, zstd Parquet, atomic commit)
and through raw ``pyarrow.dataset.write_dataset``; then times three queries through
lakepipe's query layer and through raw DuckDB ``read_parquet`` on the same files.
Run: ``python -m tests.benchmarks.bench_lake [--rows 10000000] [--partitions 100]``.
Targets (issue 2): write ≥ 0.5× raw; query overhead ≤ 1.2×; peak write memory < 2 GiB.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

HERE = Path(__file__).parent


def make_partition(i: int, rows: int) -> pa.Table:
    """Deterministic sources-like rows for night i (ra/dec in a 10-degree patch)."""
    from lakepipe.astro.healpix import healpix_index

    rng = np.random.default_rng(i)
    ra = rng.uniform(150, 160, rows)
    dec = rng.uniform(0, 10, rows)
    flux = rng.lognormal(6, 1.5, rows)
    return pa.table(
        {
            "source_id": np.arange(rows, dtype=np.int64) + i * 10_000_000,
            "exposure_id": rng.integers(0, 100_000, rows, dtype=np.int64),
            "ra": ra,
            "dec": dec,
            "flux": flux,
            "flux_err": np.sqrt(flux + 100.0),
            "mag": 26 - 2.5 * np.log10(flux),
            "mag_err": 1.0857 * np.sqrt(flux + 100.0) / flux,
            "x": rng.uniform(0, 3072, rows),
            "y": rng.uniform(0, 3080, rows),
            "fwhm_pix": rng.normal(2.0, 0.2, rows),
            "snr": flux / np.sqrt(flux + 100.0),
            "flags": rng.integers(0, 4, rows, dtype=np.int32),
            "_healpix_29": healpix_index(ra, dec),
        }
    )


def night(i: int) -> str:
    return f"2025-{1 + i // 28:02d}-{1 + i % 28:02d}"


def write_lake(root: str, partitions: int, rows: int, q: multiprocessing.Queue) -> None:
    """Through the lake's write path (what the runner's workers do), one core."""
    from lakepipe.lake import Commit, Lake, PartitionEntry
    from lakepipe.runner import prepare_table
    from lakepipe.tables import register_contract

    contract = register_contract(HERE / "bench_sources_like.yaml")
    lake = Lake(root)
    # warm up outside the clock: the first contract look-up imports every stage module
    # (plug-in registration), which is start-up cost, not write throughput
    warm = prepare_table("bench", contract.name, make_partition(10**6, 1000), "night=warm-up")
    lake.write_partition(contract, "night=warm-up", warm, "f" * 64)
    t_gen = 0.0
    t0 = time.perf_counter()
    commits = []
    for i in range(partitions):
        g = time.perf_counter()
        table = make_partition(i, rows)
        t_gen += time.perf_counter() - g
        key = f"night={night(i)}"
        table = prepare_table("bench", contract.name, table, key)
        fp = f"{i:064x}"
        files, n = lake.write_partition(contract, key, table, fp)
        entry = PartitionEntry(files, n, fp, "bench", "bench:1", "p", "i", "run")
        commits.append(Commit("bench", key, {contract.name: entry}))
        if len(commits) >= 10:
            lake.commit(commits)
            commits = []
    lake.commit(commits)
    total = time.perf_counter() - t0
    q.put((total, t_gen, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def write_raw(root: str, partitions: int, rows: int, q: multiprocessing.Queue) -> None:
    """Raw pyarrow.dataset.write_dataset with the same partitioning and compression."""
    fmt = ds.ParquetFileFormat()
    opts = fmt.make_write_options(compression="zstd")
    warm = make_partition(10**6, 1000).append_column("night", pa.array(["warm-up"] * 1000))
    ds.write_dataset(
        warm, root + "-warm-up", format=fmt, file_options=opts
    )  # same warm-up as the lake
    t_gen = 0.0
    t0 = time.perf_counter()
    for i in range(partitions):
        g = time.perf_counter()
        table = make_partition(i, rows)
        t_gen += time.perf_counter() - g
        table = table.append_column("night", pa.array([night(i)] * table.num_rows))
        ds.write_dataset(
            table,
            root,
            format=fmt,
            file_options=opts,
            partitioning=ds.partitioning(pa.schema([("night", pa.string())]), flavor="hive"),
            existing_data_behavior="overwrite_or_ignore",
            basename_template=f"part-{i}-{{i}}.parquet",
        )
    total = time.perf_counter() - t0
    q.put((total, t_gen, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def in_child(fn, *args) -> tuple[float, float, float]:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def best_of(fn, n: int = 5) -> float:
    fn()  # warm-up (page cache, DuckDB metadata cache)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--partitions", type=int, default=100)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    per = args.rows // args.partitions
    work = Path(tempfile.mkdtemp(prefix="bench_lake_"))
    lake_root, raw_root = work / "lake", work / "raw"
    print(f"{args.partitions} partitions x {per} rows = {args.partitions * per:,} rows in {work}")

    # alternate the order once so neither side always runs on a cold machine
    raw_t, raw_gen, raw_rss = in_child(write_raw, str(raw_root), args.partitions, per)
    lake_t, lake_gen, lake_rss = in_child(write_lake, str(lake_root), args.partitions, per)
    raw_net, lake_net = raw_t - raw_gen, lake_t - lake_gen
    print(
        f"write  raw pyarrow.dataset: {raw_t:6.2f} s ({raw_net:.2f} s excl. data generation), "
        f"peak RSS {raw_rss:.0f} MiB"
    )
    print(
        f"write  lakepipe lake:       {lake_t:6.2f} s ({lake_net:.2f} s excl. data generation), "
        f"peak RSS {lake_rss:.0f} MiB"
    )
    print(
        f"write throughput ratio lake/raw: {raw_t / lake_t:.2f} (incl. generation), "
        f"{raw_net / lake_net:.2f} (write only)  [target >= 0.5; peak < 2048 MiB]"
    )

    from lakepipe.lake import Lake
    from lakepipe.sql import LakeSQL, arrow_query
    from lakepipe.tables import contracts, register_contract

    register_contract(HERE / "bench_sources_like.yaml")
    contracts()  # import the stage plug-ins before timing the query layer's set-up
    lake = Lake(lake_root)
    rng = np.random.default_rng(0)
    exposures = pa.table(
        {
            "exposure_id": np.arange(100_000, dtype=np.int64),
            "mjd": 60676 + rng.uniform(0, 100, 100_000),
            "filter": rng.choice(["zg", "zr", "zi"], 100_000),
        }
    )
    exp_path = lake_root / "_bench_exposures.parquet"
    pq.write_table(exposures, exp_path)
    files = [str(lake.fs.abspath(f)) for f in lake.manifest().files("bench_sources")]
    one = night(42)
    queries = {
        "count by filter": "select count(*) from {t} where mag < 20 and snr > 10",
        "one partition": f"select count(*), round(avg(mag), 9) from {{t}} where night = '{one}'",
        "join 100k exposures": (
            "select e.filter, count(*), round(avg(s.mag), 9) from {t} s join "
            f"read_parquet('{exp_path}') e using (exposure_id) group by 1"
        ),
    }
    raw_src = f"read_parquet({files!r}, hive_partitioning=true, hive_types={{'night': VARCHAR}})"
    con = duckdb.connect()
    ratios = []
    t = time.perf_counter()
    LakeSQL(lake).query("select 1")
    print(
        f"query layer set-up (views over the manifest, sandbox): "
        f"{(time.perf_counter() - t) * 1e3:.1f} ms once per connection"
    )
    for name, q in queries.items():
        sql_lake = LakeSQL(lake)
        t_lake = best_of(lambda q=q, s=sql_lake: s.query(q.format(t="bench_sources")))
        # both sides return an Arrow table, the form LakeSQL.query hands to callers
        t_raw = best_of(lambda q=q: arrow_query(con, q.format(t=raw_src)))
        a = LakeSQL(lake).query(q.format(t="bench_sources")).to_pylist()
        b = con.sql(q.format(t=raw_src)).fetchall()
        assert sorted(map(str, [tuple(r.values()) for r in a])) == sorted(map(str, b)), name
        ratios.append(t_lake / t_raw)
        print(
            f"query  {name:<20} lakepipe {t_lake * 1e3:8.1f} ms   raw DuckDB "
            f"{t_raw * 1e3:8.1f} ms   ratio {t_lake / t_raw:.2f}"
        )
    print(
        f"query overhead: median ratio {statistics.median(ratios):.2f}, worst "
        f"{max(ratios):.2f}  [target <= 1.2]"
    )
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
