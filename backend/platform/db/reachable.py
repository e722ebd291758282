"""Refusing to start, with a plain message, when a database URL does not lead to a database."""

import time

import psycopg2
import structlog

from backend.platform.config import Settings
from backend.platform.db.engine import connection_class
from backend.platform.logging import redacted_url

log = structlog.get_logger("backend.db")


class DatabaseUnreachable(Exception):
    """A configured database could not be reached at start-up; the message says which and why."""


def refuse_unless_reachable(settings: Settings, *, setting: str = "DATABASE_URL_UNPOOLED") -> None:
    """Connect once to the URL of `setting` (retrying while DB_STARTUP_WAIT_SECONDS last, as a
    database that is still starting takes a moment), or raise `DatabaseUnreachable`.

    For a URL the service would otherwise use only later (DATABASE_URL_UNPOOLED, for migrations
    and session work): a wrong host, a refused certificate or a missing database is then told
    at start, with the setting's name and libpq's reason, instead of surfacing later as a
    traceback or a hang. Every attempt is bounded by DB_CONNECT_TIMEOUT_SECONDS.
    """
    url = settings.unpooled_url if setting == "DATABASE_URL_UNPOOLED" else settings.DATABASE_URL
    factory = connection_class(
        connect_timeout=settings.DB_CONNECT_TIMEOUT_SECONDS,
        network_timeout=settings.DB_CONNECT_TIMEOUT_SECONDS,
        statement_prefix="",
    )
    deadline = time.monotonic() + settings.DB_STARTUP_WAIT_SECONDS
    delay = 0.25
    while True:
        try:
            connection = psycopg2.connect(
                _libpq_url(url),
                connection_factory=factory,
                connect_timeout=settings.DB_CONNECT_TIMEOUT_SECONDS,
                application_name="todo-api",
            )
        except psycopg2.Error as exc:
            reason = " ".join(str(exc).split())
            if time.monotonic() + delay >= deadline:
                raise DatabaseUnreachable(
                    f"{setting} ({redacted_url(url)}) cannot be reached: {reason}"
                ) from None
            log.warning("db.unavailable_at_startup", setting=setting, error=reason, retry_in=delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        else:
            connection.close()
            return


def _libpq_url(url: str) -> str:
    """libpq takes postgres:// and postgresql://, not SQLAlchemy's postgresql+psycopg2://."""
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)
