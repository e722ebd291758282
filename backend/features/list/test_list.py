"""List slice: GET /api/{user_id}/tasks?status=..."""

import dataclasses
import json
import re
from datetime import UTC, datetime

import pytest

from backend.features.list import router
from backend.features.list.handler import NEXT_CHUNK
from backend.features.list.schema import StatusFilter
from tests.factories import TaskFactory


def test_empty_list_is_an_empty_array(api):
    response = api.get("/tasks")
    assert response.status_code == 200
    assert response.json() == []


def test_lists_own_tasks_newest_first(api, user):
    first = api.post("/tasks", json={"title": "first"}).json()
    second = api.post("/tasks", json={"title": "second"}).json()
    third = api.post("/tasks", json={"title": "third"}).json()
    assert api.get("/tasks").json() == [third, second, first]


def test_newest_first_follows_created_at_not_id(api, user):
    older = TaskFactory(user_id=user.id, title="older", created_at="2020-01-01T00:00:00Z")
    newer = TaskFactory(user_id=user.id, title="newer", created_at="2021-01-01T00:00:00Z")
    older_but_higher_id = TaskFactory(
        user_id=user.id, title="oldest", created_at="2019-01-01T00:00:00Z"
    )
    titles = [t["title"] for t in api.get("/tasks").json()]
    assert titles == [newer.title, older.title, older_but_higher_id.title]


def test_status_filter(api, user):
    done = TaskFactory(user_id=user.id, completed=True)
    todo = TaskFactory(user_id=user.id, completed=False)
    ids = lambda r: [t["id"] for t in r.json()]  # noqa: E731
    assert ids(api.get("/tasks", params={"status": "completed"})) == [done.id]
    assert ids(api.get("/tasks", params={"status": "pending"})) == [todo.id]
    assert sorted(ids(api.get("/tasks", params={"status": "all"}))) == sorted([done.id, todo.id])
    assert sorted(ids(api.get("/tasks"))) == sorted([done.id, todo.id])


def test_unknown_status_is_422(api):
    for value in ["done", "ALL", "", "completed'--"]:
        response = api.get("/tasks", params={"status": value})
        assert response.status_code == 422, value
        assert response.json()["detail"][0]["loc"] == ["query", "status"]


def test_list_never_includes_other_users_tasks(api, user, other_user):
    mine = TaskFactory(user_id=user.id)
    TaskFactory(user_id=other_user.id)
    TaskFactory(user_id=other_user.id, completed=True)
    for status in ["all", "pending", "completed"]:
        listed = api.get("/tasks", params={"status": status}).json()
        assert all(t["user_id"] == user.id for t in listed)
    assert [t["id"] for t in api.get("/tasks").json()] == [mine.id]


# --- lists longer than a chunk: streamed, and still the same answer --------------------------

CHUNK = 3


@pytest.fixture
def chunk_rows(app):
    """Lists read CHUNK tasks at a time, so that a few tasks make a long list; call it to
    change that."""
    settings = app.state.settings

    def set_chunk_rows(rows: int) -> None:
        app.state.settings = settings.model_copy(update={"LIST_CHUNK_ROWS": rows})

    set_chunk_rows(CHUNK)
    yield set_chunk_rows
    app.state.settings = settings


def tasks_at(user, times: list[str], **fields) -> list[int]:
    return [TaskFactory(user_id=user.id, created_at=at, **fields).id for at in times]


def newest_first(listed: list[dict]) -> bool:
    keys = [(datetime.fromisoformat(t["created_at"]), t["id"]) for t in listed]
    return keys == sorted(keys, reverse=True)


# Ties and times a microsecond apart at chunk boundaries: a keyset bound that lost precision
# (or ignored the id) would skip or repeat tasks.
TIMES = [
    "2024-01-01T00:00:00.000002Z",
    "2024-01-01T00:00:00.000001Z",
    "2024-01-01T00:00:00.000001Z",
    "2024-01-01T00:00:00.000001Z",
    "2024-01-01T00:00:00Z",
    "2024-01-01T00:00:00Z",
    "2023-12-31T23:59:59.999999Z",
    "2024-01-01T00:00:00.000001Z",
    "2025-06-01T12:00:00.5Z",
    "2024-01-01T00:00:00Z",
]


@pytest.mark.parametrize("count", [CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1, len(TIMES)])
def test_a_list_longer_than_a_chunk_is_streamed_whole_and_in_order(
    api, user, other_user, chunk_rows, count
):
    tasks_at(user, TIMES[:count])
    tasks_at(other_user, TIMES[:count])
    streamed = api.get("/tasks")
    assert streamed.status_code == 200
    assert "content-length" not in streamed.headers  # streamed: chunked transfer encoding
    assert streamed.headers["content-type"] == "application/json"
    chunk_rows(1000)
    whole = api.get("/tasks")
    assert whole.headers["content-length"] == str(len(whole.content))
    # Byte for byte the array the list is in one piece, newest first, ties by id.
    assert streamed.content == whole.content
    assert len(streamed.json()) == count
    assert newest_first(streamed.json())
    assert {t["user_id"] for t in streamed.json()} == {user.id}


def test_a_list_that_fits_in_a_chunk_is_one_piece_with_its_length(api, user, chunk_rows):
    ids = tasks_at(user, TIMES[:CHUNK])
    response = api.get("/tasks")
    assert response.headers["content-length"] == str(len(response.content))
    assert sorted(t["id"] for t in response.json()) == sorted(ids)


def test_long_lists_are_filtered_by_status(api, user, chunk_rows):
    done = tasks_at(user, TIMES, completed=True)
    pending = tasks_at(user, TIMES[:7], completed=False)
    for status, expected in [("completed", done), ("pending", pending)]:
        response = api.get("/tasks", params={"status": status})
        assert "content-length" not in response.headers
        listed = response.json()
        assert sorted(t["id"] for t in listed) == sorted(expected), status
        assert newest_first(listed)
    assert len(api.get("/tasks").json()) == len(done) + len(pending)


def test_a_streamed_list_whose_tasks_went_is_still_an_array(api, user, chunk_rows, monkeypatch):
    """Found long, then emptied before the first chunk was read: `[]`, not a broken body."""
    from backend.features.list import handler

    tasks_at(user, TIMES[:5])
    original = handler.list_chunk
    calls = []

    def empty_after_the_first(session, **kwargs):
        calls.append(kwargs["after"])
        return original(session, **kwargs) if len(calls) == 1 else []

    monkeypatch.setattr(
        "backend.features.list.router.TASK_LIST",
        dataclasses.replace(router.TASK_LIST, chunk=empty_after_the_first),
    )
    response = api.get("/tasks")
    assert response.status_code == 200
    assert response.json() == []
    assert len(calls) == 2


# --- ETag and If-None-Match, short and long -----------------------------------------------------


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_the_list_etag_304s_while_nothing_changed(api, user, chunk_rows, long):
    tasks_at(user, TIMES[: CHUNK + 2 if long else CHUNK])
    first = api.get("/tasks")
    etag = first.headers["ETag"]
    assert etag.startswith('W/"')
    assert ("content-length" in first.headers) is not long
    assert api.get("/tasks").headers["ETag"] == etag  # the same while nothing is written
    cached = api.get("/tasks", headers={"If-None-Match": etag})
    assert cached.status_code == 304
    assert cached.headers["ETag"] == etag
    assert cached.content == b""
    assert api.get("/tasks", headers={"If-None-Match": 'W/"other"'}).status_code == 200


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
def test_the_list_etag_changes_with_every_kind_of_write(api, user, chunk_rows, long):
    ids = tasks_at(user, TIMES[: CHUNK + 2 if long else CHUNK - 1])
    listed = "content-length" not in api.get("/tasks").headers
    assert listed is long
    tags = [api.get("/tasks").headers["ETag"]]
    for method, path, body in [
        ("POST", "/tasks", {"title": "new"}),
        ("PUT", f"/tasks/{ids[0]}", {"title": "renamed"}),
        ("PATCH", f"/tasks/{ids[0]}", {"description": "described"}),
        ("PATCH", f"/tasks/{ids[1]}/complete", None),
        ("PATCH", f"/tasks/{ids[1]}/complete", None),  # back as it was: still a new tag
        ("DELETE", f"/tasks/{ids[0]}", None),
    ]:
        assert api.request(method, path, json=body).status_code in (200, 201)
        tags.append(api.get("/tasks").headers["ETag"])
        stale = api.get("/tasks", headers={"If-None-Match": tags[-2]})
        assert stale.status_code == 200, (method, path)
    assert len(set(tags)) == len(tags), tags


def test_a_filtered_long_list_etag_follows_what_moves_in_and_out(api, user, chunk_rows):
    ids = tasks_at(user, TIMES, completed=False)
    pending = api.get("/tasks", params={"status": "pending"}).headers["ETag"]
    done = api.get("/tasks", params={"status": "completed"}).headers["ETag"]
    api.patch(f"/tasks/{ids[0]}/complete")
    assert api.get("/tasks", params={"status": "pending"}).headers["ETag"] != pending
    assert api.get("/tasks", params={"status": "completed"}).headers["ETag"] != done


def test_another_users_writes_leave_the_etag_alone(api, user, other_user, chunk_rows):
    tasks_at(user, TIMES)
    etag = api.get("/tasks").headers["ETag"]
    TaskFactory(user_id=other_user.id)
    assert api.get("/tasks", headers={"If-None-Match": etag}).status_code == 304


@pytest.mark.parametrize("status", list(StatusFilter))
def test_a_chunk_is_a_range_of_the_index_with_no_sort(session, user, status):
    """Each chunk starts where the last ended by an index condition, so it costs the same
    however deep in the list it is: no Sort node, no scan of the tasks before it."""
    connection = session.connection()
    connection.exec_driver_sql("SET LOCAL enable_seqscan = off")  # a test table is tiny
    statement = NEXT_CHUNK[status].compile(dialect=connection.dialect)
    params = {
        "owner_id": user.id,
        "after_created": datetime(2024, 1, 1, tzinfo=UTC),
        "after_id": 7,
        "limit": 500,
    }
    plan = json.dumps(
        connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", params).scalar()
    )
    assert "ix_tasks_user_id_created_at" in plan
    assert '"Sort' not in plan
    assert re.search(r'"Index Cond": "\(\(user_id = .*ROW\(created_at, id\) <', plan), plan
