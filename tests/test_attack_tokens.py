"""Token attacks (RFC 8725, JWT best current practice) against every task route.

Each attack carries the right `sub` for the path, so that only the attacked property stands
between it and success, and each request carries a body that would change something. Every
one must be a 401 with a `WWW-Authenticate: Bearer` challenge, leave the database exactly as it
was, and be logged exactly once as `auth.failed` with its reason and no part of the token.
"""

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from fastapi.testclient import TestClient

from backend.main import create_app
from backend.platform.config import get_header_limits
from conftest import TEST_SECRET
from tests.attack_surface import (
    ROUTES,
    auth_failures,
    log_lines,
    send,
    service_output,
    snapshot,
    token_fragments,
)
from tests.factories import TaskFactory
from tests.in_test_transaction import serve_in_session, stop_serving_in_session
from tests.jwks_server import JwksServer, KeyPair

OTHER_SECRET = "an-attackers-secret-0123456789-abcdefghijklmn"

# HS384/HS512 with the 49-byte test secret: PyJWT warns the key is short for them; that is the
# attack (the algorithm is not allowed at all), not a problem with the test.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: Any) -> str:
    return b64(value if isinstance(value, bytes) else json.dumps(value).encode())


def hs_sign(
    header: Any, payload: Any, key: bytes = TEST_SECRET.encode(), digest: Any = None
) -> str:
    """A token assembled by hand, so that header and payload can be anything at all."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    mac = hmac.new(key, signing_input.encode(), digest or hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def claims(user_id: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": user_id, "iat": now, "exp": now + 3600, **extra}


@dataclass(frozen=True)
class Keys:
    rsa: Any
    ec: Any
    ed: Any
    url: str  # a server that records any request: jku/x5u must never be fetched


class _Recorder(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"keys": []}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def keys() -> Iterator[Keys]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield Keys(
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec.generate_private_key(ec.SECP256R1()),
        ed=ed25519.Ed25519PrivateKey.generate(),
        url=f"http://127.0.0.1:{server.server_address[1]}",
    )
    server.shutdown()
    thread.join()


def _jwk(private_key: Any) -> dict[str, Any]:
    return json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))


def _valid(user_id: str, keys: Keys) -> str:
    return jwt.encode(claims(user_id), TEST_SECRET, algorithm="HS256")


def _with_signature(token: str, signature: str) -> str:
    return token.rsplit(".", 1)[0] + "." + signature


def _flip_first(signature: str) -> str:
    # The first character: its bits are all signature bits (the last one's may be padding).
    return ("B" if signature[0] != "B" else "C") + signature[1:]


def _tampered(user_id: str, keys: Keys) -> str:
    header, _, signature = _valid(user_id, keys).split(".")
    payload = segment(claims(user_id, exp=int(time.time()) + 10 * 365 * 86400, role="admin"))
    return f"{header}.{payload}.{signature}"


def _none(alg: str, signature: str) -> Callable[[str, Keys], str]:
    def build(user_id: str, keys: Keys) -> str:
        head = f"{segment({'alg': alg, 'typ': 'JWT'})}.{segment(claims(user_id))}"
        return f"{head}.{signature}"

    return build


def _none_hmac_signed(alg: str) -> Callable[[str, Keys], str]:
    return lambda user_id, keys: hs_sign({"alg": alg, "typ": "JWT"}, claims(user_id))


def _header(
    extra: dict[str, Any], key: bytes = OTHER_SECRET.encode()
) -> Callable[[str, Keys], str]:
    return lambda user_id, keys: hs_sign(
        {"alg": "HS256", "typ": "JWT", **extra}, claims(user_id), key
    )


def _signed_payload(payload: Callable[[str], Any]) -> Callable[[str, Keys], str]:
    """Honestly signed with our secret: only the payload's content is wrong."""
    return lambda user_id, keys: hs_sign({"alg": "HS256"}, payload(user_id))


# (name, reason, build(user_id, keys) -> the Authorization header value, or None for none)
Build = Callable[[str, Keys], str | None]
TOKEN_ATTACKS: list[tuple[str, str, Build]] = [
    # alg "none" in any letter case, unsigned or carrying a signature anyway
    *[
        (f"alg {alg} unsigned", "bad_signature", _none(alg, ""))
        for alg in ("none", "None", "NONE", "nOnE")
    ],
    *[
        (f"alg {alg} with junk signature", "bad_signature", _none(alg, b64(b"x" * 32)))
        for alg in ("none", "NONE")
    ],
    *[
        (f"alg {alg} HMAC-signed", "bad_signature", _none_hmac_signed(alg))
        for alg in ("none", "None")
    ],
    # only the configured algorithm passes, even with the right secret
    (
        "HS384 with our secret",
        "bad_signature",
        lambda u, k: jwt.encode(claims(u), TEST_SECRET, algorithm="HS384"),
    ),
    (
        "HS512 with our secret",
        "bad_signature",
        lambda u, k: jwt.encode(claims(u), TEST_SECRET, algorithm="HS512"),
    ),
    (
        "alg with a trailing space",
        "bad_signature",
        _header({"alg": "HS256 "}, TEST_SECRET.encode()),
    ),
    ("alg as a list", "bad_signature", _header({"alg": ["HS256"]}, TEST_SECRET.encode())),
    # foreign keys, asymmetric algorithms
    ("RS256, foreign key", "bad_signature", lambda u, k: jwt.encode(claims(u), k.rsa, "RS256")),
    ("PS256, foreign key", "bad_signature", lambda u, k: jwt.encode(claims(u), k.rsa, "PS256")),
    ("ES256, foreign key", "bad_signature", lambda u, k: jwt.encode(claims(u), k.ec, "ES256")),
    ("EdDSA, foreign key", "bad_signature", lambda u, k: jwt.encode(claims(u), k.ed, "EdDSA")),
    ("HS256, foreign secret", "bad_signature", lambda u, k: jwt.encode(claims(u), OTHER_SECRET)),
    # the signature
    ("tampered payload, old signature", "bad_signature", _tampered),
    (
        "flipped signature",
        "bad_signature",
        lambda u, k: _with_signature(_valid(u, k), _flip_first(_valid(u, k).rsplit(".", 1)[1])),
    ),
    (
        "truncated signature",
        "bad_signature",
        lambda u, k: _valid(u, k)[:-3],
    ),
    ("empty signature", "bad_signature", lambda u, k: _with_signature(_valid(u, k), "")),
    # structure
    ("2 segments", "malformed_token", lambda u, k: _valid(u, k).rsplit(".", 1)[0]),
    ("4 segments", "malformed_token", lambda u, k: _valid(u, k) + "." + b64(b"more")),
    (
        "5 segments (a JWE shape)",
        "malformed_token",
        lambda u, k: ".".join(
            [segment({"alg": "dir", "enc": "A256GCM"}), "", "aXY", "Y3Q", "dGFn"]
        ),
    ),
    ("bad base64 header", "malformed_token", lambda u, k: "!!!!." + _valid(u, k).split(".", 1)[1]),
    (
        "bad base64 signature",
        "malformed_token",
        lambda u, k: _with_signature(_valid(u, k), "@@@@"),
    ),
    ("header not JSON", "malformed_token", lambda u, k: b64(b"{alg") + ".e30.c2ln"),
    ("header a JSON array", "malformed_token", lambda u, k: b64(b'["HS256"]') + ".e30.c2ln"),
    ("not a JWT at all", "malformed_token", lambda u, k: "definitely-not-a-jwt"),
    (
        "payload a JSON array, forged",
        "bad_signature",
        lambda u, k: hs_sign({"alg": "HS256"}, [claims(u)], OTHER_SECRET.encode()),
    ),
    (
        "payload a JSON array, signed with our secret",
        "malformed_token",
        lambda u, k: hs_sign({"alg": "HS256"}, [claims(u)]),
    ),
    (
        "payload not JSON, signed with our secret",
        "malformed_token",
        lambda u, k: hs_sign({"alg": "HS256"}, b"\xff\xfe not json"),
    ),
    # the time claims
    ("exp missing", "invalid_claims", lambda u, k: hs_sign({"alg": "HS256"}, {"sub": u})),
    (
        "exp in the past",
        "expired",
        lambda u, k: hs_sign({"alg": "HS256"}, claims(u, exp=int(time.time()) - 3600)),
    ),
    (
        "exp a numeric string",
        "invalid_claims",
        lambda u, k: hs_sign({"alg": "HS256"}, claims(u, exp=str(int(time.time()) + 3600))),
    ),
    (
        "exp a word",
        "malformed_token",
        lambda u, k: hs_sign({"alg": "HS256"}, claims(u, exp="tomorrow")),
    ),
    ("exp null", "invalid_claims", lambda u, k: hs_sign({"alg": "HS256"}, claims(u, exp=None))),
    (
        "nbf beyond the leeway",
        "not_yet_valid",
        lambda u, k: hs_sign({"alg": "HS256"}, claims(u, nbf=int(time.time()) + 300)),
    ),
    (
        "iat beyond the leeway",
        "not_yet_valid",
        lambda u, k: hs_sign({"alg": "HS256"}, claims(u, iat=int(time.time()) + 300)),
    ),
    (
        "iat a numeric string",
        "invalid_claims",
        lambda u, k: hs_sign({"alg": "HS256"}, claims(u, iat=str(int(time.time())))),
    ),
    # the subject
    *[
        (f"sub {label}", "invalid_claims", _signed_payload(payload))
        for label, payload in [
            ("missing", lambda u: {k: x for k, x in claims(u).items() if k != "sub"}),
            ("empty", lambda u: claims(u, sub="")),
            ("whitespace", lambda u: claims(u, sub=" \t")),
            ("a number", lambda u: claims(u, sub=12345)),
            ("null", lambda u: claims(u, sub=None)),
            ("a list", lambda u: claims(u, sub=[u])),
            ("an object", lambda u: claims(u, sub={"id": u})),
        ]
    ],
    # header parameters that point at keys: never looked up, never fetched
    ("kid with a path, empty key", "bad_signature", _header({"kid": "../../../../dev/null"}, b"")),
    (
        "kid with SQL text",
        "bad_signature",
        _header({"kid": "x' UNION SELECT 'attacker-key' --"}, b"attacker-key"),
    ),
    ("kid a number", "invalid_claims", _header({"kid": 7}, TEST_SECRET.encode())),
    (
        "jku to the attacker's keys",
        "bad_signature",
        lambda u, k: jwt.encode(claims(u), k.rsa, "RS256", headers={"jku": k.url + "/jwks.json"}),
    ),
    (
        "jku with HS256",
        "bad_signature",
        _header({"jku": "http://127.0.0.1:9/jwks.json", "kid": "attacker"}),
    ),
    (
        "x5u to the attacker's certificate",
        "bad_signature",
        lambda u, k: jwt.encode(claims(u), k.rsa, "RS256", headers={"x5u": k.url + "/cert.pem"}),
    ),
    (
        "embedded jwk (RSA)",
        "bad_signature",
        lambda u, k: jwt.encode(claims(u), k.rsa, "RS256", headers={"jwk": _jwk(k.rsa)}),
    ),
    (
        "embedded jwk (oct, HS256)",
        "bad_signature",
        _header({"jwk": {"kty": "oct", "k": b64(OTHER_SECRET.encode())}}),
    ),
    (
        "crit with an unknown extension",
        "invalid_claims",
        _header({"crit": ["exp-policy"], "exp-policy": "lenient"}, TEST_SECRET.encode()),
    ),
    ("crit not a list", "invalid_claims", _header({"crit": "b64"}, TEST_SECRET.encode())),
    # size
    (
        "forged 20 KB token",
        "bad_signature",
        lambda u, k: hs_sign({"alg": "HS256"}, claims(u, pad="A" * 20_000), OTHER_SECRET.encode()),
    ),
]

# Attacks on the Authorization header itself: (name, reason, header value or None, query)
HEADER_ATTACKS: list[tuple[str, str, Callable[[str], str | None], dict[str, str]]] = [
    ("no Authorization header", "missing_token", lambda t: None, {}),
    ("Basic scheme", "invalid_scheme", lambda t: "Basic " + b64(b"alice:hunter2"), {}),
    ("Token scheme", "invalid_scheme", lambda t: "Token " + t, {}),
    ("JWT scheme", "invalid_scheme", lambda t: "JWT " + t, {}),
    ("token without a scheme", "invalid_scheme", lambda t: t, {}),
    ("Bearer with no token", "missing_token", lambda t: "Bearer", {}),
    ("Bearer with only spaces", "missing_token", lambda t: "Bearer    ", {}),
    ("empty header", "missing_token", lambda t: "", {}),
    ("two tokens", "malformed_token", lambda t: f"Bearer {t} {t}", {}),
    ("token in the query string", "missing_token", lambda t: None, {"access_token": "{token}"}),
    ("token in ?token=", "missing_token", lambda t: None, {"token": "{token}"}),
]

CHALLENGE = {
    "missing_token": "Bearer",
    "invalid_scheme": "Bearer",
}
INVALID_TOKEN_CHALLENGE = 'Bearer error="invalid_token"'


@pytest.fixture
def victim_state(user, other_user, session):
    """The user's tasks (one done, one not) and a bystander's, snapshotted."""
    target = TaskFactory(user_id=user.id, title="mine", completed=False)
    TaskFactory(user_id=user.id, title="also mine", completed=True, description=None)
    TaskFactory(user_id=other_user.id, title="someone else's")
    return target, snapshot(session)


def _assert_refused(response, reason, secret_parts, capsys, session, before):
    out = capsys.readouterr().out
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == CHALLENGE.get(reason, INVALID_TOKEN_CHALLENGE)
    assert response.json()["detail"]
    failures = auth_failures(out)
    assert len(failures) == 1, failures
    assert failures[0]["reason"] == reason
    assert failures[0]["status"] == 401
    (request_line,) = [x for x in log_lines(out) if x.get("event") == "request"]
    assert request_line["status"] == 401
    assert "user_id" not in request_line  # nobody was authenticated
    logged = service_output(out)
    for part in secret_parts:
        assert part not in logged
        assert part not in response.text
    assert snapshot(session) == before


@pytest.mark.parametrize("route", ROUTES, ids=str)
@pytest.mark.parametrize(
    ("name", "reason", "build"), TOKEN_ATTACKS, ids=[a[0] for a in TOKEN_ATTACKS]
)
def test_forged_and_broken_tokens_are_refused(
    client, user, session, victim_state, keys, capsys, route, name, reason, build
):
    target, before = victim_state
    token = build(user.id, keys)
    capsys.readouterr()
    response = send(client, route, user.id, target.id, headers={"Authorization": f"Bearer {token}"})
    _assert_refused(response, reason, token_fragments(token), capsys, session, before)
    assert _Recorder.hits == []


@pytest.mark.parametrize("route", ROUTES, ids=str)
@pytest.mark.parametrize(
    ("name", "reason", "header", "query"), HEADER_ATTACKS, ids=[a[0] for a in HEADER_ATTACKS]
)
def test_unusable_authorization_is_refused(
    client, user, session, victim_state, make_token, capsys, route, name, reason, header, query
):
    target, before = victim_state
    token = make_token(user)  # a perfectly valid token, offered the wrong way
    value = header(token)
    headers = {} if value is None else {"Authorization": value}
    params = {key: v.format(token=token) for key, v in query.items()}
    capsys.readouterr()
    response = send(client, route, user.id, target.id, headers=headers, params=params)
    # the request line logs the path only, never the query string
    _assert_refused(response, reason, token_fragments(token), capsys, session, before)


def test_the_valid_token_these_attacks_start_from_is_accepted_on_every_route(
    client, user, session, victim_state, keys
):
    """The control: the same requests with an honest token do get through (so each attack above
    is refused for what it changed, not for something else)."""
    target, _ = victim_state
    target_id = target.id  # read once: the DELETE below removes the row behind the object
    headers = {"Authorization": f"Bearer {_valid(user.id, keys)}"}
    statuses = [send(client, r, user.id, target_id, headers=headers).status_code for r in ROUTES]
    assert statuses == [201, 200, 200, 200, 200, 200, 404]  # toggle after delete: gone


def test_hand_assembled_tokens_are_accepted_when_honest(client, user, keys):
    """The hand signer the attacks use makes tokens the service accepts when nothing is wrong."""
    token = hs_sign({"alg": "HS256", "typ": "JWT"}, claims(user.id))
    response = client.get(f"/api/{user.id}/tasks", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert response.json() == []


COOKIE_NAMES = [
    "better-auth.session_data",
    "__Secure-better-auth.session_data",
    "better-auth.session_token",
    "token",
    "access_token",
    "Authorization",
]


@pytest.mark.parametrize("route", ROUTES, ids=str)
@pytest.mark.parametrize("cookie", COOKIE_NAMES)
def test_a_token_in_a_cookie_is_never_read(
    client, user, session, victim_state, make_token, capsys, route, cookie
):
    """Only the Authorization header counts: a cookie would make every route CSRF-able."""
    target, before = victim_state
    token = make_token(user)
    headers = {"Cookie": f"{cookie}={token}"}
    capsys.readouterr()
    response = send(client, route, user.id, target.id, headers=headers)
    _assert_refused(response, "missing_token", token_fragments(token), capsys, session, before)


# --- the same attacks when Better Auth's JWKS is configured --------------------------------------
# With BETTER_AUTH_URL set the service also takes asymmetric tokens, verified with a key from
# Better Auth's JWKS. An attacker then knows the published `kid`s and algorithms: tokens that name
# them but are signed by the attacker's own keys, or that point at the attacker's keys through
# header parameters, must still fail. (HS256 signed with a public key: tests/test_jwks_tokens.py.)


@dataclass(frozen=True)
class Published:
    jwks: JwksServer
    ed: KeyPair
    es: KeyPair
    rs: KeyPair
    recorder_url: str

    def claims(self, user_id: str, **extra: Any) -> dict[str, Any]:
        return {**claims(user_id, iss=self.jwks.base_url, aud=self.jwks.base_url), **extra}


@pytest.fixture(scope="module")
def published(keys: Keys) -> Iterator[Published]:
    server = JwksServer()
    ed, es, rs = KeyPair.generate("EdDSA"), KeyPair.generate("ES256"), KeyPair.generate("RS256")
    server.publish(ed, es, rs)
    yield Published(server, ed, es, rs, keys.url)
    server.close()


@pytest.fixture(scope="module")
def jwks_app(settings, engine, published):
    return create_app(
        settings.model_copy(update={"BETTER_AUTH_URL": published.jwks.base_url}), engine=engine
    )


@pytest.fixture
def jwks_client(jwks_app, session):
    serve_in_session(jwks_app, session)
    try:
        yield TestClient(jwks_app)
    finally:
        stop_serving_in_session(jwks_app)


def _foreign(alg: str, kid_of: str | None, **header: Any) -> Callable[[str, Published], str]:
    """Signed by a key of the attacker's, naming a published `kid` (or none, or its own)."""

    def build(user_id: str, p: Published) -> str:
        attacker = KeyPair.generate(alg)
        kid = {"ed": p.ed.kid, "es": p.es.kid, "rs": p.rs.kid, None: attacker.kid}[kid_of]
        headers = {k: v for k, v in {"kid": kid, **header}.items() if v is not None}  # kid=None
        return jwt.encode(p.claims(user_id), attacker.private_key, alg, headers=headers)

    return build


def _published_tampered(user_id: str, p: Published) -> str:
    header, _, signature = p.ed.sign(p.claims(user_id)).split(".")
    return f"{header}.{segment(p.claims(user_id, exp=int(time.time()) + 10**8))}.{signature}"


JWKS_ATTACKS: list[tuple[str, str, Callable[[str, Published], str]]] = [
    ("EdDSA, foreign key, published kid", "bad_signature", _foreign("EdDSA", "ed")),
    ("ES256, foreign key, published kid", "bad_signature", _foreign("ES256", "es")),
    ("RS256, foreign key, published kid", "bad_signature", _foreign("RS256", "rs")),
    ("PS256, foreign key, published RSA kid", "bad_signature", _foreign("PS256", "rs")),
    ("EdDSA, foreign key, its own kid", "bad_signature", _foreign("EdDSA", None)),
    ("EdDSA, foreign key, no kid", "bad_signature", _foreign("EdDSA", None, kid=None)),
    (
        "RS256 naming the EdDSA key",
        "bad_signature",
        lambda u, p: jwt.encode(p.claims(u), p.rs.private_key, "RS256", headers={"kid": p.ed.kid}),
    ),
    ("kid with a path", "bad_signature", _foreign("EdDSA", None, kid="../../../../dev/null")),
    ("kid with SQL text", "bad_signature", _foreign("EdDSA", None, kid="x' OR '1'='1")),
    (
        "jku to the attacker's JWKS",
        "bad_signature",
        lambda u, p: _foreign("EdDSA", None, jku=p.recorder_url + "/jwks.json")(u, p),
    ),
    (
        "x5u to the attacker's certificate",
        "bad_signature",
        lambda u, p: _foreign("RS256", "rs", x5u=p.recorder_url + "/cert.pem")(u, p),
    ),
    (
        "embedded jwk with the published kid",
        "bad_signature",
        lambda u, p: _embedded_jwk(u, p),
    ),
    (
        "alg none with the published kid",
        "bad_signature",
        lambda u, p: f"{segment({'alg': 'none', 'kid': p.ed.kid})}.{segment(p.claims(u))}.",
    ),
    ("tampered payload, published key's signature", "bad_signature", _published_tampered),
    (
        "published key, another issuer",
        "invalid_claims",
        lambda u, p: p.ed.sign(p.claims(u, iss="https://evil.example")),
    ),
    (
        "published key, another audience",
        "invalid_claims",
        lambda u, p: p.ed.sign(p.claims(u, aud="https://evil.example")),
    ),
    (
        "published key, unknown crit",
        "invalid_claims",
        lambda u, p: p.ed.sign(p.claims(u), crit=["exp-policy"], **{"exp-policy": 1}),
    ),
]


def _embedded_jwk(user_id: str, p: Published) -> str:
    attacker = KeyPair.generate("EdDSA")
    return jwt.encode(
        p.claims(user_id),
        attacker.private_key,
        "EdDSA",
        headers={"kid": p.ed.kid, "jwk": attacker.public_jwk(kid=p.ed.kid)},
    )


@pytest.mark.parametrize("route", ROUTES, ids=str)
@pytest.mark.parametrize(
    ("name", "reason", "build"), JWKS_ATTACKS, ids=[a[0] for a in JWKS_ATTACKS]
)
def test_forged_tokens_are_refused_with_a_jwks_configured(
    jwks_client, user, session, victim_state, published, capsys, route, name, reason, build
):
    target, before = victim_state
    token = build(user.id, published)
    capsys.readouterr()
    headers = {"Authorization": f"Bearer {token}"}
    response = send(jwks_client, route, user.id, target.id, headers=headers)
    _assert_refused(response, reason, token_fragments(token), capsys, session, before)
    assert _Recorder.hits == []


@pytest.mark.parametrize("key", ["ed", "es", "rs"])
def test_the_published_keys_tokens_are_accepted_on_every_route(
    jwks_client, user, victim_state, published, key
):
    """The control for the JWKS attacks: the real keys, the same claims, every route works."""
    target, _ = victim_state
    target_id = target.id
    token = getattr(published, key).sign(published.claims(user.id))
    headers = {"Authorization": f"Bearer {token}"}
    statuses = [
        send(jwks_client, r, user.id, target_id, headers=headers).status_code for r in ROUTES
    ]
    assert statuses == [201, 200, 200, 200, 200, 200, 404]


@pytest.mark.parametrize("size", [8_000, 20_000, 200_000])
def test_a_huge_forged_token_is_refused_through_the_real_http_stack(live_url, committed_user, size):
    """uvicorn, not the test client. A token that fits the header block (`MAX_HEADER_BYTES`,
    16 KiB) costs one failed signature check: 401. A bigger one never reaches the parser, let
    alone the token check: 431, and the connection is closed."""
    payload = claims(committed_user, pad="A" * size)
    token = hs_sign({"alg": "HS256"}, payload, OTHER_SECRET.encode())
    response = httpx.get(
        f"{live_url}/api/{committed_user}/tasks",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    if len(token) < get_header_limits().MAX_HEADER_BYTES - 200:
        assert response.status_code == 401
        assert response.json() == {"detail": "Token signature is invalid"}
    else:
        assert response.status_code == 431
        assert "detail" in response.json()


@pytest.mark.parametrize("route", ROUTES, ids=str)
@pytest.mark.parametrize("order", ["victim first", "attacker first"])
def test_two_authorization_headers_are_refused_whichever_comes_first(
    client, user, other_user, session, victim_state, make_token, capsys, route, order
):
    """Two credentials in one request: never judged by whichever a layer happens to pick."""
    target, before = victim_state
    victim, attacker = make_token(user), make_token(other_user)
    tokens = [victim, attacker] if order == "victim first" else [attacker, victim]
    headers = [("Authorization", f"Bearer {token}") for token in tokens]
    capsys.readouterr()
    response = send(client, route, user.id, target.id, headers=headers)
    secrets = token_fragments(victim) + token_fragments(attacker)
    _assert_refused(response, "malformed_token", secrets, capsys, session, before)
    assert response.json() == {"detail": "Send exactly one Authorization header"}
