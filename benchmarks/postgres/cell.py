"""Run one PostgreSQL benchmark cell in a fresh process and print its figures as one JSON line.

``python -m benchmarks.postgres.cell '{"system": "floor", "workload": "drain", "dsn": "postgresql://...",
"n": 5000, "kw": {"workers": 2}}'`` makes a fresh database on that server, calls the adapter's
workload function on it, and drops the database. ``python -m benchmarks.postgres.cell work SYSTEM
DSN [ARGS]`` is one drain worker process (it waits for the parent's ``go``), and ``serve SYSTEM
DSN`` the round trip's worker, running until killed.
"""

import importlib
import json
import sys

from benchmarks.postgres.server import fresh_database

ADAPTERS = {"floor": "benchmarks.postgres.floor", "sitq": "benchmarks.postgres.sitq_system",
            "pgqueuer": "benchmarks.postgres.pgqueuer_system",
            "procrastinate": "benchmarks.postgres.procrastinate_system"}


def main(argv):
    """Dispatch to a worker process's `work` or `serve`, or to one workload function."""
    if argv[0] in ("work", "serve"):
        mode, system, dsn, *args = argv
        getattr(importlib.import_module(ADAPTERS[system]), mode)(dsn, *args)
        return
    spec = json.loads(argv[0])
    adapter = importlib.import_module(ADAPTERS[spec["system"]])
    with fresh_database(spec["dsn"], spec["system"]) as dsn:
        figures = getattr(adapter, spec["workload"])(dsn, spec["n"], **spec.get("kw", {}))
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
