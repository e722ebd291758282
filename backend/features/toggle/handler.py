"""Toggle: flip `completed` in one atomic UPDATE, so concurrent toggles never lose a flip."""

from sqlalchemy import not_, update
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

# The flip is computed by PostgreSQL from the row it locks, not read first in Python.
TOGGLE_TASK = (
    update(TASKS)
    .where(*OWNED_BY_CALLER)
    .values(completed=not_(TASKS.c.completed), **TOUCHED)
    .returning(*TASK_COLUMNS)
)


def toggle_task(session: Session, *, user_id: str, task_id: int) -> TaskRead:
    row = session.connection().execute(TOGGLE_TASK, owner_params(user_id, task_id)).one_or_none()
    if row is None:
        raise TaskNotFoundError
    return TaskRead.from_row(row)
