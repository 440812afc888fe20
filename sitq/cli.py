"""The ``sitq`` command: run a worker, look at a queue, or watch the demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from sitq.backends import Backend, describe_target, open_backend
from sitq.core import FAILED, STATES, SUCCESS, QueueOverview, TaskInfo
from sitq.errors import SitqError
from sitq.queue import TaskQueue
from sitq.worker import Worker

__all__ = ["main"]

STATE_STYLES = {"pending": "yellow", "running": "cyan", "success": "green", "failed": "red", "cancelled": "magenta"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return _run_to_end(args.run(args))
    except SitqError as exc:
        print(f"sitq: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run_to_end(main_coroutine: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run``, except that coroutines which ignore cancellation cannot keep the command alive.

    A worker abandons a task coroutine that swallows its cancel; such a coroutine may swallow
    the last cancel at shutdown as well. ``asyncio.run`` would wait for it for ever; here it
    gets a moment, and is then left behind with the loop (all outcomes are stored by then).
    """
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main_coroutine)
    finally:
        leftover = asyncio.all_tasks(loop)
        for task in leftover:
            task.cancel()
        if leftover:
            loop.run_until_complete(asyncio.wait(leftover, timeout=1.0))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sitq", description="sitq: a task queue you can see.")
    commands = parser.add_subparsers(title="commands")

    worker = commands.add_parser("worker", help="run tasks from a queue until Ctrl-C or SIGTERM")
    worker.add_argument("path", metavar="TARGET", help="the queue's store: a SQLite file path, sqlite:///path or postgresql://...")
    worker.add_argument("--concurrency", "-c", type=_positive_int, default=None, help="tasks at a time (default 1)")
    worker.add_argument(
        "--processes", "-p", type=_positive_int, default=None,
        help="run every task in one of N processes, N at a time (for CPU-bound work)",
    )
    worker.add_argument("--poll-interval", type=float, default=1.0, help="longest idle wait in seconds (default 1)")
    worker.add_argument("--lease", type=float, default=60.0, help="seconds a claim lasts without renewal (default 60)")
    worker.add_argument(
        "--cancel-grace",
        type=float,
        default=5.0,
        help="seconds a cancelled or timed-out coroutine gets to end before it is abandoned (default 5)",
    )
    worker.add_argument("--drain", action="store_true", help="exit once no task is ready or running")
    worker.add_argument("--quiet", "-q", action="store_true", help="log warnings only")
    worker.set_defaults(run=run_worker)

    status = commands.add_parser(
        "status", help="counts per state and the most recent tasks (read-only: changes nothing in the file)"
    )
    status.add_argument("path", metavar="TARGET", help="the queue's store: a SQLite file path, sqlite:///path or postgresql://...")
    status.add_argument("--limit", "-n", type=_positive_int, default=15, help="how many recent tasks (default 15)")
    status.set_defaults(run=run_status)

    demo = commands.add_parser("demo", help="enqueue two dozen tasks, run them, and show the results")
    demo.add_argument("path", nargs="?", default="sitq-demo.db", help="SQLite file to use (default sitq-demo.db)")
    demo.add_argument("--concurrency", "-c", type=_positive_int, default=4, help="tasks at a time (default 4)")
    demo.set_defaults(run=run_demo)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _existing_backend(target: str) -> Backend:
    """The store at ``target``, opened read-only: looking never creates, upgrades or changes a file."""
    backend = open_backend(target, read_only=True)
    path = getattr(backend, "path", None)
    if path is not None and path != ":memory:" and not os.path.exists(path):
        raise SitqError(f"there is no sitq database at {path!r}; check the path (sitq demo makes one)")
    return backend


# -- sitq worker ---------------------------------------------------------------


async def run_worker(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    backend = open_backend(args.path)
    worker = Worker(
        backend,
        max_concurrency=args.concurrency,
        processes=args.processes,
        poll_interval=args.poll_interval,
        lease=args.lease,
        cancel_grace=args.cancel_grace,
    )
    loop = asyncio.get_running_loop()
    stops: list[asyncio.Task[None]] = []  # the stop tasks, kept until the worker has stopped

    def on_signal(signum: int) -> None:
        if not stops:
            logging.getLogger("sitq").info(
                "%s: finishing %d running task(s), then stopping; send it again to stop now",
                signal.Signals(signum).name,
                worker.active,
            )
            stops.append(loop.create_task(worker.stop()))
        else:
            os._exit(130)  # the user insists; unfinished tasks are rerun once their lease expires

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    logging.getLogger("sitq").info(
        "worker %s on %s, %s; Ctrl-C stops it",
        worker.worker_id,
        describe_target(args.path),
        f"{worker.processes} processes" if worker.processes else f"concurrency {worker.max_concurrency}",
    )
    try:
        await (worker.drain() if args.drain else worker.start())
    finally:
        await backend.close()
    logging.getLogger("sitq").info("worker stopped after %d task(s), %d failed", worker.processed, worker.failed)
    return 0


# -- sitq status ---------------------------------------------------------------


async def run_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    async with TaskQueue(_existing_backend(args.path)) as queue:
        overview = await queue.overview(args.limit)
    console = Console()
    console.print(_counts_line(overview))
    console.print(_recent_table(overview, title=f"{describe_target(args.path)}: most recent tasks"))
    return 0


def _counts_line(overview: QueueOverview) -> str:
    from rich.markup import escape

    parts = [f"[{STATE_STYLES[s]}]{s} {overview.counts.get(s, 0)}[/]" for s in STATES]
    # statuses sitq does not write (a row changed by hand) are shown, not hidden in the total
    parts += [f"[bold red]{escape(str(s))} {n}[/]" for s, n in overview.counts.items() if s not in STATE_STYLES and n]
    return f"[bold]{overview.total} tasks[/]: " + "  ".join(parts)


def _recent_table(overview: QueueOverview, title: str) -> Any:  # a rich Table (rich loads only when used)
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("task id", no_wrap=True)
    for column in ("name", "state", "attempts", "duration", "progress / error"):
        table.add_column(column, overflow="fold")
    for info in overview.recent:
        duration = ""
        if info.started_at and info.finished_at:
            duration = f"{(info.finished_at - info.started_at).total_seconds():.2f} s"
        detail = info.error or ""
        if not detail and isinstance(info.progress_done, (int, float)):
            total = f"/{info.progress_total:g}" if isinstance(info.progress_total, (int, float)) else ""
            detail = f"{info.progress_done:g}{total} {info.progress_message or ''}"
        # Every field is escaped: a row changed by hand may hold anything, rich markup included.
        table.add_row(
            escape(str(info.task_id)),
            escape(str(info.name)),
            f"[{STATE_STYLES.get(info.status, 'bold red')}]{escape(str(info.status))}[/]",
            "?" if info.attempts is None else str(info.attempts),
            duration,
            escape(str(detail)),
        )
    return table


# -- sitq demo -----------------------------------------------------------------


async def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console, Group
    from rich.live import Live
    from rich.panel import Panel
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.syntax import Syntax

    from sitq.demo import demo_calls

    console = Console()
    backend = open_backend(args.path)
    queue = TaskQueue(backend)
    worker = Worker(backend, max_concurrency=args.concurrency, poll_interval=0.2)
    started = time.monotonic()
    ids = [await queue.enqueue(func, *call_args) for func, call_args in demo_calls()]
    console.print(f"Enqueued {len(ids)} tasks into [bold]{args.path}[/]; a worker runs {args.concurrency} at a time.")

    bar = Progress(TextColumn("tasks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar_task = bar.add_task("tasks", total=len(ids))
    running = asyncio.get_running_loop().create_task(worker.drain())
    with Live(console=console, refresh_per_second=10, transient=False) as live:
        while True:
            infos = await queue.statuses(ids)
            finished = sum(1 for info in infos.values() if info.finished)
            bar.update(bar_task, completed=finished)
            live.update(Group(bar, _recent_table(_demo_view(infos, ids), title="tasks")))
            if running.done():
                break
            await asyncio.sleep(0.1)
    await running

    # every task has finished (the worker drained the queue), so each has a result
    results = [r for task_id in ids if (r := await queue.get_result(task_id, timeout=0)) is not None]
    values = {r.task_id: queue.deserialize_result(r) for r in results if r.status == SUCCESS}
    console.rule("Results")
    for result in results:
        shown = repr(values[result.task_id]) if result.task_id in values else f"[red]{result.error}[/]"
        console.print(f"[dim]{result.task_id[-8:]}[/] {result.name}: {shown}")
    for result in (r for r in results if r.status == FAILED):
        shown = result.traceback or result.error or ""  # a task failed for losing its worker has no traceback
        console.print(Panel(Syntax(shown, "pytb", theme="ansi_dark"), title=f"{result.name} failed"))
    await queue.close()
    console.print(
        f"Done in {time.monotonic() - started:.1f} s. The tasks stay in [bold]{args.path}[/]: "
        f"see them with [bold]sitq status {args.path}[/]."
    )
    return 0


def _demo_view(infos: dict[str, TaskInfo], ids: list[str]) -> QueueOverview:
    counts: dict[str, int] = dict.fromkeys(STATES, 0)
    for info in infos.values():
        counts[info.status] += 1
    live = [infos[i] for i in ids if i in infos and infos[i].status == "running"]
    return QueueOverview(counts=counts, recent=live)
