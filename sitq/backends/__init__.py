"""Task stores, and the one way to open them from a path or URL.

SQLite is the embedded default: a plain path or ``sqlite:///path`` opens a
:class:`SQLiteBackend`. ``postgresql://`` URLs open the PostgreSQL backend,
which needs the ``postgres`` extra (``pip install 'sitq[postgres]'``).
``memory://`` makes a new :class:`MemoryBackend`, the plain-Python reference
backend (for tests: its tasks live only in that object).
Everything above this package (queue, worker, command line, notebook) opens
stores through :func:`open_backend` and never names a backend class.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any, Union

from sitq.backends.base import Backend
from sitq.backends.memory import MemoryBackend
from sitq.backends.sqlite import SQLiteBackend
from sitq.errors import BackendError

__all__ = ["Backend", "MemoryBackend", "SQLiteBackend", "Target", "open_backend", "describe_target"]

Target = Union[str, "os.PathLike[str]", Backend]
POSTGRES_SCHEMES = ("postgresql", "postgres")


def open_backend(target: Target, **options: Any) -> Backend:
    """The backend for ``target``: a file path or ``sqlite:///path`` (SQLite),
    ``postgresql://user@host/db`` (PostgreSQL), or a backend object, returned as it is.

    ``options`` go to the backend's constructor (for SQLite: ``lock_timeout``,
    ``read_only``, ...). Nothing is opened yet: backends connect on first use.
    """
    if isinstance(target, Backend):
        if options:
            raise TypeError(f"open_backend: options {sorted(options)} apply to a target string, not to {target!r}")
        return target
    if isinstance(target, os.PathLike):
        target = os.fspath(target)
    if not isinstance(target, str):
        raise TypeError(
            "a sitq store is a file path, a sqlite:/// or postgresql:// URL, or a backend object, "
            f"not {type(target).__name__} {target!r}"
        )
    scheme = target.split("://", 1)[0].lower() if "://" in target else None
    if scheme is None or scheme == "sqlite":
        return SQLiteBackend(target, **options)
    if scheme == "memory":
        if target.rstrip("/") != "memory:":
            raise ValueError(f"a memory store has no path or host: write memory://, not {target!r}")
        return MemoryBackend(**options)
    if scheme in POSTGRES_SCHEMES:
        return _postgres_backend()(target, **options)
    raise ValueError(
        f"sitq cannot open {scheme}:// stores ({describe_target(target)!r}); give a file path, "
        "sqlite:///path, postgresql://user@host/database or memory://"
    )


def _postgres_backend() -> Callable[..., Backend]:
    # Imported by name, so this type-checks both before sitq/backends/postgres.py exists and after.
    try:
        postgres = importlib.import_module("sitq.backends.postgres")
    except ImportError as exc:
        raise BackendError(
            "postgresql:// stores need sitq's PostgreSQL backend and its driver (psycopg 3 with its pool): "
            f"install them with pip install 'sitq[postgres]' ({exc})"
        ) from exc
    backend: Callable[..., Backend] = postgres.PostgresBackend
    return backend


def describe_target(target: Any) -> str:
    """A target as it may be shown to people: a URL's password is masked.

    >>> describe_target("postgresql://ada:s3cret@db.example.org/queue")
    'postgresql://ada:***@db.example.org/queue'
    >>> describe_target("tasks.db")
    'tasks.db'
    """
    text = os.fspath(target) if isinstance(target, os.PathLike) else str(target)
    if "://" not in text or "@" not in text:
        return text
    scheme, rest = text.split("://", 1)
    credentials, at, location = rest.rpartition("@")
    if ":" in credentials:
        user = credentials.split(":", 1)[0]
        credentials = f"{user}:***"
    return f"{scheme}://{credentials}{at}{location}"
