-- The tables of a sitq PostgreSQL queue at schema version 1, as sitq 0.2.0 created them: the starting
-- point of the migration test (tests/test_postgres_schema.py). {s}, {shards}, {channel}, {failed} and
-- {cancelled} are filled in as sitq.backends.postgres.schema fills them.
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE {s}.tasks (
    seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id               text COLLATE "C" NOT NULL UNIQUE,
    name             text NOT NULL,
    status           text NOT NULL,
    func             bytea NOT NULL,
    args             bytea NOT NULL,
    signature        bytea,
    max_attempts     integer NOT NULL DEFAULT 1,
    cancel_requested boolean NOT NULL DEFAULT false,
    eta              double precision NOT NULL,
    enqueued_at      double precision NOT NULL,
    started_at       double precision,
    finished_at      double precision,
    attempts         integer NOT NULL DEFAULT 0,
    worker_id        text,
    lease_until      double precision,
    value            bytea,
    error            text,
    traceback        text,
    output           text,
    progress_done    double precision,
    progress_total   double precision,
    progress_message text,
    lost             integer NOT NULL DEFAULT 0,
    value_signature  bytea,
    queue            text NOT NULL DEFAULT 'default',
    priority         integer NOT NULL DEFAULT 0,
    key              text,
    group_id         text,
    retention        double precision,
    expires_at       double precision,
    waiting          integer NOT NULL DEFAULT 0,  -- tasks it runs after that have not succeeded yet
    dependents       integer NOT NULL DEFAULT 0   -- more than 0: tasks run after it, to settle once it finishes
);
-- An insert touches the table, the id index and tasks_ready only; the other indexes are partial,
-- on rows few writes touch (running, waiting, failed, suspect, grouped, expiring rows).
-- The claim, in claim order: highest priority first, then oldest eta, then enqueue order.
CREATE INDEX tasks_ready ON {s}.tasks (priority DESC, eta, seq) WHERE status = 'pending' AND lost = 0;
CREATE INDEX tasks_suspects ON {s}.tasks (priority DESC, eta, seq) WHERE status = 'pending' AND lost > 0;
CREATE INDEX tasks_running ON {s}.tasks (worker_id, seq) WHERE status = 'running';
CREATE INDEX tasks_waiting ON {s}.tasks (seq) WHERE status = 'waiting';
CREATE INDEX tasks_failed ON {s}.tasks (seq) WHERE status = 'failed';
CREATE INDEX tasks_cancelled ON {s}.tasks (seq) WHERE status = 'cancelled';
CREATE INDEX tasks_members ON {s}.tasks (group_id, seq) WHERE group_id IS NOT NULL;
CREATE INDEX tasks_expiry ON {s}.tasks (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX tasks_unsettled ON {s}.tasks (seq)
    WHERE dependents > 0 AND status IN ('success', 'failed', 'cancelled');
-- A task (task) runs after another (dep): one row per edge, until the dependency settles it.
CREATE TABLE {s}.deps (
    dep  bigint NOT NULL,
    task bigint NOT NULL,
    PRIMARY KEY (dep, task)
);
CREATE INDEX deps_task ON {s}.deps (task);
CREATE TABLE {s}.groups (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    created_at double precision NOT NULL
);
CREATE INDEX groups_newest ON {s}.groups (created_at);
CREATE TABLE {s}.counts (
    queue  text NOT NULL,
    status text NOT NULL,
    shard  integer NOT NULL,
    n      bigint NOT NULL,
    PRIMARY KEY (queue, status, shard)
);
CREATE TABLE {s}.group_counts (
    group_id text NOT NULL,
    status   text NOT NULL,
    shard    integer NOT NULL,
    n        bigint NOT NULL,
    PRIMARY KEY (group_id, status, shard)
);
CREATE TABLE {s}.schedules (
    name         text PRIMARY KEY,
    task_name    text NOT NULL,
    func         bytea NOT NULL,
    args         bytea NOT NULL,
    signature    bytea,
    every        double precision,
    cron         text,
    tz           text NOT NULL,
    next_run     double precision NOT NULL,
    last_run     double precision,
    queue        text NOT NULL,
    priority     integer NOT NULL,
    max_attempts integer NOT NULL,
    retention    double precision
);
-- The counts: what a statement added (+1 a row) and took away (-1 a row), per queue and state, and
-- per group and state. A group goes with the last of its tasks.
CREATE FUNCTION {s}.count_tasks() RETURNS trigger LANGUAGE plpgsql AS $body$
DECLARE
    done record;
    my_shard integer := mod(pg_backend_pid(), {shards});
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {s}.counts AS c (queue, status, shard, n)
            SELECT queue, status, my_shard, count(*) FROM new_rows GROUP BY queue, status
            ON CONFLICT (queue, status, shard) DO UPDATE SET n = c.n + excluded.n;
        INSERT INTO {s}.group_counts AS c (group_id, status, shard, n)
            SELECT group_id, status, my_shard, count(*) FROM new_rows WHERE group_id IS NOT NULL
            GROUP BY group_id, status
            ON CONFLICT (group_id, status, shard) DO UPDATE SET n = c.n + excluded.n;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO {s}.counts AS c (queue, status, shard, n)
            SELECT queue, status, my_shard, sum(d) FROM (
                SELECT n.queue, n.status, 1 AS d FROM new_rows n JOIN old_rows o USING (seq)
                    WHERE n.status IS DISTINCT FROM o.status OR n.queue IS DISTINCT FROM o.queue
                UNION ALL
                SELECT o.queue, o.status, -1 FROM new_rows n JOIN old_rows o USING (seq)
                    WHERE n.status IS DISTINCT FROM o.status OR n.queue IS DISTINCT FROM o.queue
            ) moved GROUP BY queue, status
            ON CONFLICT (queue, status, shard) DO UPDATE SET n = c.n + excluded.n;
        INSERT INTO {s}.group_counts AS c (group_id, status, shard, n)
            SELECT group_id, status, my_shard, sum(d) FROM (
                SELECT n.group_id, n.status, 1 AS d FROM new_rows n JOIN old_rows o USING (seq)
                    WHERE n.group_id IS NOT NULL AND (n.status IS DISTINCT FROM o.status
                                                      OR n.group_id IS DISTINCT FROM o.group_id)
                UNION ALL
                SELECT o.group_id, o.status, -1 FROM new_rows n JOIN old_rows o USING (seq)
                    WHERE o.group_id IS NOT NULL AND (n.status IS DISTINCT FROM o.status
                                                      OR n.group_id IS DISTINCT FROM o.group_id)
            ) moved GROUP BY group_id, status
            ON CONFLICT (group_id, status, shard) DO UPDATE SET n = c.n + excluded.n;
    ELSE
        INSERT INTO {s}.counts AS c (queue, status, shard, n)
            SELECT queue, status, my_shard, -count(*) FROM old_rows GROUP BY queue, status
            ON CONFLICT (queue, status, shard) DO UPDATE SET n = c.n + excluded.n;
        INSERT INTO {s}.group_counts AS c (group_id, status, shard, n)
            SELECT group_id, status, my_shard, -count(*) FROM old_rows WHERE group_id IS NOT NULL
            GROUP BY group_id, status
            ON CONFLICT (group_id, status, shard) DO UPDATE SET n = c.n + excluded.n;
        DELETE FROM {s}.groups g WHERE g.id IN (SELECT DISTINCT group_id FROM old_rows WHERE group_id IS NOT NULL)
            AND NOT EXISTS (SELECT 1 FROM {s}.tasks t WHERE t.group_id = g.id);
        DELETE FROM {s}.group_counts gc
            WHERE gc.group_id IN (SELECT DISTINCT group_id FROM old_rows WHERE group_id IS NOT NULL)
            AND NOT EXISTS (SELECT 1 FROM {s}.groups g WHERE g.id = gc.group_id);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        -- rules.dependency_finished, on every path that finishes a task (an outcome, a cancel, an
        -- expired lease), in the transaction that finishes it: a task that succeeded releases the
        -- tasks waiting for it; one that failed or was cancelled cancels them, which in turn (this
        -- trigger again) settles the tasks waiting for those.
        FOR done IN SELECT seq, id, name, status, finished_at FROM new_rows
                    WHERE dependents > 0 AND status IN ('success', 'failed', 'cancelled') LOOP
            IF done.status = 'success' THEN
                UPDATE {s}.tasks SET waiting = waiting - 1,
                    status = CASE WHEN waiting <= 1 THEN 'pending' ELSE 'waiting' END
                WHERE seq IN (SELECT task FROM {s}.deps WHERE dep = done.seq) AND status = 'waiting';
                PERFORM pg_notify('{channel}', 'e');
            ELSE
                UPDATE {s}.tasks SET status = 'cancelled', finished_at = coalesce(done.finished_at, 0),
                    expires_at = coalesce(done.finished_at, 0) + retention,
                    error = format(CASE done.status WHEN 'failed' THEN {failed} ELSE {cancelled} END,
                                   done.id, done.name)
                WHERE seq IN (SELECT task FROM {s}.deps WHERE dep = done.seq) AND status = 'waiting';
            END IF;
            DELETE FROM {s}.deps WHERE dep = done.seq;
            UPDATE {s}.tasks SET dependents = 0 WHERE seq = done.seq;
        END LOOP;
    END IF;
    RETURN NULL;
END
$body$;
CREATE TRIGGER tasks_count_insert AFTER INSERT ON {s}.tasks
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_tasks();
CREATE TRIGGER tasks_count_update AFTER UPDATE ON {s}.tasks
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_tasks();
CREATE TRIGGER tasks_count_delete AFTER DELETE ON {s}.tasks
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION {s}.count_tasks();
-- Facts about the store: its schema version, whether its payloads are signed.
CREATE TABLE {s}.meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
