"""Run the PostgreSQL benchmark: sitq, a raw psycopg floor, pgqueuer and procrastinate on one server.

    python -m benchmarks.postgres [--repeat 3] [--workers 1,2,4] [--tasks 5000] [--round-trips 200]
        [--systems floor,sitq,pgqueuer,procrastinate] [--dsn postgresql://...]
        [--markdown docs/performance.md] [--json out.json]

Every (system, workload, repeat) cell runs in its own ``python -m benchmarks.postgres.cell``
process on its own fresh database, dropped after; repeats are interleaved so that a noisy moment
hits every system alike. The table shows medians with the min-max range and each system's median
divided by the floor's from this same run (drains: by the floor claiming 10 at a time), next to
the issue's targets for sitq. ``--markdown`` rewrites the PostgreSQL section of that page, between
its markers, and leaves the rest alone.
"""

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from benchmarks.common import splice
from benchmarks.postgres.server import check_dsn, default_dsn, reachable, server_settings
from benchmarks.postgres.sitq_system import available
from benchmarks.run import cell, fmt, machine, summarize

SYSTEMS = ("floor", "sitq", "pgqueuer", "procrastinate")
COLUMNS = {"floor": "floor", "floor10": "floor, claims 10", "sitq": "sitq", "pgqueuer": "pgqueuer",
           "procrastinate": "procrastinate"}
UNITS = {"tasks_s": "tasks/s ↑", "p50_us": "p50 µs ↓", "p99_us": "p99 µs ↓", "p50_ms": "p50 ms ↓",
         "p99_ms": "p99 ms ↓", "connections": "most ↓"}
CONNECTIONS = "connections per worker process"
BEGIN, END = "<!-- postgres benchmark: begin -->", "<!-- postgres benchmark: end -->"
NOTES = """Settings: every system keeps its defaults on the server's defaults (above), each cell on a
database of its own. Drains: {tasks:,} tasks queued first; the worker processes start, connect, and are
released together; the time runs from the release to the last task's end as each worker reports it.
sitq's drain workers are `Worker(backend).drain()` in separate processes (concurrency 1); its round trip
runs `sitq worker URL` in another process and reads each value back with `get_result`. The floor and
pgqueuer carry `cloudpickle.dumps((f, (i,)))` payloads ({payload} bytes); sitq stores its own
cloudpickled function and arguments; procrastinate takes JSON keyword arguments (`x=i`), its design.
pgqueuer (asyncpg driver, as its README shows) claims 10 jobs at a time and writes completions through
a buffer flushed every 0.1 s or every 10 jobs; its round trip waits on `CompletionWatcher` (50 ms
debounce) and returns a status, not a value: it has no result store. procrastinate has no result store
and no completion notification: its round trip polls the job's status every 1 ms. Connections: the most
TCP connections to the server one worker process held at once, sampled every 20 ms from /proc during
its drains and round trips (the floor's round-trip worker has a LISTEN connection and a work connection)."""
TARGETS = {  # (workload, metric): (op, bound); vs the row's floor, or absolute for connections
    ("enqueue", "tasks_s"): (">=", 0.9), ("bulk", "tasks_s"): (">=", 0.8), ("drain", "tasks_s"): (">=", 0.8),
    ("round_trip", "p50_ms"): ("<=", 1.5), ("connections", "connections"): ("<=", 2),
}


def parse(argv):
    """Read the command line."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.postgres", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[5:]))
    p.add_argument("--repeat", type=int, default=3, help="processes per cell; medians of these (default 3)")
    p.add_argument("--workers", default="1,2,4", help="worker process counts for the drains (default 1,2,4)")
    p.add_argument("--tasks", type=int, default=5000, help="tasks per enqueue, bulk and drain cell (default 5000)")
    p.add_argument("--round-trips", type=int, default=200, help="timed round trips per cell (default 200)")
    p.add_argument("--systems", default=None,
                   help=f"comma-separated, from {','.join(SYSTEMS)} (default: all; sitq only if its "
                        "PostgreSQL backend is importable)")
    p.add_argument("--dsn", default=default_dsn(),
                   help="the server, as a postgresql:// URL; each cell makes and drops its own database on it "
                        "(default: $SITQ_TEST_POSTGRES, else postgresql://postgres@127.0.0.1:5432/test)")
    p.add_argument("--markdown", type=Path, help="write the results section of this page (docs/performance.md)")
    p.add_argument("--json", type=Path, help="write every cell's figures and the summary here")
    args = p.parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",") if w]
        if not args.workers or min(args.workers) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--workers takes positive integers separated by commas, like 1,2,4, not {args.workers!r}")
    if args.repeat < 1 or args.tasks < 1 or args.round_trips < 1:
        p.error("--repeat, --tasks and --round-trips take positive integers")
    try:
        check_dsn(args.dsn)
    except ValueError as exc:
        p.error(str(exc))
    if args.systems is None:
        args.systems = [s for s in SYSTEMS if s != "sitq" or available() is None]
    else:
        args.systems = [s for s in args.systems.split(",") if s]
        unknown = set(args.systems) - set(SYSTEMS)
        if unknown:
            p.error(f"unknown systems {sorted(unknown)}; choose from {','.join(SYSTEMS)}")
        if "sitq" in args.systems and (why := available()):
            p.error(f"{why}: install it (pip install -e '.[postgres]') or leave sitq out of --systems")
    return args


def rows_for(args):
    """The table's rows: (label, workload, keyword arguments, metrics, reference system)."""
    rows = [("W1 enqueue one by one", "enqueue", {}, ("tasks_s", "p50_us", "p99_us"), "floor"),
            ("W5 bulk enqueue", "bulk", {}, ("tasks_s",), "floor")]
    rows += [(f"W2 drain, {w} worker{'s' * (w > 1)}", "drain", {"workers": w}, ("tasks_s",), "floor10")
             for w in args.workers]
    rows += [("W3 round trip", "round_trip", {}, ("p50_ms", "p99_ms"), "floor")]
    return rows


def columns(args):
    """The systems in the table, the floor claiming 10 at a time next to the floor."""
    return [c for s in args.systems for c in (("floor", "floor10") if s == "floor" else (s,))]


def measure(args, rows, console):
    """Run every cell, repeats interleaved; return the cell records."""
    cells = [(repeat, row, column) for repeat in range(args.repeat) for row in rows for column in columns(args)
             if column != "floor10" or row[1] == "drain"]
    records = []
    for done, (repeat, (label, fn, kw, metrics, _), column) in enumerate(cells, 1):
        n = args.round_trips if fn == "round_trip" else args.tasks
        system, kw = ("floor", {**kw, "batch": 10}) if column == "floor10" else (column, kw)
        record = {"system": column, "row": label, "workload": fn, "n": n, "kw": kw, "repeat": repeat}
        try:
            figures = cell({"system": system, "workload": fn, "dsn": args.dsn, "n": n, "kw": kw}, 600,
                           module="benchmarks.postgres.cell")
        except Exception as exc:  # keep going; the run fails at the end
            record["error"] = str(exc)
            tail = "\n".join(str(exc).splitlines()[-3:])
            console.print(f"[red]{done}/{len(cells)} {column} {label} failed:[/red]\n{tail}")
        else:
            record["figures"] = figures
            shown = ", ".join(f"{m}={fmt(figures[m])}" for m in metrics + ("connections",) if m in figures)
            console.print(f"[dim]{done}/{len(cells)} {column:13} {label}: {shown}")
        records.append(record)
    return records


def table_rows(rows, summary, systems, repeat):
    """The table as lists of strings, header first: medians, ranges, ratios to the floor, targets."""
    out = [["Workload", "Metric", *(COLUMNS[s] for s in systems), "Target (sitq)"]]

    def median(row, system, metric):
        return summary.get(row, {}).get(system, {}).get(metric, {}).get("median")

    for label, fn, _, metrics, reference in rows:
        for metric in metrics:
            cells = []
            for system in systems:
                s = summary.get(label, {}).get(system, {}).get(metric)
                if system == "floor10" and fn != "drain":
                    cells.append("–")
                    continue
                if s is None:
                    cells.append("failed")
                    continue
                text = fmt(s["median"]) + (f" ({fmt(s['min'])}–{fmt(s['max'])})" if repeat > 1 else "")
                ref = median(label, reference, metric)
                if system != reference and ref:
                    text += f", {s['median'] / ref:.2f}×"
                cells.append(text)
            out.append([label, UNITS[metric], *cells, check(fn, metric, median(label, "sitq", metric),
                                                              median(label, reference, metric), reference)])
    most = {s: [r for r in rows if summary.get(r[0], {}).get(s, {}).get("connections")] for s in systems}
    cells = [fmt(max(summary[r[0]][s]["connections"]["max"] for r in most[s])) if most[s] else "–" for s in systems]
    sitq = max((summary[r[0]]["sitq"]["connections"]["max"] for r in most.get("sitq", [])), default=None)
    out.append([CONNECTIONS, UNITS["connections"], *cells, check("connections", "connections", sitq, 1, None)])
    return out


def check(fn, metric, mine, reference_value, reference):
    """sitq's target for this row and whether this run met it, like ``≥0.9× floor ✓``."""
    if (fn, metric) not in TARGETS:
        return ""
    op, bound = TARGETS[fn, metric]
    what = f"{'≥' if op == '>=' else '≤'}{fmt(bound)}" + (f"× {COLUMNS[reference]}" if reference else "")
    if mine is None or not reference_value:
        return what
    x = mine / reference_value
    return f"{what} {'✓' if (x >= bound if op == '>=' else x <= bound) else '✗'}"


def markdown(path, table, meta):
    """Write the dated table, the machine, the server's settings and the command into `path`'s
    PostgreSQL section (between BEGIN and END)."""
    lines = [f"### PostgreSQL benchmark results, {meta['date']}", "",
             f"Machine: {meta['machine']}.", "",
             f"Command: `{meta['command']}` ({meta['wall_s']:.0f} s).", "",
             f"Each figure is the median of {meta['repeat']} runs, each in a fresh process on a fresh "
             "database, with the min–max range in brackets and its ratio to the floor's median from the "
             "same run (drains: to the floor claiming 10 tasks per transaction). Compare ratios, not "
             "absolute numbers from another day or machine.", "",
             "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    lines += ["", NOTES.format(tasks=meta["tasks"], payload=meta["payload_bytes"])]
    splice(path, BEGIN, END, "\n".join(lines) + "\n")


def main(argv=None):
    """Measure, print the table, write the requested files; exit 1 if any cell failed."""
    args = parse(argv)
    console = Console(width=None if sys.stdout.isatty() else 230)
    if why := reachable(args.dsn):
        console.print(f"[red]cannot reach PostgreSQL at {args.dsn}: {why}")
        sys.exit(2)
    if "sitq" not in args.systems and (why := available()):
        console.print(f"[yellow]sitq left out: {why}")
    from benchmarks.postgres.floor import payload

    rows = rows_for(args)
    start = time.perf_counter()
    records = measure(args, rows, console)
    summary = summarize(records)
    meta = {"date": datetime.date.today().isoformat(), "repeat": args.repeat, "tasks": args.tasks,
            "machine": machine(("sitq", "psycopg", "pgqueuer", "asyncpg", "procrastinate", "cloudpickle"),
                               server_settings(args.dsn)),
            "command": "python -m benchmarks.postgres " + " ".join(sys.argv[1:] if argv is None else argv),
            "payload_bytes": len(payload(0)), "wall_s": time.perf_counter() - start}
    table = table_rows(rows, summary, columns(args), args.repeat)
    rich_table = Table(title=f"sitq on PostgreSQL, median of {args.repeat} (min–max), ratio to the floor")
    for i, heading in enumerate(table[0]):
        rich_table.add_column(heading, no_wrap=i < 2)
    for row in table[1:]:
        rich_table.add_row(*row)
    console.print(rich_table)
    console.print(f"{meta['machine']}\nwall time {meta['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "cells": records, "summary": summary, "table": table},
                                        indent=1))
    if args.markdown:
        markdown(args.markdown, table, meta)
    failed = [r for r in records if "error" in r]
    if failed:
        console.print(f"[red]{len(failed)} cell(s) failed")
        sys.exit(1)


if __name__ == "__main__":
    main()
