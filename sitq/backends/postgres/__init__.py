"""The PostgreSQL backend: one queue shared by workers on many machines (``pip install 'sitq[postgres]'``).

``open_backend("postgresql://user@host/database")`` opens it; everything else (queues, workers,
the command line, the notebook) works as on SQLite. How it does what the contract asks:

- **Claims** are one statement, ``UPDATE ... WHERE seq IN (SELECT seq ... FOR UPDATE SKIP LOCKED
  LIMIT n) RETURNING ...``, on a partial index of ready tasks in claim order: workers on many
  machines never get the same task and never wait for each other's locks. Outcomes of many
  tasks are one statement too, each written only while the task is still running under the
  claim (``seq``, ``attempts``, worker); a worker's outcomes and its next claim are two
  transactions sent together, one round trip, the outcomes committed (and announced) first.
- **Counts** for ``overview`` and ``group`` are kept by statement triggers, in the transaction of
  every statement that moves tasks, on counter rows sharded by server process; **dependencies**
  are settled by the same trigger, on every path that finishes a task.
- **Wake-ups**: an enqueue sends a NOTIFY in its own statement (once per batch), a finish one
  that names the finished tasks (under PostgreSQL's 8,000-byte limit), rate-limited on the busy
  paths; each process LISTENs on a connection of its own and also looks again every few seconds.
- **Leases** are renewed from that same thread and connection (never from the event loop);
  expired ones are swept by whichever worker takes an advisory try-lock.
- **Connections**: at most two per process (statements, and listen-and-renew). A lost
  connection is opened again with backoff; a statement whose answer was lost checks what it
  did before it runs again.

Modules: ``driver`` (the seam to psycopg 3, the only module that imports it), ``schema`` (the
tables, created on first use, and their version), ``statements`` (the SQL, one name each, and
the functions that run it), ``backend`` (the class and its side thread).
"""

from sitq.backends.postgres.backend import BATCH_ROWS, RENEWALS_PER_LEASE, PostgresBackend
from sitq.backends.postgres.schema import COUNT_SHARDS, DEFAULT_SCHEMA, SCHEMA_VERSION

__all__ = ["PostgresBackend", "SCHEMA_VERSION", "DEFAULT_SCHEMA", "COUNT_SHARDS", "BATCH_ROWS",
           "RENEWALS_PER_LEASE"]
