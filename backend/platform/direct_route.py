"""Routes declared with FastAPI, served without FastAPI's per-request dependency solving.

A route of this class is declared like any other (decorator, `Annotated` parameters,
`response_model`, documented responses), so the OpenAPI schema is FastAPI's own. What differs
is what runs per request: when the route is built, its endpoint's parameters are read once
from FastAPI's analysis of the signature (`route.dependant`) into a `DirectCall`, and each
request then only converts its path and query parameters by their declared types, awaits each
dependency (an `async def` taking at most the request, such as `CurrentUser`), validates the
JSON body against its model, and awaits the endpoint, which returns a ready `Response`.

FastAPI's generic handler (`solve_dependencies` and what surrounds it) costs a route shaped
like ours about as much as a bare Starlette server's whole request. Served this way, `get`
went from 1,095,678 to 880,083 instructions per request, and to 829,927 without
`request_response`'s wrapper (callgrind over `bench/inprocess.py`; the other operations in
docs/performance.md).

Correctness never depends on this path's coverage:
- A route whose signature it does not understand (a sync or `yield` dependency, headers,
  cookies, forms, a parameter model, `Security` scopes, a return value that is not a
  `Response`...) is served by FastAPI's own handler, as built by `APIRoute`.
- A request it is not sure about (a parameter or body that fails validation, a body that is
  not `application/json` exactly, dependency overrides set) is handed, as it is, to FastAPI's
  handler, which answers it exactly as it would have: the same 422 `detail`, `loc` and all.
  Nothing has run yet when that happens (no dependency, no endpoint), and the body already
  read stays cached on the request.
- `tests/test_direct_route.py` compares both paths' answers request by request, and
  `tests/test_dependency_internals.py` fails by name when a FastAPI release changes what this
  reads from it (`Dependant`'s fields, `ModelField.validate`).
"""

import inspect
import json
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from copy import deepcopy
from dataclasses import dataclass
from enum import Enum
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from fastapi import params
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel, Json
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request], Coroutine[Any, Any, Response]]

# Fields of FastAPI's `Dependant` that, when set, mean machinery this path does not provide.
_UNSUPPORTED_PARAMETERS = (
    "websocket_param_name",
    "http_connection_param_name",
    "response_param_name",
    "background_tasks_param_name",
    "security_scopes_param_name",
)
_SCALARS = (str, int, float, Enum, type(None))
# Defaults handed to the endpoint as they are; any other is copied per request, as FastAPI does.
_IMMUTABLE_DEFAULTS = (type(None), bool, int, float, str, bytes, Enum)


class NotDirect(Exception):
    """The route's signature needs FastAPI's own handler; the message says why."""


@dataclass(frozen=True, slots=True)
class _Scalar:
    """A path or query parameter of a scalar type: its name, where it is read from, and the
    field FastAPI built for it (which validates it exactly as FastAPI does)."""

    name: str
    alias: str
    field: Any  # fastapi's ModelField
    required: bool
    default: Any
    copy_default: bool

    def value(self, received: Any) -> tuple[Any, bool]:
        """(value, ok): ok is False when FastAPI must judge the request."""
        raw = received.get(self.alias)
        if raw is None:
            if self.required:
                return None, False
            return (deepcopy(self.default) if self.copy_default else self.default), True
        value, errors = self.field.validate(raw, {}, loc=())
        return value, not errors


@dataclass(frozen=True, slots=True)
class DirectCall:
    """What one endpoint needs per request, worked out once from its signature."""

    endpoint: Callable[..., Awaitable[Any]]
    path: tuple[_Scalar, ...]
    query: tuple[_Scalar, ...]
    body_name: str | None
    body_field: Any  # fastapi's ModelField, or None
    dependencies: tuple[tuple[str | None, Callable[..., Awaitable[Any]], bool], ...]
    request_name: str | None

    @classmethod
    def of(cls, route: APIRoute) -> "DirectCall":
        """The plan for `route`, or NotDirect saying what FastAPI's handler is needed for."""
        dependant = route.dependant
        endpoint = dependant.call
        if not _is_plain_coroutine_function(endpoint):
            raise NotDirect("the endpoint is not an `async def` function")
        try:
            returns = get_type_hints(endpoint).get("return")
        except (NameError, TypeError) as exc:
            raise NotDirect(f"the endpoint's annotations cannot be read: {exc}") from None
        if not (inspect.isclass(returns) and issubclass(returns, Response)):
            raise NotDirect("the endpoint does not declare that it returns a Response")
        _refuse_extras(dependant)
        if dependant.header_params or dependant.cookie_params:
            raise NotDirect("header and cookie parameters")
        if getattr(route, "_embed_body_fields", False) or len(dependant.body_params) > 1:
            raise NotDirect("an embedded body")
        body_field = dependant.body_params[0] if dependant.body_params else None
        if body_field is not None and (
            isinstance(body_field.field_info, params.Form)
            or not _is_model(body_field.field_info.annotation)
        ):
            raise NotDirect("a body that is not one JSON model")
        dependencies = []
        for sub in dependant.dependencies:
            _refuse_extras(sub)
            if (
                sub.path_params
                or sub.query_params
                or sub.header_params
                or sub.cookie_params
                or sub.body_params
                or sub.dependencies
                or sub.own_oauth_scopes
                or sub.parent_oauth_scopes
                or getattr(sub, "concurrency", None) is not None
                or not _is_plain_coroutine_function(sub.call)
            ):
                raise NotDirect(f"the dependency {sub.call!r} needs FastAPI's resolution")
            dependencies.append((sub.name, sub.call, sub.request_param_name is not None))
        return cls(
            endpoint=endpoint,  # type: ignore[arg-type]
            path=tuple(_scalar(field) for field in dependant.path_params),
            query=tuple(_scalar(field) for field in dependant.query_params),
            body_name=body_field.name if body_field is not None else None,
            body_field=body_field,
            dependencies=tuple(dependencies),  # type: ignore[arg-type]
            request_name=dependant.request_param_name,
        )

    def handler(self, fallback: Handler, overrides: Any) -> Handler:
        """The route's handler: this plan per request, `fallback` (FastAPI's) when unsure."""
        endpoint, path, query = self.endpoint, self.path, self.query
        body_name, body_field = self.body_name, self.body_field
        dependencies, request_name = self.dependencies, self.request_name

        async def serve_directly(request: Request) -> Response:
            if overrides is not None and overrides.dependency_overrides:
                return await fallback(request)
            values: dict[str, Any] = {}
            if path:
                path_params = request.scope["path_params"]
                for parameter in path:
                    value, ok = parameter.value(path_params)
                    if not ok:
                        return await fallback(request)
                    values[parameter.name] = value
            if query:
                query_params = request.query_params
                for parameter in query:
                    value, ok = parameter.value(query_params)
                    if not ok:
                        return await fallback(request)
                    values[parameter.name] = value
            if body_name is not None:
                if _content_type(request.scope) != b"application/json":
                    return await fallback(request)
                try:
                    body = await request.body()
                except HTTPException:
                    raise
                except Exception:  # noqa: BLE001 - FastAPI's handler decides what that answers
                    return await fallback(request)
                if not body:
                    return await fallback(request)
                try:
                    # As Starlette's `Request.json()`, which FastAPI's handler uses.
                    document = json.loads(body)
                except (ValueError, RecursionError):
                    return await fallback(request)
                value, errors = body_field.validate(document, {}, loc=())
                if errors:
                    return await fallback(request)
                values[body_name] = value
            for name, call, takes_request in dependencies:
                solved = await (call(request) if takes_request else call())
                if name is not None:
                    values[name] = solved
            if request_name is not None:
                values[request_name] = request
            response = await endpoint(**values)
            if not isinstance(response, Response):
                raise TypeError(f"{endpoint.__qualname__} returned {type(response).__name__}")
            return response

        return serve_directly


def _refuse_extras(dependant: Dependant) -> None:
    for name in _UNSUPPORTED_PARAMETERS:
        if getattr(dependant, name, None) is not None:
            raise NotDirect(f"a {name.removesuffix('_param_name')} parameter")


def _is_plain_coroutine_function(call: Any) -> bool:
    return inspect.isfunction(call) and inspect.iscoroutinefunction(call)


def _is_model(annotation: Any) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _scalar(field: Any) -> _Scalar:
    info = field.field_info
    if not isinstance(info, params.Path | params.Query) or info.validation_alias is not None:
        raise NotDirect(f"the parameter {field.name} is not a plain path or query parameter")
    if not _is_scalar(info.annotation) or any(type(item) is Json for item in info.metadata):
        raise NotDirect(f"the parameter {field.name} is not a scalar")
    required = info.is_required()
    default = None if required else info.get_default(call_default_factory=True)
    if not required and info.validate_default:
        raise NotDirect(f"the parameter {field.name} validates its default")
    return _Scalar(
        name=field.name,
        alias=field.alias,
        field=field,
        required=required,
        default=default,
        copy_default=not isinstance(default, _IMMUTABLE_DEFAULTS),
    )


def _is_scalar(annotation: Any) -> bool:
    """A type read from one string (FastAPI reads a list from repeated query keys)."""
    if get_origin(annotation) in (Union, UnionType):
        return all(_is_scalar(choice) for choice in get_args(annotation))
    return inspect.isclass(annotation) and issubclass(annotation, _SCALARS)


def _content_type(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value  # type: ignore[no-any-return]
    return None


class DirectRoute(APIRoute):
    """An `APIRoute` whose handler is a `DirectCall` when its signature allows, FastAPI's
    otherwise (`direct` says which). Subclasses that wrap the handler (`AuthenticatedRoute`,
    `GuardedRoute`) come before it in the bases, so that they wrap this one.

    A direct route is also served without `request_response`'s per-request exit stacks and
    exception wrapper: it has no `yield` dependency for the stacks to close, and an exception
    reaches the same handlers one layer out, in Starlette's `ExceptionMiddleware`. FastAPI's
    handler, when a request is handed to it, still gets its stacks (`_with_exit_stacks`)."""

    direct: DirectCall | None = None
    not_direct_because = ""
    # The direct handler alone, without `request_response` around it, when that is `app`.
    direct_app: ASGIApp | None = None

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        if self.direct is not None and getattr(self, "max_body_size", None) is None:
            self.app = self.direct_app = _serve(self.get_route_handler())

    @property
    def served_directly(self) -> bool:
        """Whether requests reach the direct handler alone (a copy of the route may have been
        given another `app`)."""
        return self.direct_app is not None and self.app is self.direct_app

    def get_route_handler(self) -> Handler:
        fallback = super().get_route_handler()
        try:
            self.direct = DirectCall.of(self)
        except NotDirect as reason:
            self.not_direct_because = str(reason)
            self.direct = None
            return fallback
        return self.direct.handler(_with_exit_stacks(fallback), self.dependency_overrides_provider)


def _serve(handler: Handler) -> ASGIApp:
    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        response = await handler(Request(scope, receive, send))
        await response(scope, receive, send)

    return serve


def _with_exit_stacks(handler: Handler) -> Handler:
    """FastAPI's handler as `request_response` runs it: with the stacks it closes its
    dependencies on (closed here before the answer is sent; a direct route has none), and the
    one `AsyncExitStackMiddleware` would have provided, when `DirectDispatchMiddleware` has
    served the request without that layer."""

    async def with_exit_stacks(request: Request) -> Response:
        scope = request.scope
        if "fastapi_middleware_astack" not in scope:
            async with AsyncExitStack() as file_stack:
                scope["fastapi_middleware_astack"] = file_stack
                return await with_exit_stacks(request)
        async with AsyncExitStack() as request_stack:
            scope["fastapi_inner_astack"] = request_stack
            async with AsyncExitStack() as function_stack:
                scope["fastapi_function_astack"] = function_stack
                return await handler(request)

    return with_exit_stacks
