"""Delete: remove one of the owner's tasks and return what it was, in one statement."""

from sqlalchemy import delete
from sqlmodel import Session

from backend.features.task_model import (
    OWNED_BY_CALLER,
    TASK_COLUMNS,
    TASKS,
    TaskRead,
    owner_params,
)
from backend.platform.errors import TaskNotFoundError

DELETE_TASK = delete(TASKS).where(*OWNED_BY_CALLER).returning(*TASK_COLUMNS)


def delete_task(session: Session, *, user_id: str, task_id: int) -> TaskRead:
    row = session.connection().execute(DELETE_TASK, owner_params(user_id, task_id)).one_or_none()
    if row is None:
        raise TaskNotFoundError
    return TaskRead.from_row(row)
