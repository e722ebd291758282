"""Get: one of the owner's tasks."""

from sqlalchemy import select
from sqlmodel import Session

from backend.features.task_model import OWNED_BY_CALLER, TASK_COLUMNS, TaskRead, owner_params
from backend.platform.errors import TaskNotFoundError

GET_TASK = select(*TASK_COLUMNS).where(*OWNED_BY_CALLER)


def get_task(session: Session, *, user_id: str, task_id: int) -> TaskRead:
    row = session.connection().execute(GET_TASK, owner_params(user_id, task_id)).one_or_none()
    if row is None:
        raise TaskNotFoundError
    return TaskRead.from_row(row)
