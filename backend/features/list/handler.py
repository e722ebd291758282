"""List: the owner's tasks, newest first, optionally only pending or completed ones."""

from sqlalchemy import Select, bindparam, select
from sqlmodel import Session

from backend.features.list.schema import StatusFilter
from backend.features.task_model import TASK_COLUMNS, TASKS, TaskRead

_OWNED = (
    select(*TASK_COLUMNS)
    .where(TASKS.c.user_id == bindparam("owner_id"))
    # Same order as the (user_id, created_at DESC, id DESC) index: no sort step.
    .order_by(TASKS.c.created_at.desc(), TASKS.c.id.desc())
)
LIST_TASKS: dict[StatusFilter, Select] = {
    StatusFilter.all: _OWNED,
    StatusFilter.pending: _OWNED.where(TASKS.c.completed.is_(False)),
    StatusFilter.completed: _OWNED.where(TASKS.c.completed.is_(True)),
}


def list_tasks(session: Session, *, user_id: str, status: StatusFilter) -> list[TaskRead]:
    rows = session.connection().execute(LIST_TASKS[status], {"owner_id": user_id}).all()
    return TaskRead.from_rows(rows)
