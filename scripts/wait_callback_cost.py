#!/usr/bin/env python
"""What the database deadline costs: CPU per pool checkout + BEGIN + SELECT + COMMIT through the
service's engine, with its psycopg2 wait callback and with plain blocking libpq.

    .venv/bin/python scripts/wait_callback_cost.py [postgresql://postgres@127.0.0.1:5432/postgres]

CPU time (not wall time) is compared, so a busy machine blurs the figures less; rounds
alternate so drift hits both alike.
"""

import statistics
import sys
import time
from pathlib import Path

import psycopg2.extensions
from sqlalchemy import Engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.platform import db  # noqa: E402 - after the path is set
from backend.platform.config import Settings  # noqa: E402


def cpu_per_unit(engine: Engine, n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        with engine.connect() as connection:
            connection.execute(text("SELECT 1")).scalar_one()
            connection.commit()
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1:5432/postgres"
    settings = Settings(_env_file=None, DATABASE_URL=url, BETTER_AUTH_SECRET="x" * 40)  # type: ignore[call-arg]
    engine = db.build_engine(settings)
    results: dict[str, list[float]] = {"with the deadline": [], "blocking libpq": []}
    for _ in range(8):
        for label, callback in (
            ("with the deadline", db._wait_with_deadline),
            ("blocking libpq", None),
        ):
            psycopg2.extensions.set_wait_callback(callback)
            engine.dispose()
            cpu_per_unit(engine, 200)  # warm up: connect, caches
            results[label].append(cpu_per_unit(engine, 2000))
    engine.dispose()
    base = statistics.median(results["blocking libpq"])
    for label, values in results.items():
        median = statistics.median(values)
        print(f"{label:18s} {median:6.1f} us CPU ({median - base:+5.1f})")


if __name__ == "__main__":
    main()
