"""Bad input at enqueue is refused with a message that names the problem, and stores nothing."""

import datetime as dt
import socket
import threading

import pytest
import taskfuncs

from sitq import InvalidTaskError, SerializationError, SQLiteBackend, TaskQueue


@pytest.fixture
def queue(db_path, run):
    queue = TaskQueue(SQLiteBackend(db_path))
    yield queue
    run(queue.close())


def stored(queue, run):
    return run(queue.overview(0)).total


def test_non_callable_is_refused(queue, run):
    with pytest.raises(InvalidTaskError, match=r"needs a callable.*not its result"):
        run(queue.enqueue(42))
    with pytest.raises(TypeError):  # also catchable as the builtin
        run(queue.enqueue("taskfuncs.add", 1, 2))
    assert stored(queue, run) == 0


def test_naive_eta_is_refused(queue, run):
    with pytest.raises(InvalidTaskError, match="has no timezone"):
        run(queue.enqueue(taskfuncs.add, 1, 2, eta=dt.datetime.now()))
    with pytest.raises(ValueError):
        run(queue.enqueue(taskfuncs.add, 1, 2, eta="tomorrow"))
    assert stored(queue, run) == 0


def test_unpicklable_argument_is_named(queue, run):
    with pytest.raises(SerializationError, match=r"argument 2 of taskfuncs.add\(\): lock"):
        run(queue.enqueue(taskfuncs.add, 1, threading.Lock()))
    with socket.socket() as sock, pytest.raises(SerializationError, match=r"keyword argument 'b'.*socket"):
        run(queue.enqueue(taskfuncs.add, 1, b=sock))
    assert stored(queue, run) == 0


def test_unpicklable_function_is_named(queue, run):
    lock = threading.Lock()

    def uses_lock():
        with lock:
            return 1

    with pytest.raises(SerializationError, match=r"cannot pickle the task function .*uses_lock.*lock"):
        run(queue.enqueue(uses_lock))
    assert stored(queue, run) == 0


def test_map_stores_all_or_nothing(queue, run):
    with pytest.raises(SerializationError, match="argument 1"):
        run(queue.map(taskfuncs.echo, [1, 2, threading.Lock(), 4]))
    assert stored(queue, run) == 0
    ids = run(queue.map(taskfuncs.add, range(3), [10, 20, 30]))
    assert len(ids) == len(set(ids)) == 3
    assert stored(queue, run) == 3
    with pytest.raises(InvalidTaskError, match="at least one iterable"):
        run(queue.map(taskfuncs.add))


def test_eta_may_be_aware_datetime_or_timedelta(queue, run):
    soon = dt.datetime.now(dt.timezone(dt.timedelta(hours=5))) + dt.timedelta(minutes=5)
    first = run(queue.enqueue(taskfuncs.add, 1, 2, eta=soon))
    second = run(queue.enqueue(taskfuncs.add, 1, 2, eta=dt.timedelta(minutes=5)))
    infos = run(queue.statuses([first, second]))
    assert abs((infos[first].eta - soon).total_seconds()) < 0.01
    assert infos[second].eta > infos[second].enqueued_at + dt.timedelta(minutes=4)


def test_task_function_keywords_pass_through(queue, db_path, run):
    from sitq import Worker

    task_id = run(queue.enqueue(taskfuncs.add, a=1, b=2))
    run(Worker(queue.backend).drain())
    assert queue.deserialize_result(run(queue.get_result(task_id, timeout=0))) == 3


def test_queue_and_worker_need_a_store(db_path):
    from sitq import Worker

    for bad in (42, None, [str(db_path)]):
        with pytest.raises(TypeError, match="a sitq store is a file path, a sqlite:/// or postgresql:// URL"):
            TaskQueue(bad)
        with pytest.raises(TypeError, match="a sitq store is a file path"):
            Worker(bad)
    with pytest.raises(ValueError, match="cannot open redis:// stores"):
        TaskQueue("redis://localhost/0")
    backend = SQLiteBackend(db_path)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidTaskError, match="max_concurrency"):
            Worker(backend, max_concurrency=bad)
    with pytest.raises(InvalidTaskError, match="poll_interval"):
        Worker(backend, poll_interval=0)
