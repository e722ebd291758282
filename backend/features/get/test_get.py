"""Get slice: GET /api/{user_id}/tasks/{task_id}."""

import pytest


def test_get_returns_the_task(api, task, user):
    response = api.get(f"/tasks/{task.id}")
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == task.id
    assert body["user_id"] == user.id
    assert body["title"] == task.title
    assert body["description"] == task.description
    assert body["completed"] is False


def test_missing_task_is_404(api):
    response = api.get("/tasks/2147483647")
    assert response.status_code == 404
    assert response.json() == {"detail": "Task not found"}


def test_other_users_task_is_404_like_a_missing_one(api, other_user):
    from tests.factories import TaskFactory

    theirs = TaskFactory(user_id=other_user.id)
    response = api.get(f"/tasks/{theirs.id}")
    missing = api.get("/tasks/2147483646")
    assert response.status_code == 404
    assert response.json() == missing.json()


@pytest.mark.parametrize(
    "raw_id",
    [
        "task123",
        "-1",
        "0",
        "1.5",
        "99999999999999999999",
        "2147483648",
        "01",
        "1e3",
        " 1",
        "١",
        "%00",
    ],
)
def test_ids_that_cannot_name_a_row_are_404(api, task, raw_id):
    response = api.get(f"/tasks/{raw_id}")
    assert response.status_code == 404
    assert response.json() == {"detail": "Task not found"}
