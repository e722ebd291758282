"""Create: `POST /api/{user_id}/tasks`."""

from fastapi import Request, Response, status

from backend.features.create.handler import create_task
from backend.features.create.schema import TaskCreate
from backend.features.task_model import TaskRead, task_response, tasks_router
from backend.platform.auth import CurrentUser
from backend.platform.db import database_of
from backend.platform.errors import error_responses
from backend.platform.guarded import accepts

router = tasks_router()


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=TaskRead,
    summary="Create a task",
    responses=error_responses(413),
)
@accepts(idempotency_key=True)
async def create(body: TaskCreate, user: CurrentUser, request: Request) -> Response:
    """Create a task owned by the signed-in user; committed before the 201 is sent."""
    db = database_of(request)
    return task_response(
        await db.run(create_task, user_id=user.id, data=body),
        status.HTTP_201_CREATED,
    )
