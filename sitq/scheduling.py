"""Periodic tasks: declaring a schedule (the queue's side) and enqueueing its ticks (the worker's).

A schedule is stored, with its payload, under its name. There is no scheduler
process: every running worker looks for due ticks about once a second
(``rules.SCHEDULE_CHECK``) and the store lets exactly one of them enqueue each
tick (``Backend.fire_schedule``). A tick missed while no worker ran is run
once, late; the ones after it are skipped (``rules.next_tick``).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from sitq.backends.base import Backend
from sitq.backends.rules import first_cron_tick, next_tick, schedule_task_id
from sitq.core import NewTask, Schedule
from sitq.errors import InvalidTaskError, SignatureError
from sitq.signing import Signer

__all__ = ["period", "first_run", "fire_due"]

log = logging.getLogger(__name__)


def period(every: Any, cron: Any, tz: Any) -> tuple[float | None, str | None, str]:
    """``(every seconds, cron, tz)`` checked: exactly one of a positive period and a cron expression
    that cronsim reads, and a time zone that zoneinfo knows. InvalidTaskError names what is wrong."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    if (every is None) == (cron is None):
        raise InvalidTaskError("a schedule takes either every=timedelta(...) (or seconds) or cron='...', one of them")
    if not isinstance(tz, str):
        raise InvalidTaskError(f"tz names a time zone, such as 'UTC' or 'Europe/Berlin', not {tz!r}")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        message = f"unknown time zone {tz!r}; give an IANA name such as 'UTC' or 'Europe/Berlin'"
        raise InvalidTaskError(message) from None
    if cron is not None:
        from cronsim import CronSim, CronSimError

        if not isinstance(cron, str):
            raise InvalidTaskError(f"cron takes a cron expression such as '0 9 * * 1-5', not {cron!r}")
        try:
            CronSim(cron, dt.datetime.now(dt.timezone.utc))
        except CronSimError as exc:
            raise InvalidTaskError(f"cannot read the cron expression {cron!r}: {exc}") from None
        return None, cron, tz
    seconds = every.total_seconds() if isinstance(every, dt.timedelta) else every
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise InvalidTaskError(f"every takes a timedelta or a number of seconds > 0, not {every!r}")
    return float(seconds), None, tz


def first_run(every: float | None, cron: str | None, tz: str, start: Any, now: float) -> float:
    """The first tick: ``start`` (an aware datetime, or a timedelta from now) if given, else one
    period from now, or the cron expression's first time after now."""
    if start is None:
        return now + every if every is not None else first_cron_tick(cron or "", tz, now)
    if isinstance(start, dt.timedelta):
        return now + start.total_seconds()
    if isinstance(start, dt.datetime) and start.utcoffset() is not None:
        return start.timestamp()
    raise InvalidTaskError(f"start takes a timezone-aware datetime or a timedelta from now, not {start!r}")


async def fire_due(backend: Backend, signer: Signer | None, clock: Callable[[], float], refused: set[str]) -> int:
    """Enqueue every schedule tick that is due and not taken by another worker; returns how many.

    A schedule whose payload this worker cannot trust (with a key: not signed for its name) is
    not run; it is logged once per worker (``refused`` keeps the names)."""
    now = clock()
    fired = 0
    for schedule in await backend.due_schedules(now):
        task = _tick(schedule, signer, now, refused)
        if task is None:
            continue
        following = next_tick(schedule.every, schedule.cron, schedule.tz, schedule.next_run, now)
        if await backend.fire_schedule(schedule.name, schedule.next_run, following, now, task):
            fired += 1
    return fired


def _tick(schedule: Schedule, signer: Signer | None, now: float, refused: set[str]) -> NewTask | None:
    task_id = schedule_task_id(schedule.name, schedule.next_run)
    signature = None
    if signer is not None:
        try:
            signer.verify_schedule(schedule.name, schedule.func, schedule.args, schedule.signature)
        except SignatureError as exc:
            if schedule.name not in refused:
                refused.add(schedule.name)
                log.error("%s", exc)
            return None
        signature = signer.sign_task(task_id, schedule.func, schedule.args)
    return NewTask(
        task_id, schedule.task_name, schedule.func, schedule.args, now, now, schedule.max_attempts, signature,
        queue=schedule.queue, priority=schedule.priority, retention=schedule.retention,
    )
