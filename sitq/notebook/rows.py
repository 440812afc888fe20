"""What a task looks like right now, as a plain row for every view to draw.

The views (HTML in render.py, live widgets in widgets.py, one-line text) only
draw :class:`TaskRow`; they never look at records from the store themselves.
A row is built from a ``TaskInfo`` or a ``Result``; both have the fields read
here, and a ``Result`` simply has no progress. Building a row never fails on
odd values (a row changed by hand in the store): a field that is not what sitq
writes is shown as text, or left out.
"""

from __future__ import annotations

import datetime as dt
import reprlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sitq.queue import deserialize_value
from sitq.serialization import CloudpickleSerializer
from sitq.signing import signer_from

__all__ = ["TaskRow", "task_row", "GroupRow", "group_row", "short_id", "short_repr", "load_value", "format_seconds"]

_short = reprlib.Repr()
_short.maxstring = 80
_short.maxother = 80
_short.maxlist = _short.maxtuple = _short.maxset = _short.maxdict = 8


@dataclass(frozen=True)
class TaskRow:
    """One task, as drawn: every field is ready to show (no I/O, no pickles).

    ``elapsed`` is seconds since the task started (running) or its run time
    (finished); ``wait`` is seconds until a pending task is due (negative when
    it is overdue). ``fraction`` is progress in [0, 1] when a total is known.
    """

    task_id: str
    name: str
    status: str
    attempts: int = 0
    elapsed: float | None = None
    wait: float | None = None
    progress_done: float | None = None
    progress_total: float | None = None
    progress_message: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("success", "failed", "cancelled")

    @property
    def fraction(self) -> float | None:
        if self.progress_done is None or not self.progress_total:
            return None
        return max(0.0, min(1.0, self.progress_done / self.progress_total))

    @property
    def progress_text(self) -> str:
        """``"3/10 loading"``, ``"3 loading"`` or ``""`` when nothing was reported."""
        if self.progress_done is None and not self.progress_message:
            return ""
        parts = []
        if self.progress_done is not None:
            done = _number(self.progress_done)
            parts.append(f"{done}/{_number(self.progress_total)}" if self.progress_total else done)
        if self.progress_message:
            parts.append(self.progress_message)
        return " ".join(parts)

    @property
    def timing_text(self) -> str:
        """``"2.5s"`` while running or after, ``"due in 4s"`` for a delayed task."""
        if self.elapsed is not None:
            return format_seconds(self.elapsed)
        if self.status == "pending" and self.wait is not None and self.wait > 0.5:
            return f"due in {format_seconds(self.wait)}"
        return ""

    def line(self) -> str:
        """The row as one line of text."""
        bits = [self.task_id, self.name, self.status]
        for extra in (self.progress_text, self.timing_text):
            if extra:
                bits.append(extra)
        if self.error:
            bits.append(self.error)
        return " ".join(bits)


def task_row(record: Any, now: dt.datetime | None = None) -> TaskRow:
    """Build a row from a ``TaskInfo`` or ``Result`` (duck-typed)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    started = _moment(getattr(record, "started_at", None))
    finished = _moment(getattr(record, "finished_at", None))
    elapsed = None
    if started is not None:
        elapsed = max(0.0, ((finished or now) - started).total_seconds())
    eta = _moment(getattr(record, "eta", None))
    wait = (eta - now).total_seconds() if eta is not None and started is None else None
    attempts = getattr(record, "attempts", 0)
    return TaskRow(
        task_id=_text(record.task_id),
        name=_text(record.name),
        status=_text(record.status),
        attempts=attempts if type(attempts) is int else 0,
        elapsed=elapsed,
        wait=wait,
        progress_done=_amount(getattr(record, "progress_done", None)),
        progress_total=_amount(getattr(record, "progress_total", None)),
        progress_message=_optional_text(getattr(record, "progress_message", None)),
        error=_optional_text(getattr(record, "error", None)),
    )


@dataclass(frozen=True)
class GroupRow:
    """A group of tasks (``sitq.notebook.map``), as drawn: its counts per state, and how fast it goes.

    ``rate`` is tasks finished per second lately (None until it can be told), ``storing`` is True
    while the map is still storing its tasks (``expected`` of them), and ``failures`` holds rows of
    the first failed members, in input order. ``error`` says why storing the tasks failed (then
    nothing was stored).
    """

    group_id: str
    name: str
    counts: dict[str, int]
    rate: float | None = None
    storing: bool = False
    expected: int | None = None
    failures: tuple[TaskRow, ...] = ()
    error: str | None = None  # why the map could not store its tasks

    @property
    def total(self) -> int:
        stored = sum(self.counts.values())
        return max(stored, self.expected or 0) if self.storing else stored

    @property
    def done(self) -> int:
        """Finished members: succeeded, failed or cancelled."""
        return sum(self.counts.get(s, 0) for s in ("success", "failed", "cancelled"))

    @property
    def failed(self) -> int:
        return self.counts.get("failed", 0)

    @property
    def running(self) -> int:
        return self.counts.get("running", 0)

    @property
    def finished(self) -> bool:
        return self.error is not None or (not self.storing and self.done == self.total)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else (0.0 if self.storing else 1.0)

    @property
    def status(self) -> str:
        """One state for the whole group, to colour it: running until every member has finished,
        then failed if one failed, cancelled if one was cancelled, else success."""
        if self.error is not None:
            return "failed"
        if not self.finished:
            return "running" if self.running or self.done else "pending"
        if self.failed:
            return "failed"
        return "cancelled" if self.counts.get("cancelled", 0) else "success"

    @property
    def remaining_seconds(self) -> float | None:
        if self.finished or not self.rate:
            return None
        return (self.total - self.done) / self.rate

    def summary(self) -> str:
        """``"73/100 done · 2 failed · 4 running · 310/s · 12s left"``."""
        if self.error is not None:
            return f"its tasks could not be stored: {self.error}"
        if self.storing and not self.counts:
            return f"storing {self.total:,} tasks"
        bits = [f"{self.done:,}/{self.total:,} done"]
        if self.failed:
            bits.append(f"{self.failed:,} failed")
        cancelled = self.counts.get("cancelled", 0)
        if cancelled:
            bits.append(f"{cancelled:,} cancelled")
        if self.running:
            bits.append(f"{self.running:,} running")
        if self.rate and not self.finished:
            bits.append(f"{self.rate:,.3g}/s" if self.rate < 100 else f"{self.rate:,.0f}/s")
        left = self.remaining_seconds
        if left is not None:
            bits.append(f"{format_seconds(left)} left")
        if self.storing:
            bits.append("storing")
        return " · ".join(bits)


def group_row(info: Any, rate: float | None = None, failures: Iterable[TaskRow] = (),
              storing: bool = False, expected: int | None = None) -> GroupRow:
    """A row from a ``GroupInfo``: its counts, with the rate and first failures the caller knows."""
    counts = {str(k): v for k, v in info.counts.items() if type(v) is int and v}
    return GroupRow(_text(info.group_id), _text(info.name), counts, rate, storing, expected, tuple(failures))


def short_id(task_id: str) -> str:
    """The last 8 characters of an id: what views show (every lookup takes a unique end of an id)."""
    return task_id[-8:]


def _moment(value: Any) -> dt.datetime | None:
    return value if isinstance(value, dt.datetime) and value.tzinfo is not None else None


def _amount(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else short_repr(value)


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def load_value(result: Any, deserialize: Callable[[Any], Any] | None = None) -> Any:
    """A successful result's value, loaded as sitq loads values, never with a bare ``pickle.loads``.

    ``deserialize`` is the queue's ``deserialize_result`` when the view has the queue the result
    came from (its serializer, its key). Without it, sitq's default serializer and the key in
    ``SITQ_SECRET_KEY`` are used. Either way a signed value is checked before it is unpickled,
    and values of notebook-defined classes come back as themselves, with their source.
    """
    if result.value is None:
        return None
    if deserialize is not None:
        return deserialize(result)
    return deserialize_value(result, CloudpickleSerializer(), signer_from(None))


def short_repr(value: Any) -> str:
    """A one-line repr of at most about 80 characters, never raising."""
    try:
        text = _short.repr(value)
    except Exception as exc:  # a user's __repr__ may raise anything
        text = f"<{type(value).__name__} (repr failed: {exc})>"
    return " ".join(text.split())


def format_seconds(seconds: float) -> str:
    """``0.42s``, ``12.3s``, ``4m05s``, ``2h03m``: short, and precise where it matters."""
    if seconds < 10:
        return f"{seconds:.2f}s" if seconds < 1 else f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _number(value: float | None) -> str:
    if value is None:
        return "?"
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"
