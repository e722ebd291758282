"""The service against a real Better Auth server on the same database, in both start-up orders:
every token kind the frontend can hold drives all six operations; users are isolated; deleting a
user in Better Auth deletes their tasks."""

import httpx
import jwt
import pytest

from tests.interop.conftest import Frontend, Stack

TOKEN_KINDS = ["hs256", "jwt-plugin", "set-auth-jwt", "cookie-cache"]
USER_COLUMNS = [
    ("id", "text", "NO"),
    ("name", "text", "NO"),
    ("email", "text", "NO"),
    ("emailVerified", "boolean", "NO"),
    ("image", "text", "YES"),
    ("createdAt", "timestamp with time zone", "NO"),
    ("updatedAt", "timestamp with time zone", "NO"),
]


class Api:
    """The task API as lib/api.ts calls it: bearer token, JSON."""

    def __init__(self, stack: Stack, user_id: str, token: str) -> None:
        self.base = f"{stack.api_url}/api/{user_id}/tasks"
        self.http = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=10)

    def __call__(self, method: str, path: str = "", **kwargs) -> httpx.Response:
        return self.http.request(method, self.base + path, **kwargs)


def test_both_sides_agree_on_the_user_table(stack: Stack):
    columns = stack.sql(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = 'user' ORDER BY ordinal_position"
    )
    assert [tuple(c) for c in columns] == USER_COLUMNS
    created = stack.migration["create"]
    if stack.order == "service-starts-first":
        # Better Auth found the service's "user" table exactly as it would have made it.
        assert "user" not in created
        assert stack.migration["add"] == []
    else:
        assert "user" in created
    assert {"session", "account", "verification", "jwks"} <= set(created) | set(
        r[0] for r in stack.sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    )
    (cascade,) = stack.sql(
        "SELECT confdeltype FROM pg_constraint WHERE conrelid = 'tasks'::regclass "
        "AND contype = 'f' AND confrelid = '\"user\"'::regclass"
    )
    assert cascade[0] == "c"  # ON DELETE CASCADE


@pytest.mark.parametrize("kind", TOKEN_KINDS)
def test_each_token_kind_drives_all_six_operations(stack, frontend: Frontend, kind):
    account = frontend.sign_up("Ada")
    token = frontend.token(account, kind)
    api = Api(stack, account.user_id, token)

    created = api("POST", json={"title": f"  via {kind}  ", "description": "first"})
    assert created.status_code == 201, created.text
    task = created.json()
    assert (task["user_id"], task["title"], task["completed"]) == (
        account.user_id,
        f"via {kind}",
        False,
    )
    second = api("POST", json={"title": "second", "completed": True}).json()

    assert [t["id"] for t in api("GET").json()] == [second["id"], task["id"]]
    assert [t["id"] for t in api("GET", params={"status": "pending"}).json()] == [task["id"]]
    assert api("GET", f"/{task['id']}").json() == task

    replaced = api("PUT", f"/{task['id']}", json={"title": "replaced"})
    assert replaced.status_code == 200
    assert (replaced.json()["title"], replaced.json()["description"]) == ("replaced", "first")
    patched = api("PATCH", f"/{task['id']}", json={"description": None})
    assert patched.json()["description"] is None

    toggled = api("PATCH", f"/{task['id']}/complete")
    assert toggled.status_code == 200
    assert toggled.json()["completed"] is True

    deleted = api("DELETE", f"/{task['id']}")
    assert deleted.status_code == 200
    assert deleted.json()["id"] == task["id"]
    assert api("GET", f"/{task['id']}").status_code == 404
    assert [t["id"] for t in api("GET").json()] == [second["id"]]

    assert token not in stack.service.output()  # never logged, not even in part
    assert token[-20:] not in stack.service.output()


def test_jwt_plugin_token_is_what_the_service_expects(stack, frontend):
    account = frontend.sign_up("Grace")
    token = frontend.token(account, "jwt-plugin")
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header["alg"] == "EdDSA"
    assert header["kid"]
    assert (claims["sub"], claims["iss"], claims["aud"]) == (
        account.user_id,
        stack.auth_url,
        stack.auth_url,
    )
    assert claims["exp"] - claims["iat"] == 15 * 60
    jwks = httpx.get(f"{stack.auth_url}/api/auth/jwks").json()
    assert header["kid"] in [key["kid"] for key in jwks["keys"]]


def test_cookie_cache_token_has_the_shape_the_service_expects(stack, frontend):
    account = frontend.sign_up("Edsger")
    token = frontend.token(account, "cookie-cache")
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert header["alg"] == "HS256"
    assert "sub" not in claims
    assert claims["user"]["id"] == claims["session"]["userId"] == account.user_id
    assert {"expiresAt", "token"} <= set(claims["session"])
    assert isinstance(claims["exp"], int)


def test_a_second_user_is_isolated(stack, frontend):
    alice, bob = frontend.sign_up("Alice"), frontend.sign_up("Bob")
    alice_api = Api(stack, alice.user_id, frontend.token(alice, "jwt-plugin"))
    bob_token = frontend.token(bob, "jwt-plugin")
    bob_api = Api(stack, bob.user_id, bob_token)
    task = alice_api("POST", json={"title": "alice's"}).json()

    assert bob_api("GET").json() == []
    for method, path in [
        ("GET", f"/{task['id']}"),
        ("PUT", f"/{task['id']}"),
        ("PATCH", f"/{task['id']}"),
        ("PATCH", f"/{task['id']}/complete"),
        ("DELETE", f"/{task['id']}"),
    ]:
        response = bob_api(method, path, json={"title": "bob was here"})
        assert response.status_code == 404, (method, path)
    # Bob's token on Alice's path: refused before anything is read.
    bob_on_alice = Api(stack, alice.user_id, bob_token)
    for kind in TOKEN_KINDS:
        bob_on_alice = Api(stack, alice.user_id, frontend.token(bob, kind))
        assert bob_on_alice("GET").status_code == 403, kind
    assert alice_api("GET", f"/{task['id']}").json() == task


def test_deleting_the_user_in_better_auth_deletes_their_tasks(stack, frontend):
    doomed, survivor = frontend.sign_up("Doomed"), frontend.sign_up("Survivor")
    doomed_api = Api(stack, doomed.user_id, frontend.token(doomed, "jwt-plugin"))
    survivor_api = Api(stack, survivor.user_id, frontend.token(survivor, "jwt-plugin"))
    for title in ("one", "two"):
        assert doomed_api("POST", json={"title": title}).status_code == 201
    kept = survivor_api("POST", json={"title": "kept"}).json()

    frontend.delete_user(doomed)

    assert stack.sql('SELECT count(*) FROM "user" WHERE id = :id', id=doomed.user_id)[0][0] == 0
    assert stack.sql("SELECT count(*) FROM tasks WHERE user_id = :id", id=doomed.user_id)[0][0] == 0
    # The JWT outlives the user by up to 15 minutes; it reads nothing and writes nothing.
    assert doomed_api("GET").json() == []
    refused = doomed_api("POST", json={"title": "ghost"})
    assert refused.status_code == 401
    assert refused.json() == {"detail": "The token's user does not exist"}
    assert survivor_api("GET").json() == [kept]


def test_signing_in_again_gives_tokens_that_still_work(stack, frontend):
    account = frontend.sign_up("Barbara")
    Api(stack, account.user_id, frontend.token(account, "hs256"))("POST", json={"title": "t"})
    again = frontend.sign_in(account)
    for kind in TOKEN_KINDS:
        titles = [
            t["title"] for t in Api(stack, again.user_id, frontend.token(again, kind))("GET").json()
        ]
        assert titles == ["t"], kind


def test_the_session_token_is_not_an_api_token(stack, frontend):
    """The bearer plugin's `set-auth-token` (the `better-auth.session_token` cookie) is opaque:
    only Better Auth can look it up, so the API refuses it."""
    account = frontend.sign_up("Opaque")
    response = Api(stack, account.user_id, account.session_token)("GET")
    assert response.status_code == 401
    assert response.json() == {"detail": "Malformed token"}
