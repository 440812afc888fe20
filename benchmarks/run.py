"""Run every workload on every system, side by side, and print one table.

    python -m benchmarks.run [--quick] [--repeat 3] [--systems sitq,floor,huey]
        [--workloads W1,W2,W3,W4,W5,S,F,R] [--old-rows 1000000] [--big-store 1000000]
        [--markdown docs/performance.md] [--plot docs/performance.png] [--json out.json]

Every (system, workload, repeat) cell runs in its own ``python -m benchmarks.cell`` process
on its own fresh database file; repeats are interleaved so that a noisy moment hits every
system alike. The table shows the median of the repeats with the min-max range, and
sitq's median divided by the floor's and by huey's from this same run, next to the targets
from the issue. The S rows (sitq only) measure how long sitq blocks the caller's event loop:
a ticker on the same loop records its longest delay while a workload runs; S0 is the
ticker alone, the machine's own noise in the same run. With ``--old-rows N`` the W2 and W3 cells
run again on a copy of a database already holding N finished tasks, and report the worker's peak RSS;
``--big-store N`` sets how many finished tasks the store read by S3-S5 holds (1,000,000 by default).
The F rows (sitq only) check that batching costs no fairness: two worker processes get slow tasks
right after many tiny ones (F1) or alone (F0, the reference); the R row runs 1,000,000 tasks
through a worker with retention on and reports whether throughput and the file size stay flat.
"""

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.common import splice

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("sitq", "floor", "huey")
WORKLOADS = [  # group, row label, adapter function, keyword arguments, metrics shown
    ("W1", "W1 enqueue", "enqueue", {}, ("tasks_s", "p50_us", "p99_us")),
    ("W2", "W2 drain c=1", "drain", {"concurrency": 1}, ("tasks_s",)),
    ("W2", "W2 drain c=8", "drain", {"concurrency": 8}, ("tasks_s",)),
    ("W3", "W3 round trip in-process", "round_trip", {"cross_process": False}, ("p50_ms", "p95_ms", "p99_ms")),
    ("W3", "W3 round trip cross-process", "round_trip", {"cross_process": True}, ("p50_ms", "p95_ms", "p99_ms")),
    ("W4", "W4 mixed 8 producers", "mixed", {"producers": 8}, ("wall_s",)),
    ("W5", "W5 bulk", "bulk", {}, ("tasks_s",)),
    ("S", "S0 idle loop (noise)", "stall_idle", {}, ("stall_ms",)),
    ("S", "S1 map", "stall_map", {}, ("stall_ms", "tasks_s")),
    ("S", "S2 drain c=1", "stall_drain", {"concurrency": 1}, ("stall_ms", "tasks_s")),
    ("S", "S2 drain c=8", "stall_drain", {"concurrency": 8}, ("stall_ms", "tasks_s")),
    ("S", "S3 overview", "stall_overview", {}, ("stall_ms", "call_ms")),
    ("S", "S4 statuses", "stall_statuses", {}, ("stall_ms", "call_ms")),
    ("S", "S5 notebook refresh", "stall_refresh", {}, ("stall_ms", "call_ms")),
    ("F", "F0 100 × 50 ms, 2 workers", "fairness", {"tiny": 0}, ("first_s", "total_s")),
    ("F", "F1 the same after 200 no-ops", "fairness", {"tiny": 200}, ("first_s", "total_s")),
    ("R", "R1 retention 1 s", "retention", {}, ("tasks_s", "first_tasks_s", "last_tasks_s", "max_mb", "final_mb")),
]
SITQ_ONLY = ("fairness", "retention")  # workloads that measure a property of sitq, not a race
STALLS_ON_BIG_STORE = ("stall_overview", "stall_statuses", "stall_refresh")  # read a prefilled store
SIZES = {  # tasks per cell (W3: round trips, W4: tasks per producer, S0: ms, S3/S5: calls, S4: ids)
    "full": {"enqueue": 5000, "drain": 5000, "round_trip": 200, "mixed": 500, "bulk": 10000,
             "stall_idle": 1000, "stall_map": 100_000, "stall_drain": 20_000, "stall_overview": 5,
             "stall_statuses": 10_000, "stall_refresh": 5, "big_store": 1_000_000,
             "fairness": 100, "retention": 1_000_000},
    "quick": {"enqueue": 200, "drain": 200, "round_trip": 20, "mixed": 25, "bulk": 200,
              "stall_idle": 100, "stall_map": 2000, "stall_drain": 500, "stall_overview": 2,
              "stall_statuses": 200, "stall_refresh": 2, "big_store": 2000,
              "fairness": 20, "retention": 2000},
}
UNITS = {"tasks_s": "tasks/s ↑", "p50_us": "p50 µs ↓", "p99_us": "p99 µs ↓", "p50_ms": "p50 ms ↓",
         "p95_ms": "p95 ms ↓", "p99_ms": "p99 ms ↓", "wall_s": "wall s ↓", "rss_mb": "peak RSS MB ↓",
         "stall_ms": "longest stall ms ↓", "call_ms": "ms per call ↓", "first_s": "first value s ↓",
         "total_s": "last value s ↓", "first_tasks_s": "tasks/s, first tenth ↑",
         "last_tasks_s": "tasks/s, last tenth ↑",
         "max_mb": "largest store MB ↓", "final_mb": "final store MB ↓"}
TARGETS = {  # (row label, metric): [(reference, op, bound)]; reference None means an absolute bound
    # (the performance issues' targets: round one for W2 and W4, round two for W1, W3, W5 and the views)
    ("W1 enqueue", "tasks_s"): [("floor", ">=", 0.9), ("huey", ">=", 4)],
    ("W1 enqueue", "p99_us"): [("floor", "<=", 1.5)],
    ("W2 drain c=1", "tasks_s"): [("floor", ">=", 0.5), ("huey", ">=", 5)],
    ("W2 drain c=8", "tasks_s"): [("floor", ">=", 0.5), ("huey", ">=", 5)],
    ("W3 round trip in-process", "p50_ms"): [("floor", "<=", 1.5)],
    ("W3 round trip cross-process", "p50_ms"): [("floor", "<=", 1.1)],
    ("W4 mixed 8 producers", "wall_s"): [("floor", "<=", 1.5)],
    ("W5 bulk", "tasks_s"): [("floor", ">=", 1.0), (None, ">=", 100_000)],
    ("S3 overview", "call_ms"): [(None, "<=", 5)],
    **{(label, "stall_ms"): [(None, "<=", 20)] for _, label, fn, _, _ in WORKLOADS if fn.startswith("stall_")
       and fn != "stall_idle"},
    # references to another row or another metric of the same row, in this same run:
    ("F1 the same after 200 no-ops", "first_s"): [("row F0 100 × 50 ms, 2 workers", "<=", 1.2)],
    ("F1 the same after 200 no-ops", "total_s"): [("row F0 100 × 50 ms, 2 workers", "<=", 1.2)],
    ("R1 retention 1 s", "last_tasks_s"): [("metric first_tasks_s", ">=", 0.8)],
}
NOTES = """Settings: sitq uses its defaults (WAL, `synchronous=NORMAL`, the worker runs the plain
function `f` in its threads; queue and worker share one backend in-process). The floor matches
sitq's durability (WAL, `synchronous=NORMAL`). huey uses `SqliteHuey` defaults (WAL, SQLite's
default `synchronous=FULL`, so every commit waits for fsync) with consumer and `Result.get`
polling tuned to 1 ms, the interval the floor polls other processes at. Drains use huey's
`Consumer` with threads in the benchmark process; the cross-process round trip runs
`huey_consumer`. W4 producers are 8 threads for the floor and huey and 8 coroutines on one
event loop for sitq; each W3 cell makes 5 untimed round trips first.

S rows, sitq only: a ticker task wakes every 1 ms on the event loop sitq runs on and records
the longest delay beyond that (`benchmarks/common.py`, `StallTicker`), while S1 maps {stall_map:,}
calls, S2 drains {stall_drain:,} tasks, S3 calls `overview()` and S4 `statuses()` of {stall_statuses:,}
ids on a store holding {big_store:,} finished tasks, and S5 refreshes the notebook's live views
(a board of 20 and 20 task views, `sitq/notebook/refresher.py`) on that store. S0 is the ticker
alone: what the machine's other work (other processes, the scheduler) costs the loop in the same
run, so a stall near S0 is noise, not sitq."""
OLD_TARGETS = {"tasks_s": [("no old rows", ">=", 0.8)], "p50_ms": [("no old rows", "<=", 1.25)],
               "rss_mb": [(None, "<=", 150)]}


def parse(argv):
    """Read the command line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and one repeat (CI smoke mode)")
    p.add_argument("--repeat", type=int, help="processes per cell (default 3, or 1 with --quick)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--workloads", default="W1,W2,W3,W4,W5,S,F,R")
    p.add_argument("--old-rows", type=int, default=0, help="also run W2 and W3 with N finished tasks present")
    p.add_argument("--big-store", type=int, help="finished tasks in the store S3-S5 read (default 1,000,000)")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {','.join(SYSTEMS)}")
    return args


def rows_for(args):
    """The table's rows: (label, function, kwargs, metrics, old rows), old-row variants last."""
    groups = set(args.workloads.split(","))
    rows = [(label, fn, kw, metrics, 0) for group, label, fn, kw, metrics in WORKLOADS if group in groups]
    if args.old_rows:
        rows += [(f"{label} +{args.old_rows:,} old", fn, kw, metrics[:1] + ("rss_mb",), args.old_rows)
                 for label, fn, kw, metrics, _ in list(rows) if fn in ("drain", "round_trip")]
    return rows


def cell(spec, timeout, module="benchmarks.cell"):
    """Run one cell (``python -m module SPEC``) in a fresh process group and return its figures;
    raise with its stderr if it fails.

    The cell and any worker process it started are killed when it returns or outlives `timeout` seconds.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-m", module, json.dumps(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = "", f"timed out after {timeout} s"
    finally:
        with contextlib.suppress(ProcessLookupError):  # a worker the cell started and left behind
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.wait() or not out:
        raise RuntimeError(err.strip()[-2000:] or f"exit status {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def fresh_db(tmp, name, template=None):
    """A new database path in `tmp`, copied from `template` (and its WAL) if given."""
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if template:
        for suffix in ("", "-wal"):
            if Path(f"{template}{suffix}").exists():
                shutil.copyfile(f"{template}{suffix}", f"{path}{suffix}")
                # Write the copy out now: otherwise the cell's first checkpoint (its fsync) pays
                # for flushing hundreds of MB of freshly copied pages, inside the measurement.
                with open(f"{path}{suffix}", "rb+") as copy:
                    os.fsync(copy.fileno())
    return path


def runs_on(system, fn):
    """Whether `system` has the workload `fn`: the S rows measure sitq's own event loop only,
    the F and R rows properties of sitq's worker."""
    return system == "sitq" or not (fn.startswith("stall_") or fn in SITQ_ONLY)


def prefill(tmp, system, n, console):
    """A database holding `n` finished tasks of `system`, made once per run."""
    template = fresh_db(tmp, f"template-{system}-{n}/bench.db")
    t = time.perf_counter()
    cell({"system": system, "workload": "prefill", "db": str(template), "n": n}, 3600)
    console.print(f"[dim]prefilled {n:,} finished tasks for {system} in {time.perf_counter() - t:.1f} s")
    return template


def sizes_for(args):
    """Tasks per cell for this run: the quick or full sizes, with ``--big-store`` applied."""
    sizes = dict(SIZES["quick" if args.quick else "full"])
    if args.big_store:
        sizes["big_store"] = args.big_store
    return sizes


def measure(args, rows, console):
    """Run all cells and return the list of cell records."""
    sizes = sizes_for(args)
    records = []
    with tempfile.TemporaryDirectory(prefix="sitq-bench-") as tmp:
        tmp = Path(tmp)
        templates = {}  # (system, finished tasks) -> database
        if any(old for *_, old in rows):
            for system in args.systems:
                templates[system, args.old_rows] = prefill(tmp, system, args.old_rows, console)
        big = sizes["big_store"]
        if ("sitq", big) not in templates and "sitq" in args.systems and any(
                fn in STALLS_ON_BIG_STORE for _, fn, *_ in rows):
            templates["sitq", big] = prefill(tmp, "sitq", big, console)
        cells = [(repeat, index, system) for repeat in range(args.repeat) for index in range(len(rows))
                 for system in args.systems if runs_on(system, rows[index][1])]
        for done, (repeat, index, system) in enumerate(cells, 1):
            label, fn, kw, metrics, old = rows[index]
            n = sizes[fn]
            if fn in STALLS_ON_BIG_STORE:  # it only reads: the template itself
                db = templates["sitq", big]
            else:
                db = fresh_db(tmp, f"{system}-{index}-{repeat}/bench.db", templates.get((system, old)) if old else None)
            spec = {"system": system, "workload": fn, "db": str(db), "n": n, "kw": kw}
            record = {"system": system, "row": label, "workload": fn, "n": n, "kw": kw,
                      "old_rows": old, "repeat": repeat}
            try:
                figures = cell(spec, 30 if args.quick else 600)
            except Exception as exc:  # keep going; the run fails at the end
                record["error"] = str(exc)
                tail = "\n".join(str(exc).splitlines()[-3:])  # the whole stderr tail goes to --json
                console.print(f"[red]{done}/{len(cells)} {system} {label} failed:[/red]\n{tail}")
            else:
                if fn == "mixed":
                    figures["tasks_s"] = n * kw["producers"] / figures["wall_s"]
                record["figures"] = figures
                shown = ", ".join(f"{m}={fmt(figures[m])}" for m in metrics)
                console.print(f"[dim]{done}/{len(cells)} {system:5} {label}: {shown}")
            records.append(record)
            if fn not in STALLS_ON_BIG_STORE:
                shutil.rmtree(db.parent)
    return records


def summarize(records):
    """Median, min and max of every figure, keyed by row, then system, then metric."""
    values = {}
    for r in records:
        for metric, v in r.get("figures", {}).items():
            values.setdefault(r["row"], {}).setdefault(r["system"], {}).setdefault(metric, []).append(v)
    return {row: {system: {m: {"median": statistics.median(v), "min": min(v), "max": max(v)}
                           for m, v in metrics.items()} for system, metrics in systems.items()}
            for row, systems in values.items()}


def fmt(v):
    """Three significant digits, thousands separated."""
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def table_rows(rows, summary, systems, repeat):
    """The table as lists of strings: header first."""
    header = ["Workload", "Metric", *systems, "sitq/floor", "sitq/huey", "Target (sitq)"]
    out = [header]

    def median(row, system, metric):
        return summary.get(row, {}).get(system, {}).get(metric, {}).get("median")

    for label, fn, _, metrics, old in rows:
        base = label.split(" +")[0]
        for metric in metrics:
            cells = []
            for system in systems:
                s = summary.get(label, {}).get(system, {}).get(metric)
                if not runs_on(system, fn):
                    cells.append("–")
                    continue
                cells.append("failed" if s is None else fmt(s["median"]) +
                             (f" ({fmt(s['min'])}–{fmt(s['max'])})" if repeat > 1 else ""))
            mine = median(label, "sitq", metric)
            ratios = [f"{mine / other:.2f}×" if mine and (other := median(label, ref, metric)) else "–"
                      for ref in ("floor", "huey")]
            checks = []
            for ref, op, bound in (OLD_TARGETS.get(metric, []) if old else TARGETS.get((label, metric), [])):
                if ref is None:
                    ref_value = 1
                elif ref == "no old rows":
                    ref_value = median(base, "sitq", metric)
                elif ref.startswith("row "):
                    ref_value = median(ref[4:], "sitq", metric)
                elif ref.startswith("metric "):
                    ref_value = median(label, "sitq", ref[7:])
                else:
                    ref_value = median(label, ref, metric)
                if mine is None or not ref_value:
                    continue
                x = mine / ref_value
                ok = x >= bound if op == ">=" else x <= bound
                what = (f"{fmt(bound)}" if ref is None else f"{bound}× {ref.split(' ', 1)[1].split(' ', 1)[0]}"
                        if ref.startswith(("row ", "metric ")) else f"{bound}× {ref}")
                checks.append(f"{'≥' if op == '>=' else '≤'}{what} {'✓' if ok else '✗'}")
            out.append([label, UNITS[metric], *cells, *ratios, "; ".join(checks)])
    return out


def machine(packages=("sitq", "huey", "cloudpickle"), store=f"SQLite {sqlite3.sqlite_version}"):
    """A one-line description of this machine, the `store` and the `packages` measured."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for package in packages:
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return (f"{cpu}, {os.cpu_count()} CPUs, {ram:.0f} GiB RAM, {platform.platform()}, "
            f"Python {platform.python_version()}, {store}, {', '.join(versions)}")


BEGIN, END = "<!-- benchmark results: begin -->", "<!-- benchmark results: end -->"


def markdown(path, table, meta, plot):
    """Write the dated table, the machine and the command as a markdown section between the
    BEGIN and END markers (see `benchmarks.common.splice`)."""
    lines = [f"## Benchmark results, {meta['date']}", "",
             f"Machine: {meta['machine']}.", "",
             f"Command: `{meta['command']}` ({meta['wall_s']:.0f} s).", "",
             f"Each figure is the median of {meta['repeat']} runs, each in a fresh process on a fresh "
             "database file, with the min–max range in brackets. Ratios divide sitq's median by the "
             "floor's and by huey's from the same run; compare ratios, not absolute numbers from "
             "another day or machine.", "",
             "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    lines += ["", NOTES.format(**meta["sizes"])]
    if plot:
        lines += ["", f"![Throughput by workload and system]({os.path.relpath(plot, path.parent)})"]
    splice(path, BEGIN, END, "\n".join(lines) + "\n")


def plot_png(path, summary, systems, console):
    """Bar charts of throughput and round-trip p50 by workload and system, with min-max ranges."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print(f"[yellow]matplotlib is not installed, so {path} was not written "
                      "(pip install matplotlib)")
        return
    panels = [("tasks_s", "throughput, tasks/s (higher is better, log scale)", "log",
               ["W1 enqueue", "W2 drain c=1", "W2 drain c=8", "W4 mixed 8 producers", "W5 bulk"]),
              ("p50_ms", "W3 round trip p50, ms (lower is better)", "linear",
               ["W3 round trip in-process", "W3 round trip cross-process"])]
    colors = {"sitq": "C2", "floor": "C7", "huey": "C1"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [5, 2]})
    for ax, (metric, title, scale, labels) in zip(axes, panels, strict=True):
        labels = [label for label in labels if label in summary]
        width = 0.8 / len(systems)
        for i, system in enumerate(systems):
            stats = [summary[label].get(system, {}).get(metric) for label in labels]
            xs = [j + (i - (len(systems) - 1) / 2) * width for j, s in enumerate(stats) if s]
            stats = [s for s in stats if s]
            ax.bar(xs, [s["median"] for s in stats], width, label=system, color=colors[system],
                   yerr=[[s["median"] - s["min"] for s in stats], [s["max"] - s["median"] for s in stats]])
        ax.set_xticks(range(len(labels)), [label.replace(" ", "\n", 1) for label in labels], fontsize=8)
        ax.set_yscale(scale)
        ax.set_title(title, fontsize=10)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    console.print(f"wrote {path}")


def main(argv=None):
    """Measure, print the table, write the requested files; exit 1 if any cell failed."""
    args = parse(argv)
    console = Console(width=None if sys.stdout.isatty() else 230)
    rows = rows_for(args)
    start = time.perf_counter()
    records = measure(args, rows, console)
    summary = summarize(records)
    meta = {"date": datetime.date.today().isoformat(), "machine": machine(), "repeat": args.repeat,
            "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
            "sizes": sizes_for(args), "old_rows": args.old_rows,
            "wall_s": time.perf_counter() - start}
    table = table_rows(rows, summary, args.systems, args.repeat)
    rich_table = Table(title=f"sitq benchmarks, median of {args.repeat} (min–max)")
    for i, heading in enumerate(table[0]):
        rich_table.add_column(heading, no_wrap=i < 2)
    for row in table[1:]:
        rich_table.add_row(*row)
    console.print(rich_table)
    console.print(f"{meta['machine']}\nwall time {meta['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "cells": records, "summary": summary}, indent=1))
    if args.markdown:
        markdown(args.markdown, table, meta, args.plot)
    if args.plot:
        plot_png(args.plot, summary, args.systems, console)
    failed = [r for r in records if "error" in r]
    if failed:
        console.print(f"[red]{len(failed)} cell(s) failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
