"""OpenTelemetry traces, when the standard OTEL_* environment asks for them.

FastAPI (0.16x) traces requests itself: with a tracer provider configured it opens one server
span per request, named and attributed by the HTTP semantic conventions (`GET
/api/{user_id}/tasks/{task_id}`, `http.route`, `http.response.status_code`), and it sets up the
OTLP exporter from the OTEL_* variables at start-up (`auto_configure`). We ask it for that span
only: its metrics (ours are Prometheus's), its log records (ours are the JSON lines) and its
spans around dependencies and serialization stay off. What it does not know about is the
database, so each statement gets a client span of ours, a child of the request's span.

Tracing is on when OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set,
unless OTEL_TRACES_EXPORTER=none or OTEL_SDK_DISABLED=true. Off, FastAPI is told so: by default
it looks for configured tracer, meter and logger providers on every request, 33,000
instructions, 3% of a `get` (callgrind); told, 1,800. Our own part is then one attribute check
in the request log middleware.
"""

import os
from collections.abc import MutableMapping
from typing import Any

from fastapi.telemetry import TelemetryConfig
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import Engine, event

# Probes and scrapes come every few seconds and say nothing about the service's work.
UNTRACED_PATHS = frozenset({"/health", "/metrics"})


def _untraced(scope: MutableMapping[str, Any]) -> bool:
    return scope.get("path") in UNTRACED_PATHS


def tracing_requested() -> bool:
    """Whether the OTEL_* environment asks for traces (as FastAPI's `auto_configure` reads it)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if (os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").strip().lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def fastapi_telemetry() -> TelemetryConfig:
    """FastAPI's `telemetry=`: its request span when traces are asked for, else nothing."""
    return {
        "tracing": tracing_requested(),
        "metrics": False,
        "logs": False,
        "operation_spans": False,
        "auto_configure": True,
        "exclude": _untraced,
    }


_SPAN_KEY = "todo.statement_span"


class Tracing:
    """Whether requests are traced: known once the app has started, since FastAPI configures
    the exporter at start-up."""

    def __init__(self) -> None:
        self.on = False

    def start(self, engine: Engine, *, requested: bool) -> None:
        provider = trace.get_tracer_provider()
        configured = not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)
        self.on = requested and configured
        if self.on:
            trace_statements(engine, provider)


def current_trace_id() -> str | None:
    """The request's trace id as in W3C traceparent (32 hex digits), or None."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def trace_statements(engine: Engine, provider: trace.TracerProvider) -> None:
    """A client span for each statement sent inside a traced request (semantic conventions for
    database client spans: `db.query.text` is the statement with its parameters as
    placeholders, so no value a user sent is in it)."""
    tracer = provider.get_tracer("backend.platform.db")
    url = engine.url
    common: dict[str, Any] = {
        "db.system.name": "postgresql",
        "db.namespace": url.database or "",
        "server.address": url.host or "",
        "server.port": url.port or 5432,
    }

    def before(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if not trace.get_current_span().get_span_context().is_valid:
            return  # not inside a traced request (an untraced path, a background job)
        operation = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
        span = tracer.start_span(
            f"{operation} {common['db.namespace']}".strip(),
            kind=SpanKind.CLIENT,
            attributes={**common, "db.operation.name": operation, "db.query.text": statement},
        )
        _conn.info[_SPAN_KEY] = span

    def after(_conn: Any, *_: Any) -> None:
        span = _conn.info.pop(_SPAN_KEY, None)
        if span is not None:
            span.end()

    def failed(context: Any) -> None:
        connection = context.connection
        span = connection.info.pop(_SPAN_KEY, None) if connection is not None else None
        if span is not None:
            error = type(context.original_exception).__name__
            span.set_attribute("error.type", error)
            span.set_status(StatusCode.ERROR, error)
            span.end()

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    event.listen(engine, "handle_error", failed)
