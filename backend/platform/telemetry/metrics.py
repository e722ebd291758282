"""Prometheus metrics: the service's instruments, and `GET /metrics` for the scraper.

Names and labels are OpenTelemetry's semantic conventions as exported to Prometheus (dots
become underscores, the unit a suffix), so stock dashboards and alerts work:
- `http_server_request_duration_seconds{http_request_method, http_route,
  http_response_status_code}`: a histogram, with the buckets the conventions recommend. The
  route is the template (`/api/{user_id}/tasks/{task_id}`), never the path, so no label holds a
  user id; a request no route matched has an empty `http_route` (the attribute left out).
- `db_client_connection_count{db_client_connection_pool_name, db_client_connection_state}`
  (`idle`, `used`) and `db_client_connection_pending_requests{db_client_connection_pool_name}`:
  the service's database sessions (`Database`), summed over the live workers.
- `todo_auth_failures_total{reason}`: the reasons of the `auth.failed` log line.
- `todo_db_unavailable_total`: requests answered 503 because the database was unavailable.
- `todo_jwks_fetches_total{outcome}`: fetches of Better Auth's JWKS (success, error,
  invalid).

prometheus_client is imported only once metrics are switched on (METRICS_TOKEN), after
`workers.metrics_directory()` has chosen where the numbers go.
"""

import asyncio
import hmac
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request, Response, status
from starlette.concurrency import run_in_threadpool

from backend.platform.telemetry.workers import (
    check_prometheus_client_mode,
    forget_dead_workers,
    forget_this_worker,
    metrics_directory,
)

if TYPE_CHECKING:
    from backend.platform.db import Database

# OpenTelemetry's advice for http.server.request.duration (seconds).
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
# The conventions' known methods; any other is `_OTHER`, so a client cannot mint label values.
KNOWN_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"}
)
UNMATCHED_ROUTE = ""
# How often each worker publishes its sessions' state in multiprocess mode (seconds).
POOL_PUBLISH_INTERVAL = 1.0


class Metrics:
    """The service's instruments. One per process: prometheus-client's metrics are process-wide
    (in multiprocess mode they are files named for the process)."""

    def __init__(self, directory: Path | None) -> None:
        check_prometheus_client_mode(directory)
        from prometheus_client import (  # noqa: PLC0415 - after the directory is chosen
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            disable_created_metrics,
        )

        disable_created_metrics()  # `*_created` series: noise to a dashboard, absent across workers
        self.directory = directory
        # Multiprocess mode: no registry; a scrape collects every process's files instead.
        self.registry = CollectorRegistry() if directory is None else None
        registry = self.registry
        self._request_duration = Histogram(
            "http_server_request_duration_seconds",
            "Duration of HTTP server requests.",
            ["http_request_method", "http_route", "http_response_status_code"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self._auth_failures = Counter(
            "todo_auth_failures",
            "Requests refused by authentication, by the reason logged with auth.failed.",
            ["reason"],
            registry=registry,
        )
        self._db_unavailable = Counter(
            "todo_db_unavailable",
            "Requests answered 503 because the database was unavailable.",
            registry=registry,
        )
        self._jwks_fetches = Counter(
            "todo_jwks_fetches",
            "Fetches of Better Auth's JWKS, by outcome.",
            ["outcome"],
            registry=registry,
        )
        # livesum: a scrape adds up the workers that are running now.
        self._connections = Gauge(
            "db_client_connection_count",
            "Database connections of the service's sessions, by state.",
            ["db_client_connection_pool_name", "db_client_connection_state"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self._pending = Gauge(
            "db_client_connection_pending_requests",
            "Requests waiting for a database session.",
            ["db_client_connection_pool_name"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        # Labelled children, looked up once per label set: `labels()` validates and builds a
        # key every time, a request only does a dict lookup.
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._pool_children: dict[str, tuple[Any, Any, Any]] = {}

    def observe_request(self, method: str, route: str, status_code: int, seconds: float) -> None:
        """Record one request (the request log middleware calls this once per request)."""
        key = (method, route, status_code)
        child = self._request_children.get(key)
        if child is None:
            if method not in KNOWN_METHODS:
                key = ("_OTHER", route, status_code)
            child = self._request_children.get(key)
            if child is None:
                child = self._request_duration.labels(key[0], route, str(status_code))
                self._request_children[key] = child
        child.observe(seconds)

    def count_auth_failure(self, reason: str) -> None:
        self._auth_failures.labels(reason).inc()

    def count_db_unavailable(self) -> None:
        self._db_unavailable.inc()

    def count_jwks_fetch(self, outcome: str) -> None:
        self._jwks_fetches.labels(outcome).inc()

    def publish_pool(self, database: "Database") -> None:
        used, idle, pending = database.usage()
        children = self._pool_children.get(database.pool_name)
        if children is None:
            name = database.pool_name
            children = (
                self._connections.labels(name, "used"),
                self._connections.labels(name, "idle"),
                self._pending.labels(name),
            )
            self._pool_children[name] = children
        children[0].set(used)
        children[1].set(idle)
        children[2].set(pending)

    def render(self, database: "Database") -> bytes:
        """The Prometheus text format: this process's numbers, or every worker's."""
        from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415
        from prometheus_client.multiprocess import MultiProcessCollector  # noqa: PLC0415

        self.publish_pool(database)
        if self.directory is None:
            assert self.registry is not None
            return generate_latest(self.registry)
        forget_dead_workers(self.directory)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.directory))
        return generate_latest(registry)

    async def publish_pool_while_serving(self, database_of_app: Callable[[], "Database"]) -> None:
        """Multiprocess mode: the worker that answers a scrape cannot ask the others about their
        sessions, so each publishes its own, once a second (three file writes; nothing per
        request)."""
        while True:
            self.publish_pool(database_of_app())
            await asyncio.sleep(POOL_PUBLISH_INTERVAL)

    def stop(self) -> None:
        if self.directory is not None:
            forget_this_worker(self.directory)


_metrics: Metrics | None = None


def enable_metrics() -> Metrics:
    """The process's instruments, created on first use (when an app with METRICS_TOKEN is built)."""
    global _metrics
    if _metrics is None:
        directory = metrics_directory()
        _metrics = Metrics(directory)
        if directory is not None:
            forget_dead_workers(directory)
    return _metrics


def count_auth_failure(reason: str) -> None:
    if _metrics is not None:
        _metrics.count_auth_failure(reason)


def count_db_unavailable() -> None:
    if _metrics is not None:
        _metrics.count_db_unavailable()


def count_jwks_fetch(outcome: str) -> None:
    if _metrics is not None:
        _metrics.count_jwks_fetch(outcome)


# --- GET /metrics -------------------------------------------------------------------------------

metrics_router = APIRouter()
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def token_is_valid(authorization: list[str], expected: str) -> bool:
    """Exactly one `Authorization: Bearer <token>` header with the token; compared in constant
    time, so the answer's timing tells nothing about how much of a guess was right."""
    if len(authorization) != 1:
        return False
    scheme, _, presented = authorization[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), expected.encode())


@metrics_router.get("/metrics", include_in_schema=False)
async def serve_metrics(request: Request) -> Response:
    """Prometheus's scrape: the service's metrics in the text format, to METRICS_TOKEN only."""
    expected = request.app.state.settings.METRICS_TOKEN
    if not token_is_valid(request.headers.getlist("authorization"), expected):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "GET /metrics needs `Authorization: Bearer <METRICS_TOKEN>`",
            headers=_CHALLENGE,
        )
    from prometheus_client import CONTENT_TYPE_LATEST  # noqa: PLC0415

    metrics = enable_metrics()
    # Reading every worker's files is disk I/O: off the event loop.
    body = await run_in_threadpool(metrics.render, request.app.state.database)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
