"""Several instances starting at once against an empty database: three uvicorn processes and a
`uvicorn --workers 4`, started in the same second. Exactly one of them migrates (all revisions
in one transaction under the migration lock); the others wait for it and find the schema at
head; every one serves.

Left alone, the instances would reach the migration one after another (importing the app takes
longer than migrating), and would pass without the lock. So the test holds them at the same
point first: it creates Better Auth's users table in a transaction it keeps open (as Better
Auth's own migration might, at that moment), which every instance's migration then waits on,
directly or behind the migration lock; once all seven are waiting, it rolls back. Without the
lock the seven would then create the same tables at once, and all but one would fail.

Parametrised over how the instances reach the database (`instance_urls`): directly, and
through a transaction-mode PgBouncer that recycles its server connections, with no
DATABASE_URL_UNPOOLED, so that the migration itself goes through the pooler.
"""

import time
from collections.abc import Iterator

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, text

from backend.platform.db.migrate import compared_objects, head_revisions
from backend.tables import METADATA
from tests.live_server import free_port
from tests.pgbouncer import pgbouncer
from tests.service_processes import (
    empty_database,
    service_env,
    start_uvicorn,
    stop,
    wait_healthy,
)

WORKERS = 4
SINGLE_INSTANCES = 3
# Eight interpreters importing the app at once on a small shared machine.
START_TIMEOUT = 120


@pytest.fixture(params=["direct", "pooled"])
def instance_urls(
    request: pytest.FixtureRequest, direct_database_url: str
) -> Iterator[tuple[str, str]]:
    """(the DATABASE_URL the instances get, a direct URL to inspect the result with), for a new
    empty database. A pooled parameter yields the pooler's URL for the same database as the
    first (and no DATABASE_URL_UNPOOLED, so that the migration itself goes through the pooler,
    whose pool must then hold the seven migrating connections at once)."""
    with empty_database(direct_database_url) as direct:
        if request.param == "direct":
            yield direct, direct
        else:
            with pgbouncer(direct) as pooled:
                yield pooled, direct


def test_instances_started_together_on_an_empty_database_all_serve(
    instance_urls: tuple[str, str],
) -> None:
    served, direct = instance_urls
    # One serving connection each: the server's connection slots are shared with other tests.
    env = service_env(served, DB_POOL_SIZE="1")
    engine = create_engine(direct.replace("postgresql://", "postgresql+psycopg2://", 1))
    gate = engine.connect()
    gate.execute(text('CREATE TABLE "user" (id text PRIMARY KEY)'))  # held: not committed
    ports = [free_port() for _ in range(SINGLE_INSTANCES + 1)]
    processes = [start_uvicorn(env, port) for port in ports[:SINGLE_INSTANCES]]
    processes.append(start_uvicorn(env, ports[-1], "--workers", str(WORKERS)))
    outputs: list[str] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while _waiting_on_locks(engine) < SINGLE_INSTANCES + WORKERS:
            assert all(p.poll() is None for p in processes), "an instance exited"
            assert time.monotonic() < deadline, "the instances never all reached the migration"
            time.sleep(0.1)
        gate.rollback()
        gate.close()
        for process, port in zip(processes, ports, strict=True):
            wait_healthy(process, port, timeout=START_TIMEOUT)
            assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
    finally:
        gate.close()
        outputs = [stop(process) for process in processes]

    log = "".join(outputs)
    assert "Traceback" not in log
    assert outputs[-1].count("Application startup complete") == WORKERS
    # Seven processes brought the schema to head, one of them by running the revision.
    assert log.count("Running upgrade  -> ") == 1
    assert log.count('"event": "db.schema_at_head"') == SINGLE_INSTANCES + WORKERS
    try:
        with engine.connect() as connection:
            versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
            assert [v for (v,) in versions] == list(head_revisions())
            context = MigrationContext.configure(
                connection,
                opts={"compare_server_default": True, "include_object": compared_objects("user")},
            )
            assert compare_metadata(context, METADATA) == []
            tables = connection.execute(
                text("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
            ).scalars()
            assert list(tables) == ["alembic_version", "idempotency_keys", "tasks", "user"]
    finally:
        engine.dispose()


def _waiting_on_locks(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
            ).scalar_one()
        )
