"""Through a pooler in transaction mode (Neon's pooled endpoint is PgBouncer so): each statement
keeps its time limit whichever server connection runs it, the service leaves no setting behind
for the pooler's other clients, and what it gives up on is cancelled, not applied later.

PgBouncer is Debian's, started here (tests/pgbouncer.py), recycling its server connections
every second or two as managed poolers do."""

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psycopg2
import psycopg2.extensions
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DataError

from backend.main import create_app
from backend.platform.config import Settings
from backend.platform.db import build_engine
from backend.platform.db.deadline import wait_with_deadline
from backend.platform.db.engine import connection_class
from backend.platform.db.greenlet_bridge import run_in_greenlet
from tests.live_server import serve
from tests.pgbouncer import pgbouncer

LIMITS = ("statement_timeout", "idle_in_transaction_session_timeout", "TimeZone")


@pytest.fixture(scope="module")
def recycling_pooler(direct_database_url: str) -> Iterator[str]:
    """The test database through a PgBouncer that closes a server connection idle for 1 s."""
    with pgbouncer(direct_database_url, server_lifetime=2, server_idle_timeout=1) as url:
        yield url


@pytest.fixture(scope="module")
def direct_engine(settings: Settings, direct_database_url: str) -> Iterator[Engine]:
    """For what the test itself does to the database (locks, checks): never through a pooler."""
    engine = build_engine(settings.model_copy(update={"DATABASE_URL": direct_database_url}))
    yield engine
    engine.dispose()


@pytest.fixture
def task_of(committed_user: str, direct_engine: Engine) -> Callable[[str], int]:
    """task_of(title): a task of `committed_user`, committed, its id."""

    def make(title: str) -> int:
        with direct_engine.begin() as connection:
            return int(
                connection.execute(
                    text("INSERT INTO tasks (user_id, title) VALUES (:user, :title) RETURNING id"),
                    {"user": committed_user, "title": title},
                ).scalar_one()
            )

    return make


def title_of(engine: Engine, task_id: int) -> str:
    with engine.connect() as connection:
        return str(
            connection.execute(
                text("SELECT title FROM tasks WHERE id = :id"), {"id": task_id}
            ).scalar_one()
        )


def test_the_statement_timeout_holds_through_a_pooler_that_recycles_its_connections(
    settings: Settings,
    recycling_pooler: str,
    direct_engine: Engine,
    committed_user: str,
    task_of: Callable[[str], int],
    make_token: Callable[..., str],
) -> None:
    """A rename waiting on a row lock is a 503 after the statement timeout (1 s), not after the
    network deadline (3 s) or never, on fresh server connections as on reused ones; and once
    the lock is released the row is as it was."""
    service_settings = settings.model_copy(
        update={
            "DATABASE_URL": recycling_pooler,
            "DB_STATEMENT_TIMEOUT_MS": 1000,
            "DB_CONNECT_TIMEOUT_SECONDS": 2,
            "DB_POOL_SIZE": 2,
        }
    )
    task_id = task_of("as it was")
    headers = {"Authorization": f"Bearer {make_token(committed_user)}"}
    base = f"/api/{committed_user}/tasks/{task_id}"
    waits = []
    with (
        serve(create_app(service_settings)) as url,
        httpx.Client(base_url=url, headers=headers, timeout=30) as client,
    ):
        for pause in (0, 2.5):  # then again once the pooler has replaced its server connections
            time.sleep(pause)
            with direct_engine.connect() as blocker, blocker.begin():
                blocker.execute(
                    text("SELECT 1 FROM tasks WHERE id = :id FOR UPDATE"), {"id": task_id}
                )
                started = time.monotonic()
                response = client.patch(base, json={"title": f"renamed after {pause} s"})
                waits.append(time.monotonic() - started)
            assert response.status_code == 503, response.text
            assert response.json()["detail"] and response.headers["retry-after"]
            time.sleep(0.3)  # a write still waiting on the lock would land now
            assert title_of(direct_engine, task_id) == "as it was"
        assert all(0.9 < waited < 2.0 for waited in waits), waits
        assert client.patch(base, json={"title": "renamed"}).json()["title"] == "renamed"


def test_the_service_leaves_no_setting_on_the_poolers_server_connections(
    settings: Settings,
    direct_database_url: str,
    direct_engine: Engine,
    committed_user: str,
    make_token: Callable[..., str],
) -> None:
    """Better Auth's server and anything else behind the same pooler (and role) keep the
    server's defaults after the service has served requests on every server connection."""
    plain = psycopg2.connect(direct_database_url)  # the server's defaults, as a client finds them
    try:
        with plain.cursor() as cursor:
            defaults = []
            for name in LIMITS:
                cursor.execute(f"SHOW {name}")
                defaults.append(cursor.fetchone()[0])
    finally:
        plain.close()
    # No recycling here: a setting left behind would stay for the next client to find.
    with pgbouncer(
        direct_database_url, server_lifetime=3600, server_idle_timeout=3600, pool_size=4
    ) as pooled:
        service_settings = settings.model_copy(
            update={"DATABASE_URL": pooled, "DB_STATEMENT_TIMEOUT_MS": 1234, "DB_POOL_SIZE": 4}
        )
        headers = {"Authorization": f"Bearer {make_token(committed_user)}"}
        with (
            serve(create_app(service_settings)) as url,
            httpx.Client(base_url=url, headers=headers, timeout=30) as client,
        ):
            base = f"/api/{committed_user}/tasks"
            for i in range(12):
                created = client.post(base, json={"title": f"served {i}"})
                assert created.status_code == 201
                assert client.get(f"{base}/{created.json()['id']}").status_code == 200
            # Four transactions at once hold the pooler's four server connections, one each.
            others = [psycopg2.connect(pooled) for _ in range(4)]
            try:
                seen = []
                for other in others:
                    with other.cursor() as cursor:
                        for name in LIMITS:
                            cursor.execute(f"SHOW {name}")
                            seen.append((name, cursor.fetchone()[0]))
                    assert (
                        other.get_transaction_status()
                        == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
                    )
            finally:
                for other in others:
                    other.close()
    assert seen == list(zip(LIMITS, defaults, strict=True)) * 4


@pytest.mark.parametrize("waiting_in", ["a thread", "the event loop"])
@pytest.mark.parametrize("route", ["direct", "pooled"])
def test_a_statement_given_up_at_the_network_deadline_is_cancelled_not_applied_later(
    route: str,
    waiting_in: str,
    direct_database_url: str,
    recycling_pooler: str,
    direct_engine: Engine,
    task_of: Callable[[str], int],
) -> None:
    """When the wait for an answer passes its deadline (which the service answers with a 503),
    the statement is cancelled on the server before the connection is closed: closing alone
    would leave it waiting on its lock, to be applied once the lock is released."""
    task_id = task_of("as it was")
    psycopg2.extensions.set_wait_callback(wait_with_deadline)  # as build_engine sets it
    deadlined = connection_class(connect_timeout=2, network_timeout=0.5, statement_prefix="")
    url = direct_database_url if route == "direct" else recycling_pooler
    connection = psycopg2.connect(url, connection_factory=deadlined)
    connection.autocommit = True

    def rename() -> None:
        with connection.cursor() as cursor:
            cursor.execute("UPDATE tasks SET title = 'applied late' WHERE id = %s", (task_id,))

    try:
        with direct_engine.connect() as blocker, blocker.begin():
            blocker.execute(text("SELECT 1 FROM tasks WHERE id = :id FOR UPDATE"), {"id": task_id})
            started = time.monotonic()
            with pytest.raises(psycopg2.OperationalError, match="timed out after 0.5 s"):
                if waiting_in == "a thread":
                    rename()
                else:
                    asyncio.run(_in_greenlet(rename))
            assert time.monotonic() - started < 2.5
            assert connection.closed
            _wait_until_not_running(direct_engine, "applied late")
        time.sleep(0.3)
        assert title_of(direct_engine, task_id) == "as it was"
    finally:
        connection.close()


async def _in_greenlet(function: Callable[[], Any]) -> Any:
    """Run `function` as `Database.run` runs a handler: its waits go through the event loop."""
    return await run_in_greenlet(function)


def _wait_until_not_running(engine: Engine, marker: str) -> None:
    deadline = time.monotonic() + 3
    while True:
        with engine.connect() as connection:
            running = connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                    "AND query LIKE :marker AND pid <> pg_backend_pid()"
                ),
                {"marker": f"%{marker}%"},
            ).scalar_one()
        if running == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the statement given up on still runs on the server ({marker})")
        time.sleep(0.05)


def test_a_statement_queued_in_the_pooler_and_given_up_is_never_run(
    direct_database_url: str, direct_engine: Engine, task_of: Callable[[str], int]
) -> None:
    """A pooler whose server connections are all taken queues the statement, where no
    statement timeout runs; the service gives up at the network deadline, and the statement
    must not be run once a server connection frees up."""
    task_id = task_of("as it was")
    psycopg2.extensions.set_wait_callback(wait_with_deadline)
    deadlined = connection_class(connect_timeout=2, network_timeout=0.5, statement_prefix="")
    with pgbouncer(direct_database_url, pool_size=1) as pooled:
        holder = psycopg2.connect(pooled)  # takes the only server connection, in a transaction
        connection = psycopg2.connect(pooled, connection_factory=deadlined)
        connection.autocommit = True
        try:
            with holder.cursor() as cursor:
                cursor.execute("SELECT 1")
            with (
                pytest.raises(psycopg2.OperationalError, match="timed out after 0.5 s"),
                connection.cursor() as cursor,
            ):
                cursor.execute("UPDATE tasks SET title = 'run late' WHERE id = %s", (task_id,))
            holder.rollback()  # the server connection is free for whatever was queued
            with holder.cursor() as cursor:
                cursor.execute("SELECT 1")  # a round trip through the pooler after it
            holder.rollback()
        finally:
            holder.close()
            connection.close()
    assert title_of(direct_engine, task_id) == "as it was"


def test_statements_the_limits_must_not_precede_still_work(
    settings: Settings, direct_database_url: str
) -> None:
    """Rolling back to a savepoint after an error (where any other statement is refused) and a
    named cursor's statement (which psycopg2 wraps in DECLARE) are sent without the limits,
    and work; everything else carries them, the transaction's settings included."""
    engine = build_engine(
        settings.model_copy(
            update={"DATABASE_URL": direct_database_url, "DB_STATEMENT_TIMEOUT_MS": 4321}
        )
    )
    try:
        with engine.connect() as connection, connection.begin():
            savepoint = connection.begin_nested()
            with pytest.raises(DataError, match="division by zero"):
                connection.execute(text("SELECT 1 / 0"))
            savepoint.rollback()
            assert connection.execute(text("SHOW statement_timeout")).scalar_one() == "4321ms"
            dbapi_connection = connection.connection.dbapi_connection
            with dbapi_connection.cursor(name="server_side") as cursor:
                cursor.execute("SELECT generate_series(1, 3)")
                assert cursor.fetchall() == [(1,), (2,), (3,)]
    finally:
        engine.dispose()
