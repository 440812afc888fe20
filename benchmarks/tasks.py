"""The task every system runs: a module-level no-op, so each system can import it by name."""


def f(x):
    """Return the argument unchanged."""
    return x
