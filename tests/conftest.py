# -- notebook layer: keep IPython/Jupyter state out of $HOME (before IPython is imported)
from notebook_support import isolate_jupyter_env

isolate_jupyter_env()

# -- core -----------------------------------------------------------------------
import asyncio
import contextlib
import os
import sys
from pathlib import Path

import pytest
from backends import BACKENDS, postgres_schema, postgres_unavailable

import sitq
from sitq import open_backend

TESTS = Path(__file__).resolve().parent
PROJECT = TESTS.parent


def worker_env() -> dict:
    """Environment for worker subprocesses: they must import tests/taskfuncs.py by name."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(PROJECT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def sitq_command(*args: str) -> list:
    return [sys.executable, "-m", "sitq", *args]


@pytest.fixture
def postgres_target():
    """A URL of a schema of its own on the test server (dropped after); skips without a server."""
    reason = postgres_unavailable()
    if reason:
        pytest.skip(reason)
    with postgres_schema() as url:
        yield url


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "tasks.db"


def _kind_param(kind):
    return pytest.param(kind, id=kind.name)


@pytest.fixture(params=[_kind_param(kind) for kind in BACKENDS])
def store_kind(request):
    """Each backend of tests/backends.py in turn; one whose server is unreachable is skipped."""
    reason = request.param.unavailable()
    if reason:
        pytest.skip(f"{request.param.name}: {reason}")
    return request.param


@pytest.fixture(params=[_kind_param(kind) for kind in BACKENDS if kind.shared])
def shared_kind(request):
    """Each backend whose store other processes can open (a file, a server), in turn."""
    reason = request.param.unavailable()
    if reason:
        pytest.skip(f"{request.param.name}: {reason}")
    return request.param


@pytest.fixture
def store_target(store_kind, tmp_path):
    """The target string of a fresh, empty store of ``store_kind``."""
    with store_kind.fresh(tmp_path) as target:
        yield target


@pytest.fixture
def shared_target(shared_kind, tmp_path):
    """The target string of a fresh store that worker processes can open too."""
    with shared_kind.fresh(tmp_path) as target:
        yield target


@contextlib.contextmanager
def _opener(target):
    opened = []

    def make(**options):
        backend = open_backend(target, **options)
        opened.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in opened:
            asyncio.run(backend.close())


@pytest.fixture
def open_store(store_target):
    """``open_backend`` on the test's store: each call makes another backend object, which
    for a shared kind is another connection to the same store (for the others, another
    store). All are closed when the test ends."""
    with _opener(store_target) as make:
        yield make


@pytest.fixture
def open_shared_store(shared_target):
    """As ``open_store``, for the shared kinds only: every call is the same store."""
    with _opener(shared_target) as make:
        yield make


@pytest.fixture
def store(open_store):
    """A backend made by ``open_backend`` on a fresh store, for every backend in turn. Queues and
    workers in one test share this object (an in-memory store is private to it)."""
    return open_store()


@pytest.fixture
def run():
    """Run a coroutine to completion on a fresh event loop."""
    return asyncio.run


@contextlib.asynccontextmanager
async def worker_running(backend, **settings):
    """A worker running on this loop until the block ends (then stopped, letting tasks finish).

    Unlike drain(), it keeps waiting for tasks that are due later, such as retries."""
    settings.setdefault("poll_interval", 0.05)
    settings.setdefault("progress_interval", 0.02)
    worker = sitq.Worker(backend, **settings)
    running = asyncio.ensure_future(worker.start())
    try:
        yield worker
    finally:
        await worker.stop()
        await running
