"""Delete: remove one of the owner's tasks and return what it was, in one statement."""

from sqlalchemy import delete
from sqlmodel import Session

from backend.features.task_model import TASK_COLUMNS, Task, TaskRead, owned_by
from backend.platform.errors import TaskNotFoundError


def delete_task(session: Session, *, user_id: str, task_id: int) -> TaskRead:
    statement = delete(Task).where(*owned_by(user_id, task_id)).returning(*TASK_COLUMNS)
    row = session.execute(statement).one_or_none()
    session.commit()
    if row is None:
        raise TaskNotFoundError
    return TaskRead.from_row(row)
