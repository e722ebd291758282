"""Toggle: flip `completed` in one atomic UPDATE, so concurrent toggles never lose a flip."""

from sqlalchemy import func, not_, update
from sqlmodel import Session, col

from backend.features.task_model import TASK_COLUMNS, Task, TaskRead, owned_by
from backend.platform.errors import TaskNotFoundError


def toggle_task(session: Session, *, user_id: str, task_id: int) -> TaskRead:
    # The flip is computed by PostgreSQL from the row it locks, not read first in Python.
    statement = (
        update(Task)
        .where(*owned_by(user_id, task_id))
        .values(completed=not_(col(Task.completed)), updated_at=func.clock_timestamp())
        .returning(*TASK_COLUMNS)
    )
    row = session.execute(statement).one_or_none()
    session.commit()
    if row is None:
        raise TaskNotFoundError
    return TaskRead.from_row(row)
