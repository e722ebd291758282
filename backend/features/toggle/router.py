"""Toggle: `PATCH /api/{user_id}/tasks/{task_id}/complete`."""

from fastapi import Request, Response

from backend.features.task_model import TaskId, task_response, tasks_router
from backend.features.toggle.handler import toggle_task
from backend.features.toggle.schema import TaskRead
from backend.platform.auth import CurrentUser
from backend.platform.db import database_of
from backend.platform.guarded import accepts

router = tasks_router()


@router.patch("/{task_id}/complete", response_model=TaskRead, summary="Toggle completion")
@accepts(idempotency_key=True, if_match=True)
async def toggle(task_id: TaskId, user: CurrentUser, request: Request) -> Response:
    """Flip the task between pending and completed; no body needed."""
    db = database_of(request)
    return task_response(await db.run(toggle_task, user_id=user.id, task_id=task_id))
