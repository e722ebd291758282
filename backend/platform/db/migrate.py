"""The schema's history (Alembic revisions in `migrations/`) and bringing a database to its head.

Start-up calls `prepare_schema`: with DB_MIGRATE_ON_START (the default) it upgrades to head,
serialised across instances; without it, it only checks that the database is at head and
refuses to start otherwise. Operators run the same migrations with `alembic upgrade head` from
the repository's root (alembic.ini). Both connect with `Settings.sqlalchemy_unpooled_url`: the
direct endpoint when DATABASE_URL_UNPOOLED is set, else DATABASE_URL, which works through a
transaction-mode pooler too (see migrations/env.py).
"""

import importlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydantic import ValidationError
from sqlalchemy import Connection, Engine, MetaData, create_engine, inspect
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

from backend.platform.config import MIN_SECRET_LENGTH, Settings
from backend.platform.db.engine import connection_class
from backend.platform.db.schema import wait_for_database

log = structlog.get_logger("backend.db")

MIGRATIONS = Path(__file__).resolve().with_name("migrations")
# The revision that is the schema as the service created it before it had migrations.
FIRST_REVISION = "3f1c2a9b7d10"
# Held (transaction-level) by whoever migrates; the same key the pre-migrations DDL took, so an
# older instance starting during the upgrade waits too.
MIGRATION_LOCK = 727274
# The default name of Better Auth's users table, under which the models declare it.
MODELS_USER_TABLE = "user"


class StartupRefused(Exception):
    """The schema cannot be brought to, or is not at, what this version needs; says why."""


def alembic_config(
    connection: Connection | None = None, *, auth_user_table: str, upgrading: bool = False
) -> Config:
    """The migrations' configuration without alembic.ini: what start-up and tests use."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    config.attributes["auth_user_table"] = auth_user_table
    config.attributes["upgrading"] = upgrading
    return config


def upgrade_to_head(connection: Connection, *, auth_user_table: str) -> None:
    """All pending revisions in one transaction, under the migration lock, a database made
    before the migrations adopted first (see migrations/env.py)."""
    config = alembic_config(connection, auth_user_table=auth_user_table, upgrading=True)
    command.upgrade(config, "head")


def head_revisions() -> tuple[str, ...]:
    config = alembic_config(auth_user_table=MODELS_USER_TABLE)
    return tuple(ScriptDirectory.from_config(config).get_heads())


def current_revisions(connection: Connection) -> tuple[str, ...]:
    return tuple(MigrationContext.configure(connection).get_current_heads())


def prepare_schema(settings: Settings) -> None:
    """At start-up: the schema at head, or `StartupRefused` saying what to do."""
    engine = migration_engine(settings)
    try:
        try:
            wait_for_database(engine, timeout=settings.DB_STARTUP_WAIT_SECONDS)
        except OperationalError as exc:
            raise StartupRefused(
                "the database to migrate with (DATABASE_URL_UNPOOLED, else DATABASE_URL) did "
                f"not answer within {settings.DB_STARTUP_WAIT_SECONDS:g} s: "
                f"{_first_line(exc.orig)}"
            ) from None
        with engine.connect() as connection:
            if settings.DB_MIGRATE_ON_START:
                _upgrade_or_refuse(connection, settings)
            else:
                _refuse_unless_at_head(connection)
    finally:
        engine.dispose()


def _upgrade_or_refuse(connection: Connection, settings: Settings) -> None:
    started = time.monotonic()
    try:
        upgrade_to_head(connection, auth_user_table=settings.AUTH_USER_TABLE)
    except DBAPIError as exc:
        raise StartupRefused(
            f"migrating the database to {', '.join(head_revisions())} failed (nothing was "
            f"changed, all revisions run in one transaction): {_first_line(exc.orig)}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - Alembic's own errors (an unknown revision, say)
        raise StartupRefused(f"migrating the database failed: {exc}") from None
    log.info(
        "db.schema_at_head",
        revision=",".join(current_revisions(connection)),
        took_ms=round((time.monotonic() - started) * 1000),
    )


def _refuse_unless_at_head(connection: Connection) -> None:
    current, head = current_revisions(connection), head_revisions()
    if set(current) == set(head):
        log.info("db.schema_at_head", revision=",".join(current))
        return
    found = ", ".join(current) or "no revision (an empty or unversioned database)"
    raise StartupRefused(
        f"the database schema is at {found}; this version needs {', '.join(head)}. "
        "DB_MIGRATE_ON_START is off, so run `alembic upgrade head` from the repository's root "
        "with this environment first (or set DB_MIGRATE_ON_START=true)"
    )


def migration_engine(settings: Settings) -> Engine:
    """A one-connection-at-a-time engine on the migration URL. Not the serving engine: nothing
    is pooled, and nothing but the transaction is set on its connection."""
    return create_engine(
        settings.sqlalchemy_unpooled_url,
        poolclass=NullPool,
        connect_args={
            # Opening a connection has the serving engine's deadline; a statement has none,
            # since a migration may rightly run (or wait for the lock) for minutes. Keepalives
            # still notice a dead server within a minute and a half.
            "connection_factory": connection_class(
                connect_timeout=settings.DB_CONNECT_TIMEOUT_SECONDS,
                network_timeout=None,
                statement_prefix="",
            ),
            "connect_timeout": settings.DB_CONNECT_TIMEOUT_SECONDS,
            "application_name": "todo-api-migrations",
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        },
    )


def _first_line(error: BaseException | None) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# --- what migrations/env.py uses ------------------------------------------------------------


def settings_for_migrations() -> Settings:
    """The service's settings from the environment, for the `alembic` command line.

    Migrations never verify a token, so the operator's shell need not hold the token secret:
    a stand-in takes its place. Any other unsafe setting is refused as at start-up."""
    try:
        return Settings(BETTER_AUTH_SECRET="m" * MIN_SECRET_LENGTH)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SystemExit(f"Refusing to migrate: {problems}") from None


@contextmanager
def connect_for_migrations(settings: Settings) -> Iterator[Connection]:
    """The command line's connection; one that cannot be opened is one line, not a traceback."""
    engine = migration_engine(settings)
    try:
        try:
            connection = engine.connect()
        except OperationalError as exc:
            raise SystemExit(
                "Refusing to migrate: the database (DATABASE_URL_UNPOOLED, else DATABASE_URL) "
                f"did not answer: {_first_line(exc.orig)}"
            ) from None
        with connection:
            yield connection
    finally:
        engine.dispose()


def target_metadata(config: Config) -> MetaData | None:
    """The models autogenerate compares against, as whoever runs the migrations names them:
    `config.attributes["target_metadata"]`, or alembic.ini's `target_metadata = module:name`
    (the command line). None for a plain upgrade, which compares nothing. The platform does
    not import the models itself: they live above it, in the features."""
    given = config.attributes.get("target_metadata")
    if given is not None:
        return given  # type: ignore[no-any-return]
    named = config.get_main_option("target_metadata")
    if not named:
        return None
    module, _, attribute = named.partition(":")
    metadata = getattr(importlib.import_module(module), attribute)
    assert isinstance(metadata, MetaData), f"{named} is not a SQLAlchemy MetaData"
    return metadata


def compared_objects(auth_user_table: str) -> Callable[..., bool]:
    """Which database objects autogenerate compares with the models.

    The database is shared with Better Auth: its other tables (session, account, ...) and what
    its plugins add to the users table are its own, not drift, and are never proposed for
    dropping. `tasks` is compared both ways. A users table under another name than the models'
    is Better Auth's entirely; autogenerate is meant to run with the default name."""

    def include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        if type_ == "table":
            return not (reflected and compare_to is None)
        table = getattr(getattr(obj, "table", None), "name", None)
        if table in (auth_user_table, MODELS_USER_TABLE) and reflected and compare_to is None:
            return False
        return True

    return include


def adopt_unversioned_schema(context: MigrationContext, script: ScriptDirectory) -> None:
    """A database made before the migrations existed has `tasks` and no version row: it is
    the first revision's schema exactly, so it is stamped there (its rows untouched) and
    upgraded from there. Called in the migration transaction, under the lock."""
    connection = context.connection
    assert connection is not None
    if context.get_current_heads() or not inspect(connection).has_table("tasks"):
        return
    log.info("db.schema_adopted", revision=FIRST_REVISION)
    context.stamp(script, FIRST_REVISION)
