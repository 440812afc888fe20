"""Benchmarks comparing sitq with a hand-written SQLite floor and huey; run `python -m benchmarks.run`."""
