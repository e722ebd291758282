"""Input attacks: hostile bodies, ids, path user ids and query values from a signed-in user.

Each is refused with 422 (or 404 for ids, 413 for size, 403/404 for foreign paths), never a
500, without echoing the input back, and with the database exactly as it was. What is valid,
however odd (emoji and right-to-left text at the 200-character edge, SQL text as a title), is
stored and returned exactly.
"""

import re
from urllib.parse import quote

import pytest
from sqlalchemy import text

from tests.attack_surface import ROUTES, SINGLE_TASK_ROUTES, send, snapshot
from tests.factories import TaskFactory, UserFactory

WRITE_ROUTES = [r for r in ROUTES if r.has_body]  # create, replace, edit


def _body_for(route, payload):
    """PUT needs a title; the attack is in the other fields."""
    if route.method == "PUT" and "title" not in payload:
        return {"title": "valid", **payload}
    return payload


def _assert_422_unchanged(response, session, before, *secrets):
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail
    assert all(set(problem) == {"type", "loc", "msg"} for problem in detail)
    for secret in secrets:
        assert secret not in response.text  # no input echo
    assert snapshot(session) == before


# --- field values ---------------------------------------------------------------------------------

INVALID_FIELDS = [
    ("NUL in title", {"title": "before\x00after"}, "title"),
    ("NUL alone as title", {"title": "\x00"}, "title"),
    ("NUL in description", {"description": "line one\x00DROP"}, "description"),
    ("201-character title", {"title": "t" * 201}, "title"),
    ("201 emoji", {"title": "\U0001f600" * 201}, "title"),
    ("empty title", {"title": ""}, "title"),
    ("whitespace-only title", {"title": "   "}, "title"),
    ("tabs and newlines title", {"title": "\t\n\r "}, "title"),
    ("unicode-space title", {"title": "\u00a0\u2003\u3000"}, "title"),
    ("1001-character description", {"description": "d" * 1001}, "description"),
    ("title a number", {"title": 12345}, "title"),
    ("title a list", {"title": ["a"]}, "title"),
    ("title an object", {"title": {"$ne": None}}, "title"),
    ("title true", {"title": True}, "title"),
    ("title null", {"title": None}, "title"),
    ("description a number", {"description": 5}, "description"),
    ("description a list", {"description": ["x"]}, "description"),
    ("completed a string", {"completed": "true"}, "completed"),
    ("completed 1", {"completed": 1}, "completed"),
    ("completed 0", {"completed": 0}, "completed"),
    ("completed null", {"completed": None}, "completed"),
]


@pytest.mark.parametrize("route", WRITE_ROUTES, ids=str)
@pytest.mark.parametrize(
    ("name", "payload", "field"), INVALID_FIELDS, ids=[c[0] for c in INVALID_FIELDS]
)
def test_invalid_fields_are_422_and_store_nothing(
    api, user, task, session, route, name, payload, field
):
    before = snapshot(session)
    body = _body_for(route, payload)
    response = send(api.client, route, user.id, task.id, json=body, headers=api.headers)
    _assert_422_unchanged(response, session, before)
    assert ["body", field] in [problem["loc"][:2] for problem in response.json()["detail"]]


def test_422_never_echoes_the_input(api, session):
    before = snapshot(session)
    marker = "SECRET-MARKER-" + "x" * 300
    for payload in (
        {"title": marker},
        {"title": marker[:50] + "\x00"},
        {"title": "ok", "description": marker * 4},
        {"title": "ok", "completed": marker},
    ):
        response = api.post("/tasks", json=payload)
        _assert_422_unchanged(response, session, before, marker[:50])


# --- odd but valid text, at the edge ------------------------------------------------------------

VALID_EDGE_TITLES = [
    ("200 ASCII", "t" * 200),
    ("200 emoji", "\U0001f600" * 200),
    ("200 emoji, ZWJ family pieces", ("\U0001f468\u200d\U0001f469\u200d\U0001f467" * 40)),
    ("200 Hebrew", "\u05e9\u05dc\u05d5\u05dd" * 50),
    ("200 Arabic with RLO", "\u202e" + "\u0645\u0631\u062d\u0628\u0627" * 39 + "\u202c" * 4),
    ("200 combining marks", "e\u0301" * 100),
    ("200 after trimming", "   " + "x" * 200 + "\n\t "),
    ("SQL text", "'); DROP TABLE tasks; --"),
    ("HTML", "<script>alert(1)</script>"),
    ("JSON-looking", '{"user_id": "someone-else"}'),
]


@pytest.mark.parametrize(
    ("name", "title"), VALID_EDGE_TITLES, ids=[c[0] for c in VALID_EDGE_TITLES]
)
def test_odd_but_valid_titles_are_stored_exactly(api, user, session, name, title):
    expected = title.strip()
    assert len(expected) <= 200
    created = api.post("/tasks", json={"title": title, "description": title})
    assert created.status_code == 201, created.text
    task = created.json()
    assert task["title"] == expected
    assert task["description"] == title  # descriptions are not trimmed
    stored = session.execute(
        text("SELECT title, description, user_id FROM tasks WHERE id = :id"), {"id": task["id"]}
    ).one()
    assert tuple(stored) == (expected, title, user.id)
    assert api.get(f"/tasks/{task['id']}").json() == task
    for method in ("put", "patch"):
        edited = getattr(api, method)(f"/tasks/{task['id']}", json={"title": title})
        assert edited.status_code == 200
        assert edited.json()["title"] == expected


def test_exactly_200_emoji_is_200_characters_not_800_bytes(api):
    title = "\U0001f600" * 200
    assert len(title.encode()) == 800
    assert api.post("/tasks", json={"title": title}).status_code == 201
    assert api.post("/tasks", json={"title": title + "\U0001f600"}).status_code == 422


def test_the_1000_character_description_edge(api):
    assert (
        api.post("/tasks", json={"title": "t", "description": "\u05e9" * 1000}).status_code == 201
    )
    assert (
        api.post("/tasks", json={"title": "t", "description": "\u05e9" * 1001}).status_code == 422
    )


# --- malformed JSON -------------------------------------------------------------------------------

MALFORMED_BODIES = [
    ("open brace", b"{"),
    ("empty array", b"[]"),
    ("array of a task", b'[{"title": "a"}]'),
    ("a string", b'"str"'),
    ("null", b"null"),
    ("a number", b"123"),
    ("true", b"true"),
    ("trailing comma in object", b'{"title": "a",}'),
    ("trailing comma in array", b'{"title": ["a",]}'),
    ("two documents", b'{"title": "a"} {"title": "b"}'),
    ("unterminated string", b'{"title": "a'),
    ("single quotes", b"{'title': 'a'}"),
    ("unquoted key", b'{title: "a"}'),
    ("comment", b'{"title": "a" /* x */}'),
    ("empty body", b""),
    ("whitespace body", b"   \n"),
    ("NaN", b'{"title": "a", "completed": NaN}'),
    ("Infinity", b'{"title": "a", "completed": Infinity}'),
    ("not UTF-8", b'{"title": "\xff\xfe\xfd"}'),
    ("nested 30000 deep", b"[" * 30_000 + b"]" * 30_000),  # deeper than the parser goes
    ("lone surrogate escape", b'{"title": "\\ud800"}'),
    ("lone low surrogate escape", b'{"title": "ok", "description": "a\\udfffb"}'),
    ("a 5000-digit number", b'{"title": "a", "completed": ' + b"9" * 5000 + b"}"),
    ("raw NUL byte", b'{"title": "a\x00b"}'),
]


@pytest.mark.parametrize("route", WRITE_ROUTES, ids=str)
@pytest.mark.parametrize(("name", "body"), MALFORMED_BODIES, ids=[c[0] for c in MALFORMED_BODIES])
def test_malformed_json_is_422_and_stores_nothing(api, user, task, session, route, name, body):
    before = snapshot(session)
    response = send(
        api.client,
        route,
        user.id,
        task.id,
        content=body,
        headers={**api.headers, "Content-Type": "application/json"},
    )
    _assert_422_unchanged(response, session, before)
    assert response.json()["detail"][0]["loc"][0] == "body"


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
    ],
)
def test_a_body_that_is_not_declared_json_is_422(api, user, task, session, content_type):
    before = snapshot(session)
    for route in WRITE_ROUTES:
        response = send(
            api.client,
            route,
            user.id,
            task.id,
            content=b'{"title": "sneaky"}',
            headers={**api.headers, "Content-Type": content_type},
        )
        _assert_422_unchanged(response, session, before)


# --- size -----------------------------------------------------------------------------------------

ONE_MB = b'{"title": "' + b"a" * (1024 * 1024) + b'"}'


def _chunks():
    for start in range(0, len(ONE_MB), 65536):
        yield ONE_MB[start : start + 65536]


@pytest.mark.parametrize("route", ROUTES, ids=str)
@pytest.mark.parametrize("signed_in", [True, False], ids=["signed in", "no token"])
def test_a_1mb_body_is_refused_by_its_length_before_anything_else(
    client, user, task, session, auth_headers, route, signed_in
):
    before = snapshot(session)
    headers = {"Content-Type": "application/json", **(auth_headers(user) if signed_in else {})}
    response = send(client, route, user.id, task.id, content=ONE_MB, headers=headers)
    assert response.status_code == 413
    assert response.json() == {"detail": "Request body exceeds 65536 bytes"}
    assert response.headers["connection"] == "close"
    assert snapshot(session) == before


@pytest.mark.parametrize("route", WRITE_ROUTES, ids=str)
def test_a_1mb_body_streamed_without_a_length_is_cut_off_with_413(
    client, user, task, session, auth_headers, route
):
    before = snapshot(session)
    headers = {"Content-Type": "application/json", **auth_headers(user)}
    response = send(client, route, user.id, task.id, content=_chunks(), headers=headers)
    assert response.status_code == 413
    assert response.json() == {"detail": "Request body exceeds 65536 bytes"}
    assert snapshot(session) == before


@pytest.mark.parametrize("route", WRITE_ROUTES, ids=str)
def test_a_streamed_body_without_a_token_is_401_before_it_is_read(
    client, user, task, session, route
):
    before = snapshot(session)
    headers = {"Content-Type": "application/json"}
    response = send(client, route, user.id, task.id, content=_chunks(), headers=headers)
    assert response.status_code == 401
    assert snapshot(session) == before


def test_a_body_just_under_the_limit_is_judged_on_its_content(api, session):
    before = snapshot(session)
    body = b'{"title": "a", "description": "' + b"d" * 60_000 + b'"}'
    response = api.post("/tasks", content=body, headers={"Content-Type": "application/json"})
    _assert_422_unchanged(response, session, before)  # too long a description, not too big


# --- task ids -------------------------------------------------------------------------------------

ODD_TASK_IDS = [
    "2147483648",  # one past the integer column
    "2147483647",  # the column's maximum: a valid id no row has
    "9223372036854775808",
    "99999999999999999999",
    "1" * 400,
    "0",
    "-1",
    "-2147483649",
    "01",
    "+1",
    "1.0",
    "1e3",
    "0x10",
    "1_000",
    " 1",
    "1%20",
    "\u0661",  # Arabic-Indic digit one
    "\u00b2",  # superscript two: str.isdigit() says yes
    "\uff11",  # fullwidth one
    "null",
    "undefined",
    "1;DROP TABLE tasks",
    "1 OR 1=1",
    "%00",
    "1%00",
]


@pytest.mark.parametrize("route", SINGLE_TASK_ROUTES, ids=str)
@pytest.mark.parametrize("raw_id", ODD_TASK_IDS)
def test_odd_task_ids_are_404_and_change_nothing(api, user, other_user, session, route, raw_id):
    TaskFactory(user_id=other_user.id)
    TaskFactory(user_id=user.id)
    before = snapshot(session)
    response = send(api.client, route, user.id, raw_id, headers=api.headers)
    assert response.status_code == 404, response.text
    assert response.json() == {"detail": "Task not found"}
    assert snapshot(session) == before


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
@pytest.mark.parametrize("raw_id", ["0", "abc", "99999999999"])
def test_an_impossible_task_id_is_404_before_the_body_is_read(api, user, method, raw_id):
    """The id is checked right after the token: malformed JSON behind it is never parsed."""
    response = api.client.request(
        method,
        f"/api/{user.id}/tasks/{raw_id}",
        content=b'{"title": ',
        headers={**api.headers, "Content-Type": "application/json"},
    )
    assert response.status_code == 404, response.text
    assert response.json() == {"detail": "Task not found"}


# --- path user ids ------------------------------------------------------------------------------

ODD_PATH_USERS = [
    # (path segment as sent, expected status): 404 where the segment does not even route
    ("..", 404),
    ("%2E%2E", 403),
    ("a%2Fb", 404),
    ("%2F", 404),
    ("%2E%2E%2F%2E%2E%2Fetc", 404),
    ("x" * 300, 403),
    ("' OR '1'='1", 403),
    ("1;DROP TABLE tasks", 403),
    ("%00", 403),
    ("%ZZ", 403),
    ("%C0%AF", 403),
    ("%F0%9F%98%80", 403),
    ("*", 403),
    ("%20", 403),
]


@pytest.mark.parametrize("route", ROUTES, ids=str)
@pytest.mark.parametrize(
    ("segment", "status"), ODD_PATH_USERS, ids=[c[0][:20] for c in ODD_PATH_USERS]
)
def test_odd_path_user_ids_are_refused(
    client, user, task, session, auth_headers, route, segment, status
):
    before = snapshot(session)
    response = send(client, route, segment, task.id, headers=auth_headers(user))
    assert response.status_code == status, response.text
    assert "detail" in response.json()
    assert snapshot(session) == before


@pytest.mark.parametrize(
    "odd_id",
    ["' OR '1'='1", "x" * 300, "..", "a/b", "\U0001f600", "%", "user\\0"],
    ids=["SQL", "300 chars", "dots", "slash", "emoji", "percent", "backslash"],
)
def test_users_with_odd_ids_are_isolated_like_anyone(client, user, auth_headers, odd_id):
    """An id is only ever a bound parameter: a user literally named `' OR '1'='1` sees their own
    tasks and no one else's."""
    TaskFactory(user_id=user.id, title="not theirs")
    odd = UserFactory(id=odd_id, email=f"odd-{len(odd_id)}-{ord(odd_id[0])}@example.com")
    # percent-encode everything, dots included (a literal `..` segment is resolved by the client)
    base = f"/api/{quote(odd_id, safe='').replace('.', '%2E')}/tasks"
    headers = auth_headers(odd)
    if "/" in odd_id:
        # an encoded slash is decoded before routing: such an id cannot address the API at all
        assert client.get(base, headers=headers).status_code == 404
        return
    assert client.get(base, headers=headers).json() == []
    created = client.post(base, json={"title": "mine"}, headers=headers)
    assert created.status_code == 201
    assert created.json()["user_id"] == odd_id
    assert [t["title"] for t in client.get(base, headers=headers).json()] == ["mine"]


# --- the status filter --------------------------------------------------------------------------

BAD_STATUS_VALUES = [
    "done",
    "ALL",
    "Pending",
    "",
    " all",
    "completed'--",
    "pending\x00",
    "all;DROP TABLE tasks",
    "true",
    "1",
    "\u202epending",
    "p" * 10_000,
]


@pytest.mark.parametrize("value", BAD_STATUS_VALUES, ids=[repr(v[:15]) for v in BAD_STATUS_VALUES])
def test_unknown_status_filter_values_are_422(api, task, session, value):
    before = snapshot(session)
    response = api.get("/tasks", params={"status": value})
    _assert_422_unchanged(response, session, before)
    assert response.json()["detail"][0]["loc"] == ["query", "status"]
    if len(value) > 8:
        assert value not in response.text


# --- what the schema promises is what the server does --------------------------------------------

TITLE_PROBES = [
    "a",
    " a ",
    "x" * 200,
    "\U0001f600",
    "\ufeff",  # not whitespace to Python: kept, and the pattern agrees
    "\u200b",  # zero-width space: likewise
    "",
    " ",
    "\t\n\r",
    "\u00a0",
    "\u2003\u3000",
    "\x1c\x1d\x1e\x1f",  # whitespace to Python's str.strip(), not to pydantic: a title
    "\x85",  # NEL: whitespace to both
    "\x00",
    "a\x00",
    "\x00a",
    " \x00 ",
    " " + "x" * 200,  # 200 once trimmed: accepted
    "\t" * 3 + "x" * 200 + "\n\u3000",
    "x" * 199 + " " + "y",
    "x" * 201,
    " " + "x" * 201 + " ",
]


def test_the_documented_title_rules_are_exactly_the_enforced_ones(api):
    """The fuzzer trusts the schema: a title it may send must be accepted, one it may not must
    be refused. The pattern and length limits published for `title` say precisely which."""
    schema = api.client.get("/openapi.json").json()["components"]["schemas"]["TaskCreate"]
    rules = schema["properties"]["title"]
    pattern = re.compile(rules["pattern"])
    for title in TITLE_PROBES:
        within = rules.get("minLength", 0) <= len(title) <= rules.get("maxLength", len(title))
        documented = within and bool(pattern.search(title))
        response = api.post("/tasks", json={"title": title})
        assert response.status_code == (201 if documented else 422), repr(title)


def test_the_documented_description_rules_are_exactly_the_enforced_ones(api):
    schema = api.client.get("/openapi.json").json()["components"]["schemas"]["TaskCreate"]
    (rules,) = [s for s in schema["properties"]["description"]["anyOf"] if s["type"] == "string"]
    pattern = re.compile(rules["pattern"])
    for description in ["", " ", "\x00", "a\x00b", "d" * 1000, "d" * 1001, "\u05e9" * 1000]:
        documented = len(description) <= rules["maxLength"] and bool(pattern.search(description))
        response = api.post("/tasks", json={"title": "t", "description": description})
        assert response.status_code == (201 if documented else 422), repr(description)


def test_task_ids_are_documented_as_the_integers_the_column_holds(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path, operations in paths.items():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "task_id":
                    schema = parameter["schema"]
                    assert (schema["type"], schema["minimum"], schema["maximum"]) == (
                        "integer",
                        1,
                        2**31 - 1,
                    ), path


@pytest.mark.parametrize(
    ("path", "allowed", "refused"),
    [
        ("/tasks", "GET, POST", ["PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"]),
        ("/tasks/1", "DELETE, GET, PATCH, PUT", ["POST", "OPTIONS", "TRACE"]),
        ("/tasks/1/complete", "PATCH", ["GET", "PUT", "POST", "DELETE", "OPTIONS"]),
    ],
)
def test_an_unsupported_method_is_405_naming_every_method_the_path_has(
    api, session, path, allowed, refused
):
    before = snapshot(session)
    for method in refused:
        response = api.request(method, path, json=BODY_FOR_405)
        assert response.status_code == 405, method
        assert response.headers["allow"] == allowed, method
        assert response.json() == {"detail": "Method Not Allowed"}
    assert snapshot(session) == before


BODY_FOR_405 = {"title": "should not be stored"}
