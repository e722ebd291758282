"""The engine: psycopg2, the pool, and the hygiene that keeps it fit."""

import asyncio
import functools
import time
from typing import Any

import psycopg2
import psycopg2.extensions
import structlog
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.exc import DisconnectionError
from sqlmodel import Session, create_engine

from backend.platform.config import Settings
from backend.platform.db.deadline import socket_has_data, wait_with_deadline
from backend.platform.db.greenlet_bridge import await_from_greenlet, in_greenlet

log = structlog.get_logger("backend.db")


def build_engine(settings: Settings, *, autocommit: bool = False) -> Engine:
    """A psycopg2 pool sized and timed from settings, safe against connections dropped idle.

    `autocommit=True` is the serving app's engine (`create_app` builds it so). Every handler
    sends exactly one statement, which PostgreSQL runs atomically on its own; in psycopg2's
    default mode the same request costs three round trips (BEGIN, the statement, COMMIT).
    Anything that needs a transaction of several statements (DDL, tests) takes a connection
    from a transactional engine, or `transactional(connection)`.

    Neon suspends idle computes and a restarted server kills its backends; in both cases the
    server closes the socket of every idle pooled connection. Rather than a `SELECT 1` on each
    checkout (pool_pre_ping: a round trip per request), a zero-timeout poll of the socket tells
    whether the server has hung up or sent its "terminating connection" notice: an idle
    connection has nothing to read unless it is dead. Such a connection is discarded and the
    pool hands out another. Connections older than DB_POOL_RECYCLE_SECONDS are replaced too,
    below the 300 s after which Neon's proxy may drop them.

    No wait on the database is unbounded, even when the network goes silent rather than
    failing (see `wait_with_deadline`): opening a connection gets DB_CONNECT_TIMEOUT_SECONDS,
    any other round trip the statement timeout plus that much again.

    The connections carry no session state, so that they work through a pooler in transaction
    mode (Neon's pooled endpoint), where a session `SET` would land on whichever server
    connection is free, stay there for the pooler's other clients, and miss the next statement.
    The statement timeout travels with each statement instead (`_limited_cursor_class`), and
    timestamps are made UTC by the code that reads them, not by the session's TimeZone.
    """
    psycopg2.extensions.set_wait_callback(wait_with_deadline)
    engine = create_engine(
        settings.sqlalchemy_url,
        pool_size=settings.DB_POOL_SIZE,
        max_overflow=settings.DB_MAX_OVERFLOW,
        pool_timeout=settings.DB_POOL_TIMEOUT_SECONDS,
        pool_recycle=settings.DB_POOL_RECYCLE_SECONDS,
        pool_pre_ping=False,
        # In autocommit no connection comes back inside a transaction, so the rollback SQLAlchemy
        # would run on every return has nothing to undo.
        pool_reset_on_return=None if autocommit else "rollback",
        isolation_level="AUTOCOMMIT" if autocommit else None,
        connect_args={
            "connection_factory": connection_class(
                connect_timeout=settings.DB_CONNECT_TIMEOUT_SECONDS,
                network_timeout=settings.DB_STATEMENT_TIMEOUT_MS / 1000
                + settings.DB_CONNECT_TIMEOUT_SECONDS,
                statement_prefix=statement_limits(
                    settings.DB_STATEMENT_TIMEOUT_MS, transactional=not autocommit
                ),
            ),
            "connect_timeout": settings.DB_CONNECT_TIMEOUT_SECONDS,
            "application_name": "todo-api",
            # Dead peers are noticed by TCP within seconds instead of the kernel's two hours.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        },
    )

    @event.listens_for(engine, "do_connect")
    def _connect_off_the_event_loop(
        dialect: Any, _record: Any, cargs: tuple[Any, ...], cparams: dict[str, Any]
    ) -> Any:
        if not in_greenlet():
            return None  # SQLAlchemy connects as usual, in this thread
        # Inside `Database.run`, on the event loop: libpq resolves the host name with a
        # blocking getaddrinfo() before any of its non-blocking steps, and a slow resolver
        # (a cold Neon host name, say) would hold every request. So the whole connect runs in
        # a worker thread, under the same connect deadline; new connections are rare.
        loop = asyncio.get_running_loop()
        connect = functools.partial(dialect.loaded_dbapi.connect, *cargs, **cparams)
        return await_from_greenlet(loop.run_in_executor(None, connect))

    @event.listens_for(engine, "connect")
    def _note_opened(_dbapi_connection: Any, _record: Any) -> None:
        _record.info["just_opened"] = True
        _record.info["opened_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _discard_if_hung_up(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if record.info.pop("just_opened", False):
            # Opened this instant (possibly as the replacement for a dead one): its first
            # statement will tell. Discarding it too would exhaust SQLAlchemy's one retry per
            # checkout and turn a dead database into InvalidRequestError, a 500.
            return
        if dbapi_connection.closed or socket_has_data(dbapi_connection.fileno()):
            log.info("db.connection_discarded", reason="closed by server while idle")
            raise DisconnectionError("connection closed by the server while idle")

    return engine


def statement_limits(statement_timeout_ms: int, *, transactional: bool) -> str:
    """What each statement is prefixed with: its limits, as `SET LOCAL`s in the same query string.

    psycopg2 sends a statement as one simple-protocol query; PostgreSQL runs a query string of
    several statements as one implicit transaction (or inside the open one), in which SET LOCAL
    holds until it ends, and answers with the last statement's result (rows, rowcount,
    RETURNING as before). So the timeout reaches the server connection that runs the statement,
    whichever one a pooler picked, and is gone when the transaction ends: still one round
    trip, nothing left on the connection. (Startup `options` would do it once per connection,
    but Neon's pooler refuses them, and a session SET leaks as said in `build_engine`.)
    A transactional engine's connections also bound how long a transaction may sit idle, so
    that one left open cannot hold its locks and its pooled server connection for long.
    """
    limits = f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}; "
    if transactional:
        limits += "SET LOCAL idle_in_transaction_session_timeout = 60000; "
    return limits


def connection_class(
    *, connect_timeout: float, network_timeout: float | None, statement_prefix: str
) -> type:
    """A psycopg2 connection class carrying this engine's deadlines for the wait callback, whose
    cursors send each statement with its limits."""
    cursor_class = _limited_cursor_class(statement_prefix)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807 - a method
        psycopg2.extensions.connection.__init__(self, *args, **kwargs)
        self.cursor_factory = cursor_class
        # The names this connection has PREPAREd (`backend.platform.db.statements`).
        self.prepared_statements = set()

    return type(
        "DeadlineConnection",
        (psycopg2.extensions.connection,),
        {
            "__init__": __init__,
            "connect_timeout": connect_timeout,
            "network_timeout": network_timeout,
        },
    )


def _limited_cursor_class(prefix: str) -> type:
    """A cursor that sends `prefix` (`statement_limits`) in front of each statement: a string
    concatenation per statement. Not in front of ROLLBACK (TO SAVEPOINT), which must run in a
    transaction that an error has aborted, where any other statement is refused; nor in a
    named (server-side) cursor, whose statement psycopg2 wraps in DECLARE."""
    execute = psycopg2.extensions.cursor.execute
    executemany = psycopg2.extensions.cursor.executemany

    def limited_execute(self: Any, query: Any, vars: Any = None) -> Any:  # noqa: A002
        if query.__class__ is str and not query.startswith("ROLLBACK") and self.name is None:
            query = prefix + query
        return execute(self, query, vars)

    def limited_executemany(self: Any, query: Any, vars_list: Any) -> Any:
        if query.__class__ is str:
            query = prefix + query
        return executemany(self, query, vars_list)

    return type(
        "LimitedCursor",
        (psycopg2.extensions.cursor,),
        {"execute": limited_execute, "executemany": limited_executemany},
    )


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def transactional(connection: Connection) -> Connection:
    """The connection in PostgreSQL's default transaction mode, whatever its engine's."""
    return connection.execution_options(isolation_level="READ COMMITTED")


def close_pool(engine: Engine) -> None:
    """At shutdown, once the last in-flight request has finished: close every connection, so
    the server is not left holding backends until its timeouts reap them."""
    status = engine.pool.status()
    engine.dispose()
    log.info("db.pool_closed", pool=status)


def database_answers(session: Session) -> bool:
    try:
        session.connection().execute(text("SELECT 1"))
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means "not healthy"; it is logged
        log.warning("db.health_check_failed", error=type(exc).__name__)
        return False
