"""`Database.run`: blocking handlers on the event loop, a bounded set of reused sessions.

Each guard here has a test that fails without it: the loop keeps serving while a query runs,
a busy database is a bounded wait then the pool-timeout error, a session is never lost or
left holding a connection or another request's objects, and log lines keep the request's
context.
"""

import asyncio
import json
import threading
import time

import psycopg2
import pytest
import structlog
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlmodel import Session, select

from backend.features.task_model import Task
from backend.platform.db import Database, build_engine
from backend.platform.db.greenlet_bridge import await_from_greenlet
from backend.platform.logging import configure_logging


@pytest.fixture
def serving_engine(settings, direct_database_url):
    """Direct to the database even when the other tests go through a pooler: these tests tell
    the sessions' connections apart by their server's pid and kill them by it, and through a
    pooler that pid names whichever server connection the pooler lent, not the session's own."""
    engine = build_engine(
        settings.model_copy(
            update={"DATABASE_URL": direct_database_url, "DB_POOL_SIZE": 2, "DB_MAX_OVERFLOW": 0}
        ),
        autocommit=True,
    )
    yield engine
    engine.dispose()


def database(engine: Engine, *, sessions: int = 2, timeout: float = 5.0) -> Database:
    return Database(engine, sessions=sessions, checkout_timeout=timeout)


def sleep_in_database(session: Session, *, seconds: float) -> float:
    return (
        session.connection().execute(text("SELECT :s FROM pg_sleep(:s)"), {"s": seconds}).one()[0]
    )


def pause_on_the_loop(session: Session, *, seconds: float) -> str:
    """A handler that holds its session while the event loop runs other work."""
    await_from_greenlet(asyncio.sleep(seconds))
    return "done"


def test_the_event_loop_keeps_serving_while_a_query_waits(serving_engine):
    """A query's wait yields to the loop: a ticker keeps ticking during a 0.5 s pg_sleep.
    A wait callback that blocked (the thread path, used on the loop) would freeze it."""
    db = database(serving_engine)

    async def scenario():
        ticks = []

        async def ticker():
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.02)

        ticking = asyncio.create_task(ticker())
        started = time.monotonic()
        await db.run(sleep_in_database, seconds=0.5)
        ticking.cancel()
        return started, ticks

    started, ticks = asyncio.run(scenario())
    during = [t for t in ticks if started + 0.05 < t < started + 0.45]
    assert len(during) >= 10, f"the loop ticked {len(during)} times during the query"


def test_new_connections_are_opened_off_the_event_loop(serving_engine, monkeypatch):
    """libpq resolves host names with a blocking call: a connection is opened in a worker
    thread, never on the loop's."""
    db = database(serving_engine)
    asyncio.run(db.run(sleep_in_database, seconds=0))
    db.close()
    serving_engine.dispose()  # the next request needs a new connection
    opened_on = []
    original = psycopg2.connect

    def recording_connect(*args, **kwargs):
        opened_on.append(threading.get_ident())
        return original(*args, **kwargs)

    monkeypatch.setattr(psycopg2, "connect", recording_connect)

    async def scenario():
        await db.run(sleep_in_database, seconds=0)
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert len(opened_on) == 1
    assert opened_on[0] != loop_thread


def test_queries_of_concurrent_requests_overlap(serving_engine):
    db = database(serving_engine, sessions=2)

    async def scenario():
        started = time.monotonic()
        await asyncio.gather(*(db.run(sleep_in_database, seconds=0.4) for _ in range(2)))
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 0.75


def test_the_event_loop_turns_once_before_a_handler_runs(serving_engine):
    """What is ready on the loop (another request's step, a socket to read) runs between a
    request's way in and its database work, not after it."""
    db = database(serving_engine)
    order: list[str] = []

    def handler(session: Session) -> None:
        order.append("handler")

    async def scenario() -> None:
        await db.run(handler)  # the first connection is made; now measure a request alone
        order.clear()
        asyncio.get_running_loop().call_soon(order.append, "ready before")
        await db.run(handler)

    asyncio.run(scenario())
    assert order == ["ready before", "handler"]


def test_a_request_finding_every_session_busy_waits_its_turn(serving_engine):
    db = database(serving_engine, sessions=1)

    async def scenario():
        return await asyncio.gather(
            db.run(pause_on_the_loop, seconds=0.2), db.run(sleep_in_database, seconds=0)
        )

    assert asyncio.run(scenario()) == ["done", 0]


def test_waiting_longer_than_the_pool_timeout_is_the_pool_timeout_error(serving_engine):
    """The error that the API answers with 503; and the session that was busy is not lost:
    once it is free, the next request gets it."""
    db = database(serving_engine, sessions=1, timeout=0.2)

    async def scenario():
        holder = asyncio.create_task(db.run(pause_on_the_loop, seconds=0.6))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(PoolTimeoutError):
            await db.run(sleep_in_database, seconds=0)
        waited = time.monotonic() - started
        await holder
        return waited, await db.run(sleep_in_database, seconds=0)

    waited, after = asyncio.run(scenario())
    assert 0.15 < waited < 0.5
    assert after == 0


def test_a_cancelled_waiter_does_not_swallow_the_session(serving_engine):
    db = database(serving_engine, sessions=1)

    async def scenario():
        holder = asyncio.create_task(db.run(pause_on_the_loop, seconds=0.2))
        await asyncio.sleep(0.05)
        waiter = asyncio.create_task(db.run(sleep_in_database, seconds=0))
        await asyncio.sleep(0.05)
        waiter.cancel()
        await holder
        return await asyncio.wait_for(db.run(sleep_in_database, seconds=0), 2)

    assert asyncio.run(scenario()) == 0


def test_never_more_sessions_than_the_pool_has_connections(serving_engine):
    """Six requests at once on a pool of two: never more than two connections out, so no
    greenlet ever blocks the loop on the pool."""
    db = database(serving_engine, sessions=2)
    most = []

    def observe(session: Session) -> None:
        session.connection().execute(text("SELECT 1"))
        most.append(serving_engine.pool.checkedout())  # type: ignore[attr-defined]
        await_from_greenlet(asyncio.sleep(0.05))

    async def scenario():
        await asyncio.gather(*(db.run(observe) for _ in range(6)))

    asyncio.run(scenario())
    assert len(most) == 6
    assert max(most) == 2


def test_a_handler_failing_mid_transaction_leaves_no_transaction_behind(serving_engine):
    db = database(serving_engine, sessions=1)

    def fail_after_a_statement(session: Session) -> None:
        session.connection().execute(text("SELECT 1"))
        raise RuntimeError("bug after the statement")

    def in_transaction(session: Session) -> bool:
        return session.in_transaction()

    async def scenario():
        with pytest.raises(RuntimeError):
            await db.run(fail_after_a_statement)
        return await db.run(in_transaction)

    assert asyncio.run(scenario()) is False


def backend_pid(session: Session) -> int:
    return session.connection().execute(text("SELECT pg_backend_pid()")).scalar_one()


def test_a_session_keeps_its_connection_from_request_to_request(serving_engine):
    db = database(serving_engine, sessions=1)

    async def scenario():
        return [await db.run(backend_pid) for _ in range(3)]

    first, *rest = asyncio.run(scenario())
    assert rest == [first, first]
    assert serving_engine.pool.checkedout() == 1  # type: ignore[attr-defined]


def test_a_connection_past_its_age_is_replaced(serving_engine):
    db = Database(serving_engine, sessions=1, checkout_timeout=5, recycle_seconds=0.2)

    async def scenario():
        pids = [await db.run(backend_pid), await db.run(backend_pid)]
        await asyncio.sleep(0.3)
        return [*pids, await db.run(backend_pid)]

    first, again, later = asyncio.run(scenario())
    assert again == first
    assert later != first


def test_a_connection_broken_by_an_error_is_replaced_for_the_next_request(serving_engine):
    db = database(serving_engine, sessions=1)

    def kill_own_backend(session: Session) -> None:
        session.connection().execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

    async def scenario():
        before = await db.run(backend_pid)
        with pytest.raises(OperationalError):
            await db.run(kill_own_backend)
        return before, await db.run(backend_pid)

    before, after = asyncio.run(scenario())
    assert after != before


def test_a_reused_session_carries_nothing_from_the_previous_request(serving_engine, committed_user):
    """Sessions are reused across requests (and users): what one request loaded through the
    ORM is gone from the session before the next one starts, even while still referenced."""
    with serving_engine.connect() as connection:
        connection.execute(
            text("INSERT INTO tasks (user_id, title) VALUES (:u, 'loaded')"), {"u": committed_user}
        )
    db = database(serving_engine, sessions=1)

    def load(session: Session) -> Task:
        (task,) = session.exec(select(Task).where(Task.user_id == committed_user))
        return task

    def what_the_session_holds(session: Session) -> tuple[int, int]:
        return len(session.identity_map), len(session.new)

    async def scenario():
        still_referenced = await db.run(load)  # as a response being sent would be
        return still_referenced, await db.run(what_the_session_holds)

    loaded, held = asyncio.run(scenario())
    assert loaded.title == "loaded"
    assert held == (0, 0)


def test_a_session_handed_to_a_waiter_cancelled_that_instant_is_not_lost(serving_engine):
    """The race between a hand-over and a timeout or cancellation of the waiting request."""
    db = database(serving_engine, sessions=1)

    async def scenario():
        only = await db._checkout()
        waiting = asyncio.create_task(db._checkout())
        await asyncio.sleep(0)
        db._checkin(only)  # the waiter's future now holds the session...
        waiting.cancel()  # ...but its request is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await waiting
        return await asyncio.wait_for(db.run(sleep_in_database, seconds=0), 2)

    assert asyncio.run(scenario()) == 0


def test_log_lines_inside_a_handler_keep_the_request_context(serving_engine, settings, capsys):
    configure_logging(settings)
    db = database(serving_engine)

    def log_inside(session: Session) -> None:
        structlog.get_logger("test").info("inside.handler")

    async def scenario():
        structlog.contextvars.bind_contextvars(request_id="req-42")
        try:
            await db.run(log_inside)
        finally:
            structlog.contextvars.clear_contextvars()

    capsys.readouterr()
    asyncio.run(scenario())
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    (line,) = [x for x in lines if x["event"] == "inside.handler"]
    assert line["request_id"] == "req-42"


@pytest.fixture(params=["autocommit", "transactional"])
def any_engine(request, settings):
    """The serving engine (each statement commits itself) and a transactional one: `Database`
    must store a handler's writes on either."""
    engine = build_engine(
        settings.model_copy(update={"DB_POOL_SIZE": 1, "DB_MAX_OVERFLOW": 0}),
        autocommit=request.param == "autocommit",
    )
    yield engine
    engine.dispose()


def insert_task(session: Session, *, user_id: str, title: str) -> None:
    session.connection().execute(
        text("INSERT INTO tasks (user_id, title) VALUES (:u, :t)"), {"u": user_id, "t": title}
    )


def titles_of(engine: Engine, user_id: str) -> list[str]:
    """What another connection sees: only what was committed."""
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT title FROM tasks WHERE user_id = :u ORDER BY id"), {"u": user_id}
        )
        return [title for (title,) in rows]


def test_what_a_handler_writes_is_committed_when_it_returns(any_engine, committed_user):
    """Handlers never commit; `Database` does, once the handler has returned."""
    db = database(any_engine, sessions=1)

    async def scenario():
        await db.run(insert_task, user_id=committed_user, title="kept")
        await db.run(backend_pid)  # the session serves the next request as usual
        db.close()

    asyncio.run(scenario())
    assert titles_of(any_engine, committed_user) == ["kept"]


def test_objects_a_handler_adds_are_written_when_it_returns(any_engine, committed_user):
    """An ORM write is only flushed by a commit; on the serving engine too, whose statements
    otherwise need none."""
    db = database(any_engine, sessions=1)

    def add_task(session: Session) -> None:
        session.add(Task(user_id=committed_user, title="added"))

    async def scenario():
        await db.run(add_task)
        db.close()

    asyncio.run(scenario())
    assert titles_of(any_engine, committed_user) == ["added"]


def test_what_a_failing_handler_wrote_is_rolled_back_not_committed_by_the_next(
    settings, committed_user
):
    """On a transactional engine, a handler that raises leaves nothing behind, even when the
    next request on the same session commits (on the serving engine each statement is stored
    as it runs, which is why a handler sends only one)."""
    engine = build_engine(settings.model_copy(update={"DB_POOL_SIZE": 1, "DB_MAX_OVERFLOW": 0}))
    db = database(engine, sessions=1)

    def insert_then_fail(session: Session) -> None:
        insert_task(session, user_id=committed_user, title="lost")
        raise RuntimeError("bug after the statement")

    async def scenario():
        with pytest.raises(RuntimeError):
            await db.run(insert_then_fail)
        await db.run(insert_task, user_id=committed_user, title="next")
        db.close()

    try:
        asyncio.run(scenario())
        assert titles_of(engine, committed_user) == ["next"]
    finally:
        engine.dispose()


def test_the_service_opens_its_pool_at_start_up(settings):
    """The first requests after a start find their connections open."""
    from backend.main import create_app

    app = create_app(settings.model_copy(update={"DB_POOL_SIZE": 3}))

    async def scenario():
        async with app.router.lifespan_context(app):
            return app.state.engine.pool.checkedout(), len(app.state.database._idle)

    assert asyncio.run(scenario()) == (3, 3)


def test_connections_opened_together_are_not_all_replaced_together(settings):
    """Each lives 80% to 100% of DB_POOL_RECYCLE_SECONDS (here 10,000 s), at random: four
    opened at once would otherwise expire within the second it took to open them."""
    engine = build_engine(settings.model_copy(update={"DB_POOL_SIZE": 4}), autocommit=True)
    db = Database(engine, sessions=4, checkout_timeout=5, recycle_seconds=10_000)
    before = time.monotonic()
    try:
        assert db.open_connections(4) == 4
        after = time.monotonic()
        expiries = [slot.expires_at for slot in db._idle]
        assert all(before + 8_000 <= expiry <= after + 10_000 for expiry in expiries)
        assert max(expiries) - min(expiries) > after - before + 1
    finally:
        db.close()
        engine.dispose()


def test_a_connection_not_opened_at_start_up_is_opened_on_demand(serving_engine, monkeypatch):
    """Start-up goes on when the database refuses a connection, and the session that could
    not get one is not lost: a request opens it later."""
    real_connect = serving_engine.connect
    refusals = [OperationalError("connect", {}, Exception("refused"))]

    def connect_refusing_once():
        if refusals:
            raise refusals.pop()
        return real_connect()

    monkeypatch.setattr(serving_engine, "connect", connect_refusing_once)
    db = database(serving_engine, sessions=2)
    assert db.open_connections(2) == 1

    def pid_after_a_pause(session: Session) -> int:
        await_from_greenlet(asyncio.sleep(0.05))
        return backend_pid(session)

    async def scenario():
        return await asyncio.gather(db.run(pid_after_a_pause), db.run(pid_after_a_pause))

    try:
        assert len(set(asyncio.run(scenario()))) == 2  # two sessions, at once
    finally:
        db.close()


def test_a_connection_killed_while_idle_is_replaced_cleanly(serving_engine, settings, capsys):
    """Between requests the session's transaction is left open on its connection (see
    `Database._commit`); a connection the server closed meanwhile is still discarded cleanly
    and replaced, and the request on it succeeds."""
    configure_logging(settings)
    db = database(serving_engine, sessions=1)

    async def scenario():
        before = await db.run(backend_pid)
        with serving_engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": before})
        await asyncio.sleep(0.2)  # the server's goodbye reaches the idle socket
        after = await db.run(backend_pid)
        db.close()
        return before, after

    capsys.readouterr()
    before, after = asyncio.run(scenario())
    events = [json.loads(x)["event"] for x in capsys.readouterr().out.splitlines() if x[:1] == "{"]
    assert after != before
    assert "db.connection_discarded" in events
    assert "db.connection_close_failed" not in events
