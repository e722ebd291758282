"""Schema bootstrap at start-up: wait for the database, then create what is missing."""

import time
from collections.abc import Callable

import structlog
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from backend.platform.db.engine import transactional

log = structlog.get_logger("backend.db")


def run_ddl(engine: Engine, statements: list[str]) -> None:
    """Run DDL idempotently, serialised across workers by an advisory lock."""
    with transactional(engine.connect()) as connection, connection.begin():
        connection.execute(text("SELECT pg_advisory_xact_lock(727274)"))
        for statement in statements:
            connection.execute(text(statement))


def wait_for_database(
    engine: Engine, *, timeout: float, then: Callable[[Engine], None] | None = None
) -> None:
    """Retry until the database answers (compose and Neon cold starts), then run `then`."""
    deadline = time.monotonic() + timeout
    delay = 0.25
    while True:
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            if then is not None:
                then(engine)
            return
        except OperationalError as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("db.unavailable_at_startup", error=str(exc.orig).strip(), retry_in=delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
