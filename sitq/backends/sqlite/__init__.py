"""The embedded SQLite backend.

Small statements (an enqueue, a worker's finish-and-claim, a result) run on
the calling thread, under a lock, with SQLite's busy timeout set to zero: a
statement that finds the database locked by another process gives up at
once, the lock is released and the coroutine sleeps (1 ms, doubling to
50 ms) before it tries again. So the event loop is never blocked waiting for
a lock, and a statement costs what SQLite costs, with no hop to a helper
thread (aiosqlite's hop alone costs more than the statement). Writes that
belong together (a worker's finished outcomes and its next claim, or a bulk
enqueue) share one transaction. ``docs/performance.md`` has the measurements
behind this design.

Nothing may block the caller's event loop for long, so three kinds of work
run on helper threads, each with a connection of its own, started on first
use and stopped by ``close()``:

- work that grows with the data: a bulk enqueue of more than ``OFFLOAD_ROWS``
  tasks (still one transaction), ``overview()`` (its counts scan the table)
  and ``fetch_info()`` for many ids, with the building of their records;
- WAL checkpoints: the loop's connection never checkpoints (SQLite would do
  it inside a COMMIT, which can take a second on a busy disk); a helper runs
  a PASSIVE checkpoint once ``CHECKPOINT_COMMITS`` writes committed or
  ``CHECKPOINT_ROWS`` rows changed;
- lease renewal (``start_heartbeat``), so that a stalled loop, a slow
  statement or a checkpoint cannot let a healthy worker's leases expire.

A helper that finds the database locked sleeps in its own thread and tries
again, as the loop's statements do. An in-memory store has one connection
only: helpers use it under the lock, and the loop waits for the lock without
blocking.

Other processes' writes are noticed by a small thread that checks
``PRAGMA data_version`` (a counter read from shared memory) every millisecond
while someone is waiting, backing off to 25 ms after a quiet second.

SQLite lets any value into any column, so a row may hold what sitq never wrote
(a hand edit, another program). Reading never fails on such a row: a claimed
one comes back with ``ClaimedTask.problem`` naming the column, for the worker to
fail that task alone; readers get what can be shown (see ``sitq.core``); text
that is not UTF-8 is read with replacement characters instead of failing the
whole statement.

The package's modules, each importing only those before it: ``rows`` (reading
rows into records, odd values included), ``schema`` (the file: its schema,
upgrades, opening and checking it), ``statements`` (the SQL, one name each, and
the functions that run it) and ``backend`` (the class and its helper threads).
"""

from sitq.backends.sqlite.backend import (
           BATCH_ROWS,
           CHECKPOINT_COMMITS,
           CHECKPOINT_ROWS,
           OFFLOAD_ROWS,
           RENEWALS_PER_LEASE,
           SQLiteBackend,
)
from sitq.backends.sqlite.schema import APPLICATION_ID, SCHEMA_VERSION

__all__ = ["SQLiteBackend", "SCHEMA_VERSION", "APPLICATION_ID", "OFFLOAD_ROWS", "BATCH_ROWS", "CHECKPOINT_COMMITS",
           "CHECKPOINT_ROWS", "RENEWALS_PER_LEASE"]
