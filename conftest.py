"""Fixtures every test uses, slices and cross-cutting alike: a real PostgreSQL database, a
rolled-back session per test, an HTTP client on the app, factories and tokens.

The database: `TEST_DATABASE_URL` when set (any PostgreSQL the URL's user may create databases
on), else an embedded PostgreSQL (pgserver) kept in `.pgdata/test`. Either way each run works in
a throwaway database, created here and dropped at the end. With TEST_DATABASE_POOLER=pgbouncer
the service (and the tests' sessions) reach it through a PgBouncer in transaction mode.
"""

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlmodel import Session

from backend.main import create_app
from backend.platform.config import Settings
from backend.platform.db import build_engine, transactional
from backend.platform.db.migrate import upgrade_to_head
from tests.factories import TaskFactory, UserFactory, bind_factories
from tests.in_test_transaction import serve_in_session, stop_serving_in_session
from tests.live_server import serve
from tests.pgbouncer import pgbouncer
from tests.service_processes import empty_database

ROOT = Path(__file__).resolve().parent
TEST_SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"


def _server_url() -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return url
    import pgserver  # noqa: PLC0415 - only needed without TEST_DATABASE_URL

    logging.getLogger("pgserver").setLevel(logging.WARNING)

    data = ROOT / ".pgdata" / "test"
    data.parent.mkdir(exist_ok=True)
    return str(pgserver.get_server(data, cleanup_mode="stop").get_uri())


@pytest.fixture(scope="session")
def database_url(direct_database_url: str) -> Iterator[str]:
    """The URL the service is given: the test database itself, or, with
    TEST_DATABASE_POOLER=pgbouncer, the same database through a PgBouncer in transaction mode
    that recycles its server connections every few seconds (Neon's pooled endpoint, as far as
    the service can tell). Creating and dropping the database stays direct."""
    pooler = os.environ.get("TEST_DATABASE_POOLER", "")
    if not pooler:
        yield direct_database_url
        return
    if pooler != "pgbouncer":
        raise pytest.UsageError(f"TEST_DATABASE_POOLER={pooler!r}: only 'pgbouncer' is known")
    with pgbouncer(direct_database_url) as url:
        yield url


@pytest.fixture(scope="session")
def direct_database_url() -> Iterator[str]:
    """A throwaway database on the test server, reached directly (never through a pooler)."""
    with empty_database(_server_url(), prefix="todo_test") as url:
        yield url


@pytest.fixture(scope="session")
def settings(database_url: str, direct_database_url: str) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        DATABASE_URL=database_url,
        DATABASE_URL_UNPOOLED="" if database_url == direct_database_url else direct_database_url,
        BETTER_AUTH_SECRET=TEST_SECRET,
        LOG_FORMAT="json",
        LOG_LEVEL="INFO",
    )


@pytest.fixture(scope="session")
def engine(settings: Settings) -> Iterator[Engine]:
    engine = build_engine(settings)
    with transactional(engine.connect()) as connection:
        upgrade_to_head(connection, auth_user_table=settings.AUTH_USER_TABLE)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def app(settings: Settings, engine: Engine) -> FastAPI:
    return create_app(settings, engine=engine)


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    """A session inside an outer transaction that is rolled back after the test: the handlers'
    commits release savepoints, so nothing a test writes survives it."""
    connection = engine.connect()
    outer = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint")
    bind_factories(session)
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        connection.close()


@pytest.fixture
def client(app: FastAPI, session: Session) -> Iterator[TestClient]:
    serve_in_session(app, session)
    try:
        yield TestClient(app)
    finally:
        stop_serving_in_session(app)


# --- tokens -------------------------------------------------------------------------------------


@pytest.fixture
def make_token() -> Callable[..., str]:
    """make_token("alice") or make_token(user, exp=..., secret=..., algorithm=..., **claims)."""

    def make(
        user: Any,
        *,
        secret: str = TEST_SECRET,
        algorithm: str = "HS256",
        ttl: int = 3600,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {"sub": getattr(user, "id", user), "iat": now, "exp": now + ttl}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not ...}  # `sub=...` drops a claim
        return jwt.encode(payload, secret, algorithm=algorithm, headers=headers)

    return make


@pytest.fixture
def auth_headers(make_token: Callable[..., str]) -> Callable[[Any], dict[str, str]]:
    def headers(user: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {make_token(user)}"}

    return headers


# --- data ---------------------------------------------------------------------------------------


@pytest.fixture
def user(session: Session) -> Any:
    return UserFactory()


@pytest.fixture
def other_user(session: Session) -> Any:
    return UserFactory()


@pytest.fixture
def task(user: Any) -> Any:
    return TaskFactory(user_id=user.id)


@pytest.fixture
def api(client: TestClient, user: Any, auth_headers: Callable[[Any], dict[str, str]]) -> Any:
    """The signed-in `user`'s view of the API: api.get("/tasks/1") -> /api/<user.id>/tasks/1."""
    return UserClient(client, user.id, auth_headers(user))


class UserClient:
    def __init__(self, client: TestClient, user_id: str, headers: dict[str, str]) -> None:
        self.client, self.base, self.headers = client, f"/api/{user_id}", headers

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return self.client.request(method, self.base + path, headers=headers, **kwargs)

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> Any:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)


# --- a live server on real, committed sessions (concurrency, commit-before-response) ------------


@pytest.fixture(scope="session")
def live_app(settings: Settings, engine: Engine) -> FastAPI:
    """The app with an engine of its own, as in production: its sessions keep their pooled
    connections between requests, so it must not share a pool with the tests' own queries.
    (`engine` is asked for so that the schema exists first.)"""
    return create_app(settings)


@pytest.fixture(scope="session")
def live_url(live_app: FastAPI) -> Iterator[str]:
    """The app served by uvicorn in a thread, committing for real (no test transaction)."""
    with serve(live_app) as url:
        yield url


@pytest.fixture
def committed_users(engine: Engine) -> Iterator[Callable[..., list[str]]]:
    """committed_users(n, prefix): n user rows committed for real (for a live server), deleted
    with their tasks (ON DELETE CASCADE) after the test."""
    made: list[str] = []

    def make(count: int, prefix: str = "live") -> list[str]:
        ids = [f"{prefix}-{uuid.uuid4().hex[:12]}" for _ in range(count)]
        with engine.begin() as connection:
            connection.execute(
                text('INSERT INTO "user" (id, name, email) VALUES (:id, :id, :email)'),
                [{"id": user_id, "email": f"{user_id}@example.com"} for user_id in ids],
            )
        made.extend(ids)
        return ids

    yield make
    if made:
        with engine.begin() as connection:
            connection.execute(text('DELETE FROM "user" WHERE id = ANY(:ids)'), {"ids": made})


@pytest.fixture
def committed_user(committed_users: Callable[..., list[str]]) -> str:
    return committed_users(1)[0]
