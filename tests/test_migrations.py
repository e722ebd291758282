"""The schema's history: the models and the migrations agree, start-up upgrades (and adopts a
database made before the migrations, every row kept), or, told not to, refuses while behind."""

from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Engine, Integer, MetaData, create_engine, text
from sqlmodel import SQLModel

from backend.main import create_app
from backend.platform.config import Settings
from backend.platform.db.migrate import (
    FIRST_REVISION,
    compared_objects,
    head_revisions,
)
from backend.tables import METADATA
from tests.live_server import free_port, serve
from tests.service_processes import (
    SECRET,
    alembic,
    empty_database,
    service_env,
    start_uvicorn,
    stop,
)


def _drift(engine: Engine, metadata: MetaData) -> list[Any]:
    """What autogenerate would write into a new revision: empty when the models and the
    migrated database agree."""
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={"compare_server_default": True, "include_object": compared_objects("user")},
        )
        return compare_metadata(context, metadata)


def _copy_of_models() -> MetaData:
    metadata = MetaData()
    for table in METADATA.sorted_tables:
        table.to_metadata(metadata)
    return metadata


def test_the_models_are_what_the_migrations_make(engine: Engine) -> None:
    """`engine`'s database was made by the migrations alone; autogenerate finds nothing."""
    assert METADATA is SQLModel.metadata
    assert set(METADATA.tables) == {"idempotency_keys", "tasks", "user"}
    assert _drift(engine, METADATA) == []


def test_a_model_change_without_a_migration_is_drift(engine: Engine) -> None:
    metadata = _copy_of_models()
    metadata.tables["tasks"].append_column(Column("priority", Integer, nullable=True))
    assert [(d[0], d[2], d[3].name) for d in _drift(engine, metadata)] == [
        ("add_column", "tasks", "priority")
    ]


def test_a_model_without_the_index_or_cascade_is_drift(engine: Engine) -> None:
    metadata = _copy_of_models()
    tasks = metadata.tables["tasks"]
    tasks.indexes.clear()
    (foreign_key,) = tasks.foreign_keys
    foreign_key.constraint.ondelete = None  # type: ignore[union-attr]
    kinds = sorted(d[0] if isinstance(d, tuple) else d[0][0] for d in _drift(engine, metadata))
    assert kinds == ["add_fk", "remove_fk", "remove_index"]


def test_a_model_default_unlike_the_database_is_drift(engine: Engine) -> None:
    metadata = _copy_of_models()
    metadata.tables["tasks"].c.completed.server_default = None
    (change,) = _drift(engine, metadata)
    assert change[0][0] == "modify_default"
    assert change[0][2:4] == ("tasks", "completed")


# --- adoption: a database made by the service before it had migrations -------------------------

# What start-up created before the migrations existed, verbatim.
SCHEMA_BEFORE_MIGRATIONS = [
    """CREATE TABLE IF NOT EXISTS "user" (
        id text PRIMARY KEY,
        name text NOT NULL,
        email text NOT NULL UNIQUE,
        "emailVerified" boolean NOT NULL DEFAULT false,
        image text,
        "createdAt" timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
        "updatedAt" timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP
    )""",
    """CREATE TABLE IF NOT EXISTS tasks (
        id serial PRIMARY KEY,
        user_id text NOT NULL REFERENCES "user" (id) ON DELETE CASCADE,
        title varchar(200) NOT NULL,
        description text,
        completed boolean NOT NULL DEFAULT false,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
    "CREATE INDEX IF NOT EXISTS ix_tasks_user_id_created_at "
    "ON tasks (user_id, created_at DESC, id DESC)",
]


def _settings(database_url: str, **overrides: Any) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        DATABASE_URL=database_url,
        BETTER_AUTH_SECRET=SECRET,
        LOG_FORMAT="json",
        **overrides,
    )


def _rows(engine: Engine) -> tuple[list[Any], list[Any]]:
    with engine.connect() as connection:
        users = connection.execute(text('SELECT * FROM "user" ORDER BY id')).all()
        # The columns the tasks had before the migrations: later revisions add their own.
        tasks = connection.execute(
            text(
                "SELECT id, user_id, title, description, completed, created_at, updated_at "
                "FROM tasks ORDER BY id"
            )
        ).all()
    return users, tasks


def _version(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return list(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())


def test_a_database_made_before_migrations_is_adopted_with_every_row(
    database_url: str, make_token: Any
) -> None:
    with empty_database(database_url) as url:
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
        try:
            with engine.begin() as connection:
                for statement in SCHEMA_BEFORE_MIGRATIONS:
                    connection.execute(text(statement))
                connection.execute(
                    text('INSERT INTO "user" (id, name, email) VALUES (:id, :id, :email)'),
                    [{"id": f"old-{n}", "email": f"old-{n}@example.com"} for n in range(3)],
                )
                connection.execute(
                    text(
                        "INSERT INTO tasks (user_id, title, description, completed) "
                        "SELECT 'old-' || (g % 3), 'kept ' || g, 'row ' || g, g % 2 = 0 "
                        "FROM generate_series(1, 30) g"
                    )
                )
            before = _rows(engine)

            with serve(create_app(_settings(url))) as base:
                listed = {
                    f"old-{n}": httpx.get(
                        f"{base}/api/old-{n}/tasks?limit=100",
                        headers={
                            "Authorization": f"Bearer {make_token(f'old-{n}', secret=SECRET)}"
                        },
                    ).json()
                    for n in range(3)
                }

            assert _rows(engine) == before
            assert _version(engine) == list(head_revisions())
            assert sorted(task["id"] for tasks in listed.values() for task in tasks) == list(
                range(1, 31)
            )
            assert {task["title"] for task in listed["old-1"]} == {
                f"kept {g}" for g in range(1, 31) if g % 3 == 1
            }
            assert _drift(engine, METADATA) == []
        finally:
            engine.dispose()


def test_adoption_happens_only_on_upgrade_not_on_reading_commands(database_url: str) -> None:
    with empty_database(database_url) as url:
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
        try:
            with engine.begin() as connection:
                for statement in SCHEMA_BEFORE_MIGRATIONS:
                    connection.execute(text(statement))
            env = service_env(url)
            current = alembic(env, "current")
            assert current.returncode == 0, current.stderr
            assert FIRST_REVISION not in current.stdout
            with engine.connect() as connection:
                assert (
                    connection.execute(text("SELECT to_regclass('alembic_version')")).scalar()
                    is None
                )

            upgrade = alembic(env, "upgrade", "head")
            assert upgrade.returncode == 0, upgrade.stderr
            assert _version(engine) == list(head_revisions())
            assert alembic(env, "current").stdout.strip() == f"{head_revisions()[0]} (head)"
        finally:
            engine.dispose()


# --- DB_MIGRATE_ON_START=false: operators migrate; start-up only checks ---------------------------


def _refusal(env: dict[str, str]) -> tuple[int, str]:
    process = start_uvicorn(env, free_port())
    try:
        process.wait(timeout=60)
    finally:
        output = stop(process)
    return process.returncode, output


def test_with_migrations_off_start_up_refuses_a_database_behind_head(database_url: str) -> None:
    with empty_database(database_url) as url:
        code, output = _refusal(service_env(url, DB_MIGRATE_ON_START="false"))
        assert code == 2
        assert (
            "Refusing to start: the database schema is at no revision (an empty or unversioned "
            f"database); this version needs {head_revisions()[0]}. DB_MIGRATE_ON_START is off, "
            "so run `alembic upgrade head`"
        ) in output
        assert "Traceback" not in output
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
        try:
            with engine.connect() as connection:  # it only looked
                tables = connection.execute(
                    text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
                ).scalar_one()
            assert tables == 0
        finally:
            engine.dispose()


def test_with_migrations_off_start_up_serves_once_operators_have_migrated(
    database_url: str,
) -> None:
    with empty_database(database_url) as url:
        upgrade = alembic(service_env(url), "upgrade", "head")
        assert upgrade.returncode == 0, upgrade.stderr
        with serve(create_app(_settings(url, DB_MIGRATE_ON_START=False))) as base:
            assert httpx.get(f"{base}/health").status_code == 200


def test_the_command_line_compares_the_models_that_alembic_ini_names(database_url: str) -> None:
    """`alembic check` (and autogenerate) find the models through alembic.ini's
    `target_metadata`, since the platform's migrations do not import the features."""
    with empty_database(database_url) as url:
        assert alembic(service_env(url), "upgrade", "head").returncode == 0
        check = alembic(service_env(url), "check")
        assert check.returncode == 0, check.stderr
        assert "No new upgrade operations detected" in check.stdout + check.stderr


def test_the_platform_imports_no_feature() -> None:
    """The platform is the floor: what it needs from the features is handed to it."""
    platform = Path(__file__).parents[1] / "backend" / "platform"
    importing = [
        str(path.relative_to(platform))
        for path in platform.rglob("*.py")
        if "backend.features" in path.read_text()
    ]
    assert importing == []


def test_the_command_line_migrates_without_the_token_secret(database_url: str) -> None:
    """Operators migrate from a shell that need not hold BETTER_AUTH_SECRET."""
    with empty_database(database_url) as url:
        env = service_env(url)
        del env["BETTER_AUTH_SECRET"]
        upgrade = alembic({**env, "BETTER_AUTH_SECRET": ""}, "upgrade", "head")
        assert upgrade.returncode == 0, upgrade.stderr
        assert f"Running upgrade  -> {FIRST_REVISION}" in upgrade.stderr


def test_the_command_line_refuses_an_unreachable_database_in_one_line() -> None:
    env = service_env(f"postgresql://postgres@127.0.0.1:{free_port()}/todo")
    result = alembic(env, "current")
    assert result.returncode == 1
    assert result.stderr == (
        "Refusing to migrate: the database (DATABASE_URL_UNPOOLED, else DATABASE_URL) did not "
        'answer: connection to server at "127.0.0.1", port '
        f"{env['DATABASE_URL'].split(':')[-1].split('/')[0]} failed: Connection refused\n"
    )


# --- failures are refusals, not tracebacks or hangs ---------------------------------------------


def test_a_failing_migration_is_a_clear_refusal_and_changes_nothing(database_url: str) -> None:
    with empty_database(database_url) as url:
        engine = create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
        try:
            with engine.begin() as connection:  # a name the first revision's index needs
                connection.execute(text("CREATE TABLE squatter (id int)"))
                connection.execute(
                    text("CREATE INDEX ix_tasks_user_id_created_at ON squatter (id)")
                )
            code, output = _refusal(service_env(url))
            assert code == 2
            assert (
                f"Refusing to start: migrating the database to {head_revisions()[0]} failed "
                "(nothing was changed, all revisions run in one transaction): relation "
                '"ix_tasks_user_id_created_at" already exists'
            ) in output
            assert "Traceback" not in output
            with engine.connect() as connection:
                made = connection.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                ).scalars()
                assert list(made) == ["squatter"]
        finally:
            engine.dispose()


@pytest.mark.parametrize("setting", ["DATABASE_URL_UNPOOLED", "DATABASE_URL"])
def test_an_unreachable_migration_database_is_a_clear_refusal(
    setting: str, database_url: str
) -> None:
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/todo"
    env = service_env(database_url, DB_STARTUP_WAIT_SECONDS="1")
    env[setting] = unreachable
    code, output = _refusal(env)
    assert code == 2
    if setting == "DATABASE_URL_UNPOOLED":  # checked before the app is built, by its name
        assert (
            f"Refusing to start: DATABASE_URL_UNPOOLED ({unreachable.replace('postgres@', '')}) "
            "cannot be reached: "
            "connection to server at"
        ) in output
    else:
        assert (
            "Refusing to start: the database to migrate with (DATABASE_URL_UNPOOLED, else "
            "DATABASE_URL) did not answer within 1 s: Connection refused\n"
        ) in output
    assert "Traceback" not in output


def test_an_unreachable_serving_database_is_a_clear_refusal(database_url: str) -> None:
    """Migrations on a reachable direct URL, requests on a pooled one that does not answer."""
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/todo"
    env = service_env(unreachable, DATABASE_URL_UNPOOLED=database_url, DB_STARTUP_WAIT_SECONDS="1")
    code, output = _refusal(env)
    assert code == 2
    assert (
        "Refusing to start: the database (DATABASE_URL) did not answer within 1 s: "
        "Connection refused\n"
    ) in output
    assert "Traceback" not in output
