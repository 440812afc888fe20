"""A map as one piece of work in the notebook layer: sitq.notebook.map's GroupHandle, its views and
the board's group rows, with a real worker on a real SQLite file (no kernel: the kernel tests run
the same in ipykernel)."""

import asyncio
import datetime as dt
import re
import threading
import time

import pytest
from notebook_support import visible_text

pytest.importorskip("ipywidgets")

import sitq
import sitq.notebook as sn
from sitq.notebook import runtime
from sitq.notebook.refresher import GroupWatch
from sitq.notebook.render import group_html, table_html
from sitq.notebook.rows import GroupRow, TaskRow
from sitq.worker import runners

GATE = threading.Event()


def square(x):
    if x == 3:
        raise ValueError(f"unlucky {x}")
    return x * x


def gated(x):
    GATE.wait(30)
    return x


async def noop():  # a read of nothing: Refresher.counted then gives only the tasks waiting in runs
    return None


@pytest.fixture
def rt(shared_target, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    GATE.clear()
    started = sn.start_worker(shared_target, concurrency=2)
    yield started
    GATE.set()
    sn.stop_worker(timeout=10)


def test_results_come_in_input_order_and_the_first_failure_is_raised(rt):
    group = sn.map(square, range(8))
    assert len(group) == 8 and group[2].result(30) == 4
    with pytest.raises(sitq.TaskFailedError, match="unlucky 3") as caught:
        group.results(30)
    assert "raise ValueError" in caught.value.traceback
    values = group.results(failures="return")
    assert [v for i, v in enumerate(values) if i != 3] == [x * x for x in range(8) if x != 3]
    assert isinstance(values[3], sitq.TaskFailedError)
    assert group.done() and group.counts["success"] == 7 and group.counts["failed"] == 1
    (failure,) = group.failures()
    assert failure.task_id == group.task_ids[3] and failure.error == "ValueError: unlucky 3"
    with pytest.raises(ValueError, match="'raise'.*'return'"):
        group.results(failures="skip")


def test_retry_failed_runs_only_the_failures_again(rt):
    group = sn.map(square, range(5))
    group.wait(30)
    first = {h.task_id: h.info().attempts for h in group}
    assert group.retry_failed() == 1
    info = group.wait(30)
    assert info.counts["failed"] == 1 and info.total == 5  # still unlucky, counted once
    again = {h.task_id: h.info().attempts for h in group}
    assert [task_id for task_id in first if again[task_id] != first[task_id]] == [group.task_ids[3]]


def test_cancel_stops_the_whole_group_at_once(rt):
    group = sn.map(gated, range(50))
    while group.counts["running"] < 2:
        pass
    done = group.cancel()
    assert done == {"cancelled": 48, "requested": 2}
    GATE.set()
    info = group.wait(30)
    assert info.counts["cancelled"] >= 48 and info.finished == 50
    assert all(isinstance(v, sitq.TaskCancelledError) for v in group.results(failures="return")[2:])


def test_as_completed_yields_every_member_once(rt):
    group = sn.map(square, range(6))
    seen = [h.task_id for h in group.as_completed(30)]
    assert sorted(seen) == sorted(group.task_ids)
    with pytest.raises(TimeoutError):
        list(sn.map(gated, range(3)).as_completed(0.2))


def test_a_group_is_found_again_by_the_end_of_its_id_and_a_key_re_attaches(rt):
    group = sn.map(square, [1, 2])
    group.wait(30)
    again = sn.group(group.group_id[-8:])
    assert again.group_id == group.group_id and again.task_ids == group.task_ids
    assert again.results() == [1, 4] and sn.lookup(group.group_id[-8:]).group_id == group.group_id
    with pytest.raises(sitq.TaskNotFoundError, match="no group"):
        sn.group("no-such-group")
    keyed = sn.map(square, [5, 6], key="squares")
    assert keyed.results(30) == [25, 36]
    rerun = sn.map(square, [5, 6], key="squares")  # the cell run again: nothing new is enqueued
    assert (rerun.group_id, rerun.task_ids) == (keyed.group_id, keyed.task_ids)
    assert rerun.info().total == 2 and rerun.results() == [25, 36]
    assert [h.info().attempts for h in rerun] == [1, 1]  # each ran once
    with pytest.raises(sitq.InvalidTaskError, match="non-empty string"):
        sn.map(square, [1], key="")


def test_a_big_map_returns_while_it_stores_and_its_methods_wait_for_it(rt, monkeypatch):
    # Time enough to store 3,000 tasks, were it waited for: a map of more than EAGER_WIDGET items is not.
    monkeypatch.setattr(runtime, "MAP_WAIT", 60)
    group = sn.map(square, [x for x in range(3000) if x != 3])
    assert group._stored is not None and repr(group).endswith("2,999 tasks>")  # drawn without a read
    assert len(group.stored(30)) == 2999
    assert group.results(60)[:3] == [0, 1, 4]
    # Cannot be pickled: storing fails in the background, and says why. (Held until map has
    # returned: a failure within MAP_WAIT would raise in the cell instead, which is not this test.)
    returned = threading.Event()
    store = rt.queue.map

    async def held(*args, **kwargs):
        await asyncio.get_running_loop().run_in_executor(None, returned.wait, 30)
        return await store(*args, **kwargs)

    monkeypatch.setattr(rt.queue, "map", held)
    monkeypatch.setattr(runtime, "MAP_WAIT", 0)  # a small map that does not wait either
    bad = sn.map(square, [threading.Lock()] * 10)
    returned.set()
    with pytest.raises(sitq.SitqError, match="lock"):
        bad.results(30)
    text = visible_text(bad._repr_mimebundle_()["text/html"])
    assert "failed" in text and "its tasks could not be stored" in text


def test_the_static_view_shows_counts_failures_and_tracebacks(rt):
    group = sn.map(square, range(5))
    group.wait(30)
    bundle = group._repr_mimebundle_()  # no kernel here: plain HTML
    text = visible_text(bundle["text/html"])
    assert "5/5 done · 1 failed" in text and "ValueError: unlucky 3" in text
    assert 'class="sitq-failure"' in bundle["text/html"] and "raise ValueError" in text
    assert bundle["text/plain"] == repr(group)


def test_group_rows_summarise_rate_and_time_left():
    row = GroupRow("g" * 32, "work", {"success": 70, "failed": 3, "running": 4, "pending": 23}, rate=10.0)
    assert row.total == 100 and row.done == 73 and row.status == "running"
    assert row.summary() == "73/100 done · 3 failed · 4 running · 10/s · 2.7s left"
    finished = GroupRow("g" * 32, "work", {"success": 9, "failed": 1})
    assert finished.finished and finished.status == "failed" and "left" not in finished.summary()
    storing = GroupRow("g" * 32, "work", {}, storing=True, expected=100_000)
    assert storing.summary() == "storing 100,000 tasks" and not storing.finished
    html = group_html(GroupRow("$1,200" + "g" * 26, "pay $5", {"success": 1}))
    assert "mathjax_ignore" in html and "pay $5" in visible_text(html)
    table = table_html([TaskRow("t1", "loose", "running"), row], page="other tasks 1–20")
    assert 'class="sitq-row sitq-group-row"' in table and "other tasks 1–20" in visible_text(table)


def test_the_board_lists_loose_tasks_stored_before_a_big_group(rt):
    early = [sn.submit(square, i, eta=dt.timedelta(hours=1)) for i in range(2)]  # pending for an hour, behind the group
    busy = sn.map(gated, range(2000))
    late = sn.submit(square, 9, eta=dt.timedelta(hours=1))
    busy.stored(30)
    counts, rows, page, newer, older = rt.run(rt.refresher.board_rows(20))
    loose = [r.task_id for r in rows if isinstance(r, TaskRow)]
    assert loose == [late.task_id, early[1].task_id, early[0].task_id] and not newer and not older
    assert page == "" and sum(isinstance(r, GroupRow) for r in rows) == 1
    assert counts["pending"] >= 1998 + 3
    *_, rows, page, newer, older = rt.run(rt.refresher.board_rows(2, page=1))  # pages of two
    assert [r.task_id for r in rows if isinstance(r, TaskRow)] == [early[0].task_id]
    assert page == "other tasks 3–3 of 3, newest first" and newer and not older
    for task in early:
        task.cancel()
    *_, rows, page, _, older = rt.run(rt.refresher.board_rows(2))
    assert [r.task_id for r in rows if isinstance(r, TaskRow)] == [late.task_id, early[1].task_id]
    assert page == "other tasks 1–2 of 3, newest first" and older  # cancelled now, still listed
    busy.cancel()


def test_the_board_shows_one_row_per_group_running_and_failed_work_first(rt):
    done = sn.map(square, range(30))
    done.wait(30)
    for i in range(25):
        sn.submit(divmod, i, 1).result(30)
    loose = [sn.submit(square, 3)]  # a failure of no group
    loose[0].outcome(30)
    busy = sn.map(gated, range(40))
    while busy.counts["running"] < 2:
        pass
    counts, rows, page, newer, older = rt.run(rt.refresher.board_rows(20))
    kinds = [("group", r.group_id) if isinstance(r, GroupRow) else (r.status, r.task_id) for r in rows]
    assert kinds[0] == ("failed", loose[0].task_id)
    assert kinds[1:3] == [("group", busy.group_id), ("group", done.group_id)]  # unfinished group first
    assert [k for k, _ in kinds[3:]] == ["success"] * 20 and older and not newer
    assert page == "other tasks 1–20 of 25, newest first"
    assert counts["pending"] + counts["running"] == 40  # the busy group's members are one row:
    assert sum(isinstance(r, GroupRow) for r in rows) == 2 and len(rows) == 23  # 1 + 2 + 20
    *_, page2, newer2, older2 = rt.run(rt.refresher.board_rows(20, page=1))
    assert page2 == "other tasks 21–25 of 25, newest first" and newer2 and not older2
    board = sn.board()
    assert re.search(r"group [0-9a-f]{8}", visible_text(board._repr_html_()))


def test_views_draw_the_tasks_waiting_in_a_run_of_the_kernels_worker_as_pending(rt, monkeypatch):
    monkeypatch.setattr(runners, "SLOW_TASK", 60)  # the worker would hand back what waits behind a slow task
    sn.map(abs, range(300)).wait(30)  # very short tasks: a slot of the worker now claims many at once
    busy = sn.map(gated, range(10))  # claimed at once, in two runs (two slots); the first of each blocks
    deadline = time.monotonic() + 30
    while len(rt.run(rt.refresher.counted(noop))[1]) != 8 or busy.counts["running"] != 10:
        assert time.monotonic() < deadline, "the worker did not claim the group in two runs"
        time.sleep(0.01)
    assert set(rt.run(rt.refresher.counted(noop))[1].values()) == {busy.group_id}
    row = rt.run(GroupWatch(busy.group_id, busy.name).row(rt.queue, rt.refresher.counted))
    assert (row.running, row.counts["pending"]) == (2, 8)  # the store says 10 running; 2 threads run
    counts, rows, *_ = rt.run(rt.refresher.board_rows(20))
    assert counts["running"] == 2 and next(r for r in rows if isinstance(r, GroupRow)).running == 2
    GATE.set()
    busy.wait(30)
    assert rt.run(rt.refresher.counted(noop))[1] == {}
