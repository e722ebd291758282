"""Safe retries and concurrent edits, switched on per route by declaration:

    @router.patch("/{task_id}/complete", ...)
    @accepts(idempotency_key=True, if_match=True)
    async def toggle(...): ...

A declared route documents the headers and their answers in the OpenAPI schema, and honours
them: `Idempotency-Key` (`backend.platform.idempotency`), `If-Match` and `If-None-Match`
(`backend.platform.conditional`). The slice's handler is not changed: when a request carries
one of the headers, the handler's statement is rewritten on its way to the database (an extra
WHERE for `If-Match`, a CTE recording the key for `Idempotency-Key`), still one statement.

Cost to requests without these headers: one scan of the request's header list on a declared
route, nothing on the others; no dependency, no round trip.
"""

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, TypeVar

from fastapi import HTTPException, Request, Response, status
from fastapi.routing import APIRoute
from sqlalchemy import Column, Insert, Integer, any_, bindparam, literal, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError

from backend.platform import conditional, idempotency
from backend.platform.errors import TaskNotFoundError, error_responses

T = TypeVar("T")
GUARD_SCOPE_KEY = "todo.write_guard"  # where `database_of` finds the request's guard
_ATTRIBUTE = "__accepted_headers__"


@dataclass(frozen=True, slots=True)
class Accepted:
    idempotency_key: bool = False
    if_match: bool = False
    if_none_match: bool = False


def accepts(
    *, idempotency_key: bool = False, if_match: bool = False, if_none_match: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare which of the safe-retry and conditional headers a route honours. Marks the
    endpoint only (no wrapper, no cost): `GuardedRoute` reads the mark when the route is built."""
    declared = Accepted(idempotency_key, if_match, if_none_match)

    def mark(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        setattr(endpoint, _ATTRIBUTE, declared)
        return endpoint

    return mark


def _header_parameter(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": {"type": "string"},
    }


_KEY_PARAMETER = _header_parameter(
    idempotency.HEADER,
    "Makes the write safe to retry: 1 to 255 visible ASCII characters, unique per intended "
    "write (a UUID). A retry with the same key and the same request within 24 hours gets the "
    f"first answer again, with `{idempotency.REPLAYED_HEADER}: true`, and has no second effect.",
)
_KEY_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": idempotency.KEY_MAX_LENGTH,
    "pattern": "^[\\x21-\\x7e]+$",
}
_IF_MATCH_PARAMETER = _header_parameter(
    "If-Match",
    "Write only if the task's current `ETag` is one of these (or `*`: if it exists); "
    "otherwise 412 and nothing changes.",
)
_IF_NONE_MATCH_PARAMETER = _header_parameter(
    "If-None-Match",
    "The `ETag` you hold: 304 with no body while it is still current.",
)
_ETAG_HEADER = {
    "ETag": {"description": "The representation's entity tag.", "schema": {"type": "string"}}
}
_REPLAYED_HEADER = {
    idempotency.REPLAYED_HEADER: {
        "description": "`true` when this is the stored answer to an earlier request with the "
        "same `Idempotency-Key`.",
        "schema": {"type": "string", "enum": ["true"]},
    }
}


class GuardedRoute(APIRoute):
    """Honours the headers a route declared with `accepts`. Entity-specific parts are class
    attributes a subclass sets: the column whose value is the ETag (`version_column`) and how a
    stored answer becomes the handler's result again (`replay`).

    Placed after `AuthenticatedRoute` in a subclass's bases, so that a request is
    authenticated before its headers are judged."""

    version_column: Column[Any] | None = None
    replay: Callable[[Any], Any] = staticmethod(lambda stored: stored)

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        self.accepted: Accepted | None = getattr(endpoint, _ATTRIBUTE, None)
        # Before APIRoute's __init__, which builds the handler (`get_route_handler`).
        self.success_status = kwargs.get("status_code") or status.HTTP_200_OK
        if self.accepted is not None:
            self._document(kwargs)
        super().__init__(path, endpoint, **kwargs)

    def _document(self, kwargs: dict[str, Any]) -> None:
        assert self.accepted is not None
        success = self.success_status
        extra = dict(kwargs.pop("openapi_extra", None) or {})
        parameters = list(extra.get("parameters", []))
        responses = dict(kwargs.pop("responses", None) or {})
        headers = dict(_ETAG_HEADER)
        if self.accepted.idempotency_key:
            parameters.append({**_KEY_PARAMETER, "schema": _KEY_SCHEMA})
            headers.update(_REPLAYED_HEADER)
            responses.update(error_responses(400, 409, 422))
        if self.accepted.if_match:
            parameters.append(_IF_MATCH_PARAMETER)
            responses.update(error_responses(412))
        if self.accepted.if_none_match:
            parameters.append(_IF_NONE_MATCH_PARAMETER)
            responses[status.HTTP_304_NOT_MODIFIED] = {
                "description": "Not modified: the `If-None-Match` tag is still current."
            }
        responses[success] = {**responses.get(success, {}), "headers": headers}
        extra["parameters"] = parameters
        kwargs["openapi_extra"] = extra
        kwargs["responses"] = responses

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        accepted = self.accepted
        if accepted is None:
            return handler
        version_column, replay = self.version_column, type(self).replay
        operation, success = self.name, self.success_status

        async def honour_headers(request: Request) -> Response:
            key = None
            # Every line of a field counts: several lines are one comma-separated list.
            if_match: list[str] = []
            if_none_match: list[str] = []
            for name, value in request.scope["headers"]:
                if name == b"idempotency-key" and accepted.idempotency_key:
                    if key is not None:
                        raise _one_key_only()
                    key = idempotency.valid_key(value)
                elif name == b"if-match" and accepted.if_match:
                    if_match.append(value.decode("latin-1"))
                elif name == b"if-none-match" and accepted.if_none_match:
                    if_none_match.append(value.decode("latin-1"))
            if key is None and not if_match:
                response = await handler(request)
            else:
                guard = WriteGuard(version_column, replay)
                if if_match:
                    guard.if_match = True
                    guard.versions = conditional.if_match_versions(
                        conditional.field_value(if_match)
                    )
                if key is not None:
                    body = await request.body()
                    guard.key_params = idempotency.key_params(
                        user_id=request.path_params["user_id"],
                        operation=operation,
                        key=key,
                        # The path as the server parsed it: `request.url` would rebuild a URL
                        # from the Host header and the query string, both the client's bytes.
                        fingerprint=idempotency.fingerprint(
                            request.method, request.scope["path"], body
                        ),
                        status=success,
                    )
                request.scope[GUARD_SCOPE_KEY] = guard
                response = await handler(request)
                if guard.replayed_status is not None:
                    response.status_code = guard.replayed_status
                    response.headers[idempotency.REPLAYED_HEADER] = "true"
            if if_none_match and response.status_code == status.HTTP_200_OK:
                etag = response.headers.get("etag")
                if etag is not None and conditional.none_match(
                    conditional.field_value(if_none_match), etag
                ):
                    return Response(
                        status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag}
                    )
            return response

        return honour_headers


def _one_key_only() -> Exception:
    return HTTPException(status.HTTP_400_BAD_REQUEST, f"Send one {idempotency.HEADER} header")


class WriteGuard:
    """One request's conditions on its write, applied to the statement its handler sends."""

    __slots__ = (
        "version_column",
        "replay",
        "if_match",
        "versions",
        "key_params",
        "replayed_status",
        "target",
    )

    def __init__(self, version_column: Column[Any] | None, replay: Callable[[Any], Any]) -> None:
        self.version_column = version_column
        self.replay = replay
        self.if_match = False
        self.versions: list[int] | None = None  # None with if_match: `If-Match: *`
        self.key_params: dict[str, Any] | None = None
        self.replayed_status: int | None = None
        self.target: tuple[Any, dict[str, Any]] | None = None

    def around(self, database: Any) -> "GuardedDatabase":
        return GuardedDatabase(database, self)

    def call(self, handler: Callable[..., T], kwargs: dict[str, Any], session: Any) -> T:
        return handler(_GuardedSession(session, self), **kwargs)

    def rewrite(self, statement: Any, params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        if self.if_match and self.versions is not None and self.version_column is not None:
            self.target = (statement, params)
            statement = _version_checked(statement, self.version_column)
            params = {**params, "if_match_versions": self.versions}
        if self.key_params is not None:
            if isinstance(statement, Insert):
                statement = _values_bound(statement, frozenset(params))
            statement = idempotency.keyed_statement(statement)
            params = {**params, **self.key_params}
        return statement, params

    def target_exists(self, session: Any) -> bool:
        assert self.target is not None
        statement, params = self.target
        return session.connection().execute(_existence(statement), params).first() is not None


class GuardedDatabase:
    """`Database.run` for a request with conditions: what they add to the answer."""

    def __init__(self, database: Any, guard: WriteGuard) -> None:
        self.database, self.guard = database, guard

    async def run(self, handler: Callable[..., T], /, **kwargs: Any) -> T:
        guard, database = self.guard, self.database
        for _attempt in range(3):
            missed: TaskNotFoundError | None = None
            try:
                return await database.run(partial(guard.call, handler, kwargs))  # type: ignore[no-any-return]
            except IntegrityError as exc:
                if guard.key_params is None or not idempotency.is_key_taken(exc):
                    raise
            except TaskNotFoundError as exc:
                # Zero rows. With a key, perhaps because this is a retry of a write that
                # succeeded (the task is gone, or its version moved on): its answer is
                # replayed. Otherwise no such task of the caller's, or one whose tag did not
                # match: told apart only now, on the failure path.
                if guard.key_params is None:
                    raise await self._not_found_or_failed_precondition(exc) from None
                missed = exc
            assert guard.key_params is not None
            stored = await database.run(idempotency.stored_answer, params=guard.key_params)
            if stored is None or stored.expired:
                if missed is not None:
                    raise await self._not_found_or_failed_precondition(missed) from None
                if stored is not None:  # an expired key must not block its reuse
                    await database.run(idempotency.forget_expired, params=guard.key_params)
                continue  # the key went (expired) since the write ran into it: write again
            if stored.fingerprint != guard.key_params["idem_fingerprint"]:
                raise idempotency.key_reused()
            guard.replayed_status = stored.status
            return guard.replay(stored.response)  # type: ignore[no-any-return]
        raise idempotency.key_in_flight()

    async def _not_found_or_failed_precondition(self, missed: Exception) -> Exception:
        """412 if the task exists (so `If-Match` is what failed), else the 404 as it was;
        another user's task is never found, so it stays a 404 whatever `If-Match` says."""
        if self.guard.target is not None and await self.database.run(self.guard.target_exists):
            return conditional.precondition_failed()
        return missed


class _GuardedSession:
    """The handler's session, whose connection sends the guarded statement instead."""

    __slots__ = ("_session", "_guard")

    def __init__(self, session: Any, guard: WriteGuard) -> None:
        self._session, self._guard = session, guard

    def connection(self) -> "_GuardedConnection":
        return _GuardedConnection(self._session.connection(), self._guard)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class _GuardedConnection:
    __slots__ = ("_connection", "_guard")

    def __init__(self, connection: Any, guard: WriteGuard) -> None:
        self._connection, self._guard = connection, guard

    def execute(self, statement: Any, params: dict[str, Any] | None = None) -> Any:
        statement, params = self._guard.rewrite(statement, params or {})
        return self._connection.execute(statement, params)


@lru_cache(maxsize=64)
def _version_checked(statement: Any, version_column: Column[Any]) -> Any:
    """The statement, matching only rows whose version `If-Match` named: the check is part of
    the write, so no other write can slip between a check and it."""
    versions = bindparam("if_match_versions", type_=ARRAY(Integer))
    return statement.where(version_column == any_(versions))


@lru_cache(maxsize=64)
def _values_bound(statement: Insert, names: frozenset[str]) -> Insert:
    """An INSERT whose values come from the execute parameters names them as bound parameters:
    nested in a CTE, SQLAlchemy would otherwise render them anonymous, with no value."""
    columns = statement.table.c  # type: ignore[attr-defined]
    return statement.values({name: bindparam(name) for name in sorted(names) if name in columns})


@lru_cache(maxsize=64)
def _existence(statement: Any) -> Any:
    """Whether the statement's target row exists at all (its own WHERE, no tag)."""
    table = statement.table if hasattr(statement, "table") else statement.get_final_froms()[0]
    return select(literal(1)).select_from(table).where(statement.whereclause)
