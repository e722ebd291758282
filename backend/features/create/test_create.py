"""Create slice: POST /api/{user_id}/tasks."""

from datetime import datetime

from sqlalchemy import func, select

from backend.features.task_model import Task


def count_tasks(session, user_id):
    return session.scalar(select(func.count()).where(Task.user_id == user_id))


def test_create_returns_201_and_the_task(api, user):
    response = api.post("/tasks", json={"title": "Buy milk", "description": "semi-skimmed"})
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {
        "id",
        "user_id",
        "title",
        "description",
        "completed",
        "created_at",
        "updated_at",
    }
    assert body["user_id"] == user.id
    assert body["title"] == "Buy milk"
    assert body["description"] == "semi-skimmed"
    assert body["completed"] is False
    assert isinstance(body["id"], int) and body["id"] > 0
    created = datetime.fromisoformat(body["created_at"])
    assert created.utcoffset() is not None and created.utcoffset().total_seconds() == 0
    assert body["created_at"] == body["updated_at"]


def test_created_task_is_visible_to_a_following_get(api):
    created = api.post("/tasks", json={"title": "Persisted"}).json()
    fetched = api.get(f"/tasks/{created['id']}")
    assert fetched.status_code == 200
    assert fetched.json() == created


def test_create_can_start_completed_and_without_description(api):
    body = api.post("/tasks", json={"title": "Done already", "completed": True}).json()
    assert body["completed"] is True
    assert body["description"] is None


def test_title_is_trimmed(api):
    assert api.post("/tasks", json={"title": "  padded  "}).json()["title"] == "padded"


def test_title_limits_count_characters_not_bytes(api):
    emoji = "😀" * 200  # 800 bytes in UTF-8, 200 characters
    assert api.post("/tasks", json={"title": emoji}).status_code == 201
    rtl = "שלום" * 50
    assert api.post("/tasks", json={"title": rtl}).json()["title"] == rtl


def test_invalid_bodies_are_422_and_store_nothing(api, user, session):
    invalid = [
        {},
        {"title": ""},
        {"title": "   \t\n "},
        {"title": "x" * 201},
        {"title": "😀" * 201},
        {"title": None},
        {"title": 5},
        {"title": ["a"]},
        {"title": "nul\x00inside"},
        {"title": "ok", "description": "d" * 1001},
        {"title": "ok", "description": "nul\x00"},
        {"title": "ok", "description": 7},
        {"title": "ok", "completed": "yes"},
        {"title": "ok", "completed": 1},
        {"title": "ok", "completed": None},
    ]
    for body in invalid:
        response = api.post("/tasks", json=body)
        assert response.status_code == 422, body
        assert "detail" in response.json()
    assert count_tasks(session, user.id) == 0


def test_malformed_json_is_422(api, user, session):
    for raw in ["{", "[]", '"str"', "null", '{"title": "a",}', "not json"]:
        response = api.post("/tasks", content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code == 422, raw
    assert count_tasks(session, user.id) == 0


def test_lone_surrogate_is_422_not_500(api, user, session):
    raw = '{"title": "bad \\ud800 text"}'
    response = api.post("/tasks", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert count_tasks(session, user.id) == 0


def test_description_at_its_limit_is_accepted(api):
    response = api.post("/tasks", json={"title": "long", "description": "d" * 1000})
    assert response.status_code == 201


def test_body_cannot_set_owner_id_or_timestamps(api, user, other_user):
    response = api.post(
        "/tasks",
        json={
            "title": "mine",
            "id": 999999,
            "user_id": other_user.id,
            "created_at": "2000-01-01T00:00:00Z",
            "updated_at": "2000-01-01T00:00:00Z",
        },
    )
    assert response.status_code == 201
    body = response.json()
    assert body["user_id"] == user.id
    assert body["id"] != 999999
    assert not body["created_at"].startswith("2000")
    assert not body["updated_at"].startswith("2000")


def test_token_for_a_user_without_a_row_cannot_create(client, make_token, session):
    headers = {"Authorization": f"Bearer {make_token('ghost')}"}
    response = client.post("/api/ghost/tasks", json={"title": "x"}, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"detail": "The token's user does not exist"}
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert count_tasks(session, "ghost") == 0
