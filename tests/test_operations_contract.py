"""The contract's operations, run against every backend of tests/backends.py: named queues
and priorities, dependencies, dedupe keys, groups, retention, retries by hand, hand-backs,
schedules, id lookups and listings. Expectations come from sitq.backends.rules where a rule
decides.
"""

import asyncio

import pytest

from sitq.backends.rules import (
    CancelOutcome,
    RetryOutcome,
    dependency_error,
    key_task_id,
    schedule_task_id,
)
from sitq.core import Enqueued, NewTask, NewTaskBatch, Outcome, OutcomeKind, Schedule
from sitq.errors import BackendError, InvalidTaskError
from sitq.queue import new_task_id

NOW = 1_000_000.0


@pytest.fixture
def backend(store):
    """Every backend of tests/backends.py in turn (conftest's ``store``)."""
    return store


def task(name="f", *, at=NOW, eta=None, **fields):
    task_id = fields.pop("task_id", None) or new_task_id(at)
    return NewTask(task_id, name, b"func", b"args-" + task_id.encode(), at if eta is None else eta, at, **fields)


def outcome(claimed, kind=OutcomeKind.SUCCESS, at=NOW + 1, **fields):
    return Outcome(claimed.task_id, claimed.handle, claimed.attempts, kind, at, **fields)


async def status_of(backend, task_id):
    return (await backend.fetch_info([task_id]))[task_id].status


async def finish_all(backend, kind=OutcomeKind.SUCCESS, at=NOW + 1, worker="w"):
    claimed = await backend.claim(worker, 100, at, at + 60)
    assert await backend.finish(worker, [outcome(c, kind, at) for c in claimed]) == [True] * len(claimed)
    return claimed


# -- named queues and priorities ------------------------------------------------------


def test_claims_run_higher_priority_first_then_oldest_eta_then_enqueue_order(backend, run):
    async def main():
        low_old = task("low-old", eta=NOW - 10)
        high = [task(f"high-{i}", priority=5, at=NOW + i * 0.001) for i in range(3)]
        low_new = task("low-new", eta=NOW - 5)
        await backend.enqueue([low_old, *high, low_new])
        claimed = await backend.claim("w", 4, NOW + 1, NOW + 60)
        # Returned in enqueue order; the one left behind is the lowest priority with the latest eta.
        assert [c.name for c in claimed] == ["low-old", "high-0", "high-1", "high-2"]
        assert [c.name for c in await backend.claim("w", 4, NOW + 1, NOW + 60)] == ["low-new"]

    run(main())


def test_a_worker_claims_only_from_the_queues_it_serves(backend, run):
    async def main():
        a, b, default = task("a", queue="a"), task("b", queue="b", priority=3), task("d")
        await backend.enqueue([a, b, default])
        assert await backend.claim("w", 10, NOW, NOW + 60, queues=["nothing-here"]) == []
        assert [c.name for c in await backend.claim("w", 10, NOW, NOW + 60, queues=["a"])] == ["a"]
        assert [c.name for c in await backend.claim("w", 1, NOW, NOW + 60, queues=["default", "b"])] == ["b"]
        assert [c.name for c in await backend.claim("w", 10, NOW, NOW + 60)] == ["d"]  # None: every queue

    run(main())


def test_next_eta_looks_only_at_the_queues_asked_for(backend, run):
    async def main():
        await backend.enqueue([task("a", queue="a", eta=NOW + 30), task("b", queue="b", eta=NOW + 10, priority=2),
                               task("b2", queue="b", eta=NOW + 5)])
        assert await backend.next_eta() == NOW + 5
        assert await backend.next_eta(["a"]) == NOW + 30
        assert await backend.next_eta(["b"]) == NOW + 5
        assert await backend.next_eta(["c"]) is None

    run(main())


def test_counts_are_kept_per_queue_and_state(backend, run):
    async def main():
        await backend.enqueue([task("a1", queue="a"), task("a2", queue="a"), task("b1", queue="b")])
        claimed = await backend.claim("w", 1, NOW, NOW + 60, queues=["a"])
        await backend.finish("w", [outcome(claimed[0], OutcomeKind.FAILED, error="E: x")])
        overview = await backend.overview(10)
        assert overview.counts["pending"] == 2 and overview.counts["failed"] == 1
        assert overview.queues["a"]["pending"] == 1 and overview.queues["a"]["failed"] == 1
        assert overview.queues["b"]["pending"] == 1 and overview.queues["b"]["failed"] == 0
        assert [t.task_id for t in overview.failures] == [claimed[0].task_id]

    run(main())


# -- dependencies -----------------------------------------------------------------------


def test_a_task_waits_until_every_task_it_runs_after_succeeded(backend, run):
    async def main():
        first, second = task("first"), task("second", at=NOW + 0.001)
        reduce = task("reduce", at=NOW + 0.002, after=(first.task_id, second.task_id))
        assert await backend.enqueue([first, second, reduce]) == [Enqueued.INSERTED] * 3
        assert await status_of(backend, reduce.task_id) == "waiting"
        claimed = await backend.claim("w", 10, NOW + 1, NOW + 60)
        assert [c.name for c in claimed] == ["first", "second"]  # the waiting task is not ready
        await backend.finish("w", [outcome(claimed[0])])
        assert await status_of(backend, reduce.task_id) == "waiting"
        await backend.finish("w", [outcome(claimed[1])])
        assert await status_of(backend, reduce.task_id) == "pending"
        assert [c.name for c in await backend.claim("w", 10, NOW + 1, NOW + 60)] == ["reduce"]

    run(main())


@pytest.mark.parametrize("kind", [OutcomeKind.FAILED, OutcomeKind.CANCELLED])
def test_a_dependency_that_does_not_succeed_cancels_the_tasks_after_it_in_turn(backend, kind, run):
    async def main():
        dep = task("dep")
        middle = task("middle", at=NOW + 0.001, after=(dep.task_id,))
        last = task("last", at=NOW + 0.002, after=(middle.task_id,))
        await backend.enqueue([dep, middle, last])
        (claimed,) = await backend.claim("w", 10, NOW + 1, NOW + 60)
        await backend.finish("w", [outcome(claimed, kind, at=NOW + 2, error="E: boom")])
        infos = await backend.fetch_info([middle.task_id, last.task_id])
        assert infos[middle.task_id].status == "cancelled"
        assert infos[middle.task_id].error == dependency_error(dep.task_id, "dep", kind.status)
        assert infos[last.task_id].status == "cancelled"
        assert infos[last.task_id].error == dependency_error(middle.task_id, "middle", "cancelled")
        counts = (await backend.overview(0)).counts
        assert counts["cancelled"] == 2 + (kind is OutcomeKind.CANCELLED) and counts["waiting"] == 0

    run(main())


def test_dependencies_finished_before_the_task_is_enqueued_decide_at_once(backend, run):
    async def main():
        good, bad = task("good"), task("bad", at=NOW + 0.001)
        await backend.enqueue([good, bad])
        c_good, c_bad = await backend.claim("w", 10, NOW + 1, NOW + 60)
        await backend.finish("w", [outcome(c_good), outcome(c_bad, OutcomeKind.FAILED, error="E: x")])
        after_good = task("after-good", at=NOW + 2, after=(good.task_id,))
        after_both = task("after-both", at=NOW + 2.001, after=(good.task_id, bad.task_id))
        await backend.enqueue([after_good, after_both])
        infos = await backend.fetch_info([after_good.task_id, after_both.task_id])
        assert infos[after_good.task_id].status == "pending"
        assert infos[after_both.task_id].status == "cancelled"
        assert infos[after_both.task_id].error == dependency_error(bad.task_id, "bad", "failed")

    run(main())


def test_a_dependency_that_names_no_earlier_task_stores_nothing(backend, run):
    async def main():
        later = task("later", at=NOW + 1)
        before = task("before", after=(later.task_id,))  # later comes after it in the same call
        with pytest.raises(InvalidTaskError, match="no task with that id"):
            await backend.enqueue([before, later])
        with pytest.raises(InvalidTaskError, match="no task with that id"):
            await backend.enqueue([task("x", after=("0" * 32,))])
        assert (await backend.overview(10)).total == 0

    run(main())


def test_cancelling_a_waiting_task_cancels_it_and_the_tasks_after_it(backend, run):
    async def main():
        dep = task("dep")
        waiting = task("waiting", at=NOW + 0.001, after=(dep.task_id,))
        last = task("last", at=NOW + 0.002, after=(waiting.task_id,))
        await backend.enqueue([dep, waiting, last])
        assert await backend.cancel(waiting.task_id, NOW + 1) == CancelOutcome.CANCELLED
        assert await status_of(backend, last.task_id) == "cancelled"
        await finish_all(backend)  # the dependency succeeding later changes nothing
        assert await status_of(backend, waiting.task_id) == "cancelled"

    run(main())


def test_a_batch_runs_after_the_same_tasks(backend, run):
    async def main():
        dep = task("dep")
        await backend.enqueue([dep])
        batch = NewTaskBatch("item", b"func", NOW, NOW, 1, [new_task_id(NOW) for _ in range(3)],
                             [b"a", b"b", b"c"], [None] * 3, after=(dep.task_id,))
        await backend.enqueue(batch)
        assert {t.status for t in (await backend.fetch_info(batch.task_ids)).values()} == {"waiting"}
        await finish_all(backend)
        assert {t.status for t in (await backend.fetch_info(batch.task_ids)).values()} == {"pending"}

    run(main())


# -- dedupe keys --------------------------------------------------------------------------


def keyed(key, name="f", **fields):
    return task(name, task_id=key_task_id(key), key=key, **fields)


def test_a_keyed_task_enqueued_again_is_the_same_task(backend, run):
    async def main():
        assert await backend.enqueue([keyed("k")]) == [Enqueued.INSERTED]
        assert await backend.enqueue([keyed("k", name="other")]) == [Enqueued.EXISTING]
        (claimed,) = await backend.claim("w", 10, NOW + 1, NOW + 60)
        assert await backend.enqueue([keyed("k")]) == [Enqueued.EXISTING]  # running
        await backend.finish("w", [outcome(claimed)])
        assert await backend.enqueue([keyed("k")]) == [Enqueued.EXISTING]  # succeeded, not expired
        info = (await backend.fetch_info([key_task_id("k")]))[key_task_id("k")]
        assert (info.name, info.status, info.key, info.attempts) == ("f", "success", "k", 1)
        assert (await backend.overview(0)).total == 1

    run(main())


@pytest.mark.parametrize("kind", [OutcomeKind.FAILED, OutcomeKind.CANCELLED])
def test_a_keyed_task_that_did_not_succeed_runs_again_in_its_place(backend, kind, run):
    async def main():
        await backend.enqueue([keyed("k", retention=100)])
        (claimed,) = await backend.claim("w", 10, NOW + 1, NOW + 60)
        await backend.finish("w", [outcome(claimed, kind, error="E: x")])
        assert await backend.enqueue([keyed("k", name="fixed", replace_failed=False)]) == [Enqueued.EXISTING]
        assert await backend.enqueue([keyed("k", name="fixed")]) == [Enqueued.REPLACED]
        result = await backend.fetch_result(key_task_id("k"))
        assert (result.name, result.status, result.attempts, result.error) == ("fixed", "pending", 0, None)
        counts = (await backend.overview(0)).counts
        assert counts["pending"] == 1 and counts[kind.status] == 0

    run(main())


def test_a_keyed_task_past_its_retention_counts_as_gone(backend, run):
    async def main():
        await backend.enqueue([keyed("k", retention=10)])
        await finish_all(backend, at=NOW + 1)
        assert await backend.enqueue([keyed("k", at=NOW + 5)]) == [Enqueued.EXISTING]
        assert await backend.enqueue([keyed("k", at=NOW + 12)]) == [Enqueued.REPLACED]

    run(main())


def test_an_unkeyed_task_whose_id_is_taken_is_refused(backend, run):
    async def main():
        first = task("f")
        await backend.enqueue([first])
        with pytest.raises(BackendError):
            await backend.enqueue([task("g", task_id=first.task_id)])
        assert (await backend.overview(0)).total == 1

    run(main())


# -- groups ---------------------------------------------------------------------------------


def test_a_group_counts_its_tasks_as_they_move(backend, run):
    async def main():
        ids = [new_task_id(NOW) for _ in range(4)]
        batch = NewTaskBatch("work", b"func", NOW, NOW, 1, ids, [b"%d" % i for i in range(4)], [None] * 4,
                             group_id="g", group_name="work", retention=5)
        await backend.enqueue(batch)
        assert await backend.group("nope") is None
        group = await backend.group("g")
        assert (group.name, group.total, group.counts["pending"]) == ("work", 4, 4)
        claimed = await backend.claim("w", 3, NOW + 1, NOW + 60)
        await backend.finish("w", [outcome(claimed[0]), outcome(claimed[1], OutcomeKind.FAILED, error="E: x")])
        counts = (await backend.group("g")).counts
        assert (counts["pending"], counts["running"], counts["success"], counts["failed"]) == (1, 1, 1, 1)
        assert [g.group_id for g in (await backend.overview(5)).groups] == ["g"]
        members = await backend.find_tasks(group_id="g", newest_first=False)
        assert [m.task_id for m in members] == ids
        assert [m.task_id for m in await backend.find_tasks(group_id="g", statuses=["failed"])] == [ids[1]]
        # Pruned: the finished ones go; the group stays while it holds tasks, and goes with its last.
        await backend.prune(NOW + 10, 100)
        assert (await backend.group("g")).total == 2
        await backend.finish("w", [outcome(claimed[2])])
        (last,) = await backend.claim("w", 3, NOW + 1, NOW + 60)
        await backend.finish("w", [outcome(last, at=NOW + 2)])
        await backend.prune(NOW + 10, 100)
        assert await backend.group("g") is None

    run(main())


# -- retention, prune and purge ------------------------------------------------------------


def test_prune_deletes_only_finished_tasks_past_their_retention(backend, run):
    async def main():
        short = [task(f"short-{i}", at=NOW + i * 0.001, retention=10) for i in range(3)]
        forever = task("forever", at=NOW + 0.01, retention=None)
        await backend.enqueue([*short, forever])
        claimed = await backend.claim("w", 3, NOW + 1, NOW + 60)  # short-0..2 run, forever stays pending
        await backend.finish("w", [outcome(claimed[0], at=NOW + 1), outcome(claimed[1], at=NOW + 5)])
        assert (await backend.prune(NOW + 10, 100)).tasks == 0  # nothing expired yet
        token = backend.change_token
        await backend.prune(NOW + 10.5, 100)
        assert backend.change_token == token  # a prune that deletes nothing wakes no one
        report = await backend.prune(NOW + 11, 100)
        assert report.tasks == 1 and report.bytes > len(b"func")
        assert await backend.fetch_result(claimed[0].task_id) is None
        report = await backend.prune(NOW + 1000, 100)
        assert report.tasks == 1  # the running one and the pending one that is kept for ever stay
        left = {t.name: t.status for t in (await backend.overview(10)).recent}
        assert left == {"short-2": "running", "forever": "pending"}
        assert (await backend.overview(0)).counts["success"] == 0

    run(main())


def test_prune_takes_at_most_its_limit(backend, run):
    async def main():
        await backend.enqueue([task(f"t{i}", at=NOW + i * 0.001, retention=0) for i in range(5)])
        await finish_all(backend)
        assert (await backend.prune(NOW + 2, 3)).tasks == 3
        assert (await backend.prune(NOW + 2, 3)).tasks == 2

    run(main())


def test_purge_deletes_finished_tasks_by_state_and_age_and_can_only_count(backend, run):
    async def main():
        await backend.enqueue([task(f"t{i}", at=NOW + i * 0.001) for i in range(4)])
        claimed = await backend.claim("w", 3, NOW + 1, NOW + 60)
        await backend.finish("w", [outcome(claimed[0], at=NOW + 1),
                                   outcome(claimed[1], OutcomeKind.FAILED, at=NOW + 100, error="E: x")])
        await backend.finish("w", [outcome(claimed[2], OutcomeKind.CANCELLED, at=NOW + 200)])
        counted = await backend.purge(statuses=["success", "failed", "cancelled"], finished_before=NOW + 150,
                                      dry_run=True)
        assert (counted.tasks, counted.dry_run) == (2, True)
        assert (await backend.overview(0)).total == 4  # a dry run deletes nothing
        would = await backend.purge(statuses=["failed"], finished_before=None, dry_run=True)
        done = await backend.purge(statuses=["failed"], finished_before=None)
        assert (done.tasks, done.bytes, done.dry_run) == (1, would.bytes, False) and done.bytes > 0
        left = {t.status for t in (await backend.overview(10)).recent}
        assert left == {"success", "cancelled", "pending"}
        assert (await backend.purge(statuses=["pending", "running"], finished_before=None)).tasks == 0

    run(main())


# -- retry by hand and hand-backs ----------------------------------------------------------


def test_retry_by_hand_runs_failed_and_cancelled_tasks_once_more(backend, run):
    async def main():
        tasks = [task(f"t{i}", at=NOW + i * 0.001) for i in range(4)]
        await backend.enqueue(tasks)
        claimed = await backend.claim("w", 3, NOW + 1, NOW + 60)
        await backend.finish("w", [outcome(claimed[0], OutcomeKind.FAILED, error="E: x", traceback="tb"),
                                   outcome(claimed[1])])
        assert await backend.cancel(tasks[3].task_id, NOW + 2) == CancelOutcome.CANCELLED
        ids = [t.task_id for t in tasks] + ["0" * 32]
        assert await backend.retry(ids, NOW + 3) == {
            tasks[0].task_id: RetryOutcome.RETRIED, tasks[1].task_id: RetryOutcome.SUCCEEDED,
            tasks[2].task_id: RetryOutcome.UNFINISHED, tasks[3].task_id: RetryOutcome.RETRIED,
        }
        result = await backend.fetch_result(tasks[0].task_id)
        assert (result.status, result.error, result.traceback, result.attempts) == ("pending", None, None, 1)
        again = await backend.claim("w", 10, NOW + 3, NOW + 60)
        assert {c.task_id: c.attempts for c in again} == {tasks[0].task_id: 2, tasks[3].task_id: 1}

    run(main())


def test_a_released_claim_is_pending_again_as_if_never_claimed(backend, run):
    async def main():
        await backend.enqueue([task("a"), task("b", at=NOW + 0.001)])
        a, b = await backend.claim("w", 2, NOW + 1, NOW + 60)
        assert await backend.release("other", [(a.handle, a.attempts)]) == [False]  # not its claim
        assert await backend.release("w", [(a.handle, a.attempts), (b.handle, b.attempts + 1)]) == [True, False]
        info = (await backend.fetch_info([a.task_id]))[a.task_id]
        assert (info.status, info.attempts, info.worker_id, info.started_at) == ("pending", 0, None, None)
        (again,) = await backend.claim("w", 2, NOW + 1, NOW + 60)
        assert (again.task_id, again.attempts) == (a.task_id, 1)
        token = backend.change_token
        assert await backend.release("w", [(b.handle, b.attempts + 5)]) == [False]
        assert backend.change_token == token  # a release that changed nothing wakes no one

    run(main())


# -- schedules -------------------------------------------------------------------------------


def schedule(name="tick", every=60.0, next_run=NOW + 60, **fields):
    return Schedule(name, "tick_task", b"func", b"args", None, every, None, "UTC", next_run, **fields)


def test_a_schedule_declared_again_with_the_same_period_keeps_its_next_run(backend, run):
    async def main():
        await backend.set_schedule(schedule(next_run=NOW + 60))
        await backend.set_schedule(schedule(next_run=NOW + 999, queue="other"))
        (info,) = await backend.schedules()
        assert info.next_run.timestamp() == NOW + 60 and info.queue == "other"
        await backend.set_schedule(schedule(every=30.0, next_run=NOW + 30))
        (info,) = await backend.schedules()
        assert (info.every, info.next_run.timestamp()) == (30.0, NOW + 30)
        assert await backend.delete_schedule("tick") is True
        assert await backend.delete_schedule("tick") is False
        assert await backend.schedules() == []

    run(main())


def test_each_tick_is_fired_once_however_many_workers_try(backend, run):
    async def main():
        await backend.set_schedule(schedule(next_run=NOW + 60))
        assert await backend.due_schedules(NOW + 59) == []
        (due,) = await backend.due_schedules(NOW + 61)
        tick = task("tick_task", at=NOW + 61, task_id=schedule_task_id("tick", due.next_run))
        fired = await asyncio.gather(*(backend.fire_schedule("tick", due.next_run, NOW + 120, NOW + 61, tick)
                                       for _ in range(5)))
        assert sorted(fired) == [False] * 4 + [True]
        (info,) = await backend.schedules()
        assert (info.next_run.timestamp(), info.last_run.timestamp()) == (NOW + 120, NOW + 60)
        assert (await backend.overview(10)).total == 1
        assert await status_of(backend, tick.task_id) == "pending"
        token = backend.change_token
        assert await backend.fire_schedule("tick", due.next_run, NOW + 120, NOW + 62, tick) is False
        assert backend.change_token == token

    run(main())


# -- lookups ---------------------------------------------------------------------------------


def test_ids_are_found_whole_or_by_their_beginning_or_end(backend, run):
    async def main():
        a = task("a", task_id="0123456789abcdef0123456789aaaa11")
        b = task("b", task_id="0123456789abcdef0123456789bbbb22")
        await backend.enqueue([a, b])
        assert await backend.match_ids(a.task_id) == [a.task_id]
        assert await backend.match_ids("aaaa11") == [a.task_id]
        assert await backend.match_ids("0123456789abcdef0123456789b") == [b.task_id]
        assert await backend.match_ids("0123") == sorted([a.task_id, b.task_id])
        assert await backend.match_ids("ffff") == []

    run(main())


def test_find_tasks_filters_orders_and_pages(backend, run):
    async def main():
        tasks = [task(f"t{i}", at=NOW + i * 0.001, queue="a" if i % 2 else "b") for i in range(6)]
        await backend.enqueue(tasks)
        newest = await backend.find_tasks(limit=2)
        assert [t.name for t in newest] == ["t5", "t4"]
        assert [t.name for t in await backend.find_tasks(limit=2, offset=2)] == ["t3", "t2"]
        assert [t.name for t in await backend.find_tasks(queue="a", newest_first=False)] == ["t1", "t3", "t5"]
        assert await backend.find_tasks(statuses=["running"]) == []

    run(main())


def test_counts_stay_exact_through_every_kind_of_move(backend, run):
    async def main():
        tasks = [task(f"t{i}", at=NOW + i * 0.001, retention=1) for i in range(8)]
        await backend.enqueue(tasks)
        claimed = await backend.claim("w", 5, NOW + 1, NOW + 2)
        await backend.finish("w", [outcome(claimed[0]), outcome(claimed[1], OutcomeKind.FAILED, error="E"),
                                   outcome(claimed[2], OutcomeKind.RETRY, retry_at=NOW + 1)])
        await backend.cancel(tasks[7].task_id, NOW + 1)
        await backend.requeue_expired(NOW + 10)  # claimed[3:5] lost their worker
        await backend.retry([claimed[1].task_id], NOW + 11)
        await backend.prune(NOW + 1.5, 100)

        def truth(rows):
            counts = {}
            for info in rows:
                counts[info.status] = counts.get(info.status, 0) + 1
            return counts

        overview = await backend.overview(100)
        assert {s: n for s, n in overview.counts.items() if n} == truth(overview.recent)

    run(main())


def test_every_store_takes_queue_priority_group_and_key_into_its_records(backend, run):
    async def main():
        t = keyed("k", queue="q", priority=7, group_id="g", group_name="grp")
        await backend.enqueue([t])
        info = (await backend.fetch_info([t.task_id]))[t.task_id]
        assert (info.queue, info.priority, info.group_id, info.key) == ("q", 7, "g", "k")

    run(main())



def test_many_results_are_read_at_once_in_any_state(backend, run):
    async def main():
        tasks = [task(f"t{i}", at=NOW + i * 0.001) for i in range(3)]
        await backend.enqueue(tasks)
        (first, _) = await backend.claim("w", 2, NOW + 1, NOW + 60)
        await backend.finish("w", [outcome(first, value=b"v")])
        results = await backend.fetch_results([t.task_id for t in tasks] + ["0" * 32])
        assert {i: r.status for i, r in results.items()} == {
            tasks[0].task_id: "success", tasks[1].task_id: "running", tasks[2].task_id: "pending"}
        assert results[tasks[0].task_id].value == b"v"

    run(main())
