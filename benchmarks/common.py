"""Helpers the adapters share: one polling interval, latency percentiles and peak memory."""

import resource
import statistics
import sys

POLL = 0.001
"""Seconds an idle worker or a result waiter sleeps between polls, for every system that polls."""


def latency(samples, unit, *quantiles):
    """Return percentiles of `samples` (seconds) keyed like ``p50_ms``, scaled to `unit` ("ms" or "us")."""
    scale = {"ms": 1e3, "us": 1e6}[unit]
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {f"p{q}_{unit}": (cuts[q - 1] if q < 100 else max(samples)) * scale for q in quantiles}


def peak_rss_mb(children=False):
    """Peak resident memory in MB of this process, or of its largest waited-for child."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def check_stored(stored, n, system):
    """Fail loudly unless `stored` results were read back for `n` tasks."""
    if stored != n:
        raise RuntimeError(f"{system}: {stored} of {n} results readable after the drain")
    return stored
