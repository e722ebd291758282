"""Update slice: PUT and PATCH /api/{user_id}/tasks/{task_id}."""

import pytest
from sqlalchemy import select

from backend.features.task_model import Task
from tests.factories import TaskFactory


def test_put_sets_the_given_fields(api, task):
    response = api.put(
        f"/tasks/{task.id}", json={"title": "New", "description": "new words", "completed": True}
    )
    assert response.status_code == 200
    body = response.json()
    assert (body["title"], body["description"], body["completed"]) == ("New", "new words", True)
    assert api.get(f"/tasks/{task.id}").json() == body


def test_put_requires_a_title(api, task):
    response = api.put(f"/tasks/{task.id}", json={"description": "no title"})
    assert response.status_code == 422
    assert api.get(f"/tasks/{task.id}").json()["description"] == task.description


def test_editing_the_title_never_uncompletes_a_task(api, user):
    done = TaskFactory(user_id=user.id, completed=True, description="keep me")
    for method in ("put", "patch"):
        body = getattr(api, method)(f"/tasks/{done.id}", json={"title": f"via {method}"}).json()
        assert body["completed"] is True
        assert body["description"] == "keep me"


def test_patch_changes_only_what_is_sent(api, task):
    body = api.patch(f"/tasks/{task.id}", json={"completed": True}).json()
    assert body["completed"] is True
    assert body["title"] == task.title
    assert body["description"] == task.description


def test_null_description_clears_it(api, task):
    for method in ("patch", "put"):
        payload = (
            {"description": None} if method == "patch" else {"title": "t", "description": None}
        )
        assert getattr(api, method)(f"/tasks/{task.id}", json=payload).json()["description"] is None


def test_title_and_completed_cannot_be_null(api, task):
    for payload in ({"title": None}, {"completed": None}):
        assert api.patch(f"/tasks/{task.id}", json=payload).status_code == 422
    assert api.put(f"/tasks/{task.id}", json={"title": "t", "completed": None}).status_code == 422


def test_updated_at_moves_and_created_at_does_not(api, task):
    before = api.get(f"/tasks/{task.id}").json()
    after = api.patch(f"/tasks/{task.id}", json={"title": "moved"}).json()
    assert after["updated_at"] > before["updated_at"]
    assert after["created_at"] == before["created_at"]


def test_empty_patch_changes_nothing(api, task):
    before = api.get(f"/tasks/{task.id}").json()
    response = api.patch(f"/tasks/{task.id}", json={})
    assert response.status_code == 200
    assert response.json() == before


@pytest.mark.parametrize(
    "payload",
    [
        {"title": ""},
        {"title": "  "},
        {"title": "x" * 201},
        {"title": "a\x00b"},
        {"description": "d" * 1001},
        {"description": "\x00"},
        {"completed": "true"},
        {"title": 12},
    ],
)
def test_invalid_patch_is_422_and_changes_nothing(api, task, payload):
    before = api.get(f"/tasks/{task.id}").json()
    assert api.patch(f"/tasks/{task.id}", json=payload).status_code == 422
    put_payload = {"title": "valid", **payload}
    assert api.put(f"/tasks/{task.id}", json=put_payload).status_code == 422
    assert api.get(f"/tasks/{task.id}").json() == before


def test_body_cannot_change_owner_id_or_timestamps(api, task, other_user, session):
    before = api.get(f"/tasks/{task.id}").json()
    smuggled = {
        "id": task.id + 1000,
        "user_id": other_user.id,
        "created_at": "2000-01-01T00:00:00Z",
        "updated_at": "2000-01-01T00:00:00Z",
    }
    for method, payload in (("put", {"title": "t", **smuggled}), ("patch", smuggled)):
        body = getattr(api, method)(f"/tasks/{task.id}", json=payload).json()
        assert body["id"] == task.id
        assert body["user_id"] == before["user_id"]
        assert body["created_at"] == before["created_at"]
        assert not body["updated_at"].startswith("2000")
    owner = session.scalar(select(Task.user_id).where(Task.id == task.id))
    assert owner == before["user_id"]


def test_cannot_update_another_users_task(api, other_user, session):
    theirs = TaskFactory(user_id=other_user.id, title="theirs")
    assert api.put(f"/tasks/{theirs.id}", json={"title": "mine now"}).status_code == 404
    assert api.patch(f"/tasks/{theirs.id}", json={"title": "mine now"}).status_code == 404
    assert api.patch(f"/tasks/{theirs.id}", json={}).status_code == 404
    assert session.scalar(select(Task.title).where(Task.id == theirs.id)) == "theirs"


def test_bad_ids_are_404(api):
    for raw in ["abc", "-1", "0", "1.5", "99999999999999999999"]:
        assert api.put(f"/tasks/{raw}", json={"title": "t"}).status_code == 404
        assert api.patch(f"/tasks/{raw}", json={"title": "t"}).status_code == 404
