"""The cells each system runs in its kernel, as a user would write them.

Every system gets two worker processes (sitq's threads mode: two threads). A cell prints one
line ``BENCH {json}`` per figure; the runner collects them. The no-op task is defined in the
notebook itself, as a student's function would be.
"""

NOOP = "def noop(x):\n    return x\n"

# The timing cells. {n}: tasks in the many-task figure; {rounds}: submit-to-value round trips.
MANY = """
import json, time
{collect_def}
collect(200)  # warm up: the first calls pay for imports and connections
t0 = time.perf_counter()
values = collect({n})
elapsed = time.perf_counter() - t0
assert values == list(range({n})), values[:5]
print("BENCH", json.dumps({{"per_task_ms": elapsed * 1e3 / {n}, "tasks_s": {n} / elapsed}}))
"""
ONE = """
import json, statistics, time
samples = []
for i in range({rounds}):
    t0 = time.perf_counter()
    assert {one} == i
    samples.append(time.perf_counter() - t0)
print("BENCH", json.dumps({{"one_ms": statistics.median(samples) * 1e3}}))
"""

SITQ_COLLECT = """
import sitq.notebook as sn
def collect(n):
    return sn.map(noop, range(n)).results()
"""
SITQ_SUBMIT_COLLECT = """
import sitq.notebook as sn
def collect(n):
    handles = [sn.submit(noop, i) for i in range(n)]
    return [h.result() for h in handles]
"""

SYSTEMS = {
    "sitq threads": {
        "setup": "%load_ext sitq\n%sitq start bench.db --concurrency 2",
        "collect": SITQ_COLLECT,
        "one": "sn.submit(noop, i).result()",
        "teardown": "%sitq stop",
    },
    "sitq --processes 2": {
        "setup": "%load_ext sitq\n%sitq start bench.db --processes 2",
        "collect": SITQ_COLLECT,
        "one": "sn.submit(noop, i).result()",
        "teardown": "%sitq stop",
    },
    "sitq submit loop (threads)": {
        "setup": "%load_ext sitq\n%sitq start bench.db --concurrency 2",
        "collect": SITQ_SUBMIT_COLLECT,
        "teardown": "%sitq stop",
    },
    "sitq submit loop (--processes 2)": {
        "setup": "%load_ext sitq\n%sitq start bench.db --processes 2",
        "collect": SITQ_SUBMIT_COLLECT,
        "teardown": "%sitq stop",
    },
    "dask.distributed": {
        "setup": "from dask.distributed import Client, LocalCluster\n"
                 "cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)\n"
                 "client = Client(cluster)",
        "collect": "def collect(n):\n    return client.gather(client.map(noop, range(n), pure=False))\n",
        "one": "client.submit(noop, i, pure=False).result()",
        "teardown": "client.close()\ncluster.close()",
    },
    "ipyparallel": {
        "setup": "import ipyparallel as ipp\ncluster = ipp.Cluster(n=2, log_level=40)\n"
                 "rc = cluster.start_and_connect_sync(activate=False)\nview = rc.load_balanced_view()",
        "collect": "def collect(n):\n    return view.map_sync(noop, range(n))\n",
        "one": "view.apply_sync(noop, i)",
        "teardown": "rc.close()\ncluster.stop_cluster_sync()",
    },
    "ProcessPoolExecutor(2)": {
        "setup": "from concurrent.futures import ProcessPoolExecutor\npool = ProcessPoolExecutor(2)",
        "collect": "def collect(n):\n    return list(pool.map(noop, range(n)))\n",
        "one": "pool.submit(noop, i).result()",
        "teardown": "pool.shutdown()",
    },
}


def cells(system, n, rounds):
    """The notebook's code cells for one run of ``system``."""
    spec = SYSTEMS[system]
    sources = [spec["setup"], NOOP, spec["collect"] + MANY.format(collect_def="", n=n)]
    if "one" in spec:
        sources.append(ONE.format(rounds=rounds, one=spec["one"]))
    sources.append(spec["teardown"])
    return sources


# sitq only: how fast a fresh process worker answers, measured in the cell that starts it.
LIFECYCLE = [
    NOOP + "import json, time\nimport sitq.notebook as sn\n%load_ext sitq\n"
    "t0 = time.perf_counter()\n%sitq start bench.db --processes 2\nstart_s = time.perf_counter() - t0\n"
    "assert sn.submit(noop, 1).result(60) == 1\nfirst_s = time.perf_counter() - t0\n"
    'print("BENCH", json.dumps({"start_cell_ms": start_s * 1e3, "first_result_ms": first_s * 1e3}))',
    # a task enqueued a moment later finds its processes started
    "time.sleep(1)\nt0 = time.perf_counter()\nassert sn.submit(noop, 2).result(60) == 2\n"
    'print("BENCH", json.dumps({"later_result_ms": (time.perf_counter() - t0) * 1e3}))',
]


# sitq only: a map of 100,000 no-ops, with a 1 ms ticker on the kernel's own event loop (the cell awaits,
# so the ticker runs whenever the cell's code does not): how long map() and the first paint of its widget
# hold the kernel (the ticker cannot run meanwhile), the longest the ticker then waited while the tasks
# were stored in the background (and, for comparison, while nothing ran), and what one redraw of a
# group's widget costs for this group and for a group of 1,000.
BIG_MAP = [
    NOOP + "%load_ext sitq\n%sitq start bench.db --concurrency 2",
    """
import asyncio, json, time
import sitq.notebook as sn
from IPython.display import display
from sitq.notebook.refresher import GroupWatch
longest = 0.0
async def tick():
    global longest
    while True:
        t = time.perf_counter()
        await asyncio.sleep(0.001)
        longest = max(longest, (time.perf_counter() - t - 0.001) * 1e3)
ticker = asyncio.ensure_future(tick())
await asyncio.sleep(0.05)
small = sn.map(noop, range(1000))
display(small)  # a kernel's first widget imports ipywidgets (about 0.1 s, once): not the big map's cost
small.wait(60)  # nothing else runs while the big map is measured
await asyncio.sleep(2)  # a new kernel's worker settles: its first seconds hold the loop once (see docs)
longest = 0.0
await asyncio.sleep(1)
idle = longest  # the ticker alone: what the machine's other work costs the loop in this run
t0 = time.perf_counter()
group = sn.map(noop, range(100_000))
map_s = time.perf_counter() - t0
display(group)
paint_s = time.perf_counter() - t0
await asyncio.sleep(0)
longest = 0.0  # from here the cell awaits: the ticker's waits are what storing in the background costs
while group._stored is not None and not group._stored.done():
    await asyncio.sleep(0.005)
stored_s = time.perf_counter() - t0
stall = longest
ticker.cancel()
rt = sn.current()
def redraw_ms(g, n=20):
    watch = GroupWatch(g.group_id, g.name)
    rt.run(watch.row(rt.queue))
    t = time.perf_counter()
    for _ in range(n):
        rt.run(watch.row(rt.queue))
    return (time.perf_counter() - t) * 1e3 / n
print("BENCH", json.dumps({"map_call_ms": map_s * 1e3, "first_paint_ms": paint_s * 1e3,
                           "stored_ms": stored_s * 1e3, "kernel_stall_ms": stall, "kernel_idle_stall_ms": idle,
                           "redraw_1k_ms": redraw_ms(small), "redraw_100k_ms": redraw_ms(group)}))
group.cancel()
""",
    "%sitq stop",
]


# -- the teaching workflow: map a function over 20 items, watch, collect, inspect the failure ----------------

WORK = """def work(x):
    import time  # imported here: ipyparallel's engines do not see the notebook's imports
    time.sleep(0.05)
    if x == 13:
        raise ValueError(f"unlucky {x}")
    return x * x
items = list(range(20))"""

# Each workflow: the cells a student writes, by step. Only these count as lines of user code;
# the runner adds the timing cells around them.
WORKFLOWS = {
    "sitq submit loop and board": {
        "start": "%load_ext sitq\n%sitq start work.db --processes 2",
        "map": "import sitq\nhandles = [sitq.notebook.submit(work, x) for x in items]",
        "watch": "sitq.notebook.board()",
        "collect": "results, failed = {}, None\nfor x, h in zip(items, handles):\n    try:\n"
                   "        results[x] = h.result()\n    except sitq.TaskFailedError as e:\n        failed = e",
        "inspect": "print(failed.traceback)",
    },
    "sitq (group API)": {
        "start": "%load_ext sitq\n%sitq start work.db --processes 2",
        "map": "import sitq\ngroup = sitq.notebook.map(work, items)",
        "watch": "group",
        "collect": "results = group.results(failures='return')",
        "inspect": "print(group.failures()[0].traceback)",
    },
    "dask.distributed": {
        "start": "from dask.distributed import Client, LocalCluster, progress, wait\n"
                 "client = Client(LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None))",
        "map": "futures = client.map(work, items)",
        "watch": "progress(futures)",
        "collect": "wait(futures)\nresults = {x: f.result() for x, f in zip(items, futures) if f.status == 'finished'}",
        "inspect": "failed = next(f for f in futures if f.status == 'error')\n"
                   "import traceback\ntraceback.print_tb(failed.traceback())\nprint(failed.exception())",
    },
    "ipyparallel": {
        "start": "import ipyparallel as ipp\ncluster = ipp.Cluster(n=2, log_level=40)\n"
                 "rc = cluster.start_and_connect_sync(activate=False)\nview = rc.load_balanced_view()",
        "map": "ars = [view.apply_async(work, x) for x in items]",
        "watch": "rc.wait_interactive(ars)",
        "collect": "rc.wait(ars)\nresults = {x: ar.get() for x, ar in zip(items, ars) if ar.successful()}",
        "inspect": "failed = next(ar for ar in ars if not ar.successful())\ntry:\n    failed.get()\n"
                   "except ipp.RemoteError as e:\n    e.print_traceback()",
    },
    "ProcessPoolExecutor(2)": {
        "start": "from concurrent.futures import ProcessPoolExecutor, as_completed\npool = ProcessPoolExecutor(2)",
        "map": "futures = {pool.submit(work, x): x for x in items}",
        "watch": "for done, f in enumerate(as_completed(futures), 1):\n    print(f'{done}/{len(futures)}', end='\\r')",
        "collect": "results = {x: f.result() for f, x in futures.items() if f.exception() is None}",
        "inspect": "failed = next(f for f in futures if f.exception() is not None)\nimport traceback\n"
                   "traceback.print_exception(failed.exception())",
    },
}
STEPS = ("start", "map", "watch", "collect", "inspect")
TEARDOWN = {
    "dask.distributed": "client.close()",
    "ipyparallel": "rc.close()\ncluster.stop_cluster_sync()",
    "ProcessPoolExecutor(2)": "pool.shutdown()",
}


def lines_of(code):
    """Lines of user code: not blank, not only a comment."""
    return sum(1 for line in code.splitlines() if line.strip() and not line.strip().startswith("#"))


def workflow_cells(system):
    """The workflow's cells with timing cells around the steps from map to inspect, and a last cell that
    checks what the student got (19 values, the failure's traceback shown)."""
    spec = WORKFLOWS[system]
    sources = [spec["start"], WORK, "import time as _t\n_t0 = _t.perf_counter()"]
    sources += [spec[step] for step in STEPS[1:]]
    # sitq's results() keep the failure in its place (failures="return"); the peers' are dicts of the 19 values
    sources.append('import json as _j\n'
                   'got = results if isinstance(results, dict) else '
                   '{x: v for x, v in zip(items, results) if not isinstance(v, Exception)}\n'
                   'assert len(got) == 19 and got[12] == 144, results\n'
                   'print("BENCH", _j.dumps({"workflow_s": _t.perf_counter() - _t0}))')
    if system in TEARDOWN:
        sources.append(TEARDOWN[system])
    return sources
