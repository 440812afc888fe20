"""The tasks ``sitq demo`` runs: a few kinds of work a notebook hands to a queue."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from sitq.worker import progress

__all__ = ["simulate", "fetch", "count_primes", "word_stats", "divide", "demo_calls"]


def simulate(seconds: float, steps: int = 10) -> str:
    """A slow step of an experiment, reporting progress as it goes (runs in a thread)."""
    for step in range(steps):
        time.sleep(seconds / steps)
        progress(step + 1, steps, f"step {step + 1}/{steps}")
    return f"simulated {seconds:.1f} s in {steps} steps"


async def fetch(name: str, delay: float) -> dict[str, Any]:
    """Waiting on I/O, as a coroutine: it runs on the worker's event loop."""
    await asyncio.sleep(delay)
    return {"dataset": name, "rows": len(name) * 1000}


def count_primes(limit: int) -> int:
    """CPU-bound work: the number of primes below ``limit``."""
    sieve = bytearray([1]) * limit
    sieve[:2] = b"\x00\x00"
    for n in range(2, int(math.isqrt(limit)) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytes(len(range(n * n, limit, n)))
    return sum(sieve)


def word_stats(text: str) -> dict[str, Any]:
    """Quick work that prints; the worker stores what it prints with the result."""
    words = text.split()
    print(f"counting {len(words)} words")
    return {"words": len(words), "longest": max(words, key=len)}


def divide(a: float, b: float) -> float:
    """Fails when ``b`` is zero, to show a remote traceback."""
    ratio = a / b
    return ratio


def demo_calls() -> list[tuple[Callable[..., Any], tuple[Any, ...]]]:
    """The 24 calls the demo enqueues: (function, args)."""
    calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
    calls += [(simulate, (0.6 + 0.3 * i,)) for i in range(6)]
    datasets = ["iris", "penguins", "titanic", "mnist", "wine", "cars"]
    calls += [(fetch, (name, 0.2 + 0.15 * i)) for i, name in enumerate(datasets)]
    calls += [(count_primes, (limit,)) for limit in (10_000, 100_000, 500_000, 1_000_000, 2_000_000)]
    texts = ("a task queue you can see", "results come back inline", "tracebacks are readable too")
    calls += [(word_stats, (text,)) for text in texts]
    calls += [(divide, (22, 7)), (divide, (1, 3)), (divide, (10, 4)), (divide, (1, 0))]
    return calls
