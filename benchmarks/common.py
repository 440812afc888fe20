"""Helpers the adapters share: one polling interval, latency percentiles, peak memory, a
ticker that measures how long the event loop is blocked, and the writer of results pages."""

import asyncio
import resource
import statistics
import sys
import time

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


class StallTicker:
    """Measures how long an event loop is blocked, as a user of that loop feels it.

    Used as ``async with StallTicker() as ticker:`` around a workload on the same loop: a task
    wakes every `period` seconds and records the largest delay beyond its period, in ms. The
    block lets the ticker run once more at its end, so a stall at the very end is counted too.
    """

    def __init__(self, period=0.001):
        self.period = period
        self.longest_ms = 0.0
        self._task = None

    async def _tick(self):
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.period)
            late = (time.perf_counter() - start - self.period) * 1e3
            self.longest_ms = max(self.longest_ms, late)

    async def __aenter__(self):
        self._task = asyncio.get_running_loop().create_task(self._tick())
        await asyncio.sleep(self.period * 5)  # running before the workload starts
        return self

    async def __aexit__(self, *exc_info):
        await asyncio.sleep(self.period * 5)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def splice(path, begin, end, section):
    """Put `section` between the `begin` and `end` marker lines of the page at `path`, keeping
    the rest of the page; a page without the markers gets them, with the section, at its end."""
    page = path.read_text() if path.exists() else ""
    if begin in page and end in page:
        head, rest = page.split(begin, 1)
        page = f"{head}{begin}\n{section}{end}{rest.split(end, 1)[1]}"
    else:
        page = (page.rstrip("\n") + "\n\n" if page else "") + f"{begin}\n{section}{end}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
