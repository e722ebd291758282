"""Concurrent writers on the live server, committing for real: no lost, doubled or misowned
write, and no answer but 200 or 404 when requests race on one task."""

import random
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import Engine, text

# As many racers as the live server's pool holds (20 by default), so that no request waits for
# a connection on a busy machine: these tests are about races, not overload (tests/test_faults.py).
RACERS = 20


@pytest.fixture
def many_users(committed_users: Callable[..., list[str]]) -> list[str]:
    return committed_users(16, "conc")


def test_racing_edits_toggles_and_deletes_of_one_task_are_only_200_or_404(
    live_url: str, committed_user: str, make_token: Callable[..., str], engine: Engine
) -> None:
    headers = {"Authorization": f"Bearer {make_token(committed_user)}"}
    base = f"{live_url}/api/{committed_user}/tasks"
    rng = random.Random(6)
    with httpx.Client(
        headers=headers, timeout=30, limits=httpx.Limits(max_connections=40)
    ) as client:
        for round_ in range(5):
            task_id = client.post(base, json={"title": "raced"}).json()["id"]
            requests: list[tuple[str, str, dict[str, object] | None]] = []
            for i in range(RACERS):
                kind = ("put", "patch", "toggle", "delete")[i % 4] if i % 12 else "delete"
                if kind == "put":
                    requests.append(("PUT", f"{base}/{task_id}", {"title": f"put {i}"}))
                elif kind == "patch":
                    requests.append(("PATCH", f"{base}/{task_id}", {"description": f"d {i}"}))
                elif kind == "toggle":
                    requests.append(("PATCH", f"{base}/{task_id}/complete", None))
                else:
                    requests.append(("DELETE", f"{base}/{task_id}", None))
            rng.shuffle(requests)
            start = threading.Barrier(len(requests))

            def send(
                request: tuple[str, str, dict[str, object] | None],
                start: threading.Barrier = start,
            ) -> httpx.Response:
                start.wait()
                return client.request(request[0], request[1], json=request[2])

            with ThreadPoolExecutor(max_workers=len(requests)) as pool:
                responses = list(pool.map(send, requests))
            by_status = Counter(r.status_code for r in responses)
            assert set(by_status) <= {200, 404}, (round_, by_status)
            deletes = [r for r, q in zip(responses, requests, strict=True) if q[0] == "DELETE"]
            assert sorted(r.status_code for r in deletes) == [200] + [404] * (len(deletes) - 1)
            for response in responses:
                if response.status_code == 404:
                    assert response.json() == {"detail": "Task not found"}
                else:
                    assert response.json()["id"] == task_id
            with engine.connect() as connection:
                left = connection.execute(
                    text("SELECT count(*) FROM tasks WHERE id = :id"), {"id": task_id}
                ).scalar_one()
            assert left == 0
            assert client.get(f"{base}/{task_id}").status_code == 404


def test_racing_edits_of_one_task_leave_one_of_the_acknowledged_states(
    live_url: str, committed_user: str, make_token: Callable[..., str], engine: Engine
) -> None:
    """Last writer wins, and the winner is one of the 200s: fields are never mixed from two
    requests, and a title edit never undoes a concurrent toggle."""
    headers = {"Authorization": f"Bearer {make_token(committed_user)}"}
    base = f"{live_url}/api/{committed_user}/tasks"
    with httpx.Client(
        headers=headers, timeout=30, limits=httpx.Limits(max_connections=40)
    ) as client:
        task_id = client.post(base, json={"title": "start", "description": "start"}).json()["id"]
        start = threading.Barrier(RACERS)

        def send(i: int) -> httpx.Response:
            start.wait()
            if i % 3 == 2:
                return client.patch(f"{base}/{task_id}/complete")
            return client.patch(
                f"{base}/{task_id}", json={"title": f"t{i}", "description": f"t{i}"}
            )

        with ThreadPoolExecutor(max_workers=RACERS) as pool:
            responses = list(pool.map(send, range(RACERS)))
        assert {r.status_code for r in responses} == {200}
        with engine.connect() as connection:
            row = connection.execute(
                text("SELECT title, description, completed FROM tasks WHERE id = :id"),
                {"id": task_id},
            ).one()
        assert row.title == row.description  # both from the same request
        assert row.title in {f"t{i}" for i in range(RACERS) if i % 3 != 2}
        assert row.completed is False  # six toggles, none lost to an edit


def test_many_users_creating_at_once_all_persist_with_their_owner(
    live_url: str, many_users: list[str], make_token: Callable[..., str], engine: Engine
) -> None:
    per_user = 10
    jobs = [(user_id, n) for n in range(per_user) for user_id in many_users]  # users interleaved
    tokens = {user_id: make_token(user_id) for user_id in many_users}

    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=32)) as client:

        def create(job: tuple[str, int]) -> tuple[str, str, httpx.Response]:
            user_id, n = job
            title = f"{user_id} #{n}"
            response = client.post(
                f"{live_url}/api/{user_id}/tasks",
                json={"title": title},
                headers={"Authorization": f"Bearer {tokens[user_id]}"},
            )
            return user_id, title, response

        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(create, jobs))

    assert Counter(r.status_code for _, _, r in results) == {201: len(jobs)}
    told = {r.json()["id"]: (user_id, title) for user_id, title, r in results}
    assert len(told) == len(jobs)  # every create got its own id
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT id, user_id, title FROM tasks WHERE user_id = ANY(:ids)"),
            {"ids": many_users},
        ).all()
    assert {row.id: (row.user_id, row.title) for row in rows} == told
