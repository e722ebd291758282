"""The task routes served directly (`DirectRoute`) answer exactly as FastAPI's own handler does.

Each request goes to the app as served and to a twin whose routes all use FastAPI's handler,
on the same data, each in a savepoint rolled back afterwards; status, body and the headers a
client reads must be the same. The hostile inputs are the point: where the direct path is
unsure it hands the request to FastAPI's handler, and this shows that it is unsure exactly
where it should be.
"""

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, request_response
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlmodel import Session

from backend.main import create_app
from backend.platform import direct_route
from backend.platform.config import Settings
from backend.platform.direct_dispatch import DirectDispatchMiddleware
from backend.platform.direct_route import DirectRoute, NotDirect
from tests.factories import TaskFactory, UserFactory
from tests.in_test_transaction import serve_in_session, stop_serving_in_session

COMPARED_HEADERS = ("content-type", "etag", "www-authenticate", "allow", "idempotent-replayed")


@pytest.fixture(scope="module")
def fastapi_app(settings: Settings, engine: Engine) -> FastAPI:
    """The same app, every route a copy built on FastAPI's own handler (the slices declare their
    routes once, at import, and every app serves those same route objects)."""
    twin = create_app(settings, engine=engine)
    with pytest.MonkeyPatch.context() as patch:

        def refuse(route: APIRoute) -> Any:
            raise NotDirect("compared")

        patch.setattr(direct_route.DirectCall, "of", refuse)
        for index, route in enumerate(twin.router.routes):
            if isinstance(route, DirectRoute):
                clone = copy.copy(route)
                clone.app = request_response(clone.get_route_handler())
                assert clone.direct is None
                twin.router.routes[index] = clone
    return twin


@pytest.fixture
def both(app: FastAPI, fastapi_app: FastAPI, session: Session, make_token) -> Iterator[Any]:
    """compare(method, template, auth="own"|"other"|"bad"|"none", **request): the request sent
    to each app, each on a user and task of its own made alike ("{u}" and "{t}" in the
    template), and their answers compared."""
    serve_in_session(app, session)
    serve_in_session(fastapi_app, session)
    clients = (TestClient(app), TestClient(fastapi_app))

    def compare(method: str, template: str, auth: str = "own", **kwargs: Any) -> Any:
        answers = []
        for client in clients:
            user = UserFactory()
            task = TaskFactory(user_id=user.id, title="alike", description="the same")
            headers = dict(kwargs.get("headers") or {})
            if auth == "own":
                headers["Authorization"] = f"Bearer {make_token(user)}"
            elif auth == "other":
                headers["Authorization"] = f"Bearer {make_token(UserFactory())}"
            elif auth == "bad":
                headers["Authorization"] = "Bearer nope"
            if "{version}" in headers.get("If-None-Match", ""):
                headers["If-None-Match"] = f'"{task.version}"'
            path = template.format(u=user.id, t=task.id)
            request = {**kwargs, "headers": headers}
            answers.append(client.request(method, path, **request))
        direct, fastapi = answers
        assert direct.status_code < 500, (method, template, kwargs, direct.text)
        assert direct.status_code == fastapi.status_code, (method, template, kwargs, direct.text)
        assert _comparable(direct) == _comparable(fastapi), (method, template, kwargs)
        for name in COMPARED_HEADERS:
            assert _header(direct, name) == _header(fastapi, name), (name, method, template)
        return direct

    try:
        yield compare
    finally:
        stop_serving_in_session(app)
        stop_serving_in_session(fastapi_app)


def test_every_task_route_is_served_directly(app: FastAPI) -> None:
    routes = [r for r in app.routes if isinstance(r, APIRoute) and r.path.startswith("/api/")]
    assert routes
    for route in routes:
        assert isinstance(route, DirectRoute)
        assert route.direct is not None, f"{route.path}: {route.not_direct_because}"


def _dispatch_layer(app: FastAPI) -> DirectDispatchMiddleware:
    layer = app.middleware_stack = app.build_middleware_stack()
    while not isinstance(layer, DirectDispatchMiddleware):
        layer = layer.app
    return layer


def test_every_task_route_is_dispatched_to_without_the_router(
    settings: Settings, engine: Engine, session: Session, make_token
) -> None:
    """The task routes are matched by `DirectDispatchMiddleware`: the layers after it (the
    exception middleware, the router) see only the requests it leaves to them."""
    app = create_app(settings, engine=engine)
    dispatch = _dispatch_layer(app)
    assert dispatch.why_not == ""
    task_routes = [r for r in app.routes if getattr(r, "path", "").startswith("/api/")]
    assert [entry[4] for entry in dispatch.routes] == task_routes
    reached_router: list[str] = []
    rest = dispatch.app

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        reached_router.append(scope["path"])
        await rest(scope, receive, send)

    dispatch.app = counting
    user = UserFactory()
    task = TaskFactory(user_id=user.id)
    session.flush()
    serve_in_session(app, session)
    try:
        client = TestClient(app)
        auth = {"Authorization": f"Bearer {make_token(user.id)}"}
        base = f"/api/{user.id}/tasks"
        assert client.get(f"{base}/{task.id}", headers=auth).status_code == 200
        assert client.patch(f"{base}/{task.id}/complete", headers=auth).status_code == 200
        assert client.get(f"{base}/{task.id}", headers={}).status_code == 401
        assert client.get(f"{base}/999999999", headers=auth).status_code == 404
        assert reached_router == []
        # Not a task route, or not one for this method: the router decides, as before.
        assert client.get("/health").status_code == 200
        assert client.request("TRACE", base, headers=auth).status_code == 405
        assert client.get(f"{base}/{task.id}/nowhere", headers=auth).status_code == 404
        assert reached_router == ["/health", base, f"{base}/{task.id}/nowhere"]
    finally:
        stop_serving_in_session(app)


def test_a_route_listed_before_the_task_routes_still_wins(
    settings: Settings, engine: Engine
) -> None:
    """Dispatch tries only the direct routes at the head of the route list, so the router's
    first match is always the one that serves."""
    app = create_app(settings, engine=engine)

    async def shadow(user_id: str) -> dict[str, str]:
        return {"shadowed": user_id}

    app.router.routes.insert(0, APIRoute("/api/{user_id}/tasks", shadow, methods=["GET"]))
    assert _dispatch_layer(app).routes == ()
    assert TestClient(app).get("/api/someone/tasks").json() == {"shadowed": "someone"}


BODIES: list[Any] = [
    {"title": "x"},
    {"title": "  padded  ", "description": None, "completed": True},
    {"title": "t" * 201},
    {"title": "nul\x00"},
    {"title": "\ud800"},
    {"title": None},
    {"title": 5},
    {"completed": "true"},
    {"description": "d" * 1001},
    {"id": 99, "user_id": "someone", "title": "ignored extras"},
    {},
    [],
    "title",
    None,
]
RAW_BODIES = [
    b"",
    b"{",
    b'{"title": "x"',
    b'{"title": NaN}',
    b'{"title": "x", "junk": NaN}',
    b'{"title": "x", "junk": ' + b"9" * 5000 + b"}",
    b"[" * 5000 + b"]" * 5000,
    b'{"title": "\xff\xfe"}',
    b'\xef\xbb\xbf{"title": "bom"}',
    '{"title": "utf-16"}'.encode("utf-16"),
    b'{"title": "a\tb"}',
    b'{"title": "dup", "title": "second"}',
]
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "Application/JSON",
    "application/vnd.api+json",
    "text/plain",
    None,
]


@pytest.mark.parametrize("method, suffix", [("POST", ""), ("PUT", "/{t}"), ("PATCH", "/{t}")])
def test_bodies_answer_as_fastapi_does(both, method, suffix) -> None:
    path = "/api/{u}/tasks" + suffix
    json_type = {"Content-Type": "application/json"}
    for body in BODIES:
        both(method, path, content=json.dumps(body), headers=json_type)
    for raw in RAW_BODIES:
        both(method, path, content=raw, headers=json_type)
    for content_type in CONTENT_TYPES:
        headers = {} if content_type is None else {"Content-Type": content_type}
        both(method, path, content=b'{"title": "typed"}', headers=headers)


@pytest.mark.parametrize(
    "task_id",
    [
        *["{t}", "0", "-1", "1.5", "abc", "2147483648", "99999999999", "%C2%B2", "007"],
        *["9" * 5000, "%2F", "%00", "{t}%20", "\u0661"],  # past int()'s digit limit, encoded
    ],
)
@pytest.mark.parametrize(
    "method, suffix",
    [("GET", ""), ("DELETE", ""), ("PATCH", "/complete"), ("PUT", ""), ("PATCH", "")],
)
def test_task_ids_answer_as_fastapi_does(both, method, suffix, task_id) -> None:
    both(method, "/api/{u}/tasks/" + task_id + suffix, json={"title": "by id"})


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?status=all",
        "?status=pending",
        "?status=completed",
        "?status=done",
        "?status=",
        "?status=ALL",
        "?status=all&status=nope",
        "?status=nope&status=all",
        "?other=1",
    ],
)
def test_queries_answer_as_fastapi_does(both, query) -> None:
    both("GET", "/api/{u}/tasks" + query)


def test_refusals_and_headers_answer_as_fastapi_does(both) -> None:
    path = "/api/{u}/tasks/{t}"
    for auth in ("none", "bad", "other"):
        both("GET", path, auth=auth)
        both("PUT", path, auth=auth, content=b"{", headers={"Content-Type": "application/json"})
    both("GET", path, headers={"If-None-Match": "{version}"})
    both("PUT", path, json={"title": "m"}, headers={"If-Match": '"999"'})
    both("PUT", path, json={"title": "m"}, headers={"If-Match": '"1"'})
    both("PATCH", path + "/complete", headers={"Idempotency-Key": " "})
    both("PATCH", path + "/complete", headers={"Idempotency-Key": "a-key"})
    both("POST", "/api/{u}/tasks", json={"title": "k"}, headers={"Idempotency-Key": "a-key"})
    both("DELETE", path)


def _header(response: Any, name: str) -> str | None:
    """The header; a weak ETag only as such, since it digests a body that holds ids."""
    value = response.headers.get(name)
    return "W/masked" if name == "etag" and value and value.startswith("W/") else value


def _comparable(response: Any) -> Any:
    """The body, with what two successful writes cannot share (the clock, a new id) masked."""
    if not response.is_success or not response.content:
        return response.content
    document = response.json()
    for task in document if isinstance(document, list) else [document]:
        for name in ("id", "user_id", "created_at", "updated_at"):
            task[name] = "masked"
    return document
