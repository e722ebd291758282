"""Ownership attacks (OWASP API1: broken object level authorization).

User B, holding a perfectly valid token, goes after user A's tasks every way the API allows:
A's task ids through B's own path (404, exactly as for a task that does not exist), B's token
on A's path (403, whether or not the task exists), and body fields that name an owner, an id or
a timestamp. After every attempt A's tasks are exactly what they were, row for row.
"""

import threading
from collections.abc import Callable

import httpx
import pytest
from sqlalchemy import text

from tests.attack_surface import (
    BODY,
    ROUTES,
    SINGLE_TASK_ROUTES,
    auth_failures,
    log_lines,
    send,
    snapshot,
)
from tests.factories import TaskFactory, UserFactory

MISSING_TASK_ID = 2_000_000_000  # a valid id no row has


@pytest.fixture
def alice(user):
    """A: three tasks with every field set differently."""
    TaskFactory(user_id=user.id, title="a-pending", completed=False, description="keep")
    TaskFactory(user_id=user.id, title="a-done", completed=True, description=None)
    TaskFactory(user_id=user.id, title="a-third", completed=False, description="")
    return user


@pytest.fixture
def alices_task(alice):
    return TaskFactory(user_id=alice.id, title="the target", completed=False, description="x")


@pytest.fixture
def mallory(other_user):
    """B: a user with a task of their own, so that their path and queries work."""
    TaskFactory(user_id=other_user.id, title="b-own")
    return other_user


def _comparable(response):
    headers = {k: v for k, v in response.headers.items() if k != "x-request-id"}
    return response.status_code, headers, response.content


@pytest.mark.parametrize("route", SINGLE_TASK_ROUTES, ids=str)
def test_another_users_task_through_your_own_path_is_404_like_a_missing_one(
    client, session, auth_headers, alices_task, mallory, route, capsys
):
    before = snapshot(session)
    headers = auth_headers(mallory)
    capsys.readouterr()
    theirs = send(client, route, mallory.id, alices_task.id, headers=headers)
    missing = send(client, route, mallory.id, MISSING_TASK_ID, headers=headers)
    assert theirs.status_code == 404
    assert theirs.json() == {"detail": "Task not found"}
    assert _comparable(theirs) == _comparable(missing)  # no existence oracle
    assert snapshot(session) == before
    assert auth_failures(capsys.readouterr().out) == []  # authenticated fine; just not yours


@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_your_token_on_another_users_path_is_403_whether_or_not_the_task_exists(
    client, session, auth_headers, alices_task, mallory, route, capsys
):
    before = snapshot(session)
    headers = auth_headers(mallory)
    capsys.readouterr()
    existing = send(client, route, alices_task.user_id, alices_task.id, headers=headers)
    missing = send(client, route, alices_task.user_id, MISSING_TASK_ID, headers=headers)
    out = capsys.readouterr().out
    assert existing.status_code == 403
    assert existing.json() == {"detail": "This token does not grant access to another user's tasks"}
    assert "www-authenticate" not in existing.headers
    assert _comparable(existing) == _comparable(missing)
    assert [(f["reason"], f["status"]) for f in auth_failures(out)] == [("user_mismatch", 403)] * 2
    # the log names who tried: the token's user is never bound, the request line has no user_id
    assert all("user_id" not in line for line in log_lines(out) if line["event"] == "request")
    assert snapshot(session) == before


@pytest.mark.parametrize(
    "path_user",
    [
        "{a}",  # the victim, exactly
        "{a_upper}",  # case variants of the victim's id are other users, never the same one
        "{b}%20",  # B's id with a trailing space: not B
        "{b}%00",
        "%20{b}",
    ],
)
def test_path_user_must_equal_the_token_subject_exactly(
    client, session, auth_headers, alice, mallory, path_user
):
    before = snapshot(session)
    target = path_user.format(a=alice.id, a_upper=alice.id.upper(), b=mallory.id)
    response = client.get(f"/api/{target}/tasks", headers=auth_headers(mallory))
    assert response.status_code == 403
    assert snapshot(session) == before


def test_a_user_id_that_only_differs_in_case_is_someone_else(client, session, auth_headers):
    upper, lower = UserFactory(id="user-CASE"), UserFactory(id="user-case")
    TaskFactory(user_id=upper.id, title="upper's")
    response = client.get(f"/api/{lower.id}/tasks", headers=auth_headers(lower))
    assert response.json() == []
    assert client.get(f"/api/{upper.id}/tasks", headers=auth_headers(lower)).status_code == 403


SMUGGLED_FIELDS = ["user_id", "id", "created_at", "updated_at"]


def _smuggled(victim_id, victim_task_id):
    return {
        "user_id": victim_id,
        "id": victim_task_id,
        "created_at": "2000-01-01T00:00:00Z",
        "updated_at": "2000-01-01T00:00:00Z",
    }


def test_create_ignores_owner_id_and_timestamps_in_the_body(
    client, session, auth_headers, alices_task, mallory
):
    alice_rows = [row for row in snapshot(session) if row[1] == alices_task.user_id]
    response = client.post(
        f"/api/{mallory.id}/tasks",
        json={"title": "planted", **_smuggled(alices_task.user_id, alices_task.id)},
        headers=auth_headers(mallory),
    )
    assert response.status_code == 201
    created = response.json()
    assert created["user_id"] == mallory.id
    assert created["id"] != alices_task.id
    assert not created["created_at"].startswith("2000")
    assert not created["updated_at"].startswith("2000")
    row = session.execute(
        text("SELECT user_id, title FROM tasks WHERE id = :id"), {"id": created["id"]}
    ).one()
    assert tuple(row) == (mallory.id, "planted")
    assert [row for row in snapshot(session) if row[1] == alices_task.user_id] == alice_rows


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
@pytest.mark.parametrize("field", SMUGGLED_FIELDS)
def test_update_of_your_own_task_cannot_move_it_or_touch_anothers(
    client, session, auth_headers, alices_task, mallory, method, field
):
    """B edits B's own task but names A (or A's task id) in the body: nothing of A's moves,
    and B's task keeps its id, owner and creation time."""
    own = TaskFactory(user_id=mallory.id, title="b-editable")
    own_before = client.get(f"/api/{mallory.id}/tasks/{own.id}", headers=auth_headers(mallory))
    alice_rows = [row for row in snapshot(session) if row[1] == alices_task.user_id]
    body = {"title": "edited", field: _smuggled(alices_task.user_id, alices_task.id)[field]}
    response = client.request(
        method, f"/api/{mallory.id}/tasks/{own.id}", json=body, headers=auth_headers(mallory)
    )
    assert response.status_code == 200
    after = response.json()
    for unchanged in ("id", "user_id", "created_at"):
        assert after[unchanged] == own_before.json()[unchanged]
    assert after["title"] == "edited"
    assert after["updated_at"] > own_before.json()["updated_at"]
    assert [row for row in snapshot(session) if row[1] == alices_task.user_id] == alice_rows


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_update_through_your_path_naming_the_victims_task_in_the_body_is_404(
    client, session, auth_headers, alices_task, mallory, method
):
    """B's path, a missing id in the URL, A's task id and owner in the body: not found."""
    before = snapshot(session)
    body = {"title": "hijack", **_smuggled(alices_task.user_id, alices_task.id)}
    response = client.request(
        method,
        f"/api/{mallory.id}/tasks/{MISSING_TASK_ID}",
        json=body,
        headers=auth_headers(mallory),
    )
    assert response.status_code == 404
    assert snapshot(session) == before


def test_list_never_shows_another_users_tasks_under_any_filter(
    client, auth_headers, alices_task, mallory
):
    for status in ["all", "pending", "completed"]:
        listed = client.get(
            f"/api/{mallory.id}/tasks", params={"status": status}, headers=auth_headers(mallory)
        ).json()
        assert {t["user_id"] for t in listed} <= {mallory.id}
        assert alices_task.id not in {t["id"] for t in listed}
    everything = client.get(f"/api/{mallory.id}/tasks", headers=auth_headers(mallory)).json()
    assert [t["title"] for t in everything] == ["b-own"]


def test_query_parameters_cannot_widen_the_owner(client, auth_headers, alices_task, mallory):
    response = client.get(
        f"/api/{mallory.id}/tasks",
        params={"user_id": alices_task.user_id, "owner": alices_task.user_id, "id": alices_task.id},
        headers=auth_headers(mallory),
    )
    assert [t["title"] for t in response.json()] == ["b-own"]


def test_many_users_each_see_exactly_their_own_tasks(client, session, auth_headers):
    """Eight users, different numbers of tasks (none for one), every operation's view checked."""
    users = [UserFactory() for _ in range(8)]
    owned = {
        u.id: {TaskFactory(user_id=u.id, completed=n % 2 == 0).id for n in range(i)}
        for i, u in enumerate(users)
    }
    for u in users:
        headers = auth_headers(u)
        listed = client.get(f"/api/{u.id}/tasks", headers=headers).json()
        assert {t["id"] for t in listed} == owned[u.id]
        assert {t["user_id"] for t in listed} <= {u.id}
        for other in users:
            if other is u:
                continue
            for task_id in owned[other.id]:
                got = client.get(f"/api/{u.id}/tasks/{task_id}", headers=headers)
                assert got.status_code == 404
    total = session.execute(text("SELECT count(*) FROM tasks")).scalar_one()
    assert total == sum(len(ids) for ids in owned.values())


# --- at once, on a live server with real commits ------------------------------------------------


@pytest.fixture
def live_users(committed_users: Callable[..., list[str]]) -> list[str]:
    return committed_users(6, "live-iso")


def test_users_working_at_the_same_time_each_see_exactly_their_own(
    live_url, live_users, make_token
):
    """Six users create, toggle, edit, delete and list concurrently, each also probing the
    others' tasks; at the end each list holds exactly what that user made and kept."""
    created: dict[str, list[int]] = {u: [] for u in live_users}
    leaks: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(live_users))

    def work(user_id: str) -> None:
        try:
            headers = {"Authorization": f"Bearer {make_token(user_id)}"}
            base = f"{live_url}/api/{user_id}/tasks"
            with httpx.Client(headers=headers, timeout=30) as http:
                barrier.wait()
                for n in range(6):
                    task = http.post(base, json={"title": f"{user_id}-{n}"}).json()
                    assert task["user_id"] == user_id
                    created[user_id].append(task["id"])
                http.patch(f"{base}/{created[user_id][0]}/complete").raise_for_status()
                http.patch(f"{base}/{created[user_id][1]}", json=BODY).raise_for_status()
                http.delete(f"{base}/{created[user_id][2]}").raise_for_status()
                for other, ids in list(created.items()):
                    if other == user_id:
                        continue
                    for task_id in list(ids):
                        if http.get(f"{base}/{task_id}").status_code != 404:
                            leaks.append(f"{user_id} read {other}'s {task_id}")
                        if http.delete(f"{base}/{task_id}").status_code != 404:
                            leaks.append(f"{user_id} deleted {other}'s {task_id}")
                    if http.get(f"{live_url}/api/{other}/tasks").status_code != 403:
                        leaks.append(f"{user_id} listed {other}'s tasks")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(u,)) for u in live_users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert leaks == []
    for user_id in live_users:
        headers = {"Authorization": f"Bearer {make_token(user_id)}"}
        listed = httpx.get(f"{live_url}/api/{user_id}/tasks", headers=headers).json()
        kept = [i for i in created[user_id] if i != created[user_id][2]]
        assert sorted(t["id"] for t in listed) == sorted(kept)
        assert {t["user_id"] for t in listed} == {user_id}
        by_id = {t["id"]: t for t in listed}
        assert by_id[created[user_id][0]]["completed"] is True
        assert by_id[created[user_id][1]]["title"] == BODY["title"]


def test_unicode_lookalike_user_ids_are_different_users(client, session, auth_headers):
    """`sub` and the path compare as exact strings: no normalisation, no case folding."""
    composed = UserFactory(id="jos\u00e9")  # é as one code point (NFC)
    decomposed = UserFactory(id="jose\u0301")  # e + combining acute (NFD)
    TaskFactory(user_id=composed.id, title="composed's")
    before = snapshot(session)
    for path_user in (composed.id, "JOS\u00c9", "jos\u00e9\u200b", "jose\u0301\u200b"):
        response = client.get(f"/api/{path_user}/tasks", headers=auth_headers(decomposed))
        assert response.status_code == 403, repr(path_user)
    own = client.get(f"/api/{decomposed.id}/tasks", headers=auth_headers(decomposed))
    assert own.json() == []
    assert snapshot(session) == before


@pytest.mark.parametrize(
    "override", ["X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method"]
)
def test_method_override_headers_are_ignored(client, session, auth_headers, alices_task, override):
    before = snapshot(session)
    headers = {**auth_headers(alices_task.user_id), override: "DELETE"}
    response = client.get(f"/api/{alices_task.user_id}/tasks/{alices_task.id}", headers=headers)
    assert response.status_code == 200
    assert response.json()["id"] == alices_task.id
    response = client.post(
        f"/api/{alices_task.user_id}/tasks/{alices_task.id}", json={}, headers=headers
    )
    assert response.status_code == 405
    assert snapshot(session) == before
