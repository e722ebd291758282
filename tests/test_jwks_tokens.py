"""Tokens from Better Auth's JWT plugin: verified against its JWKS (fetched off the event loop
within a deadline, cached, refetched at most once per interval, served stale through an outage
for a stated while), `iss`/`aud` checked, and never a family mix-up (HS* only with the secret,
asymmetric only with a JWKS key of that alg)."""

import asyncio
import base64
import hashlib
import hmac
import json
import socket
import ssl
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import jwt
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import text

from backend.main import create_app
from backend.platform.jwks import JwksCache, KeysUnavailable, fetch_url
from conftest import TEST_SECRET
from tests.in_test_transaction import serve_in_session
from tests.jwks_server import JwksServer, KeyPair
from tests.live_server import free_port
from tests.tls_server import _authority, _server_certificate


def auth_failures(capsys):
    lines = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    return [line for line in lines if line.get("event") == "auth.failed"]


@pytest.fixture
def jwks():
    server = JwksServer()
    yield server
    server.close()


@pytest.fixture
def ed_key(jwks):
    key = KeyPair.generate("EdDSA")
    jwks.publish(key)
    return key


def jwks_settings(settings, jwks, **overrides):
    return settings.model_copy(update={"BETTER_AUTH_URL": jwks.base_url, **overrides})


@pytest.fixture
def make_client(settings, engine, session, jwks):
    """make_client(**settings) -> a TestClient on an app whose JWKS is the `jwks` server."""

    def make(**overrides):
        app = create_app(jwks_settings(settings, jwks, **overrides), engine=engine)

        serve_in_session(app, session)
        return TestClient(app)

    return make


@pytest.fixture
def jwks_client(make_client):
    return make_client()


def claims(jwks, user, **overrides):
    """What Better Auth's `/api/auth/token` signs: the user, `sub`, iss/aud = its base URL."""
    now = int(time.time())
    user_id = getattr(user, "id", user)
    payload = {
        "iat": now,
        "id": user_id,
        "name": "Ada",
        "email": "ada@example.com",
        "emailVerified": False,
        "image": None,
        "createdAt": "2026-01-01T00:00:00.000Z",
        "updatedAt": "2026-01-01T00:00:00.000Z",
        "sub": user_id,
        "exp": now + 900,
        "iss": jwks.base_url,
        "aud": jwks.base_url,
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not ...}


def get_tasks(client, user, token):
    return client.get(f"/api/{user.id}/tasks", headers={"Authorization": f"Bearer {token}"})


def timed_get_tasks(client, user, token):
    started = time.monotonic()
    response = get_tasks(client, user, token)
    return response, time.monotonic() - started


def eventually(condition, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def jwks_events(out):
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [line for line in lines if line["event"].startswith("jwks.")]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(payload, key: bytes, **header) -> str:
    """HS256 by hand: PyJWT (rightly) refuses to use a public key as an HMAC secret."""
    signing_input = (
        b64(json.dumps({"alg": "HS256", "typ": "JWT", **header}).encode())
        + "."
        + b64(json.dumps(payload).encode())
    )
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


# --- accepted ----------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "ES512", "RS256", "PS256"])
def test_better_auth_jwt_plugin_token_is_accepted(jwks, jwks_client, user, alg):
    key = KeyPair.generate(alg)
    jwks.publish(key)
    response = get_tasks(jwks_client, user, key.sign(claims(jwks, user)))
    assert response.status_code == 200, response.text
    assert response.json() == []


def test_all_six_operations_work_with_a_jwks_token(jwks, jwks_client, ed_key, user):
    headers = {"Authorization": f"Bearer {ed_key.sign(claims(jwks, user))}"}
    base = f"/api/{user.id}/tasks"
    created = jwks_client.post(base, json={"title": "via JWKS"}, headers=headers)
    assert created.status_code == 201
    task_id = created.json()["id"]
    assert [t["id"] for t in jwks_client.get(base, headers=headers).json()] == [task_id]
    assert jwks_client.get(f"{base}/{task_id}", headers=headers).json()["title"] == "via JWKS"
    assert jwks_client.put(f"{base}/{task_id}", json={"title": "t2"}, headers=headers).json()[
        "title"
    ] == ("t2")
    assert jwks_client.patch(f"{base}/{task_id}/complete", headers=headers).json()["completed"]
    assert jwks_client.delete(f"{base}/{task_id}", headers=headers).status_code == 200
    assert jwks_client.get(f"{base}/{task_id}", headers=headers).status_code == 404


def test_hs256_tokens_still_work_with_jwks_configured(jwks_client, ed_key, user, make_token):
    assert get_tasks(jwks_client, user, make_token(user)).status_code == 200


def test_keys_are_fetched_once_and_cached(jwks, jwks_client, ed_key, user):
    for _ in range(5):
        assert get_tasks(jwks_client, user, ed_key.sign(claims(jwks, user))).status_code == 200
    assert jwks.hits == 1


def test_a_new_kid_within_the_interval_is_not_fetched(jwks, jwks_client, ed_key, user):
    assert get_tasks(jwks_client, user, ed_key.sign(claims(jwks, user))).status_code == 200
    new_key = KeyPair.generate("EdDSA")
    jwks.publish(ed_key, new_key)
    client = jwks_client
    # The interval since the last fetch has not passed: the new kid is not fetched yet.
    assert get_tasks(client, user, new_key.sign(claims(jwks, user))).status_code == 401


def test_a_new_kid_is_fetched_once_the_interval_has_passed(jwks, make_client, ed_key, user):
    client = make_client(JWKS_REFETCH_INTERVAL_SECONDS=1)
    assert get_tasks(client, user, ed_key.sign(claims(jwks, user))).status_code == 200
    new_key = KeyPair.generate("ES256")
    jwks.publish(ed_key, new_key)
    time.sleep(1.05)
    assert get_tasks(client, user, new_key.sign(claims(jwks, user))).status_code == 200
    assert jwks.hits == 2


# --- refused -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"iss": "https://evil.example"}, "invalid_claims"),
        ({"aud": "https://other-app.example"}, "invalid_claims"),
        ({"iss": ...}, "invalid_claims"),
        ({"aud": ...}, "invalid_claims"),
        ({"sub": ...}, "invalid_claims"),
        ({"exp": ...}, "invalid_claims"),
        ({"sub": ""}, "invalid_claims"),
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"nbf": int(time.time()) + 3600}, "not_yet_valid"),
    ],
)
def test_bad_claims_are_refused(jwks, jwks_client, ed_key, user, capsys, overrides, reason):
    capsys.readouterr()
    response = get_tasks(jwks_client, user, ed_key.sign(claims(jwks, user, **overrides)))
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    assert [f["reason"] for f in auth_failures(capsys)] == [reason]


def test_the_cookie_cache_jwt_plugin_variant_is_refused(jwks, jwks_client, ed_key, user):
    """`jwt({ sessionCookieCache: true })` signs the cookie cache with the JWKS key, but for
    audience `better-auth:session-cache`: a cookie, not an API token."""
    token = ed_key.sign(
        claims(jwks, user, aud="better-auth:session-cache"),
        typ="better-auth.session-cache+jwt",
    )
    assert get_tasks(jwks_client, user, token).status_code == 401


def test_token_for_another_user_is_403(jwks, jwks_client, ed_key, user, other_user):
    token = ed_key.sign(claims(jwks, other_user))
    assert get_tasks(jwks_client, user, token).status_code == 403


def test_a_key_not_in_the_jwks_is_refused(jwks, jwks_client, ed_key, user):
    impostor = KeyPair.generate("EdDSA")
    impostor.kid = ed_key.kid  # same kid, different key
    response = get_tasks(jwks_client, user, impostor.sign(claims(jwks, user)))
    assert response.status_code == 401
    assert response.json() == {"detail": "Token signature is invalid"}


def test_a_token_without_kid_is_refused(jwks, jwks_client, ed_key, user):
    token = jwt.encode(claims(jwks, user), ed_key.private_key, algorithm="EdDSA")
    assert get_tasks(jwks_client, user, token).status_code == 401
    assert jwks.hits == 0


def test_jwks_tokens_are_refused_when_no_jwks_is_configured(client, jwks, ed_key, user):
    response = get_tasks(client, user, ed_key.sign(claims(jwks, user)))
    assert response.status_code == 401
    assert response.json() == {"detail": "Token signature algorithm is not accepted"}
    assert jwks.hits == 0


def test_algorithms_outside_the_allow_list_are_refused(jwks, make_client, user):
    client = make_client(JWT_JWKS_ALGORITHMS="EdDSA")
    key = KeyPair.generate("ES256")
    jwks.publish(key)
    assert get_tasks(client, user, key.sign(claims(jwks, user))).status_code == 401
    assert jwks.hits == 0


# --- never mixing families ---------------------------------------------------------------------


@pytest.mark.parametrize("form", ["jwk-json", "x", "pem"])
def test_hs256_signed_with_the_public_key_is_refused(jwks, jwks_client, ed_key, user, form):
    """The algorithm-confusion attack: the public key is public, so an HMAC over it proves
    nothing. HS256 is only ever checked against BETTER_AUTH_SECRET."""
    from cryptography.hazmat.primitives import serialization

    jwk = ed_key.public_jwk()
    secret = {
        "jwk-json": json.dumps(jwk).encode(),
        "x": jwk["x"].encode(),
        "pem": ed_key.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }[form]
    token = hs256_token(claims(jwks, user), secret, kid=ed_key.kid)
    response = get_tasks(jwks_client, user, token)
    assert response.status_code == 401
    assert response.json() == {"detail": "Token signature is invalid"}
    assert jwks.hits == 0  # HS256 never even looks at the JWKS


def test_a_symmetric_key_in_the_jwks_is_never_used(jwks, jwks_client, user):
    other_secret = b"a-secret-published-in-the-jwks-0123456789"
    jwks.publish({"kty": "oct", "kid": "sym", "alg": "HS256", "k": b64(other_secret)})
    token = hs256_token(claims(jwks, user), other_secret, kid="sym")
    assert get_tasks(jwks_client, user, token).status_code == 401


@pytest.mark.parametrize(
    ("key_alg", "token_alg"),
    [("EdDSA", "ES256"), ("ES256", "EdDSA"), ("RS256", "PS256"), ("ES256", "ES512")],
)
def test_a_key_only_verifies_its_own_algorithm(jwks, jwks_client, user, key_alg, token_alg):
    published = KeyPair.generate(key_alg)
    signer = KeyPair.generate(token_alg)
    signer.kid = published.kid
    jwks.publish(published)
    response = get_tasks(jwks_client, user, signer.sign(claims(jwks, user)))
    assert response.status_code == 401
    assert response.json() == {"detail": "Token algorithm does not match its signing key"}


def test_hs256_with_the_secret_and_a_jwks_kid_is_still_checked_as_hs256(
    jwks, jwks_client, ed_key, user
):
    token = hs256_token(claims(jwks, user, iss=..., aud=...), TEST_SECRET.encode(), kid=ed_key.kid)
    assert get_tasks(jwks_client, user, token).status_code == 200
    assert jwks.hits == 0


# --- refetch storms and outages ----------------------------------------------------------------


def test_forged_kids_cause_at_most_one_refetch_per_interval(jwks, jwks_client, ed_key, user):
    assert get_tasks(jwks_client, user, ed_key.sign(claims(jwks, user))).status_code == 200
    for _ in range(25):
        forged = KeyPair.generate("EdDSA")  # a fresh kid every time
        assert get_tasks(jwks_client, user, forged.sign(claims(jwks, user))).status_code == 401
    assert jwks.hits == 1  # the first fetch; the interval (30 s) has not passed since


def test_forged_kids_from_the_start_cost_one_fetch(jwks, jwks_client, ed_key, user):
    for _ in range(10):
        forged = KeyPair.generate("EdDSA")
        assert get_tasks(jwks_client, user, forged.sign(claims(jwks, user))).status_code == 401
    assert jwks.hits == 1
    assert get_tasks(jwks_client, user, ed_key.sign(claims(jwks, user))).status_code == 200


@pytest.mark.parametrize("outage", ["http-500", "not-json", "slow"])
def test_cached_keys_are_served_through_an_outage(jwks, make_client, ed_key, user, outage):
    client = make_client(
        JWKS_CACHE_SECONDS=1, JWKS_REFETCH_INTERVAL_SECONDS=1, JWKS_TIMEOUT_SECONDS=0.3
    )
    assert get_tasks(client, user, ed_key.sign(claims(jwks, user))).status_code == 200
    if outage == "http-500":
        jwks.status = 500
    elif outage == "not-json":
        jwks.document = b"<html>502 Bad Gateway</html>"
    else:
        jwks.delay = 1.0
    time.sleep(1.05)  # the cache is now older than JWKS_CACHE_SECONDS: a refetch is due
    for _ in range(3):
        assert get_tasks(client, user, ed_key.sign(claims(jwks, user))).status_code == 200
    # One failed refetch, in the background; the interval holds the others back.
    assert eventually(lambda: jwks.hits == 2)
    assert get_tasks(client, user, ed_key.sign(claims(jwks, user))).status_code == 200
    assert jwks.hits == 2


def test_a_removed_key_stops_working_after_the_next_fetch(jwks, make_client, ed_key, user):
    client = make_client(JWKS_CACHE_SECONDS=1, JWKS_REFETCH_INTERVAL_SECONDS=1)
    assert get_tasks(client, user, ed_key.sign(claims(jwks, user))).status_code == 200
    jwks.publish(KeyPair.generate("EdDSA"))  # ed_key revoked
    time.sleep(1.05)
    # Stale keys still verify while their refetch runs in the background (JWKS_STALE_SECONDS):
    # the first request past JWKS_CACHE_SECONDS starts it and does not wait for it...
    assert get_tasks(client, user, ed_key.sign(claims(jwks, user))).status_code == 200
    # ...and once it has ended, the withdrawn key verifies nothing.
    assert eventually(
        lambda: get_tasks(client, user, ed_key.sign(claims(jwks, user))).status_code == 401
    )
    assert jwks.hits == 2


def test_no_keys_ever_fetched_and_jwks_down_is_503(jwks, make_client, ed_key, user, capsys):
    jwks.status = 503
    client = make_client()
    capsys.readouterr()
    for _ in range(2):  # the first request tries a fetch, the second is held back by the interval
        response = get_tasks(client, user, ed_key.sign(claims(jwks, user)))
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert response.json() == {
            "detail": "The signing keys cannot be fetched; please retry shortly"
        }
    assert jwks.hits == 1
    events = [
        json.loads(line)["event"]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("{")
    ]
    assert events.count("jwks.fetch_failed") == 1
    assert events.count("jwks.unavailable") == 2


# --- slow endpoints, the fetch's deadline and the stale window -----------------------------------


@pytest.mark.parametrize("trickled", ["body", "headers"])
def test_a_fetch_from_a_trickling_endpoint_ends_at_its_deadline(jwks, ed_key, trickled):
    """One deadline for the whole fetch, not for each read: a byte every 0.1 s never lets a
    read time out, and the document would take 15 s; the fetch gives up at 1 s and hangs up."""
    jwks.trickle = 0.1
    jwks.trickle_headers = trickled == "headers"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        fetch_url(jwks.url, 1.0)
    assert 0.9 < time.monotonic() - started < 1.4
    assert eventually(lambda: jwks.active == 0)  # the connection is closed, not left reading


@pytest.fixture(scope="module")
def tls_contexts(tmp_path_factory):
    """(server context for localhost, client context trusting only its CA)."""
    from cryptography.hazmat.primitives import serialization

    ca_key, ca_cert = _authority("jwks test CA")
    key, cert = _server_certificate(ca_key, ca_cert)
    work = tmp_path_factory.mktemp("jwks-tls")
    (work / "server.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(work / "server.pem")
    client = ssl.create_default_context(
        cadata=ca_cert.public_bytes(serialization.Encoding.PEM).decode()
    )
    return server, client


def test_https_fetches_check_the_certificate(tls_contexts, ed_key):
    server_context, client_context = tls_contexts
    server = JwksServer(tls=server_context)
    try:
        server.publish(ed_key)
        assert json.loads(fetch_url(server.url, 5, tls=client_context))["keys"][0]["kid"] == (
            ed_key.kid
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            fetch_url(server.url, 5)  # the system's CAs do not know this one
    finally:
        server.close()


def test_a_tls_handshake_that_never_ends_is_given_up_at_the_deadline(tls_contexts):
    _, client_context = tls_contexts
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never says a word
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            fetch_url(f"https://localhost:{silent.getsockname()[1]}/jwks", 1.0, tls=client_context)
        assert 0.9 < time.monotonic() - started < 1.4


def test_waiters_are_released_at_the_deadline_even_if_the_fetch_is_stuck():
    """A fetch that outlives its deadline (in name resolution, which no socket timeout reaches)
    holds no request longer than the timeout, and no second fetch piles up behind it."""
    release, calls = threading.Event(), []

    def stuck(url, timeout):
        calls.append(url)
        release.wait(30)
        raise TimeoutError

    cache = JwksCache("http://jwks.invalid/", max_age=60, min_interval=1, timeout=0.5, fetch=stuck)

    async def wait_for_keys():
        started = time.monotonic()
        await cache.refresh_async()
        return time.monotonic() - started

    try:
        assert 0.4 < asyncio.run(asyncio.wait_for(wait_for_keys(), 5)) < 0.9
        with pytest.raises(KeysUnavailable):  # nothing fetched yet: a 503
            cache.key_for("some-kid", "EdDSA", may_wait=False)
        time.sleep(0.6)  # the interval has passed, and the stuck fetch is still under way
        assert asyncio.run(asyncio.wait_for(wait_for_keys(), 5)) < 0.1  # its deadline is past
        assert calls == ["http://jwks.invalid/"]
    finally:
        release.set()


def test_a_cached_kid_is_answered_at_once_while_a_refresh_trickles(
    jwks, make_client, ed_key, user, capsys
):
    """The attack: keys older than JWKS_CACHE_SECONDS and an endpoint trickling its answer.
    Tokens whose key we hold are verified with it while the refresh runs; none waits for it."""
    client = make_client(
        JWKS_CACHE_SECONDS=1, JWKS_REFETCH_INTERVAL_SECONDS=1, JWKS_TIMEOUT_SECONDS=2
    )
    assert get_tasks(client, user, ed_key.sign(claims(jwks, user))).status_code == 200
    jwks.trickle = 0.2  # its 155 bytes would take 31 s
    time.sleep(1.05)
    capsys.readouterr()
    slowest, until = 0.0, time.monotonic() + 1.8  # while the refresh (2 s deadline) runs
    while time.monotonic() < until:
        response, elapsed = timed_get_tasks(client, user, ed_key.sign(claims(jwks, user)))
        assert response.status_code == 200
        slowest = max(slowest, elapsed)
        time.sleep(0.1)
    assert slowest < 0.5, f"a request with a cached kid waited {slowest:.2f}s for the refresh"
    out = []
    assert eventually(lambda: out.append(capsys.readouterr().out) or "jwks.fetch_failed" in out[-1])
    assert [(e["event"], e["error"]) for e in jwks_events("".join(out))] == [
        ("jwks.fetch_failed", "TimeoutError")
    ]
    assert (jwks.hits, jwks.max_active) == (2, 1)


def test_an_unknown_kid_waits_at_most_the_deadline_and_fetches_do_not_pile_up(
    jwks, make_client, ed_key, user
):
    client = make_client(JWKS_REFETCH_INTERVAL_SECONDS=1, JWKS_TIMEOUT_SECONDS=1)
    assert get_tasks(client, user, ed_key.sign(claims(jwks, user))).status_code == 200
    jwks.trickle = 0.2
    time.sleep(1.05)
    for attempt in range(3):  # each one a fetch of its own, once the interval has passed
        newcomer = KeyPair.generate("EdDSA")
        response, elapsed = timed_get_tasks(client, user, newcomer.sign(claims(jwks, user)))
        assert response.status_code == 401
        assert elapsed < 1.5, f"an unknown kid waited {elapsed:.2f}s"
        assert jwks.hits == 2 + attempt
        # The fetching thread hung up at its deadline: the next fetch finds it free.
        assert eventually(lambda: jwks.active == 0, 1.5)
        time.sleep(0.1)
    assert jwks.max_active == 1
    response, elapsed = timed_get_tasks(client, user, ed_key.sign(claims(jwks, user)))
    assert response.status_code == 200
    assert elapsed < 0.5


def test_stale_keys_are_refreshed_in_the_background(jwks, make_client, ed_key, user):
    client = make_client(JWKS_CACHE_SECONDS=1, JWKS_REFETCH_INTERVAL_SECONDS=1)
    assert get_tasks(client, user, ed_key.sign(claims(jwks, user))).status_code == 200
    rotated = KeyPair.generate("ES256")
    jwks.publish(ed_key, rotated)
    jwks.delay = 0.6
    time.sleep(1.05)
    response, elapsed = timed_get_tasks(client, user, ed_key.sign(claims(jwks, user)))
    assert response.status_code == 200
    assert elapsed < 0.4  # the refetch takes 0.6 s; nobody waited for it
    assert eventually(lambda: jwks.hits == 2)
    assert get_tasks(client, user, rotated.sign(claims(jwks, user))).status_code == 200
    assert jwks.hits == 2


def test_keys_past_the_stale_window_need_a_successful_fetch(jwks, make_client, ed_key, user):
    """Within JWKS_CACHE_SECONDS + JWKS_STALE_SECONDS of the last successful fetch a held key
    verifies; past that, it does only after a fetch succeeds, and meanwhile the client gets a
    503 with Retry-After, as when no key was ever fetched."""
    client = make_client(
        JWKS_CACHE_SECONDS=1,
        JWKS_STALE_SECONDS=1,
        JWKS_REFETCH_INTERVAL_SECONDS=1,
        JWKS_TIMEOUT_SECONDS=0.3,
    )
    assert get_tasks(client, user, ed_key.sign(claims(jwks, user))).status_code == 200
    fetched = time.monotonic()
    jwks.status = 500
    time.sleep(1.05)
    assert get_tasks(client, user, ed_key.sign(claims(jwks, user))).status_code == 200  # stale
    assert eventually(lambda: jwks.hits == 2)  # its refetch, in the background, failed
    time.sleep(max(0.0, fetched + 2.2 - time.monotonic()))
    for _ in range(2):  # the first waits for a fetch (it fails), the second is held back
        response = get_tasks(client, user, ed_key.sign(claims(jwks, user)))
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
    assert jwks.hits == 3
    jwks.status = 200
    time.sleep(1.05)
    assert get_tasks(client, user, ed_key.sign(claims(jwks, user))).status_code == 200
    assert jwks.hits == 4


def test_jwks_logs_never_show_the_urls_credentials(jwks, make_client, ed_key, user, capsys):
    """Userinfo in JWT_JWKS_URL is sent as Basic credentials and never logged; nor is a query
    parameter named like a secret (the rest of the query says which endpoint, and is kept)."""
    url = jwks.url.replace("http://", "http://alice:s3cret@") + "?tenant=a&token=t0ps3cret"
    client = make_client(JWT_JWKS_URL=url, JWKS_REFETCH_INTERVAL_SECONDS=1)
    capsys.readouterr()
    assert get_tasks(client, user, ed_key.sign(claims(jwks, user))).status_code == 200
    assert jwks.authorizations == ["Basic " + base64.b64encode(b"alice:s3cret").decode()]
    jwks.status = 500
    time.sleep(1.05)
    newcomer = KeyPair.generate("EdDSA")
    assert get_tasks(client, user, newcomer.sign(claims(jwks, user))).status_code == 401
    out = capsys.readouterr().out
    assert "alice" not in out and "s3cret" not in out and "t0ps3cret" not in out
    shown = f"{jwks.url}?tenant=a&token=***"
    assert [(e["event"], e["url"]) for e in jwks_events(out)] == [
        ("jwks.fetched", shown),
        ("jwks.fetch_failed", shown),
    ]


def test_unusable_jwks_entries_are_skipped(jwks, jwks_client, ed_key, user):
    jwks.publish(
        {"kty": "OKP", "crv": "Ed25519", "kid": "broken", "x": "not base64!"},
        {"kty": ["EC"], "kid": "odd"},
        {"kty": "RSA", "kid": "claims-eddsa", "alg": "EdDSA", "n": "AQAB", "e": "AQAB"},
        {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"},  # no kid
        ed_key.public_jwk(use="enc"),
        ed_key,
    )
    assert get_tasks(jwks_client, user, ed_key.sign(claims(jwks, user))).status_code == 200


def test_jwks_fetch_never_blocks_the_event_loop(jwks, settings, engine, ed_key):
    """A JWKS that takes 2.5 s to answer holds up only the requests that need it: an HS256
    request sent meanwhile through the same server is answered at once, even with more requests
    waiting for the keys (50) than the thread pool that runs the handlers has threads (40)."""
    jwks.delay = 2.5
    app = create_app(jwks_settings(settings, jwks), engine=engine)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    user_id = f"live-{uuid.uuid4().hex[:12]}"
    with engine.begin() as connection:
        connection.execute(
            text('INSERT INTO "user" (id, name, email) VALUES (:id, :id, :email)'),
            {"id": user_id, "email": f"{user_id}@example.com"},
        )
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}/api/{user_id}/tasks"
        hs256 = jwt.encode(
            {"sub": user_id, "exp": int(time.time()) + 600}, TEST_SECRET, algorithm="HS256"
        )
        eddsa = ed_key.sign(claims(jwks, user_id))
        waiting = 50
        # Clients made up front: making one costs CPU (TLS context) this process shares.
        limits = httpx.Limits(max_connections=waiting + 1)
        with (
            httpx.Client(limits=limits, timeout=20) as many,
            httpx.Client(timeout=20) as one,
            ThreadPoolExecutor(waiting) as pool,
        ):
            slow = [
                pool.submit(many.get, url, headers={"Authorization": f"Bearer {eddsa}"})
                for _ in range(waiting)
            ]
            time.sleep(0.8)  # the JWKS fetch is under way, every request waiting for it
            started = time.monotonic()
            fast = one.get(url, headers={"Authorization": f"Bearer {hs256}"})
            elapsed = time.monotonic() - started
            assert fast.status_code == 200
            # Well under the fetch's 2.5 s (with room for a busy two-core CI machine).
            assert elapsed < 1.2, f"an HS256 request waited {elapsed:.2f}s behind the JWKS fetch"
            assert [f.result(timeout=20).status_code for f in slow] == [200] * waiting
        assert jwks.hits == 1  # all of them needed the keys; one fetch served them all
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        with engine.begin() as connection:
            connection.execute(text('DELETE FROM "user" WHERE id = :id'), {"id": user_id})


# --- settings ----------------------------------------------------------------------------------


def _settings(**values):
    from backend.platform.config import Settings

    return Settings(_env_file=None, BETTER_AUTH_SECRET=TEST_SECRET, **values)


def test_better_auth_url_alone_configures_jwks_issuer_and_audience():
    settings = _settings(BETTER_AUTH_URL="https://app.example.com/")
    assert settings.jwks_url == "https://app.example.com/api/auth/jwks"
    assert (settings.jwt_issuer, settings.jwt_audience) == ("https://app.example.com/",) * 2
    assert _settings().jwks_url == ""  # off unless configured


def test_explicit_jwks_url_issuer_and_audience_win():
    settings = _settings(
        BETTER_AUTH_URL="https://app.example.com",
        JWT_JWKS_URL="https://auth.example.com/keys",
        JWT_ISSUER="https://auth.example.com",
        JWT_AUDIENCE="todo-api",
    )
    assert (settings.jwks_url, settings.jwt_issuer, settings.jwt_audience) == (
        "https://auth.example.com/keys",
        "https://auth.example.com",
        "todo-api",
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"JWT_JWKS_URL": "https://auth.example.com/keys"}, "iss and aud"),
        ({"BETTER_AUTH_URL": "ftp://app.example.com"}, "http:// or https://"),
        ({"BETTER_AUTH_URL": "app.example.com"}, "http:// or https://"),
        ({"JWT_JWKS_ALGORITHMS": "EdDSA,HS256"}, "JWT_JWKS_ALGORITHMS"),
        ({"JWT_JWKS_ALGORITHMS": " , "}, "JWT_JWKS_ALGORITHMS"),
    ],
)
def test_unsafe_jwks_settings_are_refused(values, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        _settings(**values)
