"""Task functions the tests enqueue; importable by worker processes (tests/ is on their path)."""

import asyncio
import os
import threading
import time

import sitq


def add(a, b):
    return a + b


def echo(x):
    return x


def fail(message="boom"):
    raise ValueError(message)


def divide(a, b):
    return a / b


async def async_double(x):
    await asyncio.sleep(0)
    return 2 * x


async def async_fail():
    await asyncio.sleep(0)
    raise KeyError("missing")


def unpicklable_value():
    return threading.Lock()


def record(path, x, pause=0.0):
    """Append this call to a file, one line per execution, to count how often tasks ran."""
    with open(path, "a") as f:
        f.write(f"{x} {os.getpid()}\n")
    time.sleep(pause)
    return x


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


async def async_sleep_then(seconds, value=None):
    await asyncio.sleep(seconds)
    return value


def chatty(text):
    print(text)
    print("to stderr", file=__import__("sys").stderr)
    return len(text)


def report_progress(steps):
    for i in range(steps):
        sitq.progress(i + 1, steps, f"step {i + 1}")
    return steps


class Gauge:
    """Counts how many calls run at once; each instance lives in one process."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def enter(self):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self):
        with self.lock:
            self.now -= 1


GAUGE = Gauge()


def measured(seconds):
    GAUGE.enter()
    time.sleep(seconds)
    GAUGE.leave()


async def measured_async(seconds):
    GAUGE.enter()
    await asyncio.sleep(seconds)
    GAUGE.leave()


# -- retries, timeouts and cancellation ------------------------------------------


def count_call(path):
    """Append a line to a file and return how many it has: which call this is, counted from inside."""
    with open(path, "a+") as f:
        f.write(f"{time.time()!r}\n")
        f.seek(0)
        return len(f.read().splitlines())


def call_times(path):
    with open(path) as f:
        return [float(line) for line in f.read().splitlines()]


def flaky(path, failures, exc_type=ValueError):
    """Raise ``exc_type`` on the first ``failures`` calls, then return the call number."""
    n = count_call(path)
    if n <= failures:
        raise exc_type(f"failure {n}")
    return n


async def async_flaky(path, failures, exc_type=ValueError):
    await asyncio.sleep(0)
    return flaky(path, failures, exc_type)


def asks_for_retry(path, failures, delay=None):
    """Ask for another attempt with sitq.Retry on the first ``failures`` calls."""
    n = count_call(path)
    if n <= failures:
        raise sitq.Retry(f"not ready at call {n}", delay=delay)
    return n


async def async_asks_for_retry_badly(delay):
    await asyncio.sleep(0)
    raise sitq.Retry("try later", delay=delay)


def own_options(retries, timeout, name):
    """A function whose parameters share their names with task options."""
    return {"retries": retries, "timeout": timeout, "name": name}


GATES = {}
COROUTINES_CANCELLED = set()


def gate(name):
    """(opened, ended) events of the gate ``name``: the test opens it, the task notes when it ends."""
    return GATES.setdefault(name, (threading.Event(), threading.Event()))


def wait_at_gate(name, value=None):
    """Block this thread until the test opens the gate, then return ``value``."""
    opened, ended = gate(name)
    opened.wait(60)
    ended.set()
    return value


async def async_wait_noting_cancel(name, seconds):
    """Sleep, and remember ``name`` if the sleep was cancelled."""
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        COROUTINES_CANCELLED.add(name)
        raise
    return "slept"


def run_logged(path, x, pause):
    """Write a start line, pause, write an end line: a killed worker leaves a start without an end."""
    pid = os.getpid()
    with open(path, "a") as f:
        f.write(f"start {x} {pid}\n")
    time.sleep(pause)
    with open(path, "a") as f:
        f.write(f"end {x} {pid}\n")
    return x


def pid_after(seconds):
    time.sleep(seconds)
    return os.getpid()


def big_value(size):
    return "v" * size


def fail_at_gate_once(name, path):
    """The first call waits at the gate and then fails; later calls return their call number."""
    n = count_call(path)
    if n == 1:
        wait_at_gate(name)
        raise ValueError("the first call fails")
    return n


# -- a stalled event loop -------------------------------------------------------


async def record_blocking_the_loop(path, x, seconds):
    """Record this run, then hold the worker's event loop for ``seconds`` (a stalled loop)."""
    record(path, x)
    time.sleep(seconds)  # deliberately blocking: nothing else on the worker's loop runs meanwhile
    return x
