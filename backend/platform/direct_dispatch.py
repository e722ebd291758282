"""The innermost middleware: a request for a direct route goes straight to that route.

Between the app's own middlewares and a route, Starlette and FastAPI put three layers of their
own that every request walks: `ExceptionMiddleware` (which builds a `Request` and a wrapper to
call the exception handlers), `AsyncExitStackMiddleware` (a stack for uploaded files), and the
router, which tries each route's `matches` in turn and builds a child scope for each one whose
path matches. Under load those took about 12% of an `update`'s event-loop time (py-spy).

A request whose path and method a leading direct route matches (`DirectRoute` served without
FastAPI's handler; the task routes, which the app lists first) is dispatched here instead:
the same regular expressions and converters as the router, the same keys added to the scope,
the same exception handlers looked up the same way, and the answer the route gives. Anything
else goes on to the rest of the stack unchanged, so the router still decides every request
this layer does not match: other routes, 404, 405, redirects. The first full match here is the
router's first full match too, since only the routes at the head of its list are tried.

Not used (the rest of the stack serves every request) when FastAPI's request telemetry is on,
which the router informs of the chosen route, when the router has form limits, or when the
next layer is not Starlette's `ExceptionMiddleware`, whose handlers it reuses.
"""

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from starlette._exception_handler import _lookup_exception_handler
from starlette._utils import get_route_path, is_async_callable
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.platform.direct_route import DirectRoute

# One dispatchable route: its path pattern, converters, methods, endpoint, the route, its app.
_Entry = tuple[Any, dict[str, Any], set[str] | None, Callable[..., Any], DirectRoute, ASGIApp]


class DirectDispatchMiddleware:
    """Serve the leading direct routes of `owner`'s router without the layers in between."""

    def __init__(self, app: ASGIApp, *, owner: FastAPI) -> None:
        self.app = app
        self.router = owner.router
        self.routes: tuple[_Entry, ...] = ()
        self.why_not = ""
        if not isinstance(app, ExceptionMiddleware):
            self.why_not = "the next layer is not Starlette's ExceptionMiddleware"
        elif getattr(self.router, "form_limits", None):
            self.why_not = "the router has form limits"
        else:
            self.handlers = (app._exception_handlers, app._status_handlers)
            self.routes = tuple(_leading_direct_routes(self.router.routes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.routes or scope.get("fastapi.telemetry"):
            await self.app(scope, receive, send)
            return
        route_path = get_route_path(scope)
        method = scope["method"]
        for regex, convertors, methods, endpoint, route, route_app in self.routes:
            match = regex.match(route_path)
            if match is None or (methods and method not in methods):
                continue
            matched = match.groupdict()
            for key, value in matched.items():
                matched[key] = convertors[key].convert(value)
            path_params = dict(scope.get("path_params", {}))
            path_params.update(matched)
            # What ExceptionMiddleware and the router would have added to the scope.
            scope["starlette.exception_handlers"] = self.handlers
            scope.setdefault("router", self.router)
            scope["endpoint"] = endpoint
            scope["path_params"] = path_params
            scope["route"] = route
            await self._serve(route_app, scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _serve(self, route_app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """`route_app`, its exceptions answered by the app's handlers (as Starlette's
        `wrap_app_handling_exceptions` does; an exception with none goes on up)."""
        started = False

        async def sender(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await route_app(scope, receive, sender)
        except Exception as exc:
            exception_handlers, status_handlers = self.handlers
            handler = None
            if isinstance(exc, HTTPException):
                handler = status_handlers.get(exc.status_code)
            if handler is None:
                handler = _lookup_exception_handler(exception_handlers, exc)
            if handler is None:
                raise
            if started:
                message = "Caught handled exception, but response already started."
                raise RuntimeError(message) from exc
            request = Request(scope, receive, send)
            if is_async_callable(handler):
                response = await handler(request, exc)  # type: ignore[arg-type]
            else:
                response = await run_in_threadpool(handler, request, exc)
            if response is not None:
                await response(scope, receive, sender)
            exc.__traceback__ = None  # a reused exception instance would collect tracebacks


def _leading_direct_routes(routes: list[Any]) -> list[_Entry]:
    """The direct routes at the head of the route list, up to the first route of another kind."""
    leading = []
    for route in routes:
        if not (isinstance(route, DirectRoute) and route.served_directly):
            break
        regex, convertors, methods = route.path_regex, route.param_convertors, route.methods
        leading.append((regex, convertors, methods, route.endpoint, route, route.app))
    return leading
