"""Run one benchmark cell in a fresh process and print its figures as one JSON line.

``python -m benchmarks.cell '{"system": "floor", "workload": "drain", "db": "x.db", "n": 5000,
"kw": {"concurrency": 8}}'`` calls that adapter function and adds the process's peak RSS
unless the figures already carry the worker's. ``python -m benchmarks.cell serve SYSTEM DB``
runs a worker until terminated, for the cross-process round trip.
"""

import importlib
import json
import sys

from benchmarks.common import peak_rss_mb

ADAPTERS = {"sitq": "benchmarks.sitq_system", "floor": "benchmarks.floor", "huey": "benchmarks.huey_system"}


def main(argv):
    """Dispatch to `serve` or to one workload function."""
    if argv[0] == "serve":
        importlib.import_module(ADAPTERS[argv[1]]).serve(argv[2])
        return
    spec = json.loads(argv[0])
    run = getattr(importlib.import_module(ADAPTERS[spec["system"]]), spec["workload"])
    figures = run(spec["db"], spec["n"], **spec.get("kw", {}))
    figures.setdefault("rss_mb", peak_rss_mb())
    print(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
