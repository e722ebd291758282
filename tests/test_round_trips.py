"""What a request costs the database, counted at the driver: each query string the serving
engine's psycopg2 connections send is one simple query, one round trip. The serving app's
engine is in autocommit mode, so each task operation is exactly one statement and one round
trip (no BEGIN, no COMMIT), sent the way production sends it: prepared once per server
connection and run by name (`backend.platform.db.statements`), with the statement timeout's
`SET LOCAL` in the same query string.

Nothing here listens to SQLAlchemy's statement events: a listener sends the statements through
SQLAlchemy's `Connection.execute` instead (as tracing does), which is not what is measured."""

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
from fastapi.testclient import TestClient
from psycopg2 import errorcodes
from sqlalchemy import Engine, event, text

from backend.main import create_app
from backend.platform.config import Settings
from backend.platform.db import build_engine
from backend.platform.db.engine import statement_limits

# After the limits: `[DEALLOCATE name; ]PREPARE name(types) AS <statement>; EXECUTE name(...)`
# (prepared there and then), or `EXECUTE name(...)` alone (prepared by an earlier one).
_PREPARE = re.compile(r"(?:DEALLOCATE \w+; )?PREPARE (\w+)\b.*? AS (\w+)\b.*; EXECUTE \1\b", re.S)
_EXECUTE = re.compile(r"EXECUTE (\w+)\b")
# What a server connection behind a pooler may refuse before running anything, the statement
# then being sent again the other way: it lacks the statement, or has it already.
_POOLER_REFUSALS = frozenset(
    {errorcodes.INVALID_SQL_STATEMENT_NAME, errorcodes.DUPLICATE_PREPARED_STATEMENT}
)


@dataclass(frozen=True)
class RoundTrip:
    verb: str  # the first word of the statement run (of the prepared one, for an EXECUTE)
    autocommit: bool  # the connection's mode when it was sent
    by_name: bool  # run as EXECUTE of a prepared statement (after its PREPARE, or alone)
    prepared_before: bool  # a bare EXECUTE: prepared by an earlier round trip
    limited: bool  # the statement timeout's SET LOCAL leads the same query string
    error: str | None  # the SQLSTATE of the error the server answered with, if any
    query: str

    @property
    def refused(self) -> bool:
        """Refused before anything ran, for what the server connection knew: a pooler's."""
        return self.error in _POOLER_REFUSALS


class Wire:
    """What the serving engine's connections send PostgreSQL, recorded by their cursors."""

    def __init__(self, limits: str, *, pooled: bool) -> None:
        self.limits, self.pooled = limits, pooled
        self.sent: list[RoundTrip] = []
        # Prepared statement name -> its statement's first word, from the PREPAREs seen (a
        # name is a hash of the statement, so the same on every connection).
        self.verbs: dict[str, str] = {}

    def clear(self) -> None:
        self.sent.clear()

    def record(self, query: Any, autocommit: bool, error: str | None) -> None:
        if isinstance(query, bytes):
            query = query.decode()
        limited = query.startswith(self.limits)
        statement = query[len(self.limits) :] if limited else query
        prepare, execute = _PREPARE.match(statement), _EXECUTE.match(statement)
        if prepare is not None:
            self.verbs[prepare.group(1)] = verb = prepare.group(2).upper()
        elif execute is not None:
            verb = self.verbs.get(execute.group(1), "EXECUTE")  # `ran` fails on that
        else:
            verb = statement.split()[0].upper()
        by_name = prepare is not None or execute is not None
        trip = RoundTrip(verb, autocommit, by_name, execute is not None, limited, error, query)
        self.sent.append(trip)

    def ran(self) -> list[RoundTrip]:
        """The round trips that ran a statement since `clear`. Each carried the statement
        timeout in its query string. Behind a pooler, a query that the server connection at
        hand refused for what it knew (it lacked the statement, or had it already) is left
        out: the service sends the statement again, the other way, which it does only when
        its server connection changed under it. On a direct connection, none is refused."""
        for trip in self.sent:
            assert trip.limited, f"sent without the statement timeout: {trip.query}"
            assert trip.verb != "EXECUTE", f"EXECUTE of a name never prepared: {trip.query}"
            if trip.refused:
                assert self.pooled, f"refused ({trip.error}) on a direct connection: {trip.query}"
        return [trip for trip in self.sent if not trip.refused]

    def statements(self) -> list[tuple[str, bool]]:
        """`ran`: each one's verb, and whether it ran in autocommit."""
        return [(trip.verb, trip.autocommit) for trip in self.ran()]

    def by_name(self) -> list[bool]:
        """`ran`: whether each one went the prepared way, as `EXECUTE name(...)` (alone, or
        after its `PREPARE` in the same query string)."""
        return [trip.by_name for trip in self.ran()]

    def cursor_class(self, limited: type) -> type:
        """`limited` (the engine's own cursor class, which adds the limits), recording what
        each of its queries sent: `cursor.query`, the string as it went to the server."""
        wire = self

        def execute(cursor: Any, query: Any, vars: Any = None) -> Any:  # noqa: A002
            autocommit = cursor.connection.autocommit
            try:
                result = limited.execute(cursor, query, vars)
            except psycopg2.Error as exc:
                wire.record(cursor.query, autocommit, exc.pgcode)
                raise
            wire.record(cursor.query, autocommit, None)
            return result

        def executemany(cursor: Any, query: Any, vars_list: Any) -> Any:
            autocommit = cursor.connection.autocommit
            vars_list = list(vars_list)
            try:
                return limited.executemany(cursor, query, vars_list)
            finally:
                for _ in vars_list:  # a query per set of parameters
                    wire.record(wire.limits + query, autocommit, None)

        return type("RecordingCursor", (limited,), {"execute": execute, "executemany": executemany})


@pytest.fixture(scope="module")
def wire(settings: Settings) -> Wire:
    return Wire(
        statement_limits(settings.DB_STATEMENT_TIMEOUT_MS, transactional=False),
        pooled=bool(settings.DATABASE_URL_UNPOOLED),
    )


@pytest.fixture(scope="module")
def serving_engine(settings: Settings, wire: Wire) -> Iterator[Engine]:
    """The serving engine, built as the app builds it, whose connections' cursors record what
    they send on `wire`."""
    engine = build_engine(settings, autocommit=True)
    recording: dict[type, type] = {}

    # A pool event, not a statement one, so the direct path stays on. It runs after
    # SQLAlchemy's own set-up of the new connection, which belongs to no request.
    @event.listens_for(engine, "connect")
    def _record_what_it_sends(dbapi_connection: Any, _connection_record: Any) -> None:
        limited = dbapi_connection.cursor_factory
        assert issubclass(limited, psycopg2.extensions.cursor), limited
        if limited not in recording:
            recording[limited] = wire.cursor_class(limited)
        dbapi_connection.cursor_factory = recording[limited]

    yield engine
    engine.dispose()


@pytest.fixture
def statements(serving_engine: Engine, wire: Wire) -> Iterator[Wire]:
    wire.clear()
    yield wire
    wire.clear()


def test_the_app_builds_its_engine_in_autocommit_mode(settings: Settings) -> None:
    app = create_app(settings)
    try:
        with app.state.engine.connect() as connection:
            assert connection.connection.dbapi_connection.autocommit is True
    finally:
        app.state.engine.dispose()


def test_each_operation_is_one_statement_committed_on_its_own(
    settings: Settings,
    serving_engine: Engine,
    engine: Engine,
    statements: Wire,
    committed_user: str,
    make_token: Any,
) -> None:
    headers = {"Authorization": f"Bearer {make_token(committed_user)}"}
    base = f"/api/{committed_user}/tasks"
    with TestClient(create_app(settings, engine=serving_engine)) as client:

        def call(method: str, path: str, **kwargs: Any) -> Any:
            statements.clear()
            response = client.request(method, base + path, headers=headers, **kwargs)
            assert response.status_code < 300, response.text
            assert statements.by_name() == [True], (method, path)  # prepared, run by name
            return response.json()

        created = call("POST", "", json={"title": "one round trip"})
        assert statements.statements() == [("INSERT", True)]
        with engine.connect() as other:  # committed: another connection sees it
            title = other.execute(
                text("SELECT title FROM tasks WHERE id = :id"), {"id": created["id"]}
            ).scalar_one()
        assert title == "one round trip"

        task = f"/{created['id']}"
        for method, path, body, verb in [
            ("GET", "", None, "SELECT"),
            ("GET", task, None, "SELECT"),
            ("PUT", task, {"title": "renamed"}, "UPDATE"),
            ("PATCH", task, {"description": "d", "completed": True}, "UPDATE"),
            ("PATCH", task, {}, "SELECT"),
            ("PATCH", task + "/complete", None, "UPDATE"),
            ("DELETE", task, None, "DELETE"),
        ]:
            call(method, path, json=body)
            assert statements.statements() == [(verb, True)], (method, path)
        with engine.connect() as other:
            left = other.execute(
                text("SELECT count(*) FROM tasks WHERE id = :id"), {"id": created["id"]}
            ).scalar_one()
        assert left == 0


def test_a_statement_is_prepared_once_then_run_by_name(
    settings: Settings,
    serving_engine: Engine,
    statements: Wire,
    committed_user: str,
    make_token: Any,
) -> None:
    """The same request again on the same connection sends only `EXECUTE name(...)`: the
    statement's text went once, in the PREPARE. (Behind a pooler the server connection may
    have changed in between, and the statement is prepared again there.)"""
    headers = {"Authorization": f"Bearer {make_token(committed_user)}"}
    base = f"/api/{committed_user}/tasks"
    app = create_app(settings.model_copy(update={"DB_POOL_SIZE": 1}), engine=serving_engine)
    with TestClient(app) as client:
        for _ in range(2):
            statements.clear()
            assert client.get(base, headers=headers).status_code == 200
            assert statements.statements() == [("SELECT", True)]
        [again] = statements.ran()
        assert again.by_name, again.query
        if not statements.pooled:
            assert again.prepared_before, again.query  # `EXECUTE name(...)` alone


def test_a_long_list_is_a_statement_per_chunk_each_on_its_own(
    settings: Settings,
    serving_engine: Engine,
    statements: Wire,
    committed_user: str,
    make_token: Any,
) -> None:
    """The statement that finds the list long, its tag, then one per chunk of LIST_CHUNK_ROWS:
    each its own round trip in autocommit, so no connection is held between them."""
    headers = {"Authorization": f"Bearer {make_token(committed_user)}"}
    base = f"/api/{committed_user}/tasks"
    app = create_app(settings.model_copy(update={"LIST_CHUNK_ROWS": 2}), engine=serving_engine)
    with TestClient(app) as client:
        for count, chunks in [(3, 2), (4, 3), (5, 3)]:
            while len(client.get(base, headers=headers).json()) < count:
                client.post(base, json={"title": "t"}, headers=headers)
            statements.clear()
            assert len(client.get(base, headers=headers).json()) == count
            assert statements.statements() == [("SELECT", True)] * (2 + chunks), count
            # All prepared, the tag too (its shift typed so that PostgreSQL can prepare it).
            assert statements.by_name() == [True] * (2 + chunks), count


def test_a_keyed_or_conditional_write_is_still_one_statement(
    settings: Settings,
    serving_engine: Engine,
    statements: Wire,
    committed_user: str,
    make_token: Any,
) -> None:
    """The key is recorded in the write's own statement (a CTE), and If-Match is part of its
    WHERE clause: still one round trip. A replay costs two (the refused write, then reading
    the stored answer); a 412 two (the write that matched nothing, then whether the task is
    there at all). Those happen only to retries and to stale tags."""
    auth = {"Authorization": f"Bearer {make_token(committed_user)}"}
    base = f"/api/{committed_user}/tasks"
    with TestClient(create_app(settings, engine=serving_engine)) as client:

        def call(method: str, path: str, headers: dict[str, str], **kwargs: Any) -> Any:
            statements.clear()
            response = client.request(method, base + path, headers={**auth, **headers}, **kwargs)
            sent = statements.statements()
            assert all(autocommit for _verb, autocommit in sent), (method, path, sent)
            assert all(statements.by_name()), (method, path, statements.sent)
            return response, [verb for verb, _autocommit in sent]

        created, sent = call("POST", "", {"Idempotency-Key": "rt-1"}, json={"title": "t"})
        assert (created.status_code, sent) == (201, ["WITH"])
        task = f"/{created.json()['id']}"
        for method, path, headers, body in [
            ("PUT", task, {"Idempotency-Key": "rt-2", "If-Match": '"1"'}, {"title": "u"}),
            ("PATCH", task, {"If-Match": '"2"'}, {"title": "v"}),
            ("PATCH", task + "/complete", {"Idempotency-Key": "rt-3"}, None),
            ("GET", task, {"If-None-Match": '"4"'}, None),
        ]:
            response, sent = call(method, path, headers, json=body)
            assert response.status_code in (200, 304), (method, path, response.text)
            assert len(sent) == 1, (method, path, sent)
        replay, sent = call("POST", "", {"Idempotency-Key": "rt-1"}, json={"title": "t"})
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert sent == ["WITH", "SELECT"]
        stale, sent = call("PATCH", task, {"If-Match": '"1"'}, json={"title": "w"})
        assert (stale.status_code, sent) == (412, ["UPDATE", "SELECT"])
