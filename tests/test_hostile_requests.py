"""Hostile headers and bodies on every write route, with and without `Idempotency-Key`: each gets
a defined answer (a success or a 4xx with `{"detail": ...}`), never a 500.

First the cases an outside attacker found, each a 500 before: a body nested 1,000 deep sent with
a key (the key's fingerprint parsed it before validation, and `RecursionError` is not a
`ValueError`), and an `If-Match` holding a Latin-1 superscript digit (`'²'.isdigit()` is true,
`int('²')` raises). Then how `If-Match` and `If-None-Match` compare (RFC 9110: strong comparison
is character by character, every line of a field counts). Then property-based tests: arbitrary
bytes in each header the service reads and in the body, on every route.
"""

import asyncio
import json
import string
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import HTTPException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from backend.platform import conditional, idempotency
from tests.attack_surface import ROUTES, snapshot
from tests.factories import TaskFactory

# Every route that writes, with and without a body of its own.
WRITE_ROUTES = [route for route in ROUTES if route.method != "GET"]
CONDITIONAL_WRITES = [route for route in WRITE_ROUTES if "{task}" in route.template]
DEEP = 1000


class _ExactHeaders(httpx.BaseTransport):
    """Hands each request to the app with its header bytes exactly as given. `TestClient` does
    not: it decodes each value and encodes it again as UTF-8, so `If-Match: "\\xb2"` would reach
    the app as `"\\xc2\\xb2"`. An exception escaping the app fails the test as itself."""

    def __init__(self, app: Any) -> None:
        self.asgi = httpx.ASGITransport(app=app)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def forward() -> httpx.Response:
            response = await self.asgi.handle_async_request(request)
            content = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=content)

        return asyncio.run(forward())


@pytest.fixture
def exact(app: Any, client: Any) -> Iterator[httpx.Client]:
    """A client on the app (serving in the test's session, as `client` does) whose header bytes
    reach the app unchanged."""
    with httpx.Client(transport=_ExactHeaders(app), base_url="http://testserver") as raw:
        yield raw


@pytest.fixture
def task_id(task: Any) -> int:
    """The task's id as a plain int: a write under test may delete the row the object maps."""
    return int(task.id)


def nested(depth: int) -> bytes:
    return b'{"title":"x","e":' + b"[" * depth + b"]" * depth + b"}"


def raw_request(client: Any, route: Any, user: Any, task_id: Any, headers: list, **kw: Any):
    """A request whose headers go out exactly as given (bytes, repeated lines)."""
    return client.request(route.method, route.url(user.id, task_id), headers=headers, **kw)


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


def assert_defined(response: Any, allowed: set[int]) -> None:
    assert response.status_code in allowed, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert isinstance(response.json()["detail"], str | list)


# --- the bodies the fingerprint reads ------------------------------------------------------------


@pytest.mark.parametrize("keyed", [False, True], ids=["no key", "key"])
@pytest.mark.parametrize("route", WRITE_ROUTES, ids=str)
def test_a_body_nested_1000_deep_is_never_a_500(exact, user, task_id, make_token, route, keyed):
    headers = [bearer(make_token(user)), ("Content-Type", "application/json")]
    if keyed:
        headers.append(("Idempotency-Key", f"deep-{route.method}-{route.template}"))
    response = raw_request(exact, route, user, task_id, headers, content=nested(DEEP))
    if route.has_body:  # validation refuses it, key or not
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"][0] == "body"
    else:  # toggle and delete take no body: ignored, the write is done
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("route", WRITE_ROUTES, ids=str)
def test_a_retry_of_a_deeply_nested_body_is_answered_alike(exact, user, task_id, make_token, route):
    headers = [bearer(make_token(user)), ("Idempotency-Key", "deep-retry")]
    first = raw_request(exact, route, user, task_id, headers, content=nested(5000))
    again = raw_request(exact, route, user, task_id, headers, content=nested(5000))
    assert first.status_code == again.status_code != 500
    assert first.json() == again.json()


# --- If-Match: strong comparison, character by character -----------------------------------------

NOT_OURS = [
    b'"\xb2"',  # superscript two: isdigit() but not int()
    b'"\xb3"',
    b'"\xb9"',
    b'"1\xb3"',
    b'"01"',  # numerically 1, but another tag
    b'"000000001"',
    b'"+1"',
    b'" 1"',
    b'W/"1"',  # weak: never matches strongly
    b'"1.0"',
    b'"2147483648"',  # past the version column's range
    b'"99999999999999999999"',
    '"١"'.encode(),  # Arabic-Indic one, as UTF-8 bytes
]


@pytest.mark.parametrize("tag", NOT_OURS, ids=repr)
@pytest.mark.parametrize("route", CONDITIONAL_WRITES, ids=str)
def test_an_if_match_that_is_not_the_current_tag_is_412_and_writes_nothing(
    exact, user, task_id, session, make_token, route, tag
):
    before = snapshot(session)
    headers = [bearer(make_token(user)), ("If-Match", tag)]
    body = {"json": {"title": "changed"}} if route.has_body else {}
    response = raw_request(exact, route, user, task_id, headers, **body)
    assert response.status_code == 412, response.text
    assert snapshot(session) == before


@pytest.mark.parametrize("tag", NOT_OURS, ids=repr)
@pytest.mark.parametrize("route", CONDITIONAL_WRITES, ids=str)
def test_an_odd_if_match_on_a_foreign_or_missing_task_is_404(
    exact, user, other_user, make_token, route, tag
):
    foreign = TaskFactory(user_id=other_user.id)
    body = {"json": {"title": "changed"}} if route.has_body else {}
    for task_id in (foreign.id, 2_000_000_000):
        for keyed in (False, True):
            headers = [bearer(make_token(user)), ("If-Match", tag)]
            if keyed:
                headers.append(("Idempotency-Key", f"odd-{task_id}"))
            response = raw_request(exact, route, user, task_id, headers, **body)
            assert response.status_code == 404, response.text
            assert response.json() == {"detail": "Task not found"}


@pytest.mark.parametrize("route", CONDITIONAL_WRITES, ids=str)
def test_every_if_match_line_counts(exact, user, task_id, make_token, route):
    token = make_token(user)
    body = {"json": {"title": "changed"}} if route.has_body else {}
    # The current tag on the first line, a stale one on the second: one list, and it matches.
    headers = [bearer(token), ("If-Match", '"1"'), ("If-Match", '"999"')]
    assert raw_request(exact, route, user, task_id, headers, **body).status_code == 200


@pytest.mark.parametrize("route", CONDITIONAL_WRITES, ids=str)
def test_no_if_match_line_naming_the_tag_is_412(exact, user, task_id, make_token, route):
    body = {"json": {"title": "changed"}} if route.has_body else {}
    headers = [bearer(make_token(user)), ("If-Match", '"7"'), ("If-Match", '"01", W/"1"')]
    assert raw_request(exact, route, user, task_id, headers, **body).status_code == 412


def test_every_if_none_match_line_counts(exact, user, task_id, make_token):
    get = next(route for route in ROUTES if route.method == "GET" and "{task}" in route.template)
    token = make_token(user)
    current = exact.get(get.url(user.id, task_id), headers=[bearer(token)]).headers["ETag"]
    # The current tag on the first line: 304, whatever the second says.
    headers = [bearer(token), ("If-None-Match", current), ("If-None-Match", '"999"')]
    response = raw_request(exact, get, user, task_id, headers)
    assert response.status_code == 304
    assert response.headers["ETag"] == current
    # On the second line: still 304.
    headers = [bearer(token), ("If-None-Match", '"999"'), ("If-None-Match", current)]
    assert raw_request(exact, get, user, task_id, headers).status_code == 304
    # On neither: the full answer.
    headers = [bearer(token), ("If-None-Match", '"999"'), ("If-None-Match", '"01"')]
    assert raw_request(exact, get, user, task_id, headers).status_code == 200


def test_if_none_match_compares_weakly_but_exactly(exact, user, task_id, make_token):
    get = next(route for route in ROUTES if route.method == "GET" and "{task}" in route.template)
    token = make_token(user)
    for tag, status in [('W/"1"', 304), ('"1"', 304), ('"01"', 200), ('"\xb9"', 200)]:
        headers = [bearer(token), ("If-None-Match", tag.encode("latin-1"))]
        assert raw_request(exact, get, user, task_id, headers).status_code == status, tag


# --- property-based: arbitrary bytes in every header the service reads, and in the body ----------

# What a route may answer, whatever it was sent; never a 5xx (the database is up).
DEFINED = {200, 201, 304, 400, 401, 403, 404, 409, 412, 413, 422}
READ_HEADERS = ["Authorization", "Content-Type", "If-Match", "If-None-Match", "Idempotency-Key"]

header_values = st.one_of(
    st.binary(max_size=200),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=200).map(
        lambda value: value.encode("latin-1")
    ),
    # Near-misses of well-formed values, where parsers take a second step.
    st.lists(
        st.sampled_from(['"1"', "W/", "*", ",", " ", '"', "\t", "\xb2", "0", "9" * 12, "Bearer"]),
        max_size=8,
    ).map(lambda parts: "".join(parts).encode("latin-1")),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children)
    ),
    max_leaves=20,
)
bodies = st.one_of(
    st.binary(max_size=400),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.fixed_dictionaries(
        {"title": st.text(max_size=210)},
        optional={"description": st.none() | st.text(max_size=50), "completed": json_values},
    ).map(lambda value: json.dumps(value).encode()),
    st.integers(min_value=1, max_value=20_000).map(nested),
)
fuzz = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.parametrize("route", ROUTES, ids=str)
@fuzz
@given(
    header=st.sampled_from(READ_HEADERS),
    value=header_values,
    extra=st.lists(st.tuples(st.sampled_from(READ_HEADERS), header_values), max_size=3),
    body=bodies,
)
def test_any_bytes_in_a_read_header_get_a_defined_answer(
    exact, user, task_id, make_token, route, header, value, extra, body
):
    headers = [bearer(make_token(user)), (header, value), *extra]
    response = raw_request(exact, route, user, task_id, headers, content=body)
    assert_defined(response, DEFINED)


@pytest.mark.parametrize("route", WRITE_ROUTES, ids=str)
@fuzz
@given(
    body=bodies,
    key=st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=40),
    content_type=st.sampled_from(["application/json", "text/plain", "", "application/json; x"]),
)
def test_any_body_with_or_without_a_key_gets_a_defined_answer(
    exact, user, task_id, make_token, route, body, key, content_type
):
    for headers in (
        [bearer(make_token(user)), ("Content-Type", content_type)],
        [bearer(make_token(user)), ("Content-Type", content_type), ("Idempotency-Key", key)],
    ):
        response = raw_request(exact, route, user, task_id, headers, content=body)
        assert_defined(response, DEFINED)


@pytest.mark.parametrize("route", ROUTES, ids=str)
@fuzz
@given(value=header_values)
def test_any_authorization_is_401_and_reaches_no_row(exact, user, task_id, session, route, value):
    before = session.execute(text("SELECT count(*), max(version) FROM tasks")).one()
    response = raw_request(exact, route, user, task_id, [("Authorization", value)])
    assert response.status_code == 401, response.text
    assert "detail" in response.json()
    assert session.execute(text("SELECT count(*), max(version) FROM tasks")).one() == before


# --- property-based: the parsers alone, on any input ---------------------------------------------


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from(["POST", "PUT", "PATCH", "DELETE"]), path=st.text(), body=bodies)
def test_the_fingerprint_takes_any_body(method, path, body):
    first = idempotency.fingerprint(method, path, body)
    assert first == idempotency.fingerprint(method, path, body)
    assert len(first) == 64


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_the_fingerprint_ignores_spacing_and_key_order(value):
    compact = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
    spaced = json.dumps(value, indent=2).encode()
    assert idempotency.fingerprint("POST", "/p", compact) == idempotency.fingerprint(
        "POST", "/p", spaced
    )


@settings(max_examples=500, deadline=None)
@given(lines=st.lists(header_values.map(lambda value: value.decode("latin-1")), min_size=1))
def test_the_entity_tag_parsers_take_any_field(lines):
    field = conditional.field_value(lines)
    versions = conditional.if_match_versions(field)
    if versions is not None:
        for version in versions:  # only tags `strong_etag` makes, within the column's range
            assert 1 <= version <= 2**31 - 1
            assert conditional.strong_etag(version) in field
    for etag in ('"1"', 'W/"abc"'):
        assert conditional.none_match(field, etag) in (True, False)


@settings(max_examples=300, deadline=None)
@given(version=st.integers(min_value=1, max_value=2**31 - 1), noise=st.sampled_from(["0", " "]))
def test_if_match_matches_exactly_the_tag_it_was_given(version, noise):
    tag = conditional.strong_etag(version)
    assert conditional.if_match_versions(tag) == [version]
    assert conditional.if_match_versions(f'"{noise}{version}"') == []
    assert conditional.if_match_versions(f"W/{tag}") == []


@settings(max_examples=500, deadline=None)
@given(value=st.binary(max_size=300))
def test_the_key_parser_takes_any_bytes(value):
    try:
        key = idempotency.valid_key(value)
    except HTTPException as exc:
        assert exc.status_code == 400
    else:
        assert key.encode("ascii") == value
