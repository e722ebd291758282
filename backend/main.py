"""The ASGI app (`uvicorn backend.main:app`): wires the platform and mounts each slice's router."""

import asyncio
import contextlib
import gc
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NoReturn

from fastapi import APIRouter, FastAPI
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool

from backend.features.create.router import router as create_router
from backend.features.delete.router import router as delete_router
from backend.features.get.router import router as get_router
from backend.features.list.router import router as list_router
from backend.features.toggle.router import router as toggle_router
from backend.features.update.router import router as update_router
from backend.platform.auth import TokenVerifier, document_bearer_auth
from backend.platform.config import Settings, get_settings
from backend.platform.cors import CrossOriginMiddleware
from backend.platform.db import Database, build_engine, close_pool, wait_for_database
from backend.platform.db.migrate import StartupRefused, prepare_schema
from backend.platform.db.reachable import DatabaseUnreachable, refuse_unless_reachable
from backend.platform.direct_dispatch import DirectDispatchMiddleware
from backend.platform.errors import BodySizeLimitMiddleware, install_error_handlers
from backend.platform.health import router as health_router
from backend.platform.idempotency import expire_keys_forever
from backend.platform.logging import RequestLogMiddleware, configure_logging
from backend.platform.telemetry.metrics import enable_metrics, metrics_router
from backend.platform.telemetry.tracing import Tracing, fastapi_telemetry

API_DESCRIPTION = """
Each signed-in user's tasks. Every `/api/{user_id}/tasks` route needs
`Authorization: Bearer <JWT>` whose `sub` is `{user_id}`: 401 without a valid token,
403 for another user's path, 404 for a task that is not yours. Errors are `{"detail": ...}`.
"""


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings)
    engine = engine or build_engine(settings, autocommit=True)
    metrics = enable_metrics() if settings.METRICS_TOKEN else None
    tracing = Tracing()
    telemetry = fastapi_telemetry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        wait = settings.DB_STARTUP_WAIT_SECONDS
        try:
            # The schema first (on DATABASE_URL_UNPOOLED when set), then the serving pool.
            await run_in_threadpool(prepare_schema, settings)
            await run_in_threadpool(wait_for_database, engine, timeout=wait)
        except StartupRefused as exc:
            _refuse_to_start(f"Refusing to start: {exc}\n")
        except OperationalError as exc:
            error = str(exc.orig).strip().splitlines()[0]
            _refuse_to_start(
                f"Refusing to start: the database (DATABASE_URL) did not answer within "
                f"{wait:g} s: {error}\n"
            )
        await run_in_threadpool(app.state.database.open_connections, settings.DB_POOL_SIZE)
        # Everything built so far (modules, the app, pydantic's validators) lives as long as
        # the process. Left in the collector, each full collection walks all of it: about
        # 100 ms with every request on hold, roughly once a second under load. Frozen, a full
        # collection takes 2-3 ms (measured with gc.callbacks under wrk).
        gc.collect()
        gc.freeze()
        # After start-up's own statements: they belong to no request.
        tracing.start(engine, requested=telemetry["tracing"])
        publisher = None
        if metrics is not None and metrics.directory is not None:
            publisher = asyncio.create_task(
                metrics.publish_pool_while_serving(lambda: app.state.database)
            )
        # The service deletes its own expired idempotency keys: no outside cron to forget.
        app.state.key_cleanup = asyncio.create_task(expire_keys_forever(app.state.database))
        yield
        app.state.key_cleanup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await app.state.key_cleanup
        # uvicorn runs this after SIGTERM once in-flight requests have finished.
        if publisher is not None:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
        if metrics is not None:
            metrics.stop()
        app.state.database.close()
        await run_in_threadpool(close_pool, engine)

    app = FastAPI(
        title="Todo API",
        version="1.0.0",
        description=API_DESCRIPTION,
        lifespan=lifespan,
        telemetry=telemetry,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.database = Database.for_engine(engine, settings)
    app.state.token_verifier = TokenVerifier(settings)

    install_error_handlers(app)
    for router in (
        create_router,
        list_router,
        get_router,
        update_router,
        delete_router,
        toggle_router,
        health_router,
    ):
        mount_routes(app, router)
    if metrics is not None:  # without a token there is no /metrics at all: a 404
        mount_routes(app, metrics_router)
    serve_task_routes_first(app)
    document_bearer_auth(app)

    # Added innermost first: the request log wraps everything, CORS answers preflights before
    # the size limit or any route sees them, and the task routes are dispatched to directly.
    app.add_middleware(DirectDispatchMiddleware, owner=app)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.MAX_BODY_BYTES)
    app.add_middleware(
        CrossOriginMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=[
            "Authorization",
            "Content-Type",
            "X-Request-ID",
            "Idempotency-Key",
            "If-Match",
            "If-None-Match",
        ],
        expose_headers=["X-Request-ID", "Retry-After", "ETag", "Idempotent-Replayed"],
        max_age=600,
    )
    app.add_middleware(RequestLogMiddleware, metrics=metrics, tracing=tracing)
    return app


def mount_routes(app: FastAPI, router: APIRouter) -> None:
    """Serve a slice's routes from the app's own route list.

    Not `app.include_router(router)`: FastAPI (0.16x) keeps an included router as a layer of
    its own, and every request walks each such layer in turn (bookkeeping in the scope, a
    version check over the router's routes, the match done again inside), so a route's cost
    grew with the slices mounted before it: 9% of the CPU of a `get` and 12% of a `toggle`, the
    last slice (callgrind). The slices' routes already carry their prefix, tags, responses and
    route class (APIRouter bakes them in when a route is declared), and `include_router` adds
    nothing else here: no prefix, dependencies or overrides at the app level.
    """
    app.router.routes.extend(router.routes)


def serve_task_routes_first(app: FastAPI) -> None:
    """Move the task routes ahead of FastAPI's documentation routes (`/openapi.json`, `/docs`,
    `/docs/oauth2-redirect`, `/redoc`), which FastAPI adds first. Starlette tries routes in
    order, and each one passed costs a request its match (the router took about 12% of a
    `get`'s event-loop time, py-spy, with these four tried first). No path of one can match
    the other's, so only the cost changes; the task routes keep their order among themselves,
    and the OpenAPI document is the same."""
    routes = app.router.routes
    routes.sort(key=lambda route: not getattr(route, "path", "").startswith("/api/"))


def _app_from_environment() -> FastAPI:
    try:
        settings = get_settings()
        if settings.DATABASE_URL_UNPOOLED:
            refuse_unless_reachable(settings)
        return create_app(settings)
    except ValidationError as exc:
        problems = "\n".join(f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        sys.stderr.write(f"Refusing to start: the settings are not safe to run with:\n{problems}\n")
        raise SystemExit(2) from None
    except DatabaseUnreachable as exc:
        sys.stderr.write(f"Refusing to start: {exc}\n")
        raise SystemExit(2) from None


def _refuse_to_start(message: str) -> NoReturn:
    """Exit 2 with `message` and no traceback, from inside the lifespan, where an exception
    would reach uvicorn, which logs it with its traceback and exits 3."""
    sys.stdout.flush()
    sys.stderr.write(message)
    sys.stderr.flush()
    os._exit(2)


_app: FastAPI | None = None


def __getattr__(name: str) -> FastAPI:
    """`backend.main:app`, built from the environment on first access, not on import, so that
    tests and tools can import `create_app` without production settings."""
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        _app = _app_from_environment()
    return _app
