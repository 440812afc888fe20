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
if hasattr(sn, "map"):  # the group API, once sitq has it
    def collect(n):
        return sn.map(noop, range(n)).results()
else:  # today: the queue's map in one transaction, then every value, on the runtime's loop
    rt = sn.current()
    async def values_of(ids):
        return [rt.queue.deserialize_result(await rt.queue.get_result(i)) for i in ids]
    def collect(n):
        ids = rt.run(rt.queue.map(noop, range(n)))
        return rt.run(values_of(ids))
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
