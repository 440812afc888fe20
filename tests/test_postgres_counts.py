"""A PostgreSQL queue's counters, per (queue, state) and per (group, state), equal what its tasks
hold after every statement that inserts, moves or deletes tasks: each statement writes its own
counts (the schema's ``COUNT_ADDED`` and ``COUNT_MOVES``), deletes are counted by a trigger, and
the tasks that run after a finished one are moved and counted by another. Checked against a count
of the rows themselves, step by step, and with several workers claiming and finishing at once."""

import asyncio

import pytest
from backends import POSTGRES_DSN

from sitq import open_backend
from sitq.backends.postgres import statements as sql
from sitq.backends.rules import key_task_id, schedule_task_id
from sitq.core import Enqueued, NewTask, NewTaskBatch, Outcome, OutcomeKind, Schedule
from sitq.queue import new_task_id

NOW = 1_000_000.0


def task(name="f", *, at=NOW, **fields):
    task_id = fields.pop("task_id", None) or new_task_id(at)
    return NewTask(task_id, name, b"func", b"args", at, at, **fields)


def outcome(claimed, kind=OutcomeKind.SUCCESS, at=NOW + 1, **fields):
    return Outcome(claimed.task_id, claimed.handle, claimed.attempts, kind, at, **fields)


def read(schema):
    """(counters, the same counted from the tasks), per (queue, state) and per (group, state)."""
    import psycopg

    with psycopg.connect(POSTGRES_DSN) as conn:
        def rows(statement):
            return sorted(conn.execute(statement.replace("{s}", f'"{schema}"')).fetchall())

        kept = rows("SELECT queue, status, sum(n)::int FROM {s}.counts GROUP BY 1, 2 HAVING sum(n) <> 0")
        truth = rows("SELECT queue, status, count(*)::int FROM {s}.tasks GROUP BY 1, 2")
        grouped = rows("SELECT group_id, status, sum(n)::int FROM {s}.group_counts GROUP BY 1, 2 HAVING sum(n) <> 0")
        grouped_truth = rows("SELECT group_id, status, count(*)::int FROM {s}.tasks WHERE group_id IS NOT NULL "
                             "GROUP BY 1, 2")
    return (kept, grouped), (truth, grouped_truth)


@pytest.fixture
def backend(postgres_target):
    return open_backend(postgres_target)


def test_every_kind_of_move_keeps_the_counters_exact(backend, run):
    def check(step):
        kept, truth = read(backend.schema)
        assert kept == truth, f"after {step}"

    async def status(task_id):
        return (await backend.fetch_info([task_id]))[task_id].status

    async def main():
        # Inserts: one task (with and without its notice), a batch of one function in a group, tasks of
        # several functions and queues, keyed tasks, tasks that run after others.
        for i in range(3):
            await backend.enqueue([task(f"one-{i}", at=NOW + i * 0.001)])
        check("enqueue one")
        ids = [new_task_id(NOW) for _ in range(4)]
        await backend.enqueue(NewTaskBatch("mapped", b"func", NOW, NOW, 1, ids, [b"a"] * 4, [None] * 4,
                                           group_id="g", group_name="grp", retention=1))
        await backend.enqueue([task("a", queue="qa"), task("b", queue="qb", group_id="g2")])
        check("batches")
        await backend.enqueue([task("k", task_id=key_task_id("k"), key="k", queue="qa", retention=1)])
        first = task("first", queue="qa")
        middle = task("middle", after=(first.task_id,), group_id="g")
        last = task("last", after=(middle.task_id,), queue="qb")
        other = task("other", after=(first.task_id,))
        await backend.enqueue([first, middle, last, other])
        check("keyed and waiting")
        # Claims and every outcome, then a failure that cancels the tasks after it, in turn.
        claimed = await backend.claim("w", 100, NOW + 1, NOW + 2)
        by_name = {c.name: c for c in claimed}
        check("claim")
        await backend.finish("w", [outcome(by_name["one-0"]), outcome(by_name["one-1"], OutcomeKind.FAILED, error="E"),
                                   outcome(by_name["a"], OutcomeKind.RETRY, retry_at=NOW + 1),
                                   outcome(by_name["b"], OutcomeKind.CANCELLED, error="C"),
                                   outcome(by_name["first"], OutcomeKind.FAILED, error="E"),
                                   outcome(by_name["k"], OutcomeKind.FAILED, error="E")])
        assert [await status(t.task_id) for t in (middle, last, other)] == ["cancelled"] * 3
        check("outcomes, and the tasks after a failed one cancelled")
        # A keyed task enqueued again in its place, in another queue and group.
        assert await backend.enqueue([task("k2", task_id=key_task_id("k"), key="k", queue="qc",
                                           group_id="g3")]) == [Enqueued.REPLACED]
        check("keyed task replaced")
        # Hand-backs, a claim undone after a lost answer, a cancel request, expired leases.
        (mapped, *rest) = [c for c in claimed if c.name == "mapped"]
        assert await backend.release("w", [(mapped.handle, mapped.attempts)]) == [True]
        check("release")
        assert len(await backend.claim("w2", 2, NOW + 1.5, NOW + 2)) == 2
        await backend._call(lambda db, r: db.fetch(sql.q(sql.UNDO_CLAIM, backend.schema), ("w2", NOW + 1.5)))
        assert await backend.find_tasks(statuses=["running"], queue="qc") == []
        check("claim undone")
        await backend.cancel(rest[0].task_id, NOW + 1.6)
        assert await backend.requeue_expired(NOW + 10) > 0
        check("leases expired")
        # A task that succeeds releases the one after it; a cancel of a waiting one, retries by hand.
        dep = task("dep", at=NOW + 11)
        after_dep, after_after = task("after-dep", after=(dep.task_id,)), task("cancel-me", after=(dep.task_id,))
        await backend.enqueue([dep, after_dep, after_after])
        await backend.cancel(after_after.task_id, NOW + 11)
        check("waiting task cancelled")
        (dep_claim,) = [c for c in await backend.claim("w3", 100, NOW + 12, NOW + 60, alone=False)
                       if c.name == "dep"]
        await backend.finish("w3", [outcome(dep_claim, at=NOW + 12)])
        assert (await status(after_dep.task_id), await status(after_after.task_id)) == ("pending", "cancelled")
        check("dependency succeeded")
        await backend.retry([by_name["one-1"].task_id, by_name["b"].task_id, by_name["first"].task_id], NOW + 13)
        check("retried by hand")
        # A schedule's tick, then prune and purge.
        await backend.set_schedule(Schedule("tick", "t", b"func", b"args", None, 60.0, None, "UTC", NOW))
        tick = task("t", task_id=schedule_task_id("tick", NOW), queue="qs", group_id="g")
        assert await backend.fire_schedule("tick", NOW, NOW + 60, NOW, tick)
        check("schedule fired")
        await backend.prune(NOW + 100, 100)
        check("pruned")
        await backend.purge(statuses=["success", "failed", "cancelled"], finished_before=None)
        check("purged")
        await backend.close()

    run(main())


def test_workers_claiming_and_finishing_at_once_keep_the_counters_exact(postgres_target, run):
    async def worker(name):
        backend = open_backend(postgres_target)
        done = 0
        try:
            outcomes = []
            while True:
                kinds = [OutcomeKind.SUCCESS, OutcomeKind.FAILED, OutcomeKind.RETRY]
                finished = [outcome(c, kinds[(c.handle + c.attempts) % 3], retry_at=NOW, error="E")
                            if kinds[(c.handle + c.attempts) % 3] is not OutcomeKind.SUCCESS else outcome(c)
                            for c in outcomes]
                stored, claimed = await backend.finish_and_claim(name, finished, 7, NOW + 1, NOW + 60)
                assert all(stored)
                done += len(finished)
                if not claimed:
                    return done
                outcomes = claimed
        finally:
            await backend.close()

    async def main():
        producer = open_backend(postgres_target)
        for part in range(4):
            await producer.enqueue([task(f"t{part}-{i}", queue=f"q{i % 3}", group_id=f"g{i % 2}", max_attempts=2)
                                    for i in range(100)])
        done = await asyncio.gather(*(worker(f"w{i}") for i in range(4)))
        schema = producer.schema
        await producer.close()
        return schema, sum(done)

    schema, done = run(main())
    assert done >= 400
    kept, truth = read(schema)
    assert kept == truth
    assert sum(n for _, status, n in truth[0] if status in ("success", "failed")) == 400
