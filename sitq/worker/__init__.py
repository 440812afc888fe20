"""The consumer side: claim tasks, run them, store their outcomes."""

from sitq.worker.loop import Worker, _describe, _message, _Threads, progress, reporting_progress, stop_event

__all__ = ["Worker", "progress"]
