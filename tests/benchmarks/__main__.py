"""Run every benchmark in turn: ``python -m tests.benchmarks [NAME ...]``.

Each ``bench_*.py`` runs in its own process (a fresh interpreter, so one benchmark's
memory and warm caches do not colour the next) and prints its figures as ratios against
a baseline measured in the same run. Names may be given without the ``bench_`` prefix:
``python -m tests.benchmarks lake sources``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def main(argv: list[str]) -> int:
    available = sorted(p.stem for p in HERE.glob("bench_*.py"))
    wanted = [n if n.startswith("bench_") else f"bench_{n}" for n in argv] or available
    unknown = [n for n in wanted if n not in available]
    if unknown:
        print(
            f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}",
            file=sys.stderr,
        )
        return 2
    failed = []
    for name in wanted:
        print(f"=== {name}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", f"tests.benchmarks.{name}"])
        print(f"=== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s\n", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
