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
