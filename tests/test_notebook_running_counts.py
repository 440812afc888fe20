"""The views of the kernel's worker never count more tasks running than the worker has slots,
wherever their reads of the store fall among the worker's claims and outcome writes.

Many tiny tasks through two slots (threads, coroutines, processes), with the notebook's runtime and
a real worker on a real SQLite file, and in threads on a real PostgreSQL server, without a kernel.
The refresher redraws a group widget, task widgets and a board after every change, and a static
board is read back to back meanwhile; every picture drawn is checked.
Without Worker.look the board showed up to 128 running.
"""

import asyncio
import datetime as dt
import time

import pytest

pytest.importorskip("ipywidgets")

import sitq.notebook as sn
from sitq.notebook import refresher as refresher_module
from sitq.notebook.refresher import GroupWatch
from sitq.notebook.rows import GroupRow
from sitq.notebook.widgets import BoardWidget, GroupWidget, TaskWidget

SLOTS = 2
TASKS = 10_000
START = 2.0  # seconds from the map to its first claim
WATCHED = range(5000, 5200)  # members with a task widget each: claimed many to a run by then


async def nap(x):
    await asyncio.sleep(0)  # a coroutine that never awaits is never seen running: it ends in the step it starts
    return x


def brief(x):  # on PostgreSQL a view's read awaits the server, and the worker's loop settles abs() meanwhile
    time.sleep(0.0005)
    return x


MODES = {
    "threads": ({"concurrency": SLOTS}, abs),
    "coroutines": ({"concurrency": SLOTS}, nap),
    "processes": ({"processes": SLOTS}, abs),
    "threads-postgres": ({"concurrency": SLOTS}, brief),
}


@pytest.fixture(params=list(MODES))
def mode(request, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(refresher_module, "COALESCE", 0.0)  # redraw after every change, not 20 times a second
    settings, func = MODES[request.param]
    # conftest's postgres_target skips without a server and drops its schema after this fixture ends
    target = request.getfixturevalue("postgres_target") if request.param.endswith("-postgres") else "running.db"
    rt = sn.start_worker(target, **settings)
    yield rt, func
    sn.stop_worker(timeout=30)


class Pictures:
    """The running counts of every picture the views drew."""

    def __init__(self) -> None:
        self.running: dict[str, list[int]] = {"board": [], "group widget": [], "task widgets": [],
                                              "static board": []}
        self.round: dict[str, str] = {}  # task id -> the state its widget shows in this refresh

    def highest(self) -> dict[str, int]:
        return {view: max(counts, default=0) for view, counts in self.running.items()}

    def watch_board(self, board: BoardWidget) -> None:
        show = board.show

        def drawn(counts, rows, *args, **kwargs):
            self.running["board"].append(counts.get("running", 0))
            self.running["board"] += [r.running for r in rows if isinstance(r, GroupRow)]
            show(counts, rows, *args, **kwargs)

        board.show = drawn

    def watch_group(self, widget: GroupWidget) -> None:
        show = widget.show

        def drawn(row, *args, **kwargs):
            self.running["group widget"].append(row.running)
            show(row, *args, **kwargs)

        widget.show = drawn

    def watch_task(self, widget: TaskWidget) -> None:
        show = widget.show

        def drawn(row):
            self.round[row.task_id] = row.status
            show(row)

        widget.show = drawn

    def watch_refreshes(self, refresher, monkeypatch) -> None:
        refresh = refresher.refresh

        async def one_refresh():  # the task widgets drawn in one refresh come from one read
            self.round = {}
            await refresh()
            self.running["task widgets"].append(sum(s == "running" for s in self.round.values()))

        monkeypatch.setattr(refresher, "refresh", one_refresh)


async def read_static_board(rt, group_id):
    """Read the board back to back (as a board drawn without widgets does) until the group has finished."""
    counts = []
    while True:
        board_counts, rows, *_ = await rt.refresher.board_rows(5)
        counts.append(board_counts.get("running", 0))
        counts += [r.running for r in rows if isinstance(r, GroupRow)]
        info = await rt.queue.group(group_id)
        if info.finished == info.total:
            return counts


def test_views_never_count_more_running_than_the_worker_has_slots(mode, monkeypatch):
    rt, func = mode
    pictures = Pictures()
    pictures.watch_refreshes(rt.refresher, monkeypatch)
    # Due in a moment, so that every view is in place before the first task is claimed.
    group = sn.map(func, range(TASKS), eta=dt.timedelta(seconds=START))
    group.stored(60)
    board = rt.board(limit=5)
    pictures.watch_board(board)
    group_widget = GroupWidget(group.group_id, group.name)
    pictures.watch_group(group_widget)
    rt.refresher.add_group(group_widget, GroupWatch(group.group_id, group.name))
    for i in WATCHED:
        task_widget = TaskWidget(group.task_ids[i])
        pictures.watch_task(task_widget)
        rt.refresher.add_task(task_widget)
    pictures.running["static board"] = rt.run(read_static_board(rt, group.group_id), timeout=120)
    group.wait(60)
    assert sum(len(counts) for counts in pictures.running.values()) > 100  # the views did look, often
    highest = pictures.highest()
    assert max(highest.values()) <= SLOTS, highest
    assert max(highest.values()) >= 1, highest  # and saw tasks run: the correction hides no more than waits
