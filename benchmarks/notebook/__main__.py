"""Run the notebook benchmark: every system in fresh real kernels (nbclient), medians of runs.

    python -m benchmarks.notebook [--repeat 3] [--tasks 2000] [--rounds 200]
        [--systems "sitq threads,dask.distributed,..."] [--markdown docs/performance.md] [--json out.json]

Each (system, repeat) is one fresh kernel; repeats are interleaved so that a noisy moment
hits every system alike. ``--markdown`` rewrites the notebook section of that file, between
its own markers, and leaves the rest alone.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.notebook.systems import BIG_MAP, LIFECYCLE, STEPS, SYSTEMS, WORKFLOWS, cells, lines_of, workflow_cells

NOTES = """What the sitq rows measure: *sitq threads* and *sitq --processes 2* map the 2,000 tasks with
`sitq.notebook.map(noop, range(n)).results()` (one transaction, one group; the values are read back in
chunks of 2,000; `benchmarks/notebook/systems.py`, `SITQ_COLLECT`); the *submit loop* rows do what a
notebook user could write before the group API, one `sitq.notebook.submit` and one `.result()` per task.
*sitq big map* is one map of 100,000 no-ops in a cell that awaits, with a 1 ms ticker on the kernel's
own event loop: `map` and displaying its widget run as the cell's own code, so the kernel is held for
that long (the first two rows); then the tasks are stored on the runtime's loop thread while the cell
awaits (it pickles in slices of 2 ms and sleeps 1 ms after each, so the kernel's thread gets the GIL at
once; a helper thread writes them), and the ticker's longest wait in that time is the fourth row (the
fifth is the ticker alone, in the same kernel, before the map). A redraw reads the group's counts and at
most 3 failed members, whatever its size. A new kernel's worker holds the kernel's loop once for about
0.15 s in its first second (seen with the same ticker, threads mode; not yet explained), which the big
map's cell waits out before measuring.
The lifecycle rows start a fresh `--processes 2` worker and submit at once (the first
result waits for the processes to start, in the background) and again a second later. *kernel shutdown*
is the time Jupyter's `shutdown_kernel` takes: in the first table after each system's own teardown cell
(`%sitq stop`, `client.close()`, ...), in the lifecycle table with the worker still running; *child
processes left* counts the kernel's child processes still alive half a second after it. A kernel shutdown
of 2.6 s (every dask run, and single runs of others, a bare `ProcessPoolExecutor` among them) is
jupyter_client waiting 2.5 s, half its `shutdown_wait_time`, for a kernel that has not exited by itself,
before it signals the kernel's process group. With dask, the kernel waits for a child that ignores SIGTERM
(multiprocessing's `resource_tracker`). In the single runs of others it is ipykernel's own: py-spy
showed the kernel's main thread joining its control thread, which was waiting in `OutStream.flush`
(its 10 s `flush_timeout`) for an IOPub thread already stopped. An empty kernel that runs only `pass`
did the same in 3 of 40 shutdowns on this machine; the others took 110–215 ms. The teaching workflow's
sitq cells start the processes and map at once, so its wall time includes their start; the peers' start
cells wait for their workers."""

BEGIN, END = "<!-- notebook benchmark: begin -->", "<!-- notebook benchmark: end -->"
LABELS = {"per_task_ms": "ms per task ↓", "tasks_s": "tasks/s ↑", "one_ms": "submit to value, ms ↓",
          "start_cell_ms": "`%sitq start` cell, ms ↓", "first_result_ms": "first result after start, ms ↓",
          "later_result_ms": "one task 1 s after start, ms ↓", "shutdown_ms": "kernel shutdown, ms ↓",
          "orphans": "child processes left ↓",
          "map_call_ms": "`sitq.notebook.map` of 100,000 returns, ms ↓",
          "first_paint_ms": "… and its widget is displayed (the kernel is held until then), ms ↓ (target ≤ 20)",
          "stored_ms": "… and all 100,000 tasks are stored, in the background, ms ↓",
          "kernel_stall_ms": "longest wait of the kernel's event loop while they are stored, ms ↓ (target ≤ 20)",
          "kernel_idle_stall_ms": "longest wait of the kernel's event loop with nothing running (noise), ms",
          "redraw_1k_ms": "one redraw of a group's widget, 1,000 tasks, ms ↓",
          "redraw_100k_ms": "one redraw of a group's widget, 100,000 tasks, ms ↓"}


def run_kernel(sources, cwd, timeout=600):
    """Execute ``sources`` in one fresh kernel; return the BENCH figures and the shutdown time
    and how many of the kernel's child processes outlived it."""
    import nbformat.v4 as v4
    from jupyter_core.utils import run_sync
    from nbclient import NotebookClient

    nb = v4.new_notebook(cells=[v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    figures = {}
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
        pid = client.km.provisioner.process.pid
        children = _children(pid)
        t0 = time.perf_counter()
        run_sync(client.km.shutdown_kernel)(now=False)
        figures["shutdown_ms"] = (time.perf_counter() - t0) * 1e3
    time.sleep(0.5)
    figures["orphans"] = sum(1 for child in children if os.path.exists(f"/proc/{child}"))
    for cell in nb.cells:
        for out in cell.outputs:
            if out.output_type == "stream":
                for line in out.text.splitlines():
                    if line.startswith("BENCH "):
                        figures.update(json.loads(line[6:]))
            elif out.output_type == "error":
                raise RuntimeError(f"{out.ename}: {out.evalue}")
    return figures


def _children(pid):
    """The pids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.notebook")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tasks", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--systems", default=",".join([*SYSTEMS, "sitq lifecycle", "sitq big map"]),
                   help="comma-separated")
    p.add_argument("--workflows", default=",".join(WORKFLOWS), help="comma-separated; 'none' for none")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip() and s.strip() != "none"]
    workflows = [w.strip() for w in args.workflows.split(",") if w.strip() and w.strip() != "none"]
    runs = {s: [] for s in systems}
    flows = {w: [] for w in workflows}
    started = time.monotonic()
    for rep in range(args.repeat):
        for system in systems:
            with tempfile.TemporaryDirectory(prefix="sitq-nbbench-") as cwd:
                sources = {"sitq lifecycle": LIFECYCLE, "sitq big map": BIG_MAP}.get(system) or cells(
                    system, args.tasks, args.rounds)
                try:
                    figures = run_kernel(sources, cwd)
                except Exception as exc:
                    figures = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            runs[system].append(figures)
            print(f"[{rep + 1}/{args.repeat}] {system}: {figures}", file=sys.stderr, flush=True)
        for flow in workflows:
            with tempfile.TemporaryDirectory(prefix="sitq-nbflow-") as cwd:
                try:
                    figures = run_kernel(workflow_cells(flow), cwd)
                except Exception as exc:
                    figures = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            flows[flow].append(figures)
            print(f"[{rep + 1}/{args.repeat}] workflow {flow}: {figures}", file=sys.stderr, flush=True)
    table = summarize(runs)
    table_flows = summarize(flows)
    wall = time.monotonic() - started
    text = markdown(table, args, wall, table_flows)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "table": table, "workflows": flows}, indent=1))
    if args.markdown:
        replace_section(args.markdown, text)
    return 0


def summarize(runs):
    table = {}
    for system, figures in runs.items():
        errors = [f["error"] for f in figures if "error" in f]
        good = [f for f in figures if "error" not in f]
        keys = sorted({k for f in good for k in f})
        table[system] = {k: _median([f[k] for f in good if k in f]) for k in keys}
        if errors:
            table[system]["error"] = errors[0]
    return table


def _median(values):
    return (statistics.median(values), min(values), max(values))


def _fmt(value):
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def markdown(table, args, wall, flows=None):
    versions = ", ".join(f"{name} {_version(name)}" for name in ("sitq", "ipykernel", "distributed", "ipyparallel"))
    lines = [
        BEGIN,
        "## In a notebook kernel",
        "",
        f"Measured {datetime.date.today().isoformat()}. Machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, {versions}. Command: `python -m benchmarks.notebook --repeat {args.repeat}` "
        f"({wall:.0f} s).",
        "",
        f"Each figure is the median of {args.repeat} fresh kernels (nbclient), min–max in brackets. "
        f"*ms per task*: from the call that submits {args.tasks:,} no-op tasks to having all their values in the "
        f"cell (after a warm-up of 200). *submit to value*: the median of {args.rounds} times submitting one "
        "no-op task and waiting for its value. Every system has two worker processes (sitq threads: two threads).",
        "",
        "| system | ms per task ↓ | tasks/s ↑ | submit to value, ms ↓ | kernel shutdown, ms ↓ |",
        "|---|---|---|---|---|",
    ]
    for system, figures in table.items():
        if system in ("sitq lifecycle", "sitq big map"):
            continue
        row = [system] + [_cell(figures, k) for k in ("per_task_ms", "tasks_s", "one_ms", "shutdown_ms")]
        lines.append("| " + " | ".join(row) + " |")
    if "sitq lifecycle" in table:
        figures = table["sitq lifecycle"]
        lines += ["", "A fresh `%sitq start --processes 2`:", "", "| figure | median (min–max) |", "|---|---|"]
        for key in ("start_cell_ms", "first_result_ms", "later_result_ms", "shutdown_ms", "orphans"):
            lines.append(f"| {LABELS[key]} | {_cell(figures, key)} |")
    if "sitq big map" in table:
        figures = table["sitq big map"]
        lines += ["", "A map of 100,000 no-ops in a kernel (`--concurrency 2`), with a 1 ms ticker on the kernel's "
                  "own event loop:", "", "| figure | median (min–max) |", "|---|---|"]
        for key in ("map_call_ms", "first_paint_ms", "stored_ms", "kernel_stall_ms", "kernel_idle_stall_ms",
                    "redraw_1k_ms",
                    "redraw_100k_ms"):
            lines.append(f"| {LABELS[key]} | {_cell(figures, key)} |")
    if flows:
        lines += ["", "The teaching workflow: map a function over 20 items (0.05 s each, one raises), watch it, "
                  "collect the 19 values, show the failure's traceback (`benchmarks/notebook/systems.py` has "
                  "each system's cells). Wall time from the map to the traceback; lines of user code per step "
                  "(not blank, not a comment).", "",
                  "| system | wall s ↓ | lines ↓ | " + " | ".join(STEPS) + " |",
                  "|---|---|---|" + "---|" * len(STEPS)]
        for flow, figures in flows.items():
            spec = WORKFLOWS[flow]
            counts = [lines_of(spec[step]) for step in STEPS]
            lines.append(f"| {flow} | {_cell(figures, 'workflow_s')} | {sum(counts)} | "
                         + " | ".join(map(str, counts)) + " |")
    lines += ["", NOTES, "", END]
    return "\n".join(lines)


def _cell(figures, key):
    if key not in figures:
        return figures.get("error", "–") if key in ("per_task_ms", "workflow_s") else "–"
    median, low, high = figures[key]
    return f"{_fmt(median)} ({_fmt(low)}–{_fmt(high)})"


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def replace_section(path, text):
    old = path.read_text()
    if BEGIN in old:
        new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: text, old, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new)


if __name__ == "__main__":
    sys.exit(main())
