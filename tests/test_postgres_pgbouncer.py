"""A queue and a worker process through PgBouncer in session pooling mode, the mode sitq works in:
every task runs and comes back, and the change notices (LISTEN/NOTIFY) reach their listeners.

Transaction pooling is not supported, and this is why (measured with PgBouncer 1.18): a worker
LISTENs on a connection of its own, and in transaction mode PgBouncer hands that server
connection to other clients between transactions and drops the notices it receives while no
client is linked to it ("got packet 'A' from server when not linked"), so waiters fall back on
their periodic look; psycopg prepares a statement it runs often on the server session, and in
transaction mode another client's session may already hold one by that name ("prepared
statement "_pg3_0" already exists", which stopped the worker); and the session settings sitq
makes at connect (``idle_in_transaction_session_timeout``, read-only for ``sitq status``) would
land on whichever server connection was lent. Session mode gives each sitq connection a server
session of its own for as long as it is open, and pools across processes that come and go.
"""

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest
import taskfuncs
from backends import POSTGRES_DSN, postgres_unavailable
from conftest import sitq_command, worker_env

from sitq import SyncTaskQueue

pytestmark = pytest.mark.timeout(120)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def bouncer():
    """PgBouncer in session pooling mode in front of the test server, on a free port; yields
    ``(url of a fresh queue through it, its log file)``."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    binary = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
    if binary is None:
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("pgbouncer refuses to run as root: starting it as user postgres needs root and runuser")
    server = urllib.parse.urlsplit(POSTGRES_DSN)
    database = server.path.lstrip("/") or "postgres"
    folder = Path(tempfile.mkdtemp(prefix="sitq-pgbouncer-"))
    shutil.chown(folder, "postgres", "postgres")
    port = _free_port()
    target = f"host={server.hostname or '127.0.0.1'} port={server.port or 5432} dbname={database}"
    (folder / "pgbouncer.ini").write_text(f"""[databases]
{database} = {target} user={server.username or 'postgres'}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = session
logfile = {folder}/log
pidfile = {folder}/pid
""")
    proc = subprocess.Popen(["runuser", "-u", "postgres", "--", binary, str(folder / "pgbouncer.ini")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    schema = f"t_{uuid.uuid4().hex[:16]}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "pgbouncer did not start"
                time.sleep(0.05)
        yield f"postgresql://postgres@127.0.0.1:{port}/{database}?schema={schema}", folder / "log"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        import psycopg

        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        shutil.rmtree(folder, ignore_errors=True)


def test_a_queue_and_a_worker_through_pgbouncer_in_session_mode(bouncer):
    url, log = bouncer
    worker = subprocess.Popen(sitq_command("worker", url, "--quiet", "--concurrency", "2"), env=worker_env(),
                              stderr=subprocess.PIPE, text=True)
    try:
        with SyncTaskQueue(url) as queue:
            ids = queue.map(taskfuncs.add, range(50), range(50))
            one_by_one = [queue.enqueue(taskfuncs.add, i, 1) for i in range(10)]
            values = [queue.deserialize_result(queue.get_result(i, timeout=60)) for i in ids + one_by_one]
            assert values == [2 * i for i in range(50)] + [i + 1 for i in range(10)]
            assert queue.overview().counts["success"] == 60
        assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
    finally:
        worker.terminate()
        _, err = worker.communicate(timeout=30)
    assert "Traceback" not in err and "prepared statement" not in err, err
    # Session mode links each client to its server session: no notice was dropped on the way.
    assert "when not linked" not in log.read_text()
