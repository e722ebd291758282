#!/usr/bin/env python
"""What the database deadline costs: CPU per round trip (a statement and its answer) on the
service's autocommit engine, where a request is one round trip, with its psycopg2 wait callback
and with plain blocking libpq.

    .venv/bin/python scripts/wait_callback_cost.py [postgresql://postgres@127.0.0.1:5432/postgres]

CPU time (not wall time) is compared and rounds alternate, so a busy machine blurs the figures
less; the minimum over rounds is the least disturbed.
"""

import statistics
import sys
import time
from pathlib import Path

import psycopg2.extensions
from sqlalchemy import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.platform import db  # noqa: E402 - after the path is set
from backend.platform.config import Settings  # noqa: E402
from backend.platform.db.deadline import wait_with_deadline  # noqa: E402


def cpu_per_round_trip(engine: Engine, n: int) -> float:
    connection = engine.raw_connection()  # a fresh one: engine.dispose() ran just before
    try:
        cursor = connection.cursor()
        started = time.process_time()
        for _ in range(n):
            cursor.execute("SELECT 1")
            cursor.fetchone()
        return (time.process_time() - started) / n * 1e6
    finally:
        connection.close()


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432/postgres"
    settings = Settings(_env_file=None, DATABASE_URL=url, BETTER_AUTH_SECRET="x" * 40)  # type: ignore[call-arg]
    engine = db.build_engine(settings, autocommit=True)
    results: dict[str, list[float]] = {"with the deadline": [], "blocking libpq": []}
    for _ in range(16):
        for label, callback in (
            ("with the deadline", wait_with_deadline),
            ("blocking libpq", None),
        ):
            psycopg2.extensions.set_wait_callback(callback)
            engine.dispose()
            cpu_per_round_trip(engine, 200)  # warm up
            results[label].append(cpu_per_round_trip(engine, 3000))
    engine.dispose()
    base_min = min(results["blocking libpq"])
    base_median = statistics.median(results["blocking libpq"])
    for label, values in results.items():
        low, median = min(values), statistics.median(values)
        print(
            f"{label:18s} min {low:5.1f} us ({low - base_min:+4.1f}), "
            f"median {median:5.1f} us ({median - base_median:+4.1f}) CPU per round trip"
        )


if __name__ == "__main__":
    main()
