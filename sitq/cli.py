"""The ``sitq`` command: run workers, look at a queue, act on its tasks, watch the demo.

Every command takes the store as its first argument (a SQLite file path,
``sqlite:///path`` or ``postgresql://...``) and tasks by their id or a unique
beginning or end of it (views show the last 8 characters). Exit status: 0 when
the command did what it was asked, 1 with a one-line reason on stderr when it
could not (a task not found, a failed task's result, a store that cannot be
opened), 2 for a command line that cannot be read, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from sitq.backends import Backend, describe_target, open_backend
from sitq.core import FAILED, FINISHED_STATES, SUCCESS, QueueOverview, Result
from sitq.errors import SitqError
from sitq.options import check_queue_name
from sitq.queue import FINISHED_NAMES, TaskQueue
from sitq.worker import Worker

__all__ = ["main", "parser"]

TARGET_HELP = "the queue's store: a SQLite file path, sqlite:///path or postgresql://user@host/db"
DURATION = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and return its exit status."""
    commands = parser()
    args = commands.parse_args(argv)
    if not hasattr(args, "run"):
        commands.print_help()
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


def parser() -> argparse.ArgumentParser:
    """The command line's parser (the reference docs are generated from it)."""
    from sitq import __version__

    top = argparse.ArgumentParser(prog="sitq", description="sitq: a task queue you can see.")
    top.add_argument("--version", action="version", version=f"sitq {__version__}")
    commands = top.add_subparsers(title="commands", metavar="COMMAND")

    worker = commands.add_parser("worker", help="run tasks from a queue until Ctrl-C or SIGTERM",
                                 description="Run tasks from a queue until Ctrl-C or SIGTERM (or, with --drain, "
                                             "until none is ready or running). The first signal lets running "
                                             "tasks finish; a second one stops at once.")
    worker.add_argument("path", metavar="TARGET", help=TARGET_HELP)
    worker.add_argument("--concurrency", "-c", type=_positive_int, default=None, help="tasks at a time (default 1)")
    worker.add_argument("--processes", "-p", type=_positive_int, default=None,
                        help="run every task in one of N processes, N at a time (for CPU-bound work)")
    worker.add_argument("--queue", "-Q", type=_queue_names, default=None, metavar="NAMES",
                        help="serve only these queues, comma-separated (default: every queue)")
    worker.add_argument("--poll-interval", type=_seconds, default=1.0, help="longest idle wait in seconds (default 1)")
    worker.add_argument("--lease", type=_seconds, default=60.0,
                        help="seconds a claim lasts without renewal (default 60)")
    worker.add_argument("--cancel-grace", type=_seconds, default=5.0,
                        help="seconds a cancelled or timed-out coroutine gets to end before it is abandoned "
                             "(default 5)")
    worker.add_argument("--prune-interval", type=_seconds, default=60.0,
                        help="seconds between deletions of finished tasks past their retention (default 60)")
    worker.add_argument("--drain", action="store_true", help="exit once no task is ready or running")
    worker.add_argument("--quiet", "-q", action="store_true", help="log warnings only")
    worker.set_defaults(run=run_worker)

    status = commands.add_parser("status", help="counts per state and queue, running tasks, failures, schedules",
                                 description="Show the queue: counts per state and queue, running tasks, recent "
                                             "failures, the newest tasks, groups and schedules. Read-only: it "
                                             "changes nothing in the store.")
    status.add_argument("path", metavar="TARGET", help=TARGET_HELP)
    status.add_argument("--limit", "-n", type=_positive_int, default=10, help="tasks per list (default 10)")
    status.add_argument("--watch", "-w", action="store_true", help="a live board that redraws as tasks move")
    status.add_argument("--interval", type=_seconds, default=0.5,
                        help="with --watch: the shortest time between redraws in seconds (default 0.5)")
    status.add_argument("--json", action="store_true", help="print the overview as JSON, for scripts")
    status.set_defaults(run=run_status)

    result = commands.add_parser("result", help="a task's value, or its error and traceback",
                                 description="Print a task's value, or its error and remote traceback. Exits 1 "
                                             "if the task failed, was cancelled or has not finished. Read-only.")
    result.add_argument("path", metavar="TARGET", help=TARGET_HELP)
    result.add_argument("task", metavar="ID", help="the task's id, or a unique beginning or end of it")
    result.add_argument("--wait", type=_seconds, nargs="?", const=float("inf"), default=0.0, metavar="SECONDS",
                        help="wait for the task to finish (for ever, or at most SECONDS)")
    result.add_argument("--json", action="store_true", help="print the result as JSON, for scripts")
    result.set_defaults(run=run_result)

    cancel = commands.add_parser("cancel", help="cancel tasks",
                                 description="Cancel tasks: a waiting or pending one never runs; a running one "
                                             "is stopped by its worker. Exits 1 if an id names no task.")
    cancel.add_argument("path", metavar="TARGET", help=TARGET_HELP)
    cancel.add_argument("tasks", metavar="ID", nargs="+", help="task ids, or unique beginnings or ends of them")
    cancel.set_defaults(run=run_cancel)

    retry = commands.add_parser("retry", help="run failed or cancelled tasks again",
                                description="Run failed or cancelled tasks again, each as one more attempt of "
                                            "the same task (same id). Exits 1 if an id names no task.")
    retry.add_argument("path", metavar="TARGET", help=TARGET_HELP)
    retry.add_argument("tasks", metavar="ID", nargs="*", help="task ids, or unique beginnings or ends of them")
    retry.add_argument("--failed", action="store_true", help="every failed task (of --queue, if given)")
    retry.add_argument("--queue", "-Q", type=_one_queue, default=None, help="with --failed: this queue only")
    retry.set_defaults(run=run_retry)

    purge = commands.add_parser("purge", help="delete finished tasks, and say how much went",
                                description="Delete finished tasks and report how many tasks and bytes went. "
                                            "Waiting, pending and running tasks are never touched.")
    purge.add_argument("path", metavar="TARGET", help=TARGET_HELP)
    purge.add_argument("--older-than", type=_duration, default=None, metavar="AGE",
                       help="only tasks that finished longer ago than this: 30s, 15m, 12h, 7d, 2w, or 1d12h")
    purge.add_argument("--status", type=_finished_states, default=FINISHED_NAMES, metavar="STATES",
                       help="comma-separated finished states (default success,failed,cancelled)")
    purge.add_argument("--dry-run", action="store_true", help="count what would go, delete nothing")
    purge.set_defaults(run=run_purge)

    unschedule = commands.add_parser("unschedule", help="remove a schedule (its tasks stay)")
    unschedule.add_argument("path", metavar="TARGET", help=TARGET_HELP)
    unschedule.add_argument("name", metavar="NAME", help="the schedule's name, as sitq status shows it")
    unschedule.set_defaults(run=run_unschedule)

    demo = commands.add_parser("demo", help="enqueue two dozen tasks, run them, and show the results")
    demo.add_argument("path", nargs="?", default="sitq-demo.db", help="SQLite file to use (default sitq-demo.db)")
    demo.add_argument("--concurrency", "-c", type=_positive_int, default=4, help="tasks at a time (default 4)")
    demo.set_defaults(run=run_demo)
    return top


# -- argument types ------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number of seconds, not {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def _duration(text: str) -> float:
    """``30s``, ``15m``, ``12h``, ``7d``, ``2w``, ``1d12h`` or plain seconds, as seconds."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"takes an age such as 30s, 15m, 12h, 7d, 2w or 1d12h, not {text!r}")
    return sum(float(n) * UNITS[u] for n, u in parts)


def _queue_names(text: str) -> list[str]:
    try:
        return [check_queue_name(name) for name in text.split(",")]
    except SitqError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _one_queue(text: str) -> str:
    names = _queue_names(text)
    if len(names) != 1:
        raise argparse.ArgumentTypeError(f"takes one queue name, not {text!r}")
    return names[0]


def _finished_states(text: str) -> list[str]:
    states = text.split(",")
    wrong = [s for s in states if s not in FINISHED_STATES]
    if wrong:
        raise argparse.ArgumentTypeError(
            f"takes finished states (success, failed, cancelled), not {', '.join(wrong)}; "
            "waiting, pending and running tasks are never purged"
        )
    return states


def _existing_backend(target: str) -> Backend:
    """The store at ``target``, opened read-only: looking never creates, upgrades or changes a file."""
    backend = open_backend(target, read_only=True)
    path = getattr(backend, "path", None)
    if path is not None and path != ":memory:" and not os.path.exists(path):
        raise SitqError(f"there is no sitq database at {path!r}; check the path (sitq demo makes one)")
    return backend


def _writable_backend(target: str) -> Backend:
    """The store at ``target`` for a command that changes tasks; it must exist already."""
    backend = open_backend(target)
    path = getattr(backend, "path", None)
    if path is not None and path != ":memory:" and not os.path.exists(path):
        raise SitqError(f"there is no sitq database at {path!r}; check the path")
    return backend


def _console() -> Any:  # a rich Console
    from rich.console import Console

    return Console(highlight=False)


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
        queues=args.queue,
        prune_interval=args.prune_interval,
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
    served = "every queue" if args.queue is None else "queue(s) " + ",".join(args.queue)
    logging.getLogger("sitq").info(
        "worker %s on %s (%s), %s; Ctrl-C stops it",
        worker.worker_id,
        describe_target(args.path),
        served,
        f"{worker.processes} processes" if worker.processes else f"concurrency {worker.max_concurrency}",
    )
    try:
        await (worker.drain() if args.drain else worker.start())
    finally:
        await backend.close()
    logging.getLogger("sitq").info("worker stopped after %d task(s), %d failed", worker.processed, worker.failed)
    return 0


# -- sitq status -----------------------------------------------------------------


async def run_status(args: argparse.Namespace) -> int:
    from sitq import terminal

    async with TaskQueue(_existing_backend(args.path)) as queue:
        title = describe_target(args.path)
        if not args.watch:
            overview = await queue.overview(args.limit)
            if args.json:
                print(terminal.overview_json(overview))
            else:
                console = _console()
                console.print(terminal.board(overview, title, width=console.width))
            return 0
        await _watch(queue, title, args.limit, args.interval)
    return 0


async def _watch(queue: TaskQueue, title: str, limit: int, interval: float) -> None:
    """Redraw the board whenever the store changes (at most every ``interval`` seconds, at least
    every few), with the rate at which tasks finish, until Ctrl-C."""
    from rich.live import Live

    from sitq import terminal

    backend = queue.backend
    loop = asyncio.get_running_loop()
    samples: list[tuple[float, int]] = []
    console = _console()
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while True:
            token = backend.change_token
            overview = await queue.overview(limit)
            now = loop.time()
            samples = [*samples, (now, _finished(overview))][-20:]
            while len(samples) > 2 and now - samples[0][0] > 10:
                samples.pop(0)
            rate = None
            if len(samples) > 1 and samples[-1][0] > samples[0][0]:
                rate = max(samples[-1][1] - samples[0][1], 0) / (samples[-1][0] - samples[0][0])
            board = terminal.board(overview, f"{title} (watching; Ctrl-C stops)", rate, console.width)
            live.update(board, refresh=True)
            await asyncio.sleep(interval)
            await backend.wait_for_change(token, 5.0)


def _finished(overview: QueueOverview) -> int:
    return sum(n for state, n in overview.counts.items() if state in FINISHED_STATES)


# -- sitq result, cancel, retry ----------------------------------------------------


async def run_result(args: argparse.Namespace) -> int:
    from sitq import terminal

    async with TaskQueue(_existing_backend(args.path)) as queue:
        task_id = await queue.resolve(args.task)
        timeout = None if args.wait == float("inf") else args.wait
        result = await queue.get_result(task_id, timeout=timeout)
        if result is None:
            info = await queue.status(task_id)
            state = info.status if info is not None else "unknown"
            raise SitqError(f"task {terminal.short_id(task_id)} is {state}: it has no result yet (--wait waits)")
        value = queue.deserialize_result(result) if result.status == SUCCESS else None
    if args.json:
        print(terminal.result_json(result, value))
    else:
        _console().print(terminal.result_view(result, value))
    if result.status != SUCCESS:
        print(f"sitq: task {terminal.short_id(task_id)} {_ended(result)}", file=sys.stderr)
        return 1
    return 0


def _ended(result: Result) -> str:
    return f"failed: {result.error}" if result.status == FAILED else f"was {result.status}"


async def _resolve_all(queue: TaskQueue, fragments: Sequence[str]) -> tuple[list[str], list[str]]:
    """The full ids of the fragments that name one task, and a reason for each that does not."""
    ids, problems = [], []
    for fragment in fragments:
        try:
            ids.append(await queue.resolve(fragment))
        except SitqError as exc:
            problems.append(str(exc))
    return ids, problems


async def run_cancel(args: argparse.Namespace) -> int:
    from sitq import terminal

    async with TaskQueue(_writable_backend(args.path)) as queue:
        ids, problems = await _resolve_all(queue, args.tasks)
        for task_id in ids:
            done = await queue.cancel(task_id)
            print(f"{terminal.short_id(task_id)} {_CANCEL_WORDS.get(str(done), str(done))}")
    for problem in problems:
        print(f"sitq: {problem}", file=sys.stderr)
    return 1 if problems else 0


_CANCEL_WORDS = {
    "cancelled": "cancelled: it will not run",
    "requested": "cancel requested: its worker stops it",
    "finished": "had finished already: nothing changed",
}


async def run_retry(args: argparse.Namespace) -> int:
    from sitq import terminal

    if bool(args.tasks) == args.failed:
        raise SitqError("sitq retry takes task ids or --failed, one of them")
    async with TaskQueue(_writable_backend(args.path)) as queue:
        if args.failed:
            ids: list[str] = []
            problems: list[str] = []
            while page := await queue.list_tasks("failed", queue=args.queue, limit=1000, offset=len(ids)):
                ids += [info.task_id for info in page]
        else:
            ids, problems = await _resolve_all(queue, args.tasks)
        done = await queue.retry(ids)
    if args.failed:
        print(f"{sum(1 for outcome in done.values() if outcome == 'retried')} failed task(s) retried")
    else:
        for task_id, outcome in done.items():
            words = {"retried": "retried: pending again", "succeeded": "had succeeded: nothing to retry",
                     "unfinished": "has not finished: nothing to retry"}
            print(f"{terminal.short_id(task_id)} {words.get(str(outcome), str(outcome))}")
    for problem in problems:
        print(f"sitq: {problem}", file=sys.stderr)
    return 1 if problems else 0


# -- sitq purge, unschedule ----------------------------------------------------------


async def run_purge(args: argparse.Namespace) -> int:
    async with TaskQueue(_writable_backend(args.path)) as queue:
        report = await queue.purge(older_than=args.older_than, status=args.status, dry_run=args.dry_run)
    verb = "would delete" if report.dry_run else "deleted"
    print(f"{verb} {report.tasks} finished task(s), {_size(report.bytes)} of stored data")
    return 0


def _size(nbytes: int) -> str:
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= factor:
            return f"{nbytes / factor:.1f} {unit}"
    return f"{nbytes} bytes"


async def run_unschedule(args: argparse.Namespace) -> int:
    async with TaskQueue(_writable_backend(args.path)) as queue:
        if not await queue.unschedule(args.name):
            raise SitqError(f"no schedule named {args.name!r} (sitq status lists them)")
    print(f"schedule {args.name!r} removed; the tasks it enqueued stay")
    return 0


# -- sitq demo -----------------------------------------------------------------


async def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Group
    from rich.live import Live
    from rich.markup import escape
    from rich.panel import Panel
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.syntax import Syntax

    from sitq import terminal
    from sitq.demo import demo_calls

    console = _console()
    backend = open_backend(args.path)
    queue = TaskQueue(backend)
    worker = Worker(backend, max_concurrency=args.concurrency, poll_interval=0.2)
    started = time.monotonic()
    ids = [await queue.enqueue(func, *call_args) for func, call_args in demo_calls()]
    console.print(f"Enqueued {len(ids)} tasks into [bold]{escape(args.path)}[/]; "
                  f"a worker runs {args.concurrency} at a time.")

    bar = Progress(TextColumn("tasks"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar_task = bar.add_task("tasks", total=len(ids))
    running = asyncio.get_running_loop().create_task(worker.drain())
    with Live(console=console, refresh_per_second=10, transient=True) as live:
        while not running.done():
            infos = await queue.statuses(ids)
            bar.update(bar_task, completed=sum(1 for info in infos.values() if info.finished))
            now_running = [infos[i] for i in ids if i in infos and infos[i].status == "running"]
            live.update(Group(bar, terminal.tasks_table(now_running, "running", console.width)))
            await asyncio.sleep(0.1)
    await running

    # every task has finished (the worker drained the queue), so each has a result
    results = [r for task_id in ids if (r := await queue.get_result(task_id, timeout=0)) is not None]
    values = {r.task_id: queue.deserialize_result(r) for r in results if r.status == SUCCESS}
    failed = sum(1 for r in results if r.status == FAILED)
    console.print(f"{len(results)} tasks ran in {time.monotonic() - started:.1f} s: "
                  f"[green]{len(values)} succeeded[/], [red]{failed} failed[/].")
    console.rule("Results")
    for result in results:
        if result.task_id in values:
            shown = escape(repr(values[result.task_id]))
        else:
            shown = f"[red]{escape(result.error or '')}[/]"
        name = escape(terminal.ellipsize(result.name, terminal.NAME_WIDTH))
        console.print(f"[dim]{terminal.short_id(result.task_id)}[/] {name}: {shown}")
    for result in (r for r in results if r.status == FAILED):
        shown = result.traceback or result.error or ""  # a task failed for losing its worker has no traceback
        console.print(Panel(Syntax(shown, "pytb", theme="ansi_dark", word_wrap=True), title=f"{result.name} failed"))
    await queue.close()
    console.print(
        f"The tasks stay in [bold]{escape(args.path)}[/]: see them with [bold]sitq status {escape(args.path)}[/], "
        f"and one with [bold]sitq result {escape(args.path)} ID[/]."
    )
    return 0

