"""The task: its table, its JSON shape, its field rules, and the router every slice mounts on.

Shared by the six operation slices (which never import each other); anything two slices need
lives here or in `backend.platform`.
"""

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response
from pydantic import (
    AfterValidator,
    BaseModel,
    Field,
    StringConstraints,
    TypeAdapter,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    bindparam,
    func,
)
from sqlmodel import Field as ColumnField
from sqlmodel import SQLModel

from backend.platform.auth import AuthenticatedRoute
from backend.platform.conditional import strong_etag
from backend.platform.direct_route import DirectRoute
from backend.platform.errors import TASK_ERRORS, TaskNotFoundError
from backend.platform.guarded import GuardedRoute
from backend.platform.users import BetterAuthUser

TITLE_MAX_LENGTH = 200
DESCRIPTION_MAX_LENGTH = 1000
MAX_TASK_ID = 2**31 - 1  # `serial` is a 4-byte integer


class Task(SQLModel, table=True):
    """A row of `tasks`, as the migrations make it: autogenerate compares against this (and a
    test fails when the two differ), so constraints, defaults and the index are all stated."""

    __tablename__ = "tasks"

    id: int | None = ColumnField(default=None, sa_column=Column(Integer, primary_key=True))
    # Better Auth's table under its default name; the migrations point the key at
    # AUTH_USER_TABLE. Deleting a user deletes their tasks.
    user_id: str = ColumnField(
        sa_column=Column(
            Text,
            ForeignKey(f"{BetterAuthUser.__tablename__}.id", ondelete="CASCADE"),
            nullable=False,
        )
    )
    title: str = ColumnField(sa_column=Column(String(TITLE_MAX_LENGTH), nullable=False))
    description: str | None = ColumnField(default=None, sa_column=Column(Text, nullable=True))
    completed: bool = ColumnField(
        default=False, sa_column=Column(Boolean, nullable=False, server_default="false")
    )
    created_at: datetime | None = ColumnField(
        default=None,
        sa_column=Column(DateTime(timezone=True), nullable=False, server_default=func.now()),
    )
    updated_at: datetime | None = ColumnField(
        default=None,
        sa_column=Column(DateTime(timezone=True), nullable=False, server_default=func.now()),
    )
    # Bumped by every write (`TOUCHED`): the task's ETag. Chosen over deriving the tag from
    # the row's `xmin`: a transaction id would need hiding (it tells about other users'
    # activity), is the same for two writes in one transaction (tests' savepoints aside), and
    # changes under a dump and restore; a counter is plain, portable and costs 4 bytes a row.
    version: int = ColumnField(
        default=1, sa_column=Column(Integer, nullable=False, server_default="1")
    )


# Each slice's statement is one Core statement on the model's table, built once at import: an
# ORM-enabled UPDATE/DELETE (`update(Task)`) would synchronise an identity map the request does
# not have, and a statement built per request is walked again for its cache key. Both cost more
# CPU than the round trip itself (see the README's Performance section). They run on the
# request session's connection (`session.connection().execute`), in its transaction, which
# skips the ORM's execution pipeline that a Core statement does not use.
TASKS: Table = Task.__table__  # type: ignore[attr-defined]
TASK_COLUMNS = tuple(TASKS.c)
# Serves "this user's tasks, newest first" (and any lookup by user_id) from the index.
Index(
    "ix_tasks_user_id_created_at",
    TASKS.c.user_id,
    TASKS.c.created_at.desc(),
    TASKS.c.id.desc(),
)


# What every write sets besides its own fields: the change time and the next version (ETag).
TOUCHED: dict[str, Any] = {"updated_at": func.clock_timestamp(), "version": TASKS.c.version + 1}


def _is_storable_text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


# What `_is_storable_text` and trimming enforce, stated in the schema so that clients (and the
# fuzzer) know them: no NUL anywhere, and a title with something besides whitespace. The class
# lists what pydantic trims (Unicode White_Space), which is not `\s` in every regex dialect.
_WHITESPACE = (
    "\\t\\n\\x0b\\x0c\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
)
_NO_NUL = "^[^\\x00]*$"
# A title: optional whitespace, 1 to 200 characters that start and end with something else, and
# optional whitespace again; no NUL anywhere. The length is checked after trimming, which
# minLength/maxLength cannot express (a padded 200-character title is valid), so the published
# schema says it with this pattern instead.
_VISIBLE = f"[^\\x00{_WHITESPACE}]"
_TITLE_PATTERN = (
    f"^[{_WHITESPACE}]*{_VISIBLE}(?:[^\\x00]{{0,{TITLE_MAX_LENGTH - 2}}}{_VISIBLE})?"
    f"[{_WHITESPACE}]*$"
)


def _title_schema(schema: dict[str, Any]) -> None:
    schema.pop("minLength", None)
    schema.pop("maxLength", None)
    schema["pattern"] = _TITLE_PATTERN


Title = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=TITLE_MAX_LENGTH),
    AfterValidator(_is_storable_text),
    Field(
        description="1 to 200 characters after trimming surrounding whitespace; no NUL.",
        examples=["Buy milk"],
        json_schema_extra=_title_schema,
    ),
]
Description = Annotated[
    Annotated[
        str,
        StringConstraints(max_length=DESCRIPTION_MAX_LENGTH),
        Field(json_schema_extra={"pattern": _NO_NUL}),
    ]
    | None,
    AfterValidator(lambda v: v if v is None else _is_storable_text(v)),
    Field(
        description="Up to 1000 characters, no NUL; null for none.",
        examples=["2 litres, semi-skimmed"],
    ),
]


class TaskRead(BaseModel):
    """A task as the API returns it."""

    id: int = Field(description="The task's id, unique across all users.", examples=[42])
    user_id: str = Field(description="The owner's id (the token's `sub`).")
    title: str = Field(description="The task's title.", examples=["Buy milk"])
    description: str | None = Field(description="Free text, or null.")
    completed: bool = Field(description="Whether the task is done.")
    created_at: datetime = Field(description="When it was created (ISO 8601, UTC).")
    updated_at: datetime = Field(description="When it last changed (ISO 8601, UTC).")
    # Not in the body: it is the `ETag` header's value.
    version: SkipJsonSchema[int] = Field(default=1, exclude=True)

    @field_validator("created_at", "updated_at")
    @classmethod
    def _in_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @classmethod
    def from_row(cls, row: Any) -> "TaskRead":
        """The task in a row of `TASK_COLUMNS`, as every slice's statement returns it."""
        return cls.model_validate(dict(zip(TASK_FIELDS, row, strict=True)))

    @classmethod
    def from_rows(cls, rows: Sequence[Any]) -> "list[TaskRead]":
        """`from_row` for many rows, validated in one call."""
        return _TASKS_JSON.validate_python(
            [dict(zip(TASK_FIELDS, row, strict=True)) for row in rows]
        )


# Rows become dicts before validation: reading a SQLAlchemy Row's columns as attributes
# (`from_attributes`) costs twice as much as the whole validation of a dict, and validating a
# list in one call saves pydantic's per-call overhead: a page of 20 tasks took 108 us that
# way and takes 37 us this one.
TASK_FIELDS = tuple(column.key for column in TASK_COLUMNS)
_ONE_TASK_JSON = TypeAdapter(TaskRead)
_TASKS_JSON = TypeAdapter(list[TaskRead])


def task_response(task: TaskRead, status_code: int = 200) -> Response:
    """The task as the JSON body, its version as the strong `ETag`. Routes return this rather
    than the model, which FastAPI would validate again (it was just built, validated, from the
    row) before serializing it. Each route still declares its `response_model`, which is what
    the OpenAPI schema publishes."""
    return Response(
        _ONE_TASK_JSON.dump_json(task),
        status_code,
        headers={"ETag": strong_etag(task.version)},
        media_type="application/json",
    )


def tasks_json(tasks: list[TaskRead]) -> bytes:
    """Tasks as a JSON array, `[...]`, as the list answers them."""
    return _TASKS_JSON.dump_json(tasks)


def parse_task_id(task_id: str) -> int:
    """Any id that cannot name a row is simply not found: 404, never 422 or 500."""
    if not task_id.isascii() or not task_id.isdigit() or task_id.startswith("0"):
        raise TaskNotFoundError
    if len(task_id) > 10 or int(task_id) > MAX_TASK_ID:
        raise TaskNotFoundError
    return int(task_id)


class TasksRoute(AuthenticatedRoute, GuardedRoute, DirectRoute):
    """Every task route: authenticated first (see `AuthenticatedRoute`), then a `{task_id}` that
    cannot name a row is 404, like a task that does not exist, before the body is read; then the
    safe-retry and conditional headers the route `accepts` (see `GuardedRoute`): the task's
    `version` is its ETag, and a replayed answer is the task as it was stored; then the endpoint,
    its parameters converted without FastAPI's per-request dependency solving (`DirectRoute`).

    The check runs here rather than in a dependency because each dependency FastAPI resolves
    costs every request about 5% of its CPU (measured with callgrind on `get`)."""

    version_column = TASKS.c.version
    replay = staticmethod(lambda stored: TaskRead.model_validate(stored))

    def check_path_params(self, path_params: dict[str, Any]) -> None:
        task_id = path_params.get("task_id")
        if task_id is not None:
            parse_task_id(task_id)


# What reaches a route has passed `parse_task_id`, so FastAPI's own conversion cannot fail; the
# bounds are there for the OpenAPI schema: the integer `id` of a task, within the column's range.
TaskId = Annotated[
    int,
    Path(
        description="The task's id: a positive integer. Anything else is 404.",
        ge=1,
        le=MAX_TASK_ID,
    ),
]


# The ownership guard every single-task statement filters on: another user's task is
# indistinguishable from a missing one. Its values are bound per request by `owner_params`.
OWNED_BY_CALLER = (TASKS.c.id == bindparam("task_id"), TASKS.c.user_id == bindparam("owner_id"))


def owner_params(user_id: str, task_id: int) -> dict[str, Any]:
    """The values of `OWNED_BY_CALLER` for one request."""
    return {"owner_id": user_id, "task_id": task_id}


def tasks_router() -> APIRouter:
    """The router each slice declares its one route on: authenticated first, errors documented.

    Routes are `async def` and hand their handler, plain blocking `Session` code, to
    `await db.run(handler, ...)`, which runs it on the event loop without a thread (see
    `backend.platform.db.Database`). A sync `def` route would cost a thread-pool hop.
    """
    return APIRouter(
        prefix="/api/{user_id}/tasks",
        tags=["tasks"],
        route_class=TasksRoute,
        responses=TASK_ERRORS,
    )
