"""Get: one of the owner's tasks."""

from sqlalchemy import select
from sqlmodel import Session

from backend.features.task_model import TASK_COLUMNS, TaskRead, owned_by
from backend.platform.errors import TaskNotFoundError


def get_task(session: Session, *, user_id: str, task_id: int) -> TaskRead:
    row = session.execute(select(*TASK_COLUMNS).where(*owned_by(user_id, task_id))).one_or_none()
    session.commit()
    if row is None:
        raise TaskNotFoundError
    return TaskRead.from_row(row)
