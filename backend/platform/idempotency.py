"""`Idempotency-Key` (the IETF httpapi draft): a retried write has its first answer replayed.

How a keyed write stays one statement and one round trip: the slice's statement becomes a
data-modifying CTE, and the key is recorded from its RETURNING rows in the same statement,

    WITH written AS (<the slice's INSERT/UPDATE/DELETE ... RETURNING>),
         recorded AS (INSERT INTO idempotency_keys (...) SELECT ..., to_jsonb(written) FROM written)
    SELECT * FROM written

so the key commits exactly when the write does (the serving engine is in autocommit: the
statement is its own transaction), including when the connection dies mid-flight. A write that
matched no row (404, 412) records no key, since there is no row to select it from.

The key's insert has no ON CONFLICT: a key already recorded (or being recorded by a request
still in flight, which PostgreSQL makes us wait for) is a unique violation, which aborts the
whole statement, the write included. Only then, on that rare path, the stored answer is read:
the same request gets it replayed, a different one is 422, an expired key is deleted and the
write tried again. Requests without the header never reach this module.
"""

import asyncio
import hashlib
import json
import random
from datetime import datetime
from functools import lru_cache
from typing import Any

import structlog
from fastapi import HTTPException, status
from psycopg2 import errorcodes
from sqlalchemy import (
    Column,
    DateTime,
    Insert,
    Select,
    SmallInteger,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError
from sqlmodel import Field as ColumnField
from sqlmodel import Session, SQLModel

log = structlog.get_logger("backend.idempotency")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
KEY_MAX_LENGTH = 255
KEY_LIFETIME = "24 hours"  # a PostgreSQL interval: how long a key's answer is replayed
CLEANUP_INTERVAL_SECONDS = 300.0
CLEANUP_BATCH = 500
PRIMARY_KEY_NAME = "idempotency_keys_pkey"


class IdempotencyKey(SQLModel, table=True):
    """A recorded key and the answer it replays. The primary key serves the lookup of a key (and
    the unique violation the design relies on); `expires_at` is indexed for the cleanup."""

    __tablename__ = "idempotency_keys"

    user_id: str = ColumnField(sa_column=Column(Text, primary_key=True))
    operation: str = ColumnField(sa_column=Column(Text, primary_key=True))
    key: str = ColumnField(sa_column=Column(String(KEY_MAX_LENGTH), primary_key=True))
    fingerprint: str = ColumnField(sa_column=Column(Text, nullable=False))
    status: int = ColumnField(sa_column=Column(SmallInteger, nullable=False))
    response: Any = ColumnField(sa_column=Column(JSONB, nullable=False))
    created_at: datetime | None = ColumnField(
        default=None,
        sa_column=Column(DateTime(timezone=True), nullable=False, server_default=func.now()),
    )
    expires_at: datetime = ColumnField(
        sa_column=Column(DateTime(timezone=True), nullable=False, index=True)
    )


KEYS: Table = IdempotencyKey.__table__  # type: ignore[attr-defined]


def valid_key(value: bytes) -> str:
    """The header's value if it is 1 to 255 visible ASCII characters, else a 400."""
    if not 1 <= len(value) <= KEY_MAX_LENGTH or not all(0x21 <= byte <= 0x7E for byte in value):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"{HEADER} must be 1 to {KEY_MAX_LENGTH} visible ASCII characters",
        )
    return value.decode("ascii")


def fingerprint(method: str, path: str, body: bytes) -> str:
    """What makes two requests "the same": method, path and the parsed body (so whitespace and
    key order do not matter). A body that is not JSON, or that the parser cannot take (nested
    deeper than Python's recursion limit: `RecursionError`, which is not a `ValueError`), is
    compared as bytes; validation answers it 422 anyway. This runs before validation, on
    whatever a client sent, so it must not raise for any bytes."""
    try:
        canonical = json.dumps(
            json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()
    except (ValueError, RecursionError):
        canonical = body
    digest = hashlib.sha256(f"{method} {path}\n".encode())
    digest.update(canonical)
    return digest.hexdigest()


def key_reused() -> HTTPException:
    # Shaped like a validation error (a list of problems), as the 422 is documented.
    problem = {
        "type": "idempotency_key_reused",
        "loc": ["header", HEADER],
        "msg": f"This {HEADER} was already used with a different request",
    }
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, [problem])


def key_in_flight() -> HTTPException:
    return HTTPException(
        status.HTTP_409_CONFLICT,
        f"A request with this {HEADER} is still being processed; retry shortly",
        headers={"Retry-After": "1"},
    )


@lru_cache(maxsize=64)
def keyed_statement(statement: Any) -> Select:
    """The slice's statement with the key recorded from its result, in one statement. Built
    once per statement (the slices' statements are module constants)."""
    written = statement.cte("written")
    record: Insert = insert(KEYS).from_select(
        ["user_id", "operation", "key", "fingerprint", "status", "response", "expires_at"],
        select(
            # Typed, so that the statement can be prepared (nothing else here says what a
            # selected value's type is).
            bindparam("idem_user_id", type_=Text),
            bindparam("idem_operation", type_=Text),
            bindparam("idem_key", type_=Text),
            bindparam("idem_fingerprint", type_=Text),
            bindparam("idem_status", type_=SmallInteger),
            func.to_jsonb(literal_column("written")),
            func.now() + text(f"interval '{KEY_LIFETIME}'"),
        ).select_from(written),
    )
    return select(*written.c).add_cte(record.cte("recorded"))


def key_params(*, user_id: str, operation: str, key: str, fingerprint: str, status: int) -> dict:
    return {
        "idem_user_id": user_id,
        "idem_operation": operation,
        "idem_key": key,
        "idem_fingerprint": fingerprint,
        "idem_status": status,
    }


def is_key_taken(exc: IntegrityError) -> bool:
    orig = exc.orig
    return (
        getattr(orig, "pgcode", None) == errorcodes.UNIQUE_VIOLATION
        and getattr(getattr(orig, "diag", None), "constraint_name", None) == PRIMARY_KEY_NAME
    )


_OWN_KEY = (
    KEYS.c.user_id == bindparam("idem_user_id"),
    KEYS.c.operation == bindparam("idem_operation"),
    KEYS.c.key == bindparam("idem_key"),
)
_STORED = select(
    KEYS.c.fingerprint,
    KEYS.c.status,
    KEYS.c.response,
    (KEYS.c.expires_at <= func.now()).label("expired"),
).where(*_OWN_KEY)
_FORGET_EXPIRED = delete(KEYS).where(*_OWN_KEY, KEYS.c.expires_at <= func.now())


def stored_answer(session: Session, *, params: dict[str, Any]) -> Any:
    """The recorded (fingerprint, status, response, expired) for the request's key, or None."""
    return session.connection().execute(_STORED, params).one_or_none()


def forget_expired(session: Session, *, params: dict[str, Any]) -> None:
    """An expired key must not block its reuse: removed (only if still expired)."""
    session.connection().execute(_FORGET_EXPIRED, params)


# Small batches, rows other instances are deleting skipped: any number of instances may run
# this at once (no advisory lock, which a transaction-mode pooler would not keep anyway).
_DELETE_EXPIRED_BATCH = text(
    "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY("
    "SELECT ctid FROM idempotency_keys WHERE expires_at <= now() "
    "LIMIT :batch FOR UPDATE SKIP LOCKED))"
)


def delete_expired_batch(session: Session) -> int:
    """Delete up to CLEANUP_BATCH expired keys; how many went."""
    result = session.connection().execute(_DELETE_EXPIRED_BATCH, {"batch": CLEANUP_BATCH})
    return result.rowcount  # type: ignore[attr-defined, no-any-return]


async def expire_keys_forever(database: Any, interval: float = CLEANUP_INTERVAL_SECONDS) -> None:
    """The service's own cleanup (no outside cron): every `interval` (jittered, so instances
    started together spread out), delete expired keys batch by batch, yielding between batches.
    A failure (database down) is logged and tried again next time."""
    while True:
        await asyncio.sleep(interval * random.uniform(0.5, 1.0))
        try:
            removed = 0
            while True:
                count = await database.run(delete_expired_batch)
                removed += count
                if count < CLEANUP_BATCH:
                    break
                await asyncio.sleep(0.05)
            if removed:
                log.info("idempotency.keys_expired", removed=removed)
        except Exception as exc:  # noqa: BLE001 - the next round tries again
            log.warning("idempotency.cleanup_failed", error=type(exc).__name__)
