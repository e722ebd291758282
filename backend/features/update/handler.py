"""Update: apply the fields the client sent, in one UPDATE ... RETURNING."""

from functools import cache
from typing import Any

from sqlalchemy import Update, bindparam, select, update
from sqlmodel import Session

from backend.features.task_model import (
    OWNED_BY_CALLER,
    TASK_COLUMNS,
    TASKS,
    TOUCHED,
    TaskRead,
    owner_params,
)
from backend.platform.errors import TaskNotFoundError

UNCHANGED_TASK = select(*TASK_COLUMNS).where(*OWNED_BY_CALLER)


@cache
def _update_statement(fields: frozenset[str]) -> Update:
    """One statement per set of fields sent (at most seven), built once."""
    return (
        update(TASKS)
        .where(*OWNED_BY_CALLER)
        .values({name: bindparam(f"new_{name}") for name in sorted(fields)})
        .values(TOUCHED)
        .returning(*TASK_COLUMNS)
    )


def update_task(
    session: Session, *, user_id: str, task_id: int, changes: dict[str, Any]
) -> TaskRead:
    params = owner_params(user_id, task_id)
    if changes:
        params.update({f"new_{name}": value for name, value in changes.items()})
        statement: Any = _update_statement(frozenset(changes))
    else:
        # Nothing to change (an empty PATCH): answer with the task as it is, untouched.
        statement = UNCHANGED_TASK
    row = session.connection().execute(statement, params).one_or_none()
    if row is None:
        raise TaskNotFoundError
    return TaskRead.from_row(row)
