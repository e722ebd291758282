"""Update: apply the fields the client sent, in one UPDATE ... RETURNING."""

from typing import Any

from sqlalchemy import func, select, update
from sqlmodel import Session

from backend.features.task_model import TASK_COLUMNS, Task, TaskRead, owned_by
from backend.platform.errors import TaskNotFoundError


def update_task(
    session: Session, *, user_id: str, task_id: int, changes: dict[str, Any]
) -> TaskRead:
    if changes:
        statement: Any = (
            update(Task)
            .where(*owned_by(user_id, task_id))
            .values(**changes, updated_at=func.clock_timestamp())
            .returning(*TASK_COLUMNS)
        )
    else:
        # Nothing to change (an empty PATCH): answer with the task as it is, untouched.
        statement = select(*TASK_COLUMNS).where(*owned_by(user_id, task_id))
    row = session.execute(statement).one_or_none()
    session.commit()
    if row is None:
        raise TaskNotFoundError
    return TaskRead.from_row(row)
