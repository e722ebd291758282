"""Update: `PUT` and `PATCH /api/{user_id}/tasks/{task_id}`."""

from fastapi import Request, Response

from backend.features.task_model import TaskId, TaskRead, task_response, tasks_router
from backend.features.update.handler import update_task
from backend.features.update.schema import TaskPatch, TaskReplace
from backend.platform.auth import CurrentUser
from backend.platform.db import database_of
from backend.platform.errors import error_responses
from backend.platform.guarded import accepts

router = tasks_router()


@router.put(
    "/{task_id}", response_model=TaskRead, summary="Replace a task", responses=error_responses(413)
)
@accepts(idempotency_key=True, if_match=True)
async def replace(
    task_id: TaskId, body: TaskReplace, user: CurrentUser, request: Request
) -> Response:
    """Set the title (required) and any of description and completed; others keep their value."""
    db = database_of(request)
    return task_response(
        await db.run(update_task, user_id=user.id, task_id=task_id, changes=body.changes())
    )


@router.patch(
    "/{task_id}", response_model=TaskRead, summary="Edit a task", responses=error_responses(413)
)
@accepts(idempotency_key=True, if_match=True)
async def patch(task_id: TaskId, body: TaskPatch, user: CurrentUser, request: Request) -> Response:
    """Change only the fields sent; an empty body changes nothing."""
    db = database_of(request)
    return task_response(
        await db.run(update_task, user_id=user.id, task_id=task_id, changes=body.changes())
    )
