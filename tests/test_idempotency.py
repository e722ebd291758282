"""`Idempotency-Key` on every write: a retry replays the first answer and has no second effect;
a different request with the key is 422; failures are not stored; keys are per user and per
operation; bad keys are 400 with nothing written; expired keys neither block nor linger."""

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text
from sqlmodel import Session

from backend.platform.idempotency import delete_expired_batch
from tests.factories import TaskFactory


def keyed(key: str, **headers: str) -> dict[str, str]:
    return {"Idempotency-Key": key, **headers}


def stored_keys(session: Session, user_id: str) -> list[tuple[str, str, int]]:
    rows = session.execute(
        text(
            "SELECT operation, key, status FROM idempotency_keys WHERE user_id = :u "
            "ORDER BY operation, key"
        ),
        {"u": user_id},
    ).all()
    return [tuple(row) for row in rows]


def task_count(session: Session, user_id: str) -> int:
    return session.execute(
        text("SELECT count(*) FROM tasks WHERE user_id = :u"), {"u": user_id}
    ).scalar_one()


def test_a_retried_create_replays_the_first_answer_and_creates_one_task(api, user, session):
    first = api.post("/tasks", json={"title": "once"}, headers=keyed("create-1"))
    again = api.post("/tasks", json={"title": "once"}, headers=keyed("create-1"))
    assert first.status_code == again.status_code == 201
    assert again.content == first.content  # byte for byte
    assert "idempotent-replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["ETag"] == first.headers["ETag"] == '"1"'
    assert task_count(session, user.id) == 1
    assert stored_keys(session, user.id) == [("create", "create-1", 201)]


def test_the_same_request_is_its_parsed_body_not_its_bytes(api, user, session):
    json = {"Content-Type": "application/json"}
    first = api.post(
        "/tasks", content=b'{"title": "x", "completed": true}', headers=keyed("k", **json)
    )
    again = api.post(
        "/tasks", content=b'{"completed":true,"title":"x"}', headers=keyed("k", **json)
    )
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert task_count(session, user.id) == 1


def test_a_retried_toggle_flips_once(api, task):
    first = api.patch(f"/tasks/{task.id}/complete", headers=keyed("toggle-1"))
    again = api.patch(f"/tasks/{task.id}/complete", headers=keyed("toggle-1"))
    assert first.status_code == again.status_code == 200
    assert first.json()["completed"] is True
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    assert api.get(f"/tasks/{task.id}").json()["completed"] is True


def test_a_replay_is_the_first_answer_not_the_current_state(api, task):
    first = api.put(f"/tasks/{task.id}", json={"title": "first"}, headers=keyed("put-1"))
    api.patch(f"/tasks/{task.id}", json={"title": "later"})
    again = api.put(f"/tasks/{task.id}", json={"title": "first"}, headers=keyed("put-1"))
    assert again.status_code == 200
    assert again.content == first.content
    assert again.headers["ETag"] == first.headers["ETag"]
    assert api.get(f"/tasks/{task.id}").json()["title"] == "later"


def test_a_retried_patch_and_delete_replay(api, task, session, user):
    task_id = task.id
    patched = api.patch(f"/tasks/{task_id}", json={"description": None}, headers=keyed("p"))
    assert (
        api.patch(f"/tasks/{task_id}", json={"description": None}, headers=keyed("p")).content
        == patched.content
    )
    deleted = api.delete(f"/tasks/{task_id}", headers=keyed("d"))
    again = api.delete(f"/tasks/{task_id}", headers=keyed("d"))
    assert deleted.status_code == again.status_code == 200
    assert again.content == deleted.content
    assert again.headers["Idempotent-Replayed"] == "true"
    assert api.delete(f"/tasks/{task_id}").status_code == 404  # unkeyed: evaluated afresh
    assert task_count(session, user.id) == 0


def test_the_same_key_with_a_different_body_is_422_and_writes_nothing(api, user, session):
    api.post("/tasks", json={"title": "one"}, headers=keyed("k"))
    other = api.post("/tasks", json={"title": "two"}, headers=keyed("k"))
    assert other.status_code == 422
    assert other.json() == {
        "detail": [
            {
                "type": "idempotency_key_reused",
                "loc": ["header", "Idempotency-Key"],
                "msg": "This Idempotency-Key was already used with a different request",
            }
        ]
    }
    assert [t["title"] for t in api.get("/tasks").json()] == ["one"]


def test_the_same_key_on_another_task_is_422_and_changes_nothing(api, user):
    one, two = TaskFactory(user_id=user.id), TaskFactory(user_id=user.id)
    assert api.patch(f"/tasks/{one.id}/complete", headers=keyed("k")).status_code == 200
    other = api.patch(f"/tasks/{two.id}/complete", headers=keyed("k"))
    assert other.status_code == 422
    assert api.get(f"/tasks/{two.id}").json()["completed"] is False


def test_keys_are_scoped_to_the_user(client, user, other_user, auth_headers, session):
    for owner in (user, other_user):
        response = client.post(
            f"/api/{owner.id}/tasks",
            json={"title": "same key"},
            headers={**auth_headers(owner), "Idempotency-Key": "shared"},
        )
        assert response.status_code == 201
        assert "idempotent-replayed" not in response.headers
        assert response.json()["user_id"] == owner.id
    assert task_count(session, user.id) == task_count(session, other_user.id) == 1


def test_keys_are_scoped_to_the_operation(api, task, user, session):
    created = api.post("/tasks", json={"title": "x"}, headers=keyed("same"))
    toggled = api.patch(f"/tasks/{task.id}/complete", headers=keyed("same"))
    assert created.status_code == 201 and toggled.status_code == 200
    assert "idempotent-replayed" not in toggled.headers
    assert toggled.json()["completed"] is True
    assert stored_keys(session, user.id) == [("create", "same", 201), ("toggle", "same", 200)]


@pytest.mark.parametrize(
    "key",
    [b"", b"a" * 256, b"with space", b"tab\there", "caf\u00e9".encode(), b"\x7f", b"new\x01line"],
    ids=["empty", "256 chars", "space", "tab", "non-ascii", "DEL", "control"],
)
def test_a_malformed_key_is_400_and_nothing_is_written(api, user, session, key):
    response = api.post("/tasks", json={"title": "x"}, headers={"Idempotency-Key": key})
    assert response.status_code == 400
    assert response.json() == {
        "detail": "Idempotency-Key must be 1 to 255 visible ASCII characters"
    }
    assert task_count(session, user.id) == 0
    assert stored_keys(session, user.id) == []


def test_the_longest_and_oddest_valid_keys_are_accepted(api, user, session):
    for key in ("a" * 255, "!", "~{}\"'\\"):
        assert api.post("/tasks", json={"title": "x"}, headers=keyed(key)).status_code == 201
    assert task_count(session, user.id) == 3


def test_two_keys_are_400(client, user, session, auth_headers):
    response = client.post(
        f"/api/{user.id}/tasks",
        json={"title": "x"},
        headers=[*auth_headers(user).items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
    )
    assert response.status_code == 400
    assert response.json() == {"detail": "Send one Idempotency-Key header"}
    assert task_count(session, user.id) == 0


def test_authentication_comes_before_the_key(client, user):
    response = client.post(
        f"/api/{user.id}/tasks", json={"title": "x"}, headers={"Idempotency-Key": ""}
    )
    assert response.status_code == 401


def test_failures_are_not_stored_and_a_retry_is_evaluated_afresh(api, user, task, session):
    invalid = api.post("/tasks", json={"title": ""}, headers=keyed("retry-me"))
    assert invalid.status_code == 422
    assert api.delete("/tasks/999999", headers=keyed("gone")).status_code == 404
    assert stored_keys(session, user.id) == []
    fixed = api.post("/tasks", json={"title": "fixed"}, headers=keyed("retry-me"))
    assert fixed.status_code == 201
    assert "idempotent-replayed" not in fixed.headers


def test_an_expired_key_does_not_block_its_reuse(api, user, session):
    api.post("/tasks", json={"title": "x"}, headers=keyed("old"))
    session.execute(text("UPDATE idempotency_keys SET expires_at = now() - interval '1 second'"))
    again = api.post("/tasks", json={"title": "x"}, headers=keyed("old"))
    assert again.status_code == 201
    assert "idempotent-replayed" not in again.headers
    assert task_count(session, user.id) == 2
    assert stored_keys(session, user.id) == [("create", "old", 201)]


def test_keys_live_24_hours(api, user, session):
    api.post("/tasks", json={"title": "x"}, headers=keyed("k"))
    lifetime = session.execute(
        text("SELECT expires_at - created_at FROM idempotency_keys WHERE user_id = :u"),
        {"u": user.id},
    ).scalar_one()
    assert lifetime.total_seconds() == 24 * 3600


def test_the_cleanup_deletes_expired_keys_in_batches_and_keeps_live_ones(api, user, session):
    for n in range(3):
        api.post("/tasks", json={"title": f"{n}"}, headers=keyed(f"k{n}"))
    session.execute(
        text(
            "UPDATE idempotency_keys SET expires_at = now() - interval '1 second' "
            "WHERE key IN ('k0', 'k1')"
        )
    )
    assert delete_expired_batch(session) == 2
    assert delete_expired_batch(session) == 0
    assert stored_keys(session, user.id) == [("create", "k2", 201)]


def test_the_key_lookup_and_the_cleanup_are_indexed(session):
    indexes = dict(
        session.execute(
            text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'idempotency_keys'")
        ).all()
    )
    assert indexes == {
        "idempotency_keys_pkey": "CREATE UNIQUE INDEX idempotency_keys_pkey ON "
        "public.idempotency_keys USING btree (user_id, operation, key)",
        "ix_idempotency_keys_expires_at": "CREATE INDEX ix_idempotency_keys_expires_at ON "
        "public.idempotency_keys USING btree (expires_at)",
    }


# --- on the live server, committing for real --------------------------------------------------


def test_twelve_simultaneous_creates_with_one_key_make_one_task(
    live_url: str, committed_user: str, make_token: Callable[..., str], engine: Engine
) -> None:
    headers = {"Authorization": f"Bearer {make_token(committed_user)}", "Idempotency-Key": "burst"}
    url = f"{live_url}/api/{committed_user}/tasks"
    start = Barrier(12)
    with httpx.Client(headers=headers, timeout=30, limits=httpx.Limits(max_connections=12)) as c:

        def create(_: int) -> httpx.Response:
            start.wait()
            return c.post(url, json={"title": "exactly once"})

        with ThreadPoolExecutor(max_workers=12) as pool:
            responses = list(pool.map(create, range(12)))
    assert Counter(r.status_code for r in responses) == {201: 12}
    assert len({r.content for r in responses}) == 1
    assert Counter(r.headers.get("Idempotent-Replayed") for r in responses) == {None: 1, "true": 11}
    with engine.connect() as connection:
        titles = (
            connection.execute(
                text("SELECT title FROM tasks WHERE user_id = :u"), {"u": committed_user}
            )
            .scalars()
            .all()
        )
    assert titles == ["exactly once"]


def test_a_key_committed_with_its_write_survives_for_other_connections(
    live_url: str, committed_user: str, make_token: Callable[..., str], engine: Engine
) -> None:
    headers = {"Authorization": f"Bearer {make_token(committed_user)}", "Idempotency-Key": "c"}
    with httpx.Client(headers=headers, timeout=30) as client:
        created = client.post(f"{live_url}/api/{committed_user}/tasks", json={"title": "t"})
    with engine.connect() as connection:
        row: Any = connection.execute(
            text("SELECT status, response FROM idempotency_keys WHERE user_id = :u"),
            {"u": committed_user},
        ).one()
    assert row.status == 201
    assert row.response["id"] == created.json()["id"]
    assert row.response["version"] == 1


def test_a_retried_delete_replays_although_the_task_is_gone(api, task, session, user):
    task_id = task.id
    deleted = api.delete(f"/tasks/{task_id}", headers=keyed("d"))
    again = api.delete(f"/tasks/{task_id}", headers=keyed("d"))
    assert (deleted.status_code, again.status_code) == (200, 200)
    assert again.content == deleted.content
    assert again.headers["Idempotent-Replayed"] == "true"
    other_key = api.delete(f"/tasks/{task_id}", headers=keyed("e"))
    assert other_key.status_code == 404
    assert stored_keys(session, user.id) == [("delete", "d", 200)]


def test_a_retried_conditional_write_replays_although_its_tag_is_stale(api, task):
    headers = keyed("put", **{"If-Match": '"1"'})
    first = api.put(f"/tasks/{task.id}", json={"title": "new"}, headers=headers)
    again = api.put(f"/tasks/{task.id}", json={"title": "new"}, headers=headers)
    assert (first.status_code, again.status_code) == (200, 200)
    assert first.headers["ETag"] == '"2"'
    assert again.content == first.content
    assert again.headers["Idempotent-Replayed"] == "true"
    stale = api.put(f"/tasks/{task.id}", json={"title": "new"}, headers={"If-Match": '"1"'})
    assert stale.status_code == 412


def test_the_service_runs_the_key_cleanup_for_as_long_as_it_runs(settings):
    from fastapi.testclient import TestClient  # noqa: PLC0415

    from backend.main import create_app  # noqa: PLC0415

    app = create_app(settings)
    try:
        with TestClient(app):
            cleanup = app.state.key_cleanup
            assert not cleanup.done()
        assert cleanup.cancelled()
    finally:
        app.state.engine.dispose()


def test_the_periodic_cleanup_deletes_committed_expired_keys(
    settings, committed_user: str, engine: Engine
) -> None:
    import asyncio  # noqa: PLC0415

    from backend.platform.db import Database, build_engine  # noqa: PLC0415
    from backend.platform.idempotency import expire_keys_forever  # noqa: PLC0415

    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO idempotency_keys (user_id, operation, key, fingerprint, status, "
                "response, expires_at) SELECT :u, 'create', 'k' || n, 'f', 201, '{}', "
                "now() + (CASE WHEN n = 0 THEN 1 ELSE -1 END) * interval '1 hour' "
                "FROM generate_series(0, 1200) AS n"
            ),
            {"u": committed_user},
        )
    serving = build_engine(settings, autocommit=True)

    async def run_cleanup_once() -> None:
        database = Database.for_engine(serving, settings)
        cleanup = asyncio.create_task(expire_keys_forever(database, interval=0.01))
        try:
            for _ in range(500):
                await asyncio.sleep(0.01)
                with engine.connect() as connection:
                    left = connection.execute(
                        text("SELECT count(*) FROM idempotency_keys WHERE user_id = :u"),
                        {"u": committed_user},
                    ).scalar_one()
                if left == 1:
                    break
        finally:
            cleanup.cancel()
            database.close()

    try:
        asyncio.run(run_cleanup_once())
    finally:
        serving.dispose()
    with engine.begin() as connection:
        keys = (
            connection.execute(
                text("DELETE FROM idempotency_keys WHERE user_id = :u RETURNING key"),
                {"u": committed_user},
            )
            .scalars()
            .all()
        )
    assert keys == ["k0"]  # 1200 expired keys gone, in batches of 500; the live one kept


def test_the_keys_table_is_what_its_model_says(session):
    """The table the migrations make and the SQLModel model (what autogenerate compares
    against) describe the same columns, in the same order, with the key and index the code
    relies on."""
    from backend.platform.idempotency import KEYS  # noqa: PLC0415

    columns = session.execute(
        text(
            "SELECT column_name, data_type, character_maximum_length, is_nullable "
            "FROM information_schema.columns WHERE table_name = 'idempotency_keys' "
            "AND table_schema = current_schema() ORDER BY ordinal_position"
        )
    ).all()
    assert [tuple(c) for c in columns] == [
        ("user_id", "text", None, "NO"),
        ("operation", "text", None, "NO"),
        ("key", "character varying", 255, "NO"),
        ("fingerprint", "text", None, "NO"),
        ("status", "smallint", None, "NO"),
        ("response", "jsonb", None, "NO"),
        ("created_at", "timestamp with time zone", None, "NO"),
        ("expires_at", "timestamp with time zone", None, "NO"),
    ]
    assert [c.name for c in KEYS.columns] == [c[0] for c in columns]
    assert [c.name for c in KEYS.primary_key] == ["user_id", "operation", "key"]
    assert {i.name for i in KEYS.indexes} == {"ix_idempotency_keys_expires_at"}


def test_twelve_simultaneous_toggles_with_one_key_flip_once(
    live_url: str, committed_user: str, make_token: Callable[..., str], engine: Engine
) -> None:
    auth = {"Authorization": f"Bearer {make_token(committed_user)}"}
    url = f"{live_url}/api/{committed_user}/tasks"
    start = Barrier(12)
    with httpx.Client(headers=auth, timeout=30, limits=httpx.Limits(max_connections=12)) as c:
        task_id = c.post(url, json={"title": "flip once"}).json()["id"]

        def toggle(_: int) -> httpx.Response:
            start.wait()
            return c.patch(f"{url}/{task_id}/complete", headers={"Idempotency-Key": "flip"})

        with ThreadPoolExecutor(max_workers=12) as pool:
            responses = list(pool.map(toggle, range(12)))
    assert Counter(r.status_code for r in responses) == {200: 12}
    assert {r.json()["completed"] for r in responses} == {True}
    assert Counter(r.headers.get("Idempotent-Replayed") for r in responses) == {None: 1, "true": 11}
    with engine.connect() as connection:
        row = connection.execute(
            text("SELECT completed, version FROM tasks WHERE id = :id"), {"id": task_id}
        ).one()
    assert tuple(row) == (True, 2)
