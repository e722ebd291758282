"""The yardstick for the service's throughput: the same API with no framework at all.

A bare ASGI app (no Starlette, no FastAPI, no ORM) on asyncpg and PyJWT that answers the six
task operations with the same SQL as the service, verifies the same HS256 tokens and refuses
another user's path, so that what the service costs beyond it is what its layers cost.
`bench/compare.py` runs both side by side on one database. Only what a benchmark exercises is
checked: a title must be a string, the rest is passed to PostgreSQL as sent.

    DATABASE_URL=postgresql://... BETTER_AUTH_SECRET=... \\
        .venv/bin/uvicorn --app-dir bench baseline_app:app --no-access-log

It expects the service's tables (the service creates them at start-up). Behind a pooler that
keeps no protocol-level prepared statements (PgBouncer before 1.21, or without
max_prepared_statements), run it with BASELINE_STATEMENT_CACHE_SIZE=0: asyncpg then names no
statement and parses each again in the round trip that runs it, as asyncpg's documentation
asks for such a pooler (bench/compare.py --pooler decides this).
"""

import json
import os
from collections.abc import Awaitable, Callable
from datetime import datetime
from functools import cache
from typing import Any

import asyncpg
import jwt

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

# Each statement returns the task's columns in this order (see `task_json`).
COLUMNS = "id, user_id, title, description, completed, created_at, updated_at"
LIST = (
    "SELECT id, user_id, title, description, completed, created_at, updated_at "
    "FROM tasks WHERE user_id = $1 ORDER BY created_at DESC, id DESC"
)
LIST_BY_STATE = (
    "SELECT id, user_id, title, description, completed, created_at, updated_at "
    "FROM tasks WHERE user_id = $1 AND completed = $2 ORDER BY created_at DESC, id DESC"
)
GET = (
    "SELECT id, user_id, title, description, completed, created_at, updated_at "
    "FROM tasks WHERE id = $1 AND user_id = $2"
)
CREATE = (
    "INSERT INTO tasks (user_id, title, description, completed) VALUES ($1, $2, $3, $4) "
    "RETURNING id, user_id, title, description, completed, created_at, updated_at"
)
TOGGLE = (
    "UPDATE tasks SET completed = NOT completed, updated_at = clock_timestamp() "
    "WHERE id = $1 AND user_id = $2 "
    "RETURNING id, user_id, title, description, completed, created_at, updated_at"
)
DELETE = (
    "DELETE FROM tasks WHERE id = $1 AND user_id = $2 "
    "RETURNING id, user_id, title, description, completed, created_at, updated_at"
)
EDITABLE = ("title", "description", "completed")
MAX_TASK_ID = 2**31 - 1

SECRET = os.environ.get("BETTER_AUTH_SECRET", "")
# asyncpg's own default is 100 prepared statements kept per connection.
STATEMENT_CACHE_SIZE = int(os.environ.get("BASELINE_STATEMENT_CACHE_SIZE", "100"))
pool: asyncpg.Pool | None = None


@cache
def update_statement(fields: tuple[str, ...]) -> str:
    """One statement per set of fields sent, as the service builds them."""
    # The names come from EDITABLE, never from the request.
    sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, start=3))
    return (
        f"UPDATE tasks SET {sets}, updated_at = clock_timestamp() "  # noqa: S608
        f"WHERE id = $1 AND user_id = $2 RETURNING {COLUMNS}"
    )


def task_json(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": row[0],
        "user_id": row[1],
        "title": row[2],
        "description": row[3],
        "completed": row[4],
        "created_at": _timestamp(row[5]),
        "updated_at": _timestamp(row[6]),
    }


def _timestamp(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    status, body = await answer(scope, receive)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


async def lifespan(receive: Receive, send: Send) -> None:
    global pool
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            # As many connections as the service's pool, each in the session time zone it sets.
            pool = await asyncpg.create_pool(
                os.environ["DATABASE_URL"],
                min_size=16,
                max_size=16,
                statement_cache_size=STATEMENT_CACHE_SIZE,
                server_settings={"TimeZone": "UTC", "application_name": "baseline"},
            )
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if pool is not None:
                await pool.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def answer(scope: Scope, receive: Receive) -> tuple[int, Any]:
    parts = scope["path"].strip("/").split("/")
    method = scope["method"]
    if parts == ["health"]:
        return 200, {"status": "ok"}
    if len(parts) < 3 or parts[0] != "api" or parts[2] != "tasks" or len(parts) > 5:
        return 404, {"detail": "Not Found"}
    user_id = parts[1]
    subject = authenticated_subject(scope)
    if subject is None:
        return 401, {"detail": "Not authenticated"}
    if subject != user_id:
        return 403, {"detail": "Forbidden"}
    assert pool is not None
    if len(parts) == 3:
        if method == "GET":
            return 200, await list_tasks(user_id, scope)
        if method == "POST":
            return await create_task(user_id, await read_json(receive))
        return 405, {"detail": "Method Not Allowed"}
    task_id = parse_task_id(parts[3])
    if task_id is None:
        return 404, {"detail": "Task not found"}
    if len(parts) == 5:
        if parts[4] != "complete":
            return 404, {"detail": "Not Found"}
        if method != "PATCH":
            return 405, {"detail": "Method Not Allowed"}
        row = await pool.fetchrow(TOGGLE, task_id, user_id)
    elif method == "GET":
        row = await pool.fetchrow(GET, task_id, user_id)
    elif method in ("PUT", "PATCH"):
        return await update_task(user_id, task_id, await read_json(receive))
    elif method == "DELETE":
        row = await pool.fetchrow(DELETE, task_id, user_id)
    else:
        return 405, {"detail": "Method Not Allowed"}
    if row is None:
        return 404, {"detail": "Task not found"}
    return 200, task_json(row)


def authenticated_subject(scope: Scope) -> str | None:
    """The `sub` of a valid HS256 bearer token, or None."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not token:
                return None
            try:
                claims = jwt.decode(
                    token, SECRET, algorithms=["HS256"], options={"require": ["exp"]}
                )
            except jwt.InvalidTokenError:
                return None
            subject = claims.get("sub")
            return subject if isinstance(subject, str) and subject else None
    return None


def parse_task_id(text: str) -> int | None:
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        return None
    value = int(text)
    return value if 1 <= value <= MAX_TASK_ID else None


async def read_json(receive: Receive) -> Any:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        return None


async def list_tasks(user_id: str, scope: Scope) -> list[dict[str, Any]]:
    assert pool is not None
    query = scope["query_string"]
    if query in (b"", b"status=all"):
        rows = await pool.fetch(LIST, user_id)
    else:
        rows = await pool.fetch(LIST_BY_STATE, user_id, query == b"status=completed")
    return [task_json(row) for row in rows]


async def create_task(user_id: str, body: Any) -> tuple[int, Any]:
    assert pool is not None
    if not isinstance(body, dict) or not isinstance(body.get("title"), str):
        return 422, {"detail": "title is required"}
    row = await pool.fetchrow(
        CREATE,
        user_id,
        body["title"].strip(),
        body.get("description"),
        bool(body.get("completed", False)),
    )
    return 201, task_json(row)


async def update_task(user_id: str, task_id: int, body: Any) -> tuple[int, Any]:
    assert pool is not None
    if not isinstance(body, dict) or not isinstance(body.get("title", ""), str):
        return 422, {"detail": "invalid body"}
    fields = tuple(name for name in EDITABLE if name in body)
    if fields:
        values = [body[name] for name in fields]
        row = await pool.fetchrow(update_statement(fields), task_id, user_id, *values)
    else:
        row = await pool.fetchrow(GET, task_id, user_id)
    if row is None:
        return 404, {"detail": "Task not found"}
    return 200, task_json(row)
