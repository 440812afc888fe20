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

import sitq

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
def db_path(tmp_path) -> Path:
    return tmp_path / "tasks.db"


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
