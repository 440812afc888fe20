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


def arguments(*args, **kwargs):
    """Returns what it was called with: keywords named like sitq's own parameters must arrive here."""
    return args, kwargs


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


def kill_own_worker(path, x, after):
    """Log a start, then end the whole worker process, as a segfault or os._exit in a library would."""
    with open(path, "a") as f:
        f.write(f"start {x} {os.getpid()}\n")
    time.sleep(after)
    os._exit(70)


# -- tasks that misbehave ------------------------------------------------------------


class Interrupt(BaseException):
    """A user's own BaseException subclass."""


class BadStr(Exception):
    def __str__(self):
        raise ValueError("no text for you")

    def __repr__(self):
        raise ValueError("no repr either")


class HoldsLock(Exception):
    """Cannot be pickled: it carries a lock."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


class NeedsDetail(Exception):
    """Pickles, but cannot be rebuilt: its __init__ needs an argument that its args do not hold."""

    def __init__(self, code, detail):
        super().__init__(f"failed with code {code}")
        self.detail = detail


class Unrebuildable:
    """A value that pickles but cannot be unpickled."""

    def __reduce__(self):
        return (NeedsDetail, (1,))


def unrebuildable_value():
    return Unrebuildable()


class ReduceInterrupts:
    """A value whose pickling raises KeyboardInterrupt."""

    def __reduce__(self):
        raise KeyboardInterrupt("pickling interrupted")


class _Meta(type):
    def __instancecheck__(cls, obj):
        raise RuntimeError("broken isinstance check")


class BrokenRetryRule(Exception, metaclass=_Meta):
    """As retry_on, it makes the worker's own retry decision raise."""


MISBEHAVIOURS = {
    # kind: (what the task raises or returns, how the task's error reads)
    "keyboard-interrupt": (lambda: KeyboardInterrupt("pressed in a task"), "KeyboardInterrupt: pressed in a task"),
    "generator-exit": (lambda: GeneratorExit("closed early"), "GeneratorExit: closed early"),
    "system-exit": (lambda: SystemExit(3), "SystemExit: 3"),
    "base-exception": (lambda: Interrupt("my own BaseException"), "Interrupt: my own BaseException"),
    "bad-str": (lambda: BadStr("hidden"), "BadStr: <str() of the exception raised ValueError>"),
    "unpicklable-exception": (lambda: HoldsLock("holds a lock"), "HoldsLock: holds a lock"),
    "unrebuildable-exception": (lambda: NeedsDetail(3, "x"), "NeedsDetail: failed with code 3"),
    "unpicklable-value": (threading.Lock, "SerializationError: cannot pickle the return value, a lock"),
    "value-pickling-interrupts": (
        ReduceInterrupts, "SerializationError: cannot pickle the return value, a ReduceInterrupts"
    ),
}


def misbehave(kind):
    made = MISBEHAVIOURS[kind][0]()
    if isinstance(made, BaseException):
        raise made
    return made


async def async_misbehave(kind):
    await asyncio.sleep(0)
    return misbehave(kind)


async def async_raise_cancelled():
    """Raise CancelledError without anyone cancelling the task (as awaiting a cancelled future does)."""
    await asyncio.sleep(0)
    raise asyncio.CancelledError()


SWALLOWED = {}  # name -> what happened to the coroutine, in order


async def async_swallow_cancel(name, then, started):
    """Catch the first CancelledError and go on: ``then`` is "return" (a value, at once) or "keep-running".

    The file ``started`` is created once the coroutine runs (a cancel before that stops it before it starts)."""
    notes = SWALLOWED.setdefault(name, [])
    open(started, "w").close()
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        notes.append("swallowed")
        if then == "return":
            return "finished anyway"
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        notes.append("cancelled again")
        raise
    notes.append("ran to the end")
    return "ran to the end"


def write_pid_and_wait(path, seconds=60):
    """Note this process's id in a file, then block: a task to stop."""
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return "not stopped"


def child_pid():
    return os.getpid()


def meet(folder, name, count):
    """Wait until ``count`` tasks have arrived in ``folder``: they run side by side."""
    from pathlib import Path

    folder = Path(folder)
    (folder / f"{name}.here").touch()
    deadline = time.monotonic() + 60
    while len(list(folder.glob("*.here"))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError("the other tasks never arrived")
        time.sleep(0.01)


def meet_then(folder, name, count, then="return"):
    """Meet the others, then return this process's id, exit, or segfault."""
    import signal

    meet(folder, name, count)
    if then == "exit":
        os._exit(7)
    if then == "segfault":
        os.kill(os.getpid(), signal.SIGSEGV)
    return os.getpid()


BLOB_REFS = []


class Blob:
    """An argument the test can watch with a weak reference (in the worker's process)."""

    def __init__(self, size):
        self.data = b"x" * size


def keep_blob(blob):
    import weakref

    from sitq.output import capture_into

    BLOB_REFS.append(weakref.ref(blob))
    BLOB_REFS.append(weakref.ref(capture_into.get()))  # what the task prints
    print("some output", len(blob.data))
    return len(blob.data)


async def async_keep_blob(blob):
    await asyncio.sleep(0)
    return keep_blob(blob)


async def async_ignore_every_cancel(started):
    """Swallow every CancelledError, for ever: a coroutine nothing can stop."""
    open(started, "w").close()
    while True:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass


# -- a stalled event loop -------------------------------------------------------


async def record_blocking_the_loop(path, x, seconds):
    """Record this run, then hold the worker's event loop for ``seconds`` (a stalled loop)."""
    record(path, x)
    time.sleep(seconds)  # deliberately blocking: nothing else on the worker's loop runs meanwhile
    return x


def total(values):
    """A reduce: the sum of the values of the tasks it ran after, read back from their store."""
    return sum(values)


def sum_results(db, ids):
    """A reduce after a map: reads the map's values from the store the worker shares."""
    with sitq.SyncTaskQueue(db) as queue:
        return sum(queue.value(task_id, timeout=0) for task_id in ids)


def tick(path):
    """One line per run, with the time: a schedule's ticks."""
    with open(path, "a") as f:
        f.write(f"{time.time()} {os.getpid()}\n")


def print_slowly(lines, pause, gate=None):
    """Print ``lines`` lines, ``pause`` s apart; then wait for the file ``gate`` (if given) before returning."""
    for i in range(lines):
        print(f"line {i}", flush=True)
        time.sleep(pause)
    if gate is not None:
        while not os.path.exists(gate):
            time.sleep(0.01)
    return lines


def note_interval(path, seconds):
    """Append this run's (start, end) monotonic times to a file: when did it really run?"""
    start = time.time()
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"{start} {time.time()}\n")
    return os.getpid()


def wait_for_file_if(i, first, path):
    """Item ``first`` of a map waits until the file ``path`` exists (a gate across processes); others return."""
    if i == first:
        while not os.path.exists(path):
            time.sleep(0.005)
    return i
