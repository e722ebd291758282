"""Better Auth's cookie cache as a JWT (`session.cookieCache.strategy: "jwt"`, the value of the
`better-auth.session_data` cookie) presented as a bearer token: HS256 with the secret, no `sub`,
the user at `user.id`; accepted only in exactly that shape, and refused once expired."""

import json
import time
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from conftest import TEST_SECRET


def auth_failures(capsys):
    lines = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    return [line for line in lines if line.get("event") == "auth.failed"]


def iso(moment: datetime) -> str:
    """How Better Auth's dates reach the JWT: `Date.toJSON()`."""
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


def cookie_cache_payload(user_id, *, session_ttl=timedelta(days=7), ttl=300):
    """The shape better-auth's setCookieCache signs (cookies/index.mjs: signJWT(sessionData,
    secret, maxAge)): session and user rows, updatedAt in ms, version, then iat and exp."""
    now = datetime.now(UTC)
    return {
        "session": {
            "expiresAt": iso(now + session_ttl),
            "token": "kG4rLx0Yd7oZkB5aQ0mVnU2cE1sT9wHj",
            "createdAt": iso(now),
            "updatedAt": iso(now),
            "ipAddress": "127.0.0.1",
            "userAgent": "Mozilla/5.0",
            "userId": user_id,
            "id": "Zq1w2e3r4t5y6u7i8o9p0aSdFgHjKlZx",
        },
        "user": {
            "name": "Ada",
            "email": "ada@example.com",
            "emailVerified": False,
            "image": None,
            "createdAt": iso(now),
            "updatedAt": iso(now),
            "id": user_id,
        },
        "updatedAt": int(now.timestamp() * 1000),
        "version": "1",
        "iat": int(now.timestamp()),
        "exp": int(now.timestamp()) + ttl,
    }


def sign(payload, secret=TEST_SECRET):
    return jwt.encode(payload, secret, algorithm="HS256")


def get_tasks(client, user_id, token):
    return client.get(f"/api/{user_id}/tasks", headers={"Authorization": f"Bearer {token}"})


def test_cookie_cache_jwt_is_accepted_and_drives_the_api(client, user):
    headers = {"Authorization": f"Bearer {sign(cookie_cache_payload(user.id))}"}
    created = client.post(
        f"/api/{user.id}/tasks", json={"title": "from the cookie"}, headers=headers
    )
    assert created.status_code == 201
    assert created.json()["user_id"] == user.id
    listed = client.get(f"/api/{user.id}/tasks", headers=headers)
    assert [t["title"] for t in listed.json()] == ["from the cookie"]


def test_cookie_cache_jwt_for_another_user_is_403(client, user, other_user):
    assert get_tasks(client, user.id, sign(cookie_cache_payload(other_user.id))).status_code == 403


def test_a_token_with_sub_uses_sub_not_user_id(client, user, other_user):
    payload = cookie_cache_payload(other_user.id) | {"sub": user.id}
    assert get_tasks(client, user.id, sign(payload)).status_code == 200


def _without(mapping, key):
    return {k: v for k, v in mapping.items() if k != key}


def _shape_breakers(user_id):
    base = cookie_cache_payload(user_id)
    return {
        "no user": _without(base, "user"),
        "no session": _without(base, "session"),
        "user not an object": base | {"user": user_id},
        "session not an object": base | {"session": "abc"},
        "user without id": base | {"user": _without(base["user"], "id")},
        "user id empty": base | {"user": base["user"] | {"id": ""}},
        "user id not a string": base | {"user": base["user"] | {"id": 42}},
        "session of another user": base | {"session": base["session"] | {"userId": "someone"}},
        "session without userId": base | {"session": _without(base["session"], "userId")},
        "session without expiresAt": base | {"session": _without(base["session"], "expiresAt")},
        "expiresAt not a date": base | {"session": base["session"] | {"expiresAt": "soon"}},
        "expiresAt without zone": base
        | {"session": base["session"] | {"expiresAt": "2999-01-01T00:00:00"}},
        "no updatedAt": _without(base, "updatedAt"),
        "sub null": base | {"sub": None},
    }


@pytest.mark.parametrize("case", list(_shape_breakers("x")))
def test_only_the_exact_cookie_cache_shape_names_a_user(client, user, capsys, case):
    payload = _shape_breakers(user.id)[case]
    capsys.readouterr()
    response = get_tasks(client, user.id, sign(payload))
    assert response.status_code == 401, case
    assert [f["reason"] for f in auth_failures(capsys)] == ["invalid_claims"]


def test_cookie_cache_jwt_past_its_exp_is_refused(client, user, capsys):
    payload = cookie_cache_payload(user.id)
    payload["iat"], payload["exp"] = int(time.time()) - 4000, int(time.time()) - 3700
    capsys.readouterr()
    response = get_tasks(client, user.id, sign(payload))
    assert response.status_code == 401
    assert [f["reason"] for f in auth_failures(capsys)] == ["expired"]


def test_cookie_cache_jwt_whose_session_ended_is_refused(client, user, capsys):
    payload = cookie_cache_payload(user.id, session_ttl=timedelta(minutes=-5))
    capsys.readouterr()
    response = get_tasks(client, user.id, sign(payload))
    assert response.status_code == 401
    assert response.json() == {"detail": "Token's session has expired"}
    assert [f["reason"] for f in auth_failures(capsys)] == ["expired"]


def test_cookie_cache_jwt_without_exp_is_refused(client, user):
    payload = _without(cookie_cache_payload(user.id), "exp")
    assert get_tasks(client, user.id, sign(payload)).status_code == 401


def test_cookie_cache_jwt_signed_with_another_secret_is_refused(client, user, capsys):
    token = sign(cookie_cache_payload(user.id), secret="another-secret-0123456789-abcdefghij")
    capsys.readouterr()
    assert get_tasks(client, user.id, token).status_code == 401
    assert [f["reason"] for f in auth_failures(capsys)] == ["bad_signature"]


def test_epoch_millisecond_expiry_is_understood(client, user):
    payload = cookie_cache_payload(user.id)
    payload["session"]["expiresAt"] = int((time.time() + 3600) * 1000)
    assert get_tasks(client, user.id, sign(payload)).status_code == 200
    payload["session"]["expiresAt"] = int((time.time() - 3600) * 1000)
    assert get_tasks(client, user.id, sign(payload)).status_code == 401
