"""The task every system runs: a module-level no-op, so each system can import it by name."""


def f(x):
    """Return the argument unchanged."""
    return x


def nap(x):
    """Sleep 50 ms, then return the argument: a task slow enough to end a worker's batching."""
    import time

    time.sleep(0.05)
    return x
