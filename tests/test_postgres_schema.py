"""A PostgreSQL queue's schema: created on first use, one per queue in a shared database, migrated
from an older version, refused when a newer sitq wrote it or when it holds tables that are not
sitq's; addresses read with care."""

import asyncio
from pathlib import Path

import pytest
from backends import POSTGRES_DSN, new_tasks, postgres_schema, postgres_url

from sitq import open_backend
from sitq.backends.postgres import COUNT_SHARDS, SCHEMA_VERSION, PostgresBackend
from sitq.backends.postgres import schema as schema_module
from sitq.core import Outcome, OutcomeKind
from sitq.errors import BackendError, SchemaVersionError

NOW = 1_700_000_000.0


@pytest.fixture
def target(postgres_target):
    return postgres_target


def sql(statement, params=()):
    import psycopg

    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else None


async def opened(target, **options):
    backend = open_backend(target, **options)
    try:
        await backend.connect()
        return await backend.overview(0)
    finally:
        await backend.close()


def test_the_schema_is_created_on_first_use_with_its_version(target):
    backend = open_backend(target)
    assert isinstance(backend, PostgresBackend)
    asyncio.run(opened(target))
    assert sql(f'SELECT value FROM "{backend.schema}".meta WHERE key = %s', ("schema_version",)) == [
        (str(SCHEMA_VERSION),)]


def test_two_queues_in_one_database_keep_to_their_own_schema(target):
    with postgres_schema() as other:
        async def go():
            one, two = open_backend(target), open_backend(other)
            await one.enqueue(new_tasks(3, NOW))
            await two.enqueue(new_tasks(1, NOW))
            counts = (await one.overview(0)).total, (await two.overview(0)).total
            await one.close()
            await two.close()
            return counts

        assert asyncio.run(go()) == (3, 1)


def test_a_queue_written_by_a_newer_sitq_is_refused(target):
    schema = open_backend(target).schema
    asyncio.run(opened(target))
    sql(f'UPDATE "{schema}".meta SET value = %s WHERE key = %s', (str(SCHEMA_VERSION + 1), "schema_version"))
    with pytest.raises(SchemaVersionError, match=r"newer sitq .*upgrade sitq"):
        asyncio.run(opened(target))


def test_a_schema_with_tables_that_are_not_sitqs_is_left_alone(target):
    schema = open_backend(target).schema
    sql(f'CREATE SCHEMA "{schema}"')
    sql(f'CREATE TABLE "{schema}".tasks (id int)')
    with pytest.raises(BackendError, match="sitq did not create; give sitq a schema of its own"):
        asyncio.run(opened(target))
    assert sql("SELECT count(*) FROM pg_tables WHERE schemaname = %s", (schema,)) == [(1,)]


def test_a_read_only_look_at_a_queue_that_is_not_there_creates_nothing(target):
    schema = open_backend(target).schema
    with pytest.raises(BackendError, match="no sitq queue in schema"):
        asyncio.run(opened(target, read_only=True))
    assert sql("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)) == [(0,)]


def test_bad_addresses_and_schema_names_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="schema name"):
        PostgresBackend("postgresql://postgres@127.0.0.1/test", schema="Robert'); DROP TABLE x; --")
    with pytest.raises(ValueError, match="two schemas given"):
        PostgresBackend(postgres_url("one"), schema="two")
    with pytest.raises(ValueError, match="cannot read this PostgreSQL address"):
        PostgresBackend("postgresql://postgres:pw@127.0.0.1/test?bogus=1")
    try:
        PostgresBackend("postgresql://postgres:pw-hidden@127.0.0.1/test?bogus=1")
    except ValueError as exc:
        assert "pw-hidden" not in str(exc)


V1_TABLES = Path(__file__).parent / "data" / "postgres_schema_v1.sql"


def counts_and_truth(schema):
    """The queue's counters added up, and the same counted from its tasks: per (queue, state) and
    per (group, state)."""
    kept = sql(f'SELECT queue, status, sum(n)::int FROM "{schema}".counts GROUP BY 1, 2 HAVING sum(n) <> 0')
    truth = sql(f'SELECT queue, status, count(*)::int FROM "{schema}".tasks GROUP BY 1, 2')
    grouped = sql(f'SELECT group_id, status, sum(n)::int FROM "{schema}".group_counts GROUP BY 1, 2 '
                  "HAVING sum(n) <> 0")
    grouped_truth = sql(f'SELECT group_id, status, count(*)::int FROM "{schema}".tasks WHERE group_id IS NOT NULL '
                        "GROUP BY 1, 2")
    return (sorted(kept), sorted(grouped)), (sorted(truth), sorted(grouped_truth))


def test_a_version_1_queue_is_migrated_on_first_use_and_its_counts_stay_exact(target):
    schema = open_backend(target).schema
    ddl = schema_module._filled(V1_TABLES.read_text(), schema).replace("{shards}", str(COUNT_SHARDS))
    sql(ddl, None)
    sql(f'INSERT INTO "{schema}".meta VALUES (%s, %s)', ("schema_version", "1"))
    sql(f'INSERT INTO "{schema}".groups VALUES (%s, %s, %s)', ("g", "grp", NOW))
    sql(f'INSERT INTO "{schema}".tasks (id, name, status, func, args, eta, enqueued_at, group_id) '
        "SELECT 'v1-' || i, 'f', 'pending', '\\x00', '\\x00', %s, %s, CASE WHEN mod(i, 2) = 0 THEN 'g' END "
        "FROM generate_series(1, 6) i", (NOW, NOW))
    sql(f"""UPDATE "{schema}".tasks SET status = 'running', worker_id = 'w', attempts = 1, lease_until = %s
            WHERE id IN ('v1-1', 'v1-2')""", (NOW + 60,))
    kept, truth = counts_and_truth(schema)
    assert kept == truth and sum(n for _, _, n in truth[0]) == 6  # the version 1 triggers kept them

    async def go():
        backend = open_backend(target)
        try:
            await backend.connect()
            claimed = await backend.claim("w2", 2, NOW + 1, NOW + 60)
            done = [Outcome(c.task_id, c.handle, c.attempts, OutcomeKind.SUCCESS, NOW + 2) for c in claimed]
            assert await backend.finish("w2", done) == [True, True]
            await backend.enqueue(new_tasks(3, NOW))
            return await backend.overview(0)
        finally:
            await backend.close()

    overview = asyncio.run(go())
    assert sql(f'SELECT value FROM "{schema}".meta WHERE key = %s', ("schema_version",)) == [(str(SCHEMA_VERSION),)]
    triggers = sql("SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal ORDER BY 1",
                   (f'"{schema}".tasks',))
    assert triggers == [("tasks_count_delete",), ("tasks_settle",)]
    assert sql("SELECT count(*) FROM pg_indexes WHERE schemaname = %s AND indexname = 'tasks_loose'",
               (schema,)) == [(1,)]
    kept, truth = counts_and_truth(schema)
    assert kept == truth
    assert (overview.total, overview.counts["running"], overview.counts["success"]) == (9, 2, 2)


def test_a_version_1_queue_is_read_as_it_is_and_upgraded_when_written_to(target):
    schema = open_backend(target).schema
    sql(schema_module._filled(V1_TABLES.read_text(), schema).replace("{shards}", str(COUNT_SHARDS)), None)
    sql(f'INSERT INTO "{schema}".meta VALUES (%s, %s)', ("schema_version", "1"))

    def version_and_index():
        (version,), = sql(f'SELECT value FROM "{schema}".meta WHERE key = %s', ("schema_version",))
        return version, sql("SELECT count(*) FROM pg_indexes WHERE schemaname = %s AND indexname = 'tasks_loose'",
                            (schema,))[0][0]

    assert asyncio.run(opened(target, read_only=True)).total == 0
    assert version_and_index() == ("1", 0)  # a look changes nothing
    asyncio.run(opened(target))
    assert version_and_index() == (str(SCHEMA_VERSION), 1)
