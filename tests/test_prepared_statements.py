"""The direct statement path (`backend.platform.db.statements`): statements prepared once per
server connection, sent as EXECUTE after that, and correct whatever the server connection
knows: one that lost the statement, one that has it unbeknown to the client, one whose table
changed shape. Errors stay SQLAlchemy's."""

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    Integer,
    MetaData,
    Table,
    Text,
    bindparam,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError, InvalidRequestError

from backend.platform.config import Settings
from backend.platform.db import Database, build_engine

METADATA = MetaData()
SCRATCH = Table(
    "prepared_scratch",
    METADATA,
    Column("id", Integer, primary_key=True),
    Column("label", Text, nullable=False),
)
BY_ID = select(SCRATCH.c.id, SCRATCH.c.label).where(SCRATCH.c.id == bindparam("id"))
ADD = insert(SCRATCH).returning(SCRATCH.c.id)


@pytest.fixture(scope="module")
def direct_engine(settings: Settings, direct_database_url: str) -> Iterator[Engine]:
    engine = build_engine(
        settings.model_copy(update={"DATABASE_URL": direct_database_url}), autocommit=True
    )
    METADATA.drop_all(engine)
    METADATA.create_all(engine)
    with engine.connect() as connection:
        connection.execute(insert(SCRATCH), [{"id": 1, "label": "one"}, {"id": 2, "label": "two"}])
    yield engine
    METADATA.drop_all(engine)
    engine.dispose()


def run(database: Database, handler: Any, **kwargs: Any) -> Any:
    async def once() -> Any:
        return await database.run(handler, **kwargs)

    return asyncio.run(once())


def by_id(session: Any, *, id: int) -> Any:  # noqa: A002 - the column's name
    return session.connection().execute(BY_ID, {"id": id}).one_or_none()


def prepared_here(session: Any) -> list[str]:
    """The statements the session's server connection has prepared, and what it knows."""
    rows = session.connection().execute(
        select(Column("name", Text)).select_from(Table("pg_prepared_statements", MetaData()))
    )
    return sorted(row[0] for row in rows)


def raw(session: Any, sql: str) -> None:
    cursor = session.connection().connection.dbapi_connection.cursor()
    cursor.execute(sql)
    cursor.close()


def known(session: Any) -> set[str]:
    return session.connection().connection.dbapi_connection.prepared_statements


def test_a_statement_is_prepared_once_then_executed_by_name(direct_engine: Engine) -> None:
    database = Database(direct_engine, sessions=1, checkout_timeout=5)
    assert run(database, by_id, id=1) == (1, "one")
    assert run(database, by_id, id=2).label == "two"
    names = run(database, prepared_here)
    plan = database.statements.plan_for(BY_ID, {"id": 1})
    assert plan is not None and plan.name in names
    assert plan.name in run(database, known)


def test_text_only_when_switched_off(direct_engine: Engine) -> None:
    database = Database(direct_engine, sessions=1, checkout_timeout=5, prepare=False)
    run(database, lambda session: raw(session, "DEALLOCATE ALL"))
    assert run(database, by_id, id=1) == (1, "one")
    assert run(database, prepared_here) == []


def test_a_server_connection_that_lost_the_statement_gets_it_again(direct_engine: Engine) -> None:
    """As behind a pooler, where the next query may land on a server connection that never
    saw the PREPARE (or after DISCARD ALL): 'does not exist', then prepared and run."""
    database = Database(direct_engine, sessions=1, checkout_timeout=5)
    assert run(database, by_id, id=1) == (1, "one")
    run(database, lambda session: raw(session, "DEALLOCATE ALL"))
    assert run(database, by_id, id=2) == (2, "two")
    plan = database.statements.plan_for(BY_ID, {"id": 1})
    assert plan is not None and plan.name in run(database, prepared_here)


def test_a_server_connection_that_has_it_unbeknown_is_used_as_it_is(direct_engine: Engine) -> None:
    """The pooler's other case: this client never prepared it on the server connection at
    hand, which has it from another client: 'already exists', then executed."""
    database = Database(direct_engine, sessions=1, checkout_timeout=5)
    assert run(database, by_id, id=1) == (1, "one")
    run(database, lambda session: known(session).clear())
    assert run(database, by_id, id=2) == (2, "two")
    plan = database.statements.plan_for(BY_ID, {"id": 1})
    assert plan is not None and plan.name in run(database, known)


def test_a_table_that_changed_shape_gets_the_statement_replaced(direct_engine: Engine) -> None:
    database = Database(direct_engine, sessions=1, checkout_timeout=5)
    assert run(database, by_id, id=1) == (1, "one")
    try:
        run(database, lambda s: raw(s, "ALTER TABLE prepared_scratch ALTER label TYPE varchar"))
        assert run(database, by_id, id=1) == (1, "one")
    finally:
        run(database, lambda s: raw(s, "ALTER TABLE prepared_scratch ALTER label TYPE text"))


def test_a_replacement_on_a_server_connection_without_the_statement_prepares_it(
    direct_engine: Engine,
) -> None:
    """Behind a pooler, the replacement after 'cached plan must not change result type' may
    land on another server connection, which never had the statement: its DEALLOCATE answers
    'does not exist', and the statement is prepared and run there. Here the connection drops
    its prepared statements just before each replacement, as if the pooler had switched."""
    database = Database(direct_engine, sessions=1, checkout_timeout=5)
    assert run(database, by_id, id=1) == (1, "one")
    replacements: list[str] = []

    def switch_server_connection_before_replacing(session: Any) -> Any:
        dbapi_connection = session.connection().connection.dbapi_connection
        limited = dbapi_connection.cursor_factory

        def execute(cursor: Any, query: Any, vars: Any = None) -> Any:  # noqa: A002
            if isinstance(query, str) and query.startswith("DEALLOCATE todo_"):
                replacements.append(query)
                limited.execute(cursor, "DEALLOCATE ALL")
            return limited.execute(cursor, query, vars)

        dbapi_connection.cursor_factory = type("Switching", (limited,), {"execute": execute})
        return limited

    limited = run(database, switch_server_connection_before_replacing)
    try:
        run(database, lambda s: raw(s, "ALTER TABLE prepared_scratch ALTER label TYPE varchar"))
        assert run(database, by_id, id=1) == (1, "one")
        assert len(replacements) == 1
        plan = database.statements.plan_for(BY_ID, {"id": 1})
        assert plan is not None and plan.name is not None
        assert plan.name in run(database, prepared_here)  # prepared there, not sent as text
        assert plan.name in run(database, known)
    finally:
        run(database, lambda s: raw(s, "ALTER TABLE prepared_scratch ALTER label TYPE text"))
        run(
            database,
            lambda s: setattr(
                s.connection().connection.dbapi_connection, "cursor_factory", limited
            ),
        )


def test_errors_are_sqlalchemys_and_the_statement_stays_usable(direct_engine: Engine) -> None:
    database = Database(direct_engine, sessions=1, checkout_timeout=5)

    def add(session: Any, *, id: int) -> Any:  # noqa: A002
        return session.connection().execute(ADD, {"id": id, "label": "dup"}).scalar_one()

    with pytest.raises(IntegrityError):
        run(database, add, id=1)
    with pytest.raises(IntegrityError):
        run(database, add, id=1)
    assert run(database, by_id, id=1) == (1, "one")


def test_a_statement_the_server_cannot_type_goes_as_text(direct_engine: Engine) -> None:
    database = Database(direct_engine, sessions=1, checkout_timeout=5)
    untyped = select(bindparam("a") + bindparam("b"))  # unknown + unknown: no operator chosen

    def add(session: Any) -> Any:
        return session.connection().execute(untyped, {"a": 1, "b": 2}).scalar_one()

    assert run(database, add) == 3
    assert run(database, add) == 3
    plan = database.statements.plan_for(untyped, {"a": 1, "b": 2})
    assert plan is not None and plan.name is None


def test_values_are_what_sqlalchemy_would_bind(direct_engine: Engine) -> None:
    """A plan works out once where each value comes from; it must give what SQLAlchemy's
    `construct_params` and bind processors give, literals, processed types and all."""
    flags = Table("prepared_flags", MetaData(), Column("done", Boolean), Column("n", Integer))
    statements = Database(direct_engine, sessions=1, checkout_timeout=5).statements
    cases: list[tuple[Any, dict[str, Any]]] = [
        (BY_ID, {"id": 7}),
        (select(SCRATCH.c.id).where(SCRATCH.c.label == "a literal", SCRATCH.c.id > 3), {}),
        (select(flags.c.n).where(flags.c.done == bindparam("done")), {"done": 1}),
        (select(flags.c.n).where(flags.c.done == True), {}),  # noqa: E712 - a bound literal
        (ADD, {"id": 3, "label": "l"}),
        (select(SCRATCH.c.id).where(SCRATCH.c.id == bindparam("x", value=5)), {}),
        (select(SCRATCH.c.id).where(SCRATCH.c.id == bindparam("x", value=5)), {"x": 6}),
    ]
    for statement, params in cases:
        plan = statements.plan_for(statement, params)
        assert plan is not None and plan.sources is not None, statement
        expected = plan.compiled.construct_params(params)
        for name, process in plan.processors.items():
            if name in expected:
                expected[name] = process(expected[name])
        assert plan.values(params) == expected, statement
        assert plan.arguments(params) == tuple(expected[name] for name in plan.names)
    # Worked out per call, as SQLAlchemy does: a value from a callable, a missing required one.
    counter = iter(range(100))
    called = select(SCRATCH.c.id).where(
        SCRATCH.c.id == bindparam("c", callable_=lambda: next(counter))
    )
    plan = statements.plan_for(called, {})
    assert plan is not None and plan.sources is None
    assert [plan.arguments({}), plan.arguments({})] == [(0,), (1,)]
    required = select(SCRATCH.c.id).where(SCRATCH.c.id == bindparam("r"))
    plan = statements.plan_for(required, {})
    assert plan is not None and plan.sources is None
    with pytest.raises(InvalidRequestError, match="A value is required for bind parameter 'r'"):
        plan.arguments({})
    # Values a statement carries from `.params()`: merged per call by SQLAlchemy.
    carried = select(SCRATCH.c.id).where(SCRATCH.c.id == bindparam("p")).params(p=4)
    plan = statements.plan_for(carried, {})
    assert plan is not None and plan.sources is None
    assert plan.arguments({}) == (4,)
