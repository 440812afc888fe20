"""The backends the contract suite, the model test and the queue and worker tests run on.

Each entry of ``BACKENDS`` says how to make a fresh, empty store for one test and what the
store can do; a new backend is one more line. Tests do not read this list themselves: they
take the fixtures in ``conftest.py``, which are parameterised over it:

- ``store``: a backend made by ``open_backend`` on a fresh store, for every backend here;
- ``open_store``: ``open_backend`` on that same store again, for tests that need a second
  connection (``store_kind.shared`` says whether there is one to have);
- ``shared_target``: the target string of a fresh store that other processes can open
  (``sitq worker TARGET``), for the backends marked ``shared`` only.

A backend whose server cannot be reached is skipped, with the reason its ``unavailable``
gives. The PostgreSQL entry makes a schema of its own for each test in the database
``SITQ_TEST_POSTGRES`` names (default ``postgresql://postgres@127.0.0.1:5432/test``), yields
its URL (``...?schema=t_...``) and drops it afterwards; with ``SITQ_REQUIRE_POSTGRES=1`` (CI)
a server that cannot be reached fails the tests instead of skipping them.

``new_tasks`` and ``outcome`` build the records the backend contract takes, in one place,
so that a field added to them is added here once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sitq.backends import Backend, MemoryBackend, SQLiteBackend
from sitq.core import ClaimedTask, NewTask, NewTaskBatch, Outcome, OutcomeKind

# -- how each store is made ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoreKind:
    """One backend the tests run on.

    ``target`` makes a fresh, empty store under the test's ``tmp_path`` and returns its
    target string, or a context manager that yields it (and removes the store afterwards).
    ``shared``: every ``open_backend`` on the target, in this process or another, sees the
    same store (a file, a server); ``memory://`` and ``:memory:`` are private to one object.
    ``odd_values``: the store can hold values sitq never writes (SQLite keeps any value in
    any column), so rows with, say, an eta that is not a time can be tested on it.
    ``unavailable`` returns why the backend cannot be tested here (its server is not
    reachable, its driver is missing), or None. ``hidden`` reads what each task holds that
    no reader of the contract returns (see :func:`hidden_fields`), for the model test.
    """

    name: str
    target: Callable[[Path], str | contextlib.AbstractContextManager[str]]
    shared: bool
    odd_values: bool = False
    unavailable: Callable[[], str | None] = lambda: None
    hidden: Callable[[Backend], dict[str, tuple[int, bool, float | None]]] | None = None

    @contextlib.contextmanager
    def fresh(self, folder: Path) -> Iterator[str]:
        """The target of a fresh store for one test; it is removed (if it needs removing) after."""
        made = self.target(folder)
        if isinstance(made, str):
            yield made
        else:
            with made as target:
                yield target


def _sqlite_hidden(backend: Backend) -> dict[str, tuple[int, bool, float | None]]:
    assert isinstance(backend, SQLiteBackend)
    with backend._lock:  # the backend's own connection: ':memory:' has no other
        rows = backend._connection().execute("SELECT id, lost, cancel_requested, lease_until FROM sitq_tasks")
        return {task_id: (lost, bool(requested), lease) for task_id, lost, requested, lease in rows}


def _memory_hidden(backend: Backend) -> dict[str, tuple[int, bool, float | None]]:
    assert isinstance(backend, MemoryBackend)
    with backend._lock:
        return {r.task_id: (r.lost, r.cancel_requested, r.lease_until) for r in backend._rows.values()}


POSTGRES_DSN = os.environ.get("SITQ_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def postgres_url(schema: str, dsn: str = POSTGRES_DSN) -> str:
    """The URL of the queue in ``schema`` of the test database."""
    return f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"


@functools.lru_cache(maxsize=1)
def _postgres_problem() -> str | None:
    try:
        import psycopg
    except ImportError as exc:
        return f"psycopg is not installed ({exc}); pip install 'sitq[postgres]'"
    try:
        psycopg.connect(POSTGRES_DSN, connect_timeout=5).close()
    except psycopg.Error as exc:
        from sitq.backends import describe_target

        return f"no PostgreSQL server at {describe_target(POSTGRES_DSN)} (SITQ_TEST_POSTGRES): {str(exc).strip()}"
    return None


def postgres_unavailable() -> str | None:
    """Why PostgreSQL cannot be tested here, or None; with SITQ_REQUIRE_POSTGRES=1 that is an error."""
    problem = _postgres_problem()
    if problem and os.environ.get("SITQ_REQUIRE_POSTGRES") == "1":
        raise RuntimeError(f"SITQ_REQUIRE_POSTGRES=1, but {problem}")
    return problem


@contextlib.contextmanager
def postgres_schema(folder: Path | None = None) -> Iterator[str]:
    """The URL of a fresh queue in a schema of its own, dropped (with everything in it) afterwards."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:16]}"
    try:
        yield postgres_url(name)
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def wait_until_server_forgets(target: str, pid: int, timeout: float = 30.0) -> None:
    """Return once no connection of the (killed) process ``pid`` is left on the store's server.

    A file store stops taking a process's writes the moment it dies; a server may still commit
    the statement that the process sent last, after it died. A test that reads what the dead
    process held must wait for that first. sitq names its connections ``sitq PID``.
    """
    if not target.startswith(("postgresql://", "postgres://")):
        return
    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        while conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                           (f"sitq {pid}",)).fetchone()[0]:
            assert time.monotonic() < deadline, f"the server kept the connections of process {pid}"
            time.sleep(0.01)


def _postgres_hidden(backend: Backend) -> dict[str, tuple[int, bool, float | None]]:
    import psycopg

    schema = backend.schema  # type: ignore[attr-defined]
    with psycopg.connect(POSTGRES_DSN) as conn:
        rows = conn.execute(f'SELECT id, lost, cancel_requested, lease_until FROM "{schema}".tasks').fetchall()
    return {task_id: (lost, bool(requested), lease) for task_id, lost, requested, lease in rows}


BACKENDS = [
    StoreKind("sqlite-file", lambda folder: str(folder / "tasks.db"), shared=True, odd_values=True,
              hidden=_sqlite_hidden),
    StoreKind("sqlite-memory", lambda folder: ":memory:", shared=False, odd_values=True, hidden=_sqlite_hidden),
    StoreKind("memory", lambda folder: "memory://", shared=False, hidden=_memory_hidden),
    StoreKind("postgres", postgres_schema, shared=True, unavailable=postgres_unavailable, hidden=_postgres_hidden),
]

REFERENCE = "memory"  # the plain-Python backend the model test compares the others with


def hidden_fields(kind: StoreKind, backend: Backend) -> dict[str, tuple[int, bool, float | None]]:
    """``{task_id: (lost, cancel_requested, lease_until)}``: what the contract keeps per task
    but returns from no reader (lost counts show only in claims). Empty if ``kind`` cannot say."""
    return kind.hidden(backend) if kind.hidden is not None else {}


# -- the records the contract takes --------------------------------------------------

_ids = iter(range(1, 1 << 62))


def new_id() -> str:
    """A new task id, 32 hex digits as sitq makes them, in the order they were made."""
    return f"{next(_ids):032x}"


def new_tasks(count: int, now: float, *, eta: float | None = None, name: str = "f", **fields: Any) -> list[NewTask]:
    """``count`` new tasks enqueued at ``now``, due at ``eta`` (default: now), each with its own args."""
    return [
        NewTask(new_id(), name, b"func", f"args{i}".encode(), now if eta is None else eta, now, **fields)
        for i in range(count)
    ]


def new_batch(
    count: int, now: float, *, eta: float | None = None, name: str = "f", **fields: Any
) -> NewTaskBatch:
    """``count`` new tasks as ``map`` makes them: one batch of columns."""
    ids = [new_id() for _ in range(count)]
    return NewTaskBatch(
        name, b"func", now if eta is None else eta, now, 1, ids, [f"args{i}".encode() for i in range(count)],
        [None] * count, **fields,
    )


def outcome(claimed: ClaimedTask, kind: OutcomeKind, at: float, **fields: Any) -> Outcome:
    """The outcome of ``claimed``'s attempt, of ``kind``, finished at ``at``."""
    return Outcome(claimed.task_id, claimed.handle, claimed.attempts, kind, at, **fields)


OUTCOME_FIELDS = {
    OutcomeKind.SUCCESS: {"value": b"value", "value_signature": b"signed", "output": "printed"},
    OutcomeKind.FAILED: {"error": "ValueError: bad", "traceback": "Traceback ...", "output": "printed"},
    OutcomeKind.CANCELLED: {"error": "TaskCancelledError: cancelled"},
    OutcomeKind.RETRY: {"error": "ValueError: again", "traceback": "Traceback ...", "output": "printed"},
}


def typical_outcome(claimed: ClaimedTask, kind: OutcomeKind, at: float, *, retry_at: float | None = None) -> Outcome:
    """An outcome of ``kind`` with the fields a worker fills in for it (a retry is due at ``retry_at``)."""
    fields = dict(OUTCOME_FIELDS[kind])
    if kind is OutcomeKind.RETRY:
        fields["retry_at"] = at if retry_at is None else retry_at
    return outcome(claimed, kind, at, **fields)
