"""The slices' statements, sent straight to psycopg2 and prepared once per server connection.

A handler writes `session.connection().execute(statement, params)` with a SQLAlchemy Core
statement, as anywhere else. Inside `Database.run` that connection is a `DirectConnection`:

- **No per-execution pipeline.** Each statement is compiled once (per set of parameter names,
  which an INSERT's columns depend on) into a `Plan`: its SQL, its parameters in order, their
  bind processors. A request then costs a dict lookup, the driver call and a tuple per row.
  SQLAlchemy's `Connection.execute` spent about three quarters of a `get`'s database CPU in
  the service on its own bookkeeping (cache key, execution context, result metadata, `Row`s).
- **Prepared once per server connection.** PostgreSQL parses and plans a text statement on
  every call: about 40 of the 90 us it spent on a `get`, and of the 190 on an `update`. A
  plan's statement is sent as `EXECUTE name(...)` after a `PREPARE` (SQL, not protocol level, so
  psycopg2 sends it in the same simple query as the `SET LOCAL` that carries the statement
  timeout; still one round trip). The name is a hash of the statement's text and parameter
  types, so one name is always one statement, whichever instance or version prepared it.

Behind a pooler in transaction mode (Neon's, PgBouncer's), each query may run on another server
connection, so what this client connection has prepared says little about the server
connection at hand. A server connection that lacks the statement answers `EXECUTE` with
"prepared statement does not exist" (26000), and one that has it answers `PREPARE` with
"already exists" (42P05); both are refused before anything runs, so the query is sent again
the other way, up to three times, then as plain text. Each server connection thus learns each
statement once. After DDL that changes a statement's result type ("cached plan must not change
result type"), the statement is replaced. `DB_PREPARED_STATEMENTS=false` sends plain text.

Only on an autocommit connection (the serving engine's): in an open transaction a refused
`EXECUTE` would abort the transaction. There, and for a statement that is not a Core SELECT,
INSERT, UPDATE or DELETE, the compiled text is sent, still without the pipeline. Whatever this
path cannot run as SQLAlchemy would (expanding parameters, Python-side column defaults, result
types that need processing, statement events such as tracing's) goes through SQLAlchemy's
`Connection.execute` unchanged. Errors are SQLAlchemy's (`IntegrityError`, `OperationalError`,
...), and a connection that an error broke is invalidated, as SQLAlchemy does.
"""

import hashlib
import re
from collections import namedtuple
from collections.abc import Iterator
from typing import Any

import psycopg2
from psycopg2 import errorcodes
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.types import NullType, String

# At most this many plans per engine: the slices have a few dozen statements. A statement built
# per request (which nothing here does) would otherwise grow the cache without end.
MAX_PLANS = 1024
# Tries of EXECUTE / PREPARE + EXECUTE behind a pooler before the statement goes as text.
_ATTEMPTS = 3
_PLACEHOLDER = re.compile(r"%%|%\(([^)]+)\)s")
_NEW_RESULT_TYPE = "cached plan must not change result type"
# The PREPARE could not type a parameter from its context: this statement is sent as text.
_UNPREPARABLE = frozenset(
    {
        errorcodes.INDETERMINATE_DATATYPE,
        errorcodes.DATATYPE_MISMATCH,
        errorcodes.UNDEFINED_FUNCTION,
        errorcodes.AMBIGUOUS_FUNCTION,
    }
)


class Plan:
    """One statement compiled for this path: its text, and its prepared form when it has one."""

    __slots__ = (
        "compiled",
        "text",
        "names",
        "processors",
        "name",
        "execute",
        "prepare_and_execute",
        "replace_and_execute",
        "row_class",
        "sources",
    )

    def __init__(
        self,
        compiled: Any,
        names: list[str],
        prepared: tuple[str, str] | None,
        keys: frozenset[str] = frozenset(),
    ):
        self.compiled = compiled
        self.text: str = compiled.string
        self.names = tuple(names)
        self.processors: dict[str, Any] = dict(compiled._bind_processors)
        self.sources = _sources(compiled, self.names, self.processors, keys)
        self.row_class: Any = None
        self.name: str | None = None
        self.execute = self.prepare_and_execute = self.replace_and_execute = ""
        if prepared is not None:
            self.name, prepare = prepared
            placeholders = ", ".join(["%s"] * len(names))
            self.execute = (
                f"EXECUTE {self.name}({placeholders})" if names else f"EXECUTE {self.name}"
            )
            self.prepare_and_execute = f"{prepare}; {self.execute}"
            self.replace_and_execute = f"DEALLOCATE {self.name}; {self.prepare_and_execute}"

    def values(self, params: dict[str, Any]) -> dict[str, Any]:
        """Every bind's value (the statement's own literals included), processed for the driver."""
        if self.sources is not None:
            return dict(zip(self.names, self.arguments(params), strict=True))
        values: dict[str, Any] = self.compiled.construct_params(params)
        for name, process in self.processors.items():
            if name in values:
                values[name] = process(values[name])
        return values

    def arguments(self, params: dict[str, Any]) -> tuple[Any, ...]:
        """The values of `names`, in order, processed for the driver."""
        sources = self.sources
        if sources is None:
            values = self.values(params)
            return tuple([values[name] for name in self.names])
        return tuple(
            [
                fixed if key is None else params[key] if process is None else process(params[key])
                for key, fixed, process in sources
            ]
        )


def _sources(
    compiled: Any, names: tuple[str, ...], processors: dict[str, Any], keys: frozenset[str]
) -> tuple[tuple[str | None, Any, Any], ...] | None:
    """Where each of `names` takes its value from, for parameters with these keys: (key, None,
    processor) for a value given per execution, (None, processed value, None) for one of the
    statement's own literals. Worked out once per plan, what `construct_params` works out on
    every call (about 2% of a request's CPU, py-spy). None where a value must be worked out per call
    (a bind computed by a callable, one required but not given), which `construct_params` does.
    """
    if compiled._render_postcompile or getattr(compiled, "_collected_params", None):
        return None  # values expanded, or given by the statement's `.params()`
    binds: dict[str, Any] = {}
    for bind, name in compiled.bind_names.items():
        binds[name] = bind  # the last one of a name wins, as in construct_params
    sources: list[tuple[str | None, Any, Any]] = []
    for name in names:
        bind = binds.get(name)
        if bind is None:
            return None
        process = processors.get(name)
        if bind.key in keys:
            sources.append((bind.key, None, process))
        elif name in keys:
            sources.append((name, None, process))
        elif bind.required or bind.callable:
            return None
        else:
            value = bind.value
            sources.append((None, value if process is None else process(value), None))
    return tuple(sources)


class Statements:
    """The plans of one engine's statements (`plan_for`), and whether to prepare them."""

    def __init__(self, dialect: Dialect, *, prepare: bool = True) -> None:
        self.dialect = dialect
        self.prepare = prepare
        self._plans: dict[tuple[Any, frozenset[str]], Plan | None] = {}

    def plan_for(self, statement: Any, params: dict[str, Any]) -> Plan | None:
        """The statement's plan, or None when it must go through SQLAlchemy."""
        key = (statement, frozenset(params))
        try:
            return self._plans[key]
        except KeyError:
            pass
        plan = self._compile(statement, params)
        if len(self._plans) < MAX_PLANS:
            self._plans[key] = plan
        return plan

    def forget_prepared_form(self, plan: Plan) -> None:
        """The server cannot prepare this statement: from now on it goes as text."""
        plan.name = None

    def _compile(self, statement: Any, params: dict[str, Any]) -> Plan | None:
        if not isinstance(statement, ClauseElement):
            return None
        dialect = self.dialect
        compiled: Any = statement.compile(dialect=dialect, column_keys=list(params))
        if (
            compiled.positional
            or compiled.escaped_bind_names
            or "__[POSTCOMPILE_" in compiled.string
            or getattr(compiled, "insert_prefetch", None)
            or getattr(compiled, "update_prefetch", None)
            or any(
                column[3]._cached_result_processor(dialect, None) is not None
                for column in compiled._result_columns
            )
        ):
            return None
        names: list[str] = []
        positions: dict[str, int] = {}

        def numbered(match: re.Match[str]) -> str:
            name = match.group(1)
            if name is None:
                return "%%"  # a literal %, still escaped for psycopg2's interpolation
            if name not in positions:
                names.append(name)
                positions[name] = len(names)
            return f"${positions[name]}"

        body = _PLACEHOLDER.sub(numbered, compiled.string)
        preparable = (
            self.prepare
            and not isinstance(statement, TextClause)
            and (getattr(statement, "is_select", False) or statement.is_dml)
        )
        prepared = None
        if preparable:
            types = ", ".join(self._type_of(compiled.binds[name].type) for name in names)
            signature = f"({types})" if names else ""
            digest = hashlib.blake2b(f"{signature} {body}".encode(), digest_size=10).hexdigest()
            name = f"todo_{digest}"
            prepared = (name, f"PREPARE {name}{signature} AS {body}")
        return Plan(compiled, names, prepared, frozenset(params))

    def _type_of(self, type_: Any) -> str:
        """A parameter's type in the PREPARE: text for any string (the column checks a length,
        as with the text statement), `unknown` (inferred from its use) where none is stated."""
        if isinstance(type_, NullType):
            return "unknown"
        if isinstance(type_, String):
            return "text"
        return str(self.dialect.type_compiler_instance.process(type_))


class DirectSession:
    """The handler's session, whose `connection()` runs statements on this path."""

    __slots__ = ("_session", "_statements")

    def __init__(self, session: Any, statements: Statements) -> None:
        self._session, self._statements = session, statements

    def connection(self) -> "DirectConnection":
        return DirectConnection(self._session.connection(), self._statements)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class DirectConnection:
    """`execute(statement, params)` as SQLAlchemy's `Connection` has it, run by a `Plan`."""

    __slots__ = ("_connection", "_statements")

    def __init__(self, connection: Connection, statements: Statements) -> None:
        self._connection, self._statements = connection, statements

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    def execute(self, statement: Any, params: dict[str, Any] | None = None) -> Any:
        connection = self._connection
        params = params or {}
        if connection._has_events or connection.engine._has_events:
            return connection.execute(statement, params)  # tracing's spans, and any listener
        plan = self._statements.plan_for(statement, params)
        if plan is None:
            return connection.execute(statement, params)
        dbapi_connection = connection.connection.dbapi_connection
        assert dbapi_connection is not None
        cursor = dbapi_connection.cursor()
        try:
            if plan.name is not None and dbapi_connection.autocommit:
                self._run_prepared(plan, params, dbapi_connection, cursor)
            else:
                cursor.execute(plan.text, plan.values(params))
            description = cursor.description
            rows = None if description is None else cursor.fetchall()
            rowcount = cursor.rowcount
        except Exception as exc:
            if isinstance(exc, psycopg2.Error):
                raise self._translated(exc, plan, params, dbapi_connection, cursor) from exc
            raise
        except BaseException:
            # Cancelled (or the process is exiting) in the middle of a round trip: what the
            # connection holds is unknown, so it is not used again (as SQLAlchemy does).
            connection.invalidate()
            raise
        finally:
            cursor.close()
        if rows is None:
            return DirectResult(None, rowcount, None)
        row_class = plan.row_class
        if row_class is None:
            row_class = plan.row_class = namedtuple(  # type: ignore[misc]
                "Row", [column[0] for column in description], rename=True
            )
        make = tuple.__new__
        return DirectResult([make(row_class, row) for row in rows], rowcount, row_class)

    def _run_prepared(
        self, plan: Plan, params: dict[str, Any], dbapi_connection: Any, cursor: Any
    ) -> None:
        name = plan.name
        assert name is not None
        known: set[str] = dbapi_connection.prepared_statements
        args = plan.arguments(params)
        query = plan.execute if name in known else plan.prepare_and_execute
        for _attempt in range(_ATTEMPTS):
            try:
                cursor.execute(query, args)
            except psycopg2.Error as exc:
                code = exc.pgcode
                if code == errorcodes.INVALID_SQL_STATEMENT_NAME and query is not plan.execute:
                    # DEALLOCATE found none on this server connection: it has none to replace.
                    query = plan.prepare_and_execute
                elif code == errorcodes.INVALID_SQL_STATEMENT_NAME:
                    known.discard(name)  # this server connection has not seen it
                    query = plan.prepare_and_execute
                elif code == errorcodes.DUPLICATE_PREPARED_STATEMENT:
                    known.add(name)  # this one has
                    query = plan.execute
                elif code == errorcodes.FEATURE_NOT_SUPPORTED and _NEW_RESULT_TYPE in str(exc):
                    query = plan.replace_and_execute
                elif code in _UNPREPARABLE and query is not plan.execute:
                    self._statements.forget_prepared_form(plan)
                    break
                else:
                    if query is not plan.execute:
                        # Perhaps prepared before the statement failed: PREPARE outlives the
                        # transaction. Not known, so the next use prepares it, or learns it is.
                        known.discard(name)
                    raise
                continue
            if query is not plan.execute:
                known.add(name)
            return
        cursor.execute(plan.text, plan.values(params))

    def _translated(
        self, exc: psycopg2.Error, plan: Plan, params: Any, dbapi_connection: Any, cursor: Any
    ) -> Exception:
        dialect = self._statements.dialect
        disconnected = dialect.is_disconnect(exc, dbapi_connection, cursor)
        if disconnected:
            self._connection.invalidate(exc)
        return sa_exc.DBAPIError.instance(
            plan.text,
            plan.values(params),
            exc,
            psycopg2.Error,
            connection_invalidated=disconnected,
            dialect=dialect,
        )


class DirectResult:
    """The part of SQLAlchemy's `Result` the slices use, over rows already fetched."""

    __slots__ = ("_rows", "rowcount", "_row_class")

    def __init__(self, rows: list[Any] | None, rowcount: int, row_class: Any) -> None:
        self._rows, self.rowcount, self._row_class = rows, rowcount, row_class

    def _fetched(self) -> list[Any]:
        if self._rows is None:
            raise sa_exc.ResourceClosedError("This result object does not return rows.")
        return self._rows

    def all(self) -> list[Any]:
        return self._fetched()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._fetched())

    def first(self) -> Any:
        rows = self._fetched()
        return rows[0] if rows else None

    def one_or_none(self) -> Any:
        rows = self._fetched()
        if len(rows) > 1:
            raise sa_exc.MultipleResultsFound(
                "Multiple rows were found when one or none was required"
            )
        return rows[0] if rows else None

    def one(self) -> Any:
        rows = self._fetched()
        if not rows:
            raise sa_exc.NoResultFound("No row was found when one was required")
        if len(rows) > 1:
            raise sa_exc.MultipleResultsFound(
                "Multiple rows were found when exactly one was required"
            )
        return rows[0]

    def scalar(self) -> Any:
        row = self.first()
        return None if row is None else row[0]

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalars(self) -> list[Any]:
        return [row[0] for row in self._fetched()]

    def fetchall(self) -> list[Any]:
        return self._fetched()

    def fetchone(self) -> Any:
        return self.first()

    def scalar_one_or_none(self) -> Any:
        row = self.one_or_none()
        return None if row is None else row[0]
