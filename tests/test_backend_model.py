"""The stateful model test: each real backend against the in-memory reference, side by side.

Hypothesis drives random sequences of the contract's calls (enqueue, alone and in batches,
with etas, queues, priorities and dependencies; claim, with limits, alone or not, from some
queues; release; renew; finish of every outcome kind, for live claims and for lost ones; the
clock moving past leases; requeue_expired; cancel; cancel requests; progress; retries, by a
worker and by hand) against a real backend and ``MemoryBackend`` at once. The
clock is the test's: every call is given ``now``. Each call must return the same on both,
and after every step both must hold the same for every task: status, attempts, lost count,
cancel request, lease, result fields, progress, overview. A disagreement is a bug in one of
them: hypothesis prints the shortest sequence of calls that shows it.

The default run is small, to keep the suite quick; ``SITQ_HYPOTHESIS_EXAMPLES=500`` runs
that many sequences per backend, and checks the model test itself: each of a few backends
broken on purpose must be caught.
"""

import asyncio
import dataclasses
import itertools
import os

import pytest
from backends import BACKENDS, OUTCOME_FIELDS, REFERENCE, hidden_fields, new_batch, new_tasks
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from sitq import open_backend
from sitq.backends import MemoryBackend
from sitq.core import NewTask, Outcome, OutcomeKind
from sitq.errors import BackendError

EXAMPLES = int(os.environ.get("SITQ_HYPOTHESIS_EXAMPLES", "25"))
STEPS = 30
NOW = 1_700_000_000.0
WORKERS = st.sampled_from(["w1", "w2"])
LEASES = st.sampled_from([1.0, 3.0, 30.0])
DELAYS = st.sampled_from([0.0, 0.0, -1.0, 1.0, 4.0])  # an eta relative to now
TICKS = st.sampled_from([None, None, 0.5, 1.0, 5.0, 31.0])  # None: just past a lease
KINDS = st.sampled_from([*OutcomeKind, OutcomeKind.RETRY])  # retries lead on to the most states
QUEUES = st.sampled_from(["default", "default", "other"])
SERVED = st.sampled_from([None, None, ("default",), ("other",), ("default", "other")])  # a worker's queues
PRIORITIES = st.sampled_from([0, 0, 5])
PROGRESS = st.sampled_from([None, (5.0, None, None), (1.0, 2.0, "half"), (3.0, 4.0, None)])
UNKNOWN = "f" * 32  # no task has this id

REAL = [pytest.param(kind, id=kind.name) for kind in BACKENDS if kind.name != REFERENCE]
(REFERENCE_KIND,) = (kind for kind in BACKENDS if kind.name == REFERENCE)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim, as both backends made it: each has its own handle for it."""

    worker: str
    task_id: str
    attempts: int
    handles: tuple  # (the reference's, the real backend's)


def claimed_view(claimed):
    """What a claim returns, without the handles (each backend has its own) and in id order
    (the contract picks which tasks, not the order of the list)."""
    return sorted((c.task_id, c.name, c.func, c.args, c.signature, c.attempts, c.lost, c.problem) for c in claimed)


class BackendModel(RuleBasedStateMachine):
    """Subclassed per real backend by the test below (``kind`` and ``folder``)."""

    kind = None
    folder = None
    _examples = itertools.count()

    def __init__(self):
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.now = NOW
        self.ids = []  # every task enqueued
        self.made = []  # every claim made, live or lost
        folder = self.folder / f"example-{next(self._examples)}"
        folder.mkdir()
        self._fresh = self.kind.fresh(folder)
        self.reference = open_backend(REFERENCE_KIND.target(folder))
        self.real = self.open_real(self._fresh.__enter__())
        for backend in (self.reference, self.real):
            self.loop.run_until_complete(backend.connect())

    def open_real(self, target):
        return open_backend(target)

    def teardown(self):
        try:
            for backend in (self.reference, self.real):
                self.loop.run_until_complete(backend.close())
        finally:
            self.loop.close()
            self._fresh.__exit__(None, None, None)

    # -- calling both ----------------------------------------------------------------

    def both(self, call, view=lambda value: value, ok=False):
        """``call(backend, side)`` on the reference (side 0) and the real backend (side 1): both
        must return the same (as ``view`` shows it) or raise the same error. Returns both values
        (with ``ok``: whether they returned rather than raised)."""
        got, shown = [], []
        for side, backend in enumerate((self.reference, self.real)):
            try:
                value = self.loop.run_until_complete(call(backend, side))
            except BackendError as exc:
                got.append(None)
                shown.append(("raised", type(exc).__name__))
            else:
                got.append(value)
                shown.append(("returned", view(value)))
        assert shown[1] == shown[0], f"{self.kind.name} {shown[1]} where the reference {shown[0]}"
        return (shown[0][0] == "returned") if ok else got

    def outcome(self, claim, kind, side, retry_in, progress):
        fields = dict(OUTCOME_FIELDS[kind])
        if kind is OutcomeKind.RETRY:
            fields["retry_at"] = self.now + retry_in
        return Outcome(claim.task_id, claim.handles[side], claim.attempts, kind, self.now, progress=progress, **fields)

    def made_claims(self, worker, pair):
        reference, real = pair
        handles = {c.task_id: c.handle for c in real}
        self.made += [Claim(worker, c.task_id, c.attempts, (c.handle, handles[c.task_id])) for c in reference]

    # Which claims a rule picks. The reference says which claims still hold ("live"), which of
    # those have a cancel request ("requested"), and which were lost: their task runs again
    # under a later claim ("lost"), maybe of the same worker ("reclaimed"). Rules aim at these
    # most of the time, so that sequences that need them (a cancel request, then a retry; a
    # worker that claimed a task again reporting on its old claim) come up often.
    POOLS = st.sampled_from(["live", "live", "requested", "lost", "reclaimed", "any"])

    def pool(self, which):
        live = [c for c in self.made if self.reference._held(c.worker, c.handles[0], c.attempts) is not None]
        if which == "live":
            return live
        if which == "requested":
            return [c for c in live if self.reference._rows[c.task_id].cancel_requested]
        holder = {c.task_id: c.worker for c in live}
        lost = [c for c in self.made if c.task_id in holder and c not in live]
        if which == "lost":
            return lost
        if which == "reclaimed":
            return [c for c in lost if holder[c.task_id] == c.worker]
        return self.made

    def pick(self, data, which, count=1):
        pool = self.pool(which) or self.made
        return data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=count, unique=True), label=which)

    # -- producers ---------------------------------------------------------------------

    @initialize(count=st.integers(1, 4), batch=st.booleans())
    def some_tasks_are_waiting(self, count, batch):
        """Every sequence starts with a few tasks due now, so that claims find work at once."""
        made = new_batch(count, self.now) if batch else new_tasks(count, self.now)
        self.both(lambda backend, side: backend.enqueue(made))
        self.ids += [task.task_id for task in made]

    @rule(
        count=st.integers(1, 3), delay=DELAYS, batch=st.booleans(), queue=QUEUES, priority=PRIORITIES,
        data=st.data(),
    )
    def enqueue(self, count, delay, batch, queue, priority, data):
        """New tasks, due now, earlier or later, in a queue, with a priority, maybe after other
        tasks; now and then with an id already stored, when none of them may be stored."""
        eta = self.now + delay
        fields = {"queue": queue, "priority": priority}
        if self.ids and data.draw(st.sampled_from([False] * 3 + [True]), label="after others"):
            fields["after"] = tuple(data.draw(st.lists(st.sampled_from(self.ids), min_size=1, max_size=2)))
        made = new_batch(count, self.now, eta=eta, **fields) if batch else new_tasks(count, self.now, eta=eta, **fields)
        if self.ids and data.draw(st.sampled_from([False] * 5 + [True]), label="with an id already stored"):
            made = list(made) + [NewTask(data.draw(st.sampled_from(self.ids)), "again", b"f", b"a", eta, self.now)]
        if self.both(lambda backend, side: backend.enqueue(made), ok=True):
            self.ids += [task.task_id for task in made]

    # -- workers -----------------------------------------------------------------------

    @rule(worker=WORKERS, limit=st.integers(0, 4), alone=st.booleans(), lease=LEASES, queues=SERVED)
    def claim(self, worker, limit, alone, lease, queues):
        def call(backend, side):
            return backend.claim(worker, limit, self.now, self.now + lease, alone=alone, queues=queues)

        self.made_claims(worker, self.both(call, claimed_view))

    @precondition(lambda self: self.made)
    @rule(data=st.data(), which=POOLS, by_owner=st.sampled_from([True, True, False]))
    def release(self, data, which, by_owner):
        """A worker hands back claims it has not started (or, lost, cannot)."""
        chosen = self.pick(data, which, count=2)
        worker = chosen[0].worker if by_owner else "someone else"
        self.both(lambda backend, side: backend.release(worker, [(c.handles[side], c.attempts) for c in chosen]))

    @rule(data=st.data())
    def retry_by_hand(self, data):
        """Tasks retried by hand (``sitq retry``): the failed and cancelled ones run again."""
        chosen = data.draw(st.lists(st.sampled_from([*self.ids, UNKNOWN]), min_size=1, max_size=3), label="tasks")
        shown = lambda done: {task_id: str(outcome) for task_id, outcome in done.items()}  # noqa: E731
        self.both(lambda backend, side: backend.retry(chosen, self.now), shown)

    @precondition(lambda self: self.made)
    @rule(
        data=st.data(), which=POOLS, kinds=st.tuples(KINDS, KINDS),
        retry_in=DELAYS, progress=PROGRESS, by_owner=st.sampled_from([True, True, True, False]),
    )
    def finish(self, data, which, kinds, retry_in, progress, by_owner):
        """One or two outcomes: for claims that hold, that were lost, or any; by their worker or another."""
        chosen = self.pick(data, which, count=2)
        worker = chosen[0].worker if by_owner else "someone else"

        def call(backend, side):
            outcomes = [self.outcome(c, k, side, retry_in, progress) for c, k in zip(chosen, kinds, strict=False)]
            return backend.finish(worker, outcomes)

        self.both(call)

    @rule(
        worker=WORKERS, data=st.data(), which=POOLS, kinds=st.tuples(KINDS, KINDS), retry_in=DELAYS,
        limit=st.integers(0, 3), alone=st.booleans(), lease=LEASES, queues=SERVED,
    )
    def finish_and_claim(self, worker, data, which, kinds, retry_in, limit, alone, lease, queues):
        """The worker reports on claims it made (some may be lost by now), and claims more."""
        mine = [c for c in self.pool(which) if c.worker == worker] or [c for c in self.made if c.worker == worker]
        chosen = []
        if mine:
            chosen = data.draw(st.lists(st.sampled_from(mine), min_size=1, max_size=2, unique=True), label=which)

        def call(backend, side):
            outcomes = [self.outcome(c, k, side, retry_in, None) for c, k in zip(chosen, kinds, strict=False)]
            return backend.finish_and_claim(
                worker, outcomes, limit, self.now, self.now + lease, alone=alone, queues=queues
            )

        pair = self.both(call, lambda value: (value[0], claimed_view(value[1])))
        self.made_claims(worker, (pair[0][1], pair[1][1]))

    @precondition(lambda self: self.pool("live"))
    @rule(worker=WORKERS, lease=LEASES)
    def renew(self, worker, lease):
        self.both(lambda backend, side: backend.renew(worker, self.now + lease))

    @rule(data=st.data(), seconds=TICKS, requeue=st.sampled_from([True, True, True, False]))
    def time_passes(self, data, seconds, requeue):
        """The clock moves on, by ``seconds`` or (None) to just past the lease of a claim that
        holds; then, mostly, expired leases are dealt with."""
        live = self.pool("live")
        if seconds is None:
            seconds = 1.0
            if live:
                claim = data.draw(st.sampled_from(live), label="past the lease of")
                seconds = max(self.reference._rows[claim.task_id].lease_until - self.now, 0.0) + 0.5
        self.now += seconds
        if requeue:
            self.both(lambda backend, side: backend.requeue_expired(self.now))

    @precondition(lambda self: self.ids)
    @rule(data=st.data(), which=st.sampled_from(["running", "running", "any", "unknown"]))
    def cancel(self, data, which):
        if which == "unknown":
            task_id = UNKNOWN
        elif which == "running" and self.pool("live"):
            task_id = self.pick(data, "live")[0].task_id
        else:
            task_id = data.draw(st.sampled_from(self.ids), label="task")
        self.both(lambda backend, side: backend.cancel(task_id, self.now), lambda outcome: outcome and str(outcome))

    @precondition(lambda self: self.made)
    @rule(
        data=st.data(), which=POOLS, done=st.sampled_from([1.0, 2.5]),
        total=st.sampled_from([None, 5.0]), message=st.sampled_from([None, "step"]),
        by_owner=st.sampled_from([True, True, False]),
    )
    def set_progress(self, data, which, done, total, message, by_owner):
        chosen = self.pick(data, which, count=2)
        worker = chosen[0].worker if by_owner else "someone else"

        def call(backend, side):
            return backend.set_progress(worker, [(c.handles[side], c.attempts, done, total, message) for c in chosen])

        self.both(call)

    # -- after every step: the two stores hold the same -----------------------------------

    @invariant()
    def the_backends_agree(self):
        reference, real = (self.loop.run_until_complete(self.snapshot(b)) for b in (self.reference, self.real))
        for what in reference:
            if what == "results":  # one task at a time, for a message that names it
                for task_id, result in reference[what].items():
                    assert real[what][task_id] == result, (
                        f"{self.kind.name} has {real[what][task_id]} where the reference has {result}"
                    )
            assert real[what] == reference[what], (
                f"{self.kind.name} {what}: {real[what]} where the reference has {reference[what]}"
            )
        hidden = hidden_fields(self.kind, self.real)
        if hidden:  # lost counts, cancel requests and leases, which no reader returns
            expected = hidden_fields(REFERENCE_KIND, self.reference)
            assert hidden == expected, f"{self.kind.name} holds {hidden} where the reference holds {expected}"

    async def snapshot(self, backend):
        """Everything the readers say, in one visit to the event loop."""
        return _unnamed_dependencies({
            "cancel requests": {
                w: sorted(await backend.cancel_requests(w)) for w in ("w1", "w2", "someone else")
            },
            "suspects waiting": {q: await backend.suspects_waiting(self.now, q) for q in (None, ("other",))},
            "next eta": {q: await backend.next_eta(q) for q in (None, ("default",))},
            "overview": await backend.overview(4),
            "info": await backend.fetch_info(self.ids + [UNKNOWN]),
            "results": {task_id: await backend.fetch_result(task_id) for task_id in self.ids},
        })


DEPENDENCY_ERROR = "DependencyError: it runs after task "


def _unnamed_dependencies(snapshot):
    """The snapshot with the dependency named in a DependencyError left out. A task that runs
    after several tasks, cancelled when some of them did not succeed (a cascade), names one of
    them; the contract does not say which, and backends settle a cascade in different orders."""

    def plain(record):
        if record is not None and (record.error or "").startswith(DEPENDENCY_ERROR):
            return dataclasses.replace(record, error=DEPENDENCY_ERROR + "...")
        return record

    overview = snapshot["overview"]
    snapshot["overview"] = dataclasses.replace(
        overview, recent=[plain(i) for i in overview.recent], failures=[plain(i) for i in overview.failures]
    )
    snapshot["info"] = {task_id: plain(info) for task_id, info in snapshot["info"].items()}
    snapshot["results"] = {task_id: plain(result) for task_id, result in snapshot["results"].items()}
    return snapshot


@pytest.mark.timeout(120 + EXAMPLES)  # a long run (SITQ_HYPOTHESIS_EXAMPLES) takes its time
@pytest.mark.parametrize("kind", REAL)
def test_a_backend_agrees_with_the_reference_on_every_sequence_of_calls(kind, tmp_path):
    reason = kind.unavailable()
    if reason:
        pytest.skip(f"{kind.name}: {reason}")
    machine = type(f"{kind.name.title().replace('-', '')}Model", (BackendModel,), {"kind": kind, "folder": tmp_path})
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None),
    )


# -- the model test itself: it must catch a backend that breaks a rule ------------------------


class ForgetsCancelOnRetry(MemoryBackend):
    """Drops a cancel request when the attempt reports a retry (rules.after_retry)."""

    async def finish_and_claim(self, worker_id, outcomes, *args, **kwargs):
        with self._lock:
            for o in outcomes:
                row = self._held(worker_id, o.handle, o.attempts)
                if row is not None and o.kind is OutcomeKind.RETRY:
                    row.cancel_requested = False
        return await super().finish_and_claim(worker_id, outcomes, *args, **kwargs)


class ChecksOnlyTheWorker(MemoryBackend):
    """Guards writes by worker only: a worker's old, lost claim of a task it claimed again still writes."""

    def _held(self, worker_id, seq, attempts):
        row = self._by_seq.get(seq)
        return row if row is not None and row.status == "running" and row.worker_id == worker_id else None


class SuspectsBesideOthers(MemoryBackend):
    """Hands out suspects to busy workers too (claim's ``alone``)."""

    def _claim(self, worker_id, limit, now, lease_until, alone, queues):
        return super()._claim(worker_id, limit, now, lease_until, True, queues)


class ForgetsLostWorkers(MemoryBackend):
    """Requeues expired tasks without counting the lost worker."""

    async def requeue_expired(self, now):
        count = await super().requeue_expired(now)
        with self._lock:
            for row in self._rows.values():
                row.lost = 0 if row.status == "pending" else row.lost
        return count


BROKEN = [ForgetsCancelOnRetry, ChecksOnlyTheWorker, SuspectsBesideOthers, ForgetsLostWorkers]


@pytest.mark.skipif(
    "SITQ_HYPOTHESIS_EXAMPLES" not in os.environ,
    reason="the model test's own check runs in the long run (SITQ_HYPOTHESIS_EXAMPLES=500)",
)
@pytest.mark.timeout(600)
@pytest.mark.parametrize("broken", BROKEN)
def test_the_model_test_catches_a_backend_that_breaks_a_rule(broken, tmp_path):
    """Derandomized (the same sequences every run), with enough of them that a bug a few calls
    deep is found whatever hypothesis's version picks: a few seconds each in the long run."""

    class BrokenModel(BackendModel):
        kind = dataclasses.replace(REFERENCE_KIND, name=broken.__name__)
        folder = tmp_path

        def open_real(self, target):
            return broken()

    quick = settings(
        max_examples=max(EXAMPLES, 500), stateful_step_count=STEPS, deadline=None, database=None, derandomize=True,
        phases=[Phase.generate],  # no shrinking: that it fails is what this test is about
    )
    with pytest.raises(AssertionError, match=f"{broken.__name__} .* where the reference"):
        run_state_machine_as_test(BrokenModel, settings=quick)
