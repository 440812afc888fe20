"""Profile one of sitq's workloads with cProfile, to see where its time goes.

    python -m benchmarks.profile W1 [-n 5000] [--top 25] [--sort tottime]
    python -m benchmarks.profile W3 [-n 500]
    python -m benchmarks.profile inserts [-n 5000]
    python -m benchmarks.profile steps [-n 2000]

W1 is ``enqueue`` one by one, W3 the in-process round trip, W5 ``map``: the same adapter
functions the benchmark suite runs, on a fresh database in a temporary folder. cProfile
slows Python code down several times, and C code (SQLite) not at all, so read the
output for *where* the time goes, not how much there is; callgrind
(``valgrind --tool=callgrind python -m benchmarks.profile W1 --no-profile``) counts
instructions instead, repeatably even on a busy machine. ``steps`` times the steps of the
in-process round trip one by one (no profiler), next to the floor's whole round trip.
"""

import argparse
import cProfile
import os
import pstats
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import cloudpickle

from benchmarks import sitq_system
from benchmarks.floor import INSERT, SCHEMA
from benchmarks.tasks import f

RUNS = {
    "W1": lambda db, n: sitq_system.enqueue(db, n),
    "W3": lambda db, n: sitq_system.round_trip(db, n, cross_process=False),
    "W5": lambda db, n: sitq_system.bulk(db, n),
}


def inserts(folder, n, repeat=3):
    """The INSERT statement alone, timed call by call: the floor's, sitq's, and sitq's without the
    index of tasks of no group and then without the claim index too, each on a fresh file, the
    median of ``repeat`` medians (microseconds)."""
    from sitq.backends.sqlite import statements
    from sitq.backends.sqlite.schema import open_file

    func, args = cloudpickle.dumps(f), cloudpickle.dumps(((1,), {}))
    payload = cloudpickle.dumps((f, (1,)))

    def timed(conn, sql, params):
        samples = []
        for _ in range(n):
            p = params()
            t = time.perf_counter()
            conn.execute(sql, p)
            samples.append(time.perf_counter() - t)
        conn.close()
        return statistics.median(samples) * 1e6

    def sitq_params():
        now = time.time()
        return (f"{int(now * 1000):012x}{os.urandom(10).hex()}", "f", func, args, None, 1, now, now, "default", 0,
                None, None)

    variants = {"sitq": (), "sitq without sitq_loose": ("sitq_loose",),
                "sitq without sitq_loose and sitq_ready": ("sitq_loose", "sitq_ready")}
    figures: dict[str, list[float]] = {"floor": [], **{label: [] for label in variants}}
    for r in range(repeat):
        conn = sqlite3.connect(Path(folder) / f"floor{r}.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        figures["floor"].append(timed(conn, INSERT, lambda: (payload,)))
        for label, drop in variants.items():
            conn = open_file(str(Path(folder) / f"{label}{r}.db".replace(" ", "-")), read_only=False)
            for index in drop:
                conn.execute(f"DROP INDEX {index}")
            figures[label].append(timed(conn, statements.INSERT_TASK, sitq_params))
    return {label: round(statistics.median(values), 1) for label, values in figures.items()}


def steps(folder, n):
    """W3 step by step: the median time between consecutive marks of one round trip (µs), over
    the ``n`` round trips that passed the marks in the usual order, and the floor's round trip
    p50 in the same run. The marks wrap sitq's internals, each costing well under a microsecond."""
    import asyncio

    from benchmarks import floor
    from sitq import SQLiteBackend, TaskQueue, Worker
    from sitq.backends.sqlite import statements
    from sitq.worker import runners

    marks: list[tuple[float, str]] = []
    clock = time.perf_counter
    undo = []

    def mark(owner, name, label):
        original = getattr(owner, name)

        def marked(*args, **kwargs):
            marks.append((clock(), label))
            try:
                return original(*args, **kwargs)
            finally:
                marks.append((clock(), label + " done"))
        setattr(owner, name, marked)
        undo.append((owner, name, original))

    for owner, name, label in ((statements, "insert", "INSERT"), (statements, "fetch_result", "read"),
                               (statements, "finish_and_claim", "store or claim"),
                               (runners.Runner, "launch", "unpickle"), (runners.Recorder, "call_sync", "call"),
                               (runners.Runner, "_settle_all", "settle")):
        mark(owner, name, label)

    async def main():
        backend = SQLiteBackend(str(Path(folder) / "steps.db"))
        async with TaskQueue(backend=backend) as queue:
            worker = Worker(backend)
            running = asyncio.create_task(worker.start())
            for i in range(50):  # warm up
                await queue.get_result(await queue.enqueue(f, i), timeout=60)
            rounds = []
            for i in range(n):
                marks.clear()
                marks.append((clock(), "enqueue"))
                result = await queue.get_result(await queue.enqueue(f, i), timeout=60)
                marks.append((clock(), "value"))
                assert queue.deserialize_result(result) == i
                rounds.append(list(marks))
            await worker.stop()
            await running
        return rounds

    try:
        rounds = asyncio.run(main())
    finally:
        for owner, name, original in undo:
            setattr(owner, name, original)
    orders: dict[tuple[str, ...], list[list[tuple[float, str]]]] = {}
    for marked in rounds:
        orders.setdefault(tuple(label for _, label in marked), []).append(marked)
    order, usual = max(orders.items(), key=lambda item: len(item[1]))
    print(f"{len(usual)} of {n} round trips in the usual order; "
          f"sitq p50 {statistics.median(r[-1][0] - r[0][0] for r in usual) * 1e3:.3f} ms, "
          f"floor p50 {floor.round_trip(str(Path(folder) / 'floor.db'), n, False)['p50_ms']:.3f} ms")
    for i in range(1, len(order)):
        step = statistics.median(r[i][0] - r[i - 1][0] for r in usual) * 1e6
        print(f"  {order[i - 1]:>20} -> {order[i]:<20} {step:7.1f} µs")


def main(argv=None):
    """Run the workload under cProfile and print the top functions."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.split("\n")[0])
    p.add_argument("workload", choices=[*sorted(RUNS), "inserts", "steps"],
                   help="a workload; 'inserts': the INSERT statement alone, floor against sitq (µs, median); "
                        "'steps': the in-process round trip step by step (µs, median)")
    p.add_argument("-n", type=int, default=5000, help="tasks (W3: round trips)")
    p.add_argument("--top", type=int, default=25, help="functions to print")
    p.add_argument("--sort", default="tottime", choices=["tottime", "cumulative", "ncalls"])
    p.add_argument("--no-profile", action="store_true", help="run without cProfile (for callgrind or perf)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sitq-profile-") as tmp:
        db = str(Path(tmp) / "bench.db")
        if args.workload == "inserts":
            print(inserts(tmp, args.n))
            return
        if args.workload == "steps":
            steps(tmp, args.n)
            return
        if args.no_profile:
            print(RUNS[args.workload](db, args.n))
            return
        profiler = cProfile.Profile()
        figures = profiler.runcall(RUNS[args.workload], db, args.n)
    print(figures)
    pstats.Stats(profiler).strip_dirs().sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    main()
