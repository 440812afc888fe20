"""Change notification: how a waiter learns, without polling, that the store changed.

Every backend owns one :class:`ChangeNotifier` (``backend.changes``). The protocol:

1. A waiter reads the *change token* (``changes.token``), looks at the store, and if
   there is nothing for it, waits with that token (``await changes.wait(token,
   timeout)``, or ``changes.watch(future, token)`` to combine it with other events).
   A wait with a token that has moved since returns at once, so a change between the
   look and the wait is never missed.
2. The backend moves the token and wakes the waiters **after a write commits**, and
   only for a write that changed something (``changes.notify()``, or ``mark()`` under
   its own lock and ``wake()`` after it): a worker whose claim found nothing must not
   wake itself, or idle workers spin.
3. Writes by other processes (or machines) are the backend's own mechanism to notice:
   it starts it when the first waiter appears (the ``on_watch`` hook) and calls
   ``notify()`` when it sees one. SQLite checks ``PRAGMA data_version`` on a small
   thread; PostgreSQL listens with LISTEN/NOTIFY. A notice may come late or twice;
   waiters therefore also wait with a timeout and look again.

``notify()`` may be called from any thread; waiters may wait on any event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

__all__ = ["ChangeNotifier"]


class ChangeNotifier:
    """A change token and the futures waiting for it to move. See the module docstring."""

    def __init__(self, on_watch: Callable[[], None] | None = None) -> None:
        self._count = 0
        self._lock = threading.Lock()
        self._watchers: set[asyncio.Future[None]] = set()
        self._on_watch = on_watch

    def __repr__(self) -> str:
        return f"<ChangeNotifier token={self._count} waiters={len(self._watchers)}>"

    @property
    def token(self) -> int:
        """A number that moves whenever this process sees the store change."""
        return self._count

    @property
    def has_watchers(self) -> bool:
        """Whether anyone waits for a change now (a backend watches other processes only then)."""
        return bool(self._watchers)

    def notify(self) -> None:
        """Move the token and wake everyone waiting. Safe to call from any thread."""
        self.mark()
        self.wake()

    def mark(self) -> None:
        """Move the token (for a write that changed something), without waking anyone yet."""
        with self._lock:
            self._count += 1

    def wake(self) -> None:
        """Wake the waiters whose token has moved: every one registered now."""
        if not self._watchers:
            return
        with self._lock:
            watchers, self._watchers = self._watchers, set()
        if not watchers:
            return
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for fut in watchers:
            loop = fut.get_loop()
            if loop is current:
                _resolve(fut)
            elif not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, fut)

    def watch(self, fut: asyncio.Future[None], token: int) -> bool:
        """Resolve ``fut`` on the next change. False (and nothing registered) if ``token`` is stale."""
        with self._lock:
            if token != self._count:
                return False
            self._watchers.add(fut)
        if self._on_watch is not None:
            self._on_watch()
        return True

    def unwatch(self, fut: asyncio.Future[None]) -> None:
        """Forget ``fut``: its waiter stopped waiting (it timed out, or was cancelled)."""
        with self._lock:
            self._watchers.discard(fut)

    async def wait(self, token: int, timeout: float | None) -> None:
        """Return on the next change after ``token`` was read, or after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.watch(fut, token):
            return
        timer = loop.call_later(timeout, _resolve, fut) if timeout is not None else None
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            self.unwatch(fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
