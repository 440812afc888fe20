"""The consumer side: claim tasks, run them, store their outcomes.

Five modules, each importing only the ones below it:

- :mod:`sitq.worker.loop` -- the :class:`Worker`: start, drain and stop, the
  claim-and-finish loop, leases, cancel requests, suspects and store checks;
- :mod:`sitq.worker.runners` -- executing a claimed task: threads, coroutines,
  runs of short tasks, timeouts, cancel and abandon, and turning what a task
  returned or raised into its outcome;
- :mod:`sitq.worker.processes` -- running tasks in child processes
  (``Worker(processes=N)``), loaded only by workers that use them;
- :mod:`sitq.worker.failures` -- what a task raised, as it is stored: the
  error and the task's own traceback, with notebook cells named as IPython
  names them;
- :mod:`sitq.worker.capture` -- progress and output from inside a task:
  :func:`progress`, :func:`stop_event`, :func:`reporting_progress`.
"""

from sitq.worker.capture import progress, reporting_progress, stop_event
from sitq.worker.loop import Worker

__all__ = ["Worker", "progress", "reporting_progress", "stop_event"]
