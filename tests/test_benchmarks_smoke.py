"""The benchmark suite in its quick mode: every cell runs, every drain stores every result, and
the event-loop stall rows report a stall for sitq.

Speed is not asserted here; this only keeps ``python -m benchmarks.run`` from rotting.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("huey", reason="huey is an optional benchmark dependency (pip install sitq[test])")

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_run(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cells = json.loads(out.read_text())["cells"]
    assert {(c["system"], c["row"]) for c in cells} >= {
        (system, row) for system in ("sitq", "floor", "huey")
        for row in ("W1 enqueue", "W2 drain c=1", "W2 drain c=8", "W3 round trip in-process",
                    "W3 round trip cross-process", "W4 mixed 8 producers", "W5 bulk")} | {
        ("sitq", row) for row in ("S0 idle loop (noise)", "S1 map", "S2 drain c=1", "S2 drain c=8", "S3 overview",
                                  "S4 statuses", "S5 notebook refresh", "F0 100 × 50 ms, 2 workers",
                                  "F1 the same after 200 no-ops", "R1 retention 1 s")}
    for c in cells:
        assert "error" not in c, c
        assert c["figures"] and all(v > 0 or (k in ("stall_ms", "left") and v == 0)
                                    for k, v in c["figures"].items()), c
        if c["workload"] in ("drain", "stall_drain", "fairness"):
            assert c["figures"]["stored"] == c["n"], c
        if c["workload"] == "fairness":
            assert c["figures"]["first_s"] <= c["figures"]["total_s"], c
        if c["workload"] == "retention":  # the expired tasks were deleted and the file shrank
            assert c["figures"]["left"] < c["n"] and c["figures"]["final_mb"] < c["figures"]["max_mb"], c


def test_quick_notebook_benchmark_run(tmp_path):
    """sitq's rows of ``python -m benchmarks.notebook``, small: real kernels, every figure measured."""
    pytest.importorskip("nbclient")
    out = tmp_path / "nb.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.notebook", "--repeat", "1", "--tasks", "50", "--rounds", "5",
         "--systems", "sitq threads,sitq --processes 2,sitq lifecycle", "--workflows",
         "sitq today (submit and board)", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for system, figures in report["table"].items():
        assert "error" not in figures, (system, figures)
    assert {"per_task_ms", "one_ms", "shutdown_ms"} <= set(report["table"]["sitq --processes 2"])
    assert report["table"]["sitq lifecycle"]["orphans"][0] == 0
    assert "workflow_s" in report["workflows"]["sitq today (submit and board)"][0]
    assert "| sitq today (submit and board) |" in proc.stdout
