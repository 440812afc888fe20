"""Task stores. SQLite is the embedded default."""

from sitq.backends.base import Backend
from sitq.backends.sqlite import SQLiteBackend

__all__ = ["Backend", "SQLiteBackend"]
