"""The PostgreSQL benchmark: sitq's PostgreSQL backend beside a raw psycopg floor, pgqueuer and
procrastinate, in one run (``python -m benchmarks.postgres --help``)."""
