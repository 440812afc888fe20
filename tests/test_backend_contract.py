"""The storage contract, run against every backend.

A new backend is done when it passes this module: add a factory to BACKENDS.
"""

import asyncio
import time

import pytest

from sitq import SQLiteBackend, open_backend
from sitq.backends import MemoryBackend
from sitq.core import NewTask, NewTaskBatch, Outcome, OutcomeKind
from sitq.errors import BackendError
from sitq.queue import new_task_id


def _sqlite_file(tmp_path):
    return SQLiteBackend(tmp_path / "contract.db")


def _sqlite_memory(tmp_path):
    return SQLiteBackend(":memory:")


def _memory(tmp_path):
    return open_backend("memory://")


BACKENDS = {"sqlite-file": _sqlite_file, "sqlite-memory": _sqlite_memory, "memory": _memory}


@pytest.fixture(params=sorted(BACKENDS))
def make_backend(request, tmp_path):
    made = []

    def make():
        backend = BACKENDS[request.param](tmp_path)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        asyncio.run(backend.close())


def new_tasks(count, now, eta=None, name="f"):
    return [
        NewTask(new_task_id(now), name, b"func", f"args{i}".encode(), now if eta is None else eta, now)
        for i in range(count)
    ]


def test_enqueue_then_claim_returns_oldest_first_up_to_limit(make_backend, run):
    async def go():
        backend = make_backend()
        await backend.connect()
        now = time.time()
        tasks = new_tasks(5, now)
        await backend.enqueue(tasks)
        claimed = await backend.claim("w1", 3, now, now + 30)
        assert [c.task_id for c in claimed] == [t.task_id for t in tasks[:3]]
        assert all(c.attempts == 1 and c.func == b"func" for c in claimed)
        rest = await backend.claim("w2", 10, now, now + 30)
        assert [c.task_id for c in rest] == [t.task_id for t in tasks[3:]]
        assert await backend.claim("w3", 10, now, now + 30) == []

    run(go())


def test_claim_skips_tasks_whose_eta_has_not_come(make_backend, run):
    async def go():
        backend = make_backend()
        now = time.time()
        later = new_tasks(1, now, eta=now + 100)
        await backend.enqueue(later)
        assert await backend.claim("w", 5, now, now + 30) == []
        assert await backend.next_eta() == pytest.approx(now + 100)
        claimed = await backend.claim("w", 5, now + 101, now + 131)
        assert [c.task_id for c in claimed] == [later[0].task_id]
        assert await backend.next_eta() is None

    run(go())


def test_finish_is_guarded_by_the_claim(make_backend, run):
    async def go():
        backend = make_backend()
        now = time.time()
        (task,) = new_tasks(1, now)
        await backend.enqueue([task])
        (claimed,) = await backend.claim("w1", 1, now, now + 1)
        # w1's lease expires; the task is requeued and w2 takes it over
        assert await backend.requeue_expired(now + 2) == 1
        (again,) = await backend.claim("w2", 1, now + 2, now + 30)
        assert again.attempts == 2
        late = Outcome(claimed.task_id, claimed.handle, claimed.attempts, OutcomeKind.SUCCESS, now + 3, value=b"late")
        assert await backend.finish("w1", [late]) == [False]
        mine = Outcome(
            again.task_id, again.handle, again.attempts, OutcomeKind.FAILED, now + 4, error="E: x", traceback="tb"
        )
        assert await backend.finish("w2", [mine]) == [True]
        result = await backend.fetch_result(task.task_id)
        assert (result.status, result.value, result.error, result.attempts) == ("failed", None, "E: x", 2)
        # a second finish of the same claim changes nothing
        assert await backend.finish("w2", [mine]) == [False]

    run(go())


def test_finish_and_claim_does_both(make_backend, run):
    async def go():
        backend = make_backend()
        now = time.time()
        tasks = new_tasks(3, now)
        await backend.enqueue(tasks)
        (first,) = await backend.claim("w", 1, now, now + 30)
        outcome = Outcome(
            first.task_id, first.handle, first.attempts, OutcomeKind.SUCCESS, now, value=b"v", output="printed"
        )
        stored, claimed = await backend.finish_and_claim("w", [outcome], 2, now, now + 30)
        assert stored == [True]
        assert [c.task_id for c in claimed] == [t.task_id for t in tasks[1:]]
        result = await backend.fetch_result(first.task_id)
        assert (result.status, result.value, result.output) == ("success", b"v", "printed")
        assert result.finished_at is not None and result.finished_at.tzinfo is not None

    run(go())


def test_renew_extends_only_this_workers_leases(make_backend, run):
    async def go():
        backend = make_backend()
        now = time.time()
        await backend.enqueue(new_tasks(2, now))
        await backend.claim("w1", 1, now, now + 1)
        await backend.claim("w2", 1, now, now + 1)
        assert await backend.renew("w1", now + 100) == 1
        assert await backend.requeue_expired(now + 50) == 1  # only w2's
        infos = await backend.overview(10)
        assert infos.counts["running"] == 1 and infos.counts["pending"] == 1

    run(go())


def test_progress_is_stored_for_running_claims_only(make_backend, run):
    async def go():
        backend = make_backend()
        now = time.time()
        (task,) = new_tasks(1, now)
        await backend.enqueue([task])
        (claimed,) = await backend.claim("w", 1, now, now + 30)
        await backend.set_progress("w", [(claimed.handle, claimed.attempts, 3.0, 10.0, "three")])
        await backend.set_progress("other", [(claimed.handle, claimed.attempts, 9.0, 10.0, "not mine")])
        info = (await backend.fetch_info([task.task_id]))[task.task_id]
        assert (info.status, info.progress_done, info.progress_total, info.progress_message) == (
            "running",
            3.0,
            10.0,
            "three",
        )

    run(go())


def test_lookups_of_unknown_ids(make_backend, run):
    async def go():
        backend = make_backend()
        now = time.time()
        (task,) = new_tasks(1, now)
        await backend.enqueue([task])
        assert await backend.fetch_result("nope") is None
        infos = await backend.fetch_info([task.task_id, "nope"])
        assert list(infos) == [task.task_id]
        assert infos[task.task_id].status == "pending"
        result = await backend.fetch_result(task.task_id)
        assert result.status == "pending" and result.started_at is None

    run(go())


def test_overview_counts_every_state_and_lists_newest_first(make_backend, run):
    async def go():
        backend = make_backend()
        now = time.time()
        tasks = new_tasks(4, now)
        await backend.enqueue(tasks)
        (one,) = await backend.claim("w", 1, now, now + 30)
        done = Outcome(one.task_id, one.handle, one.attempts, OutcomeKind.SUCCESS, now, value=b"1")
        await backend.finish("w", [done])
        await backend.claim("w", 1, now, now + 30)
        overview = await backend.overview(2)
        assert overview.counts == {"waiting": 0, "pending": 2, "running": 1, "success": 1, "failed": 0, "cancelled": 0}
        assert [i.task_id for i in overview.recent] == [tasks[3].task_id, tasks[2].task_id]

    run(go())


def test_bulk_enqueue_is_one_transaction(make_backend, run):
    async def go():
        backend = make_backend()
        now = time.time()
        tasks = new_tasks(3, now)
        duplicate = NewTask(tasks[0].task_id, "f", b"f", b"a", now, now)  # same id: the insert fails
        with pytest.raises(BackendError):
            await backend.enqueue(tasks[1:] + [duplicate] + [tasks[0]])
        assert (await backend.overview(10)).total == 0

    run(go())


def test_a_big_batch_is_one_transaction_too_and_keeps_its_order(make_backend, run):
    """Big batches may take another path (SQLite: a helper thread); the guarantees are the same."""

    async def go():
        backend = make_backend()
        now = time.time()
        ids = [new_task_id(now) for _ in range(2000)]

        def batch(task_ids):
            return NewTaskBatch("f", b"func", now, now, 1, task_ids, [b"args"] * len(task_ids), [None] * len(task_ids))

        with pytest.raises(BackendError, match="(?i)unique"):
            await backend.enqueue(batch(ids[:1500] + [ids[0]]))  # the last one repeats an id
        assert (await backend.overview(10)).total == 0
        token = backend.change_token
        waiter = asyncio.ensure_future(backend.wait_for_change(token, 30))
        await backend.enqueue(batch(ids))
        await asyncio.wait_for(waiter, 5)  # the write woke this process's waiters
        infos = await backend.fetch_info(ids + ["nope"])
        assert sorted(infos) == sorted(ids) and {info.status for info in infos.values()} == {"pending"}
        claimed = []  # a backend may hand out fewer than asked for at once
        while more := await backend.claim("w", 2000, now, now + 30):
            claimed += more
        assert [c.task_id for c in claimed] == ids

    run(go())


def test_a_heartbeat_renews_this_workers_leases_until_stopped(make_backend, run):
    async def go():
        backend = make_backend()
        now = time.time()
        await backend.enqueue(new_tasks(2, now))
        await backend.claim("w1", 1, now, now + 1)
        await backend.claim("w2", 1, now, now + 1)
        renewals = []

        def clock():  # the heartbeat asks for the time once per renewal
            renewals.append(None)
            return now + 100

        heartbeat = backend.start_heartbeat("w1", 0.05, clock)
        deadline = time.monotonic() + 30
        while len(renewals) < 2:  # the first renewal has run to its end
            assert time.monotonic() < deadline, "the heartbeat never renewed"
            await asyncio.sleep(0.005)
        assert await backend.requeue_expired(now + 50) == 1  # w2's lease ran out; w1's runs to now + 100
        heartbeat.stop()
        stopped_at = len(renewals)
        assert await backend.requeue_expired(now + 200) == 1  # w1's: no longer renewed
        overview = await backend.overview(10)
        assert overview.counts["pending"] == 2 and len(renewals) == stopped_at
        heartbeat.stop()  # twice is fine

    run(go())


def test_waiters_wake_on_a_write_in_this_process(make_backend, run):
    async def go():
        backend = make_backend()
        await backend.connect()
        token = backend.change_token
        waiter = asyncio.ensure_future(backend.wait_for_change(token, 30))
        await asyncio.sleep(0)
        assert not waiter.done()
        await backend.enqueue(new_tasks(1, time.time()))
        await asyncio.wait_for(waiter, 5)
        # a stale token returns at once
        await asyncio.wait_for(backend.wait_for_change(token, 30), 1)

    run(go())


def test_a_fact_about_the_store_is_recorded_once_and_never_overwritten(make_backend, run):
    async def go():
        backend = make_backend()
        await backend.connect()
        assert await backend.get_meta("fact") is None
        assert await backend.set_meta_if_absent("fact", "first") == "first"
        assert await backend.set_meta_if_absent("fact", "second") == "first"  # the first one stays
        assert await backend.get_meta("fact") == "first"
        assert await backend.get_meta("another fact") is None

    run(go())


def test_a_store_that_stayed_where_it_was_passes_the_same_store_check(make_backend, run):
    async def go():
        backend = make_backend()
        await backend.connect()
        await backend.enqueue(new_tasks(3, time.time()))
        await backend.ensure_same_store()  # the worker calls it every few tenths of a second: it must not raise
        await backend.close()
        await backend.ensure_same_store()  # nothing open, nothing to check

    run(go())


def test_outcomes_keep_the_value_signature(make_backend, run):
    async def go():
        backend = make_backend()
        now = time.time()
        (task,) = new_tasks(1, now)
        await backend.enqueue([task])
        (claimed,) = await backend.claim("w", 1, now, now + 30)
        done = Outcome(
            claimed.task_id, claimed.handle, claimed.attempts, OutcomeKind.SUCCESS, now,
            value=b"v", value_signature=b"s",
        )
        await backend.finish("w", [done])
        result = await backend.fetch_result(task.task_id)
        assert (result.value, result.value_signature) == (b"v", b"s")

    run(go())


def test_a_claimed_row_with_values_sitq_does_not_write_comes_with_a_problem(make_backend, run):
    """The backend names the column; the worker fails that task alone (tests/test_odd_rows.py)."""

    async def go():
        backend = make_backend()
        if isinstance(backend, MemoryBackend):
            pytest.skip("only a store that outlives sitq (a file, a server) can hold rows sitq did not write")
        await backend.connect()
        now = time.time()
        good, bad = new_tasks(2, now)
        bad.signature = "text"  # as a hand edit could store it
        await backend.enqueue([good, bad])
        claimed = {c.task_id: c for c in await backend.claim("w1", 10, now, now + 30)}
        assert claimed[good.task_id].problem is None
        problem = claimed[bad.task_id].problem
        assert "column 'signature'" in problem and "where sitq stores bytes (or NULL)" in problem

    run(go())
