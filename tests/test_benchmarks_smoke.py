"""The benchmark suites in their quick modes: every cell runs, every drain stores every result, and
the event-loop stall rows report a stall for sitq; the PostgreSQL suite runs on the real server.

Speed is not asserted here; this only keeps ``python -m benchmarks.run``, ``benchmarks.notebook``
and ``benchmarks.postgres`` from rotting.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_run(tmp_path):
    pytest.importorskip("huey", reason="huey is an optional benchmark dependency (pip install sitq[test])")
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


def test_profile_steps_times_every_step_of_the_round_trip():
    """``python -m benchmarks.profile steps``: each mark of sitq's round trip is passed, in order."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.profile", "steps", "-n", "30"],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "floor p50" in lines[0], lines
    steps = [line.split("->")[0].strip() for line in lines[1:]]
    assert steps[0] == "enqueue" and lines[-1].split("->")[1].split()[0] == "value", lines
    for mark in ("INSERT", "read", "store or claim", "unpickle", "call", "settle"):
        assert mark in steps, (mark, lines)


def test_profile_inserts_drops_the_indexes_it_names():
    """``python -m benchmarks.profile inserts``: every variant runs its INSERT on a file without the
    indexes its label names (a variant whose DROP INDEX named nothing would fail here)."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.profile", "inserts", "-n", "20"],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert set(figures) == {"floor", "sitq", "sitq without sitq_loose", "sitq without sitq_loose and sitq_ready"}
    assert all(value > 0 for value in figures.values()), figures


def test_quick_notebook_benchmark_run(tmp_path):
    """sitq's rows of ``python -m benchmarks.notebook``, small: real kernels, every figure measured."""
    pytest.importorskip("nbclient")
    out = tmp_path / "nb.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.notebook", "--repeat", "1", "--tasks", "50", "--rounds", "5",
         "--systems", "sitq threads,sitq --processes 2,sitq lifecycle", "--workflows",
         "sitq (group API)", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for system, figures in report["table"].items():
        assert "error" not in figures, (system, figures)
    assert {"per_task_ms", "one_ms", "shutdown_ms"} <= set(report["table"]["sitq --processes 2"])
    assert report["table"]["sitq lifecycle"]["orphans"][0] == 0
    assert "workflow_s" in report["workflows"]["sitq (group API)"][0]
    assert "| sitq (group API) |" in proc.stdout


def _postgres_or_skip():
    """The benchmark server's DSN, or skip with the reason (an error under SITQ_REQUIRE_POSTGRES=1)."""
    for package in ("psycopg", "pgqueuer", "asyncpg", "procrastinate"):
        pytest.importorskip(package, reason=f"{package} is an optional benchmark dependency (pip install sitq[bench])")
    from benchmarks.postgres.server import default_dsn, reachable

    dsn = default_dsn()
    why = reachable(dsn)
    if why:
        message = f"no PostgreSQL server at {dsn} (set SITQ_TEST_POSTGRES): {why}"
        if os.environ.get("SITQ_REQUIRE_POSTGRES") == "1":
            pytest.fail(message + "; SITQ_REQUIRE_POSTGRES=1 requires one")
        pytest.skip(message)
    return dsn


def test_quick_postgres_benchmark_run(tmp_path):
    """``python -m benchmarks.postgres`` with tiny sizes on the real server: every cell of every
    system runs, every drain stores every task, connections are counted, and the page section is
    written between its markers. sitq's legs run whenever its PostgreSQL backend is in the tree."""
    dsn = _postgres_or_skip()
    with_sitq = (ROOT / "sitq" / "backends" / "postgres").is_dir()
    systems = ["floor", *(["sitq"] if with_sitq else []), "pgqueuer", "procrastinate"]
    out, page = tmp_path / "pg.json", tmp_path / "performance.md"
    page.write_text("# Performance\n\nbefore\n\n<!-- postgres benchmark: begin -->\nold\n"
                    "<!-- postgres benchmark: end -->\n\nafter\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.postgres", "--repeat", "1", "--tasks", "60", "--round-trips", "5",
         "--workers", "1,2", "--systems", ",".join(systems), "--dsn", dsn, "--json", str(out),
         "--markdown", str(page)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=280)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    report = json.loads(out.read_text())
    cells = report["cells"]
    columns = [c for s in systems for c in (("floor", "floor10") if s == "floor" else (s,))]
    expected = {(s, row) for s in columns for row in ("W2 drain, 1 worker", "W2 drain, 2 workers")}
    expected |= {(s, row) for s in systems for row in ("W1 enqueue one by one", "W5 bulk enqueue", "W3 round trip")}
    assert {(c["system"], c["row"]) for c in cells} == expected
    for c in cells:
        assert "error" not in c, c
        assert all(v > 0 for k, v in c["figures"].items()), c
        if c["workload"] == "drain":
            assert c["figures"]["stored"] == c["n"] == 60, c
        if c["workload"] in ("drain", "round_trip"):
            assert c["figures"]["connections"] >= 1, c
    procrastinate_drain = next(c for c in cells if c["system"] == "procrastinate" and c["workload"] == "drain")
    assert procrastinate_drain["figures"]["connections"] > 1  # its worker holds a pool: counted, not assumed
    text = page.read_text()
    assert text.startswith("# Performance\n\nbefore\n") and text.endswith("\n\nafter\n") and "old" not in text
    header = "| Workload | Metric | " + " | ".join(
        {"floor10": "floor, claims 10"}.get(c, c) for c in columns) + " | Target (sitq) |"
    assert header in text
    assert "| connections per worker process |" in text
    import psycopg

    with psycopg.connect(dsn) as conn:  # every cell dropped its database
        left = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"sitq_bench_{proc.pid}_%",))
        assert not left.fetchall()


def test_postgres_benchmark_refuses_a_bad_dsn():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.postgres", "--dsn", "tasks.db"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "postgresql://user@host:port/database URL, not 'tasks.db'" in proc.stderr
