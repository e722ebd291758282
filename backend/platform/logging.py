"""Structured logging: structlog set up once, one log line per request with its request id, and
what keeps a log line safe to read: control characters escaped on the console, URLs redacted."""

import logging
import os
import re
import sys
import threading
import time
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backend.platform.config import Settings
from backend.platform.server.abort import ResponseAborted
from backend.platform.telemetry.metrics import UNMATCHED_ROUTE, Metrics
from backend.platform.telemetry.tracing import Tracing, current_trace_id

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:\-]")
REQUEST_ID_MAX_LENGTH = 64

log = structlog.get_logger("backend.request")


class _Stdout:
    """Writes to whatever `sys.stdout` is at the time (so test capture and redirects see it).

    Both structlog and the standard library write each line as one `write` call of the whole
    line and its newline, so lines from concurrent threads never share a line.
    """

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


_STDOUT = _Stdout()

# What a terminal or a line-based log reader would act on rather than show: C0 (ESC, CR, LF and
# the rest), DEL, C1 (0x80-0x9f: CSI, NEL...), and the Unicode line and paragraph separators.
# The JSON renderer escapes all of these already (as \u001b...); the console one prints strings
# as they are, so a request path like /api/%1b%5B31m/tasks would colour or forge log lines.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_UNSAFE_IN_TRACEBACK = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # not \n
# A traceback is many lines by design; everything else in an event is one.
_MULTILINE_KEYS = frozenset({"exception", "stack"})


def _escape_character(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _escaped(text: str, unsafe: re.Pattern[str] = _UNSAFE) -> str:
    return unsafe.sub(_escape_character, text) if unsafe.search(text) else text


def escape_control_characters(_logger: Any, _method: str, event_dict: Any) -> Any:
    """A structlog processor for the console renderer: every string in the event (its name, its
    keys, its values; other values as the renderer would show them, their repr) with control
    characters written as `\\x1b`, so that one event is one line. Tracebacks keep their line
    breaks. Not used for JSON, whose renderer escapes them itself."""
    escaped: dict[Any, Any] = {}
    for key, value in event_dict.items():
        if isinstance(key, str):
            key = _escaped(key)
        if isinstance(value, str):
            value = _escaped(value, _UNSAFE_IN_TRACEBACK if key in _MULTILINE_KEYS else _UNSAFE)
        elif key == "event":
            value = _escaped(str(value))  # the console renderer shows a non-string event's str()
        elif not isinstance(value, bool | int | float | None):
            value = _escaped(repr(value))  # what the renderer would show, made safe
        escaped[key] = value
    return escaped


# Query parameters whose values are secrets by their name (libpq's `password`, presigned URLs'
# signatures and credentials, API tokens and keys): masked, their names kept.
_SECRET_PARAMETER = re.compile(
    r"(?P<name>(?:^|(?<=[?&;]))[^=&;#]*(?:pass|pwd|secret|token|key|sig|cred|auth)[^=&;#]*=)"
    r"[^&;#]*",
    re.IGNORECASE,
)


def redacted_url(url: str) -> str:
    """`url` fit for a log line or a message: without its userinfo (`user:password@`, the
    user too), and with the values of query parameters named like secrets (`password=`,
    `token=`, `...key=`, `...sig...=`) replaced by `***`.

    The rest of the query is kept on purpose: it says which endpoint or database was meant
    (`sslmode`, a socket directory in `host=`, a tenant), which is what an operator reading a
    failure needs, and a URL whose query differs is another endpoint. Stripping only what
    names a secret keeps that, and a URL without userinfo or such parameters is unchanged."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    end = len(rest)
    for delimiter in "/?#":
        found = rest.find(delimiter)
        if found != -1:
            end = min(end, found)
    authority, tail = rest[:end], rest[end:]
    authority = authority.rpartition("@")[2]
    path, question, query = tail.partition("?")
    if question:
        query, hash_mark, fragment = query.partition("#")
        query = _SECRET_PARAMETER.sub(lambda m: m.group("name") + "***", query) + hash_mark
        tail = path + question + query + fragment
    return f"{scheme}{separator}{authority}{tail}"


def configure_logging(settings: Settings) -> None:
    """Route structlog and the standard library (uvicorn, SQLAlchemy) through one renderer."""
    level = getattr(logging, settings.LOG_LEVEL)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # The last steps: JSON escapes what it writes; the console renderer needs the escaping done.
    rendering: list[Any] = (
        [structlog.processors.JSONRenderer()]
        if settings.json_logs
        else [
            escape_control_characters,
            structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()),
        ]
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            *rendering,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(_STDOUT),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(_STDOUT)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                *rendering,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    # Our middleware writes the one line per request; uvicorn's access line would be a second.
    access = logging.getLogger("uvicorn.access")
    access.handlers = []
    access.propagate = False


class _RandomBytes(threading.local):
    """Random bytes from the kernel's generator, fetched 4 KiB at a time: a request id costs a
    system call per 256 requests instead of one each. Per thread, and emptied in a forked child,
    so that no two ids are cut from the same bytes."""

    def __init__(self) -> None:
        self.empty()

    def empty(self) -> None:
        self.buffer, self.offset = b"", 0

    def take(self, count: int) -> bytes:
        offset = self.offset
        if offset + count > len(self.buffer):
            self.buffer, offset = os.urandom(4096), 0
        self.offset = offset + count
        return self.buffer[offset : offset + count]


_random_bytes = _RandomBytes()
os.register_at_fork(after_in_child=_random_bytes.empty)


def new_request_id() -> str:
    """A request id for a request that brought none: 128 random bits, as 32 hex digits."""
    return _random_bytes.take(16).hex()


def sanitize_request_id(raw: str) -> str | None:
    cleaned = _REQUEST_ID_UNSAFE.sub("", raw)[:REQUEST_ID_MAX_LENGTH]
    return cleaned or None


class RequestLogMiddleware:
    """Pure ASGI middleware: request id in, request id out, one `request` line when done.

    It also records each request's duration in the metrics (when they are on: one dict lookup
    and one histogram observation), and binds the trace id next to the request id (when
    tracing is on), in this one place that already times every request.

    Pure ASGI (not BaseHTTPMiddleware) so that the context variables it binds, and the
    `user_id` that authentication binds later in the same task, reach the final line.
    An exception that escapes the app becomes a JSON 500 here, logged with its traceback,
    so that even a bug answers `{"detail": ...}` with the request id attached. A streamed
    response aborted mid-body (`ResponseAborted`) is logged with the status that was sent and
    `response_aborted`, and its exception goes on to the server.
    """

    def __init__(
        self, app: ASGIApp, *, metrics: Metrics | None = None, tracing: Tracing | None = None
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = sanitize_request_id(value.decode("latin-1"))
                break
        request_id = request_id or new_request_id()
        header_value = request_id.encode()
        status = 500
        response_started = False

        async def send_with_request_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", header_value)]
            await send(message)

        structlog.contextvars.clear_contextvars()
        trace_id = current_trace_id() if self.tracing is not None and self.tracing.on else None
        if trace_id is not None:
            structlog.contextvars.bind_contextvars(request_id=request_id, trace_id=trace_id)
        else:
            structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_with_request_id)
        except ResponseAborted:
            # Logged where it happened. Raised on so that the server drops the connection: a
            # body that was cut off must not end as if it were whole.
            raise
        except Exception:
            log.exception("request.unhandled_error", method=scope["method"], path=scope["path"])
            if not response_started:
                await send_with_request_id(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send({"type": "http.response.body", "body": b'{"detail":"Internal error"}'})
        finally:
            elapsed = time.perf_counter() - started
            log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round(elapsed * 1000, 2),
            )
            if self.metrics is not None:
                # The router leaves the route it chose in the scope; its template is the label.
                route = scope.get("route")
                self.metrics.observe_request(
                    scope["method"],
                    route.path_format if route is not None else UNMATCHED_ROUTE,
                    status,
                    elapsed,
                )
            structlog.contextvars.clear_contextvars()
