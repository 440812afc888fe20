"""Capturing what a task prints, without catching what anything else prints.

While a worker with ``capture_output=True`` runs, ``sys.stdout`` and
``sys.stderr`` are wrapped by a stream that looks up the task running in the
current context (thread or coroutine) and appends to that task's buffer;
writes from anywhere else pass straight through to the original stream. The
wrapper is installed when the first capturing worker starts and removed when
the last one stops, and only if nobody replaced the streams in the meantime.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Iterable
from typing import Any, TextIO

__all__ = ["OutputCapture", "CapturedOutput", "capture_into"]

# A task that prints without end should not fill the database.
MAX_CAPTURED_CHARS = 1_000_000


class CapturedOutput:
    """What one task printed, up to ``MAX_CAPTURED_CHARS``."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._size = 0
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        with self._lock:
            room = MAX_CAPTURED_CHARS - self._size
            if room <= 0:
                return
            if len(text) > room:
                text = text[:room] + "\n[sitq: output truncated]\n"
            self._parts.append(text)
            self._size += len(text)

    @property
    def size(self) -> int:
        """Characters written so far (it only grows): a cheap way to see that something was printed."""
        return self._size

    def text(self) -> str | None:
        with self._lock:
            return "".join(self._parts) if self._parts else None

    def tail(self, max_chars: int) -> str | None:
        """The last ``max_chars`` characters written, joining only the parts it needs."""
        with self._lock:
            if not self._parts:
                return None
            parts, size = [], 0
            for part in reversed(self._parts):
                parts.append(part)
                size += len(part)
                if size >= max_chars:
                    break
            return "".join(reversed(parts))[-max_chars:]


capture_into: contextvars.ContextVar[CapturedOutput | None] = contextvars.ContextVar(
    "sitq_capture_into", default=None
)


class _TaskStream:
    def __init__(self, original: TextIO) -> None:
        self._original = original

    def write(self, text: str) -> int:
        captured = capture_into.get()
        if captured is None:
            return self._original.write(text)
        captured.write(text)
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if capture_into.get() is None:
            self._original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


class OutputCapture:
    """The process-wide installation of the task streams, counted per worker."""

    _lock = threading.Lock()
    _users = 0
    _saved: tuple[TextIO, TextIO] | None = None

    @classmethod
    def install(cls) -> OutputCapture:
        with cls._lock:
            if cls._users == 0:
                cls._saved = (sys.stdout, sys.stderr)
                sys.stdout = _TaskStream(sys.stdout)
                sys.stderr = _TaskStream(sys.stderr)
            cls._users += 1
        return cls()

    def uninstall(self) -> None:
        cls = type(self)
        with cls._lock:
            cls._users -= 1
            if cls._users == 0 and cls._saved is not None:
                if isinstance(sys.stdout, _TaskStream):
                    sys.stdout = cls._saved[0]
                if isinstance(sys.stderr, _TaskStream):
                    sys.stderr = cls._saved[1]
                cls._saved = None
