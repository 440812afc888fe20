"""The tasks of no group are found by state without reading a group's rows: a board beside a group
of 100,000 tasks reads as much as beside a group of 1,000, wherever the loose tasks are.

What is counted is the work the store does, not time: SQLite's virtual machine instructions (its
progress handler) and the rows PostgreSQL's plan reads (``EXPLAIN ANALYZE``), for the statement
``find_ungrouped`` sends, with five loose tasks stored before the group.
"""

import asyncio
import json
import sqlite3

import pytest
from backends import POSTGRES_DSN, new_batch, new_tasks, typical_outcome

from sitq import open_backend
from sitq.backends.postgres import statements as pg
from sitq.backends.sqlite import statements as sq
from sitq.core import OutcomeKind

NOW = 1_700_000_000.0
BOARD_STATES = ["waiting", "pending", "success", "cancelled"]  # what a board lists beside the groups


async def fill(backend, members):
    """Five loose tasks (one failed, one running, three pending), then a group of ``members``
    stored as a map stores it, whose first members are in the same states."""
    await backend.enqueue(new_tasks(2, NOW) + new_tasks(3, NOW, eta=NOW + 3600))  # 3 due later
    first, _ = await backend.claim("w", 2, NOW, NOW + 30)
    await backend.finish("w", [typical_outcome(first, OutcomeKind.FAILED, NOW)])
    await grow(backend, members)


async def grow(backend, members):
    await backend.enqueue(new_batch(members, NOW + 1, group_id="g", group_name="big"))
    done, failed, _ = await backend.claim("w", 3, NOW + 1, NOW + 30)  # the pending loose ones are not due
    await backend.finish("w", [typical_outcome(done, OutcomeKind.SUCCESS, NOW + 2),
                               typical_outcome(failed, OutcomeKind.FAILED, NOW + 2)])


def sqlite_steps(path, states):
    """How many instructions SQLite runs for the search, and what it finds."""
    conn = sqlite3.connect(path)
    steps = [0]

    def count():
        steps[0] += 1
        return 0

    conn.set_progress_handler(count, 10)
    try:
        found = sq.find_ungrouped(conn, states, 20, 0, True)
    finally:
        conn.set_progress_handler(None, 0)
        conn.close()
    return steps[0], [i.task_id for i in found]


@pytest.mark.parametrize("states", [BOARD_STATES, ["failed"], ["running"], ["pending"]])
def test_sqlite_reads_the_same_beside_a_group_a_hundred_times_bigger(tmp_path, states):
    seen = []
    for members in (1_000, 100_000):
        path = tmp_path / f"{members}.db"

        async def go(members=members, path=path):
            backend = open_backend(path)
            await backend.connect()
            try:
                await fill(backend, members)
            finally:
                await backend.close()

        asyncio.run(go())
        seen.append(sqlite_steps(path, states))
    (small, found_small), (big, found_big) = seen
    assert found_small and len(found_small) == len(found_big)  # the loose tasks, behind either group
    assert big <= small * 1.1 + 10, (small, big)  # a scan past the group would run 100 times as many


def postgres_rows_read(schema, states):
    """The rows PostgreSQL's plan reads for the search (every scan node's rows, filtered ones too)."""
    import psycopg

    statement = pg.q(pg.find_ungrouped(states, True), schema)
    params = {"states": [s for s in states if s != "running"], "rows": 20, "limit": 20, "offset": 0}
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute("ANALYZE " + f'"{schema}".tasks')
        (plan,), = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params).fetchall()
    plan = plan if isinstance(plan, list) else json.loads(plan)
    read = 0

    def walk(node):
        nonlocal read
        if "Scan" in node["Node Type"]:
            read += (node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"]
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return read


@pytest.mark.parametrize("states", [BOARD_STATES, ["failed"], ["running"]])
def test_postgres_reads_the_same_beside_a_group_a_hundred_times_bigger(postgres_target, states):
    backend = open_backend(postgres_target)
    seen = []

    async def store(members):
        await backend.connect()
        try:
            await (fill if not seen else grow)(backend, members)  # then the same store, its group grown
        finally:
            await backend.close()

    for members in (1_000, 99_000):
        asyncio.run(store(members))
        seen.append(postgres_rows_read(backend.schema, states))
    small, big = seen
    # The plan may move a few index pages (statistics differ between the two sizes); a scan past
    # the group would read its 100,000 rows.
    assert big <= small + 100, (small, big)
