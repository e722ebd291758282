"""FastAPI behaviour the service leans on for speed beyond its documented guarantees, pinned.

`mount_routes` (backend/main.py) serves each slice's routes from the app's own route list
instead of `include_router`, which relies on APIRouter having baked the prefix, tags, error
responses and route class into each route when it was declared. `AuthenticatedRoute` relies on
FastAPI building a route's handler through `APIRoute.get_route_handler`. If a FastAPI release
changes either, these tests say so by name, before a request can be served wrongly; then fix
`mount_routes`/`AuthenticatedRoute` or cap `fastapi` in pyproject.toml below that release.
`DirectRoute` reads FastAPI's analysis of each endpoint (`Dependant`, `ModelField.validate`);
tests/test_direct_route.py compares its answers with FastAPI's own handler's.
"""

import asyncio
import dataclasses
import inspect
import logging
from typing import Any

import fastapi
import uvicorn
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from uvicorn.main import main as uvicorn_command
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from backend.features.create.router import router as create_router
from backend.features.delete.router import router as delete_router
from backend.features.get.router import router as get_router
from backend.features.list.router import router as list_router
from backend.features.task_model import TasksRoute
from backend.features.toggle.router import router as toggle_router
from backend.features.update.router import router as update_router
from backend.platform import direct_route
from backend.platform.config import get_header_limits
from backend.platform.server import launcher
from backend.platform.server.protocol import ABORT_EXTENSION, HeaderLimitedProtocol

SLICES = (create_router, list_router, get_router, update_router, delete_router, toggle_router)
INCOMPATIBLE = f"FastAPI {fastapi.__version__} changed what mount_routes relies on: "


def test_slice_routes_carry_their_prefix_and_route_class():
    for router in SLICES:
        for route in router.routes:
            assert isinstance(route, APIRoute), INCOMPATIBLE + f"{route!r} is not an APIRoute"
            assert route.path.startswith("/api/{user_id}/tasks"), (
                INCOMPATIBLE + f"the router's prefix is not in the route's path: {route.path}"
            )
            assert type(route) is TasksRoute, (
                INCOMPATIBLE + f"{route.path} is a {type(route).__name__}, not a TasksRoute"
            )


def test_the_app_serves_and_documents_each_slice_route_as_declared(app):
    """Mounted as they are, each route keeps its path, methods and class, and appears once in
    the OpenAPI schema (whose every detail tests/test_openapi_client.py compares with the
    committed snapshot). `include_router` is no yardstick here: before FastAPI's included
    routers became layers (0.16x) it declared each route again, through the route class."""
    declared = {
        (route.path, method, type(route))
        for router in SLICES
        for route in router.routes
        for method in route.methods
    }
    served = {
        (route.path, method, type(route))
        for route in app.routes
        if isinstance(route, APIRoute) and route.path.startswith("/api/")
        for method in route.methods
    }
    assert served == declared, INCOMPATIBLE + f"served {served ^ declared} differently"
    documented = {
        (path, method.upper())
        for path, operations in app.openapi()["paths"].items()
        if path.startswith("/api/")
        for method in operations
    }
    assert documented == {(path, method) for path, method, _ in declared}, INCOMPATIBLE + (
        "the OpenAPI schema does not list exactly the slices' routes"
    )


def test_the_route_class_authenticates_before_the_body_is_read(client, user):
    """FastAPI parses a body before any dependency runs: only `get_route_handler` comes first."""
    response = client.post(
        f"/api/{user.id}/tasks",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 401, (
        f"FastAPI {fastapi.__version__} no longer builds the route's handler through "
        f"AuthenticatedRoute.get_route_handler: {response.status_code} {response.text}"
    )


# --- uvicorn: what HeaderLimitedProtocol (backend/platform/server) leans on ------------------
#
# It subclasses uvicorn's HttpToolsProtocol, overriding some of its methods, calling the rest
# and reading its per-connection attributes, and `python -m backend` passes the class to
# uvicorn's own command. If a uvicorn release renames or reworks any of these, these tests say
# which; then fix the protocol or cap `uvicorn` in pyproject.toml below that release.

UVICORN = f"uvicorn {uvicorn.__version__} changed what HeaderLimitedProtocol relies on: "


class _Transport(asyncio.Transport):
    """What a protocol writes, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


def _connection(
    protocol_class: type[HttpToolsProtocol], app: Any = _ok
) -> tuple[HttpToolsProtocol, _Transport]:
    config = uvicorn.Config(app, log_config=None)
    config.load()
    protocol = protocol_class(config, ServerState(), {}, asyncio.get_running_loop())
    transport = _Transport()
    protocol.connection_made(transport)
    return protocol, transport


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_uvicorn_httptools_protocol_has_the_methods_the_subclass_overrides_and_calls():
    for name in (
        "connection_made",
        "connection_lost",
        "data_received",
        "on_message_begin",
        "on_headers_complete",
        "on_message_complete",
        "on_response_complete",
        "_unset_keepalive_if_required",
    ):
        assert callable(getattr(HttpToolsProtocol, name, None)), (
            UVICORN + f"HttpToolsProtocol.{name} is gone"
        )
        overrides = name in vars(HeaderLimitedProtocol)
        assert not overrides or name in vars(HttpToolsProtocol), (
            UVICORN + f"HttpToolsProtocol no longer defines {name} itself"
        )
    parameters = list(inspect.signature(HttpToolsProtocol.__init__).parameters)
    assert parameters[:4] == ["self", "config", "server_state", "app_state"], (
        UVICORN + f"HttpToolsProtocol.__init__ takes {parameters}"
    )


def test_uvicorn_httptools_protocol_keeps_the_state_the_subclass_reads():
    asyncio.run(_keeps_the_state())


async def _keeps_the_state() -> None:
    protocol, _ = _connection(HttpToolsProtocol)
    protocol.data_received(b"GET /a?b HTTP/1.1\r\nHost: x\r\nX-One: 1\r\n\r\n")
    for name in ("parser", "transport", "flow", "pipeline", "server_state", "app", "loop"):
        assert hasattr(protocol, name), UVICORN + f"HttpToolsProtocol.{name} is gone"
    assert protocol.client == ("127.0.0.1", 5555), UVICORN + "HttpToolsProtocol.client"
    assert protocol.url == b"/a?b", UVICORN + "HttpToolsProtocol.url is not the request target"
    assert protocol.headers == [(b"host", b"x"), (b"x-one", b"1")], (
        UVICORN + "HttpToolsProtocol.headers is not the request's list of fields"
    )
    cycle = protocol.cycle
    assert isinstance(cycle, RequestResponseCycle), UVICORN + "HttpToolsProtocol.cycle"
    assert cycle.scope is protocol.scope, UVICORN + "the cycle's scope is not the protocol's"
    for name in ("disconnected", "keep_alive", "response_complete"):
        assert hasattr(cycle, name), UVICORN + f"RequestResponseCycle.{name} is gone"
    assert protocol.server_state.default_headers is not None
    await _settle()


def test_uvicorn_starts_the_app_that_protocol_app_names_when_the_headers_complete():
    """The cap on fields answers through uvicorn's response path by swapping `self.app`."""
    asyncio.run(_starts_protocol_app())


async def _starts_protocol_app() -> None:
    protocol, transport = _connection(HeaderLimitedProtocol)
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(120))
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    await _settle()
    assert transport.written.startswith(b"HTTP/1.1 431 "), (
        UVICORN + f"on_headers_complete no longer starts self.app: {transport.written[:60]!r}"
    )
    assert transport.closed


def test_no_more_than_the_allowance_reaches_uvicorns_parser():
    asyncio.run(_feeds_the_allowance())


async def _feeds_the_allowance() -> None:
    protocol, transport = _connection(HeaderLimitedProtocol)
    limit = get_header_limits().MAX_HEADER_BYTES
    fed: list[int] = []
    parser = protocol.parser

    class Recording:
        def feed_data(self, data: Any) -> None:
            fed.append(len(data))
            parser.feed_data(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(parser, name)

    protocol.parser = Recording()  # type: ignore[assignment]
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10 * limit)
    assert sum(fed) == limit, UVICORN + f"data_received no longer feeds self.parser: {fed}"
    assert transport.written.startswith(b"HTTP/1.1 431 ")
    await _settle()


def test_uvicorn_does_not_log_a_response_its_cycle_was_told_is_disconnected(caplog):
    """The abort extension marks the cycle disconnected so that uvicorn's run_asgi neither
    writes more nor logs the unfinished response as an error."""
    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        transport = asyncio.run(_aborts())
    assert transport.aborted
    assert b"0\r\n\r\n" not in transport.written  # no clean end of the chunked body
    assert not caplog.records, UVICORN + f"run_asgi logged {caplog.records[0].getMessage()!r}"


async def _aborts() -> _Transport:

    async def aborting(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"[1,", "more_body": True})
        scope["extensions"][ABORT_EXTENSION]["abort"]()

    protocol, transport = _connection(HeaderLimitedProtocol, aborting)
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await _settle()
    return transport


def test_the_abort_extension_cuts_the_response_in_progress_with_requests_queued_behind_it(caplog):
    """One abort callable serves a connection's requests: it marks disconnected the request
    being answered, found from uvicorn's pipeline (requests waiting behind it, in order)."""
    with caplog.at_level(logging.ERROR, logger="uvicorn.error"):
        transport, started = asyncio.run(_aborts_with_pipelined_requests())
    assert transport.aborted
    assert started == ["/first", "/second"], "the third request's app was started"
    assert b"0\r\n\r\n" not in transport.written.split(b"[2,")[-1]  # the second, cut
    assert not caplog.records, UVICORN + f"run_asgi logged {caplog.records[0].getMessage()!r}"


async def _aborts_with_pipelined_requests() -> tuple[_Transport, list[str]]:
    started: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        started.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/first":
            await send({"type": "http.response.body", "body": b"[1]"})
            return
        await send({"type": "http.response.body", "body": b"[2,", "more_body": True})
        await asyncio.sleep(0)
        scope["extensions"][ABORT_EXTENSION]["abort"]()

    protocol, transport = _connection(HeaderLimitedProtocol, app)
    requests = b"".join(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in (b"first", b"second"))
    protocol.data_received(requests + b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n")
    await _settle()
    return transport, started


def test_uvicorn_command_line_takes_our_protocol_class():
    params = {p.name for p in uvicorn_command.params if p.expose_value}  # not --version
    assert {"app", "http", "workers", "reload", "port"} <= params, (
        UVICORN + f"its command's options are {sorted(params)}"
    )
    assert uvicorn_command.callback is not None
    signature = set(inspect.signature(uvicorn_command.callback).parameters)
    assert signature == params, UVICORN + f"its command's callback takes {sorted(signature)}"
    context = launcher.command.make_context("python -m backend", ["--workers", "2"])
    assert "app" not in context.params and "http" not in context.params
    config = uvicorn.Config(_ok, http=HeaderLimitedProtocol, log_config=None)
    config.load()
    assert config.http_protocol_class is HeaderLimitedProtocol, (
        UVICORN + "Config(http=<a class>) no longer serves with that class"
    )


def test_what_the_direct_route_reads_from_fastapi_is_still_there():
    """`DirectCall.of` (backend/platform/direct_route.py) reads FastAPI's analysis of each
    endpoint from `route.dependant` and validates values with its `ModelField`s; a release that
    renames or reshapes these would otherwise leave a route served on guesses."""
    fields = {field.name for field in dataclasses.fields(Dependant)}
    read = {
        "path_params",
        "query_params",
        "header_params",
        "cookie_params",
        "body_params",
        "dependencies",
        "name",
        "call",
        "request_param_name",
        "own_oauth_scopes",
        "parent_oauth_scopes",
        *direct_route._UNSUPPORTED_PARAMETERS,
    }
    assert read <= fields, INCOMPATIBLE + f"Dependant lost {read - fields}"
    route = next(r for r in get_router.routes if isinstance(r, APIRoute))
    (task_id,) = route.dependant.path_params
    assert (task_id.name, task_id.alias) == ("task_id", "task_id"), INCOMPATIBLE + "path field"
    assert task_id.validate("42", {}, loc=()) == (42, []), INCOMPATIBLE + "ModelField.validate"
    value, errors = task_id.validate("0", {}, loc=())
    assert errors and errors[0]["type"] == "greater_than_equal", INCOMPATIBLE + repr(errors)
    assert hasattr(route, "_embed_body_fields"), INCOMPATIBLE + "APIRoute._embed_body_fields"


def test_what_direct_dispatch_reads_from_starlette_and_fastapi_is_still_there(app):
    """`DirectDispatchMiddleware` stands in for Starlette's `ExceptionMiddleware` and router on
    the task routes: it reads the handlers that middleware built, looks them up with
    Starlette's own function, and takes each route's path the router's way. If a release moves
    any of it, this fails by name (the layer itself would switch off, or answer wrongly)."""
    from starlette import _exception_handler, _utils
    from starlette.exceptions import HTTPException
    from starlette.middleware.exceptions import ExceptionMiddleware

    from backend.platform.direct_dispatch import DirectDispatchMiddleware

    layer = app.build_middleware_stack()
    while not isinstance(layer, DirectDispatchMiddleware):
        layer = layer.app
    assert isinstance(layer.app, ExceptionMiddleware), "FastAPI moved the exception middleware"
    handlers, statuses = layer.app._exception_handlers, layer.app._status_handlers
    assert isinstance(handlers, dict) and isinstance(statuses, dict)
    assert handlers[HTTPException] is app.exception_handlers[HTTPException]
    assert (
        _exception_handler._lookup_exception_handler(handlers, HTTPException(404))
        is (handlers[HTTPException])
    )
    assert _utils.get_route_path({"path": "/api/x", "root_path": ""}) == "/api/x"
    assert _utils.get_route_path({"path": "/prefix/api/x", "root_path": "/prefix"}) == "/api/x"
    assert not getattr(app.router, "form_limits", None), "the layer stands aside for form limits"
