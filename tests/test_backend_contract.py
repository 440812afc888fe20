"""The storage contract (``sitq/backends/base.py``), method by method, run against every backend.

A new backend is done when it passes this module: add it to ``BACKENDS`` in
``tests/backends.py``. What a task becomes in each situation is computed with the rules of
``sitq.backends.rules``, which every backend follows; the change token is checked for every
write: it moves when the write changed something, and only then.
"""

import asyncio
import subprocess
import sys
import textwrap
import time

import pytest
from backends import OUTCOME_FIELDS, new_batch, new_id, new_tasks, outcome, typical_outcome
from conftest import worker_env

from sitq.backends.base import Backend
from sitq.backends.rules import (
    LOST_WORKER_LIMIT,
    CancelOutcome,
    ExpiredLease,
    after_retry,
    cancel,
    expired_lease,
    lost_worker_error,
)
from sitq.core import FINISHED_STATES, STATES, NewTask, OutcomeKind, TaskStatus, to_datetime
from sitq.errors import BackendError

NOW = 1_700_000_000.0  # the contract takes times as arguments: the tests pick them
LEASE = 30.0
KINDS = list(OutcomeKind)


class Token:
    """Watches a backend's change token across a block of calls."""

    def __init__(self, backend):
        self.backend = backend
        self.start = backend.change_token

    @property
    def moved(self):
        return self.backend.change_token != self.start


async def one_claimed(backend, worker="w", now=NOW, lease=LEASE, **fields):
    """Enqueue one task and claim it; returns the claim."""
    (task,) = new_tasks(1, now, **fields)
    await backend.enqueue([task])
    (claimed,) = await backend.claim(worker, 1, now, now + lease)
    assert claimed.task_id == task.task_id
    return claimed


async def lose(backend, claimed, how, now):
    """Make ``claimed`` a lost claim: its lease expired at ``now`` and the task was requeued,
    then (``how == "taken over"``) claimed by another worker, or (``"reclaimed"``) claimed
    again by the same worker, whose new claim has more attempts."""
    assert await backend.requeue_expired(now) == 1
    if how == "requeued":
        return None
    worker = "other" if how == "taken over" else "w"
    (again,) = await backend.claim(worker, 1, now, now + LEASE)
    assert again.task_id == claimed.task_id and again.attempts == claimed.attempts + 1 and again.lost == 1
    return again


async def state(backend, task_id):
    """Everything the readers say about one task."""
    return await backend.fetch_result(task_id), (await backend.fetch_info([task_id]))[task_id]


# -- producers -----------------------------------------------------------------------


def test_enqueued_tasks_are_pending_and_readable(store, run):
    async def go():
        tasks = new_tasks(2, NOW, eta=NOW + 5, name="job")
        token = Token(store)
        await store.enqueue(tasks)
        assert token.moved
        for task in tasks:
            result, info = await state(store, task.task_id)
            assert (result.status, result.name, result.attempts, result.value, result.error) == (
                "pending", "job", 0, None, None,
            )
            assert result.enqueued_at == to_datetime(NOW) and result.started_at is result.finished_at is None
            assert (info.status, info.eta, info.worker_id, info.progress_done) == (
                "pending", to_datetime(NOW + 5), None, None,
            )
            assert isinstance(result.status, TaskStatus) and isinstance(info.status, TaskStatus)

    run(go())


def test_an_empty_enqueue_changes_nothing(store, run):
    async def go():
        await store.connect()
        token = Token(store)
        await store.enqueue([])
        assert not token.moved and (await store.overview(10)).total == 0

    run(go())


def test_bulk_enqueue_is_one_transaction(store, run):
    async def go():
        tasks = new_tasks(3, NOW)
        duplicate = NewTask(tasks[0].task_id, "f", b"f", b"a", NOW, NOW)  # same id: the insert fails
        with pytest.raises(BackendError):
            await store.enqueue(tasks[1:] + [duplicate] + [tasks[0]])
        assert (await store.overview(10)).total == 0
        await store.enqueue(tasks[:1])
        fresh = new_tasks(1, NOW)
        with pytest.raises(BackendError):  # an id already stored
            await store.enqueue(fresh + [NewTask(tasks[0].task_id, "g", b"g", b"b", NOW, NOW)])
        assert await store.fetch_result(fresh[0].task_id) is None
        assert (await store.fetch_result(tasks[0].task_id)).name == "f"  # the stored one is untouched

    run(go())


def test_a_big_batch_is_one_transaction_too_and_keeps_its_order(store, run):
    """Big batches may take another path (SQLite: a helper thread); the guarantees are the same."""

    async def go():
        bad = new_batch(1500, NOW)
        bad.task_ids.append(bad.task_ids[0])  # the last one repeats an id
        bad.args.append(b"again")
        bad.signatures.append(None)
        with pytest.raises(BackendError, match="(?i)unique"):
            await store.enqueue(bad)
        assert (await store.overview(10)).total == 0
        batch = new_batch(2000, NOW)
        token = store.change_token
        waiter = asyncio.ensure_future(store.wait_for_change(token, 30))
        await store.enqueue(batch)
        await asyncio.wait_for(waiter, 30)
        assert store.change_token != token  # the write woke this process's waiters
        ids = batch.task_ids
        infos = await store.fetch_info(ids + ["nope"])
        assert sorted(infos) == sorted(ids) and {info.status for info in infos.values()} == {"pending"}
        claimed = []  # a backend may hand out fewer than asked for at once
        while more := await store.claim("w", 2000, NOW, NOW + LEASE):
            claimed += more
        assert [c.task_id for c in claimed] == ids
        assert [c.args for c in claimed] == batch.args

    run(go())


# -- claim -----------------------------------------------------------------------------


def test_claim_takes_the_oldest_first_up_to_the_limit(store, run):
    async def go():
        tasks = new_tasks(5, NOW)
        await store.enqueue(tasks)
        claimed = await store.claim("w1", 3, NOW, NOW + LEASE)
        assert [c.task_id for c in claimed] == [t.task_id for t in tasks[:3]]
        assert [(c.name, c.func, c.args, c.signature, c.attempts, c.lost, c.problem) for c in claimed] == [
            ("f", b"func", t.args, None, 1, 0, None) for t in tasks[:3]
        ]
        rest = await store.claim("w2", 10, NOW, NOW + LEASE)
        assert [c.task_id for c in rest] == [t.task_id for t in tasks[3:]]
        token = Token(store)
        assert await store.claim("w3", 10, NOW, NOW + LEASE) == []
        assert not token.moved  # a claim that finds nothing must not wake anyone

    run(go())


def test_a_claimed_task_is_running_under_its_worker(store, run):
    async def go():
        (task,) = new_tasks(1, NOW, signature=b"sig")
        await store.enqueue([task])
        token = Token(store)
        (claimed,) = await store.claim("w1", 1, NOW + 1, NOW + 1 + LEASE)
        assert token.moved
        assert (claimed.task_id, claimed.signature, claimed.attempts) == (task.task_id, b"sig", 1)
        result, info = await state(store, task.task_id)
        assert (info.status, info.worker_id, info.attempts, info.started_at) == (
            "running", "w1", 1, to_datetime(NOW + 1),
        )
        assert result.status == "running" and result.finished_at is None
        assert await store.claim("w2", 10, NOW + 1, NOW + LEASE) == []  # nobody else gets it

    run(go())


def test_a_claim_of_no_tasks_claims_nothing(store, run):
    async def go():
        await store.enqueue(new_tasks(2, NOW))
        token = Token(store)
        assert await store.claim("w", 0, NOW, NOW + LEASE) == []
        assert not token.moved
        assert (await store.overview(0)).counts["pending"] == 2

    run(go())


def test_claim_waits_for_each_tasks_eta_and_takes_the_earliest_first(store, run):
    async def go():
        late = new_tasks(1, NOW, eta=NOW + 20)  # enqueued first, due last
        soon = new_tasks(1, NOW, eta=NOW + 10)
        await store.enqueue(late + soon)
        assert await store.claim("w", 5, NOW + 9, NOW + LEASE) == []
        assert await store.next_eta() == NOW + 10
        (first,) = await store.claim("w", 1, NOW + 25, NOW + 25 + LEASE)
        assert first.task_id == soon[0].task_id  # its eta is older
        assert await store.next_eta() == NOW + 20
        (second,) = await store.claim("w", 5, NOW + 20, NOW + 20 + LEASE)  # due exactly now
        assert second.task_id == late[0].task_id
        assert await store.next_eta() is None

    run(go())


def test_claim_returns_tasks_of_different_etas_oldest_first_when_limited(store, run):
    async def go():
        tasks = [new_tasks(1, NOW, eta=NOW + eta)[0] for eta in (3, 1, 2, 1)]
        await store.enqueue(tasks)
        picked = await store.claim("w", 2, NOW + 5, NOW + LEASE)
        assert {c.task_id for c in picked} == {tasks[1].task_id, tasks[3].task_id}  # both due at +1
        (third,) = await store.claim("w", 1, NOW + 5, NOW + LEASE)
        assert third.task_id == tasks[2].task_id

    run(go())


def test_finished_tasks_are_never_claimed_again(store, run):
    async def go():
        for kind in (OutcomeKind.SUCCESS, OutcomeKind.FAILED, OutcomeKind.CANCELLED):
            claimed = await one_claimed(store)
            assert await store.finish("w", [typical_outcome(claimed, kind, NOW)]) == [True]
        assert await store.claim("w", 10, NOW + 100, NOW + 200) == []
        assert await store.next_eta() is None

    run(go())


# -- suspects: tasks that lost their worker --------------------------------------------


def test_a_task_that_lost_its_worker_is_a_suspect_claimed_only_alone(store, run):
    async def go():
        suspect = await one_claimed(store, lease=1)
        assert not await store.suspects_waiting(NOW + 2)
        assert await store.requeue_expired(NOW + 2) == 1
        innocent = new_tasks(2, NOW + 2)
        await store.enqueue(innocent)
        assert await store.suspects_waiting(NOW + 2)
        busy = await store.claim("busy", 10, NOW + 2, NOW + LEASE, alone=False)
        assert [c.task_id for c in busy] == [t.task_id for t in innocent]  # the suspect is left alone
        assert await store.suspects_waiting(NOW + 2)
        (alone,) = await store.claim("empty", 10, NOW + 2, NOW + LEASE, alone=True)
        assert (alone.task_id, alone.attempts, alone.lost) == (suspect.task_id, 2, 1)
        assert not await store.suspects_waiting(NOW + 2)

    run(go())


def test_suspects_come_one_at_a_time_even_with_other_work_ready(store, run):
    async def go():
        tasks = new_tasks(2, NOW)
        await store.enqueue(tasks)
        lost = await store.claim("dead", 2, NOW, NOW + 1)
        assert await store.requeue_expired(NOW + 2) == 2
        others = new_tasks(3, NOW + 2)
        await store.enqueue(others)
        first = await store.claim("a", 10, NOW + 2, NOW + LEASE)  # alone is the default
        second = await store.claim("b", 10, NOW + 2, NOW + LEASE)
        assert [[c.task_id for c in first], [c.task_id for c in second]] == [[lost[0].task_id], [lost[1].task_id]]
        # with no suspect ready, a worker alone claims as usual, up to the limit
        plain = await store.claim("c", 2, NOW + 2, NOW + LEASE, alone=True)
        assert [c.task_id for c in plain] == [t.task_id for t in others[:2]] and {c.lost for c in plain} == {0}

    run(go())


def test_suspects_come_highest_priority_first_as_other_claims_do(store, run):
    async def go():
        low, high = new_tasks(1, NOW) + new_tasks(1, NOW, priority=5)
        await store.enqueue([low, high])
        await store.claim("dead", 2, NOW, NOW + 1)
        assert await store.requeue_expired(NOW + 2) == 2
        first = await store.claim("a", 10, NOW + 2, NOW + LEASE)
        second = await store.claim("b", 10, NOW + 2, NOW + LEASE)
        assert [c.task_id for c in first + second] == [high.task_id, low.task_id]

    run(go())


def test_a_suspect_waits_for_its_eta_too(store, run):
    async def go():
        claimed = await one_claimed(store, now=NOW + 10, lease=1)  # due at NOW + 10
        assert await store.requeue_expired(NOW + 12) == 1
        assert not await store.suspects_waiting(NOW + 9)
        assert await store.claim("w", 5, NOW + 9, NOW + LEASE) == []
        assert await store.suspects_waiting(NOW + 10)
        (again,) = await store.claim("w", 5, NOW + 10, NOW + LEASE)
        assert again.task_id == claimed.task_id

    run(go())


# -- finish ------------------------------------------------------------------------------


def test_finish_stores_a_success_with_everything_it_reports(store, run):
    async def go():
        claimed = await one_claimed(store)
        await store.set_progress("w", [(claimed.handle, claimed.attempts, 3.0, 10.0, "three")])
        fields = OUTCOME_FIELDS[OutcomeKind.SUCCESS]
        done = outcome(claimed, OutcomeKind.SUCCESS, NOW + 2, progress=(10.0, None, None), **fields)
        token = Token(store)
        assert await store.finish("w", [done]) == [True]
        assert token.moved
        result, info = await state(store, claimed.task_id)
        assert (result.status, result.value, result.value_signature, result.output, result.error) == (
            "success", b"value", b"signed", "printed", None,
        )
        assert (result.attempts, result.started_at, result.finished_at) == (1, to_datetime(NOW), to_datetime(NOW + 2))
        assert result.duration == 2.0
        # the last progress fills in what was reported before, part by part
        assert (info.progress_done, info.progress_total, info.progress_message) == (10.0, 10.0, "three")

    run(go())


@pytest.mark.parametrize("kind", [OutcomeKind.FAILED, OutcomeKind.CANCELLED])
def test_finish_stores_a_failure_or_a_cancel(store, kind, run):
    async def go():
        claimed = await one_claimed(store)
        assert await store.finish("w", [typical_outcome(claimed, kind, NOW + 1)]) == [True]
        result, info = await state(store, claimed.task_id)
        fields = OUTCOME_FIELDS[kind]
        assert result.status == kind.status and result.status in FINISHED_STATES
        assert (result.value, result.error, result.traceback, result.output) == (
            None, fields.get("error"), fields.get("traceback"), fields.get("output"),
        )
        assert (result.finished_at, info.error, info.attempts) == (to_datetime(NOW + 1), fields.get("error"), 1)

    run(go())


def test_a_retry_makes_the_task_pending_until_it_is_due(store, run):
    async def go():
        claimed = await one_claimed(store)
        await store.set_progress("w", [(claimed.handle, claimed.attempts, 1.0, 2.0, "half")])
        retry = typical_outcome(claimed, OutcomeKind.RETRY, NOW + 1, retry_at=NOW + 10)
        assert await store.finish("w", [retry]) == [True]
        result, info = await state(store, claimed.task_id)
        assert result.status == after_retry(False) == "pending"
        assert (result.attempts, result.error, result.finished_at, result.started_at) == (
            1, "ValueError: again", None, to_datetime(NOW),
        )
        assert (info.eta, info.worker_id, info.error) == (to_datetime(NOW + 10), None, "ValueError: again")
        assert await store.next_eta() == NOW + 10
        assert await store.claim("w", 1, NOW + 9, NOW + LEASE) == []
        (again,) = await store.claim("w2", 1, NOW + 10, NOW + 10 + LEASE)
        assert (again.task_id, again.attempts, again.lost) == (claimed.task_id, 2, 0)  # a retry is no lost worker
        info = (await store.fetch_info([claimed.task_id]))[claimed.task_id]
        assert (info.progress_done, info.progress_total, info.progress_message) == (None, None, None)  # a new attempt
        assert await store.finish("w2", [outcome(again, OutcomeKind.SUCCESS, NOW + 11, value=b"v")]) == [True]
        result = await store.fetch_result(claimed.task_id)
        assert (result.status, result.attempts, result.error, result.traceback, result.value) == (
            "success", 2, None, None, b"v",  # the earlier failure is gone
        )

    run(go())


@pytest.mark.parametrize("how", ["taken over", "reclaimed", "requeued"])
@pytest.mark.parametrize("kind", KINDS)
def test_finish_of_a_lost_claim_writes_nothing(store, kind, how, run):
    """Whatever the late worker reports, the store keeps what the claim's successor holds."""

    async def go():
        claimed = await one_claimed(store, lease=1)
        await lose(store, claimed, how, NOW + 2)
        before = await state(store, claimed.task_id)
        token = Token(store)
        assert await store.finish("w", [typical_outcome(claimed, kind, NOW + 3)]) == [False]
        assert not token.moved
        assert await state(store, claimed.task_id) == before

    run(go())


@pytest.mark.parametrize("kind", KINDS)
def test_finish_by_another_worker_or_twice_writes_nothing(store, kind, run):
    async def go():
        claimed = await one_claimed(store)
        token = Token(store)
        assert await store.finish("intruder", [typical_outcome(claimed, kind, NOW + 1)]) == [False]
        assert not token.moved and (await store.fetch_result(claimed.task_id)).status == "running"
        assert await store.finish("w", [typical_outcome(claimed, OutcomeKind.SUCCESS, NOW + 1)]) == [True]
        before = await state(store, claimed.task_id)
        token = Token(store)
        assert await store.finish("w", [typical_outcome(claimed, kind, NOW + 2)]) == [False]
        assert not token.moved and await state(store, claimed.task_id) == before

    run(go())


def test_finish_reports_each_outcome_of_a_batch(store, run):
    async def go():
        lost = await one_claimed(store, lease=1)
        await lose(store, lost, "taken over", NOW + 2)
        mine = await one_claimed(store, now=NOW + 2)
        outcomes = [typical_outcome(lost, OutcomeKind.SUCCESS, NOW + 3), typical_outcome(mine, OutcomeKind.FAILED, NOW)]
        assert await store.finish("w", outcomes) == [False, True]
        assert (await store.fetch_result(lost.task_id)).status == "running"
        assert (await store.fetch_result(mine.task_id)).status == "failed"

    run(go())


@pytest.mark.parametrize("live_first", [True, False])
@pytest.mark.parametrize("call", ["finish", "finish_and_claim", "release"])
def test_a_lost_claim_and_the_live_claim_of_one_task_in_one_call(store, call, live_first, run):
    """A worker that claimed a task again (its first lease expired) reports on both claims at once:
    only the live claim is stored or released, and the flags say which, whatever their order."""

    async def go():
        old = await one_claimed(store, lease=1)
        live = await lose(store, old, "reclaimed", NOW + 2)
        claims = [live, old] if live_first else [old, live]
        expected = [c is live for c in claims]
        if call == "release":
            assert await store.release("w", [(c.handle, c.attempts) for c in claims]) == expected
            assert (await store.fetch_result(old.task_id)).status == "pending"
            return
        outcomes = [typical_outcome(c, OutcomeKind.FAILED if c is live else OutcomeKind.SUCCESS, NOW + 3)
                    for c in claims]
        if call == "finish":
            assert await store.finish("w", outcomes) == expected
        else:
            assert await store.finish_and_claim("w", outcomes, 1, NOW + 3, NOW + 3 + LEASE) == (expected, [])
        result = await store.fetch_result(old.task_id)
        assert (result.status, result.attempts) == ("failed", live.attempts)

    run(go())


@pytest.mark.parametrize("call", ["finish", "finish_and_claim", "release"])
def test_one_claim_named_twice_in_one_call_counts_once(store, call, run):
    """As if the entries came one at a time: the first uses the claim up, the second finds it gone."""

    async def go():
        claimed = await one_claimed(store)
        if call == "release":
            assert await store.release("w", [(claimed.handle, claimed.attempts)] * 2) == [True, False]
            assert (await store.fetch_result(claimed.task_id)).status == "pending"
            return
        first = outcome(claimed, OutcomeKind.SUCCESS, NOW + 1, value=b"first")
        second = typical_outcome(claimed, OutcomeKind.FAILED, NOW + 2)
        if call == "finish":
            assert await store.finish("w", [first, second]) == [True, False]
        else:
            assert await store.finish_and_claim("w", [first, second], 1, NOW + 2, NOW + 2 + LEASE) == (
                [True, False], [])
        result = await store.fetch_result(claimed.task_id)
        assert (result.status, result.value) == ("success", b"first")

    run(go())


def test_finish_of_a_run_stores_each_outcome_as_one_finish_would(store, run):
    """A worker's run reports many outcomes at once: each is stored, or refused, on its own
    claim, whatever its kind, exactly as if it came alone (one lost claim among them, a retry,
    every final kind)."""

    async def go():
        kinds = [OutcomeKind.SUCCESS, OutcomeKind.FAILED, OutcomeKind.CANCELLED, OutcomeKind.RETRY] * 2
        await store.enqueue(new_tasks(len(kinds) + 1, NOW))
        *claims, lost = await store.claim("w", len(kinds) + 1, NOW, NOW + LEASE)
        assert await store.release("w", [(lost.handle, lost.attempts)]) == [True]
        outcomes = [typical_outcome(c, kind, NOW + 1, retry_at=NOW + 60) for c, kind in zip(claims, kinds, strict=True)]
        outcomes.insert(3, typical_outcome(lost, OutcomeKind.SUCCESS, NOW + 1))
        stored = await store.finish("w", outcomes)
        assert stored == [o.task_id != lost.task_id for o in outcomes]
        results = await store.fetch_results([o.task_id for o in outcomes])
        for o in outcomes:
            expected = "pending" if o.task_id == lost.task_id else o.kind.status.value
            assert results[o.task_id].status == expected
            if o.kind is OutcomeKind.SUCCESS and o.task_id != lost.task_id:
                assert results[o.task_id].value == o.value and results[o.task_id].finished_at is not None
        counts = {str(k): n for k, n in (await store.overview(0)).counts.items() if n}
        assert counts == {"pending": 3, "success": 2, "failed": 2, "cancelled": 2}

    run(go())


# -- finish_and_claim ----------------------------------------------------------------------


def test_finish_and_claim_does_both(store, run):
    async def go():
        tasks = new_tasks(3, NOW)
        await store.enqueue(tasks)
        (first,) = await store.claim("w", 1, NOW, NOW + LEASE)
        done = typical_outcome(first, OutcomeKind.SUCCESS, NOW + 1)
        stored, claimed = await store.finish_and_claim("w", [done], 2, NOW + 1, NOW + 1 + LEASE)
        assert stored == [True]
        assert [c.task_id for c in claimed] == [t.task_id for t in tasks[1:]]
        assert (await store.fetch_result(first.task_id)).status == "success"
        info = (await store.fetch_info([tasks[1].task_id]))[tasks[1].task_id]
        assert (info.status, info.worker_id, info.started_at) == ("running", "w", to_datetime(NOW + 1))

    run(go())


def test_finish_and_claim_finishes_first_so_a_retry_due_now_is_claimed_again(store, run):
    async def go():
        claimed = await one_claimed(store)
        retry = typical_outcome(claimed, OutcomeKind.RETRY, NOW + 1, retry_at=NOW + 1)
        stored, (again,) = await store.finish_and_claim("w", [retry], 1, NOW + 1, NOW + 1 + LEASE)
        assert stored == [True] and (again.task_id, again.attempts) == (claimed.task_id, 2)

    run(go())


def test_finish_and_claim_with_a_lost_claim_or_nothing_to_claim(store, run):
    async def go():
        lost = await one_claimed(store, lease=1)
        await lose(store, lost, "taken over", NOW + 2)
        fresh = new_tasks(1, NOW + 2)
        await store.enqueue(fresh)
        late = typical_outcome(lost, OutcomeKind.SUCCESS, NOW + 3)
        stored, claimed = await store.finish_and_claim("w", [late], 5, NOW + 3, NOW + 3 + LEASE)
        assert stored == [False] and [c.task_id for c in claimed] == [fresh[0].task_id]
        token = Token(store)
        assert await store.finish_and_claim("w", [late], 5, NOW + 3, NOW + 3 + LEASE) == ([False], [])
        assert not token.moved
        done = typical_outcome(claimed[0], OutcomeKind.FAILED, NOW + 4)
        assert await store.finish_and_claim("w", [done], 0, NOW + 4, NOW + 4 + LEASE) == ([True], [])

    run(go())


def test_finish_and_claim_leaves_suspects_to_a_worker_alone(store, run):
    async def go():
        suspect = await one_claimed(store, lease=1)
        assert await store.requeue_expired(NOW + 2) == 1
        other = new_tasks(2, NOW + 2)
        await store.enqueue(other)
        (running,) = await store.claim("busy", 1, NOW + 2, NOW + LEASE, alone=False)
        assert running.task_id == other[0].task_id
        # a worker that still runs other tasks claims with alone=False: it never gets the suspect
        stored, claimed = await store.finish_and_claim(
            "busy", [typical_outcome(running, OutcomeKind.SUCCESS, NOW + 3)], 5, NOW + 3, NOW + LEASE, alone=False
        )
        assert stored == [True] and [c.task_id for c in claimed] == [other[1].task_id]
        _, (alone,) = await store.finish_and_claim("empty", [], 5, NOW + 3, NOW + LEASE, alone=True)
        assert (alone.task_id, alone.lost) == (suspect.task_id, 1)

    run(go())


# -- renew ---------------------------------------------------------------------------------


def test_renew_extends_only_this_workers_running_leases(store, run):
    async def go():
        await store.enqueue(new_tasks(4, NOW))
        mine = await store.claim("w1", 2, NOW, NOW + 1)
        await store.claim("w2", 1, NOW, NOW + 1)
        assert await store.finish("w1", [typical_outcome(mine[0], OutcomeKind.SUCCESS, NOW)]) == [True]
        assert await store.renew("w1", NOW + 100) == 1  # the finished one is not renewed
        assert await store.renew("nobody", NOW + 100) == 0
        assert await store.requeue_expired(NOW + 50) == 1  # only w2's
        assert (await store.fetch_result(mine[1].task_id)).status == "running"
        assert await store.requeue_expired(NOW + 100) == 0  # a lease runs to its end: expired only after it
        assert await store.requeue_expired(NOW + 101) == 1

    run(go())


def test_renew_by_a_worker_that_lost_its_claim_extends_nothing(store, run):
    async def go():
        claimed = await one_claimed(store, lease=1)
        await lose(store, claimed, "taken over", NOW + 2)  # "other" holds it until NOW + 2 + LEASE
        assert await store.renew("w", NOW + 1000) == 0
        assert await store.requeue_expired(NOW + 3 + LEASE) == 1  # other's lease was left as it was

    run(go())


# -- requeue_expired -----------------------------------------------------------------------


def test_requeue_expired_with_nothing_expired_changes_nothing(store, run):
    async def go():
        await store.connect()
        assert await store.requeue_expired(NOW) == 0
        await store.enqueue(new_tasks(3, NOW))
        running = await store.claim("w", 2, NOW, NOW + 10)
        await store.finish("w", [typical_outcome(running[0], OutcomeKind.SUCCESS, NOW)])
        before = await store.overview(10)
        token = Token(store)
        assert await store.requeue_expired(NOW + 10) == 0  # expires only once its lease is over
        assert not token.moved and await store.overview(10) == before

    run(go())


@pytest.mark.parametrize("requested", [False, True], ids=["no cancel", "cancel requested"])
@pytest.mark.parametrize("lost", range(LOST_WORKER_LIMIT), ids=lambda n: f"lost {n} before")
def test_an_expired_lease_is_dealt_with_by_the_rules(store, lost, requested, run):
    async def go():
        (task,) = new_tasks(1, NOW)
        await store.enqueue([task])
        now = NOW
        for _ in range(lost):  # lose the worker `lost` times
            await store.claim("dead", 1, now, now + 1)
            assert await store.requeue_expired(now + 2) == 1
            now += 2
        (claimed,) = await store.claim("w", 1, now, now + 1)
        assert (claimed.attempts, claimed.lost) == (lost + 1, lost)
        if requested:
            assert await store.cancel(task.task_id, now) == CancelOutcome.REQUESTED
        token = Token(store)
        assert await store.requeue_expired(now + 2) == 1
        assert token.moved
        result, info = await state(store, task.task_id)
        fate = expired_lease(requested, lost)
        assert result.attempts == lost + 1
        if fate is ExpiredLease.CANCELLED:
            assert (result.status, result.finished_at, result.error) == ("cancelled", to_datetime(now + 2), None)
        elif fate is ExpiredLease.FAILED:
            assert (result.status, result.finished_at) == ("failed", to_datetime(now + 2))
            assert (result.error, result.traceback) == (lost_worker_error(), None)
            assert result.error == lost_worker_error(LOST_WORKER_LIMIT)
        else:
            assert (result.status, result.finished_at, info.worker_id) == ("pending", None, None)
            assert await store.suspects_waiting(now + 2)
            (again,) = await store.claim("w2", 1, now + 2, now + LEASE)
            assert (again.attempts, again.lost) == (lost + 2, lost + 1)
        if fate is not ExpiredLease.REQUEUED:
            assert await store.claim("w2", 1, now + 2, now + LEASE) == []
            assert await store.cancel_requests("w") == []

    run(go())


def test_a_task_that_keeps_losing_its_worker_fails_on_the_last_allowed_loss(store, run):
    async def go():
        (task,) = new_tasks(1, NOW)
        await store.enqueue([task])
        losses = 0
        while claims := await store.claim("doomed", 1, NOW + losses, NOW + losses):  # dies at once
            assert [c.lost for c in claims] == [losses]
            assert await store.requeue_expired(NOW + losses + 1) == 1
            losses += 1
            assert losses <= LOST_WORKER_LIMIT
        result = await store.fetch_result(task.task_id)
        assert losses == LOST_WORKER_LIMIT and result.attempts == LOST_WORKER_LIMIT
        assert (result.status, result.error) == ("failed", lost_worker_error())

    run(go())


def test_requeue_expired_deals_with_every_expired_lease_at_once(store, run):
    async def go():
        tasks = new_tasks(4, NOW)
        await store.enqueue(tasks)
        claimed = await store.claim("dead", 3, NOW, NOW + 1)
        await store.claim("alive", 1, NOW, NOW + 100)
        await store.cancel(claimed[1].task_id, NOW)
        assert await store.requeue_expired(NOW + 2) == 3
        statuses = {i: r.status for i, r in (await store.fetch_info([t.task_id for t in tasks])).items()}
        assert statuses == {
            claimed[0].task_id: "pending", claimed[1].task_id: "cancelled", claimed[2].task_id: "pending",
            tasks[3].task_id: "running",
        }

    run(go())


def test_a_pending_task_whose_eta_is_not_a_time_is_failed_by_requeue_expired(store_kind, store, run):
    if not store_kind.odd_values:
        pytest.skip(f"{store_kind.name} cannot hold values sitq never writes")

    async def go():
        good = new_tasks(1, NOW)
        odd = new_tasks(1, NOW, eta="whenever")  # as a hand edit could store it
        await store.enqueue(odd + good)
        assert [c.task_id for c in await store.claim("w", 5, NOW + 1e9, NOW + 2e9)] == [good[0].task_id]
        assert await store.next_eta() is None  # no pending task has a time to wait for
        token = Token(store)
        await store.requeue_expired(NOW)
        assert token.moved  # the task's waiters learn that it failed
        result = await store.fetch_result(odd[0].task_id)
        assert result.status == "failed" and "column 'eta'" in result.error and "'whenever'" in result.error
        token = Token(store)
        assert await store.requeue_expired(NOW) == 0 and not token.moved  # and only once

    run(go())


@pytest.mark.parametrize("lease", ["forever", None], ids=["text", "NULL"])
def test_a_running_task_whose_lease_is_not_a_time_counts_as_expired(store_kind, store, lease, run):
    if not store_kind.odd_values:
        pytest.skip(f"{store_kind.name} cannot hold values sitq never writes")

    async def go():
        claimed = await one_claimed(store)
        assert await store.renew("w", lease) == 1  # as a hand edit could store it
        assert await store.requeue_expired(NOW) == 1
        (again,) = await store.claim("w2", 1, NOW, NOW + LEASE)
        assert (again.task_id, again.lost) == (claimed.task_id, 1)

    run(go())


# -- cancel --------------------------------------------------------------------------------


def test_cancelling_a_pending_task_cancels_it_now(store, run):
    async def go():
        tasks = new_tasks(2, NOW)
        await store.enqueue(tasks)
        token = Token(store)
        assert await store.cancel(tasks[0].task_id, NOW + 1) == cancel(TaskStatus.PENDING) == "cancelled"
        assert token.moved
        result = await store.fetch_result(tasks[0].task_id)
        assert (result.status, result.attempts, result.started_at, result.finished_at) == (
            "cancelled", 0, None, to_datetime(NOW + 1),
        )
        assert [c.task_id for c in await store.claim("w", 5, NOW + 1, NOW + LEASE)] == [tasks[1].task_id]

    run(go())


def test_cancelling_a_running_task_asks_its_worker(store, run):
    async def go():
        claimed = await one_claimed(store)
        await one_claimed(store, worker="w")
        await one_claimed(store, worker="other")
        assert await store.cancel_requests("w") == []
        token = Token(store)
        assert await store.cancel(claimed.task_id, NOW + 1) == cancel(TaskStatus.RUNNING) == "requested"
        assert token.moved
        assert (await store.fetch_result(claimed.task_id)).status == "running"  # until its worker stops it
        assert await store.cancel_requests("w") == [claimed.task_id]
        assert await store.cancel_requests("other") == []
        assert await store.cancel(claimed.task_id, NOW + 2) == "requested"  # asking again is no error
        assert await store.finish("w", [typical_outcome(claimed, OutcomeKind.CANCELLED, NOW + 3)]) == [True]
        assert (await store.fetch_result(claimed.task_id)).status == "cancelled"
        assert await store.cancel_requests("w") == []  # only running tasks are asked

    run(go())


def test_a_worker_is_asked_to_cancel_each_of_its_tasks(store, run):
    async def go():
        await store.enqueue(new_tasks(3, NOW))
        claimed = await store.claim("w", 3, NOW, NOW + LEASE)
        for task in claimed[1:]:
            await store.cancel(task.task_id, NOW)
        assert sorted(await store.cancel_requests("w")) == sorted(t.task_id for t in claimed[1:])

    run(go())


@pytest.mark.parametrize("kind", [OutcomeKind.SUCCESS, OutcomeKind.FAILED, OutcomeKind.CANCELLED])
def test_cancelling_a_finished_task_changes_nothing(store, kind, run):
    async def go():
        claimed = await one_claimed(store)
        await store.finish("w", [typical_outcome(claimed, kind, NOW + 1)])
        before = await state(store, claimed.task_id)
        token = Token(store)
        assert await store.cancel(claimed.task_id, NOW + 2) == cancel(kind.status) == "finished"
        assert not token.moved and await state(store, claimed.task_id) == before

    run(go())


def test_a_task_cancelled_before_it_ran_stays_cancelled(store, run):
    async def go():
        (task,) = new_tasks(1, NOW)
        await store.enqueue([task])
        await store.cancel(task.task_id, NOW)
        before = await state(store, task.task_id)
        token = Token(store)
        assert await store.cancel(task.task_id, NOW + 1) == "finished"
        assert not token.moved and await state(store, task.task_id) == before

    run(go())


def test_cancelling_an_unknown_task_says_none(store, run):
    async def go():
        await store.enqueue(new_tasks(1, NOW))
        token = Token(store)
        assert await store.cancel(new_id(), NOW) is None
        assert not token.moved and (await store.overview(0)).counts["cancelled"] == 0

    run(go())


def test_cancelling_between_attempts_or_a_waiting_suspect_cancels_it(store, run):
    async def go():
        retried = await one_claimed(store)
        await store.finish("w", [typical_outcome(retried, OutcomeKind.RETRY, NOW, retry_at=NOW + 60)])
        suspect = await one_claimed(store, lease=1)
        assert await store.requeue_expired(NOW + 2) == 1
        for task in (retried, suspect):
            assert await store.cancel(task.task_id, NOW + 3) == "cancelled"
            result = await store.fetch_result(task.task_id)
            assert (result.status, result.attempts, result.finished_at) == ("cancelled", 1, to_datetime(NOW + 3))
        assert not await store.suspects_waiting(NOW + 3) and await store.next_eta() is None

    run(go())


@pytest.mark.parametrize("requested", [False, True], ids=["no cancel", "cancel requested"])
def test_a_retry_after_a_cancel_request_ends_cancelled(store, requested, run):
    async def go():
        claimed = await one_claimed(store)
        if requested:
            assert await store.cancel(claimed.task_id, NOW + 1) == "requested"
        retry = typical_outcome(claimed, OutcomeKind.RETRY, NOW + 2, retry_at=NOW + 5)
        assert await store.finish("w", [retry]) == [True]
        result = await store.fetch_result(claimed.task_id)
        assert result.status == after_retry(requested)
        assert (result.attempts, result.error) == (1, "ValueError: again")
        if requested:
            assert result.finished_at == to_datetime(NOW + 2)
            assert await store.claim("w", 1, NOW + 5, NOW + LEASE) == [] and await store.next_eta() is None
        else:
            assert [c.attempts for c in await store.claim("w", 1, NOW + 5, NOW + LEASE)] == [2]

    run(go())


# -- progress --------------------------------------------------------------------------------


def test_progress_is_stored_for_running_claims_only(store, run):
    async def go():
        claimed = await one_claimed(store)
        token = Token(store)
        await store.set_progress("w", [(claimed.handle, claimed.attempts, 3.0, 10.0, "three")])
        assert token.moved
        token = Token(store)
        await store.set_progress("other", [(claimed.handle, claimed.attempts, 9.0, 10.0, "not mine")])
        await store.set_progress("w", [(claimed.handle, claimed.attempts + 1, 9.0, 10.0, "not this claim")])
        await store.set_progress("w", [])
        assert not token.moved
        info = (await store.fetch_info([claimed.task_id]))[claimed.task_id]
        assert (info.progress_done, info.progress_total, info.progress_message) == (3.0, 10.0, "three")
        await store.set_progress("w", [(claimed.handle, claimed.attempts, 4.0, None, None)])  # a whole new row
        info = (await store.fetch_info([claimed.task_id]))[claimed.task_id]
        assert (info.progress_done, info.progress_total, info.progress_message) == (4.0, None, None)

    run(go())


@pytest.mark.parametrize("how", ["taken over", "reclaimed", "requeued"])
def test_progress_of_a_lost_claim_is_not_stored(store, how, run):
    async def go():
        claimed = await one_claimed(store, lease=1)
        await lose(store, claimed, how, NOW + 2)
        before = await state(store, claimed.task_id)
        token = Token(store)
        await store.set_progress("w", [(claimed.handle, claimed.attempts, 5.0, 5.0, "too late")])
        assert not token.moved and await state(store, claimed.task_id) == before

    run(go())


def test_progress_of_several_tasks_in_one_call(store, run):
    async def go():
        await store.enqueue(new_tasks(2, NOW))
        a, b = await store.claim("w", 2, NOW, NOW + LEASE)
        await store.set_progress("w", [(a.handle, a.attempts, 1.0, 2.0, "a"), (b.handle, b.attempts, 3.0, 4.0, "b")])
        infos = await store.fetch_info([a.task_id, b.task_id])
        assert [(infos[t.task_id].progress_done, infos[t.task_id].progress_message) for t in (a, b)] == [
            (1.0, "a"), (3.0, "b"),
        ]

    run(go())


# -- readers -----------------------------------------------------------------------------------


def test_next_eta_is_the_earliest_pending_tasks(store, run):
    async def go():
        await store.connect()
        assert await store.next_eta() is None
        await store.enqueue(new_tasks(1, NOW, eta=NOW + 30) + new_tasks(1, NOW, eta=NOW + 20))
        assert await store.next_eta() == NOW + 20
        await store.claim("w", 1, NOW + 25, NOW + LEASE)  # the +20 one runs now: it no longer counts
        assert await store.next_eta() == NOW + 30

    run(go())


def test_readers_in_every_state(store, run):
    async def go():
        running, success, failed, cancelled, pending = tasks = new_tasks(5, NOW)
        await store.enqueue(tasks)
        claims = {c.task_id: c for c in await store.claim("w", 4, NOW, NOW + LEASE)}
        assert pending.task_id not in claims  # the newest waits
        await store.finish("w", [
            typical_outcome(claims[success.task_id], OutcomeKind.SUCCESS, NOW + 1),
            typical_outcome(claims[failed.task_id], OutcomeKind.FAILED, NOW + 2),
        ])
        await store.cancel(cancelled.task_id, NOW + 3)
        await store.finish("w", [typical_outcome(claims[cancelled.task_id], OutcomeKind.CANCELLED, NOW + 3)])
        overview = await store.overview(3)
        counts = {"waiting": 0, "pending": 1, "running": 1, "success": 1, "failed": 1, "cancelled": 1}
        assert overview.counts == counts and overview.queues == {"default": counts}
        assert [i.task_id for i in overview.running] == [running.task_id]
        assert [i.task_id for i in overview.failures] == [failed.task_id]
        assert overview.total == 5
        assert [i.task_id for i in overview.recent] == [t.task_id for t in reversed(tasks)][:3]  # newest first
        assert (await store.overview(0)).recent == []
        infos = await store.fetch_info([t.task_id for t in tasks] + [new_id()])
        assert sorted(infos) == sorted(t.task_id for t in tasks)
        assert {i: info.status for i, info in infos.items()} == {
            pending.task_id: "pending", running.task_id: "running", success.task_id: "success",
            failed.task_id: "failed", cancelled.task_id: "cancelled",
        }
        assert [i for i in overview.recent] == [infos[i.task_id] for i in overview.recent]  # the same records
        expected = {
            pending.task_id: ("pending", 0, None, None, None, None),
            running.task_id: ("running", 1, NOW, None, None, None),
            success.task_id: ("success", 1, NOW, NOW + 1, b"value", None),
            failed.task_id: ("failed", 1, NOW, NOW + 2, None, "ValueError: bad"),
            cancelled.task_id: ("cancelled", 1, NOW, NOW + 3, None, "TaskCancelledError: cancelled"),
        }
        for task_id, (status, attempts, started, finished, value, error) in expected.items():
            result = await store.fetch_result(task_id)
            assert (result.task_id, result.name, result.enqueued_at) == (task_id, "f", to_datetime(NOW))
            assert (result.status, result.attempts, result.value, result.error) == (status, attempts, value, error)
            assert (result.started_at, result.finished_at) == (to_datetime(started), to_datetime(finished))
            info = infos[task_id]
            assert (info.status, info.attempts, info.error, info.eta) == (status, attempts, error, to_datetime(NOW))
            assert (info.started_at, info.finished_at) == (to_datetime(started), to_datetime(finished))
            assert info.worker_id == (None if status == "pending" else "w")
        assert await store.fetch_result(new_id()) is None
        assert await store.fetch_info([]) == {}

    run(go())


# -- facts about the store ---------------------------------------------------------------------


def test_a_fact_about_the_store_is_recorded_once_and_never_overwritten(store, run):
    async def go():
        await store.connect()
        assert await store.get_meta("fact") is None
        token = Token(store)
        assert await store.set_meta_if_absent("fact", "first") == "first"
        assert token.moved
        token = Token(store)
        assert await store.set_meta_if_absent("fact", "second") == "first"  # the first one stays
        assert not token.moved
        assert await store.get_meta("fact") == "first"
        assert await store.get_meta("another fact") is None

    run(go())


def test_a_fact_recorded_through_one_connection_is_seen_by_another(open_shared_store, run):
    async def go():
        one, two = open_shared_store(), open_shared_store()
        assert await one.set_meta_if_absent("fact", "one's") == "one's"
        assert await two.set_meta_if_absent("fact", "two's") == "one's"
        assert await two.get_meta("fact") == "one's"

    run(go())


def test_a_store_that_stayed_where_it_was_passes_the_same_store_check(store, run):
    async def go():
        await store.connect()
        await store.enqueue(new_tasks(3, NOW))
        await store.ensure_same_store()  # the worker calls it every few tenths of a second: it must not raise
        await store.close()
        await store.ensure_same_store()  # nothing open, nothing to check

    run(go())


def test_a_claimed_row_with_values_sitq_does_not_write_comes_with_a_problem(store_kind, store, run):
    """The backend names the column; the worker fails that task alone (tests/test_odd_rows.py)."""
    if not store_kind.odd_values:
        pytest.skip(f"{store_kind.name} cannot hold values sitq never writes")

    async def go():
        good, bad = new_tasks(2, NOW)
        bad.signature = "text"  # as a hand edit could store it
        await store.enqueue([good, bad])
        claimed = {c.task_id: c for c in await store.claim("w1", 10, NOW, NOW + LEASE)}
        assert claimed[good.task_id].problem is None
        problem = claimed[bad.task_id].problem
        assert "column 'signature'" in problem and "where sitq stores bytes (or NULL)" in problem

    run(go())


# -- heartbeats --------------------------------------------------------------------------------


def test_a_heartbeat_renews_this_workers_leases_until_stopped(store, run):
    async def go():
        await store.enqueue(new_tasks(2, NOW))
        await store.claim("w1", 1, NOW, NOW + 1)
        await store.claim("w2", 1, NOW, NOW + 1)
        renewals = []

        def clock():  # the heartbeat asks for the time once per renewal
            renewals.append(None)
            return NOW + 100

        heartbeat = store.start_heartbeat("w1", 0.05, clock)
        deadline = time.monotonic() + 30
        while len(renewals) < 2:  # the first renewal has run to its end
            assert time.monotonic() < deadline, "the heartbeat never renewed"
            await asyncio.sleep(0.005)
        assert await store.requeue_expired(NOW + 50) == 1  # w2's lease ran out; w1's runs to NOW + 100.05
        heartbeat.stop()
        stopped_at = len(renewals)
        assert await store.requeue_expired(NOW + 200) == 1  # w1's: no longer renewed
        overview = await store.overview(10)
        assert overview.counts["pending"] == 2 and len(renewals) == stopped_at
        heartbeat.stop()  # twice is fine

    run(go())


# -- change notification -----------------------------------------------------------------------


def test_waiters_wake_on_a_write_in_this_process(store, run):
    async def go():
        await store.connect()
        token = store.change_token
        waiter = asyncio.ensure_future(store.wait_for_change(token, 30))
        await asyncio.sleep(0)
        assert not waiter.done()
        await store.enqueue(new_tasks(1, NOW))
        await asyncio.wait_for(waiter, 30)
        assert store.change_token != token  # woken by the write, not by the timeout
        # a stale token returns at once
        await asyncio.wait_for(store.wait_for_change(token, 30), 1)

    run(go())


async def woken_until_seen(waiter, task_id, token):
    """Wait on ``waiter`` until it sees ``task_id``. Every wake-up must come with a moved token:
    a wait that ran out its timeout instead fails the test."""
    while True:
        await waiter.wait_for_change(token, 30)
        assert waiter.change_token != token, "the waiter ran out its timeout: no change woke it"
        token = waiter.change_token
        if await waiter.fetch_result(task_id) is not None:
            return


def test_a_write_through_another_connection_wakes_a_waiter(open_shared_store, run):
    async def go():
        waiter, writer = open_shared_store(), open_shared_store()
        await waiter.connect()
        await writer.connect()
        (task,) = new_tasks(1, NOW)
        token = waiter.change_token
        watching = asyncio.ensure_future(woken_until_seen(waiter, task.task_id, token))
        await asyncio.sleep(0)
        await writer.enqueue([task])
        await asyncio.wait_for(watching, 60)

    run(go())


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from backends import new_tasks
    from sitq import open_backend

    async def main(target, task_id):
        backend = open_backend(target)
        (task,) = new_tasks(1, 1_700_000_000.0)
        task.task_id = task_id
        await backend.enqueue([task])
        await backend.close()

    asyncio.run(main(*sys.argv[1:]))
    """
)


def test_a_write_in_another_process_wakes_a_waiter(open_shared_store, shared_target, run):
    async def go():
        waiter = open_shared_store()
        await waiter.connect()
        task_id = new_id()
        token = waiter.change_token
        watching = asyncio.ensure_future(woken_until_seen(waiter, task_id, token))
        await asyncio.sleep(0)
        writer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRITER, shared_target, task_id, env=worker_env(), stderr=subprocess.PIPE
        )
        _, err = await writer.communicate()
        assert writer.returncode == 0, err.decode()
        await asyncio.wait_for(watching, 60)

    run(go())


# -- groups as one piece of work -------------------------------------------------------------

# Each backend's own methods, and the base's, which work through the rest of the contract.
GROUP_WAYS = {
    "backend": lambda store, name: getattr(store, name),
    "base": lambda store, name: getattr(Backend, name).__get__(store),
}


@pytest.mark.parametrize("way", list(GROUP_WAYS))
def test_cancelling_a_group_cancels_what_waits_and_asks_what_runs(store, way, run):
    async def go():
        group = new_tasks(5, NOW, group_id="g", group_name="work")
        other = new_tasks(1, NOW)
        await store.enqueue(group + other)
        claimed = await store.claim("w", 2, NOW, NOW + LEASE)  # the first two members run
        assert [c.task_id for c in claimed] == [t.task_id for t in group[:2]]
        await store.finish("w", [typical_outcome(claimed[0], OutcomeKind.SUCCESS, NOW + 1)])
        (after,) = new_tasks(1, NOW, after=(group[4].task_id,))  # waits for a member
        await store.enqueue([after])
        token = Token(store)
        done = await GROUP_WAYS[way](store, "cancel_group")("g", NOW + 2)
        assert done == {CancelOutcome.CANCELLED: 3, CancelOutcome.REQUESTED: 1} and token.moved
        counts = (await store.group("g")).counts
        assert (counts["success"], counts["running"], counts["cancelled"], counts["pending"]) == (1, 1, 3, 0)
        assert await store.cancel_requests("w") == [group[1].task_id]
        assert (await store.fetch_result(after.task_id)).status == "cancelled"  # as after a cancel()
        assert (await store.fetch_result(other[0].task_id)).status == "pending"  # not a member
        token = Token(store)
        assert await GROUP_WAYS[way](store, "cancel_group")("nope", NOW + 3) == {
            CancelOutcome.CANCELLED: 0, CancelOutcome.REQUESTED: 0}
        assert not token.moved

    run(go())


@pytest.mark.parametrize("way", list(GROUP_WAYS))
def test_ungrouped_tasks_are_listed_without_the_groups(store, way, run):
    async def go():
        loose = new_tasks(3, NOW)
        await store.enqueue(loose[:1] + new_tasks(700, NOW, group_id="g") + loose[1:])
        find = GROUP_WAYS[way](store, "find_ungrouped")
        assert [i.task_id for i in await find()] == [t.task_id for t in reversed(loose)]
        assert [i.task_id for i in await find(newest_first=False, offset=1, limit=1)] == [loose[1].task_id]
        (claimed,) = await store.claim("w", 1, NOW, NOW + LEASE)  # the oldest: loose[0]
        assert claimed.task_id == loose[0].task_id
        assert [i.task_id for i in await find(statuses=["running"])] == [loose[0].task_id]
        assert all(i.group_id is None for i in await find(statuses=["pending"]))
        assert await find(limit=0) == []

    run(go())


@pytest.mark.parametrize("way", list(GROUP_WAYS))
def test_ungrouped_tasks_behind_a_big_group_are_found_in_every_state(store, way, run):
    """A board lists the loose tasks wherever they are: here stored before a group of 3,000 whose
    members are in the same states (a backend finds them without reading the group's rows)."""

    async def go():
        loose = new_tasks(5, NOW) + new_tasks(1, NOW, eta=NOW + 3600)  # the last: pending, not due
        await store.enqueue(loose)
        claimed = await store.claim("w", 4, NOW, NOW + LEASE)  # loose 0-3
        await store.finish("w", [typical_outcome(claimed[0], OutcomeKind.SUCCESS, NOW + 1),
                                 typical_outcome(claimed[1], OutcomeKind.FAILED, NOW + 1)])
        await store.cancel(loose[4].task_id, NOW + 1)
        group = new_tasks(3000, NOW, group_id="g")
        await store.enqueue(group)
        members = await store.claim("w", 4, NOW + 2, NOW + LEASE)  # so the group has every state too
        await store.finish("w", [typical_outcome(members[0], OutcomeKind.SUCCESS, NOW + 3),
                                 typical_outcome(members[1], OutcomeKind.FAILED, NOW + 3)])
        await store.cancel(group[-1].task_id, NOW + 3)
        find = GROUP_WAYS[way](store, "find_ungrouped")
        ids = [t.task_id for t in loose]

        async def found(*states, **options):
            return [i.task_id for i in await find(statuses=list(states), **options)]

        assert await found("pending") == [ids[5]]
        assert await found("running") == [ids[3], ids[2]]
        assert await found("failed") == [ids[1]]
        assert await found("success", "cancelled", "pending") == [ids[5], ids[4], ids[0]]
        assert await found("success", "cancelled", "pending", offset=1, limit=1) == [ids[4]]
        assert await found("success", "cancelled", "pending", newest_first=False) == [ids[0], ids[4], ids[5]]
        assert await found(*STATES, limit=4) == [ids[5], ids[4], ids[3], ids[2]]
        assert await found("running", "failed", newest_first=False, offset=1) == [ids[2], ids[3]]
        assert await found("waiting") == [] and await found() == [] and await found("pending", limit=0) == []
        # a task that moves (retried, finished) moves in the search too
        await store.finish("w", [typical_outcome(claimed[2], OutcomeKind.SUCCESS, NOW + 4)])
        assert await found("success") == [ids[2], ids[0]] and await found("running") == [ids[3]]
        assert (await store.retry([ids[1]], NOW + 5))[ids[1]] is not None
        assert await found("failed") == [] and await found("pending") == [ids[5], ids[1]]

    run(go())


def test_ungrouped_tasks_are_counted_per_state_from_the_kept_counts(store, run):
    async def go():
        assert await store.count_ungrouped() == dict.fromkeys(STATES, 0)
        loose, group = new_tasks(3, NOW), new_tasks(4, NOW, group_id="g")
        await store.enqueue(loose + group)
        first, second = await store.claim("w", 2, NOW, NOW + LEASE)  # the oldest two: loose ones
        assert {first.task_id, second.task_id} == {loose[0].task_id, loose[1].task_id}
        await store.finish("w", [typical_outcome(first, OutcomeKind.SUCCESS, NOW + 1)])
        await store.cancel(group[0].task_id, NOW + 1)
        await store.cancel(loose[2].task_id, NOW + 1)
        counts = await store.count_ungrouped()
        assert counts == {**dict.fromkeys(STATES, 0), "success": 1, "running": 1, "cancelled": 1}
        assert (await store.group("g")).counts["pending"] == 3  # the group's own are not counted
        with pytest.raises(NotImplementedError):  # the base cannot count without reading every row
            await Backend.count_ungrouped(store)

    run(go())


def test_group_ids_are_found_by_their_beginning_or_end(store, run):
    async def go():
        await store.enqueue(new_tasks(1, NOW, group_id="abc-123") + new_tasks(1, NOW, group_id="abd-999"))
        assert await store.match_group_ids("abc-123") == ["abc-123"]
        assert await store.match_group_ids("123") == ["abc-123"]
        assert await store.match_group_ids("ab") == ["abc-123", "abd-999"]
        assert await store.match_group_ids("ab", limit=1) == ["abc-123"]
        assert await store.match_group_ids("zzz") == []

    run(go())
