"""Waiting at start-up for the database to answer (the schema itself: `migrate`)."""

import time
from collections.abc import Callable

import structlog
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

log = structlog.get_logger("backend.db")


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
