"""ETags and conditional requests: a strong ETag on every answer carrying a task, changing with
every change; If-Match checked in the write's own statement (412, nothing changed; `*` = exists;
someone else's task stays 404); If-None-Match on a task and on the list (304, no body)."""

import pytest
from sqlalchemy import text

from tests.factories import TaskFactory


def etag_of(api, task_id: int) -> str:
    return api.get(f"/tasks/{task_id}").headers["ETag"]


def test_every_answer_carrying_a_task_has_a_strong_etag_that_changes_with_it(api, user):
    created = api.post("/tasks", json={"title": "t"})
    task = f"/tasks/{created.json()['id']}"
    tags = [created.headers["ETag"]]
    assert api.get(task).headers["ETag"] == tags[0] == '"1"'
    for method, path, body in [
        ("PUT", task, {"title": "u"}),
        ("PATCH", task, {"description": "d"}),
        ("PATCH", task + "/complete", None),
        ("PATCH", task + "/complete", None),  # back to the same fields: still a new tag
    ]:
        tags.append(api.request(method, path, json=body).headers["ETag"])
        assert api.get(task).headers["ETag"] == tags[-1]
    assert tags == ['"1"', '"2"', '"3"', '"4"', '"5"']
    assert api.patch(task, json={}).headers["ETag"] == '"5"'  # an empty PATCH changes nothing
    assert api.delete(task).headers["ETag"] == '"5"'


def test_the_version_is_not_in_the_body(api, task):
    assert set(api.get(f"/tasks/{task.id}").json()) == {
        "id",
        "user_id",
        "title",
        "description",
        "completed",
        "created_at",
        "updated_at",
    }


WRITES = [
    ("PUT", "", {"title": "changed"}),
    ("PATCH", "", {"title": "changed"}),
    ("PATCH", "/complete", None),
    ("DELETE", "", None),
]


@pytest.mark.parametrize(("method", "suffix", "body"), WRITES)
def test_a_matching_if_match_writes(api, task, method, suffix, body):
    task_id = task.id
    response = api.request(
        method, f"/tasks/{task_id}{suffix}", json=body, headers={"If-Match": '"1"'}
    )
    assert response.status_code == 200
    assert response.json()["id"] == task_id


@pytest.mark.parametrize(("method", "suffix", "body"), WRITES)
@pytest.mark.parametrize("tag", ['"2"', 'W/"1"', "1", '"x"', "garbage", '""'])
def test_a_stale_if_match_is_412_and_nothing_changes(api, task, session, method, suffix, body, tag):
    before = api.get(f"/tasks/{task.id}").content
    response = api.request(
        method, f"/tasks/{task.id}{suffix}", json=body, headers={"If-Match": tag}
    )
    assert response.status_code == 412
    assert response.json() == {
        "detail": "The task has changed since the ETag in If-Match was read; get it again and retry"
    }
    assert api.get(f"/tasks/{task.id}").content == before


def test_if_match_takes_a_list(api, task):
    response = api.put(
        f"/tasks/{task.id}", json={"title": "x"}, headers={"If-Match": '"7", W/"1", "1"'}
    )
    assert response.status_code == 200


def test_an_empty_patch_checks_if_match_too(api, task):
    assert api.patch(f"/tasks/{task.id}", json={}, headers={"If-Match": '"2"'}).status_code == 412
    assert api.patch(f"/tasks/{task.id}", json={}, headers={"If-Match": '"1"'}).status_code == 200


def test_the_second_of_two_edits_from_one_tag_is_refused(api, task):
    tag = etag_of(api, task.id)
    first = api.patch(f"/tasks/{task.id}", json={"title": "tab one"}, headers={"If-Match": tag})
    second = api.patch(f"/tasks/{task.id}", json={"title": "tab two"}, headers={"If-Match": tag})
    assert (first.status_code, second.status_code) == (200, 412)
    assert api.get(f"/tasks/{task.id}").json()["title"] == "tab one"


@pytest.mark.parametrize(("method", "suffix", "body"), WRITES)
def test_if_match_star_means_if_it_exists(api, task, method, suffix, body):
    path = f"/tasks/{task.id}{suffix}"
    gone = f"/tasks/{task.id}"
    assert api.request(method, path, json=body, headers={"If-Match": "*"}).status_code == 200
    if method != "DELETE":
        assert api.request("DELETE", gone).status_code == 200
    assert api.request(method, path, json=body, headers={"If-Match": "*"}).status_code == 404


@pytest.mark.parametrize(("method", "suffix", "body"), WRITES)
@pytest.mark.parametrize("tag", ['"1"', '"2"', "*"])
def test_another_users_task_is_404_whatever_if_match_says(
    api, other_user, session, method, suffix, body, tag
):
    theirs = TaskFactory(user_id=other_user.id)
    response = api.request(
        method, f"/tasks/{theirs.id}{suffix}", json=body, headers={"If-Match": tag}
    )
    assert response.status_code == 404
    assert response.json() == {"detail": "Task not found"}
    row = session.execute(
        text("SELECT title, completed, version FROM tasks WHERE id = :id"), {"id": theirs.id}
    ).one()
    assert tuple(row) == (theirs.title, False, 1)


def test_a_missing_task_is_404_with_if_match(api):
    assert (
        api.put("/tasks/999999", json={"title": "x"}, headers={"If-Match": '"1"'}).status_code
        == 404
    )


def test_if_match_is_ignored_on_create(api):
    assert api.post("/tasks", json={"title": "x"}, headers={"If-Match": '"9"'}).status_code == 201


# --- conditional GET -----------------------------------------------------------------------------


def test_if_none_match_on_an_unchanged_task_is_304_with_the_etag_and_no_body(api, task):
    tag = etag_of(api, task.id)
    response = api.get(f"/tasks/{task.id}", headers={"If-None-Match": tag})
    assert response.status_code == 304
    assert response.headers["ETag"] == tag
    assert response.content == b""
    for header in (f"W/{tag}", f'"0", {tag}', "*"):  # weak comparison, lists, any
        assert api.get(f"/tasks/{task.id}", headers={"If-None-Match": header}).status_code == 304


def test_if_none_match_after_a_change_is_the_full_answer(api, task):
    tag = etag_of(api, task.id)
    api.patch(f"/tasks/{task.id}/complete")
    response = api.get(f"/tasks/{task.id}", headers={"If-None-Match": tag})
    assert response.status_code == 200
    assert response.json()["completed"] is True
    assert response.headers["ETag"] == '"2"'


def test_if_none_match_does_not_hide_a_404(api, other_user):
    theirs = TaskFactory(user_id=other_user.id)
    assert api.get(f"/tasks/{theirs.id}", headers={"If-None-Match": "*"}).status_code == 404


def test_the_list_has_a_weak_etag_and_304s_while_nothing_in_it_changed(api, user):
    TaskFactory(user_id=user.id)
    listed = api.get("/tasks")
    tag = listed.headers["ETag"]
    assert tag.startswith('W/"')
    unchanged = api.get("/tasks", headers={"If-None-Match": tag})
    assert unchanged.status_code == 304
    assert unchanged.headers["ETag"] == tag
    assert unchanged.content == b""


def test_the_list_etag_changes_with_every_kind_of_change(api, user):
    task_id = TaskFactory(user_id=user.id).id
    tags = [api.get("/tasks").headers["ETag"]]
    for method, path, body in [
        ("POST", "/tasks", {"title": "new"}),
        ("PATCH", f"/tasks/{task_id}", {"title": "edited"}),
        ("PATCH", f"/tasks/{task_id}/complete", None),
        ("DELETE", f"/tasks/{task_id}", None),
    ]:
        api.request(method, path, json=body)
        response = api.get("/tasks", headers={"If-None-Match": tags[-1]})
        assert response.status_code == 200, (method, path)
        tags.append(response.headers["ETag"])
    assert len(set(tags)) == 5


def test_each_filter_of_the_list_has_its_own_etag(api, user):
    TaskFactory(user_id=user.id, completed=True)
    everything = api.get("/tasks").headers["ETag"]
    pending = api.get("/tasks?status=pending")
    assert pending.json() == []
    assert pending.headers["ETag"] != everything
    assert (
        api.get("/tasks?status=pending", headers={"If-None-Match": everything}).status_code == 200
    )
