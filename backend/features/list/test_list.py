"""List slice: GET /api/{user_id}/tasks?status=..."""

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
