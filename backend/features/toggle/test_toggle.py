"""Toggle slice: PATCH /api/{user_id}/tasks/{task_id}/complete."""

from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import select

from backend.features.task_model import Task
from tests.factories import TaskFactory


def test_toggle_flips_and_flips_back(api, task):
    first = api.patch(f"/tasks/{task.id}/complete")
    assert first.status_code == 200
    assert first.json()["completed"] is True
    second = api.patch(f"/tasks/{task.id}/complete")
    assert second.json()["completed"] is False


def test_toggle_needs_no_body_and_ignores_one(api, task):
    response = api.patch(f"/tasks/{task.id}/complete", json={"completed": False})
    assert response.status_code == 200
    assert response.json()["completed"] is True


def test_toggle_moves_updated_at_only(api, task):
    before = api.get(f"/tasks/{task.id}").json()
    after = api.patch(f"/tasks/{task.id}/complete").json()
    assert after["updated_at"] > before["updated_at"]
    assert after["created_at"] == before["created_at"]
    assert (after["title"], after["description"]) == (before["title"], before["description"])


def test_cannot_toggle_another_users_task(api, other_user, session):
    theirs = TaskFactory(user_id=other_user.id)
    assert api.patch(f"/tasks/{theirs.id}/complete").status_code == 404
    assert session.scalar(select(Task.completed).where(Task.id == theirs.id)) is False


def test_bad_ids_are_404(api):
    for raw in ["x", "-1", "0", "1.5", "99999999999999999999"]:
        assert api.patch(f"/tasks/{raw}/complete").status_code == 404


def test_forty_concurrent_toggles_flip_exactly_forty_times(live_url, committed_user, make_token):
    headers = {"Authorization": f"Bearer {make_token(committed_user)}"}
    base = f"{live_url}/api/{committed_user}/tasks"
    with httpx.Client(headers=headers, timeout=30) as http:
        task_id = http.post(base, json={"title": "contended"}).json()["id"]

        def toggle(_: int) -> int:
            with httpx.Client(headers=headers, timeout=30) as own:
                return own.patch(f"{base}/{task_id}/complete").status_code

        with ThreadPoolExecutor(max_workers=40) as pool:
            statuses = list(pool.map(toggle, range(40)))
        assert statuses == [200] * 40
        # An even number of flips leaves it where it started; and one more proves the count.
        assert http.get(f"{base}/{task_id}").json()["completed"] is False
        with ThreadPoolExecutor(max_workers=41) as pool:
            statuses = list(pool.map(toggle, range(41)))
        assert statuses == [200] * 41
        assert http.get(f"{base}/{task_id}").json()["completed"] is True
