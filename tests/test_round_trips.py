"""What a request costs the database: the serving app's engine is in autocommit mode, so each
task operation is exactly one statement and one round trip (no BEGIN, no COMMIT)."""

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, text

from backend.main import create_app
from backend.platform.config import Settings
from backend.platform.db import build_engine


@pytest.fixture(scope="module")
def serving_engine(settings: Settings) -> Iterator[Engine]:
    engine = build_engine(settings, autocommit=True)
    yield engine
    engine.dispose()


@pytest.fixture
def statements(serving_engine: Engine) -> Iterator[list[tuple[str, bool]]]:
    """Each statement the engine sends: its first word, and whether it ran in autocommit."""
    sent: list[tuple[str, bool]] = []

    def record(connection: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append((statement.split()[0], connection.connection.dbapi_connection.autocommit))

    event.listen(serving_engine, "before_cursor_execute", record)
    yield sent
    event.remove(serving_engine, "before_cursor_execute", record)


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
    statements: list[tuple[str, bool]],
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
            return response.json()

        created = call("POST", "", json={"title": "one round trip"})
        assert statements == [("INSERT", True)]
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
            assert statements == [(verb, True)], (method, path)
        with engine.connect() as other:
            left = other.execute(
                text("SELECT count(*) FROM tasks WHERE id = :id"), {"id": created["id"]}
            ).scalar_one()
        assert left == 0


def test_a_long_list_is_a_statement_per_chunk_each_on_its_own(
    settings: Settings,
    serving_engine: Engine,
    statements: list[tuple[str, bool]],
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
            assert statements == [("SELECT", True)] * (2 + chunks), count


def test_a_keyed_or_conditional_write_is_still_one_statement(
    settings: Settings,
    serving_engine: Engine,
    statements: list[tuple[str, bool]],
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
            return response, [verb for verb, _autocommit in statements]

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
        assert all(autocommit for _verb, autocommit in statements)
