"""Error responses: every failure is JSON `{"detail": ...}` with the right status, never a 500.

Also the documented error responses each route declares, and the request-body size limit.
"""

import json
from typing import Any

import structlog
from fastapi import FastAPI, HTTPException, Request, Response, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.platform.auth import UnknownUserError
from backend.platform.telemetry.metrics import count_auth_failure, count_db_unavailable

log = structlog.get_logger("backend.errors")

RETRY_AFTER_SECONDS = "2"


class ErrorDetail(BaseModel):
    detail: str = Field(description="What went wrong, for a developer to read.")


_DESCRIPTIONS = {
    400: "A malformed `Idempotency-Key` (1 to 255 visible ASCII characters); nothing written.",
    401: "Missing, malformed, forged or expired bearer token (see `WWW-Authenticate`).",
    403: "The token belongs to a different user than the one in the path.",
    404: "No such task for this user (also for ids that are not positive integers).",
    409: "A request with the same `Idempotency-Key` is still in flight; retry shortly.",
    412: "`If-Match` names none of the task's current tags: it changed; nothing written.",
    413: "Request body too large.",
    422: "The request body or query is invalid, or its `Idempotency-Key` was used for a "
    "different request; `detail` lists each problem.",
    503: "The database is unavailable; retry after `Retry-After` seconds.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer."""
    responses: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"description": _DESCRIPTIONS[code]}
        if code != 422:  # FastAPI documents 422 with its own validation-error schema
            entry["model"] = ErrorDetail
        responses[code] = entry
    return responses


TASK_ERRORS = error_responses(401, 403, 404, 422, 503)


class TaskNotFoundError(Exception):
    """No task with that id belongs to the caller (another user's task included)."""


async def _task_not_found(_request: Request, _exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": "Task not found"}, status.HTTP_404_NOT_FOUND)


async def _unknown_user(_request: Request, _exc: Exception) -> JSONResponse:
    log.warning("auth.failed", reason="unknown_user", status=401)
    count_auth_failure("unknown_user")
    return JSONResponse(
        {"detail": "The token's user does not exist"},
        status.HTTP_401_UNAUTHORIZED,
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


def database_unavailable(exc: BaseException) -> bool:
    """Whether a database failure is the database's weather (a 503: unreachable, cut, timed
    out, every connection busy) rather than a bug in a statement (a 500)."""
    if isinstance(exc, DisconnectionError | PoolTimeoutError):
        return True
    # OperationalError covers refused/dropped connections and statement timeouts (QueryCanceled);
    # connection_invalidated covers disconnects SQLAlchemy detected under other classes.
    return isinstance(exc, DBAPIError) and (
        isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated
    )


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, DBAPIError) and not database_unavailable(exc):
        # A constraint or data error we did not anticipate: a bug, logged with its traceback.
        log.error("db.error", error=type(exc.orig).__name__, exc_info=exc)
        return JSONResponse({"detail": "Internal error"}, status.HTTP_500_INTERNAL_SERVER_ERROR)
    log.warning("db.unavailable", error=type(exc).__name__, path=request.scope["path"])
    count_db_unavailable()
    return JSONResponse(
        {"detail": "The database is unavailable; please retry shortly"},
        status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": RETRY_AFTER_SECONDS},
    )


async def _invalid_request(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 without echoing the input back: the input can be a megabyte, or hold text
    (a lone surrogate) that cannot even be encoded as UTF-8."""
    assert isinstance(exc, RequestValidationError)
    problems = [
        {
            "type": e.get("type", "value_error"),
            "loc": list(e.get("loc", ())),
            "msg": e.get("msg", ""),
        }
        for e in exc.errors()
    ]
    return _AsciiJSONResponse({"detail": problems}, status.HTTP_422_UNPROCESSABLE_CONTENT)


async def _http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's own HTTP errors, except one: a body it cannot even decode (not UTF-8, nested
    deeper than the parser goes, a number too long to convert) is a bare 400 there; to a client
    it is an invalid body like `{` is, so it gets the same documented 422."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == status.HTTP_400_BAD_REQUEST and isinstance(
        exc.__cause__, ValueError | RecursionError
    ):
        problem = {"type": "json_invalid", "loc": ["body"], "msg": "The body is not valid JSON"}
        return _AsciiJSONResponse({"detail": [problem]}, status.HTTP_422_UNPROCESSABLE_CONTENT)
    if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        # Each slice mounts its own route, so Starlette's `Allow` names only the first route
        # whose path matched (`POST` for /tasks); RFC 9110 wants every method the path has.
        exc.headers = {**(exc.headers or {}), "Allow": ", ".join(_allowed_methods(request))}
    return await http_exception_handler(request, exc)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route fully matches for this path (asked through `matches()` alone:
    FastAPI wraps included routers in objects of its own)."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]


class _AsciiJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(TaskNotFoundError, _task_not_found)
    app.add_exception_handler(UnknownUserError, _unknown_user)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(DisconnectionError, _database_error)
    app.add_exception_handler(PoolTimeoutError, _database_error)


class BodySizeLimitMiddleware:
    """413 for bodies over the limit: by Content-Length up front, or counted while streaming."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    await self._reject(send)
                    return
                break
        received = 0

        async def counting_receive() -> Message:
            # An HTTPException raised while FastAPI reads the body reaches its handlers as is.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, self._detail)
            return message

        await self.app(scope, counting_receive, send)

    @property
    def _detail(self) -> str:
        return f"Request body exceeds {self.max_bytes} bytes"

    async def _reject(self, send: Send) -> None:
        body = json.dumps({"detail": self._detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status.HTTP_413_CONTENT_TOO_LARGE,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
