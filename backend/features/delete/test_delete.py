"""Delete slice: DELETE /api/{user_id}/tasks/{task_id}."""

from sqlalchemy import select

from backend.features.task_model import Task
from tests.factories import TaskFactory


def test_delete_returns_the_deleted_task_and_removes_it(api, task, session):
    # Read before deleting: the factory's object cannot be refreshed once its row is gone.
    task_id = task.id
    before = api.get(f"/tasks/{task_id}").json()
    response = api.delete(f"/tasks/{task_id}")
    assert response.status_code == 200
    assert response.json() == before
    assert api.get(f"/tasks/{task_id}").status_code == 404
    assert session.scalar(select(Task.id).where(Task.id == task_id)) is None


def test_deleting_twice_is_404(api, task):
    task_id = task.id
    assert api.delete(f"/tasks/{task_id}").status_code == 200
    second = api.delete(f"/tasks/{task_id}")
    assert second.status_code == 404
    assert second.json() == {"detail": "Task not found"}


def test_cannot_delete_another_users_task(api, other_user, session):
    theirs = TaskFactory(user_id=other_user.id)
    assert api.delete(f"/tasks/{theirs.id}").status_code == 404
    assert session.scalar(select(Task.id).where(Task.id == theirs.id)) == theirs.id


def test_bad_ids_are_404(api):
    for raw in ["abc", "-5", "0", "99999999999999999999"]:
        assert api.delete(f"/tasks/{raw}").status_code == 404
