"""Alembic's environment: how `alembic ...` and start-up reach the database.

Every migration of one run happens in ONE transaction that first takes a transaction-level
advisory lock, so instances starting together migrate one after another (the others then find
the schema at head), and nothing here outlives the transaction: no session-level lock or SET,
which a transaction-mode pooler (Neon's pooled endpoint, PgBouncer) would leave on a server
connection another client gets next. A database made before the migrations existed (tables,
no version table) is adopted inside that transaction: stamped at the first revision, then
upgraded, its rows untouched.
"""

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from backend.platform.db.migrate import (
    MIGRATION_LOCK,
    adopt_unversioned_schema,
    compared_objects,
    connect_for_migrations,
    settings_for_migrations,
    target_metadata,
)

config = context.config
if config.config_file_name is not None and not config.attributes.get("connection"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def run_migrations_offline() -> None:
    """`alembic upgrade head --sql`: the SQL for a DBA to run, nothing executed."""
    settings = settings_for_migrations()
    config.attributes.setdefault("auth_user_table", settings.AUTH_USER_TABLE)
    context.configure(
        url=settings.sqlalchemy_unpooled_url,
        target_metadata=target_metadata(config),
        literal_binds=True,
        compare_server_default=True,
        include_object=compared_objects(config.attributes["auth_user_table"]),
    )
    with context.begin_transaction():
        context.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        context.run_migrations()


def run_migrations_online() -> None:
    given = config.attributes.get("connection")
    if given is None:  # the `alembic` command line
        settings = settings_for_migrations()
        config.attributes.setdefault("auth_user_table", settings.AUTH_USER_TABLE)
        with connect_for_migrations(settings) as connection:
            migrate(connection)
    else:  # start-up and tests hand over their connection (see `migrate.upgrade_to_head`)
        migrate(given)


def migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata(config),
        compare_server_default=True,
        include_object=compared_objects(config.attributes["auth_user_table"]),
    )
    with context.begin_transaction():
        context.execute(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        if upgrading():
            adopt_unversioned_schema(context.get_context(), context.script)
        context.run_migrations()


def upgrading() -> bool:
    """Only an upgrade adopts an unversioned database: `alembic current`, `check` and
    autogenerate only read, and a downgrade of a database with no revision has nothing to undo."""
    if "upgrading" in config.attributes:  # set by `migrate.alembic_config`
        return bool(config.attributes["upgrading"])
    command = getattr(config.cmd_opts, "cmd", None)  # the command line: (function, args, kwargs)
    return command is not None and getattr(command[0], "__name__", "") == "upgrade"


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
