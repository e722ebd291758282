"""Create: insert one task for its owner, in one round trip."""

from psycopg2 import errorcodes
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from backend.features.create.schema import TaskCreate
from backend.features.task_model import TASK_COLUMNS, TASKS, TaskRead
from backend.platform.auth import UnknownUserError

CREATE_TASK = insert(TASKS).returning(*TASK_COLUMNS)


def create_task(session: Session, *, user_id: str, data: TaskCreate) -> TaskRead:
    values = {
        "user_id": user_id,
        "title": data.title,
        "description": data.description,
        "completed": data.completed,
    }
    try:
        row = session.connection().execute(CREATE_TASK, values).one()
    except IntegrityError as exc:
        if getattr(exc.orig, "pgcode", None) == errorcodes.FOREIGN_KEY_VIOLATION:
            # The token is valid but its user is not in the users table (deleted, or a token
            # minted for an id Better Auth never had): an authentication problem, not a crash.
            raise UnknownUserError from exc
        raise
    return TaskRead.from_row(row)
