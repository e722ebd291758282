"""Authentication rules every task route shares: bearer tokens, their claims, the path's user,
and the order of checks (authentication before the body is even read)."""

import json
import time

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient

from backend.platform.auth import CurrentUser, TokenVerifier
from backend.platform.errors import install_error_handlers
from tests.factories import TaskFactory


def auth_failures(capsys):
    lines = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    return [line for line in lines if line.get("event") == "auth.failed"]


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_valid_token_is_accepted(client, user, make_token):
    response = client.get(f"/api/{user.id}/tasks", headers=bearer(make_token(user)))
    assert response.status_code == 200


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_scheme_is_case_insensitive(client, user, make_token, scheme):
    headers = {"Authorization": f"{scheme} {make_token(user)}"}
    assert client.get(f"/api/{user.id}/tasks", headers=headers).status_code == 200


def test_missing_token_is_401_with_challenge(client, user, capsys):
    capsys.readouterr()
    response = client.get(f"/api/{user.id}/tasks")
    assert response.status_code == 401
    assert response.json() == {"detail": "Not authenticated"}
    assert response.headers["www-authenticate"] == "Bearer"
    assert [f["reason"] for f in auth_failures(capsys)] == ["missing_token"]


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ("Basic dXNlcjpwYXNz", "invalid_scheme"),
        ("Token abc", "invalid_scheme"),
        ("Bearer", "missing_token"),
        ("Bearer    ", "missing_token"),
        ("Bearer not-a-jwt", "malformed_token"),
        ("Bearer a.b.c", "malformed_token"),
    ],
)
def test_unusable_authorization_headers_are_401(client, user, capsys, header, reason):
    capsys.readouterr()
    response = client.get(f"/api/{user.id}/tasks", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert [f["reason"] for f in auth_failures(capsys)] == [reason]


@pytest.mark.parametrize(
    ("claims", "options", "reason"),
    [
        ({"exp": int(time.time()) - 3600}, {}, "expired"),
        ({"nbf": int(time.time()) + 3600}, {}, "not_yet_valid"),
        ({"iat": int(time.time()) + 3600}, {}, "not_yet_valid"),
        ({"exp": ...}, {}, "invalid_claims"),
        ({"sub": ...}, {}, "invalid_claims"),
        ({"sub": ""}, {}, "invalid_claims"),
        ({"sub": "   "}, {}, "invalid_claims"),
        ({"sub": 42}, {}, "invalid_claims"),
        ({}, {"secret": "another-secret-0123456789-abcdefghijklmnop"}, "bad_signature"),
        ({}, {"algorithm": "HS512"}, "bad_signature"),
    ],
)
def test_invalid_tokens_are_401_with_their_reason(
    client, user, make_token, capsys, claims, options, reason
):
    token = make_token(user, **options, **claims)
    capsys.readouterr()
    response = client.get(f"/api/{user.id}/tasks", headers=bearer(token))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    failures = auth_failures(capsys)
    assert [f["reason"] for f in failures] == [reason]
    logged = json.dumps(failures)
    for part in token.split("."):
        assert part not in logged


def test_clock_skew_within_leeway_is_tolerated(client, user, make_token):
    now = int(time.time())
    token = make_token(user, exp=now - 10, nbf=now + 10, iat=now + 10)
    assert client.get(f"/api/{user.id}/tasks", headers=bearer(token)).status_code == 200


def test_token_for_another_user_is_403(client, user, other_user, make_token, capsys):
    TaskFactory(user_id=other_user.id)
    capsys.readouterr()
    response = client.get(f"/api/{other_user.id}/tasks", headers=bearer(make_token(user)))
    assert response.status_code == 403
    assert "detail" in response.json()
    assert [f["reason"] for f in auth_failures(capsys)] == ["user_mismatch"]


def test_authentication_comes_before_body_validation(client, user, make_token):
    url = f"/api/{user.id}/tasks"
    for body in ["{", '{"title": ""}', "[]"]:
        headers = {"Content-Type": "application/json"}
        assert client.post(url, content=body, headers=headers).status_code == 401
        forged = {**headers, **bearer(make_token(user, secret="x" * 40))}
        assert client.post(url, content=body, headers=forged).status_code == 401
        assert client.put(f"{url}/1", content=body, headers=forged).status_code == 401


def test_user_check_comes_before_body_validation(client, user, other_user, make_token):
    headers = {"Content-Type": "application/json", **bearer(make_token(user))}
    response = client.post(f"/api/{other_user.id}/tasks", content="{", headers=headers)
    assert response.status_code == 403


def test_token_in_query_string_is_never_accepted(client, user, make_token):
    token = make_token(user)
    for name in ["token", "access_token", "authorization"]:
        response = client.get(f"/api/{user.id}/tasks", params={name: token})
        assert response.status_code == 401


def test_every_route_requires_a_token(client, task, user):
    base = f"/api/{user.id}/tasks"
    routes = [
        ("GET", base),
        ("POST", base),
        ("GET", f"{base}/{task.id}"),
        ("PUT", f"{base}/{task.id}"),
        ("PATCH", f"{base}/{task.id}"),
        ("DELETE", f"{base}/{task.id}"),
        ("PATCH", f"{base}/{task.id}/complete"),
    ]
    for method, url in routes:
        response = client.request(method, url, json={"title": "x"})
        assert response.status_code == 401, (method, url)


def test_request_log_line_names_the_user(client, user, make_token, capsys):
    capsys.readouterr()
    client.get(f"/api/{user.id}/tasks", headers=bearer(make_token(user)))
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    (request_line,) = [x for x in lines if x.get("event") == "request"]
    assert request_line["user_id"] == user.id
    assert request_line["status"] == 200


def test_current_user_verifies_the_token_itself_outside_the_task_routes(settings, make_token):
    """`CurrentUser` on a plain route (not an AuthenticatedRoute, which verifies first) still
    verifies the token, and still refuses one for another user's path."""
    app = FastAPI()
    app.state.token_verifier = TokenVerifier(settings)
    install_error_handlers(app)
    router = APIRouter()

    @router.get("/plain/{user_id}")
    async def whoami(user: CurrentUser) -> dict[str, str]:
        return {"id": user.id}

    app.include_router(router)
    client = TestClient(app)
    assert client.get("/plain/alice", headers=bearer(make_token("alice"))).json() == {"id": "alice"}
    assert client.get("/plain/alice").status_code == 401
    assert client.get("/plain/bob", headers=bearer(make_token("alice"))).status_code == 403
