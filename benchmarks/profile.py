"""Profile one of sitq's workloads with cProfile, to see where its time goes.

    python -m benchmarks.profile W1 [-n 5000] [--top 25] [--sort tottime]
    python -m benchmarks.profile W3 [-n 500]

W1 is ``enqueue`` one by one, W3 the in-process round trip, W5 ``map``: the same adapter
functions the benchmark suite runs, on a fresh database in a temporary folder. cProfile
slows Python code down several times, and C code (SQLite) not at all, so read the
output for *where* the time goes, not how much there is; callgrind
(``valgrind --tool=callgrind python -m benchmarks.profile W1 --no-profile``) counts
instructions instead, repeatably even on a busy machine.
"""

import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path

from benchmarks import sitq_system

RUNS = {
    "W1": lambda db, n: sitq_system.enqueue(db, n),
    "W3": lambda db, n: sitq_system.round_trip(db, n, cross_process=False),
    "W5": lambda db, n: sitq_system.bulk(db, n),
}


def main(argv=None):
    """Run the workload under cProfile and print the top functions."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n")[0])
    p.add_argument("workload", choices=sorted(RUNS))
    p.add_argument("-n", type=int, default=5000, help="tasks (W3: round trips)")
    p.add_argument("--top", type=int, default=25, help="functions to print")
    p.add_argument("--sort", default="tottime", choices=["tottime", "cumulative", "ncalls"])
    p.add_argument("--no-profile", action="store_true", help="run without cProfile (for callgrind or perf)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sitq-profile-") as tmp:
        db = str(Path(tmp) / "bench.db")
        if args.no_profile:
            print(RUNS[args.workload](db, args.n))
            return
        profiler = cProfile.Profile()
        figures = profiler.runcall(RUNS[args.workload], db, args.n)
    print(figures)
    pstats.Stats(profiler).strip_dirs().sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
