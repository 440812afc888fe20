"""The names sitq promises. Changing this list is changing the public API."""

import subprocess
import sys

import sitq


def test_public_names_are_pinned():
    assert sorted(sitq.__all__) == [
        "Backend",
        "BackendError",
        "CloudpickleSerializer",
        "InvalidTaskError",
        "QueueOverview",
        "Result",
        "Retry",
        "SQLiteBackend",
        "SchemaVersionError",
        "SerializationError",
        "Serializer",
        "SignatureError",
        "SitqError",
        "SyncTaskQueue",
        "Task",
        "TaskCancelledError",
        "TaskFailedError",
        "TaskInfo",
        "TaskNotFoundError",
        "TaskOptions",
        "TaskQueue",
        "TaskStatus",
        "TaskTimeoutError",
        "Worker",
        "open_backend",
        "progress",
        "task",
    ]
    for name in sitq.__all__:
        assert getattr(sitq, name) is not None


def test_errors_share_one_base_and_builtin_parents():
    for name in ("InvalidTaskError", "SerializationError", "BackendError", "SchemaVersionError",
                 "TaskNotFoundError", "TaskFailedError", "TaskCancelledError", "SignatureError",
                 "TaskTimeoutError"):
        assert issubclass(getattr(sitq, name), sitq.SitqError)
    assert issubclass(sitq.InvalidTaskError, TypeError) and issubclass(sitq.InvalidTaskError, ValueError)
    assert issubclass(sitq.TaskNotFoundError, LookupError)


def test_core_imports_without_notebook_packages():
    """A headless worker must not pay for (or need) IPython, ipywidgets or rich."""
    code = (
        "import sys, sitq, sitq.worker, sitq.cli\n"
        "heavy = [m for m in ('IPython', 'ipywidgets', 'rich', 'sitq.notebook') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_reprs_are_one_line(db_path):
    backend = sitq.SQLiteBackend(db_path)
    for obj in (backend, sitq.TaskQueue(backend), sitq.Worker(backend), sitq.SyncTaskQueue(backend)):
        text = repr(obj)
        assert "\n" not in text and type(obj).__name__ in text
