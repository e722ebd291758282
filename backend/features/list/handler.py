"""List: the owner's tasks, newest first, optionally only pending or completed ones."""

from sqlalchemy import select
from sqlmodel import Session, col

from backend.features.list.schema import StatusFilter
from backend.features.task_model import TASK_COLUMNS, Task, TaskRead


def list_tasks(session: Session, *, user_id: str, status: StatusFilter) -> list[TaskRead]:
    statement = (
        select(*TASK_COLUMNS)
        .where(col(Task.user_id) == user_id)
        # Same order as the (user_id, created_at DESC, id DESC) index: no sort step.
        .order_by(col(Task.created_at).desc(), col(Task.id).desc())
    )
    if status is StatusFilter.pending:
        statement = statement.where(col(Task.completed).is_(False))
    elif status is StatusFilter.completed:
        statement = statement.where(col(Task.completed).is_(True))
    rows = session.execute(statement).all()
    session.commit()  # ends the read transaction now, returning the connection to the pool
    return [TaskRead.from_row(row) for row in rows]
